"""Fingerprints of a model and a tokenizer: what chunk keys and document catalogs are bound to.

They must change when the KV of a token sequence changes, and only then: a model fingerprint hashes
an explicit list of architecture facts, the RoPE frequencies as computed, a fixed sample of every
weight tensor the adapter uses (in fp32 little-endian bytes), the compute dtype, the sink ids and
the precompute recipe. Paths, `_name_or_path`, `transformers_version` and any library version stay
out, so a moved data directory, another copy of the same weights or a library upgrade keep every
key. A tokenizer fingerprint hashes its vocabulary, merges and the normalizer/pre-tokenizer specs.
"""

from __future__ import annotations

import hashlib
import json

import torch

RECIPE = "ragkv-precompute-v2"  # v2: stable fingerprints; keys of v1 entries (config.to_dict) miss once
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
)
SAMPLES_PER_TENSOR = 256  # evenly strided elements hashed from each weight tensor


def architecture(config) -> dict:
    """The explicit architecture facts of a transformers config (missing fields read as None)."""
    facts = {name: getattr(config, name, None) for name in ARCHITECTURE_FIELDS}
    if facts["head_dim"] is None:
        facts["head_dim"] = config.hidden_size // config.num_attention_heads
    return facts


def weight_sample(weight: torch.Tensor, count: int = SAMPLES_PER_TENSOR) -> bytes:
    """`count` evenly strided elements of `weight` (first to last), as fp32 little-endian bytes."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // count)
    picked = flat[::step][:count].float().cpu().numpy()
    return picked.astype("<f4").tobytes()


def model_fingerprint(adapter) -> str:
    """32 hex chars over architecture, RoPE, sampled weights, compute dtype, sink ids and recipe."""
    h = hashlib.sha256(RECIPE.encode())
    h.update(json.dumps(architecture(adapter.config), sort_keys=True, default=repr).encode())
    rotary = adapter.model.model.rotary_emb
    h.update(adapter.inv_freq.float().cpu().numpy().astype("<f4").tobytes())  # RoPE as computed (theta, scaling)
    h.update(repr(float(getattr(rotary, "attention_scaling", 1.0))).encode())
    h.update(str(adapter.dtype).encode())
    h.update(json.dumps(list(adapter.sink_ids)).encode())
    decoder = adapter.model.model
    tensors = [("embed_tokens", decoder.embed_tokens.weight), ("norm", decoder.norm.weight)]
    for i, block in enumerate(adapter.layers):
        tensors.extend((f"layers.{i}.{name}", p) for name, p in sorted(block.named_parameters()))
    lm_head = adapter.model.lm_head.weight
    if lm_head.data_ptr() != decoder.embed_tokens.weight.data_ptr():
        tensors.append(("lm_head", lm_head))
    for name, weight in tensors:
        h.update(f"{name}:{list(weight.shape)}".encode())
        h.update(weight_sample(weight))
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """32 hex chars over what maps text to ids: vocabulary, merges, added tokens, normalizer and
    pre-tokenizer (the serialized format's own version and the decoder are left out)."""
    if tokenizer is None:
        return "no-tokenizer"
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        merges = spec.get("model", {}).get("merges") or []
        h.update(json.dumps([m if isinstance(m, str) else " ".join(m) for m in merges]).encode())
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or [])
        h.update(json.dumps(added).encode())
        for part in ("normalizer", "pre_tokenizer"):
            h.update(json.dumps(spec.get(part), sort_keys=True).encode())
    return h.hexdigest()[:32]
