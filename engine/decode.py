"""Token-by-token decoding after a fused prompt (greedy, or sampled with a temperature).

Tokens are computed with `blend.extend` in the blend's own K/V buffers, so nothing is copied per
token; `model.generate` also accepts the merged cache as is (see `blend.to_dynamic_cache`). Greedy
decoding may carry an answer guard (answer_guard.py): at a near-tie it goes on from exact KV (and an
answer read whole may take back tokens that had left the exact path: `TakeBack`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..blend import BlendResult, extend
from ..models import ModelAdapter
from .answer_guard import AnswerGuard


@dataclass(frozen=True)
class TakeBack:
    """Yielded by `decode` when the answer guard takes back the answer's tokens from step `keep` on (an
    answer read whole at its end, answer_guard.py): the reader drops them; decoding goes on from there."""

    keep: int


@torch.inference_mode()
def decode(
    model: ModelAdapter,
    result: BlendResult,
    eos_ids: set[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    guard: AnswerGuard | None = None,
) -> Iterator[int | TakeBack]:
    """Yield up to `max_new_tokens` ids after the blend's prompt (`result.num_tokens` rows), the first
    picked from the blend's logits, stopping at EOS (which is yielded). Sampling draws from torch's
    global generator. With a `guard` (greedy only), a near-tie step moves the answer onto exact KV; a
    guard that may take tokens back yields a `TakeBack` first when it does."""
    logits, start = result.logits, result.num_tokens
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        if temperature > 0.0:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))
        else:
            if guard is not None and (switch := guard.check(logits, tokens)) is not None:
                result, logits = switch.result, switch.result.logits
                if switch.keep < len(tokens):
                    del tokens[switch.keep :]
                    yield TakeBack(switch.keep)
            token = int(logits.argmax())
        tokens.append(token)
        yield token
        if token in eos_ids or len(tokens) == max_new_tokens:
            return
        logits = extend(model, result, torch.tensor([token], device=model.device), start + len(tokens) - 1)[0]


def read_whole(steps: Iterable[int | TakeBack]) -> list[int]:
    """An answer as its reader gets it at the end: `decode`'s tokens, the taken-back ones dropped."""
    tokens: list[int] = []
    for step in steps:
        if isinstance(step, TakeBack):
            del tokens[step.keep :]
        else:
            tokens.append(step)
    return tokens
