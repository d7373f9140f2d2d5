"""Format 2 of `packed` (compression/packed_widths.py): a part's code bits are split over its channels by
equal step (a wider channel gets more bits, each extra bit where it halves the largest step), the split
sums to the layer's bits exactly, and the code stream round-trips at any widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragkv.compression.packed_widths import channel_widths, pack_stream, prefix_of, stream_bytes, unpack_stream


def test_widths_follow_the_spread_and_spend_exactly_the_bits():
    spread = torch.tensor([1.0, 4.0, 0.0, 16.0, 1.0], dtype=torch.float64)
    widths = channel_widths(spread, [10])
    assert widths.tolist() == [1, 3, 0, 5, 1]  # steps 1/2, 4/8, -, 16/32, 1/2: as equal as whole bits allow
    assert int(widths.sum()) == 10
    assert channel_widths(spread, [0]).tolist() == [0] * 5
    assert channel_widths(spread, [40]).tolist() == [8] * 5  # every channel at the widest


@pytest.mark.parametrize("total", [0, 1, 7, 33, 64, 128])
def test_widths_per_row_sum_to_each_rows_bits_and_grow_with_them(total):
    spread = torch.rand(3, 16, generator=torch.Generator().manual_seed(total), dtype=torch.float64) * 10
    spread[1, 3] = 0.0
    widths = channel_widths(spread, [total, total, min(total + 5, 128)])
    assert widths.min() >= 0 and widths.max() <= 8
    assert widths.sum(dim=1).tolist() == [total, total, min(total + 5, 128)]
    more = channel_widths(spread, [min(total + 9, 128)] * 3)
    assert (more >= widths).all()  # more bits never take one from a channel


def test_ties_keep_channel_order_on_every_device():
    widths = channel_widths(torch.ones(6, dtype=torch.float64), [3])
    assert widths.tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_stream_round_trips_at_any_widths(tokens):
    rng = np.random.default_rng(tokens)
    widths = torch.from_numpy(rng.integers(0, 9, 19))
    widths[4] = 0
    codes = torch.from_numpy(rng.integers(0, 256, (tokens, 19)).astype(np.uint8)) & ((1 << widths) - 1).to(torch.uint8)
    stream = pack_stream(codes, widths)
    assert stream.numel() == stream_bytes(tokens, int(widths.sum()))
    assert int(stream[-1]) == 0  # the spare byte
    assert np.array_equal(unpack_stream(stream.numpy(), widths.numpy(), tokens), codes.numpy())
    assert prefix_of(widths)[-1] == widths.sum()
