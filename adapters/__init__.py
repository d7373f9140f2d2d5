"""Everything bound to an outside system: model families (Llama, Mistral, Qwen2, Qwen3, SmolLM2) and,
later, framework plugins. Model adapters expose a decoder layer by layer for the blend."""

from .base import ModelAdapter
from .llama import LlamaAdapter, Qwen3Adapter
from .registry import ADAPTERS, adapter_for, load_adapter
from .rope import SUPPORTED_ROPE_TYPES

__all__ = ["ModelAdapter", "LlamaAdapter", "Qwen3Adapter", "ADAPTERS", "adapter_for", "load_adapter",
           "SUPPORTED_ROPE_TYPES"]
