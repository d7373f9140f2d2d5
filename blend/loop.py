"""The one blend loop: fuse cached chunk KV into a prompt, layer by layer.

Per layer: load the cached rows (lazily, from `LayerLoader`), re-rotate their keys to the target
positions, compute q/k/v for the active tokens, narrow the active set at check layers (CacheBlend),
write the fresh K/V over the cached rows, and let the active tokens attend over all keys with a
causal mask by position. The last prompt token is always active, so its logits come out at the end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from .loader import LayerLoader
from .plan import BlendPlan
from .rerotate import rerotate, rotation
from .select import kv_deviation, query_attention
from .strategies import Strategy


@dataclass
class BlendResult:
    """Merged KV of the whole prompt, the first-token logits, and where the time went."""

    keys: list[torch.Tensor]  # per layer [1, H_kv, N, D] (views of `buffers`)
    values: list[torch.Tensor]  # per layer [1, H_kv, N, D]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [1, H_kv, N + reserve, D]: room to decode
    logits: torch.Tensor  # [vocab] fp32, for the token after the prompt
    recompute_fraction: float  # chunk rows recomputed / chunk rows, averaged over layers
    seconds: dict[str, float] = field(default_factory=dict)  # load, rerotate, recompute, first_token


@torch.inference_mode()
def blend(
    model: ModelAdapter,
    plan: BlendPlan,
    strategy: Strategy,
    sources: Sequence[tuple[int, LayeredKV]] = (),
    reserve: int = 0,
) -> BlendResult:
    """Fuse `sources` (target start row, cached KV) into `plan` with `strategy`; the K/V buffers keep
    `reserve` spare rows so that tokens can be generated after the prompt without copying (`extend`)."""
    n, dev, dtype = plan.num_tokens, model.device, model.dtype
    if model.max_context is not None and n > model.max_context:
        raise ValueError(f"prompt of {n} tokens exceeds the model's exact attention span of {model.max_context}")
    t_start = time.perf_counter()
    seconds = {"load": 0.0, "rerotate": 0.0, "recompute": 0.0, "first_token": 0.0}

    # 1. Which rows come from cache, and the rotation that moves each cached key to its target row.
    cached = torch.zeros(n, dtype=torch.bool)  # [N]
    deltas = []
    for start, kv in sources:
        assert 0 <= start and start + kv.num_tokens <= n, "cached source must lie inside the plan"
        cached[start : start + kv.num_tokens] = True
        deltas.append(torch.full((kv.num_tokens,), start - kv.pos0))  # [T]
    spans = [(start, kv.num_tokens) for start, kv in sources]  # target rows of each source, in loader order
    num_cached = sum(count for _, count in spans)
    assert int(cached.sum()) == num_cached, "cached sources must not overlap"
    if num_cached:
        rot_cos, rot_sin = rotation(torch.cat(deltas), model.inv_freq)  # [Nc, D] each
        rot_cos, rot_sin = rot_cos.to(dev), rot_sin.to(dev)
    loader = iter(LayerLoader([kv for _, kv in sources], model.num_layers, dev, dtype)) if num_cached else None

    # 2. The active set: tokens whose hidden states flow through the layers.
    strategy.prepare(model, plan, sources)  # h7 hook: query-aware / cachecraft choose their tokens before layer 0
    active = strategy.initial_tokens(plan, cached).nonzero().flatten().to(dev)  # [S] sorted rows
    assert active.numel() > 0 and int(active[-1]) == n - 1, "the last prompt token must always be computed"
    cached_dev = cached.to(dev)
    positions = plan.positions.to(dev)  # [N]
    cos, sin = model.rope(positions)  # [N, D]
    h = model.embed(plan.input_ids.to(dev)[active])  # [S, hidden]
    check_layers = strategy.check_layers()
    keys, values, buffers, recomputed = [], [], [], 0

    for layer in range(model.num_layers):
        k_all = torch.empty(
            1, model.num_kv_heads, n + reserve, model.head_dim, dtype=dtype, device=dev
        )  # [1, H, N+R, D]
        v_all = torch.empty_like(k_all)
        buffers.append((k_all, v_all))
        k_buf, v_buf = k_all[:, :, :n], v_all[:, :, :n]  # [1, H, N, D] views
        # 3. Cached rows of this layer, keys re-rotated to their target positions.
        if loader is not None:
            t0 = time.perf_counter()
            rows = next(loader)  # [2, Nc, H, D]
            t1 = time.perf_counter()
            rotated = rerotate(rows[0], rot_cos, rot_sin)  # [Nc, H, D] fp32
            offset = 0
            for start, count in spans:
                k_buf[0, :, start : start + count] = rotated[offset : offset + count].transpose(0, 1)
                v_buf[0, :, start : start + count] = rows[1, offset : offset + count].transpose(0, 1)
                offset += count
            seconds["rerotate"] += time.perf_counter() - t1
            seconds["load"] += t1 - t0
        t0 = time.perf_counter()
        # 4. Fresh q/k/v of the active tokens.
        q, k, v = model.qkv(layer, h, cos[active], sin[active])  # [S, H_q, D], [S, H_kv, D] x2
        # 5. At a check layer, keep the tokens whose fresh K/V deviate most from the cached rows.
        if layer in check_layers:
            is_cached = cached_dev[active]  # [S]
            deviation = _score(strategy.config, model, plan, active, q, k, v, k_buf, v_buf)
            keep = strategy.narrow(check_layers.index(layer), plan, active.cpu(), is_cached, deviation, num_cached)
            active, h, q, k, v = active[keep], h[keep], q[keep], k[keep], v[keep]
        # 6. Fresh K/V overwrite the cached rows of the active tokens.
        k_buf[0][:, active] = k.transpose(0, 1)
        v_buf[0][:, active] = v.transpose(0, 1)
        recomputed += int(cached_dev[active].sum())
        # 7. Active queries attend over all keys, causally by position.
        query_positions = None if active.numel() == n else positions[active]  # [S]
        h = model.attend(layer, h, q, k_buf, v_buf, query_positions)
        keys.append(k_buf)
        values.append(v_buf)
        seconds["recompute"] += time.perf_counter() - t0

    # 8. Logits of the last prompt token: the first generated token comes from these.
    t0 = time.perf_counter()
    logits = model.logits(h[-1:])[0]  # [vocab]
    _sync(dev)
    seconds["first_token"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    fraction = recomputed / (num_cached * model.num_layers) if num_cached else 1.0
    return BlendResult(keys, values, buffers, logits, fraction, seconds)


def _score(config, model, plan, active, q, k, v, k_buf, v_buf) -> torch.Tensor:
    """Selection score [S] of the active tokens at a check layer (higher = recompute first)."""
    score = torch.ones(active.shape[0], device=q.device)
    if config.score != "attention":
        cached_k, cached_v = k_buf[0][:, active].transpose(0, 1), v_buf[0][:, active].transpose(0, 1)
        score = score * kv_deviation(k, v, cached_k, cached_v, config.deviation)
    if config.score != "deviation":
        query_start = plan.chunk_spans[-1][1] if plan.chunk_spans else 0
        score = score * query_attention(q, k, active, query_start, model.scaling)
    return score


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
