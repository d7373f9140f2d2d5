"""The `packed` codec's own promises: bit planes round-trip at every width, each element is within half
a step of its (clipped) value, the grid search picks the least error, the layout is what the bytes
are, old or foreign format versions are refused, and corrupt bytes are caught by the CRC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import CodecError, EncodedKV, get_codec
from ragkv.compression.packed import (
    PackedCodec,
    PackedConfig,
    PackedLayout,
    fit_grid,
    pack_planes,
    scale_index,
    unpack_planes,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 8, 13, 1000])
def test_bit_planes_round_trip(bits, n):
    codes = np.random.default_rng(bits * 1000 + n).integers(0, 1 << bits, n).astype(np.uint8)
    planes = pack_planes(codes, bits)
    assert len(planes) == bits * ((n + 7) // 8)
    out = unpack_planes(np.frombuffer(planes, np.uint8).reshape(bits, -1), bits, n)
    assert np.array_equal(out, codes)


@pytest.mark.parametrize(
    "config",
    [
        PackedConfig(),
        PackedConfig(key_bits=(4, 2, 1), value_bits=(3, 8), key_group=(7, 3), value_group=(1, 8)),
    ],
    ids=["default", "mixed"],
)
@pytest.mark.parametrize("tokens", [1, 23, 64])
def test_elements_within_half_a_step_of_the_clipped_value(config, tokens):
    kv = make_kv(shape=(2, 3, tokens, 2, 8))
    codec = PackedCodec(config)
    enc = codec.encode(kv)
    out = codec.decode(enc).kv
    for layer in range(3):
        t, c = tokens, 16
        layout = PackedLayout.of(config, t, c, layer, 3)
        section = enc.payload[enc.meta["offsets"][layer] : enc.meta["offsets"][layer + 1]]
        assert len(section) == layout.nbytes and layout.nbytes % 4 == 0
        buf = np.frombuffer(section, np.uint8)
        for kv_i, part in enumerate(layout.parts):
            lo = torch.from_numpy(buf[part.lo : part.step].copy()).view(torch.float16).float()
            step = torch.from_numpy(buf[part.step : part.planes].copy()).view(torch.float16).float()
            group = scale_index(part, t, c)  # [T, C]
            top = lo[group] + ((1 << part.bits) - 1) * step[group]
            x = kv.kv[kv_i, layer].reshape(t, c)
            clipped = torch.minimum(torch.maximum(x, lo[group]), top)
            err = (out[kv_i, layer].reshape(t, c) - clipped).abs()
            assert (err <= step[group] / 2 * (1 + 1e-3) + 1e-6).all(), f"layer {layer} part {kv_i}"


def test_grid_search_clips_an_outlier_when_that_lowers_the_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g, dtype=torch.float64)
    x[7] = 40.0  # one outlier in one group of 400
    group = torch.zeros(400, dtype=torch.long)
    lo, step = fit_grid(x, group, 1, 2)
    full_range_step = (x.max() - x.min()) / 3
    assert float(step[0]) < 0.9 * float(full_range_step)  # a clipped range was chosen
    dequant = lambda lo_, st_: lo_ + torch.round((x - lo_) / st_).clamp(0, 3) * st_  # noqa: E731
    sse = float((dequant(float(lo[0]), float(step[0])) - x).pow(2).sum())
    unclipped = float((dequant(float(x.min()), float(full_range_step)) - x).pow(2).sum())
    assert sse < unclipped


def test_bits_follow_the_bands_and_set_the_size():
    kv = make_kv(shape=(2, 4, 64, 2, 8))
    small = PackedCodec(PackedConfig(key_bits=(2,), value_bits=(2,))).encode(kv)
    mixed = PackedCodec(PackedConfig(key_bits=(4, 2), value_bits=(2,))).encode(kv)
    sizes = np.diff(mixed.meta["offsets"])
    assert sizes[0] == sizes[1] > sizes[2] == sizes[3]  # layers 0-1 carry K at 4 bits, 2-3 at 2
    values = kv.kv.numel()
    assert 8 * small.nbytes / values == pytest.approx(2 + 32 / 64)  # 2 bits + one fp16 (lo, step) per channel
    assert 8 * mixed.nbytes / values == pytest.approx(8 * small.nbytes / values + 0.5, abs=0.01)


def test_packed_beats_its_stated_error_on_kv_like_data():
    kv = make_kv(shape=(2, 2, 200, 2, 16))
    codec = get_codec("packed")
    out = codec.decode(codec.encode(kv)).kv
    err = float((out - kv.kv).norm() / kv.kv.norm())
    assert 0 < err <= codec.rel_error


def test_unknown_format_version_is_refused():
    codec = get_codec("packed")
    enc = codec.encode(make_kv())
    future = EncodedKV(enc.codec, enc.payload, {**enc.meta, "params": {**enc.meta["params"], "format": 2}})
    with pytest.raises(CodecError, match="format 2"):
        codec.decode(future)


def test_corrupt_bytes_are_never_decoded():
    codec = get_codec("packed")
    enc = codec.encode(make_kv())
    for where in (0, len(enc.payload) // 2, len(enc.payload) - 1):  # a grid, a plane, the last layer's pad
        flipped = bytearray(enc.payload)
        flipped[where] ^= 0x01
        with pytest.raises(CodecError, match="CRC32"):
            codec.decode(EncodedKV(enc.codec, bytes(flipped), enc.meta))


def test_bad_config_and_out_of_range_values_are_named():
    with pytest.raises(ValueError, match="key_bits must be"):
        PackedConfig(key_bits=(9,))
    with pytest.raises(ValueError, match="value_group must be"):
        PackedConfig(value_group=(0, 0))
    with pytest.raises(ValueError, match="fp16"):
        get_codec("packed").encode(ChunkKV(torch.full((2, 1, 3, 1, 8), 1e6), 0))


# A format-1 entry as written by the first packed encoder (K 3 then 2 bits per band, V 2 bits per token
# in groups of 4 channels): whatever the encoder learns later, these bytes must keep decoding to these values.
FORMAT1_PAYLOAD = (
    "3eb6a6beb831c8c210a912b377c57fc4002d0338a3348e3d4a2a8129f140053c892b3418efac61c61fefc03336976e00a2befbc1"
    "bd2cfca2eaba8aa463b4e3320ac0ebbd743a58443b3692420e37f240c43a6b41693d5e42b9cac986638c82c88a420000a1b9b238"
    "f8ba26c057b13ab01dca3acb7a34c53a92367d3ce52e6d2d0b4643467c303279c24c459967cf0000dac400cbcf2037c72cc0aec1"
    "12bb78c4c0c0c7c1e33fe1447d380247163d233c69382740233edc4973bc3783867788b2b3830000"
)
FORMAT1_META = {
    "shape": [2, 2, 5, 1, 8],
    "dtype": "float16",
    "pos0": 5,
    "offsets": [0, 100, 196],
    "crc": [114463784, 3786348847],
    "params": {"format": 1, "key_bits": [3, 2], "value_bits": [2], "key_group": [0, 1], "value_group": [1, 4]},
}
FORMAT1_DECODED_SHA256 = "ec250474bd0175a171c3e4cb2b95367f40e464a843f329bae1e811f8683c8f87"  # fp32 bytes


def test_format1_entries_keep_decoding_to_the_same_values():
    import hashlib

    enc = EncodedKV("packed", bytes.fromhex(FORMAT1_PAYLOAD), FORMAT1_META)
    out = get_codec("packed").decode(enc).kv  # a reader with other defaults: the entry's params rule
    assert hashlib.sha256(out.float().numpy().tobytes()).hexdigest() == FORMAT1_DECODED_SHA256
    original = make_kv(shape=(2, 2, 5, 1, 8), dtype=torch.float16, seed=3).kv.float()
    assert float((out.float() - original).norm() / original.norm()) < 0.2  # and they are the chunk's values
