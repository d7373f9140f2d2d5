"""FlexAttention runs at bucketed shapes (`models.attention.flex_bucket`): every prompt in a bucket shares one
static compile, whatever ran first; padding changes nothing in the result (checked on CPU, eager FlexAttention)."""

from __future__ import annotations

import warnings

import pytest
import torch

from ragkv.models import attention
from ragkv.models.attention import FlexMask, flex_bucket, query_mask


def test_buckets_hold_n_on_a_coarse_grid():
    sizes = [flex_bucket(n) for n in range(1, 70000, 37)]
    assert all(b >= n and b % 128 == 0 for b, n in zip(sizes, range(1, 70000, 37)))
    assert sizes == sorted(sizes)  # monotone: a longer prompt never gets a smaller shape
    assert all(flex_bucket(n) <= 1.19 * n + 128 for n in range(1, 70000, 37))  # padding stays small
    assert len(set(sizes)) <= 4 * 10  # 4 per doubling from 128 to 64K: few compiles over a whole run
    assert flex_bucket(5000) == flex_bucket(5100) and flex_bucket(10000) != flex_bucket(20000)
    with pytest.raises(ValueError, match="at least 1"):
        flex_bucket(0)


@pytest.mark.parametrize("n,t", [(700, 320), (256, 256), (130, 3)])
def test_padded_flex_equals_dense_and_ignores_rows_past_the_keys(n, t):
    g = torch.Generator().manual_seed(n + t)
    pos = torch.cat([torch.randperm(n - 1, generator=g)[: t - 1].sort().values, torch.tensor([n - 1])])
    q = torch.randn(1, 4, t, 16, generator=g)
    k, v = torch.randn(1, 2, n + 50, 16, generator=g), torch.randn(1, 2, n + 50, 16, generator=g)
    k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")  # a buffer's spare rows: never read
    want = query_mask(pos, n, torch.device("cpu"), "dense").attend(q, k, v, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is not compiled
        mask = FlexMask(pos, n, torch.device("cpu"))
        got = mask.attend(q, k, v, 0.25)
        got_again = mask.attend(q, k, v, 0.25)  # the padded key buffer is reused across layers
    assert mask.shape == (flex_bucket(t), flex_bucket(n)) and mask.shape in attention.FLEX_SHAPES
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, got_again)


def test_prompts_in_one_bucket_share_the_compiled_shape():
    shapes = set()
    for n in (5000, 5050, 5200):
        pos = torch.arange(n - 600, n)
        shapes.add(FlexMask(pos, n, torch.device("cpu")).shape)
    assert shapes == {(flex_bucket(600), flex_bucket(5000))}
