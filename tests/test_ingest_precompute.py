"""Prepacked precompute (varlen attention) equals the block-diagonal-mask reference and one-by-one."""

from __future__ import annotations

import torch

from ragkv.adapters.base import segment_bounds
from ragkv.chunk_cache import precompute_many


def test_varlen_equals_mask_reference_and_one_by_one(tiny_adapter):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 33, 8)]
    single = precompute_many(tiny_adapter, chunks, max_tokens_per_pass=0)
    packed = precompute_many(tiny_adapter, chunks, max_tokens_per_pass=64)  # several chunks per pass
    for a, b in zip(single, packed):
        assert a.pos0 == b.pos0 == 1
        torch.testing.assert_close(b.kv, a.kv, rtol=1e-5, atol=1e-6)
    sink = list(tiny_adapter.sink_ids)
    seqs = [sink + c for c in chunks]
    ids = torch.tensor([t for s in seqs for t in s])  # [T]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])  # [T]
    seg = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])  # [T]
    torch.testing.assert_close(tiny_adapter.forward_kv(ids, pos, seg), tiny_adapter.forward_kv_masked(ids, pos, seg),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_segment_bounds():
    assert segment_bounds(torch.tensor([0, 0, 1, 2, 2, 2])) == [(0, 2), (2, 3), (3, 6)]
    assert segment_bounds(torch.tensor([4])) == [(0, 1)]
