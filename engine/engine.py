"""Engine: the one facade. Chunk KV is looked up (precomputed on a miss), laid out in a plan, fused
by a strategy in the blend loop, and decoded: `prepare(...)` returns the merged cache for
`model.generate`; `generate(...)` returns an `Answer` with TTFT and its parts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from ..blend import BlendPlan, blend, extend, make_plan, make_strategy, to_dynamic_cache
from ..blend.loop import BlendResult
from ..chunk_cache import ChunkKey, ChunkKV, LayeredKV, chunk_key, precompute_many
from ..models import ModelAdapter, load_adapter
from ..retriever import Document, RetrievedChunk, Retriever
from ..storage import TieredStore
from ..storage.config import build_store
from ..storage.metadata import metadata_store
from .answer import Answer
from .config import EngineConfig
from .decode import decode
from .ingest import IngestConfig, Ingester, IngestReport
from .prompt import PromptTemplate

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """RAG generation over cached chunk KV."""

    def __init__(
        self,
        model: ModelAdapter,
        store: TieredStore,
        config: EngineConfig = EngineConfig(),
        template: PromptTemplate = PromptTemplate(),
    ) -> None:
        self.model = model
        self.store = store
        self.config = config
        self.template = template
        self._retrievers: dict[str, Retriever] = {}

    @classmethod
    def from_pretrained(cls, model: str = "smollm2", config: EngineConfig | None = None, **overrides) -> Engine:
        """Load `model` (alias `smollm2`, a local path or a cached HF id) with the configured chunk store."""
        config = config or EngineConfig.from_env(model=model, **overrides)
        adapter = load_adapter(config.model, data_dir=config.data_dir, device=config.device, dtype=_dtype(config.dtype))
        return cls(adapter, build_store(config.storage_config()), config)

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
            self._retrievers[ns] = Retriever.open(path, self.model, cfg, catalog_url=self.config.catalog(ns))
        return self._retrievers[ns]

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
        keys = [chunk_key(self.model, c, namespace or self.config.namespace) for c in chunks]
        where = self.store.lookup(keys)
        hits: dict[str, int] = {}
        for tier in where:
            if tier is not None:
                hits[tier] = hits.get(tier, 0) + 1
        missing = {k: c for k, c, w in zip(keys, chunks, where) if w is None}  # dedup repeated chunks
        if missing:
            computed = precompute_many(self.model, list(missing.values()), self.config.prepack_tokens)
            for key, kv in zip(missing, computed):
                self.store.put(key, kv, cost=kv.num_tokens)
        return keys, hits, sum(w is None for w in where)

    def _sources(
        self, plan: BlendPlan, keys: Sequence[ChunkKey], chunks: Sequence[Sequence[int]]
    ) -> tuple[list[tuple[int, LayeredKV]], int]:
        """Each chunk's cached KV (read lazily, layer by layer) at its start row; an entry that vanished
        or failed its checksum since `lookup` is recomputed now. Returns (sources, recomputed count)."""
        found = self.store.get_layered_many(keys)
        recomputed = 0
        for i, kv in enumerate(found):
            if kv is None:
                fresh = precompute_many(self.model, [chunks[i]])[0]
                self.store.put(keys[i], fresh, cost=fresh.num_tokens)
                found[i] = fresh
                recomputed += 1
        return [(start, kv) for (start, _), kv in zip(plan.chunk_spans, found)], recomputed

    def _prefix_source(self, plan: BlendPlan, namespace: str) -> list[tuple[int, LayeredKV]]:
        """Exact-prefix reuse: the KV of the prompt's prefix, computed from position 0."""
        prefix = plan.input_ids[: plan.prefix_len].tolist()
        key = ChunkKey.of(self.model.fingerprint + ":prefix", self.model.tokenizer_fingerprint, prefix, namespace)
        kv = self.store.get_layered(key)
        if kv is None:
            kv = ChunkKV(self.model.forward_kv(torch.tensor(prefix), torch.arange(len(prefix))), pos0=0)
            self.store.put(key, kv)
        return [(0, kv)]

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
    ) -> tuple[BlendPlan, BlendResult, dict[str, float], dict[str, int], int]:
        """Plan and fuse one prompt over `documents` (texts), `chunks` (token ids) or, with neither,
        the `k` retrieved chunks: (plan, blend result, parts in ms, hits per tier, misses). The result
        keeps `reserve` rows (default: max_new_tokens) to decode into."""
        name = strategy or self.config.blend.strategy
        ratio = self.config.blend.recompute_ratio if recompute_ratio is None else recompute_ratio
        fuse = make_strategy(name, ratio, self.config.blend)
        namespace = namespace or self.config.namespace
        t0 = time.perf_counter()
        if chunks is None and documents is None:  # nothing given: retrieve from the index
            chunks = [hit.token_ids for hit in self.retrieve(question, k or 5, namespace)]
        chunk_ids = list(chunks) if chunks is not None else self.tokenize_chunks(documents)
        plan = self.plan(question, chunk_ids)
        hits, misses, sources = {}, 0, []
        t1 = time.perf_counter()
        keys: list[ChunkKey] = []
        if fuse.reuse == "chunks" and chunk_ids:
            keys, hits, misses = self.ensure_cached(chunk_ids, namespace)
        t2 = time.perf_counter()
        if keys and hasattr(fuse, "bind"):  # h7 hook: cachecraft reads the chunks' recorded metadata
            fuse.bind(keys, metadata_store(self.store))
        with self.store.pinned(keys):  # nothing this request reads is evicted under it
            if keys:
                sources, recomputed = self._sources(plan, keys, chunk_ids)
                misses += recomputed
            elif fuse.reuse == "prefix" and plan.prefix_len > 1:
                sources = self._prefix_source(plan, namespace)
            t3 = time.perf_counter()
            result = blend(
                self.model, plan, fuse, sources, reserve=self.config.max_new_tokens if reserve is None else reserve
            )
        parts = {"lookup": (t1 - t0) * 1e3, "precompute": (t2 - t1) * 1e3, "fetch": (t3 - t2) * 1e3}
        parts.update({k: v * 1e3 for k, v in result.seconds.items() if k != "total"})
        return plan, result, parts, hits, misses

    def decode_answer(self, result: BlendResult, max_new_tokens: int, temperature: float = 0.0) -> list[int]:
        """Greedy (or sampled) answer token ids from a blend result, EOS excluded."""
        eos = self.eos_ids
        tokens = []
        for token in decode(self.model, result, max_new_tokens, eos, temperature):
            if token in eos:
                break
            tokens.append(token)
        return tokens

    @torch.inference_mode()
    def teacher_forced_logits(self, result: BlendResult, forced: torch.Tensor) -> torch.Tensor:
        """Logits [P, vocab] at each of the P positions of `forced` [P] fed after the prompt."""
        if forced.numel() == 1:
            return result.logits[None]
        after = extend(self.model, result, forced[:-1].to(self.model.device), result.keys[0].shape[2])  # [P-1, vocab]
        return torch.cat([result.logits[None], after])  # [P, vocab]

    @property
    def eos_ids(self) -> set[int]:
        ids = (self.tokenizer.eos_token_id, getattr(self.model.config, "eos_token_id", None))
        return {i for i in ids if isinstance(i, int)}

    def prepare(self, question: str, documents: Sequence[str] | None = None, **kwargs):
        """(DynamicCache of all but the last prompt token, input_ids [1, N]) for `model.generate`."""
        plan, result, *_ = self.run(question, documents, **kwargs)
        return to_dynamic_cache(result, plan.num_tokens - 1), plan.input_ids[None].to(self.model.device)

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
        plan, result, parts, hits, misses = self.run(
            question,
            documents,
            chunks=chunks,
            strategy=strategy,
            recompute_ratio=ratio,
            namespace=namespace,
            k=k,
            reserve=max_new_tokens,
        )
        ttft = (time.perf_counter() - t0) * 1e3
        eos = self.eos_ids
        tokens: list[int] = []
        text = ""
        for token in decode(self.model, result, max_new_tokens, eos, temperature):
            if token in eos:
                break
            tokens.append(token)
            full = self.tokenizer.decode(tokens, skip_special_tokens=True)
            piece, text = full[len(text) :], full
            if piece:
                yield piece
        name = strategy or self.config.blend.strategy
        yield Answer(
            text=text.strip(),
            token_ids=tokens,
            strategy=name,
            recompute_ratio=self.config.blend.recompute_ratio if ratio is None else ratio,
            ttft_ms=ttft,
            parts_ms=parts,
            recompute_fraction=result.recompute_fraction,
            prompt_tokens=plan.num_tokens,
            hits=hits,
            misses=misses,
            decode_ms=(time.perf_counter() - t0) * 1e3 - ttft,
            first_logits=result.logits,
        )


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(_DTYPES)}") from None
