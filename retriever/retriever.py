"""Retriever: the facade over chunker, embedder, catalog and faiss index that the Engine calls
(or, when the catalog is PostgreSQL with pgvector, the index shared in that database: PgVectorIndex).

`Retriever.open(data_dir, model)` opens (or creates) the catalog and index of a data directory for
one model's tokenizer; `add_document` chunks, embeds and indexes a text; `remove_document` drops it
and names the chunk keys whose KV is now invalid; `search(query, k)` returns `RetrievedChunk`s.
A search needs no model: hits carry the keys the catalog stored at ingest, and the question is
embedded by the embedder alone. `Retriever.open(data_dir, None, embedder=search_embedder(config))`
opens a search-only retriever (`ragkv retrieve`: no LLM, no torch); it checks the catalog's embedder,
not its model, and refuses to add documents (their keys need the model's fingerprint).

The catalog is the truth and may be shared by several processes (a server and `ragkv ingest` on one
data dir): the in-memory index records the namespace generation it reflects, follows its own writes
incrementally, and is rebuilt from the catalog when another process has written (checked before each
search and each save), so a saved index is never stamped with a generation it does not contain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..chunk_cache import ChunkKey, LeadIn
from .catalog import Catalog, NewChunk
from .catalog_link import CatalogLink, CatalogUnavailable, GuardedCatalog
from .chunker import Chunker
from .config import RetrieverConfig
from .embedder import Embedder, HFEmbedder
from .index import VectorIndex
from .journal import DocumentJournal
from .loaders import Document
from .pgvector_index import PgVectorIndex

log = logging.getLogger(__name__)


class TokenizedModel(Protocol):
    """What the retriever needs of a model: its tokenizer and the fingerprints chunk keys are made of."""

    tokenizer: object
    fingerprint: str
    tokenizer_fingerprint: str


@dataclass(frozen=True)
class RetrievedChunk:
    """One search hit: the chunk's catalog id, first document (and position there), score, text, ids, key."""

    chunk_id: int
    doc_id: str
    score: float
    text: str
    token_ids: tuple[int, ...]
    key: ChunkKey
    position: int = 0


@dataclass(frozen=True)
class DocumentUpdate:
    """What `add_document` did: status added | replaced | unchanged, the chunks (key, ids) in order,
    how many chunk rows were new to the catalog, and keys no document uses any more."""

    doc_id: str
    status: str
    num_tokens: int
    chunks: tuple[tuple[ChunkKey, tuple[int, ...]], ...]
    new_chunks: int
    invalidated: tuple[ChunkKey, ...] = ()


class Retriever:
    """Documents -> chunks -> embeddings -> faiss, with the catalog as the source of truth."""

    def __init__(
        self,
        model: TokenizedModel | None,
        catalog: Catalog,
        embedder: Embedder,
        index_path: str | Path,
        config: RetrieverConfig | None = None,
        journal: DocumentJournal | None = None,
        lead_in: LeadIn | None = None,
    ) -> None:
        self.config = config or RetrieverConfig()
        self.journal = journal
        self.lead_in = lead_in or LeadIn()  # what the chunks' KV is computed after (their keys depend on it)
        self.model = model
        self.catalog = catalog
        self.embedder = embedder
        self.chunker = Chunker(model.tokenizer, self.config) if model is not None else None  # None: search only
        self.index_path = Path(index_path)
        models = {} if model is None else dict(tokenizer=model.tokenizer_fingerprint, model=model.fingerprint)
        catalog.bind(**models, embedder=f"{embedder.name}/{embedder.dim}")
        self.index = self._load_or_rebuild()
        # documents rebuilt from the journal into an empty catalog (a search-only retriever leaves it to the next)
        self.recovered = self._recover() if model is not None else 0

    @classmethod
    def open(
        cls,
        data_dir: str | Path,
        model: TokenizedModel | None,
        config: RetrieverConfig | None = None,
        embedder: Embedder | None = None,
        catalog_url: str | None = None,
        link: CatalogLink | None = None,
        lead_in: LeadIn | None = None,
    ) -> Retriever:
        """The retriever of `data_dir`: catalog `catalog.sqlite` (or `catalog_url`), index `index/chunks.faiss`.
        With `link` (a network database), the catalog's calls go through it: CatalogUnavailable while the
        database is unreachable, and searches answer from the local index (catalog_link.py)."""
        config = config or RetrieverConfig()
        data_dir = Path(data_dir).expanduser()
        url = catalog_url or f"sqlite:///{data_dir / 'catalog.sqlite'}"
        journal = DocumentJournal.beside(url)
        catalog = Catalog(url, config.namespace) if link is None else link.run(lambda: Catalog(url, config.namespace))
        if embedder is None:  # loaded only once the catalog opened (an outage retries without loading it)
            embedder = HFEmbedder(config.embedder_path, config.embed_batch_size, config.embed_max_length)
        if link is None:
            return cls(model, catalog, embedder, data_dir / "index" / "chunks.faiss", config, journal, lead_in)
        guarded = GuardedCatalog(catalog, link)
        index = data_dir / "index" / "chunks.faiss"
        try:
            return link.run(lambda: cls(model, guarded, embedder, index, config, lead_in=lead_in))
        except CatalogUnavailable:
            catalog.close()  # opened on a later call, with a pool of its own
            raise

    def key(self, token_ids: Sequence[int]) -> ChunkKey:
        """The store key of a chunk's ids (the engine's chunk supply keys them alike: one `LeadIn`)."""
        return self.lead_in.key(self.model, token_ids, self.config.namespace)  # type: ignore[arg-type]

    # -- writes ----------------------------------------------------------------------------------
    def add_document(self, doc_id: str, text: str, metadata: dict | None = None, source: str = "") -> DocumentUpdate:
        """Chunk, embed and index `text` as `doc_id` (replacing an older version; unchanged is a no-op)."""
        (result,) = self.add_documents([Document(doc_id, text, dict(metadata or {}), source)])
        if isinstance(result, ValueError):
            raise result
        return result

    def add_documents(self, docs: Sequence[Document]) -> list[DocumentUpdate | ValueError]:
        """`add_document` for several documents with one embedding batch; each is committed on its own
        (and then journaled), and a document that cannot be added gets a ValueError in its place."""
        results = self._add_documents(docs)
        if self.journal is not None:
            self.journal.record(
                d for d, r in zip(docs, results) if isinstance(r, DocumentUpdate) and r.status != "unchanged"
            )
        return results

    def _add_documents(self, docs: Sequence[Document]) -> list[DocumentUpdate | ValueError]:
        if self.chunker is None:
            raise ValueError("this retriever was opened for search only (no model): open it with the model to add")
        results: list[DocumentUpdate | ValueError | None] = [None] * len(docs)
        staged = []
        for n, d in enumerate(docs):
            digest = self._content_hash(d.text, d.metadata)
            old = self.catalog.document(d.id)
            if old is not None and old.content_hash == digest:
                rows = self.catalog.chunks([i for i, _, _ in old.chunks])
                chunks = tuple((ChunkKey.parse(k), rows[i].token_ids) for i, k, _ in old.chunks)
                results[n] = DocumentUpdate(d.id, "unchanged", old.num_tokens, chunks, 0)
                continue
            pieces = self.chunker.split(d.text)
            if not pieces:
                results[n] = ValueError(f"document {d.id!r} has no tokens (empty or whitespace only)")
                continue
            staged.append((n, d, digest, old, pieces, [str(self.key(p.token_ids)) for p in pieces]))
        known = self.catalog.known_keys([k for *_, keys in staged for k in keys])
        todo = {k: p.text for *_, pieces, keys in staged for p, k in zip(pieces, keys) if k not in known}
        vec_of = dict(zip(todo, self.embedder.embed(list(todo.values())))) if todo else {}  # one vector per new chunk
        for n, d, digest, old, pieces, keys in staged:
            lacking = {k for k in keys if k not in vec_of}
            lacking -= self.catalog.known_keys(sorted(lacking))  # dropped meanwhile by a replaced document
            if lacking:
                texts = {k: p.text for p, k in zip(pieces, keys) if k in lacking}
                vec_of.update(zip(texts, self.embedder.embed(list(texts.values()))))
            new = [NewChunk(k, p.token_ids, p.text, p.overlap, vec_of.get(k)) for k, p in zip(keys, pieces)]
            change = self.catalog.put_document(d.id, d.source, digest, d.metadata, pieces[-1].end, new)
            self._apply(change)
            results[n] = DocumentUpdate(
                d.id,
                "added" if old is None else "replaced",
                pieces[-1].end,
                tuple((ChunkKey.parse(k), p.token_ids) for k, p in zip(keys, pieces)),
                len(change.added_ids),
                tuple(ChunkKey.parse(k) for k in change.removed_keys),
            )
        return results  # type: ignore[return-value]

    def remove_document(self, doc_id: str) -> tuple[ChunkKey, ...] | None:
        """Drop `doc_id`; the keys of its chunks no other document contains (their KV is invalid). None if absent."""
        change = self.catalog.remove_document(doc_id)
        if change is None:
            return None
        if self.journal is not None:
            self.journal.record_removal(doc_id)
        self._apply(change)
        return tuple(ChunkKey.parse(k) for k in change.removed_keys)

    def save(self) -> None:
        """Persist the index beside the catalog (rebuilt first if it went stale or another process wrote)."""
        self.refresh()
        self.index.save(self.index_path)

    def refresh(self) -> bool:
        """Rebuild the index from the catalog if it is stale or misses another process's writes; True if it did."""
        if self.index.needs_rebuild() or self.index.generation != self.catalog.generation:
            self._rebuild()
            return True
        return False

    # -- reads -----------------------------------------------------------------------------------
    def search(self, query: str, k: int = 10) -> list[RetrievedChunk]:
        """The `k` chunks most similar to `query`, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 10) -> list[list[RetrievedChunk]]:
        """`search` for several queries with one embedding batch."""
        if k <= 0:
            raise ValueError(f"k must be >= 1, got {k}")
        try:
            self.refresh()
        except CatalogUnavailable:
            pass  # the catalog's database is unreachable: search the local index as it is
        vectors = self.embedder.embed(list(queries))
        link = getattr(self.catalog, "link", None)
        if isinstance(self.index, PgVectorIndex) and link is not None:  # the index lives in that database
            scores, ids = link.run(lambda: self.index.search(vectors, k))
        else:
            scores, ids = self.index.search(vectors, k)  # [Q, k] each
        rows = self.catalog.chunks(sorted({int(i) for i in ids.flatten() if i >= 0}))
        return [
            [
                RetrievedChunk(
                    int(i),
                    rows[i].doc_id,
                    float(s),
                    rows[i].text,
                    rows[i].token_ids,
                    ChunkKey.parse(rows[i].key),
                    rows[i].position,
                )
                for s, i in zip(srow, irow)
                if i >= 0 and int(i) in rows
            ]
            for srow, irow in zip(scores, ids)
        ]

    def chunk_keys(self) -> list[ChunkKey]:
        """The key of every chunk in the catalog (what the store should hold KV for)."""
        return [ChunkKey.parse(k) for k in self.catalog.chunk_keys()]

    def close(self) -> None:
        self.catalog.close()

    # -- internals -------------------------------------------------------------------------------
    def _content_hash(self, text: str, metadata: dict) -> str:
        c = self.config
        h = hashlib.sha256(f"{c.chunk_min_tokens},{c.chunk_max_tokens},{c.overlap_tokens}\0".encode())
        h.update(json.dumps(metadata, sort_keys=True, default=str).encode() + b"\0" + text.encode())
        return h.hexdigest()

    def _apply(self, change) -> None:
        """Follow our own write in place; if another process wrote in between, leave the index's older
        generation so the next search or save rebuilds it from the catalog."""
        if self.index.generation != change.generation - 1:
            return
        self.index.remove(change.removed_ids)
        self.index.add(change.added_ids, change.added_vectors)
        self.index.generation = change.generation

    def _recover(self) -> int:
        """An empty catalog beside a journal that has documents (the damaged catalog was moved aside):
        rebuild them; the journal is then compacted. Returns how many documents were recovered."""
        if self.journal is None:
            return 0
        docs = self.journal.documents()
        recovered = 0
        if docs and not self.catalog.document_ids():
            results = self._add_documents(docs)
            recovered = sum(isinstance(r, DocumentUpdate) for r in results)
            log.warning(
                "catalog %s had no documents: rebuilt %d of the %d documents of %s (their chunk KV is recomputed "
                "on first use where the disk tier did not keep it)",
                self.catalog.url,
                recovered,
                len(docs),
                self.journal.path,
            )
        self.journal.compact()
        return recovered

    def _load_or_rebuild(self) -> VectorIndex | PgVectorIndex:
        shared = PgVectorIndex.open(self.catalog.engine, self.embedder.dim, self.config)
        if shared is not None:  # PostgreSQL + pgvector: vectors and search live in the catalog database
            shared.sync(*self.catalog.embeddings())
            shared.generation = self.catalog.generation
            return shared
        index = VectorIndex.load(self.index_path, self.config)
        if (
            index is None
            or index.dim != self.embedder.dim
            or index.generation != self.catalog.generation
            or index.needs_rebuild()
        ):
            self.index = VectorIndex(self.embedder.dim, self.config)
            self._rebuild()
            self.index.save(self.index_path)
            return self.index
        return index

    def _rebuild(self) -> None:
        generation = self.catalog.generation  # read first: a write landing meanwhile leaves the index behind
        ids, vectors = self.catalog.embeddings()  # [N], [N, dim]
        self.index.build(ids, vectors if len(ids) else np.zeros((0, self.embedder.dim), np.float32))
        self.index.generation = generation
