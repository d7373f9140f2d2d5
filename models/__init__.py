"""Model families seen layer by layer (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is Llama), so the blend
can compute chosen tokens only; RoPE checks; the bundled SmolLM2 conversion; `load_adapter`."""

from .base import ModelAdapter
from .device import synchronize
from .llama import LlamaAdapter, Qwen3Adapter
from .registry import ADAPTERS, adapter_for, load_adapter
from .rope import SUPPORTED_ROPE_TYPES

__all__ = [
    "ModelAdapter",
    "LlamaAdapter",
    "Qwen3Adapter",
    "ADAPTERS",
    "adapter_for",
    "load_adapter",
    "SUPPORTED_ROPE_TYPES",
    "synchronize",
]
