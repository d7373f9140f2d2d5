"""The disk tier's catalog: one SQL row per entry (SQLite file by default, PostgreSQL by URL).

A row is written only after its payload file is durable, so the catalog never names a file that
was not fully written; rows are scoped by tier name so several disk tiers can share one database.
A database that does not read back (garbage in the SQLite file, a failed integrity check) raises
`CatalogDamaged`, whose message says how to heal it; unreadable single rows are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from ..chunk_cache import ChunkKey
from .schema import create_tables
from .sql import sql_engine
from .tier import EntryInfo

log = logging.getLogger(__name__)
# what a damaged SQLite file raises: a database error, or text that is no longer UTF-8 (garbage bytes in a
# page that a pragma or a query reads back as a string; sqlite3 raises that unwrapped)
DAMAGE_ERRORS = (sa.exc.DatabaseError, UnicodeDecodeError)


def damage_reason(err: BaseException) -> object:
    """What to quote of a damage error: the driver's own error where SQLAlchemy wrapped one."""
    return getattr(err, "orig", None) or err


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


class CatalogDamaged(RuntimeError):
    """The catalog database does not read back; the message names it and how to heal it."""


class Catalog:
    """The `ragkv_chunks` table for one tier."""

    def __init__(self, url: str, tier: str) -> None:
        if not url.startswith(("sqlite", "postgresql")):
            raise ValueError(f"catalog URL {url!r}: use sqlite:///PATH or postgresql+psycopg://USER:PW@HOST/DB")
        self.url = url
        self.tier = tier
        self.engine = sql_engine(url)
        try:
            create_tables(_META, self.engine)  # a neighbour creating them at the same moment is not damage
            if url.startswith("sqlite"):
                with self.engine.connect() as conn:
                    verdict = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
                if verdict != ["ok"]:
                    raise CatalogDamaged(self.damaged("; ".join(map(str, verdict[:3]))))
        except DAMAGE_ERRORS as err:
            self.engine.dispose()
            raise CatalogDamaged(self.damaged(damage_reason(err))) from None
        except CatalogDamaged:
            self.engine.dispose()
            raise

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file of this catalog (None for a server database or an in-memory one)."""
        url = sa.engine.make_url(self.url)
        local = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        return url.database if local else None

    def damaged(self, why) -> str:
        """The CatalogDamaged message: what is damaged, why, and how to heal it."""
        where = self.sqlite_path or self.url
        return (
            f"the chunk catalog {where} is damaged ({why}); no payload file was touched. To heal: stop every "
            f"ragkv process using it, move {where} (and its -wal / -shm files) aside, and start again: the disk "
            "tier rebuilds its rows from the payload headers, and the documents are rebuilt from "
            "documents.journal.jsonl beside it (a PostgreSQL catalog has no journal: re-ingest its documents)"
        )

    def rows(self) -> list[CatalogRow]:
        """Every readable row of this tier (a row that does not parse is logged and skipped)."""
        out = []
        try:
            with self.engine.connect() as conn:
                for r in conn.execute(sa.select(CHUNKS).where(CHUNKS.c.tier == self.tier)).mappings():
                    try:
                        out.append(_row(r))
                    except (ValueError, TypeError, KeyError) as err:
                        log.warning("catalog %s: skipping an unreadable row (%s)", self.url, err)
        except DAMAGE_ERRORS as err:
            raise CatalogDamaged(self.damaged(damage_reason(err))) from None
        return out

    def row(self, key: ChunkKey) -> CatalogRow | None:
        """The row of `key`, or None (also when it does not parse)."""
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(CHUNKS).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == str(key)))
            m = r.mappings().first()
        try:
            return None if m is None else _row(m)
        except (ValueError, TypeError, KeyError):
            return None

    def files(self, names: Iterable[str]) -> set[str]:
        """Which of the file `names` some row of this tier names now."""
        names, found = list(names), set()
        with self.engine.connect() as conn:
            for b in range(0, len(names), 500):
                q = sa.select(CHUNKS.c.file).where(CHUNKS.c.tier == self.tier, CHUNKS.c.file.in_(names[b : b + 500]))
                found.update(conn.execute(q).scalars())
        return found

    def insert_new(self, row: CatalogRow) -> bool:
        """Insert `row` unless its key already has one (a writer's row always wins); True if inserted."""
        with self.engine.begin() as conn:
            q = sa.select(CHUNKS.c.key).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == str(row.info.key))
            if conn.execute(q).first() is not None:
                return False
            conn.execute(sa.insert(CHUNKS).values(**self._values(row)))
            return True

    def delete_if_file(self, key: ChunkKey, file: str) -> None:
        """Drop the row of `key` only while it still names `file` (a concurrent replacement survives)."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(CHUNKS).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == str(key), CHUNKS.c.file == file)
            )

    def upsert(self, row: CatalogRow) -> None:
        """Insert or replace the row of `row.info.key` in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(CHUNKS).where(CHUNKS.c.tier == self.tier, CHUNKS.c.key == str(row.info.key)))
            conn.execute(sa.insert(CHUNKS).values(**self._values(row)))

    def _values(self, row: CatalogRow) -> dict:
        i = row.info
        return dict(
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
