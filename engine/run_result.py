"""RunResult: what `Engine.run` returns for one fused prompt, and where its time to first token went."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..blend import BlendPlan
from ..blend.loop import BlendResult
from .request import FusionRequest

# The parts of a TTFT, in request order; they add up to `ttft_ms` because `other` is the remainder.
PARTS = (
    "retrieve",  # searching the document index (0 when chunks or documents are given)
    "template",  # tokenizing given documents and the question, rendering the prompt template, the plan
    "lookup",  # hashing chunk keys and asking the store which tier holds each
    "precompute",  # computing the KV of misses (and of entries that vanished or failed their checksum)
    "load",  # reading cached entries (file reads, checksums) and, per layer, decoding them for the blend
    "rerotate",  # moving cached keys to their new positions
    "recompute",  # the layers' fresh q/k/v and attention of the computed tokens (all of them for `full`)
    "first_token",  # final norm and LM head of the last prompt token
    "other",  # the rest of the TTFT: plan checks, embeddings, RoPE tables, buffer setup, Python overhead
    "guard",  # the answer guard's exact prefill when the first token was a near-tie (answer_guard.py; else 0)
    "batch",  # the sidecar's scheduler: the share spent on the other requests fused in the same batch (0 alone)
)


@dataclass
class RunResult:
    """One fused prompt: its plan, the blend result (merged KV, first-token logits), cache accounting,
    and the TTFT with its parts in milliseconds (see `PARTS`; they sum to `ttft_ms`). Store upkeep
    deferred by the request (promotions of lower-tier hits) runs after `ttft_ms` is taken."""

    plan: BlendPlan
    blend: BlendResult
    ttft_ms: float
    parts_ms: dict[str, float]
    hits: dict[str, int] = field(default_factory=dict)  # per tier
    misses: int = 0  # chunks precomputed by this request (lookup misses + vanished entries)
    request: FusionRequest | None = None  # what was asked, every default resolved

    @property
    def logits(self):
        """First-token logits [vocab] fp32."""
        return self.blend.logits

    @property
    def prompt_tokens(self) -> int:
        return self.plan.num_tokens
