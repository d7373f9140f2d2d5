"""The disk tier's catalog: one SQL row per entry (SQLite file by default, PostgreSQL by URL).

A row is written only after its payload file is durable, so the catalog never names a file that
was not fully written; rows are scoped by tier name so several disk tiers can share one database.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from ..chunk_cache import ChunkKey
from .tier import EntryInfo

_META = sa.MetaData()
CHUNKS = sa.Table(
    "ragkv_chunks",
    _META,
    sa.Column("tier", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("file", sa.String(255), nullable=False),
    sa.Column("codec", sa.String(64), nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("nbytes", sa.BigInteger, nullable=False),
    sa.Column("num_tokens", sa.Integer, nullable=False),
    sa.Column("cost", sa.Float, nullable=False),
    sa.Column("hits", sa.Integer, nullable=False),
    sa.Column("last_access", sa.BigInteger, nullable=False),
    sa.Column("priority", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class CatalogRow:
    """Where an entry's payload is and what it should hash to."""

    info: EntryInfo
    file: str  # relative to the tier's root
    codec: str
    checksum: str


class Catalog:
    """The `ragkv_chunks` table for one tier."""

    def __init__(self, url: str, tier: str) -> None:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"catalog URL {url!r}: use sqlite:///PATH or postgresql+psycopg://USER:PW@HOST/DB")
        self.url = url
        self.tier = tier
        self.engine = sa.create_engine(url, pool_pre_ping=url.startswith("postgresql"))
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _META.create_all(self.engine, checkfirst=True)

    def rows(self) -> list[CatalogRow]:
        """Every row of this tier."""
        with self.engine.connect() as conn:
            result = conn.execute(sa.select(CHUNKS).where(CHUNKS.c.tier == self.tier))
            return [_row(r) for r in result.mappings()]

    def upsert(self, row: CatalogRow) -> None:
        """Insert or replace the row of `row.info.key` in one transaction."""
        i = row.info
        values = dict(
            tier=self.tier,
            key=str(i.key),
            file=row.file,
            codec=row.codec,
            checksum=row.checksum,
            nbytes=i.nbytes,
            num_tokens=i.num_tokens,
            cost=i.cost,
            hits=i.hits,
            last_access=i.last_access,
            priority=i.priority,
        )
        with self.engine.begin() as conn:
            conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == str(i.key)))
            conn.execute(sa.insert(CHUNKS).values(**values))

    def delete(self, keys: Iterable[ChunkKey]) -> None:
        """Drop the rows of `keys` (absent ones are ignored)."""
        names = [str(k) for k in keys]
        if names:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key.in_(names)))

    def update_access(self, infos: Iterable[EntryInfo]) -> None:
        """Persist hits, recency and priority of `infos`."""
        params = [dict(k=str(i.key), h=i.hits, la=i.last_access, p=i.priority) for i in infos]
        if params:
            stmt = (
                sa.update(CHUNKS)
                .where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == sa.bindparam("k"))
                .values(hits=sa.bindparam("h"), last_access=sa.bindparam("la"), priority=sa.bindparam("p"))
            )
            with self.engine.begin() as conn:
                conn.execute(stmt, params)

    def clear(self) -> None:
        """Drop every row of this tier."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.tier == self.tier))

    def close(self) -> None:
        self.engine.dispose()


def _row(r) -> CatalogRow:
    info = EntryInfo(
        ChunkKey.parse(r["key"]),
        int(r["nbytes"]),
        int(r["num_tokens"]),
        float(r["cost"]),
        int(r["hits"]),
        int(r["last_access"]),
        float(r["priority"]),
    )
    return CatalogRow(info, r["file"], r["codec"], r["checksum"])


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """WAL: readers do not block the writer; NORMAL sync is crash-consistent in WAL mode."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
