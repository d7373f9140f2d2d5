"""Engine: the one facade. Chunk KV is looked up (precomputed on a miss), laid out in a plan, fused
by a strategy in the blend loop, and decoded: `prepare(...)` returns the merged cache for
`model.generate`; `generate(...)` returns an `Answer` with TTFT and its parts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from ..blend import BlendPlan, BlendResult, blend, extend, make_plan, make_strategy, to_dynamic_cache
from ..blend.variant_choice import base_choices, choose_sources
from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV, chunk_key, precompute_many
from ..compression.layered import DTYPES
from ..models import ModelAdapter, load_adapter
from ..retriever import CatalogLink, Document, RetrievedChunk, Retriever
from ..storage import TieredStore
from ..storage.config import build_store
from ..storage.health import degraded_warnings
from ..storage.lease import compute_once
from ..storage.metadata import metadata_store
from .answer import Answer
from .config import EngineConfig
from .context_pass import ContextPassReport, context_pass
from .decode import decode
from .full_prefill import full_prefill
from .ingest import IngestConfig, Ingester, IngestReport
from .prompt import PromptTemplate
from .run_result import PARTS, RunResult
from .stopwatch import Stopwatch


class Engine:
    """RAG generation over cached chunk KV."""

    def __init__(
        self,
        model: ModelAdapter,
        store: TieredStore,
        config: EngineConfig = EngineConfig(),
        template: PromptTemplate = PromptTemplate(),
        embedder=None,
    ) -> None:
        self.model = model
        self.store = store
        self.config = config
        self.template = template
        self.embedder = embedder  # the retriever's Embedder; None: the configured HF encoder
        self._retrievers: dict[str, Retriever] = {}
        self.catalog_links: dict[str, CatalogLink] = {}  # outage state per network catalog URL (PostgreSQL)

    @classmethod
    def from_pretrained(cls, model: str | None = None, config: EngineConfig | None = None, **overrides) -> Engine:
        """Load `model` (alias `smollm2`, a local path or a cached HF id) with the configured chunk store.
        Without `config`, the settings tree: `model` and `overrides` (None = not given) > `RAGKV_*` > file."""
        config = config or EngineConfig.load(model=model, **overrides)
        adapter = load_adapter(config.model, data_dir=config.data_dir, device=config.device, dtype=_dtype(config.dtype))
        return cls(adapter, build_store(config.storage_config(), adapter.fingerprint), config)  # calibrated codecs

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # -- documents and retrieval (the catalog + faiss index of a namespace, opened on first use) ---
    def retriever(self, namespace: str | None = None) -> Retriever:
        """The document catalog and index of `namespace` (each tenant has its own)."""
        ns = namespace or self.config.namespace
        if ns not in self._retrievers:
            cfg = replace(self.config.retriever, namespace=ns)
            path = self.config.data_path(ns)
            path.mkdir(parents=True, exist_ok=True)
            url = self.config.catalog(ns)
            link = None if url.startswith("sqlite") else self.catalog_links.setdefault(url, CatalogLink(url))
            self._retrievers[ns] = Retriever.open(
                path, self.model, cfg, embedder=self.embedder, catalog_url=url, link=link
            )  # CatalogUnavailable while a network catalog is unreachable: opened on a later call
        return self._retrievers[ns]

    def catalog_warnings(self, since: float | None = None) -> list[str]:
        """One sentence per network document catalog that is unreachable now (or failed a call after
        `since`, a `time.perf_counter()` value); empty when all answered."""
        return [w for link in self.catalog_links.values() if (w := link.warning(since))]

    def ingest(
        self,
        paths: Sequence[str] = (),
        documents: Sequence[Document] = (),
        namespace: str | None = None,
        config: IngestConfig = IngestConfig(progress=False),
    ) -> IngestReport:
        """Chunk, embed and index files (`paths`) or `Document`s, and store their chunk KV durably."""
        ingester = Ingester(self.model, self.store, self.retriever(namespace), config)
        return ingester.ingest(paths) if paths else ingester.ingest_documents(documents)

    def remove_documents(self, doc_ids: Sequence[str], namespace: str | None = None) -> tuple[ChunkKey, ...]:
        """Delete documents; their chunks leave the index and their KV leaves the store."""
        return Ingester(self.model, self.store, self.retriever(namespace)).remove(doc_ids)

    def retrieve(self, query: str, k: int = 5, namespace: str | None = None) -> list[RetrievedChunk]:
        """The `k` chunks most similar to `query`."""
        return self.retriever(namespace).search(query, k)

    def close(self) -> None:
        """Save indexes and flush the store."""
        for r in self._retrievers.values():
            r.close()
        self.store.close()

    # -- chunks ---------------------------------------------------------------------------------
    def tokenize_chunks(self, documents: Sequence[str]) -> list[list[int]]:
        """Each document's own token ids (one chunk per document)."""
        ids = [self.template.chunk_ids(self.tokenizer, d) for d in documents]
        for i, c in enumerate(ids):
            if not c:
                raise ValueError(f"document {i} is empty: every document needs at least one token")
        return ids

    def ensure_cached(
        self, chunks: Sequence[Sequence[int]], namespace: str | None = None
    ) -> tuple[list[ChunkKey], dict[str, int], int]:
        """Keys of `chunks`, precomputing and storing the misses; returns (keys, hits per tier, misses)."""
        keys, hits, missing, misses = self._lookup(chunks, namespace or self.config.namespace)
        misses = self._count_shared(keys, self._precompute(missing), hits, misses)
        return keys, hits, misses

    def _lookup(
        self, chunks: Sequence[Sequence[int]], namespace: str
    ) -> tuple[list[ChunkKey], dict[str, int], dict[ChunkKey, Sequence[int]], int]:
        """(keys, hits per tier, missing key -> its token ids, misses counting repeats); no precompute."""
        keys = [chunk_key(self.model, c, namespace) for c in chunks]
        hits: dict[str, int] = {}
        missing: dict[ChunkKey, Sequence[int]] = {}  # a repeated chunk is computed once
        misses = 0
        for key, chunk, tier in zip(keys, chunks, self.store.lookup(keys)):
            if tier is None:
                missing[key] = chunk
                misses += 1
            else:
                hits[tier] = hits.get(tier, 0) + 1
        self.store.note_misses(misses)  # cache stats agree with the answer's misses
        return keys, hits, missing, misses

    def _precompute(self, missing: dict[ChunkKey, Sequence[int]]) -> dict[ChunkKey, str]:
        """Compute and store the KV of `missing` chunks (packed several per pass), each once across the
        sidecars sharing a Redis tier, copied to the disk tier off the request path (write-behind);
        returns the keys another sidecar computed meanwhile -> their tier."""
        if not missing:
            return {}
        compute = lambda c: precompute_many(self.model, c, self.config.prepack_tokens)  # noqa: E731
        return compute_once(self.store, missing, compute, write_behind=True)

    def _recompute_vanished(
        self, keys: Sequence[ChunkKey], chunks: Sequence[Sequence[int]], found: list[LayeredKV | None]
    ) -> int:
        """Fill the `None`s of `found` (entries that vanished or failed their checksum after lookup)
        through the same compute-once path as misses, so two sidecars that lost the same entry do not
        both recompute it; returns how many were recomputed here (another sidecar's are hits)."""
        gone = {keys[i]: chunks[i] for i, kv in enumerate(found) if kv is None}
        shared = self._precompute(gone)
        recomputed = 0
        for i, kv in enumerate(found):
            if kv is None:
                found[i] = self.store.get_layered(keys[i])
                recomputed += keys[i] not in shared
            if found[i] is None:  # not even the first tier kept it (too small, or gone again): use it unstored
                found[i] = precompute_many(self.model, [chunks[i]])[0]
        return recomputed

    @staticmethod
    def _count_shared(keys: Sequence[ChunkKey], shared: dict[ChunkKey, str], hits: dict[str, int], misses: int) -> int:
        """Chunks another sidecar computed while this one waited count as hits of their tier; new misses."""
        for k in keys:
            if k in shared:
                hits[shared[k]] = hits.get(shared[k], 0) + 1
                misses -= 1
        return misses

    def _prefix_source(self, plan: BlendPlan, namespace: str) -> tuple[LayeredKV | None, ChunkKey]:
        """Exact-prefix reuse: the cached KV of the prompt's prefix (None on a miss) and its key."""
        prefix = plan.input_ids[: plan.prefix_len].tolist()
        key = ChunkKey.of(self.model.fingerprint + ":prefix", self.model.tokenizer_fingerprint, prefix, namespace)
        return self.store.get_layered(key), key

    # -- the query path -------------------------------------------------------------------------
    def plan(self, question: str, chunks: Sequence[Sequence[int]]) -> BlendPlan:
        prefix, query, sep = self.template.render(self.tokenizer, question)
        return make_plan(prefix, chunks, query, sep)

    def run(
        self,
        question: str,
        documents: Sequence[str] | None = None,
        *,
        chunks: Sequence[Sequence[int]] | None = None,
        strategy: str | None = None,
        recompute_ratio: float | None = None,
        namespace: str | None = None,
        k: int | None = None,
        reserve: int | None = None,
    ) -> RunResult:
        """Plan and fuse one prompt over `documents` (texts), `chunks` (token ids) or, with neither,
        the `k` retrieved chunks. The blend result keeps `reserve` rows (default: max_new_tokens) to
        decode into. Store upkeep the request deferred runs after the TTFT is taken, before returning."""
        with self._session(question, documents, chunks, strategy, recompute_ratio, namespace, k, reserve) as run:
            return run

    @contextmanager
    def _session(self, question, documents, chunks, strategy, ratio, namespace, k, reserve) -> Iterator[RunResult]:
        """Yields the RunResult while the request's store entries are pinned; leaving runs the upkeep
        (promotions) the pins deferred, so callers leave after the first token is out."""
        name = strategy or self.config.blend.strategy
        ratio = self.config.blend.recompute_ratio if ratio is None else ratio
        fuse = make_strategy(name, ratio, self.config.blend)
        namespace = namespace or self.config.namespace
        reserve = self.config.max_new_tokens if reserve is None else reserve
        watch = Stopwatch(self.model.device)
        if chunks is None and documents is None:  # nothing given: retrieve from the index
            chunks = [hit.token_ids for hit in self.retrieve(question, k or 5, namespace)]
            watch.lap("retrieve")
        chunk_ids = list(chunks) if chunks is not None else self.tokenize_chunks(documents)
        plan = self.plan(question, chunk_ids)
        watch.lap("template")
        keys, hits, missing, misses = [], {}, {}, 0
        if fuse.reuse == "chunks" and chunk_ids:
            keys, hits, missing, misses = self._lookup(chunk_ids, namespace)
        watch.lap("lookup")
        if missing:  # a part with nothing to do takes no lap: it stays exactly 0
            misses = self._count_shared(keys, self._precompute(missing), hits, misses)
            watch.lap("precompute")
        loads, meta, choices = keys, None, None  # the store keys read: a chunk's base entry or a KV variant
        if keys and hasattr(fuse, "bind"):  # cachecraft: recorded metadata, and the variant each chunk loads
            meta = metadata_store(self.store)
            choices = choose_sources(keys, meta, self.store) if self.config.blend.craft_variants else None
            fuse.bind(keys, meta, choices)
            loads = [c.key for c in choices] if choices else keys
        variant_keys = [v for v, k in zip(loads, keys) if v != k]
        with self.store.pinned(keys + variant_keys):  # nothing this request reads is evicted under it
            sources: list[tuple[int, LayeredKV]] = []
            if keys:
                found = self.store.get_layered_many(loads)  # file reads and checksums; layers decode lazily
                watch.lap("load")
                for i, kv in enumerate(found):  # a variant vanished since lookup: its base entry instead
                    if kv is None and loads[i] != keys[i]:
                        choices[i] = base_choices(keys)[i]
                        fuse.bind(keys, meta, choices)
                        found[i] = self.store.get_layered(keys[i])
                if None in found:  # vanished or corrupt since lookup: compute it now, once cluster-wide
                    misses += self._recompute_vanished(keys, chunk_ids, found)
                    watch.lap("precompute")
                sources = [(start, kv) for (start, _), kv in zip(plan.chunk_spans, found)]
            elif fuse.reuse == "prefix" and plan.prefix_len > 1:
                kv, key = self._prefix_source(plan, namespace)
                watch.lap("load")
                if kv is None:
                    prefix = plan.input_ids[: plan.prefix_len]
                    kv = ChunkKV(self.model.forward_kv(prefix, torch.arange(plan.prefix_len)), pos0=0)
                    self.store.put(key, kv)
                    misses += 1
                    watch.lap("precompute")
                sources = [(0, kv)]
            if fuse.reuse == "none":
                result = full_prefill(self.model, plan, reserve)
            else:
                result = blend(self.model, plan, fuse, sources, reserve=reserve)
            watch.lap("other")  # the blend's own parts are moved out of this lap below
            parts = {name: watch.parts.get(name, 0.0) for name in PARTS}
            for part, seconds in result.seconds.items():
                if part in parts and part != "other":
                    parts[part] += seconds * 1e3
                    parts["other"] -= seconds * 1e3
            yield RunResult(plan, result, watch.elapsed_ms(), parts, hits, misses)
            if choices:  # upkeep, after the first token: the variants this prompt loaded were reused once more
                meta.count_reuses([c.key for c in choices if c.is_variant])

    def record_context(
        self, question: str, documents: Sequence[str] | None = None, *, chunks=None, namespace: str | None = None
    ) -> ContextPassReport:
        """A context pass over `documents` (texts) or `chunks` (token ids) in this order: records their
        chunk metadata and, with `blend.craft_variants > 0`, their in-context KV variants for cachecraft."""
        chunk_ids = list(chunks) if chunks is not None else self.tokenize_chunks(documents or [])
        return context_pass(self, question, chunk_ids, namespace or self.config.namespace)

    @torch.inference_mode()
    def teacher_forced_logits(self, result: BlendResult, forced: torch.Tensor) -> torch.Tensor:
        """Logits [P, vocab] at each of the P positions of `forced` [P] fed after the blend's prompt."""
        if forced.numel() == 1:
            return result.logits[None]
        after = extend(self.model, result, forced[:-1].to(self.model.device), result.num_tokens)  # [P-1, vocab]
        return torch.cat([result.logits[None], after])  # [P, vocab]

    @property
    def eos_ids(self) -> set[int]:
        ids = (self.tokenizer.eos_token_id, getattr(self.model.config, "eos_token_id", None))
        return {i for i in ids if isinstance(i, int)}

    def answer_ids(self, result: BlendResult, max_new_tokens: int, temperature: float = 0.0) -> Iterator[int]:
        """The answer's token ids after the blend's prompt (greedy, or sampled), EOS excluded: the one
        decode loop of the engine."""
        eos = self.eos_ids
        for token in decode(self.model, result, result.num_tokens, max_new_tokens, eos, temperature):
            if token in eos:
                return
            yield token

    def prepare(self, question: str, documents: Sequence[str] | None = None, **kwargs):
        """(DynamicCache of all but the last prompt token, input_ids [1, N]) for `model.generate`."""
        run = self.run(question, documents, **kwargs)
        cache = to_dynamic_cache(run.blend, run.prompt_tokens - 1)
        return cache, run.plan.input_ids[None].to(self.model.device)

    def generate(
        self,
        question: str,
        documents: Sequence[str] | None = None,
        *,
        chunks=None,
        k: int | None = None,
        strategy: str | None = None,
        recompute_ratio: float | None = None,
        max_new_tokens: int | None = None,
        stream: bool = False,
        namespace: str | None = None,
        temperature: float = 0.0,
    ):
        """Answer `question` over `documents` (texts), `chunks` (token ids) or the `k` retrieved chunks:
        an `Answer`, or with `stream=True` an iterator of text pieces whose last item is the `Answer`."""
        events = self._generate(
            question,
            documents,
            chunks,
            k,
            strategy,
            recompute_ratio,
            max_new_tokens or self.config.max_new_tokens,
            namespace,
            temperature,
        )
        if stream:
            return events
        *_, answer = events
        return answer

    def _generate(
        self, question, documents, chunks, k, strategy, ratio, max_new_tokens, namespace, temperature
    ) -> Iterator[str | Answer]:
        t0 = time.perf_counter()
        session = self._session(question, documents, chunks, strategy, ratio, namespace, k, max_new_tokens)
        run = session.__enter__()
        upkeep_ms = None
        try:
            tokens: list[int] = []
            text = ""
            for token in self.answer_ids(run.blend, max_new_tokens, temperature):
                tokens.append(token)
                full = self.tokenizer.decode(tokens, skip_special_tokens=True)
                piece, text = full[len(text) :], full
                if piece:
                    yield piece
                if upkeep_ms is None:  # the first token is out: now the store's deferred upkeep
                    t1 = time.perf_counter()
                    session.__exit__(None, None, None)
                    upkeep_ms = (time.perf_counter() - t1) * 1e3
        finally:
            if upkeep_ms is None:
                t1 = time.perf_counter()
                session.__exit__(None, None, None)
                upkeep_ms = (time.perf_counter() - t1) * 1e3
        yield Answer(
            text=text.strip(),
            token_ids=tokens,
            strategy=strategy or self.config.blend.strategy,
            recompute_ratio=self.config.blend.recompute_ratio if ratio is None else ratio,
            ttft_ms=run.ttft_ms,
            parts_ms=run.parts_ms,
            recompute_fraction=run.blend.recompute_fraction,
            prompt_tokens=run.prompt_tokens,
            hits=run.hits,
            misses=run.misses,
            decode_ms=(time.perf_counter() - t0) * 1e3 - run.ttft_ms,
            upkeep_ms=upkeep_ms,
            warnings=degraded_warnings(self.store, since=t0) + self.catalog_warnings(since=t0),
            first_logits=run.logits,
        )


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}") from None
