"""The document / chunk catalog in SQLAlchemy (SQLite file by default, any SQLAlchemy URL).

Documents have ids, a content hash and metadata; chunks have text, token ids, their ChunkKey string
and embedding, and are stored once however many documents contain them (a link table keeps each
document's chunk order and overlap). Every row carries its namespace (tenant) and every query of a
`Catalog(url, namespace)` is scoped by it, so tenants sharing one database (a common `catalog_url`)
never see each other's documents. Every change bumps the namespace's `generation`, which the faiss
index records. A database of the first layout (no namespace column) is migrated when opened.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from ..storage.schema import create_tables
from ..storage.sql import sql_engine

_META = sa.MetaData()
META = sa.Table(
    "ragkv_retriever_meta",
    _META,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
DOCUMENTS = sa.Table(
    "ragkv_documents",
    _META,
    sa.Column("namespace", sa.String(64), primary_key=True),
    sa.Column("id", sa.String(512), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
CHUNKS = sa.Table(
    "ragkv_retriever_chunks",
    _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("namespace", sa.String(64), nullable=False, index=True),
    sa.Column("key", sa.String(160), nullable=False, unique=True),  # "namespace/digest": unique across tenants
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("token_ids", sa.LargeBinary, nullable=False),  # little-endian int32
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("embedding", sa.LargeBinary, nullable=False),  # little-endian float32
)
LINKS = sa.Table(
    "ragkv_document_chunks",
    _META,
    sa.Column("namespace", sa.String(64), primary_key=True),
    sa.Column("doc_id", sa.String(512), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("chunk_id", sa.Integer, sa.ForeignKey("ragkv_retriever_chunks.id"), nullable=False, index=True),
    sa.Column("overlap", sa.Integer, nullable=False),
    sa.ForeignKeyConstraint(["namespace", "doc_id"], ["ragkv_documents.namespace", "ragkv_documents.id"]),
)


@dataclass(frozen=True)
class NewChunk:
    """A chunk of a document being written: its key string, ids, text, overlap and embedding (if new)."""

    key: str
    token_ids: tuple[int, ...]
    text: str
    overlap: int = 0
    embedding: np.ndarray | None = None  # [dim]; needed only for chunks the catalog lacks


@dataclass(frozen=True)
class ChunkRow:
    """A stored chunk and the first document (and position there) that contains it."""

    id: int
    key: str
    text: str
    token_ids: tuple[int, ...]
    doc_id: str
    position: int


@dataclass(frozen=True)
class DocumentRow:
    """A stored document and its chunks in order: (chunk id, key, overlap)."""

    id: str
    source: str
    content_hash: str
    metadata: dict
    num_tokens: int
    chunks: tuple[tuple[int, str, int], ...] = field(default=())


@dataclass(frozen=True)
class Change:
    """What a write did: chunk rows added (ids, vectors [N, dim]) and chunks no document references any more."""

    added_ids: np.ndarray
    added_vectors: np.ndarray
    removed_ids: np.ndarray
    removed_keys: tuple[str, ...]
    generation: int = 0  # the namespace's generation this write produced


class Catalog:
    """Documents and deduplicated chunks of one namespace (None: reads see every namespace) in a SQL database."""

    def __init__(self, url: str, namespace: str | None = None) -> None:
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError as err:
            raise ValueError(
                f"catalog URL {url!r} is not a SQLAlchemy URL, e.g. sqlite:///PATH or postgresql+psycopg://..."
            ) from err
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.namespace = namespace
        self.engine = sql_engine(url)  # storage/sql.py: the pragmas and timeouts every catalog database gets
        create_tables(_META, self.engine, prepare=_migrate_unscoped)  # another process may be creating them now
        self._insert_meta(f"generation:{self._ns}", "0")  # the row every write of this namespace locks first

    def _insert_meta(self, name: str, value: str) -> None:
        """Insert a meta row unless it exists (another process may insert it concurrently)."""
        try:
            with self.engine.begin() as conn:
                if conn.execute(sa.select(META.c.value).where(META.c.name == name)).first() is None:
                    conn.execute(sa.insert(META).values(name=name, value=value))
        except sa.exc.IntegrityError:
            pass  # inserted by another process meanwhile

    @property
    def _ns(self) -> str:
        """The namespace rows are written under."""
        return self.namespace or "default"

    def _scope(self, table: sa.Table):
        """The WHERE clause limiting `table` to this catalog's namespace (always true when it has none)."""
        return sa.true() if self.namespace is None else table.c.namespace == self.namespace

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(META.c.value).where(META.c.name == name)).scalar()

    def bind(self, **expected: str) -> None:
        """Record identities (tokenizer, model, embedder) on first use; refuse a catalog made with others."""
        for name, value in expected.items():
            self._insert_meta(name, value)
        with self.engine.connect() as conn:
            for name, value in expected.items():
                have = conn.execute(sa.select(META.c.value).where(META.c.name == name)).scalar()
                if have != value:
                    raise ValueError(
                        f"catalog {self.url} was built with {name}={have!r}, not {value!r}: "
                        "use another data directory / catalog URL for this model or embedder"
                    )

    @property
    def generation(self) -> int:
        """How many writes this namespace has seen (what a faiss index built from it records)."""
        return int(self.get_meta(f"generation:{self._ns}") or 0)

    # -- reads -----------------------------------------------------------------------------------
    def document(self, doc_id: str) -> DocumentRow | None:
        with self.engine.connect() as conn:
            d = conn.execute(sa.select(DOCUMENTS).where(self._scope(DOCUMENTS), DOCUMENTS.c.id == doc_id)).mappings()
            d = d.first()
            if d is None:
                return None
            links = conn.execute(
                sa.select(LINKS.c.chunk_id, CHUNKS.c.key, LINKS.c.overlap)
                .join(CHUNKS, CHUNKS.c.id == LINKS.c.chunk_id)
                .where(LINKS.c.namespace == d["namespace"], LINKS.c.doc_id == doc_id)
                .order_by(LINKS.c.position)
            ).all()
        return DocumentRow(
            d["id"],
            d["source"],
            d["content_hash"],
            dict(d["metadata"]),
            d["num_tokens"],
            tuple((int(i), k, int(o)) for i, k, o in links),
        )

    def document_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            q = sa.select(DOCUMENTS.c.id).where(self._scope(DOCUMENTS)).order_by(DOCUMENTS.c.id)
            return list(conn.execute(q).scalars())

    def known_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of `keys` already have a chunk row."""
        found: set[str] = set()
        with self.engine.connect() as conn:
            for b in range(0, len(keys), 500):
                q = sa.select(CHUNKS.c.key).where(self._scope(CHUNKS), CHUNKS.c.key.in_(keys[b : b + 500]))
                found.update(conn.execute(q).scalars())
        return found

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRow]:
        """Chunk rows by id, each with its first (doc id, position); ids not in the catalog are absent."""
        ids = [int(i) for i in ids]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(CHUNKS.c.id, CHUNKS.c.key, CHUNKS.c.text, CHUNKS.c.token_ids).where(
                    self._scope(CHUNKS), CHUNKS.c.id.in_(ids)
                )
            ).all()
            links = conn.execute(
                sa.select(LINKS.c.chunk_id, LINKS.c.doc_id, LINKS.c.position)
                .where(self._scope(LINKS), LINKS.c.chunk_id.in_(ids))
                .order_by(LINKS.c.doc_id.desc(), LINKS.c.position.desc())
            ).all()
        first = {int(c): (d, int(p)) for c, d, p in links}  # the last write wins: smallest doc id, position
        return {int(r[0]): ChunkRow(int(r[0]), r[1], r[2], _ids(r[3]), *first.get(int(r[0]), ("", -1))) for r in rows}

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """Every chunk's id [N] and embedding [N, dim] (what the index is rebuilt from)."""
        with self.engine.connect() as conn:
            q = sa.select(CHUNKS.c.id, CHUNKS.c.embedding).where(self._scope(CHUNKS)).order_by(CHUNKS.c.id)
            rows = conn.execute(q).all()
        ids = np.array([r[0] for r in rows], dtype=np.int64)  # [N]
        vecs = (
            np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]) if rows else np.zeros((0, 0), np.float32)
        )  # [N, dim]
        return ids, vecs.astype(np.float32)

    def chunk_keys(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(CHUNKS.c.key).where(self._scope(CHUNKS))).scalars())

    # -- writes ----------------------------------------------------------------------------------
    def put_document(
        self, doc_id: str, source: str, content_hash: str, metadata: dict, num_tokens: int, chunks: Sequence[NewChunk]
    ) -> Change:
        """Insert or replace a document and its chunks in one transaction."""
        with self.engine.begin() as conn:
            gen = self._bump(conn)  # a write first: the transaction holds the write lock before it reads
            removed_ids, removed_keys = self._unlink(conn, doc_id, keep={c.key for c in chunks})
            existing = dict(
                conn.execute(
                    sa.select(CHUNKS.c.key, CHUNKS.c.id).where(CHUNKS.c.key.in_([c.key for c in chunks]))
                ).all()
            )
            added_ids, added_vecs = [], []
            for c in chunks:
                if c.key in existing:
                    continue
                if c.embedding is None:
                    raise ValueError(f"chunk {c.key} is new to the catalog and needs an embedding")
                vec = np.asarray(c.embedding, dtype="<f4")
                new_id = conn.execute(
                    sa.insert(CHUNKS).values(
                        namespace=self._ns,
                        key=c.key,
                        text=c.text,
                        token_ids=np.asarray(c.token_ids, dtype="<i4").tobytes(),
                        num_tokens=len(c.token_ids),
                        embedding=vec.tobytes(),
                    )
                ).inserted_primary_key[0]
                existing[c.key] = new_id
                added_ids.append(new_id)
                added_vecs.append(vec)
            conn.execute(
                sa.insert(DOCUMENTS).values(
                    namespace=self._ns,
                    id=doc_id,
                    source=source,
                    content_hash=content_hash,
                    metadata=metadata,
                    num_tokens=num_tokens,
                    updated=time.time(),
                )
            )
            if chunks:
                conn.execute(
                    sa.insert(LINKS),
                    [
                        dict(namespace=self._ns, doc_id=doc_id, position=i, chunk_id=existing[c.key], overlap=c.overlap)
                        for i, c in enumerate(chunks)
                    ],
                )
        vecs = np.stack(added_vecs).astype(np.float32) if added_vecs else np.zeros((0, 0), np.float32)  # [N, dim]
        return Change(np.array(added_ids, dtype=np.int64), vecs, removed_ids, removed_keys, gen)

    def remove_document(self, doc_id: str) -> Change | None:
        """Delete a document; its chunks no other document contains are deleted too. None if absent."""
        with self.engine.connect() as conn, conn.begin() as tx:
            gen = self._bump(conn)  # a write first: the transaction holds the write lock before it reads
            q = sa.select(DOCUMENTS.c.id).where(DOCUMENTS.c.namespace == self._ns, DOCUMENTS.c.id == doc_id)
            if conn.execute(q).first() is None:
                tx.rollback()
                return None
            removed_ids, removed_keys = self._unlink(conn, doc_id, keep=set())
        return Change(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), removed_ids, removed_keys, gen)

    def _unlink(self, conn, doc_id: str, keep: set[str]) -> tuple[np.ndarray, tuple[str, ...]]:
        """Drop the document and its links; delete its chunks that are orphaned now (except `keep`)."""
        mine = (LINKS.c.namespace == self._ns, LINKS.c.doc_id == doc_id)
        old = conn.execute(sa.select(LINKS.c.chunk_id).where(*mine)).scalars().all()
        conn.execute(sa.delete(LINKS).where(*mine))
        conn.execute(sa.delete(DOCUMENTS).where(DOCUMENTS.c.namespace == self._ns, DOCUMENTS.c.id == doc_id))
        if not old:
            return np.zeros(0, np.int64), ()
        still_used = set(conn.execute(sa.select(LINKS.c.chunk_id).where(LINKS.c.chunk_id.in_(set(old)))).scalars())
        rows = conn.execute(sa.select(CHUNKS.c.id, CHUNKS.c.key).where(CHUNKS.c.id.in_(set(old) - still_used))).all()
        orphans = [(i, k) for i, k in rows if k not in keep]
        if orphans:
            conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.id.in_([i for i, _ in orphans])))
        return np.array([i for i, _ in orphans], dtype=np.int64), tuple(k for _, k in orphans)

    def _bump(self, conn) -> int:
        """Increment this namespace's generation (an UPDATE first: it takes the write lock, so concurrent
        writers in other processes queue here instead of failing on a stale read snapshot); the new value."""
        name = f"generation:{self._ns}"
        value = sa.cast(sa.cast(META.c.value, sa.Integer) + 1, sa.Text)
        conn.execute(sa.update(META).where(META.c.name == name).values(value=value))
        return int(conn.execute(sa.select(META.c.value).where(META.c.name == name)).scalar())

    def close(self) -> None:
        self.engine.dispose()


def _migrate_unscoped(engine: sa.Engine) -> None:
    """Give a catalog of the first layout (tables without a namespace column) the scoped layout: each
    chunk's namespace is its key's, each document's that of its first chunk (else `default`)."""
    inspector = sa.inspect(engine)
    if not inspector.has_table(DOCUMENTS.name):
        return
    if "namespace" in {c["name"] for c in inspector.get_columns(DOCUMENTS.name)}:
        return
    with engine.begin() as conn:
        chunks = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {CHUNKS.name}")).mappings()]
        docs = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {DOCUMENTS.name}")).mappings()]
        links = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {LINKS.name}")).mappings()]
        for table in (LINKS, DOCUMENTS, CHUNKS):
            conn.execute(sa.text(f"DROP TABLE {table.name}"))
        _META.create_all(conn)
        ns_of_chunk = {}
        for c in chunks:
            c["namespace"] = ns_of_chunk[c["id"]] = c["key"].partition("/")[0]
        ns_of_doc: dict[str, str] = {}
        for link in sorted(links, key=lambda x: x["position"]):
            ns_of_doc.setdefault(link["doc_id"], ns_of_chunk.get(link["chunk_id"], "default"))
        for d in docs:
            d["namespace"] = ns_of_doc.get(d["id"], "default")
            if isinstance(d["metadata"], str):
                d["metadata"] = json.loads(d["metadata"])
        for link in links:
            link["namespace"] = ns_of_doc.get(link["doc_id"], "default")
        for table, rows in ((CHUNKS, chunks), (DOCUMENTS, docs), (LINKS, links)):
            if rows:
                conn.execute(sa.insert(table), rows)
        gen = conn.execute(sa.select(META.c.value).where(META.c.name == "generation")).scalar()
        for ns in {c["namespace"] for c in chunks} | {d["namespace"] for d in docs}:
            conn.execute(sa.insert(META).values(name=f"generation:{ns}", value=str(int(gen or 0) + 1)))


def _ids(blob: bytes) -> tuple[int, ...]:
    return tuple(int(t) for t in np.frombuffer(blob, dtype="<i4"))
