"""Contract suite run against every codec the registry names: round trips (bit-exact or within the
stated error), per-layer decoding, metadata, odd shapes, and corrupted entries that must raise."""

from __future__ import annotations

import json

import pytest
import torch

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import CODECS, CodecError, EncodedKV, codec_names, get_codec
from ragkv.compression.names import CODEC_NAMES

ALL = codec_names()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def make_kv(shape=(2, 3, 23, 2, 8), dtype=torch.float32, pos0=5, seed=0) -> ChunkKV:
    """KV-like data: per-channel scales spanning 100x (K outlier channels) and a slow drift over tokens."""
    g = torch.Generator().manual_seed(seed)
    _, num_layers, t, h, d = shape
    scale = torch.logspace(-1, 1, h * d)[torch.randperm(h * d, generator=g)].view(1, 1, 1, h, d)  # [1,1,1,H,D]
    drift = torch.randn(2, num_layers, 1, h, d, generator=g).expand(shape) * torch.linspace(0, 1, t).view(1, 1, t, 1, 1)
    x = (torch.randn(shape, generator=g) + drift) * scale  # [2, L, T, H, D]
    return ChunkKV(x.to(dtype), pos0)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip(name, dtype):
    codec = get_codec(name)
    kv = make_kv(dtype=dtype)
    enc = codec.encode(kv)
    out = codec.decode(enc)
    assert out.kv.shape == kv.kv.shape and out.dtype == dtype and out.pos0 == kv.pos0
    if codec.lossless:
        assert torch.equal(
            out.kv.view(torch.int16 if dtype != torch.float32 else torch.int32),
            kv.kv.view(torch.int16 if dtype != torch.float32 else torch.int32),
        ), "must be bit-exact"
    else:
        err = rel_error(out.kv, kv.kv)
        assert 0 < err <= codec.rel_error, f"{name}: rel error {err:.4f} above its stated {codec.rel_error}"


@pytest.mark.parametrize("name", ALL)
def test_decode_layer_equals_decode(name):
    codec = get_codec(name)
    enc = codec.encode(make_kv())
    whole = codec.decode(enc)
    for layer in range(whole.num_layers):
        assert torch.equal(codec.decode_layer(enc, layer), whole.layer(layer))
    with pytest.raises(IndexError, match="out of range"):
        codec.decode_layer(enc, whole.num_layers)


@pytest.mark.parametrize("name", ALL)
def test_meta_is_json_and_dtype_override(name):
    codec = get_codec(name)
    kv = make_kv(dtype=torch.float16)
    enc = codec.encode(kv)
    assert enc.codec == codec.name
    again = EncodedKV(enc.codec, enc.payload, json.loads(json.dumps(enc.meta)))  # as a catalog stores it
    out = codec.decode(again, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.pos0 == 5
    assert torch.equal(out.kv.half(), codec.decode(enc).kv)  # lossy codecs dequantize in fp32, then cast


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 1), (2, 2, 7, 1, 3), (2, 1, 31, 3, 5)], ids=str)
def test_odd_shapes(name, shape):
    codec = get_codec(name)
    kv = make_kv(shape=shape)
    out = codec.decode(codec.encode(kv))
    assert out.kv.shape == kv.kv.shape
    tol = 0.0 if codec.lossless else codec.rel_error
    assert rel_error(out.kv, kv.kv) <= tol


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fill", [0.0, 3.0])
def test_constant_kv(name, fill):
    codec = get_codec(name)
    kv = ChunkKV(torch.full((2, 2, 12, 2, 4), fill), 0)
    out = codec.decode(codec.encode(kv))
    assert torch.allclose(out.kv, kv.kv, atol=1e-3 * max(fill, 1.0)), "a constant chunk must survive"


@pytest.mark.parametrize("name", ALL)
def test_corrupted_entry_raises(name):
    codec = get_codec(name)
    enc = codec.encode(make_kv())
    flipped = bytearray(enc.payload)
    flipped[len(flipped) // 2] ^= 0x10
    with pytest.raises(CodecError, match="CRC32"):
        codec.decode(EncodedKV(enc.codec, bytes(flipped), enc.meta))
    with pytest.raises(CodecError, match="truncated"):
        codec.decode_layer(EncodedKV(enc.codec, enc.payload[:-3], enc.meta), 0)
    with pytest.raises(CodecError, match="lacks"):
        codec.decode(EncodedKV(enc.codec, enc.payload, {k: v for k, v in enc.meta.items() if k != "offsets"}))
    with pytest.raises(CodecError, match="decodes only"):
        codec.decode(EncodedKV("something-else", enc.payload, enc.meta))


@pytest.mark.parametrize("name", [n for n in ALL if not get_codec(n).lossless])
def test_lossy_codecs_refuse_non_finite(name):
    kv = make_kv()
    kv.kv[0, 0, 3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        get_codec(name).encode(kv)


def test_unsupported_dtype_named():
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        get_codec("identity").encode(ChunkKV(torch.zeros(2, 1, 2, 1, 2, dtype=torch.float64), 0))


def test_registry_names_and_errors():
    assert {"identity", "lz4", "int8", "cachegen", "lz4+int8", "lz4+cachegen"} <= set(ALL)
    assert get_codec("lz4+int8").name == "lz4+int8" and not get_codec("lz4+int8").lossless
    assert get_codec("lz4").lossless and get_codec("lz4").name == "lz4"
    with pytest.raises(ValueError, match="unknown codec 'zstd'; known codecs: identity"):
        get_codec("zstd")
    with pytest.raises(ValueError, match="lz4 composes over"):
        get_codec("lz4+zstd")
    with pytest.raises(ValueError, match="lz4 composes once"):
        get_codec("lz4+lz4")
    with pytest.raises(ValueError, match="only 'lz4\\+NAME'"):
        get_codec("int8+cachegen")
    assert all(name in CODECS for name in ("identity", "lz4", "int8", "cachegen"))
    # names.py (what a configuration is checked against, without torch) names exactly the registry's codecs
    assert set(CODECS) == set(CODEC_NAMES) - ({"fp8"} if not hasattr(torch, "float8_e4m3fn") else set())
    assert [get_codec(name).name for name in ALL] == ALL  # every accepted name builds its codec


def test_lz4_refuses_entries_of_another_inner_codec():
    enc = get_codec("lz4+int8").encode(make_kv())
    with pytest.raises(CodecError, match="decodes only"):
        get_codec("lz4").decode(enc)


def test_compression_actually_shrinks():
    kv = make_kv(shape=(2, 2, 200, 2, 16))
    raw = get_codec("identity").encode(kv).nbytes
    assert raw == kv.nbytes
    assert get_codec("int8").encode(kv).nbytes < raw / 3.5  # fp32 -> 1 byte + scales
    assert get_codec("cachegen").encode(kv).nbytes < raw / 8
