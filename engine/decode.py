"""Token-by-token decoding after a fused prompt (greedy, or sampled with a temperature).

Tokens are computed with `blend.extend` in the blend's own K/V buffers, so nothing is copied per
token; `model.generate` also accepts the merged cache as is (see `blend.to_dynamic_cache`). Greedy
decoding may carry an answer guard (answer_guard.py): at a near-tie it goes on from exact KV.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..blend import BlendResult, extend
from ..models import ModelAdapter
from .answer_guard import AnswerGuard


@torch.inference_mode()
def decode(
    model: ModelAdapter,
    result: BlendResult,
    eos_ids: set[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    guard: AnswerGuard | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids after the blend's prompt (`result.num_tokens` rows), the first
    picked from the blend's logits, stopping at EOS (which is yielded). Sampling draws from torch's
    global generator. With a `guard` (greedy only), a near-tie step moves the answer onto exact KV."""
    logits, start = result.logits, result.num_tokens
    tokens: list[int] = []
    for step in range(max_new_tokens):
        if temperature > 0.0:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))
        else:
            if guard is not None and (exact := guard.check(logits, tokens)) is not None:
                result, logits = exact, exact.logits
            token = int(logits.argmax())
        tokens.append(token)
        yield token
        if token in eos_ids or step + 1 == max_new_tokens:
            return
        logits = extend(model, result, torch.tensor([token], device=model.device), start + step)[0]
