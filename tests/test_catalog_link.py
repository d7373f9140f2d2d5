"""CatalogLink and GuardedCatalog without a database: which errors are an outage, what a guarded
catalog answers while its database is unreachable (the rows read before, the last generation)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from ragkv.retriever import CatalogLink, CatalogUnavailable, GuardedCatalog
from ragkv.retriever.catalog import ChunkRow


class _DriverError(Exception):
    def __init__(self, sqlstate):
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


def _operational(sqlstate) -> sa.exc.OperationalError:
    return sa.exc.OperationalError("SELECT 1", {}, _DriverError(sqlstate))


@pytest.mark.parametrize(
    ("sqlstate", "outage"),
    [(None, True), ("08006", True), ("57P01", True), ("40P01", False), ("53300", False)],
)
def test_only_lost_or_refused_connections_are_an_outage(sqlstate, outage):
    link = CatalogLink("postgresql+psycopg://u:secret@db/x")
    assert link.is_outage(_operational(sqlstate)) is outage


def test_a_server_error_is_raised_and_leaves_the_link_up():
    link = CatalogLink("postgresql+psycopg://u:secret@db/x")

    def deadlock():
        raise _operational("40P01")

    with pytest.raises(sa.exc.OperationalError):
        link.run(deadlock)
    assert link.up and link.outages == 0


class _Catalog:
    """A stand-in Catalog whose database can go away."""

    def __init__(self) -> None:
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise _operational(None)

    @property
    def generation(self) -> int:
        self._check()
        return 7

    def chunks(self, ids):
        self._check()
        return {i: ChunkRow(i, f"ns/{i}", f"text {i}", (i,), "doc", 0) for i in ids}

    def document(self, doc_id):
        self._check()
        return None


def test_a_guarded_catalog_answers_searches_from_what_it_read_and_refuses_the_rest():
    catalog = _Catalog()
    link = CatalogLink("postgresql+psycopg://u:secret@db/x")
    guarded = GuardedCatalog(catalog, link, max_rows=2)
    assert guarded.generation == 7 and set(guarded.chunks([1, 2, 3])) == {1, 2, 3}
    catalog.down = True
    assert guarded.generation == 7  # the last one read: the local index is kept
    assert set(guarded.chunks([1, 2, 3])) == {2, 3}  # the cache keeps the 2 most recent rows
    with pytest.raises(CatalogUnavailable, match=r"\*\*\*@db"):  # no password in the message
        guarded.document("doc")
    assert not link.up and link.outages == 1 and guarded.reachable is False
    assert "document catalog" in link.warning()
    link._retry_at = 0.0
    catalog.down = False
    assert guarded.document("doc") is None and link.up and link.warning() is None
