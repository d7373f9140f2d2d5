"""VectorIndex: the faiss index over chunk embeddings, keyed by the catalog's chunk ids.

Exact inner product (`flat`) by default; `ivf` or `hnsw` for large corpora. The index is a cache of
the catalog's embeddings: it is saved with the catalog generation it reflects, and a stale or
missing file is rebuilt from the catalog (see `Retriever.open`), so the two never disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import faiss
import numpy as np

from .config import RetrieverConfig

IVF_MIN_VECTORS = 256  # fewer vectors than this: an IVF index would be all overhead, use flat


class VectorIndex:
    """A faiss IndexIDMap2 over flat / IVF / HNSW inner-product storage."""

    def __init__(self, dim: int, config: RetrieverConfig | None = None) -> None:
        self.dim = dim
        self.config = config or RetrieverConfig()
        self.generation = -1  # catalog generation this index reflects
        self.stale = False  # True when a removal could not be applied in place (HNSW)
        self.built_kind = "flat"
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._trained_on = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with `vectors` [N, dim] under `ids` [N] (trains IVF on them)."""
        kind, n = self.config.index_kind, len(ids)
        if kind == "ivf" and n >= IVF_MIN_VECTORS:
            nlist = self.config.ivf_nlist or max(1, int(4 * math.sqrt(n)))
            nlist = min(nlist, max(1, n // 39))  # faiss wants about 39 training points per list
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(np.ascontiguousarray(vectors, dtype=np.float32))
            inner.nprobe = self.config.ivf_nprobe
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.config.hnsw_ef_construction
            inner.hnsw.efSearch = self.config.hnsw_ef_search
            kind = "hnsw"
        else:
            inner, kind = faiss.IndexFlatIP(self.dim), "flat"
        self.index, self.built_kind, self._trained_on, self.stale = faiss.IndexIDMap2(inner), kind, n, False
        if n:
            self.add(ids, vectors)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add `vectors` [N, dim] under `ids` [N]."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [N, dim]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape [N, {self.dim}], got {vectors.shape}")
        self.index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Drop `ids`; an HNSW index cannot remove in place and is marked stale (rebuild it)."""
        if len(ids) == 0:
            return
        if self.built_kind == "hnsw":
            self.stale = True
            return
        self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def needs_rebuild(self) -> bool:
        """Stale after a removal, or an IVF index whose corpus outgrew (or never reached) its training."""
        if self.stale:
            return True
        if self.config.index_kind != "ivf":
            return self.config.index_kind != self.built_kind
        n = self.ntotal
        if self.built_kind != "ivf":
            return n >= IVF_MIN_VECTORS
        return n > 4 * self._trained_on

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids [Q, k] of the best `k` per query [Q, dim]; missing hits have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # [Q, dim]
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        if self.ntotal == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(queries, k)

    def describe(self) -> str:
        """The built structure and its search parameters, e.g. `ivf nlist=206 nprobe=8`."""
        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexIVF):
            return f"ivf nlist={inner.nlist} nprobe={inner.nprobe}"
        if isinstance(inner, faiss.IndexHNSW):
            return f"hnsw M={self.config.hnsw_m} efSearch={inner.hnsw.efSearch}"
        return "flat (exact)"

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `path` (faiss) and `path.json` (manifest) atomically, the manifest last."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = faiss.serialize_index(self.index).tobytes()
        unique = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # several processes may save the same index
        tmp = path.with_name(path.name + unique)
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        manifest = dict(
            sha256=hashlib.sha256(blob).hexdigest(),  # pairs the manifest with exactly this index file
            dim=self.dim,
            built_kind=self.built_kind,
            ntotal=self.ntotal,
            generation=self.generation,
            trained_on=self._trained_on,
            stale=self.stale,
        )
        tmp_json = path.with_name(path.name + ".json" + unique)
        tmp_json.write_text(json.dumps(manifest))
        os.replace(tmp_json, path.with_name(path.name + ".json"))

    @classmethod
    def load(cls, path: str | Path, config: RetrieverConfig | None = None) -> VectorIndex | None:
        """The saved index, or None if it is missing, unreadable or its manifest does not match it."""
        path = Path(path)
        manifest_path = path.with_name(path.name + ".json")
        try:
            manifest = json.loads(manifest_path.read_text())
            blob = path.read_bytes()
            if manifest.get("sha256") != hashlib.sha256(blob).hexdigest():
                return None  # another process replaced one of the pair meanwhile (or an older layout)
            index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except (OSError, ValueError, RuntimeError, AttributeError):
            return None
        if index.ntotal != manifest.get("ntotal") or index.d != manifest.get("dim"):
            return None
        out = cls(int(manifest["dim"]), config)
        out.index, out.built_kind = index, manifest["built_kind"]
        out.generation, out._trained_on = int(manifest["generation"]), int(manifest["trained_on"])
        out.stale = bool(manifest.get("stale", False))
        inner = faiss.downcast_index(index.index) if hasattr(index, "index") else None
        if isinstance(inner, faiss.IndexIVF):
            inner.nprobe = out.config.ivf_nprobe
        elif isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = out.config.hnsw_ef_search
        return out
