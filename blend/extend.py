"""Run new tokens after fused prompts, in the blends' own K/V buffers (no cache copies per token).

`extend(model, result, ids, start)` computes tokens at rows `start ..`, writes their K/V into the
reserved rows and returns their logits; decoding calls it once per token, teacher forcing once.
`extend_many` does the same for several fused prompts in one pass per layer: their new tokens packed
for the projections, the MLP and the LM head, each attending over its own buffers (batched decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import ModelAdapter
from ..models.attention import query_mask
from .loop import BlendResult


@torch.inference_mode()
def extend(model: ModelAdapter, result: BlendResult, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [P, vocab] of `ids` [P] placed at rows start..start+P-1 after the prompt's rows."""
    return extend_many(model, [result], [ids], [start])[0]


@torch.inference_mode()
def extend_many(
    model: ModelAdapter, results: Sequence[BlendResult], ids: Sequence[torch.Tensor], starts: Sequence[int]
) -> list[torch.Tensor]:
    """For each fused prompt `results[i]`, the logits [P_i, vocab] of `ids[i]` [P_i] placed at its rows
    starts[i]..starts[i]+P_i-1, computed together; each equals `extend` of that prompt alone up to the
    rounding of the packed matrix products."""
    dev = model.device
    sizes = [int(x.shape[0]) for x in ids]
    for result, start, p in zip(results, starts, sizes):
        capacity = result.buffers[0][0].shape[2]
        if start + p > capacity:
            raise ValueError(f"rows {start}..{start + p - 1} exceed the {capacity} rows reserved by blend(reserve=...)")
    positions = [torch.arange(start, start + p, device=dev) for start, p in zip(starts, sizes)]  # [P_i] each
    kind = "dense" if dev.type == "cuda" else "blocks"
    masks = [query_mask(pos, start + p, dev, kind) for pos, start, p in zip(positions, starts, sizes)]  # once
    cos, sin = model.rope(torch.cat(positions))  # [sum P, D]
    h = model.embed(torch.cat([x.to(dev) for x in ids]))  # [sum P, hidden]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    for layer in range(model.num_layers):
        q, k, v = model.qkv(layer, h, cos, sin)  # packed rows
        outs = []
        for i, (result, start, p, mask) in enumerate(zip(results, starts, sizes, masks)):
            a, b = bounds[i], bounds[i + 1]
            k_all, v_all = result.buffers[layer]
            k_all[0, :, start : start + p] = k[a:b].transpose(0, 1)
            v_all[0, :, start : start + p] = v[a:b].transpose(0, 1)
            end = start + p
            outs.append(model.attention(q[a:b], k_all[:, :, :end], v_all[:, :, :end], mask))
        h = model.after_attention(layer, h, outs[0] if len(outs) == 1 else torch.cat(outs))
    logits = model.logits(h)  # [sum P, vocab]
    return [logits[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
