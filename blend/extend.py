"""Run new tokens after a fused prompt, in the blend's own K/V buffers (no cache copies per token).

`extend(model, result, ids, start)` computes tokens at rows `start ..`, writes their K/V into the
reserved rows and returns their logits; decoding calls it once per token, teacher forcing once.
"""

from __future__ import annotations

import torch

from ..models import ModelAdapter
from .loop import BlendResult


@torch.inference_mode()
def extend(model: ModelAdapter, result: BlendResult, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [P, vocab] of `ids` [P] placed at rows start..start+P-1 after the prompt's rows."""
    p = ids.shape[0]
    capacity = result.buffers[0][0].shape[2]
    if start + p > capacity:
        raise ValueError(f"rows {start}..{start + p - 1} exceed the {capacity} rows reserved by blend(reserve=...)")
    positions = torch.arange(start, start + p, device=model.device)  # [P]
    cos, sin = model.rope(positions)  # [P, D]
    h = model.embed(ids)  # [P, hidden]
    for layer, (k_all, v_all) in enumerate(result.buffers):
        q, k, v = model.qkv(layer, h, cos, sin)
        k_all[0, :, start : start + p] = k.transpose(0, 1)
        v_all[0, :, start : start + p] = v.transpose(0, 1)
        end = start + p
        h = model.attend(layer, h, q, k_all[:, :, :end], v_all[:, :, :end], query_positions=positions)
    return model.logits(h)  # [P, vocab]
