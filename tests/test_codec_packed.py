"""The `packed` codec's own promises: bit planes round-trip at every width, each element is within half
a step of its (clipped) value, the grid search picks the least error, the layout is what the bytes
are, format 1 entries keep decoding (bit for bit) beside the format 2 the writer writes, foreign format
versions are refused, and corrupt bytes are caught by the CRC. Format 2's widths: tests/test_packed_widths.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import CodecError, EncodedKV, get_codec
from ragkv.compression.packed import (
    FORMAT,
    PackedCodec,
    PackedConfig,
    PackedLayout,
    fit_grid,
    pack_planes,
    scale_index,
    stored_widths,
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
        PackedConfig(key_bits=(4.5, 0.5, 1), value_bits=(3.25, 8)),
        PackedConfig(key_bits=(4, 2, 1), value_bits=(3, 8), key_group=(7, 3), value_group=(1, 8), format=1),
    ],
    ids=["default", "fractional", "mixed-format1"],
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
            step = torch.from_numpy(buf[part.step : part.step + 2 * part.scales].copy()).view(torch.float16).float()
            group = scale_index(part, t, c)  # [T, C]
            bits = part.bits
            if layout.format == 2:  # per-channel widths, from the stored table
                bits = torch.from_numpy(stored_widths(buf[part.prefix : part.prefix + 2 * (c + 1)], part.code_bits))
            top = lo[group] + ((1 << bits) - 1) * step[group]
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


@pytest.mark.parametrize("format", [1, 2])
def test_bits_follow_the_bands_and_set_the_size(format):
    kv = make_kv(shape=(2, 4, 64, 2, 8))
    small = PackedCodec(PackedConfig(key_bits=(2,), value_bits=(2,), format=format)).encode(kv)
    mixed = PackedCodec(PackedConfig(key_bits=(4, 2), value_bits=(2,), format=format)).encode(kv)
    sizes = np.diff(mixed.meta["offsets"])
    assert sizes[0] == sizes[1] > sizes[2] == sizes[3]  # layers 0-1 carry K at 4 bits, 2-3 at 2
    values = kv.kv.numel()
    # 2 bits + one fp16 (lo, step) per channel; format 2: + int16 [C + 1], 2 bytes pad, a spare byte, 3 pad
    table = 0 if format == 1 else (2 * 17 + 2 + 1 + 3) * 8 / (64 * 16)
    assert 8 * small.nbytes / values == pytest.approx(2 + 32 / 64 + table)
    assert 8 * mixed.nbytes / values == pytest.approx(8 * small.nbytes / values + 0.5, abs=0.01)


def test_format2_mean_widths_may_be_fractional_and_set_the_size_exactly():
    kv = make_kv(shape=(2, 2, 64, 2, 8))  # 16 channels: 2.25 bits = 36 code bits per token
    enc = PackedCodec(PackedConfig(key_bits=(2.25,), value_bits=(2.25,))).encode(kv)
    layout = PackedLayout.of(PackedConfig(key_bits=(2.25,), value_bits=(2.25,)), 64, 16, 0, 2)
    assert [p.code_bits for p in layout.parts] == [36, 36]
    assert np.diff(enc.meta["offsets"]).tolist() == [layout.nbytes] * 2
    assert 8 * enc.nbytes / kv.kv.numel() < 2.25 + 32 / 64 + 0.7


def test_packed_beats_its_stated_error_on_kv_like_data():
    kv = make_kv(shape=(2, 2, 200, 2, 16))
    codec = get_codec("packed")
    out = codec.decode(codec.encode(kv)).kv
    err = float((out - kv.kv).norm() / kv.kv.norm())
    assert 0 < err <= codec.rel_error


def test_the_writer_writes_format_2_and_unknown_versions_are_refused():
    codec = get_codec("packed")
    enc = codec.encode(make_kv())
    assert enc.meta["params"]["format"] == FORMAT == 2
    future = EncodedKV(enc.codec, enc.payload, {**enc.meta, "params": {**enc.meta["params"], "format": 3}})
    with pytest.raises(CodecError, match="format 3"):
        codec.decode(future)
    with pytest.raises(ValueError, match="format 2 has one grid per channel"):
        PackedConfig(key_group=(16, 1))  # other geometries stay format 1's


def _resealed(enc: EncodedKV, layer: int, edit) -> EncodedKV:
    """`enc` with `edit(section bytearray)` applied to one layer and that layer's CRC recomputed: damage the
    CRC cannot see (a writer's bug, or a forged entry)."""
    import zlib

    start, end = enc.meta["offsets"][layer], enc.meta["offsets"][layer + 1]
    payload = bytearray(enc.payload)
    section = payload[start:end]
    edit(section)
    payload[start:end] = section
    crc = list(enc.meta["crc"])
    crc[layer] = zlib.crc32(section)
    return EncodedKV(enc.codec, bytes(payload), {**enc.meta, "crc": crc})


def test_damaged_format2_entries_are_detected():
    codec = PackedCodec(PackedConfig(key_bits=(3.5,), value_bits=(2,)))
    enc = codec.encode(make_kv(shape=(2, 2, 40, 2, 8)))
    for where in (0, len(enc.payload) // 3, len(enc.payload) - 1):  # a grid, a table or codes, the pad
        flipped = bytearray(enc.payload)
        flipped[where] ^= 0x10
        with pytest.raises(CodecError, match="CRC32"):
            codec.decode(EncodedKV(enc.codec, bytes(flipped), enc.meta))
    part = PackedLayout.of(codec.config, 40, 16, 1, 2).parts[0]

    def widen(section):  # channel 0 claims 2 more bits: the table no longer adds up to the layer's code bits
        table = np.frombuffer(bytes(section[part.prefix : part.prefix + 34]), np.int16).copy()
        table[1:] += 2
        section[part.prefix : part.prefix + 34] = table.tobytes()

    damaged = _resealed(enc, 1, widen)
    with pytest.raises(CodecError, match="do not add up"):
        codec.decode(damaged)
    task = codec.layer_task(damaged, 1)  # the device decoder cannot check the table: it stays inside the part
    out = codec.device_layer(task, task.section_tensor())
    assert out.shape == (2, 40, 2, 8)


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


# A format-1 entry of the default geometry (K 3, V 2 bits, per-channel grids) as the format-1 writer wrote it
# (main before format 2, make_kv seed 4): the reader must decode it to the same bits, and the format-1 writer,
# still there (`PackedConfig(format=1)`), must write the same bytes.
FORMAT1_DEFAULT_PAYLOAD = (
    "9eb58fcb5fbd3ec7b5bc64b965c112b23730034461363341603c872ea23a9b2aec8f8502932bf78f88d29e72ec6b3530151500008"
    "8b8accd46b91bc863c04eb887bd05a48f324648803810497640c731bd3d612d0798ed75969b2221226fb8cd92bdd7cd71ac12c258"
    "bf28b615bb52b21f3424440d33333e363a822e8837fb2acbb7092f957cda39eb6d556cfb331246144e0000b5b8d3c27fb988c728c1"
    "5bb4a0bdf1afe4320045be364e3fce43b434f2396b2ad54bee887827872c43311a33"
)
FORMAT1_DEFAULT_META = {
    "shape": [2, 2, 6, 1, 8],
    "dtype": "float16",
    "pos0": 5,
    "offsets": [0, 96, 192],
    "crc": [141481965, 645655522],
    "params": {"format": 1, "key_bits": [3] * 6, "value_bits": [2] * 6, "key_group": [0, 1], "value_group": [0, 1]},
}
FORMAT1_DEFAULT_SHA256 = "f87c6301dd8dc946fcef5aa16b0d5fca638562c47d94b973a38d347b5f94728e"  # fp32 bytes


def test_format1_default_entries_decode_bit_identically_and_the_format1_writer_is_unchanged():
    import hashlib

    enc = EncodedKV("packed", bytes.fromhex(FORMAT1_DEFAULT_PAYLOAD), FORMAT1_DEFAULT_META)
    codec = get_codec("packed")  # writes format 2
    out = codec.decode(enc).kv
    assert hashlib.sha256(out.float().numpy().tobytes()).hexdigest() == FORMAT1_DEFAULT_SHA256
    kv = make_kv(shape=(2, 2, 6, 1, 8), dtype=torch.float16, seed=4)
    again = PackedCodec(PackedConfig(format=1)).encode(kv)
    assert again.payload == enc.payload and again.meta == enc.meta
    assert codec.encode(kv).meta["params"]["format"] == 2
