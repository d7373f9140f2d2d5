"""How many requests may be fused (and decoded) together: a token budget and a K/V buffer budget.

A batch's prompt tokens (what the packed pass attends over) and its K/V buffers (every layer's K and V
for each prompt's rows plus the rows reserved to decode into, held until the request is done) stay
within `BatchBudget`; a request over the budget on its own runs alone. The budget comes from the
settings (`batch_tokens`, `batch_kv_bytes`) or, where they are not set, a default for the device.
`fits` is what a scheduler asks before adding a request to the batch it is forming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .request import FusionRequest

CPU_TOKENS, CPU_KV_BYTES = 16384, 1 << 30
GPU_TOKENS, GPU_KV_SHARE = 65536, 0.25  # a quarter of the GPU's memory for K/V buffers


@dataclass(frozen=True)
class BatchBudget:
    """At most `tokens` prompt tokens fused in one pass and `kv_bytes` of K/V buffers held at once."""

    tokens: int
    kv_bytes: int

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.kv_bytes < 1:
            raise ValueError(f"a batch budget needs tokens >= 1 and kv_bytes >= 1, got {self.tokens}, {self.kv_bytes}")

    @classmethod
    def of(cls, engine) -> BatchBudget:
        """The engine's configured budget, each part not set taken from the device's default."""
        tokens, kv_bytes = engine.config.batch_tokens, engine.config.batch_kv_bytes
        dev = engine.model.device
        if dev.type == "cuda":
            default = cls(GPU_TOKENS, int(torch.cuda.get_device_properties(dev).total_memory * GPU_KV_SHARE))
        else:
            default = cls(CPU_TOKENS, CPU_KV_BYTES)
        return cls(tokens or default.tokens, kv_bytes or default.kv_bytes)


@dataclass(frozen=True)
class RequestSize:
    """One request's share of a budget: its prompt tokens and the bytes of its K/V buffers."""

    tokens: int
    kv_bytes: int


def kv_bytes_per_row(model) -> int:
    """Bytes of one K/V buffer row over all layers (K and V)."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * torch.finfo(model.dtype).bits // 8


def size_of(engine, num_tokens: int, reserve: int) -> RequestSize:
    """The size of a prompt of `num_tokens` tokens keeping `reserve` rows to decode into."""
    return RequestSize(num_tokens, (num_tokens + reserve) * kv_bytes_per_row(engine.model))


def estimate(engine, request: FusionRequest) -> RequestSize:
    """A request's size before it runs: exact for given chunks or documents (their tokens and the
    prompt template), an upper bound for retrieval (`k` chunks of the retriever's largest size). A bad
    request (an empty document) is sized, not refused: `fuse_many` reports its error."""
    prefix, query, sep = engine.template.render(engine.tokenizer, request.question)
    if request.chunks is not None:
        lengths = [len(c) for c in request.chunks]
    elif request.documents is not None:
        lengths = [len(engine.template.chunk_ids(engine.tokenizer, d)) for d in request.documents]  # never raises
    else:
        lengths = [engine.config.retriever.chunk_max_tokens] * request.k
    tokens = len(prefix) + len(query) + sum(n + len(sep) for n in lengths)
    return size_of(engine, tokens, request.reserve)


def within(sizes: Sequence[RequestSize], budget: BatchBudget, held_kv_bytes: int = 0) -> bool:
    """Whether `sizes` together (with `held_kv_bytes` of buffers already held) stay within `budget`."""
    tokens = sum(s.tokens for s in sizes)
    kv = held_kv_bytes + sum(s.kv_bytes for s in sizes)
    return tokens <= budget.tokens and kv <= budget.kv_bytes


def fits(
    engine, requests: Sequence[FusionRequest], budget: BatchBudget | None = None, *, held_kv_bytes: int = 0
) -> bool:
    """Whether `requests` may run as one batch: within the budget (the engine's by default) next to
    `held_kv_bytes` of K/V buffers already held (streams still decoding: `stream_kv_bytes`), or a
    single request with nothing held (an oversized request runs alone)."""
    budget = budget or BatchBudget.of(engine)
    sizes = [estimate(engine, r) for r in requests]
    return within(sizes, budget, held_kv_bytes) or (len(requests) == 1 and held_kv_bytes == 0)


def split(sizes: Sequence[RequestSize], budget: BatchBudget) -> list[list[int]]:
    """Indices of `sizes` in order, grouped greedily into batches within `budget`; a request over the
    budget on its own gets a batch of its own."""
    groups: list[list[int]] = []
    current: list[int] = []
    for i, size in enumerate(sizes):
        if current and not within([sizes[j] for j in current] + [size], budget):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
