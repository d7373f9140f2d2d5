"""A short pass over the first layers of a fused prompt, run before the blend to learn where attention goes.

`scout` computes the `active` rows (at least every fresh row) over the cached rows of the first
layers, exactly as the blend loop would with that active set, and hands each observed layer's fresh
queries and full keys to a callback. With only the fresh rows active (the question, template and
separators: ~1-2% of a RAG prompt) it costs a few hundredths of a naive blend; with every row active
it is the first layers of a full prefill (the "context pass" behind chunk metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from .plan import BlendPlan
from .recover import recovering
from .rerotate import rerotate, rotation

# observe(layer, rows [S] sorted prompt rows, q [S, H_q, D], keys [H_kv, N, D]) at each observed layer
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.inference_mode()
def scout(
    model: ModelAdapter,
    plan: BlendPlan,
    sources: Sequence[tuple[int, LayeredKV]],
    active: torch.Tensor,
    layers: Sequence[int],
    observe: Observer,
) -> None:
    """Run layers 0..max(`layers`) for the `active` [N] bool rows over the cached `sources` (target
    start row, KV); call `observe` at each of `layers` before that layer's attention."""
    n, dev, dtype = plan.num_tokens, model.device, model.dtype
    sources = recovering(model, plan, sources)  # a stored layer found damaged here: that chunk is recomputed
    if not layers or min(layers) < 0 or max(layers) >= model.num_layers:
        raise ValueError(f"scout layers must lie within 0..{model.num_layers - 1}, got {tuple(layers)}")
    cached = torch.zeros(n, dtype=torch.bool)
    for start, kv in sources:
        cached[start : start + kv.num_tokens] = True
    if bool((~cached & ~active).any()):
        raise ValueError("every row not loaded from cache must be active in the scout pass")
    rows = active.nonzero().flatten().to(dev)  # [S]
    positions = plan.positions.to(dev)
    cos, sin = model.rope(positions[rows])  # [S, D]
    rot = [rotation(torch.full((kv.num_tokens,), start - kv.pos0), model.inv_freq) for start, kv in sources]
    h = model.embed(plan.input_ids.to(dev)[rows])  # [S, hidden]
    last = max(layers)
    k_buf = torch.empty(1, model.num_kv_heads, n, model.head_dim, dtype=dtype, device=dev)  # [1, H, N, D]
    v_buf = torch.empty_like(k_buf)  # both reused layer after layer
    rot = [(c.to(dev), s.to(dev)) for c, s in rot]
    for layer in range(last + 1):
        for (start, kv), (c, s) in zip(sources, rot):
            part = kv.layer(layer).to(device=dev, dtype=dtype)  # [2, T, H, D]
            k_buf[0, :, start : start + kv.num_tokens] = rerotate(part[0], c, s).transpose(0, 1)
            v_buf[0, :, start : start + kv.num_tokens] = part[1].transpose(0, 1)
        q, k, v = model.qkv(layer, h, cos, sin)  # [S, H_q, D], [S, H_kv, D] x2
        k_buf[0][:, rows] = k.transpose(0, 1)
        v_buf[0][:, rows] = v.transpose(0, 1)
        if layer in layers:
            observe(layer, rows, q, k_buf[0])
        if layer < last:
            h = model.attend(layer, h, q, k_buf, v_buf, None if rows.numel() == n else positions[rows])


def attention_rows(q: torch.Tensor, keys: torch.Tensor, query_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention [H_q, Q, N] of queries q [Q, H_q, D] at sorted prompt rows `query_rows`
    [Q] over keys [H_kv, N, D] (key j at row j), in fp32."""
    group = q.shape[1] // keys.shape[0]
    kk = keys.float().repeat_interleave(group, dim=0)  # [H_q, N, D]
    scores = q.float().transpose(0, 1) @ kk.transpose(1, 2) * scale  # [H_q, Q, N]
    key_rows = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill(key_rows[None, None, :] > query_rows[None, :, None], float("-inf"))
    return scores.softmax(dim=-1)
