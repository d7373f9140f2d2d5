"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 and SmolLM2 share one layer structure;
Qwen3 adds per-head RMS norms on q and k before RoPE."""

from __future__ import annotations

import torch

from .base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2 (q/k/v biases live inside the projections) and SmolLM2."""

    model_types = ("llama", "mistral", "qwen2")


class Qwen3Adapter(ModelAdapter):
    """Qwen3: q_norm / k_norm over the head dimension."""

    model_types = ("qwen3",)

    def norm_qk(self, attn, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)
