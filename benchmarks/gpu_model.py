"""The GPU benchmarks' models: random-init LlamaForCausalLM of real shapes (Llama-3.1-8B, a tiny one for dry
runs), built directly on the device in the benchmark's dtype, no weights read (bench_gpu.py, bench_handoff.py)."""

from __future__ import annotations

import torch

from ragkv.models import adapter_for

SHAPES = {
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def require_device(name: str) -> torch.device:
    """`name` as a torch.device; exits with one line saying what to do when it is CUDA and none is here."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run on a GPU machine, or pass --dry-run (CPU, tiny shapes)")
    return device


def build_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None):
    """A random-init LlamaForCausalLM of `shape`, built directly on `device` in `dtype` (no weights read)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    return adapter_for(
        model.to(device, dtype).eval(), sink_ids=(1,)
    )  # .to: a no-op unless the default dtype was ignored
