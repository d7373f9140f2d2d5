"""RoPE facts the blend needs from a model: which kind it is and its inverse frequencies.

Only RoPE kinds whose rotation is a fixed per-frequency angle times the position can be re-rotated
exactly (R(p + d) = R(d) R(p)); the others (dynamic NTK, longrope, ...) are refused at load time.
"""

from __future__ import annotations

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(config) -> str:
    """The RoPE kind named by a transformers config (v4 `rope_scaling` or v5 `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def check_rope(config) -> None:
    """Raise if keys of this model cannot be re-rotated exactly."""
    kind = rope_type(config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {kind!r} cannot be re-rotated exactly (its angles depend on the sequence length); "
            f"supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


def inv_freq(model) -> torch.Tensor:
    """The model's (scaled) inverse frequencies, fp32 [head_dim / 2]."""
    return model.model.rotary_emb.inv_freq.detach().to(torch.float32).clone()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (-x2, x1), the half-split rotation transformers' Llama uses."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
