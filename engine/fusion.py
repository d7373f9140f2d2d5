"""Fusion: one request on its way through the Engine's stages, and the stages themselves.

resolve chunks -> look up -> choose sources (the Strategy's hook) -> load -> fuse; then the Engine
decodes. Each stage is a small function that reads what the earlier ones left on the `Fusion` and adds
its own part; each charges its time to the request's one `Stopwatch` (the TTFT parts of
`run_result.PARTS`). The entries a request reads are pinned from `load` until `release()` (after the
first token), which then runs the store upkeep the pins deferred and the strategy's own.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

from ..blend import BlendPlan, BlendResult, LayerBuffers, blend, make_strategy
from ..blend.strategies import Strategy
from ..chunk_cache import ChunkKey, LayeredKV
from .chunk_supply import Lookup
from .context_pass import prefix_key
from .full_prefill import full_prefill
from .request import FusionRequest
from .run_result import PARTS, RunResult
from .stopwatch import Stopwatch


@dataclass
class Fusion:
    """The state of one request between stages."""

    request: FusionRequest
    strategy: Strategy
    watch: Stopwatch
    chunks: list[list[int]] = field(default_factory=list)  # token ids, prompt order
    plan: BlendPlan | None = None
    lookup: Lookup = field(default_factory=Lookup)
    loads: list[ChunkKey] = field(default_factory=list)  # the entry each chunk loads: base key or a variant's
    prefix: ChunkKey | None = None  # the prompt prefix's key: its own KV entry, what KV variants are computed after
    sources: list[tuple[int, LayeredKV]] = field(default_factory=list)  # (target start row, cached KV)
    layers: LayerBuffers | None = None  # per-layer K/V buffers a batch builds, shared by the scout and the blend
    run: RunResult | None = None
    upkeep_ms: float | None = None  # set by release()
    _pins: ExitStack = field(default_factory=ExitStack)

    def release(self) -> None:
        """Unpin the request's entries (running the promotions they deferred) and the strategy's upkeep;
        once, however often it is called. Charged to the `upkeep` lap."""
        if self.upkeep_ms is not None:
            return
        self.watch.lap("decode")  # from the end of the fusion to here: the first token
        try:
            self._pins.close()
            if self.run is not None:
                self.strategy.finish()
        finally:
            self.upkeep_ms = self.watch.lap("upkeep")


def begin(engine, request: FusionRequest) -> Fusion:
    """A new request's Fusion: its own strategy (from the engine's blend settings) and stopwatch."""
    return Fusion(
        request,
        make_strategy(request.strategy, request.recompute_ratio, engine.config.blend),
        Stopwatch(engine.model.device),
    )


def resolve_chunks(engine, f: Fusion) -> None:
    """The chunks' token ids (given, tokenized from texts, or retrieved) and the prompt's plan."""
    req = f.request
    if req.retrieves:
        f.chunks = [list(hit.token_ids) for hit in engine.retrieve(req.question, req.k, req.namespace)]
        f.watch.lap("retrieve")
    elif req.chunks is not None:
        f.chunks = [list(c) for c in req.chunks]
    else:
        f.chunks = engine.tokenize_chunks(req.documents)
    f.plan = engine.plan(req.question, f.chunks)
    f.watch.lap("template")


def look_up(engine, f: Fusion) -> None:
    """Which tier holds each chunk; the misses computed and stored (a part with nothing to do takes no lap)."""
    if f.strategy.reuse == "chunks" and f.chunks:
        f.lookup = engine.supply.lookup(f.chunks, f.request.namespace)
    f.watch.lap("lookup")
    if f.lookup.missing:
        f.lookup.count_shared(engine.supply.precompute(f.lookup.missing))
        f.watch.lap("precompute")


def choose_sources(engine, f: Fusion) -> None:
    """The entry each chunk loads: the strategy decides (its base entry, or a KV variant computed after
    this prompt's prefix, `prefix_key`, the key `load` reads the prefix's own KV under). The plan's exact
    first chunk (`Engine.plan`) stays exact only if it loads its base entry."""
    if f.plan.chunk_spans:
        f.prefix = prefix_key(engine.model, f.plan, f.request.namespace)
    if f.lookup.keys:
        f.loads = f.strategy.choose_sources(f.lookup.keys, engine.store, f.prefix, bool(f.plan.exact_chunks))
        if f.plan.exact_chunks and f.loads[0] != f.lookup.keys[0]:
            f.plan = f.plan.with_exact([])


def load(engine, f: Fusion) -> None:
    """Pin the entries and read them (file reads and checksums; layers decode lazily in the blend).
    An entry that vanished since lookup: a variant falls back to its base entry, a base entry is
    recomputed. The prompt prefix's KV (template + instruction, exact: it always starts the prompt) is
    read (or computed and stored) too, so its rows are loaded, not recomputed; `prefix` loads it alone."""
    keys = f.lookup.keys
    f._pins.enter_context(engine.store.pinned(keys + [v for v in f.loads if v not in keys]))
    reuse_prefix = f.strategy.reuse in ("chunks", "prefix") and bool(f.plan.chunk_spans) and f.plan.prefix_len > 1
    prefix = load_prefix(engine, f) if reuse_prefix else []  # without chunks the "prefix" is the whole prompt
    if keys:
        found = engine.store.get_layered_many(f.loads)
        f.watch.lap("load")
        for i, kv in enumerate(found):
            if kv is None and f.loads[i] != keys[i]:
                f.strategy.source_lost(i)
                found[i] = engine.store.get_layered(keys[i])
        if None in found:
            f.lookup.misses += engine.supply.recompute_vanished(keys, f.chunks, found)
            f.watch.lap("precompute")
        f.sources = prefix + [(start, kv) for (start, _), kv in zip(f.plan.chunk_spans, found)]
    else:
        f.sources = prefix


def load_prefix(engine, f: Fusion) -> list[tuple[int, LayeredKV]]:
    """The prompt prefix's KV as a source at row 0 (pinned); computed and stored on a miss (a miss of
    the request only for `prefix`, whose one entry it is: chunk strategies count chunks)."""
    key = f.prefix  # set by choose_sources for every plan with chunks
    f._pins.enter_context(engine.store.pinned([key]))
    held = engine.store.lookup([key])[0] is not None  # a miss is not a chunk miss: not in the store's stats
    kv = engine.store.get_layered(key) if held else None
    f.watch.lap("load")
    if kv is None:
        kv = engine.supply.compute_prefix(f.plan, key)
        f.lookup.misses += f.strategy.reuse == "prefix"
        f.watch.lap("precompute")
    return [(0, kv)]


def fuse(engine, f: Fusion) -> None:
    """The merged KV and the first-token logits: the model's own forward for `full`, else the blend loop."""
    if f.strategy.reuse == "none":
        result = full_prefill(engine.model, f.plan, f.request.reserve)
    else:
        result = blend(engine.model, f.plan, f.strategy, f.sources, reserve=f.request.reserve)
    record(f, result)


def record(f: Fusion, result: BlendResult) -> None:
    """The request's `RunResult` from its fusion's result: the loop's own parts (load, rerotate,
    recompute, first_token) move out of `other`."""
    f.watch.lap("other")
    parts = {name: f.watch.parts.get(name, 0.0) for name in PARTS}
    for part, seconds in result.seconds.items():
        if part in parts and part != "other":
            parts[part] += seconds * 1e3
            parts["other"] -= seconds * 1e3
    misses = f.lookup.misses + result.recovered  # a chunk recomputed mid-blend was a miss after all
    f.run = RunResult(f.plan, result, f.watch.elapsed_ms(), parts, f.lookup.hits, misses, f.request)


STAGES = (resolve_chunks, look_up, choose_sources, load, fuse)
