"""Token-by-token decoding from a merged KV cache (greedy, or sampled with a temperature).

`model.generate` also accepts the cache as is (see `blend.to_dynamic_cache`); this loop exists so
that tokens can be streamed and the first token comes from the blend's own logits.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


@torch.inference_mode()
def decode(
    model, cache, first_logits: torch.Tensor, max_new_tokens: int, eos_ids: set[int], temperature: float = 0.0
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids, the first picked from `first_logits` [vocab], stopping at EOS."""
    logits = first_logits
    device = next(model.parameters()).device
    for step in range(max_new_tokens):
        if temperature > 0.0:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))
        else:
            token = int(logits.argmax())
        yield token
        if token in eos_ids or step + 1 == max_new_tokens:
            return
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1]
