"""PromptState: one prompt's side of the blend loop, so that one loop can fuse one prompt or several.

Built once per request (`PromptState(model, plan, strategy, sources, ...)`): its per-layer K/V buffers
(`LayerBuffers`: which rows come from cache, loaded and re-rotated to their target rows), the question's
attention for strategies that rank by it (a scout pass over those same buffers, unless a batch scouted
it already), the strategy's initial active set (query-aware strategies and cachecraft choose it here,
before layer 0) and the attention mask of that set. Per layer the loop asks it for that layer's buffers
with the cached rows in (`load_layer`: loaded now, or read back from the scout), to narrow its active
set at its own check layers (`narrow`), to write its fresh K/V (`write`) and to attend its queries over
its own buffers (`attention`). Hidden states and projections are the loop's: it may pack several
prompts' rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from ..models.attention import MASK_KINDS, QueryMask, query_mask
from .layer_buffers import LayerBuffers
from .plan import BlendPlan
from .query_select import question_attention_many
from .recover import Recovering
from .select import kv_deviation, query_attention
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
        layers: LayerBuffers | None = None,
    ) -> None:
        n, dev = plan.num_tokens, model.device
        if model.max_context is not None and n > model.max_context:
            raise ValueError(f"prompt of {n} tokens exceeds the model's exact attention span of {model.max_context}")
        if attention not in MASK_KINDS:
            raise ValueError(f"unknown attention {attention!r}; accepted: {', '.join(MASK_KINDS)}")
        self.model, self.plan, self.strategy = model, plan, strategy
        self.reserve, self.attention_kind = reserve, attention
        # 1. Which rows come from cache, and each layer's buffers with those rows loaded and re-rotated
        #    to their target rows: shared with a scout pass that ran first (then loaded once).
        if layers is None:
            layers = LayerBuffers(model, plan, sources, reserve=reserve)
        elif sources:
            raise ValueError("give a PromptState its cached sources or its LayerBuffers (which hold them), not both")
        elif layers.plan is not plan or layers.reserve != reserve or not layers.keep:
            raise ValueError("a prompt's LayerBuffers must be built for its own plan and reserve, with keep=True")
        self.layers = layers
        self.sources = layers.sources  # wrapped: a stored layer found damaged mid-blend, that chunk is recomputed
        self.cached = layers.cached  # [N] host
        self.cached_chunks = self.cached & plan.chunk_mask()  # [N] host: a cached prompt prefix is not counted
        self.num_cached = int(self.cached_chunks.sum())  # chunk rows loaded: what budgets and fractions count
        if strategy.scouted is None and strategy.wants_scout(plan, self.sources):  # over the same buffers
            strategy.scouted = question_attention_many(model, [layers], strategy.config.scout_layers)[0]
        # 2. The active set: tokens whose hidden states flow through the layers (sorted rows).
        strategy.prepare(model, plan, self.sources)
        active_host = strategy.initial_tokens(plan, self.cached).nonzero().flatten()  # [S] host
        if active_host.numel() == 0 or int(active_host[-1]) != n - 1:
            raise ValueError(f"strategy {strategy.label} must compute the last prompt token")
        self.active = active_host.to(dev)  # [S]
        self.cached_dev = self.cached.to(dev)
        cos, sin = model.rope(torch.arange(n, device=dev))  # [N, D]
        self.cos_a, self.sin_a = cos[self.active], sin[self.active]  # [S, D]: the loop gathers them once
        self.check_layers = strategy.check_layers()
        self._set_active(active_host)
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
        """S: the active rows now."""
        return int(self.active.shape[0])

    def embed(self) -> torch.Tensor:
        """Hidden states [S, hidden] of the initial active rows."""
        return self.model.embed(self.plan.input_ids.to(self.model.device)[self.active])

    def _set_active(self, active_host: torch.Tensor) -> None:
        self.recomputing = int(self.cached_chunks[active_host].sum())  # cached chunk rows among the active ones
        self.mask = _mask(active_host, self.num_tokens, self.model.device, self.attention_kind)  # once per set

    def load_layer(self, layer: int, clock) -> None:
        """This layer's K/V buffers, the cached rows in with keys re-rotated to their target rows (read
        back when a scout pass filled them); `clock.lap(part)` charges the allocation, load and re-rotation."""
        k_all, v_all = self.layers.layer(layer, clock.lap)
        self.k_buf, self.v_buf = k_all[0, :, : self.num_tokens], v_all[0, :, : self.num_tokens]  # [H, N, D] views

    @property
    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer K, V [1, H_kv, N + reserve, D] (the layers loaded so far)."""
        return self.layers.buffers

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
        """Fresh K/V [S, H_kv, D] of the active tokens overwrite their rows of this layer's buffers."""
        self.k_buf.index_copy_(1, self.active, k.transpose(0, 1))
        self.v_buf.index_copy_(1, self.active, v.transpose(0, 1))
        self.recomputed += self.recomputing

    def attention(self, q: torch.Tensor) -> torch.Tensor:
        """The active queries q [S, H_q, D] over all of this layer's keys, causally by position:
        the attention output [S, H_q * D]."""
        return self.model.attention(q, self.k_buf[None], self.v_buf[None], self.mask)

    @property
    def recompute_fraction(self) -> float:
        """Chunk rows recomputed / chunk rows, averaged over layers (1.0 with nothing cached)."""
        return self.recomputed / (self.num_cached * self.model.num_layers) if self.num_cached else 1.0


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
