"""The answer guard: a greedy token that a fused prompt decides by a near-tie is decided on exact KV.

A fused prompt's next-token logits are close to the full prefill's (kl ~0.01-0.04 at 10-15% recompute),
not equal, so its greedy answer mostly leaves the full prefill's where the top two tokens are nearly
tied: of the 14 answers that turned on 10 demo and 13 MuSiQue questions, 12 turned at a step where the
blended or the full prefill's margin (top-1 minus top-2 logit) was under 0.26, one after an earlier
blended step at 0.09, one at clear margins on both sides (docs/BENCHMARKS.md, "The answer guard"). A
budget cannot buy the near-ties back (30% recompute answered like 15%); exact KV can.

So, for greedy decoding: when a step's margin on the fused KV falls below `blend.answer_guard`, before
its token is picked the answer moves onto exact KV (`exact_kv`: the model's own forward over the prompt,
then the answer's tokens so far in one pass) and decodes the rest from there, with no further check
(the KV is now the full prefill's). The answer then equals the full prefill's unless the fused one had
already left it at a clear margin. Cost: one full prefill for the answers that meet a near-tie (before
the first token when the first step is the tie: the `guard` part of the TTFT). Sampling is not guarded,
and neither are exact strategies (`full`, `prefix`).

The exact pass over the answer so far also says whether the fused KV had already left the exact path at
a clear margin before the switch: the first answer step whose token is not the exact KV's greedy pick
(`Switch.left_at`). An answer read whole at its end (`FusionRequest.stream` False: the library's
`generate()`, REST without `stream`, the eval) takes its tokens back from that step (`Switch.keep`) and
decodes on from the exact KV, so it is the full prefill's answer; a streamed answer cannot take back what
its reader already has, so it goes on from the switch and says in a warning where it had left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..blend import BlendPlan, BlendResult, extend
from ..models import ModelAdapter, synchronize
from .full_prefill import full_prefill

logger = logging.getLogger(__name__)
EXACT_STRATEGIES = ("full", "prefix")  # every prompt row computed in context: nothing to guard


def margin(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 logit of a next-token distribution [vocab]: how clearly greedy decides."""
    top = logits.float().topk(2).values
    return float(top[0] - top[1])


@dataclass(frozen=True)
class Switch:
    """The exact KV an answer goes on from, and how much of the answer it keeps."""

    result: BlendResult  # exact KV of the prompt and the kept tokens; `logits`: for the token after them
    keep: int  # answer tokens kept (all of them unless taken back)
    left_at: int | None  # the first answer step whose token the exact KV would not have picked (None: none)


@torch.inference_mode()
def exact_kv(model: ModelAdapter, plan: BlendPlan, tokens: Sequence[int], capacity: int) -> tuple[BlendResult, list]:
    """The prompt's exact KV (the model's own forward) with the answer's `tokens` after it, in buffers of
    `capacity` rows, and the exact logits [vocab] of every answer step (len(tokens) + 1: the last is for
    the token after them, also the result's `logits`). `num_tokens` stays the prompt's N, so the answer's
    rows are where a decode loop over the fused prompt put them."""
    exact = full_prefill(model, plan, reserve=capacity - plan.num_tokens)
    if not tokens:
        return exact, [exact.logits]
    ids = torch.tensor(list(tokens), device=model.device)
    after = extend(model, exact, ids, plan.num_tokens)  # [T, vocab]
    return replace(exact, logits=after[-1]), [exact.logits, *after]


def first_departure(tokens: Sequence[int], steps: Sequence[torch.Tensor]) -> int | None:
    """The first step whose token is not the greedy pick of that step's exact logits (None: all are)."""
    picks = torch.stack([row.float() for row in steps[: len(tokens)]]).argmax(-1).tolist() if tokens else []
    return next((i for i, (t, p) in enumerate(zip(tokens, picks)) if t != p), None)


@dataclass
class AnswerGuard:
    """One answer's guard: `check` each greedy step's logits; at the first near-tie it returns the exact
    KV to go on with (once per answer)."""

    threshold: float  # logit margin under which a step is a near-tie
    exact: Callable[[Sequence[int]], tuple[BlendResult, list]]  # `exact_kv` after the prompt and these tokens
    take_back: bool = False  # the answer is read whole at its end: tokens past a departure may be taken back
    switched_at: int | None = None  # the answer step decided on exact KV first (None: not switched)
    left_at: int | None = None  # the step where the fused answer had left the exact path before the switch
    switch_ms: float = 0.0  # the exact prefill's wall time
    failure: str | None = None  # why the exact prefill failed (e.g. out of memory): the answer stays fused

    def due(self, logits: torch.Tensor) -> bool:
        """Whether `check` would switch at a step with these `logits` [vocab] (an exact prefill's cost):
        a near-tie while the answer is still on fused KV, guarded."""
        return self.switched_at is None and self.failure is None and margin(logits) < self.threshold

    def check(self, logits: torch.Tensor, tokens: Sequence[int]) -> Switch | None:
        """The exact KV to decode the step after `tokens` (or, taking back, after the kept ones) from when
        `logits` [vocab] are a near-tie and the answer is still on fused KV; None otherwise. A failed
        exact prefill (out of memory, say) leaves the answer on its fused KV, unguarded from then on,
        rather than failing it (`failure` says why)."""
        if not self.due(logits):
            return None
        t0 = time.perf_counter()
        try:
            exact, steps = self.exact(tokens)
            synchronize(exact.logits.device)
        except (RuntimeError, ValueError) as exc:  # torch's OutOfMemoryError is a RuntimeError
            self.failure = f"the answer guard's exact prefill failed ({type(exc).__name__}: {exc}); decoded on fused KV"
            logger.warning(self.failure)
            return None
        self.switch_ms = (time.perf_counter() - t0) * 1e3
        self.switched_at = len(tokens)
        self.left_at = first_departure(tokens, steps)
        keep = self.left_at if self.take_back and self.left_at is not None else len(tokens)
        return Switch(replace(exact, logits=steps[keep]), keep, self.left_at)

    @property
    def taken_back(self) -> int | None:
        """The step from which answer tokens were taken back and decoded again on exact KV (None: none)."""
        return self.left_at if self.take_back else None

    @property
    def warning(self) -> str | None:
        """What the reader should know: a failed exact prefill, or a streamed answer that had left the
        exact path before its switch (its tokens were already out)."""
        if self.failure:
            return self.failure
        if self.left_at is not None and not self.take_back:
            return (
                f"answer tokens from step {self.left_at} were decided on fused KV and are not the full prefill's "
                f"(found at the guard's switch at step {self.switched_at}; a streamed answer cannot take them back)"
            )
        return None

    @property
    def first_token_ms(self) -> float:
        """What the guard added to the time to first token (its prefill when the first step was the tie)."""
        return self.switch_ms if self.switched_at == 0 else 0.0


def guard_for(
    model: ModelAdapter,
    plan: BlendPlan,
    result: BlendResult,
    strategy: str,
    temperature: float,
    threshold: float,
    take_back: bool = False,
) -> AnswerGuard | None:
    """The guard of one fused answer, or None where there is nothing to guard: threshold 0, sampling, an
    exact strategy, a fusion whose every chunk was exact already (one retrieved chunk computed after this
    prompt's prefix: its KV is the full prefill's, a switch would buy nothing), or a prompt beyond the
    model's exact attention span (no full prefill there). `take_back`: the answer is read whole at its
    end, so tokens the fused KV had decided off the exact path before a switch are taken back."""
    if threshold <= 0.0 or temperature > 0.0 or strategy in EXACT_STRATEGIES or result.recompute_fraction >= 1.0:
        return None
    if len(plan.exact_chunks) == len(plan.chunk_spans):
        return None
    if model.max_context is not None and plan.num_tokens > model.max_context:
        return None
    capacity = result.buffers[0][0].shape[2]
    return AnswerGuard(threshold, lambda tokens: exact_kv(model, plan, tokens, capacity), take_back)
