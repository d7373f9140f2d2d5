"""Decoding on the device from the encoded bytes (`Codec.device_layer`): the torch path on any device and
the Triton kernel (under TRITON_INTERPRET=1 on CPU, skipped without triton) give the same bits as the
host decoder, on random and model-produced KV, at the dtypes the blend reads."""

from __future__ import annotations

import os

import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKV
from ragkv.compression import CodecError, EncodedKV, get_codec
from ragkv.compression.packed import PackedCodec, PackedConfig, PackedLayout

if not torch.cuda.is_available():  # before the kernel module is first imported: run Triton on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE_CODECS = ("packed", "int8", "fp8", "cachegen", "identity", "lz4+packed")
MIXED = PackedConfig(key_bits=(4, 3, 2), value_bits=(2, 1, 3), key_group=(16, 1), value_group=(1, 8), format=1)
FRACTIONAL = PackedConfig(key_bits=(4.5, 3, 0.25), value_bits=(2, 1.5, 8))  # format 2: mean widths per band
CONFIGS = {
    "default": PackedConfig(),
    "mixed-format1": MIXED,
    "format1": PackedConfig(format=1),
    "fractional": FRACTIONAL,
}


def _layers(codec, enc, dtype):
    for layer in range(enc.meta["shape"][1]):
        task = codec.layer_task(enc, layer, dtype)
        yield layer, task, task.section_tensor()


@pytest.mark.parametrize("name", DEVICE_CODECS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_device_layer_equals_host_decode(name, dtype):
    codec = get_codec(name)
    enc = codec.encode(make_kv(shape=(2, 3, 29, 2, 8), dtype=torch.float16))
    for layer, task, section in _layers(codec, enc, dtype):
        host = codec.decode_layer(enc, layer, dtype=dtype)
        out = codec.device_layer(task, section)
        assert out.dtype == dtype and torch.equal(out, host), f"{name} layer {layer}"
        into = torch.empty_like(host)
        assert codec.device_layer(task, section, out=into) is into and torch.equal(into, host)


def test_device_layer_refuses_wrong_bytes():
    codec = get_codec("packed")
    enc = codec.encode(make_kv())
    task = codec.layer_task(enc, 0)
    with pytest.raises(ValueError, match="needs"):
        codec.device_layer(task, task.section_tensor()[:-4])
    with pytest.raises(ValueError, match="uint8"):
        codec.device_layer(task, task.section_tensor().view(torch.int32))
    with pytest.raises(ValueError, match="int8 section"):
        int8 = get_codec("int8")
        int8.device_layer(int8.layer_task(int8.encode(make_kv()), 0), task.section_tensor())


def test_corrupt_entry_fails_before_any_bytes_move():
    codec = get_codec("packed")
    enc = codec.encode(make_kv())
    flipped = bytearray(enc.payload)
    flipped[5] ^= 0x40
    with pytest.raises(CodecError, match="CRC32"):
        codec.layer_task(EncodedKV(enc.codec, bytes(flipped), enc.meta), 0)  # the loader's first step


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 29, 2, 8), (2, 1, 96, 3, 64), (2, 1, 1, 1, 3)],  # odd, SmolLM2's heads, one value per plane byte
    ids=str,
)
def test_triton_kernel_equals_torch_decoder(config, shape):
    pytest.importorskip("triton")
    from ragkv.compression.packed_triton import decode_packed_triton

    codec = PackedCodec(config)
    enc = codec.encode(make_kv(shape=shape, dtype=torch.float16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16):
        for layer, task, section in _layers(codec, enc, dtype):
            t, h, d = task.shape
            layout = PackedLayout.of(config, t, h * d, layer, shape[1])
            out = torch.empty((2, t, h, d), dtype=dtype, device=device)
            decode_packed_triton(section.to(device), layout, out)
            assert torch.equal(out.cpu(), codec.decode_layer(enc, layer, dtype=dtype)), f"layer {layer} {dtype}"


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_one_launch_for_many_entries_equals_the_torch_decoder(config):
    """`decode_packed_rows_triton`: entries of different token counts, one launch, each decoded into its
    rows of one [2, N, H, D] output, bit-identical to decoding them one by one."""
    pytest.importorskip("triton")
    import numpy as np

    from ragkv.compression.packed_triton import decode_packed_rows_triton

    codec = PackedCodec(config)
    encs = [codec.encode(make_kv(shape=(2, 3, t, 2, 8), dtype=torch.float16, seed=t)) for t in (29, 7, 64)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16):
        for layer in range(3):
            tasks = [codec.layer_task(enc, layer, dtype) for enc in encs]
            offsets = [0, 2048, 4096]
            rows = [0, 29, 36]
            src = torch.zeros(8192, dtype=torch.uint8)
            for task, at in zip(tasks, offsets):
                src[at : at + len(task.section)] = torch.from_numpy(np.frombuffer(task.section, np.uint8).copy())
            meta = torch.from_numpy(codec.rows_meta(tasks, offsets, rows)).to(device)
            out = torch.full((2, 100, 2, 8), 7.0, dtype=dtype, device=device)
            decode_packed_rows_triton(src.to(device), meta, codec._layouts(tasks), out)
            want = torch.cat([codec.decode_layer(enc, layer, dtype=dtype) for enc in encs], dim=1)
            assert torch.equal(out[:, :100].cpu(), want), f"layer {layer} {dtype}"
            codec.device_rows(tasks, src.to(device), offsets, out, rows, meta)  # the public entry point
            assert torch.equal(out.cpu(), want)


def test_triton_kernel_on_model_kv():
    pytest.importorskip("triton")
    from tiny_models import tiny_model

    from ragkv.chunk_cache import precompute
    from ragkv.compression.packed_triton import decode_packed_triton
    from ragkv.models import adapter_for

    kv = precompute(adapter_for(tiny_model("qwen3"), sink_ids=(1,)), list(range(3, 80)))  # q/k-normed keys
    kv = ChunkKV(kv.kv.half(), kv.pos0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need device tensors
    for config in (MIXED, FRACTIONAL):
        codec = PackedCodec(config)
        enc = codec.encode(kv)
        for layer, task, section in _layers(codec, enc, torch.float16):
            t, h, d = task.shape
            out = torch.empty((2, t, h, d), dtype=torch.float16, device=device)
            decode_packed_triton(section.to(device), PackedLayout.of(config, t, h * d, layer, kv.num_layers), out)
            assert torch.equal(out.cpu(), codec.decode_layer(enc, layer)), f"layer {layer} format {config.format}"


@pytest.mark.parametrize("name", ("packed", "int8", "cachegen"))
def test_bench_device_rows_check_parity(name):
    from bench_codecs import device_decode_stats

    kvs = [make_kv(shape=(2, 2, 30, 2, 8), dtype=torch.float16, seed=s) for s in range(2)]
    stats = device_decode_stats(get_codec(name), kvs, "cpu", repeat=1)  # the --device path, on the CPU here
    assert stats["device_parity"] == 1.0
    assert set(stats) == {"device_decode_gb_s", "device_h2d_decode_gb_s", "device_parity"}
