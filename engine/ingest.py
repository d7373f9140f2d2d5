"""Ingestion: files -> documents -> chunks -> catalog + faiss -> batched (prepacked) chunk KV -> store.

`Ingester(adapter, store, retriever, config).ingest(paths)` is what `Engine.ingest` and `ragkv ingest`
call. The catalog is written per document and KV per small batch (one prepacked forward pass of
`kv_batch_tokens`, a few seconds on a CPU), so a killed run loses little and resumes: unchanged
documents are skipped and only chunks whose key the store lacks are precomputed. `ingest_steps`
runs the same work as a generator that yields between documents and KV batches, so the server's
model worker can interleave other tenants' requests with a long ingestion.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..chunk_cache import ChunkKey, precompute_many
from ..retriever import Document, DocumentUpdate, LoadError, Retriever, find_files, load_file
from ..storage.metadata import metadata_store
from ..storage.variants import forget_chunks
from .neighbour_variants import index_neighbours, store_neighbour_variants


@dataclass(frozen=True)
class IngestConfig:
    """How KV is precomputed during ingestion."""

    compute_kv: bool = True  # False: only catalog + index (KV is then computed on first use)
    kv_batch_tokens: int = 2048  # chunk tokens per precompute batch, stored as soon as it is computed
    max_tokens_per_pass: int = 2048  # prepacking budget of one forward pass (0 = one chunk per pass)
    documents_per_batch: int = 32  # documents chunked and embedded together (each still committed alone)
    save_every_documents: int = 200  # also save the faiss index this often (it is rebuilt if stale anyway)
    progress: bool = True
    # k > 0: each new chunk's KV also after its k nearest chunks of the corpus (FusionRAG, neighbour_variants.py):
    # focus loads it. About (k + 1)x the KV compute of ingestion and a second entry per chunk; 0 = off
    neighbour_variants: int = 2
    variant_limit: int = 2  # KV variants kept per chunk (as blend.craft_variants)


@dataclass(frozen=True)
class IngestError:
    """One file (or JSONL line, or document) that was not ingested, and why."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}{f':{self.line}' if self.line is not None else ''}: {self.message}"


@dataclass(frozen=True)
class IngestReport:
    """Counts of one ingestion run."""

    documents_added: int = 0
    documents_replaced: int = 0
    documents_unchanged: int = 0
    tokens: int = 0  # document tokens seen (added, replaced or unchanged)
    chunks: int = 0  # chunk occurrences in those documents
    chunks_new: int = 0  # distinct chunks new to the catalog (the rest were deduplicated)
    kv_computed: int = 0  # chunk KVs precomputed and stored
    kv_cached: int = 0  # chunk KVs the store already had
    kv_tokens: int = 0  # tokens precomputed
    kv_seconds: float = 0.0
    seconds: float = 0.0
    invalidated: tuple[ChunkKey, ...] = ()  # keys whose KV was dropped (documents replaced)
    neighbour_variants: int = 0  # KV variants stored after nearest neighbours (IngestConfig.neighbour_variants)
    errors: tuple[IngestError, ...] = field(default=())

    @property
    def documents(self) -> int:
        return self.documents_added + self.documents_replaced + self.documents_unchanged

    def summary(self) -> str:
        rate = self.kv_tokens / self.kv_seconds if self.kv_seconds else 0.0
        return (
            f"{self.documents} documents ({self.documents_added} added, {self.documents_replaced} replaced, "
            f"{self.documents_unchanged} unchanged), {self.tokens} tokens, {self.chunks} chunks "
            f"({self.chunks_new} new); KV: {self.kv_computed} computed ({self.kv_tokens} tokens, {rate:.0f} tok/s), "
            f"{self.kv_cached} already cached; {len(self.invalidated)} keys invalidated; "
            f"{len(self.errors)} errors; {self.seconds:.1f}s"
        )


class Ingester:
    """Ingests files or documents into a retriever (catalog + index) and their chunk KV into a store."""

    def __init__(self, adapter, store, retriever: Retriever, config: IngestConfig | None = None) -> None:
        self.adapter = adapter
        self.store = store  # anything with lookup(keys) -> [tier | None], put(key, kv), remove(key)
        self.retriever = retriever
        self.config = config or IngestConfig()

    def ingest(self, paths: Sequence[str | Path]) -> IngestReport:
        """Ingest files and folders (.txt .md .html .pdf .jsonl); bad files are reported, the rest ingest."""
        files = list(find_files(paths))
        errors = [IngestError(f.path, f.message) for f in files if isinstance(f, LoadError)]
        files = [f for f in files if not isinstance(f, LoadError)]
        max_bytes = self.retriever.config.max_document_bytes

        def documents() -> Iterable[Document | LoadError]:
            for f in files:
                yield from load_file(f, max_bytes)

        report = self.ingest_documents(documents())
        return replace(report, errors=tuple(errors) + report.errors)

    def ingest_documents(self, docs: Iterable[Document | LoadError]) -> IngestReport:
        """Ingest documents (LoadError items are recorded as errors); see the module docstring."""
        return deque(self.ingest_steps(docs), maxlen=1)[0]  # the last step is the report

    def ingest_steps(self, docs: Iterable[Document | LoadError]) -> Iterator[IngestReport | None]:
        """`ingest_documents` in steps: yields None after each document and each KV batch, then the report.
        Closing the generator early stops the run; what was committed stays (and the index is saved)."""
        t0 = time.perf_counter()
        run = _Run(self)
        try:
            for doc in docs:
                if isinstance(doc, LoadError):
                    run.errors.append(IngestError(doc.path, doc.message, doc.line))
                else:
                    run.add(doc)
                yield None
                while run.pending_tokens >= self.config.kv_batch_tokens:
                    run.flush_batch()
                    yield None
            run.add_batch()
            while run.pending:
                run.flush_batch()
                yield None
            run.store_neighbour_variants()  # after every chunk is indexed: neighbours come from the whole corpus
        finally:
            run.close()
        yield run.report(time.perf_counter() - t0)

    def remove(self, doc_ids: Sequence[str]) -> tuple[ChunkKey, ...]:
        """Delete documents from catalog and index, and their orphaned chunks' KV, metadata and KV variants
        (theirs and those computed after them) from the store."""
        dropped: list[ChunkKey] = []
        for doc_id in doc_ids:
            keys = self.retriever.remove_document(doc_id)
            if keys is None:
                raise ValueError(f"no document with id {doc_id!r} in the catalog")
            for key in keys:
                self.store.remove(key)
            forget_chunks(self.store, metadata_store(self.store), keys)
            dropped.extend(keys)
        self.retriever.save()
        return tuple(dropped)


class _Run:
    """The state of one `ingest_documents` call: counters, the pending KV batch, progress bars."""

    def __init__(self, ing: Ingester) -> None:
        self.ing = ing
        self.counts = dict(
            documents_added=0,
            documents_replaced=0,
            documents_unchanged=0,
            tokens=0,
            chunks=0,
            chunks_new=0,
            kv_computed=0,
            kv_cached=0,
            kv_tokens=0,
        )
        self.kv_seconds = 0.0
        self.errors: list[IngestError] = []
        self.invalidated: list[ChunkKey] = []
        self.batch: list[Document] = []
        self.pending: dict[ChunkKey, tuple[int, ...]] = {}
        self.computed: dict[ChunkKey, tuple[int, ...]] = {}  # chunks whose KV this run computed
        self.neighbour_variants = 0
        self.pending_tokens = 0
        self.since_save = 0
        # ONE bar (nested bars garble logs), drawn only on a terminal (disable=None: off when not a TTY)
        self.bar = tqdm(desc="ingesting", unit="doc", disable=True if not ing.config.progress else None)
        self.kv_total = 0

    def add(self, doc: Document) -> None:
        limit = self.ing.retriever.config.max_document_bytes
        size = len(doc.text.encode())
        if size > limit:
            self.errors.append(
                IngestError(
                    doc.source or doc.id,
                    f"document {doc.id!r} of {size} bytes is over the limit of {limit} bytes (max_document_bytes)",
                )
            )
            return
        self.batch.append(doc)
        if len(self.batch) >= self.ing.config.documents_per_batch:
            self.add_batch()

    def add_batch(self) -> None:
        """Chunk, embed and commit the buffered documents, then queue their missing KV."""
        docs, self.batch = self.batch, []
        if not docs:
            return
        for doc, update in zip(docs, self.ing.retriever.add_documents(docs)):
            if isinstance(update, ValueError):
                self.errors.append(IngestError(doc.source or doc.id, str(update)))
            else:
                self._count(update)

    def _count(self, update: DocumentUpdate) -> None:
        self.counts[f"documents_{update.status}"] += 1
        self.counts["tokens"] += update.num_tokens
        self.counts["chunks"] += len(update.chunks)
        self.counts["chunks_new"] += update.new_chunks
        for key in update.invalidated:
            self.ing.store.remove(key)
            if self.pending.pop(key, None) is not None:
                self.pending_tokens = sum(map(len, self.pending.values()))
        if update.invalidated:
            forget_chunks(self.ing.store, metadata_store(self.ing.store), update.invalidated)
        self.invalidated.extend(update.invalidated)
        self.bar.update(1)
        self._postfix()
        self.since_save += 1
        if self.since_save >= self.ing.config.save_every_documents:
            self.ing.retriever.save()
            self.since_save = 0
        if self.ing.config.compute_kv:
            self._queue(update.chunks)

    def _queue(self, chunks) -> None:
        fresh = {k: ids for k, ids in chunks if k not in self.pending}
        keys = list(fresh)
        for key, tier in zip(keys, self.ing.store.lookup(keys) if keys else []):
            if tier is not None:
                self.counts["kv_cached"] += 1
            else:
                self.pending[key] = fresh[key]
                self.pending_tokens += len(fresh[key])
                self.kv_total += len(fresh[key])
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix(tokens=self.counts["tokens"], kv_tokens=f"{self.counts['kv_tokens']}/{self.kv_total}")

    def flush_batch(self) -> None:
        """Precompute the oldest pending chunks, up to `kv_batch_tokens` (at least one chunk), and store them."""
        if not self.pending:
            return
        keys, ids, n = [], [], 0
        for key, chunk_ids in self.pending.items():
            if keys and n + len(chunk_ids) > self.ing.config.kv_batch_tokens:
                break
            keys.append(key)
            ids.append(chunk_ids)
            n += len(chunk_ids)
        t = time.perf_counter()
        lead_in = self.ing.retriever.lead_in.ids
        kvs = precompute_many(self.ing.adapter, ids, self.ing.config.max_tokens_per_pass, lead_in)
        for key, kv, chunk_ids in zip(keys, kvs, ids):
            self.ing.store.put(key, kv, durable=True)
            if self.ing.config.neighbour_variants:
                self.computed[key] = chunk_ids
        self.kv_seconds += time.perf_counter() - t
        self.counts["kv_computed"] += len(keys)
        self.counts["kv_tokens"] += n
        self._postfix()
        for key in keys:
            del self.pending[key]
        self.pending_tokens -= n

    def store_neighbour_variants(self) -> None:
        """With `neighbour_variants = k`: each chunk computed in this run, also after its k nearest chunks."""
        cfg = self.ing.config
        ing = self.ing
        stored = store_neighbour_variants(
            ing.adapter,
            ing.store,
            index_neighbours(ing.retriever),
            self.computed,
            cfg.neighbour_variants,
            cfg.variant_limit,
            ing.retriever.config.namespace,
            ing.retriever.lead_in.ids,  # chunk KV's lead-in: the prompt template's prefix, or None (sink)
            ing.retriever.lead_in.separator,
            cfg.max_tokens_per_pass,
        )
        self.neighbour_variants += len(stored)
        self.computed = {}

    def close(self) -> None:
        self.ing.retriever.save()  # also after an interruption: the catalog is already committed
        self.bar.close()

    def report(self, seconds: float) -> IngestReport:
        return IngestReport(
            **self.counts,
            kv_seconds=self.kv_seconds,
            seconds=seconds,
            invalidated=tuple(self.invalidated),
            neighbour_variants=self.neighbour_variants,
            errors=tuple(self.errors),
        )
