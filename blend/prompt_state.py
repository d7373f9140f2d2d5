"""PromptState: one prompt's side of the blend loop, so that one loop can fuse one prompt or several.

Built once per request (`PromptState(model, plan, strategy, sources, ...)`): which rows come from cache,
their target rows and re-rotation, the strategy's initial active set (query-aware strategies and
cachecraft choose it here, before layer 0) and the attention mask of that set. Per layer the loop asks
it to load its cached rows into its own K/V buffers (`load_layer`), to narrow its active set at its
own check layers (`narrow`), to write its fresh K/V (`write`) and to attend its queries over its own
buffers (`attention`). Hidden states and projections are the loop's: it may pack several prompts' rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from ..models.attention import MASK_KINDS, QueryMask, query_mask
from .loader import LayerLoader
from .plan import BlendPlan
from .recover import Recovering, recovering
from .rerotate import rerotate, rotation
from .select import kv_deviation, query_attention
from .shared_prefix import fresh_prefix
from .strategies import Strategy


class PromptState:
    """The per-request state of the blend loop (rows in the comments: N prompt rows, S active rows)."""

    def __init__(
        self,
        model: ModelAdapter,
        plan: BlendPlan,
        strategy: Strategy,
        sources: Sequence[tuple[int, LayeredKV]] = (),
        *,
        reserve: int = 0,
        attention: str = "auto",
    ) -> None:
        n, dev = plan.num_tokens, model.device
        if model.max_context is not None and n > model.max_context:
            raise ValueError(f"prompt of {n} tokens exceeds the model's exact attention span of {model.max_context}")
        if attention not in MASK_KINDS:
            raise ValueError(f"unknown attention {attention!r}; accepted: {', '.join(MASK_KINDS)}")
        self.model, self.plan, self.strategy = model, plan, strategy
        self.reserve, self.attention_kind = reserve, attention
        sources = recovering(model, plan, sources)  # a stored layer found damaged mid-blend: that chunk is recomputed
        self.sources = sources
        # 1. Which rows come from cache (host bookkeeping), their target rows and the rotation that
        #    moves each cached key to its target row: all computed once per request, on the device.
        self.cached = torch.zeros(n, dtype=torch.bool)  # [N] host
        target_rows, deltas = [], []
        for start, kv in sources:
            if not (0 <= start and start + kv.num_tokens <= n):
                raise ValueError(
                    f"cached source at rows {start}..{start + kv.num_tokens - 1} lies outside the {n}-row plan"
                )
            self.cached[start : start + kv.num_tokens] = True
            target_rows.append(torch.arange(start, start + kv.num_tokens))  # [T]
            deltas.append(torch.full((kv.num_tokens,), start - kv.pos0))  # [T]
        self.spans = [(start, kv.num_tokens) for start, kv in sources]  # target rows per source, loader order
        self.num_cached = sum(kv.num_tokens for _, kv in sources)
        if int(self.cached.sum()) != self.num_cached:
            raise ValueError("cached sources must not overlap")
        self.loader = None
        if self.num_cached:
            self.rows_dev = torch.cat(target_rows).to(dev)  # [Nc] target row of each loaded row, loader order
            rot_cos, rot_sin = rotation(torch.cat(deltas), model.inv_freq)  # [Nc, D] each
            self.rot_cos, self.rot_sin = rot_cos.to(dev), rot_sin.to(dev)
            self.loader = iter(LayerLoader([kv for _, kv in sources], model.num_layers, dev, model.dtype))
        # 2. The active set: tokens whose hidden states flow through the layers (sorted rows).
        strategy.prepare(model, plan, sources)
        active_host = strategy.initial_tokens(plan, self.cached).nonzero().flatten()  # [S] host
        if active_host.numel() == 0 or int(active_host[-1]) != n - 1:
            raise ValueError(f"strategy {strategy.label} must compute the last prompt token")
        self.active = active_host.to(dev)  # [S]
        self.cached_dev = self.cached.to(dev)
        cos, sin = model.rope(torch.arange(n, device=dev))  # [N, D]
        self.cos_a, self.sin_a = cos[self.active], sin[self.active]  # [S, D]: the loop gathers them once
        self.check_layers = strategy.check_layers()
        self.leader: PromptState | None = None  # the prompt whose K/V of the shared prefix rows this one copies
        self.shared = 0
        self._set_active(active_host)
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer K, V [1, H_kv, N + reserve, D]
        self.recomputed = 0  # cached rows recomputed, summed over layers

    @property
    def recovered(self) -> int:
        """Chunks whose stored KV failed mid-blend and were recomputed (blend/recover.py)."""
        return sum(isinstance(kv, Recovering) and kv.recomputed is not None for _, kv in self.sources)

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def size(self) -> int:
        """S: the active rows the loop computes now (a follower's own ones: not its shared prefix)."""
        return int(self.own.shape[0])

    def embed(self) -> torch.Tensor:
        """Hidden states [S, hidden] of the initial active rows."""
        return self.model.embed(self.plan.input_ids.to(self.model.device)[self.own])

    def _set_active(self, active_host: torch.Tensor) -> None:
        self.own = self.active  # the rows the loop computes for this prompt (all active, unless it follows)
        self.recomputing = int(self.cached[active_host].sum())  # cached rows among the active ones
        self.mask = _mask(active_host, self.num_tokens, self.model.device, self.attention_kind)  # once per set

    def fresh_prefix(self) -> tuple[int, ...]:
        """The ids of its fresh opening rows, which a packed pass may compute once for every prompt that
        opens alike (blend/shared_prefix.py); () for a prompt that narrows its rows at check layers."""
        if self.check_layers:
            return ()
        active = torch.zeros(self.num_tokens, dtype=torch.bool)
        active[self.active.cpu()] = True
        return fresh_prefix(self.plan, self.cached, active)

    def follow(self, leader: PromptState, shared: int) -> None:
        """Copy the first `shared` rows' K/V from `leader` (written before this prompt's, each layer)
        and compute only the other active rows."""
        self.leader, self.shared = leader, shared
        self.own = self.active[shared:]
        self.cos_a, self.sin_a = self.cos_a[shared:], self.sin_a[shared:]
        self.mask = _mask(self.own.cpu(), self.num_tokens, self.model.device, self.attention_kind)

    def load_layer(self, layer: int, clock) -> None:
        """This layer's K/V buffers, the cached rows written in with keys re-rotated to their target
        rows (one scatter each); `clock.lap(part)` charges the allocation, load and re-rotation."""
        model, n = self.model, self.num_tokens
        k_all = torch.empty(
            1, model.num_kv_heads, n + self.reserve, model.head_dim, dtype=model.dtype, device=model.device
        )  # [1, H, N+R, D]
        v_all = torch.empty_like(k_all)
        self.buffers.append((k_all, v_all))
        self.k_buf, self.v_buf = k_all[0, :, :n], v_all[0, :, :n]  # [H, N, D] views
        clock.lap("recompute")  # the buffers' allocation
        if self.loader is None:
            return
        rows = next(self.loader)  # [2, Nc, H, D]
        clock.lap("load")  # on CUDA: how long the compute stream waited for the side stream's copy
        if self.k_buf.is_cuda and _fused_rerotate(rows[0], self.k_buf):
            from .rerotate_triton import rerotate_into

            rerotate_into(self.k_buf, rows[0], self.rot_cos, self.rot_sin, self.rows_dev)  # one kernel
        else:
            rotated = rerotate(rows[0], self.rot_cos, self.rot_sin).to(model.dtype)  # [Nc, H, D]
            _scatter(self.k_buf, rotated, self.rows_dev, self.spans)
        _scatter(self.v_buf, rows[1], self.rows_dev, self.spans)
        clock.lap("rerotate")

    def narrow(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """At one of this prompt's check layers, keep the active tokens whose fresh K/V (q [S, H_q, D],
        k, v [S, H_kv, D]) deviate most from the cached rows: the indices [S'] (sorted) of the kept
        ones among the S, and the active set and mask narrowed to them (one read-back per check
        layer). None at any other layer."""
        if layer not in self.check_layers:
            return None
        is_cached = self.cached_dev[self.active]  # [S]
        deviation = _score(self.strategy.config, self.model, self.plan, self.active, q, k, v, self.k_buf, self.v_buf)
        keep = self.strategy.narrow(
            self.check_layers.index(layer), self.plan, self.active, is_cached, deviation, self.num_cached
        )
        kept = keep.nonzero().flatten()  # [S'] (sorted)
        self.active = self.active[kept]
        self._set_active(self.active.cpu())
        return kept

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fresh K/V [S, H_kv, D] of the active tokens overwrite their rows of this layer's buffers (a
        follower's shared rows: the leader's)."""
        if self.leader is not None:
            self.k_buf[:, : self.shared] = self.leader.k_buf[:, : self.shared]
            self.v_buf[:, : self.shared] = self.leader.v_buf[:, : self.shared]
        self.k_buf.index_copy_(1, self.own, k.transpose(0, 1))
        self.v_buf.index_copy_(1, self.own, v.transpose(0, 1))
        self.recomputed += self.recomputing

    def attention(self, q: torch.Tensor) -> torch.Tensor:
        """The active queries q [S, H_q, D] over all of this layer's keys, causally by position:
        the attention output [S, H_q * D]."""
        return self.model.attention(q, self.k_buf[None], self.v_buf[None], self.mask)

    @property
    def recompute_fraction(self) -> float:
        """Chunk rows recomputed / chunk rows, averaged over layers (1.0 with nothing cached)."""
        return self.recomputed / (self.num_cached * self.model.num_layers) if self.num_cached else 1.0


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
