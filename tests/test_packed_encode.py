"""The fused packed encoder (`compression/packed_encode.py`) writes the reference encoder's bytes, on random
and model KV, fp16 and bf16, both formats: format 1 with every group geometry (tiling or not) and mixed bits
per band, format 2 with whole and fractional mean widths."""

from __future__ import annotations

import pytest
import torch
from test_codecs import make_kv

from ragkv.chunk_cache import ChunkKV, precompute_many
from ragkv.compression.packed import PackedCodec, PackedConfig

CONFIGS = {
    "default": PackedConfig(),
    "fractional": PackedConfig(key_bits=(4.5, 3, 0.25), value_bits=(2, 1.75, 8)),
    "format1": PackedConfig(format=1),
    "mixed": PackedConfig(key_bits=(4, 3, 2), value_bits=(2, 1, 3), key_group=(16, 1), value_group=(1, 8), format=1),
    "ragged": PackedConfig(key_bits=(8, 1), value_bits=(5,), key_group=(7, 3), value_group=(0, 5), format=1),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 29, 2, 8), (2, 2, 1, 1, 3), (2, 4, 64, 3, 16)], ids=str)
def test_fused_encoder_writes_the_reference_bytes(name, dtype, shape):
    kv = make_kv(shape=shape, dtype=dtype, seed=sum(shape))
    fused = PackedCodec(CONFIGS[name]).encode(kv)
    reference = PackedCodec(CONFIGS[name], fused=False).encode(kv)
    assert fused.meta == reference.meta
    assert fused.payload == reference.payload


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_fused_encoder_on_model_kv(dtype):
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    model = adapter_for(tiny_model("qwen3"), sink_ids=(1,))
    for kv in precompute_many(model, [list(range(3, 80)), list(range(90, 101))]):
        kv = ChunkKV(kv.kv.to(dtype), kv.pos0)
        for config in CONFIGS.values():
            assert PackedCodec(config).encode(kv).payload == PackedCodec(config, fused=False).encode(kv).payload


def test_fused_encoder_keeps_the_checks():
    with pytest.raises(ValueError, match="fp16"):
        PackedCodec().encode(ChunkKV(torch.full((2, 1, 3, 1, 8), 1e6), 0))
    with pytest.raises(ValueError, match="finite"):
        PackedCodec().encode(ChunkKV(torch.full((2, 1, 3, 1, 8), float("nan")), 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it)")
def test_fused_encoder_on_the_gpu_writes_the_host_reference_bytes():
    for name, config in CONFIGS.items():
        kv = make_kv(shape=(2, 4, 300, 2, 64), dtype=torch.float16, seed=5)
        on_gpu = PackedCodec(config).encode(ChunkKV(kv.kv.cuda(), kv.pos0))
        assert on_gpu.payload == PackedCodec(config, fused=False).encode(kv).payload, name
