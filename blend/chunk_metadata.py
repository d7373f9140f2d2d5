"""Chunk metadata from a context pass: how much each chunk of a prompt attends to the chunks before it.

`context_metadata` runs every row of a fused prompt through the first layers (a scout pass with all
rows active: the first layers of a full prefill, `layers` = (1,) costs 2/L of one) and measures, for
each chunk's own tokens at the observed layers, the attention mass on the rows of the chunks before
it ("cross") and on its own rows ("within"); the template prefix (the attention sink) and separators
count for neither. CCI = 2 * sigmoid(cross / within) - 1, in [0, 1): 0 for a chunk that attends only
to itself (Cache-Craft's "sigmoid of cross over within", shifted so that 0 means independent). The
ranking orders the chunk's tokens by their own cross mass, most context-dependent first.
`record_context` stores it per chunk key (`storage/metadata.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..chunk_cache import ChunkKey, LayeredKV
from ..models import ModelAdapter
from ..storage.metadata import ChunkMetadata, MetadataStore
from .plan import BlendPlan
from .scout import attention_rows, scout


def cci_of(cross: float, within: float) -> float:
    """Cache context impact from a chunk's cross-chunk and within-chunk attention mass."""
    if within <= 0.0:
        return 1.0 if cross > 0.0 else 0.0
    return 2.0 / (1.0 + math.exp(-cross / within)) - 1.0


def context_metadata(
    model: ModelAdapter,
    plan: BlendPlan,
    sources: Sequence[tuple[int, LayeredKV]],
    keys: Sequence[ChunkKey],
    layers: Sequence[int] = (1,),
) -> list[ChunkMetadata]:
    """One `ChunkMetadata` per chunk of `plan` (in plan order, `keys` naming them), from a context pass
    over `layers`; `sources` may be empty (chunks computed from scratch) or hold each chunk's KV."""
    spans = plan.chunk_spans
    if len(keys) != len(spans):
        raise ValueError(f"{len(keys)} keys for {len(spans)} chunks: give one key per chunk")
    cross = [torch.zeros(end - start) for start, end in spans]  # per chunk [T]
    within = [0.0] * len(spans)

    def observe(layer, rows, q, k_all):
        for i, (start, end) in enumerate(spans):
            att = attention_rows(q[start:end], k_all[:, :end], rows[start:end], model.scaling)  # [H, T, end]
            per_key = att.sum(dim=0)  # [T, end]
            before = torch.zeros(end, dtype=torch.bool, device=per_key.device)
            for s, e in spans[:i]:
                before[s:e] = True
            cross[i] += per_key[:, before].sum(dim=1).cpu()
            within[i] += float(per_key[:, start:end].sum())

    scout(model, plan, sources, torch.ones(plan.num_tokens, dtype=torch.bool), layers, observe)
    out = []
    for i in range(len(keys)):
        ranking = torch.argsort(cross[i], descending=True, stable=True).numpy().astype(np.int64)
        out.append(ChunkMetadata(cci_of(float(cross[i].sum()), within[i]), ranking, tuple(keys[:i])))
    return out


def record_context(
    model: ModelAdapter,
    plan: BlendPlan,
    sources: Sequence[tuple[int, LayeredKV]],
    keys: Sequence[ChunkKey],
    store: MetadataStore,
    layers: Sequence[int] = (1,),
) -> list[ChunkMetadata]:
    """Run the context pass and store each chunk's metadata; a chunk seen first in the prompt (nothing
    before it, so nothing learned) keeps what an earlier context recorded."""
    found = context_metadata(model, plan, sources, keys, layers)
    previous = store.get_many(list(keys))
    for key, meta, old in zip(keys, found, previous):
        if meta.preceding or old is None:
            store.put(key, meta)
    return found
