"""DocumentService: the Engine's per-namespace documents in the shapes the HTTP API and the plugins use.

Each namespace (tenant) has its own catalog and faiss index (`Engine.retriever(namespace)`: the
default namespace's in the data dir, where `ragkv ingest` writes, others in `tenants/NAMESPACE`), and
its chunk keys carry the namespace, so one tenant can neither retrieve nor hit another's chunks.
Everything here runs on the model worker thread (it uses the model and SQLite); `ingest_steps` is
ingestion in small steps (one document, or one KV batch of `SERVER_KV_BATCH_TOKENS`) so the worker
can serve other tenants between them and stop when the client is gone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from ..retriever import CatalogUnavailable

SERVER_KV_BATCH_TOKENS = 512  # one step of a server-side ingestion: about one chunk's forward pass


class RetrievalUnavailable(RuntimeError):
    """The Engine has no document index (an engine without `retriever`)."""


class UnknownChunks(LookupError):
    """Chunk ids that the namespace's catalog does not hold (the HTTP API answers 404)."""


class DocumentService:
    """Ingest, look up, delete and search documents of one namespace at a time, through the Engine."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def available(self) -> bool:
        return hasattr(self.engine, "retriever")

    def retriever(self, namespace: str):
        """The namespace's Retriever (opened, or created empty, on first use)."""
        if not self.available:
            raise RetrievalUnavailable("this engine has no document index (Engine.retriever)")
        return self.engine.retriever(namespace)

    def ingest(self, namespace: str, documents: Sequence[dict]) -> dict:
        """Add (or replace) `documents` ({id, text, metadata}) and precompute their chunk KV; a report dict."""
        return deque(self.ingest_steps(namespace, documents), maxlen=1)[0]  # the last step is the report

    def ingest_steps(self, namespace: str, documents: Sequence[dict]) -> Iterator[dict | None]:
        """`ingest` in steps: None after each document and KV batch, then the report dict."""
        from ..engine.ingest import IngestConfig, Ingester
        from ..retriever import Document

        docs = [Document(d["id"], d["text"], dict(d.get("metadata") or {}), "api") for d in documents]
        retriever = self.retriever(namespace)
        if not (hasattr(self.engine, "model") and hasattr(self.engine, "store")):
            yield self._report(self.engine.ingest(documents=docs, namespace=namespace))
            return
        config = IngestConfig(progress=False, documents_per_batch=1, kv_batch_tokens=SERVER_KV_BATCH_TOKENS)
        for step in Ingester(self.engine.model, self.engine.store, retriever, config).ingest_steps(docs):
            yield None if step is None else self._report(step)

    @staticmethod
    def _report(report) -> dict:
        return {
            "documents": report.documents,
            "added": report.documents_added,
            "replaced": report.documents_replaced,
            "unchanged": report.documents_unchanged,
            "chunks": report.chunks,
            "kv_computed": report.kv_computed,
            "kv_cached": report.kv_cached,
            "errors": [str(e) for e in report.errors],
            "seconds": report.seconds,
        }

    def get(self, namespace: str, doc_id: str) -> dict | None:
        """The document's catalog record and chunks, or None."""
        catalog = self.retriever(namespace).catalog
        doc = catalog.document(doc_id)
        if doc is None:
            return None
        rows = catalog.chunks([cid for cid, _, _ in doc.chunks])
        chunks = [
            {"chunk_id": cid, "key": key, "num_tokens": len(rows[cid].token_ids) if cid in rows else None}
            for cid, key, _ in doc.chunks
        ]
        return {"id": doc.id, "metadata": doc.metadata, "num_tokens": doc.num_tokens, "chunks": chunks}

    def delete(self, namespace: str, doc_id: str) -> list[str] | None:
        """Remove the document and the KV of chunks no other document uses; the dropped keys, or None."""
        if self.retriever(namespace).catalog.document(doc_id) is None:
            return None
        return [str(k) for k in self.engine.remove_documents([doc_id], namespace=namespace)]

    def search(self, namespace: str, query: str, k: int) -> list:
        """The namespace's `k` best chunks for `query` (RetrievedChunk objects)."""
        self.retriever(namespace)
        return self.engine.retrieve(query, k, namespace=namespace)

    def chunk_ids(self, namespace: str, chunk_ids: Sequence[int]) -> list[list[int]]:
        """Token ids of ingested chunks by catalog id; an UnknownChunks names the unknown ids."""
        catalog = self.retriever(namespace).catalog
        rows = catalog.chunks(list(chunk_ids))
        unknown = [c for c in chunk_ids if c not in rows]
        if unknown and not getattr(catalog, "reachable", True):  # not read before the catalog went down
            raise CatalogUnavailable(f"documents: chunk_id {unknown} cannot be read while the catalog is unreachable")
        if unknown:
            raise UnknownChunks(f"documents: unknown chunk_id {unknown} in this namespace; use ids from /v1/retrieve")
        return [list(rows[c].token_ids) for c in chunk_ids]
