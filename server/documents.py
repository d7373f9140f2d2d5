"""DocumentService: ingested documents per namespace (tenant) for the HTTP API and the plugins.

Each namespace has its own catalog and faiss index: the default namespace's in `index_dir` itself
(where `ragkv ingest` writes), any other's in `index_dir/tenants/NAMESPACE`; chunk keys carry the
namespace, so one tenant can neither retrieve nor hit another's chunks. Chunk KV goes to
the Engine's store. Everything here runs on the model worker thread (it uses the model and SQLite).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class RetrievalUnavailable(RuntimeError):
    """This build has no retrieval package (`ragkv.retriever`)."""


class DocumentService:
    """Ingest, look up, delete and search documents of one namespace at a time."""

    def __init__(self, engine, index_dir: str | Path, default_namespace: str = "default", chunk_min_tokens: int = 256,
                 chunk_max_tokens: int = 512) -> None:
        self.engine = engine
        self.index_dir = Path(index_dir).expanduser()
        self.default_namespace = default_namespace
        self.chunk_min_tokens = chunk_min_tokens
        self.chunk_max_tokens = chunk_max_tokens
        self._retrievers: dict = {}
        self._embedder = None

    @staticmethod
    def _api():
        try:
            from ..retriever import Document, Retriever, RetrieverConfig
            from .ingest import IngestConfig, Ingester
        except ImportError as err:
            raise RetrievalUnavailable(f"retrieval is not available in this build ({err})") from None
        return Document, Retriever, RetrieverConfig, IngestConfig, Ingester

    @property
    def available(self) -> bool:
        try:
            self._api()
            return True
        except RetrievalUnavailable:
            return False

    def retriever(self, namespace: str):
        """The namespace's Retriever (opened, or created empty, on first use)."""
        if namespace not in self._retrievers:
            _, Retriever, RetrieverConfig, _, _ = self._api()
            from ..retriever import HFEmbedder

            config = RetrieverConfig(namespace=namespace, chunk_min_tokens=self.chunk_min_tokens,
                                     chunk_max_tokens=self.chunk_max_tokens)
            if self._embedder is None:
                self._embedder = HFEmbedder(config.embedder_path, config.embed_batch_size, config.embed_max_length)
            folder = self.folder(namespace)
            folder.mkdir(parents=True, exist_ok=True)
            self._retrievers[namespace] = Retriever.open(folder, self.engine.model, config, embedder=self._embedder)
        return self._retrievers[namespace]

    def folder(self, namespace: str) -> Path:
        """Where the namespace's catalog and index live."""
        return self.index_dir if namespace == self.default_namespace else self.index_dir / "tenants" / namespace

    def ingest(self, namespace: str, documents: Sequence[dict]) -> dict:
        """Add (or replace) `documents` ({id, text, metadata}) and precompute their chunk KV; a report dict."""
        Document, _, _, IngestConfig, Ingester = self._api()
        ingester = Ingester(self.engine.model, self.engine.store, self.retriever(namespace), IngestConfig(progress=False))
        report = ingester.ingest_documents([Document(d["id"], d["text"], dict(d.get("metadata") or {}), "api")
                                            for d in documents])
        return {"documents": report.documents, "added": report.documents_added, "replaced": report.documents_replaced,
                "unchanged": report.documents_unchanged, "chunks": report.chunks, "kv_computed": report.kv_computed,
                "kv_cached": report.kv_cached, "errors": [str(e) for e in report.errors], "seconds": report.seconds}

    def get(self, namespace: str, doc_id: str) -> dict | None:
        """The document's catalog record and chunks, or None."""
        r = self.retriever(namespace)
        doc = r.catalog.document(doc_id)
        if doc is None:
            return None
        rows = r.catalog.chunks([cid for cid, _, _ in doc.chunks])
        chunks = [{"chunk_id": cid, "key": key, "num_tokens": len(rows[cid].token_ids) if cid in rows else None}
                  for cid, key, _ in doc.chunks]
        return {"id": doc.id, "metadata": doc.metadata, "num_tokens": doc.num_tokens, "chunks": chunks}

    def delete(self, namespace: str, doc_id: str) -> list[str] | None:
        """Remove the document and the KV of chunks no other document uses; the dropped keys, or None."""
        r = self.retriever(namespace)
        if r.catalog.document(doc_id) is None:
            return None
        _, _, _, _, Ingester = self._api()
        return [str(k) for k in Ingester(self.engine.model, self.engine.store, r).remove([doc_id])]

    def search(self, namespace: str, query: str, k: int) -> list:
        """The namespace's `k` best chunks for `query` (RetrievedChunk objects)."""
        return self.retriever(namespace).search(query, k)

    def chunk_ids(self, namespace: str, chunk_ids: Sequence[int]) -> list[list[int]]:
        """Token ids of ingested chunks by catalog id; a ValueError names the unknown ids."""
        rows = self.retriever(namespace).catalog.chunks(list(chunk_ids))
        unknown = [c for c in chunk_ids if c not in rows]
        if unknown:
            raise ValueError(f"documents: unknown chunk_id {unknown} in this namespace; use ids from /v1/retrieve")
        return [list(rows[c].token_ids) for c in chunk_ids]

    def close(self) -> None:
        for r in self._retrievers.values():
            r.save()
            r.close()
        self._retrievers.clear()
