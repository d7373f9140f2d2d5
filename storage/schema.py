"""Creating SQL tables when another process may be creating the same ones at the same moment.

Two sidecars started together on one fresh data dir (or one catalog database) both find the tables
missing and both issue CREATE TABLE: one of them gets "table ... already exists" (SQLite), a duplicate
`pg_type` row (PostgreSQL) or "database is locked". None of those is damage: the tables are there (or
about to be), so creation is retried, and `checkfirst` then finds them. An error that persists is
raised as it is, for the caller to judge.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

ATTEMPTS = 6
_CONCURRENT = ("already exists", "duplicate key", "pg_type_typname_nsp_index", "database is locked")


def created_concurrently(err: sa.exc.DBAPIError) -> bool:
    """Whether `err` is what a CREATE TABLE gets when another process is creating the same table."""
    return any(text in str(err.orig or err).lower() for text in _CONCURRENT)


def create_tables(metadata: sa.MetaData, engine: sa.Engine, prepare=None) -> None:
    """`metadata.create_all(engine)` that tolerates a neighbour creating the same tables meanwhile;
    `prepare(engine)` (a migration that must run first) is retried with it."""
    for attempt in range(ATTEMPTS):
        try:
            if prepare is not None:
                prepare(engine)
            metadata.create_all(engine, checkfirst=True)
            return
        except sa.exc.DBAPIError as err:
            if attempt == ATTEMPTS - 1 or not created_concurrently(err):
                raise
            time.sleep(0.05 * (attempt + 1))
