"""Query-aware token selection, chosen before the blend's first layer (in the spirit of ProphetKV).

A scout pass (`blend/scout.py`) runs only the fresh rows (template, separators, question) through the
layers up to the deepest observed one, over the cached chunk KV, as naive fusion would. At each
observed layer the question's attention to every chunk token is measured (softmax over all keys,
summed over heads and question tokens, normalised over chunk rows); the layers are averaged. The chunk
tokens the question attends to most are recomputed from layer 0, so the blend needs no check layer and
every layer's load can start at once. The default layers (2, 6, 12, 20, 29) reach the last layer of
SmolLM2: deep attention ranked tokens better than layers 1-2 (docs/BENCHMARKS.md), and the scout then
costs about one naive blend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..chunk_cache import LayeredKV
from ..models import ModelAdapter
from .layer_buffers import LayerBuffers
from .plan import BlendPlan
from .scout import ScoutJob, attention_rows, scout_many
from .select import budget


def query_rows_start(plan: BlendPlan) -> int:
    """First row of the question segment: everything after the last chunk."""
    return plan.chunk_spans[-1][1] if plan.chunk_spans else 0


def question_attention(
    model: ModelAdapter,
    plan: BlendPlan,
    sources: Sequence[tuple[int, LayeredKV]],
    layers: Sequence[int],
) -> torch.Tensor:
    """[N] fp32 on CPU: the question's attention to each prompt row, averaged over `layers` after
    normalising each layer's mass over the chunk rows (0 outside chunks). Layers past the model's depth
    are dropped (none left: its last layer). The scout's buffers are not kept (a blend that follows
    passes its own `LayerBuffers` to `question_attention_many` and reads them back)."""
    return question_attention_many(model, [LayerBuffers(model, plan, sources, keep=False)], layers)[0]


def question_attention_many(
    model: ModelAdapter, prompts: Sequence[LayerBuffers], layers: Sequence[int]
) -> list[torch.Tensor]:
    """`question_attention` of each prompt (its plan and cached rows: a `LayerBuffers`, which the scout
    fills for the layers it runs), their scout passes packed into one (`scout_many`)."""
    layers = [layer for layer in layers if layer < model.num_layers] or [model.num_layers - 1]
    totals = [torch.zeros(p.plan.num_tokens) for p in prompts]
    jobs = []
    for p, total in zip(prompts, totals):
        if bool(p.plan.chunk_mask().any()):
            jobs.append(ScoutJob(p, ~p.cached, _observer(model, p.plan, total)))
    if jobs:
        scout_many(model, jobs, layers)
    return [total / len(layers) for total in totals]


def _observer(model: ModelAdapter, plan: BlendPlan, total: torch.Tensor):
    """Adds each observed layer's question attention, normalised over the chunk rows, to `total` [N]."""
    chunk, q_start = plan.chunk_mask(), query_rows_start(plan)

    def observe(layer, rows, q, keys):
        is_query = rows >= q_start
        mass = attention_rows(q[is_query], keys, rows[is_query], model.scaling).sum(dim=(0, 1)).cpu()  # [N]
        mass = mass * chunk
        total.add_(mass / mass.sum().clamp_min(1e-12))

    return observe


def top_rows(score: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """[N] bool: the `count` `candidates` [N] bool rows with the largest `score` [N]."""
    chosen = torch.zeros_like(candidates)
    idx = candidates.nonzero().flatten()
    count = min(count, idx.numel())
    if count > 0:
        chosen[idx[score[idx].topk(count).indices]] = True
    return chosen


def query_aware_tokens(
    model: ModelAdapter,
    plan: BlendPlan,
    sources: Sequence[tuple[int, LayeredKV]],
    ratio: float,
    layers: Sequence[int],
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] bool: the chunk rows to recompute from layer 0 — `ratio` of the cached rows, those the
    question attends to most in a scout pass over `layers` (or by `score` [N], that pass's result
    computed already)."""
    cached = plan.source_mask(sources)
    num_cached = int((cached & plan.chunk_mask()).sum())
    candidates = plan.candidates(cached)
    if ratio <= 0.0 or not bool(candidates.any()):  # no scout pass: nothing to rank
        return torch.zeros(plan.num_tokens, dtype=torch.bool)
    if score is None:
        score = question_attention(model, plan, sources, layers)
    return top_rows(score, candidates, budget(ratio, num_cached))
