"""Model adapters: layer-by-layer compute equals transformers' own forward; unsupported models fail clearly."""

import pytest
import torch
from tiny_models import returned_cache, tiny_model

from ragkv.models import adapter_for


def test_forward_kv_equals_transformers(tiny_adapter):
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (37,))
    with torch.inference_mode():
        ref = returned_cache(tiny_adapter.model(ids[None], use_cache=True))
        kv = tiny_adapter.forward_kv(ids, torch.arange(37))  # [2, L, T, H, D]
    for layer in range(tiny_adapter.num_layers):
        torch.testing.assert_close(kv[0, layer], ref.layers[layer].keys[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kv[1, layer], ref.layers[layer].values[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_unsupported_model_type_names_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supported model types: llama, mistral, qwen2, qwen3"):
        adapter_for(model)


def test_dynamic_rope_is_refused():
    model = tiny_model("llama")
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="cannot be re-rotated exactly.*default, linear, llama3"):
        adapter_for(model)


def test_fingerprint_ignores_where_the_weights_are_loaded_from():
    """Sidecars on other machines (or data dirs) must compute the same chunk keys for the same model."""
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    a, b = tiny_model("llama"), tiny_model("llama")
    a.config._name_or_path, b.config._name_or_path = "/data-s0/models/m", "/elsewhere/m"
    assert adapter_for(a, sink_ids=(1,)).fingerprint == adapter_for(b, sink_ids=(1,)).fingerprint
