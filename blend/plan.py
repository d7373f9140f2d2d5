"""BlendPlan: the layout of one fused prompt.

`prefix | chunk_0 | sep | chunk_1 | sep | ... | query`: template and query tokens are fresh (always
computed); each chunk's rows may come from its cached KV. Chat templates are applied around the
chunks' fixed token ids, never by re-tokenizing the joined text. Target positions are 0..N-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, eq=False)
class BlendPlan:
    """Token ids of the whole prompt and where each chunk sits in it."""

    input_ids: torch.Tensor  # [N] long
    chunk_spans: tuple[tuple[int, int], ...]  # [start, end) of each chunk, in prompt order
    # chunks whose cached KV is exactly this prompt's rows (computed after this very prefix, at this very
    # position: the first chunk, when chunk KV is computed after the template's prefix): never recomputed
    exact_chunks: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.num_tokens)  # [N]

    @property
    def prefix_len(self) -> int:
        """Tokens before the first chunk (the whole prompt if there is none)."""
        return self.chunk_spans[0][0] if self.chunk_spans else self.num_tokens

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """The token ids before the first chunk."""
        return tuple(self.input_ids[: self.prefix_len].tolist())

    def with_exact(self, chunks: Sequence[int]) -> BlendPlan:
        """This plan with `chunks` (indices) marked as holding exact cached KV."""
        for i in chunks:
            if not 0 <= i < len(self.chunk_spans):
                raise ValueError(f"no chunk {i} in a plan of {len(self.chunk_spans)} chunks")
        return replace(self, exact_chunks=tuple(sorted(set(chunks))))

    def exact_mask(self) -> torch.Tensor:
        """[N] bool: True on rows of the `exact_chunks`."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for i in self.exact_chunks:
            start, end = self.chunk_spans[i]
            mask[start:end] = True
        return mask

    def source_mask(self, sources) -> torch.Tensor:
        """[N] bool: the rows the cached `sources` (target start row, KV) fill."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for start, kv in sources:
            mask[start : start + kv.num_tokens] = True
        return mask

    def candidates(self, cached: torch.Tensor) -> torch.Tensor:
        """[N] bool: the `cached` [N] rows a strategy may recompute: chunk rows not marked exact (a cached
        prompt prefix is exact too, and never a candidate)."""
        return cached & self.chunk_mask() & ~self.exact_mask()

    def has_candidates(self, sources) -> bool:
        """Whether any row the cached `sources` fill may be recomputed: False when every cached chunk is
        exact (one retrieved chunk computed after the prompt's prefix), so nothing is left to rank."""
        return bool(self.candidates(self.source_mask(sources)).any())

    def chunk_mask(self) -> torch.Tensor:
        """[N] bool: True on rows that belong to a chunk."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for start, end in self.chunk_spans:
            mask[start:end] = True
        return mask


def make_plan(
    prefix_ids: Sequence[int],
    chunks: Sequence[Sequence[int]],
    query_ids: Sequence[int],
    separator_ids: Sequence[int] = (),
) -> BlendPlan:
    """Lay out `prefix + chunk_0 + sep + chunk_1 + sep + ... + query`."""
    if len(query_ids) == 0:
        raise ValueError("the query needs at least one token (the last prompt token is always computed)")
    ids: list[int] = [int(t) for t in prefix_ids]
    spans: list[tuple[int, int]] = []
    for chunk in chunks:
        if len(chunk) == 0:
            raise ValueError("empty chunk: every chunk needs at least one token")
        spans.append((len(ids), len(ids) + len(chunk)))
        ids.extend(int(t) for t in chunk)
        ids.extend(int(t) for t in separator_ids)
    ids.extend(int(t) for t in query_ids)
    return BlendPlan(torch.tensor(ids, dtype=torch.long), tuple(spans))
