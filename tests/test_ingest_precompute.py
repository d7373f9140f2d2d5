"""Prepacked precompute (varlen attention per packed chunk) equals one chunk per pass."""

from __future__ import annotations

import torch

from ragkv.chunk_cache import precompute_many


def test_packed_equals_one_by_one(tiny_adapter):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 33, 8)]
    single = precompute_many(tiny_adapter, chunks, max_tokens_per_pass=0)
    packed = precompute_many(tiny_adapter, chunks, max_tokens_per_pass=64)  # several chunks per pass
    for a, b in zip(single, packed):
        assert a.pos0 == b.pos0 == 1
        torch.testing.assert_close(b.kv, a.kv, rtol=1e-5, atol=1e-6)
