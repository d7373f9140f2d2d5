"""A short pass over the first layers of fused prompts, run before the blend to learn where attention goes.

`scout` computes the `active` rows (at least every fresh row) over the cached rows of the first
layers, exactly as the blend loop would with that active set, and hands each observed layer's fresh
queries and full keys to a callback. With only the fresh rows active (the question, template and
separators: ~1-2% of a RAG prompt) it costs a few hundredths of a naive blend; with every row active
it is the first layers of a full prefill (the "context pass" behind chunk metadata).
`scout_many` runs several prompts' scouts in one pass per layer, as `blend_many` does the blend: their
active rows packed for the projections and the MLP, each prompt attending over its own K/V buffers
with its own mask; `scout` is the one-prompt case. Each job's K/V buffers are its `LayerBuffers`: the
cached rows the scout loads and re-rotates stay there for the blend that follows (loaded once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from ..models.attention import query_mask
from .layer_buffers import LayerBuffers
from .plan import BlendPlan

# observe(layer, rows [S] sorted prompt rows, q [S, H_q, D], keys [H_kv, N, D]) at each observed layer
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class ScoutJob:
    """One prompt's scout: its `buffers` (plan and cached rows, filled layer by layer here and kept
    for a blend that follows), `active` [N] bool rows and the callback that observes them."""

    buffers: LayerBuffers
    active: torch.Tensor
    observe: Observer

    @property
    def plan(self) -> BlendPlan:
        return self.buffers.plan


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
    scout_many(model, [ScoutJob(LayerBuffers(model, plan, sources, keep=False), active, observe)], layers)


@torch.inference_mode()
def scout_many(model: ModelAdapter, jobs: Sequence[ScoutJob], layers: Sequence[int]) -> None:
    """Each job's scout (`scout`) over the same `layers`, in one pass per layer: the active rows of all
    jobs packed for q/k/v, the output projection and the MLP; each job's observations are what its
    scout alone sees, up to the rounding of the packed matrix products."""
    if not layers or min(layers) < 0 or max(layers) >= model.num_layers:
        raise ValueError(f"scout layers must lie within 0..{model.num_layers - 1}, got {tuple(layers)}")
    prompts = [_Prompt(model, job) for job in jobs]
    sizes = [p.rows.numel() for p in prompts]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    h = _cat([p.embed() for p in prompts])  # [sum S, hidden]
    cos, sin = _cat([p.cos for p in prompts]), _cat([p.sin for p in prompts])  # [sum S, D]
    last = max(layers)
    for layer in range(last + 1):
        q, k, v = model.qkv(layer, h, cos, sin)  # [sum S, H_q, D], [sum S, H_kv, D] x2
        outs = []
        for p, a, b in zip(prompts, bounds, bounds[1:]):
            p.load_layer(layer, q[a:b], k[a:b], v[a:b])
            if layer in layers:
                p.job.observe(layer, p.rows, p.q, p.k_buf[0])
            if layer < last:
                outs.append(model.attention(q[a:b], p.k_buf, p.v_buf, p.mask))
        if layer < last:
            h = model.after_attention(layer, h, _cat(outs))


class _Prompt:
    """One job's side of `scout_many`: its rows, RoPE tables and mask; its K/V buffers are the job's."""

    def __init__(self, model: ModelAdapter, job: ScoutJob) -> None:
        plan, n, dev = job.plan, job.plan.num_tokens, model.device
        self.model, self.job, self.n = model, job, n
        if bool((~job.buffers.cached & ~job.active).any()):
            raise ValueError("every row not loaded from cache must be active in the scout pass")
        self.rows = job.active.nonzero().flatten().to(dev)  # [S]
        positions = plan.positions.to(dev)[self.rows]
        self.cos, self.sin = model.rope(positions)  # [S, D]
        kind = "dense" if dev.type == "cuda" else "blocks"
        self.mask = None if self.rows.numel() == n else query_mask(positions, n, dev, kind)  # built once
        self.k_buf: torch.Tensor | None = None  # this layer's keys [1, H, N, D]
        self.v_buf: torch.Tensor | None = None
        self.q: torch.Tensor | None = None  # this layer's queries of all its rows [S, H_q, D]

    def embed(self) -> torch.Tensor:
        return self.model.embed(self.job.plan.input_ids.to(self.model.device)[self.rows])  # [S, hidden]

    def load_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """This layer's buffers (the job's `LayerBuffers`: cached rows re-rotated to their target rows),
        the active rows' fresh q, k, v ([S, H, D]) written in."""
        k_all, v_all = self.job.buffers.layer(layer)
        self.k_buf, self.v_buf = k_all[:, :, : self.n], v_all[:, :, : self.n]  # [1, H, N, D] views
        self.k_buf[0][:, self.rows] = k.transpose(0, 1)
        self.v_buf[0][:, self.rows] = v.transpose(0, 1)
        self.q = q


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def attention_rows(q: torch.Tensor, keys: torch.Tensor, query_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention [H_q, Q, N] of queries q [Q, H_q, D] at sorted prompt rows `query_rows`
    [Q] over keys [H_kv, N, D] (key j at row j), in fp32."""
    group = q.shape[1] // keys.shape[0]
    kk = keys.float().repeat_interleave(group, dim=0)  # [H_q, N, D]
    scores = q.float().transpose(0, 1) @ kk.transpose(1, 2) * scale  # [H_q, Q, N]
    key_rows = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill(key_rows[None, None, :] > query_rows[None, :, None], float("-inf"))
    return scores.softmax(dim=-1)
