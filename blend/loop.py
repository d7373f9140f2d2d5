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
from ..models import ModelAdapter, synchronize
from ..models.attention import MASK_KINDS, QueryMask, query_mask
from .loader import LayerLoader
from .plan import BlendPlan
from .recover import recovering
from .rerotate import rerotate, rotation
from .select import kv_deviation, query_attention
from .strategies import Strategy


@dataclass
class BlendResult:
    """Merged KV of the whole prompt, the first-token logits, and where the time went."""

    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer K, V [1, H_kv, N + reserve, D]: room to decode
    logits: torch.Tensor  # [vocab] fp32, for the token after the prompt
    recompute_fraction: float  # chunk rows recomputed / chunk rows, averaged over layers
    num_tokens: int  # N: prompt rows filled in every buffer
    seconds: dict[str, float] = field(default_factory=dict)  # load, rerotate, recompute, first_token
    chunk_decisions: list = field(default_factory=list)  # per chunk, the strategy's decision (cachecraft)

    def prompt_kv(self, num_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) views [1, H_kv, n, D] of the first `num_tokens` rows (the prompt's N by default)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return [(k[:, :, :n], v[:, :, :n]) for k, v in self.buffers]


@torch.inference_mode()
def blend(
    model: ModelAdapter,
    plan: BlendPlan,
    strategy: Strategy,
    sources: Sequence[tuple[int, LayeredKV]] = (),
    *,
    reserve: int = 0,
    attention: str = "auto",
) -> BlendResult:
    """Fuse `sources` (target start row, cached KV) into `plan` with `strategy`; the K/V buffers keep
    `reserve` spare rows so that tokens can be generated after the prompt without copying (`extend`).
    `attention` picks how selected queries attend (`models.attention.MASK_KINDS`; auto: SDPA blocks on
    CPU, FlexAttention on CUDA)."""
    n, dev, dtype = plan.num_tokens, model.device, model.dtype
    if model.max_context is not None and n > model.max_context:
        raise ValueError(f"prompt of {n} tokens exceeds the model's exact attention span of {model.max_context}")
    if attention not in MASK_KINDS:
        raise ValueError(f"unknown attention {attention!r}; accepted: {', '.join(MASK_KINDS)}")
    t_start = time.perf_counter()
    sources = recovering(model, plan, sources)  # a stored layer found damaged mid-blend: that chunk is recomputed

    # 1. Which rows come from cache (host bookkeeping), their target rows and the rotation that moves
    #    each cached key to its target row: all computed once per request, on the device.
    cached = torch.zeros(n, dtype=torch.bool)  # [N] host
    target_rows, deltas = [], []
    for start, kv in sources:
        if not (0 <= start and start + kv.num_tokens <= n):
            raise ValueError(
                f"cached source at rows {start}..{start + kv.num_tokens - 1} lies outside the {n}-row plan"
            )
        cached[start : start + kv.num_tokens] = True
        target_rows.append(torch.arange(start, start + kv.num_tokens))  # [T]
        deltas.append(torch.full((kv.num_tokens,), start - kv.pos0))  # [T]
    spans = [(start, kv.num_tokens) for start, kv in sources]  # target rows of each source, in loader order
    num_cached = sum(kv.num_tokens for _, kv in sources)
    if int(cached.sum()) != num_cached:
        raise ValueError("cached sources must not overlap")
    loader = None
    if num_cached:
        rows_dev = torch.cat(target_rows).to(dev)  # [Nc] target row of each loaded row, in loader order
        rot_cos, rot_sin = rotation(torch.cat(deltas), model.inv_freq)  # [Nc, D] each
        rot_cos, rot_sin = rot_cos.to(dev), rot_sin.to(dev)
        loader = iter(LayerLoader([kv for _, kv in sources], model.num_layers, dev, dtype))

    # 2. The active set: tokens whose hidden states flow through the layers (sorted rows). Query-aware
    #    strategies and cachecraft choose their tokens here, before layer 0.
    strategy.prepare(model, plan, sources)
    active_host = strategy.initial_tokens(plan, cached).nonzero().flatten()  # [S] host
    if active_host.numel() == 0 or int(active_host[-1]) != n - 1:
        raise ValueError(f"strategy {strategy.label} must compute the last prompt token")
    active = active_host.to(dev)  # [S]
    cached_dev = cached.to(dev)
    positions = torch.arange(n, device=dev)  # [N]
    cos, sin = model.rope(positions)  # [N, D]
    cos_a, sin_a = cos[active], sin[active]  # [S, D]: gathered once per active set, not per layer
    h = model.embed(plan.input_ids.to(dev)[active])  # [S, hidden]
    check_layers = strategy.check_layers()
    mask = _mask(active_host, n, dev, attention)  # built once per active set, reused in every layer
    recomputing = int(cached[active_host].sum())  # cached rows among the active ones (host count)
    buffers, recomputed = [], 0
    clock = _Clock(dev)

    for layer in range(model.num_layers):
        k_all = torch.empty(
            1, model.num_kv_heads, n + reserve, model.head_dim, dtype=dtype, device=dev
        )  # [1, H, N+R, D]
        v_all = torch.empty_like(k_all)
        buffers.append((k_all, v_all))
        k_buf, v_buf = k_all[0, :, :n], v_all[0, :, :n]  # [H, N, D] views
        # 3. Cached rows of this layer, keys re-rotated to their target positions (one scatter each).
        clock.lap("recompute")  # the buffers' allocation
        if loader is not None:
            rows = next(loader)  # [2, Nc, H, D]
            clock.lap("load")  # on CUDA: how long the compute stream waited for the side stream's copy
            if dev.type == "cuda" and _fused_rerotate(rows[0], k_buf):
                from .rerotate_triton import rerotate_into

                rerotate_into(k_buf, rows[0], rot_cos, rot_sin, rows_dev)  # one kernel
            else:
                rotated = rerotate(rows[0], rot_cos, rot_sin).to(dtype)  # [Nc, H, D]
                _scatter(k_buf, rotated, rows_dev, spans)
            _scatter(v_buf, rows[1], rows_dev, spans)
            clock.lap("rerotate")
        # 4. Fresh q/k/v of the active tokens.
        q, k, v = model.qkv(layer, h, cos_a, sin_a)  # [S, H_q, D], [S, H_kv, D] x2
        # 5. At a check layer, keep the tokens whose fresh K/V deviate most from the cached rows
        #    (the one place the active set, and so the mask, changes: one read-back per check layer).
        if layer in check_layers:
            is_cached = cached_dev[active]  # [S]
            deviation = _score(strategy.config, model, plan, active, q, k, v, k_buf, v_buf)
            keep = strategy.narrow(check_layers.index(layer), plan, active, is_cached, deviation, num_cached)
            kept = keep.nonzero().flatten()  # [S'] (sorted)
            active, h, q, k, v = active[kept], h[kept], q[kept], k[kept], v[kept]
            cos_a, sin_a = cos_a[kept], sin_a[kept]
            active_host = active.cpu()
            recomputing = int(cached[active_host].sum())
            mask = _mask(active_host, n, dev, attention)
        # 6. Fresh K/V overwrite the cached rows of the active tokens.
        k_buf.index_copy_(1, active, k.transpose(0, 1))
        v_buf.index_copy_(1, active, v.transpose(0, 1))
        recomputed += recomputing
        # 7. Active queries attend over all keys, causally by position.
        h = model.attend(layer, h, q, k_buf[None], v_buf[None], mask)
        clock.lap("recompute")

    # 8. Logits of the last prompt token: the first generated token comes from these.
    logits = model.logits(h[-1:])[0]  # [vocab]
    clock.lap("first_token")
    synchronize(dev)
    seconds = clock.seconds()  # load, rerotate, recompute, first_token
    seconds["total"] = time.perf_counter() - t_start
    fraction = recomputed / (num_cached * model.num_layers) if num_cached else 1.0
    return BlendResult(buffers, logits, fraction, n, seconds, strategy.decisions())


class _Clock:
    """Time per part of the loop: the host clock on CPU; on CUDA, events on the compute stream (device
    time, so a load shows only what the copies failed to hide), read once after the final sync."""

    PARTS = ("load", "rerotate", "recompute", "first_token")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self.laps: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.last = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, part: str) -> None:
        """Charge the time since the previous lap to `part`."""
        now = self._now()
        if self.cuda:
            self.laps.append((part, self.last, now))
        else:
            self.totals[part] += now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        for part, start, end in self.laps:  # every event has completed: the caller synchronized
            self.totals[part] += start.elapsed_time(end) / 1e3
        self.laps = []
        return dict(self.totals)


def _scatter(buf: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """Write loaded rows [Nc, H, D] into a layer buffer [H, N, D] at their target rows: one index_copy_
    on CUDA (one kernel), one slice copy per source on CPU (measured 2x faster there than index_copy_)."""
    if buf.is_cuda:
        buf.index_copy_(1, targets, rows.transpose(0, 1))
        return
    offset = 0
    for start, count in spans:
        buf[:, start : start + count] = rows[offset : offset + count].transpose(0, 1)
        offset += count


def _fused_rerotate(keys: torch.Tensor, k_buf: torch.Tensor) -> bool:
    """Whether the Triton re-rotation kernel runs (imported here, on CUDA only: under TRITON_INTERPRET
    the kernel module must be first imported after that variable is set)."""
    from .rerotate_triton import kernel_fits

    return kernel_fits(keys, k_buf)


def _mask(active_host: torch.Tensor, n: int, device: torch.device, kind: str) -> QueryMask | None:
    """None (plain causal) when every row is active, else the query mask of the active rows."""
    return None if active_host.numel() == n else query_mask(active_host, n, device, kind)


def _score(config, model, plan, active, q, k, v, k_buf, v_buf) -> torch.Tensor:
    """Selection score [S] of the active tokens at a check layer (higher = recompute first)."""
    score = torch.ones(active.shape[0], device=q.device)
    if config.score != "attention":
        cached_k, cached_v = k_buf[:, active].transpose(0, 1), v_buf[:, active].transpose(0, 1)
        score = score * kv_deviation(k, v, cached_k, cached_v, config.deviation)
    if config.score != "deviation":
        query_start = plan.chunk_spans[-1][1] if plan.chunk_spans else 0
        score = score * query_attention(q, k, active, query_start, model.scaling)
    return score
