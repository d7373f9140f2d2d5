"""DocumentJournal: every committed document write, also outside the SQLite catalog, so that a damaged
catalog can be rebuilt with its documents (not only the chunk KV, which the disk tier recovers from its
payload headers).

`documents.journal.jsonl` beside `catalog.sqlite`: one JSON line per write, `{"op": "put", "id", "text",
"metadata", "source"}` or `{"op": "remove", "id"}`, appended (and fsynced) after the catalog committed it,
under an exclusive lock (several processes may write one data dir). Replaying it gives the live
documents; opening the Retriever compacts it to one line per live document. A line that does not parse
(a crash in the middle of an append) is skipped. PostgreSQL catalogs have no journal: the database
server keeps its own.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from .loaders import Document

JOURNAL_NAME = "documents.journal.jsonl"
log = logging.getLogger(__name__)


class DocumentJournal:
    """The append-only record of document writes at `path`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, catalog_url: str) -> DocumentJournal | None:
        """The journal of a SQLite catalog file (in the same folder); None for any other database."""
        url = sa.engine.make_url(catalog_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return cls(Path(url.database).expanduser().parent / JOURNAL_NAME)

    def record(self, docs: Iterable[Document]) -> None:
        """Append the documents just committed (one fsync for all of them)."""
        self._append([_put(d) for d in docs])

    def record_removal(self, doc_id: str) -> None:
        self._append([{"op": "remove", "id": doc_id}])

    def documents(self) -> list[Document]:
        """The live documents, in the order they were first written."""
        if not self.path.exists():
            return []
        live: dict[str, Document] = {}
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                try:
                    entry = json.loads(line)
                    if entry["op"] == "remove":
                        live.pop(entry["id"], None)
                    else:
                        doc = Document(entry["id"], entry["text"], dict(entry["metadata"]), entry["source"])
                        live[doc.id] = doc
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("document journal %s: skipping line %d (%s)", self.path, n, err)
        return list(live.values())

    def compact(self) -> int:
        """Rewrite the journal as one line per live document; returns how many."""
        with self._locked():
            docs = self.documents()
            tmp = self.path.with_suffix(".compacting")
            with open(tmp, "w", encoding="utf-8") as out:
                out.writelines(_line(_put(d)) for d in docs)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)  # a writer waiting on the lock reopens the new file (see _locked)
        return len(docs)

    def _append(self, entries: list[dict]) -> None:
        if not entries:
            return
        with self._locked() as f:
            f.write("".join(_line(e) for e in entries))
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def _locked(self):
        """The journal open for appending under an exclusive lock (reopened if it was replaced meanwhile)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a", encoding="utf-8")
            fcntl.flock(f, fcntl.LOCK_EX)
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()  # compacted (replaced) while we waited: append to the new file
        try:
            yield f
        finally:
            f.close()  # releases the lock


def _put(d: Document) -> dict:
    return {"op": "put", "id": d.id, "text": d.text, "metadata": d.metadata, "source": d.source}


def _line(entry: dict) -> str:
    return json.dumps(entry, ensure_ascii=False) + "\n"
