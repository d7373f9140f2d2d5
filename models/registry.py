"""Model loading: a local path, an HF id (offline only) or the alias `smollm2`, wrapped in the adapter
registered for its `config.model_type`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import smollm2
from .base import ModelAdapter
from .llama import LlamaAdapter, Qwen3Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: cls for cls in (LlamaAdapter, Qwen3Adapter) for model_type in cls.model_types
}


def adapter_for(model, tokenizer=None, sink_ids: tuple[int, ...] | None = None) -> ModelAdapter:
    """Wrap a loaded transformers model; unsupported families fail naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    return cls(model, tokenizer, sink_ids)


def load_adapter(
    name_or_path: str,
    data_dir: str | os.PathLike = "~/.cache/ragkv",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ModelAdapter:
    """Load a model by alias (`smollm2`), local path or HF id (from the local HF cache only)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name_or_path == smollm2.ALIAS:
        path: str | Path = smollm2.ensure_converted(Path(data_dir).expanduser())
    else:
        path = name_or_path
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in ADAPTERS:  # fail before loading any weights
        raise ValueError(
            f"model type {config.model_type!r} is not supported; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    from .rope import check_rope

    check_rope(config.get_text_config() if hasattr(config, "get_text_config") else config)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    return adapter_for(model, tokenizer)
