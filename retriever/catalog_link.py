"""A document catalog in a network database (PostgreSQL) whose outage degrades retrieval instead of
failing it.

`CatalogLink` is one URL's outage state (`ServiceLink`: down on a connection error, one warning, backoff
0.5 s doubling to 30 s, then one call probes again). `GuardedCatalog` sends every `Catalog` call
through it: while the database is unreachable a call raises `CatalogUnavailable` at once (writes, and
reads the query path does not need), except the two reads a search makes, which answer from what this
process read last: `generation` (so the local index is searched as it is) and `chunks(ids)` (the rows
read before, kept in a bounded cache). Nothing is written while it is down, so nothing committed is
lost: the database stays the truth, and a restarted sidecar reads it back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

import sqlalchemy as sa

from ..storage.service_link import ServiceLink, url_without_password
from .catalog import Catalog, ChunkRow

T = TypeVar("T")
_DOWN = object()
_UNGUARDED = {"close"}  # calls that need no database round trip
# SQLSTATE classes of a server that went away or is going away (no SQLSTATE at all: the client could not talk)
_OUTAGE_STATES = ("08", "57P")


class CatalogUnavailable(RuntimeError):
    """The document catalog's database is unreachable now; retry after the link's backoff."""


class CatalogLink(ServiceLink):
    """The outage state of one catalog URL, shared by every namespace's catalog on it."""

    what = "document catalog"

    def __init__(self, url: str, backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        super().__init__((sa.exc.OperationalError, sa.exc.InterfaceError), (), backoff_s, max_backoff_s)
        self.url = url

    def safe_url(self) -> str:
        return url_without_password(self.url)

    def is_outage(self, err: BaseException) -> bool:
        """A lost or refused connection; not a server-side error such as a deadlock."""
        if getattr(err, "connection_invalidated", False):
            return True
        state = getattr(getattr(err, "orig", None), "sqlstate", None)
        return state is None or state.startswith(_OUTAGE_STATES)

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()`, or CatalogUnavailable while the database is unreachable."""
        out = self.call(lambda _: fn(), _DOWN)
        if out is _DOWN:
            raise CatalogUnavailable(
                f"the document catalog at {self.safe_url()} is unreachable ({self.last_error}); retrying with backoff"
            )
        return out

    def warning(self, since: float | None = None) -> str | None:
        """A sentence for an answer's `warnings` while the catalog is down, or if a call failed after `since`
        (a `time.perf_counter()` value); None when it answered."""
        failed = since is not None and (self.last_failure_at or float("-inf")) >= since
        if self.up and not failed:
            return None
        return (
            f"document catalog {self.safe_url()!r} is unreachable ({self.last_error}): retrieval answered from "
            "this sidecar's index and the catalog rows it read before; documents cannot be changed; "
            "reconnecting with backoff"
        )


class GuardedCatalog:
    """A `Catalog` whose calls go through a `CatalogLink` (see the module docstring)."""

    def __init__(self, catalog: Catalog, link: CatalogLink, max_rows: int = 50_000) -> None:
        self.catalog = catalog
        self.link = link
        self.max_rows = max_rows
        self._rows: OrderedDict[int, ChunkRow] = OrderedDict()  # chunk rows read before, most recent last
        self._generation: int | None = None

    def __getattr__(self, name: str):
        attr = getattr(self.catalog, name)
        if not callable(attr) or name in _UNGUARDED:
            return attr
        return lambda *args, **kwargs: self.link.run(lambda: attr(*args, **kwargs))

    @property
    def reachable(self) -> bool:
        return self.link.up

    @property
    def generation(self) -> int:
        """The namespace's generation; while unreachable, the last one read (so the index is kept)."""
        try:
            self._generation = self.link.run(lambda: self.catalog.generation)
        except CatalogUnavailable:
            if self._generation is None:
                raise
        return self._generation

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRow]:
        """Chunk rows by id; while unreachable, those of `ids` read before (the others are left out)."""
        try:
            rows = self.link.run(lambda: self.catalog.chunks(ids))
        except CatalogUnavailable:
            return {i: self._rows[i] for i in ids if i in self._rows}
        for i, row in rows.items():
            self._rows[i] = row
            self._rows.move_to_end(i)
        while len(self._rows) > self.max_rows:
            self._rows.popitem(last=False)
        return rows
