"""FusionRequest: one request, built once at an edge (library call, CLI, sidecar, adapters) with every
default resolved there, then carried unchanged through the Engine's stages.

`FusionRequest.build(config, question, documents, **options)` is the one place where a request's
strategy, recompute ratio, namespace, decode budget and reserved rows fall back to the configured
defaults; nothing downstream resolves a default again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from ..blend.config import validate

DEFAULT_K = 5  # chunks retrieved when neither documents nor chunks are given


@dataclass(frozen=True)
class FusionRequest:
    """What to answer and how: the question, where its chunks come from (texts, token ids, or
    retrieval of `k` chunks when neither is given), the fusion strategy and the decode settings."""

    question: str
    documents: tuple[str, ...] | None = None  # texts, one chunk each
    chunks: tuple[tuple[int, ...], ...] | None = None  # token ids, one tuple per chunk
    k: int = DEFAULT_K
    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    namespace: str = "default"
    max_new_tokens: int = 32
    reserve: int = 32  # K/V rows kept after the prompt to decode into (0: fuse only, e.g. proxy mode)
    temperature: float = 0.0
    answer_guard: float = 0.0  # greedy near-ties under this logit margin decided on exact KV (0: off)
    # its tokens reach the reader as they are decoded (True), or the answer is read whole at its end (False:
    # the guard may take back tokens the fused KV decided off the exact path, engine/answer_guard.py)
    stream: bool = False

    def __post_init__(self) -> None:
        validate(self.strategy, self.recompute_ratio)
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (chunks to retrieve), got {self.k}")
        if self.max_new_tokens < 0 or self.reserve < 0:
            raise ValueError(f"max_new_tokens and reserve must be >= 0, got {self.max_new_tokens}, {self.reserve}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (self.answer_guard >= 0.0 and math.isfinite(self.answer_guard)):
            raise ValueError(f"answer_guard is a logit margin, a finite number >= 0 (0 = off), got {self.answer_guard}")

    @classmethod
    def build(cls, config, question: str, documents: Sequence[str] | None = None, **options) -> FusionRequest:
        """A request with every option not given (or given as None) taken from `config` (an
        EngineConfig): strategy, ratio and answer guard from `config.blend`, namespace, max_new_tokens; `reserve`
        defaults to max_new_tokens. Unknown options raise a TypeError naming the accepted ones."""
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise TypeError(f"unknown request option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(OPTIONS))}")
        given = {name: value for name, value in options.items() if value is not None}
        max_new = given.get("max_new_tokens", config.max_new_tokens)
        chunks = given.get("chunks")
        return cls(
            question=question,
            documents=None if documents is None else tuple(documents),
            chunks=None if chunks is None else tuple(tuple(int(t) for t in c) for c in chunks),
            k=given.get("k", DEFAULT_K),
            strategy=given.get("strategy", config.blend.strategy),
            recompute_ratio=float(given.get("recompute_ratio", config.blend.recompute_ratio)),
            namespace=given.get("namespace", config.namespace),
            max_new_tokens=max_new,
            reserve=given.get("reserve", max_new),
            temperature=float(given.get("temperature", 0.0)),
            answer_guard=float(given.get("answer_guard", config.blend.answer_guard)),
            stream=bool(given.get("stream", False)),
        )

    @property
    def retrieves(self) -> bool:
        """Neither documents nor chunks were given: the chunks come from the namespace's index."""
        return self.documents is None and self.chunks is None


OPTIONS = frozenset(f.name for f in fields(FusionRequest)) - {"question", "documents"}
