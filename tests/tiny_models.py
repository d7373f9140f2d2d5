"""Tiny random-init decoders of every supported family, for fast exact tests on CPU."""

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "llama3")


def tiny_model(family: str, seed: int = 0, vocab_size: int = 256):
    """A random-init decoder of `family` (llama, mistral, qwen2, qwen3, or llama3 = llama with llama3-scaled RoPE)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    elif family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope))
    elif family == "mistral":
        model = MistralForCausalLM(
            MistralConfig(**common, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    else:
        raise ValueError(family)
    model.config._attn_implementation = "eager"  # the reference path: plain transformers math
    return model.float().eval()


def cache_kwarg(model, cache) -> dict:
    """`cache` as the keyword a transformers forward (or `generate`) takes it by: `cache` in transformers
    >= 5.2x, `past_key_values` before (deprecated since, and to be removed)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def returned_cache(out):
    """The KV cache a transformers forward returned (`out.cache`, or `out.past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
