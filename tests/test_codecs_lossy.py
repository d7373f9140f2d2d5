"""The lossy codecs' own promises: element-wise error bounds (int8, fp8, cachegen), anchor-delta and
layer-wise bins in cachegen, the entropy streams (escapes, padding), and <= 2 bits/value on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import CacheGenCodec, CacheGenConfig, Fp8Codec, Int8Codec
from ragkv.compression.cachegen import quant_steps
from ragkv.compression.entropy import LAYOUTS, decode_stream, encode_stream


def test_int8_element_bound_k_per_channel_v_per_token():
    kv = make_kv(shape=(2, 2, 40, 2, 8))
    out = Int8Codec().decode(Int8Codec().encode(kv)).kv
    x = kv.kv.flatten(3)  # [2, L, T, C]
    err = (out.flatten(3) - x).abs()
    scale_k = x[0].abs().amax(dim=1, keepdim=True) / 127  # [L, 1, C]: per layer and channel
    scale_v = x[1].abs().amax(dim=2, keepdim=True) / 127  # [L, T, 1]: per layer and token
    assert (err[0] <= scale_k / 2 * (1 + 1e-5)).all()
    assert (err[1] <= scale_v / 2 * (1 + 1e-5)).all()
    outlier = kv.kv.clone()
    outlier[1, 0, 7] *= 100  # one loud token must not blur the V of the others (per-token scales)
    v_out = Int8Codec().decode(Int8Codec().encode(ChunkKV(outlier, 0))).kv[1, 0]
    assert torch.allclose(v_out[:7], out[1, 0, :7])


def test_fp8_element_bound():
    kv = make_kv(shape=(2, 2, 40, 2, 8))
    out = Fp8Codec().decode(Fp8Codec().encode(kv)).kv
    x = kv.kv.flatten(3)
    scale_k = x[0].abs().amax(dim=1, keepdim=True) / 448
    bound = x[0].abs() / 16 + scale_k * 2**-10
    assert ((out.flatten(3)[0] - x[0]).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("tokens", [57, 51, 50, 1])  # partial last anchor group of 7, 1, none; one token
def test_cachegen_element_error_within_half_step(tokens):
    kv = make_kv(shape=(2, 4, tokens, 2, 8))
    codec = CacheGenCodec()
    out = codec.decode(codec.encode(kv)).kv
    for layer in range(4):
        x = kv.kv[:, layer].flatten(2).double()  # [2, T, C]
        cfg = codec.config
        step = quant_steps(x, cfg.bins(layer, 4), cfg.key_step_exponent, cfg.value_step_exponent).float()  # [2, C]
        err = (out[:, layer].flatten(2) - x.float()).abs()
        assert (err <= step[:, None, :] / 2 * (1 + 1e-4)).all(), f"layer {layer} beyond half a step"


def test_cachegen_key_steps_are_one_per_layer_unless_capped():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 200, 16, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64)
    std = x.std(dim=1, unbiased=False)  # [2, C]
    per_channel = quant_steps(x, (8, 4), key_step_exponent=1.0).double()  # [2, C]: 6 std / bins
    uniform = quant_steps(x, (8, 4), key_step_exponent=0.0).double()
    assert torch.equal(uniform[1], per_channel[1])  # V keeps its per-channel steps
    common = uniform[0].max()
    torch.testing.assert_close(uniform[0], torch.minimum(common, 3 * std[0]), rtol=1e-3, atol=0)  # one step, capped
    capped = uniform[0] < common * 0.999
    assert 0 < int(capped.sum()) < 16  # quiet channels are capped at 3 std (2 bins), the rest share one step
    geo = lambda s: float(s.log().mean().exp())  # noqa: E731
    both = quant_steps(x, (8, 4), key_step_exponent=0.0, value_step_exponent=0.0).double()
    assert torch.equal(both[0], uniform[0])
    torch.testing.assert_close(both[1], torch.minimum(both[1].max(), 3 * std[1]), rtol=1e-3, atol=0)  # V: the same rule
    narrow = x[:, :, 6:10]  # a 2x spread: nothing is capped, and the geometric mean (about the bits) is kept
    assert (
        abs(geo(quant_steps(narrow, (8, 4), 0.0)[0].double()) / geo(quant_steps(narrow, (8, 4), 1.0)[0].double()) - 1)
        < 2e-3
    )


def test_cachegen_layerwise_bins_spend_more_bits_early():
    cfg = CacheGenConfig(key_bins=(16, 4), value_bins=(16, 4))
    assert [cfg.bins(i, 4) for i in range(4)] == [(16, 16), (16, 16), (4, 4), (4, 4)]
    x = make_kv(shape=(2, 1, 200, 2, 8)).kv
    kv = ChunkKV(x.expand(2, 4, 200, 2, 8).contiguous(), 0)  # the same data in every layer
    codec = CacheGenCodec(cfg)
    enc = codec.encode(kv)
    sizes = np.diff(enc.meta["offsets"])
    assert sizes[0] > 1.5 * sizes[3]
    out = codec.decode(enc).kv
    assert (out[:, 0] - x[:, 0]).norm() < 0.5 * (out[:, 3] - x[:, 0]).norm()


def test_cachegen_key_and_value_bins_are_separate():
    x = make_kv(shape=(2, 1, 200, 2, 8)).kv
    x[1] = x[0]  # the same data as K and as V
    kv = ChunkKV(x, 0)
    codec = CacheGenCodec(CacheGenConfig(key_bins=(32,), value_bins=(4,)))
    out = codec.decode(codec.encode(kv)).kv
    assert (out[0] - x[0]).norm() < 0.25 * (out[1] - x[1]).norm()


def test_cachegen_anchor_deltas_pay_off_on_smooth_tokens():
    t = torch.linspace(0, 1, 300).view(1, 1, 300, 1, 1)
    base = torch.randn(2, 2, 1, 2, 8) * 5
    x = base + 3 * torch.sin(6 * t + torch.randn(2, 2, 1, 2, 8)) + 0.05 * torch.randn(2, 2, 300, 2, 8)  # slow drift
    kv = ChunkKV(x, 0)
    with_delta = CacheGenCodec(CacheGenConfig(group_size=10, key_bins=(64,), value_bins=(64,))).encode(kv).nbytes
    without = CacheGenCodec(CacheGenConfig(group_size=1, key_bins=(64,), value_bins=(64,))).encode(kv).nbytes
    assert with_delta < 0.85 * without


def test_cachegen_entries_decode_with_their_own_params():
    kv = make_kv()
    enc = CacheGenCodec(CacheGenConfig(group_size=4, key_bins=(20,), value_bins=(20,), channel_group=5)).encode(kv)
    out = CacheGenCodec().decode(enc)  # a default-config codec reads an entry written with other knobs
    assert (out.kv - kv.kv).norm() / kv.kv.norm() < CacheGenCodec(
        CacheGenConfig(key_bins=(20,), value_bins=(20,))
    ).rel_error


def test_cachegen_config_rejects_nonsense():
    with pytest.raises(ValueError, match="key_bins"):
        CacheGenConfig(key_bins=())
    with pytest.raises(ValueError, match="value_bins"):
        CacheGenConfig(value_bins=(4, 0))
    with pytest.raises(ValueError, match="group_size"):
        CacheGenConfig(group_size=0)


@pytest.mark.parametrize("n", [1, 2, 5, 1001])
def test_entropy_stream_round_trip_with_escapes(n):
    rng = np.random.default_rng(n)
    sym = rng.laplace(0, 1.2, n).round().astype(np.int64)
    sym[:: max(1, n // 7)] = rng.integers(-(10**6), 10**6, len(sym[:: max(1, n // 7)]))  # far outliers
    buf = encode_stream(sym)
    got, end = decode_stream(buf + b"tail", 0, n)
    assert end == len(buf) and np.array_equal(got, sym)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_entropy_stream_round_trip_in_every_layout(layout):
    k, log2a = layout
    rng = np.random.default_rng(k)
    half = 1 << (log2a - 1)
    sym = rng.integers(-half + 1, half + 1, 1003)  # the whole window, both ends included
    sym[::97] = 10**5  # and escapes
    buf = encode_stream(sym, (layout,))
    got, end = decode_stream(buf, 0, sym.size, (layout,))
    assert end == len(buf) and np.array_equal(got, sym)


def test_entropy_stream_with_a_wrong_escape_count_fails_clearly():
    sym = np.array([0, 1, -1, 10**6, 0, 2, -(10**6), 0], dtype=np.int64)  # two values outside every window
    buf = bytearray(encode_stream(sym))
    header = np.frombuffer(buf, dtype=np.int32, count=6).copy()
    assert header[5] == 2
    header[5] = 1  # claim one escape where the stream has two ESC codes
    buf[:24] = header.tobytes()
    with pytest.raises(ValueError, match="ESC codes"):
        decode_stream(bytes(buf), 0, len(sym))


def test_entropy_stream_within_a_few_percent_of_the_empirical_entropy():
    sym = np.random.default_rng(0).laplace(0, 0.7, 20000).round().astype(np.int64)
    _, counts = np.unique(sym, return_counts=True)
    entropy = float(-(counts / sym.size * np.log2(counts / sym.size)).sum())  # bits per symbol
    assert len(encode_stream(sym)) * 8 / sym.size < 1.04 * entropy + 0.02


@pytest.mark.slow
def test_cachegen_at_most_two_bits_on_smollm2(smollm2):
    """A musique-sized chunk (~600 tokens; per-layer headers weigh more on short chunks)."""
    from ragkv.chunk_cache import precompute

    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
        "nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, and to crown "
        "the centennial anniversary of the French Revolution. Although initially criticised by some of France's "
        "leading artists and intellectuals for its design, it has since become a global cultural icon. "
    ) * 5
    kv = precompute(smollm2, smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]).to(dtype=torch.float16)
    codec = CacheGenCodec()
    enc = codec.encode(kv)
    bits = enc.nbytes * 8 / kv.kv.numel()
    err = float((codec.decode(enc).kv.float() - kv.kv.float()).norm() / kv.kv.float().norm())
    assert bits <= 2.0, f"{bits:.3f} bits/value"
    assert err <= codec.rel_error
