"""Chunk metadata: what a chunk showed when it was last computed in context, kept beside its KV.

Per chunk key (hence per model fingerprint, tokenizer and namespace): its cache context impact (CCI,
how much it attends to the chunks before it), the ranking of its tokens by attention to those chunks
(most context-dependent first, a compact uint16/uint32 blob, not per-token rows), and the keys of the
chunks that preceded it; and which KV variants of it are stored (`storage/variants.py`: a
`VariantRecord` per variant). A store with a disk tier keeps it in that tier's SQL catalog database
(tables `ragkv_chunk_metadata`, `ragkv_chunk_variants`); a memory-only store keeps it in memory.
The store's services own it (`store.services.metadata`, storage/services.py); `metadata_store(store)`
is the same thing.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import sqlalchemy as sa

from ..chunk_cache import ChunkKey
from .schema import create_tables
from .sql import sql_engine
from .variants import VariantRecord

_META = sa.MetaData()
METADATA = sa.Table(
    "ragkv_chunk_metadata",
    _META,
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("cci", sa.Float, nullable=False),
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("ranking", sa.LargeBinary, nullable=False),
    sa.Column("preceding", sa.Text, nullable=False),  # JSON list of "namespace/digest"
)
VARIANTS = sa.Table(
    "ragkv_chunk_variants",
    _META,
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("base", sa.String(160), nullable=False, index=True),
    sa.Column("preceding", sa.Text, nullable=False),  # JSON list of "namespace/digest"
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("compute_saved", sa.Float, nullable=False),
    sa.Column("reuses", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)


@dataclass(frozen=True, eq=False)
class ChunkMetadata:
    """What one context pass learned about a chunk."""

    cci: float  # cache context impact in [0, 1): 0 = attends only within itself
    ranking: np.ndarray  # [T] token indices, most attention to preceding chunks first
    preceding: tuple[ChunkKey, ...]  # the chunks before it in that context, in prompt order

    def __post_init__(self) -> None:
        if not (0.0 <= self.cci <= 1.0):
            raise ValueError(f"cci must be within [0, 1], got {self.cci}")
        r = np.asarray(self.ranking)
        if r.ndim != 1 or r.size == 0 or sorted(r.tolist()) != list(range(r.size)):
            raise ValueError("ranking must be a permutation of the chunk's token indices 0..T-1")

    @property
    def num_tokens(self) -> int:
        return int(self.ranking.shape[0])

    def ranking_blob(self) -> bytes:
        dtype = np.uint16 if self.num_tokens <= 1 << 16 else np.uint32
        return np.asarray(self.ranking, dtype=dtype).tobytes()

    @classmethod
    def from_blob(cls, cci: float, num_tokens: int, blob: bytes, preceding: Sequence[ChunkKey]) -> ChunkMetadata:
        dtype = np.uint16 if num_tokens <= 1 << 16 else np.uint32
        ranking = np.frombuffer(blob, dtype=dtype).astype(np.int64)
        if ranking.shape[0] != num_tokens:
            raise ValueError(f"metadata ranking holds {ranking.shape[0]} tokens, the row says {num_tokens}")
        return cls(float(cci), ranking, tuple(preceding))


class MetadataStore(ABC):
    """Chunk metadata by key; `put` replaces what was there. Variant records by base key."""

    @abstractmethod
    def get_many(self, keys: Sequence[ChunkKey]) -> list[ChunkMetadata | None]: ...

    @abstractmethod
    def put(self, key: ChunkKey, metadata: ChunkMetadata) -> None: ...

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def get(self, key: ChunkKey) -> ChunkMetadata | None:
        return self.get_many([key])[0]

    @abstractmethod
    def variants_of(self, bases: Sequence[ChunkKey]) -> list[list[VariantRecord]]:
        """Per base key, the records of its stored variants (oldest first)."""

    @abstractmethod
    def put_variant(self, record: VariantRecord) -> None:
        """Add or replace the record of `record.key`."""

    @abstractmethod
    def drop_variants(self, keys: Sequence[ChunkKey]) -> None:
        """Forget the records of these variant keys."""

    @abstractmethod
    def count_reuses(self, keys: Sequence[ChunkKey]) -> None:
        """One more reuse for each of these variant keys (unknown keys are ignored)."""

    @abstractmethod
    def variants_involving(self, keys: Sequence[ChunkKey]) -> list[VariantRecord]:
        """The records of variants whose base is one of `keys` or whose preceding chunks include one."""

    def close(self) -> None:
        """Release the database connections (none in memory)."""


class MemoryMetadata(MetadataStore):
    """In-process metadata (a memory-only store)."""

    def __init__(self) -> None:
        self._rows: dict[ChunkKey, ChunkMetadata] = {}
        self._variants: dict[ChunkKey, VariantRecord] = {}
        self._lock = threading.Lock()

    def get_many(self, keys):
        with self._lock:
            return [self._rows.get(k) for k in keys]

    def put(self, key, metadata):
        with self._lock:
            self._rows[key] = metadata

    def delete(self, keys):
        with self._lock:
            for k in keys:
                self._rows.pop(k, None)

    def variants_of(self, bases):
        with self._lock:
            ordered = sorted(self._variants.values(), key=lambda r: (r.created, str(r.key)))
            return [[r for r in ordered if r.base == b] for b in bases]

    def put_variant(self, record):
        with self._lock:
            self._variants[record.key] = record

    def drop_variants(self, keys):
        with self._lock:
            for k in keys:
                self._variants.pop(k, None)

    def count_reuses(self, keys):
        with self._lock:
            for k in keys:
                if k in self._variants:
                    self._variants[k] = replace(self._variants[k], reuses=self._variants[k].reuses + 1)

    def variants_involving(self, keys):
        wanted = set(keys)
        with self._lock:
            return [r for r in self._variants.values() if r.base in wanted or wanted.intersection(r.preceding)]


class SqlMetadata(MetadataStore):
    """Metadata rows in a SQL database (the disk tier's catalog: SQLite file or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.engine = sql_engine(url)
        create_tables(_META, self.engine)

    def get_many(self, keys):
        names = [str(k) for k in keys]
        with self.engine.connect() as conn:
            found = {r["key"]: r for r in conn.execute(sa.select(METADATA).where(METADATA.c.key.in_(names))).mappings()}
        out = []
        for name in names:
            r = found.get(name)
            preceding = [ChunkKey.parse(p) for p in json.loads(r["preceding"])] if r else []
            out.append(ChunkMetadata.from_blob(r["cci"], r["num_tokens"], r["ranking"], preceding) if r else None)
        return out

    def put(self, key, metadata):
        values = dict(
            key=str(key),
            cci=metadata.cci,
            num_tokens=metadata.num_tokens,
            ranking=metadata.ranking_blob(),
            preceding=json.dumps([str(p) for p in metadata.preceding]),
        )
        with self.engine.begin() as conn:
            conn.execute(sa.delete(METADATA).where(METADATA.c.key == str(key)))
            conn.execute(sa.insert(METADATA).values(**values))

    def delete(self, keys):
        names = [str(k) for k in keys]
        if names:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(METADATA).where(METADATA.c.key.in_(names)))

    def variants_of(self, bases):
        names = [str(b) for b in bases]
        query = sa.select(VARIANTS).where(VARIANTS.c.base.in_(names)).order_by(VARIANTS.c.created, VARIANTS.c.key)
        with self.engine.connect() as conn:
            rows = list(conn.execute(query).mappings())
        return [[_variant_of(r) for r in rows if r["base"] == name] for name in names]

    def put_variant(self, record):
        values = dict(
            key=str(record.key),
            base=str(record.base),
            preceding=json.dumps([str(p) for p in record.preceding]),
            nbytes=record.nbytes,
            compute_saved=record.compute_saved,
            reuses=record.reuses,
            created=record.created,
        )
        with self.engine.begin() as conn:
            conn.execute(sa.delete(VARIANTS).where(VARIANTS.c.key == values["key"]))
            conn.execute(sa.insert(VARIANTS).values(**values))

    def drop_variants(self, keys):
        names = [str(k) for k in keys]
        if names:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(VARIANTS).where(VARIANTS.c.key.in_(names)))

    def count_reuses(self, keys):
        names = [str(k) for k in keys]
        if names:
            with self.engine.begin() as conn:
                conn.execute(sa.update(VARIANTS).where(VARIANTS.c.key.in_(names)).values(reuses=VARIANTS.c.reuses + 1))

    def variants_involving(self, keys):
        names = [str(k) for k in keys]
        if not names:
            return []
        # a JSON list holding "namespace/digest" contains it quoted (autoescape: `_` in a namespace is literal)
        after = [VARIANTS.c.preceding.contains(f'"{n}"', autoescape=True) for n in names]
        found = sa.or_(VARIANTS.c.base.in_(names), *after)
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(VARIANTS).where(found)).mappings())
        wanted = set(keys)
        return [r for r in map(_variant_of, rows) if r.base in wanted or wanted.intersection(r.preceding)]

    def close(self) -> None:
        self.engine.dispose()


def _variant_of(row) -> VariantRecord:
    preceding = tuple(ChunkKey.parse(p) for p in json.loads(row["preceding"]))
    return VariantRecord(
        ChunkKey.parse(row["key"]),
        ChunkKey.parse(row["base"]),
        preceding,
        int(row["nbytes"]),
        float(row["compute_saved"]),
        int(row["reuses"]),
        float(row["created"]),
    )


def metadata_store(store) -> MetadataStore:
    """The metadata store of a TieredStore (`store.services.metadata`)."""
    return store.services.metadata
