"""The one SQL engine factory: every catalog database (the disk tier's chunk rows, the chunk metadata
beside them, the document catalog) is opened by `sql_engine(url)`, so all of them meet the same
database with the same settings.

SQLite: WAL (readers do not block the writer), synchronous=NORMAL (crash-consistent in WAL mode),
foreign keys on, and a 5 s busy timeout (several engines and processes open the same catalog.sqlite:
a writer waits for another instead of failing with "database is locked"). PostgreSQL: pooled
connections are pinged before use (a restarted server leaves no dead one) and a connect times out
after 5 s (an unreachable server fails a call, it does not hang it).
"""

from __future__ import annotations

import sqlalchemy as sa

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
)
CONNECT_TIMEOUT_S = 5


def sql_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine for `url` with the settings above (other backends: SQLAlchemy's defaults)."""
    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "postgresql":
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    engine = sa.create_engine(url)
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    for pragma in SQLITE_PRAGMAS:
        cur.execute(pragma)
    cur.close()
