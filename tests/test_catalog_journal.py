"""Healing a damaged catalog keeps the documents (issue 26, item 5). Every committed document write is also
appended to a journal beside the SQLite catalog (`documents.journal.jsonl`: id, text, metadata, source;
removals too). After garbage in catalog.sqlite the sidecar still refuses to start (nothing touched) and
says how to heal; once the catalog is moved aside, the next start rebuilds every document from the
journal, and says how many it recovered."""

from __future__ import annotations

import os
import shutil

import pytest
from retriever_fakes import HashEmbedder, paragraphs, tiny_byte_adapter

from ragkv.retriever import Retriever, RetrieverConfig
from ragkv.storage import DiskTier
from ragkv.storage.catalog import CatalogDamaged

CFG = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120)


def _open(data):
    return Retriever.open(data, tiny_byte_adapter(), CFG, HashEmbedder())


def test_documents_survive_garbage_in_the_catalog(tmp_path):
    data = tmp_path / "data"
    r = _open(data)
    for i in range(6):
        r.add_document(f"doc{i}", paragraphs(2, seed=i), {"n": i}, source=f"src{i}.txt")
    r.add_document("doc1", "a replaced text about zebra xylophones " * 8, {"n": 100})
    r.remove_document("doc5")
    before = {d: r.catalog.document(d) for d in r.catalog.document_ids()}
    r.close()

    catalog = data / "catalog.sqlite"
    with open(catalog, "r+b") as f:  # 3 KiB of random bytes into the file
        f.seek(1024)
        f.write(os.urandom(3072))
    with pytest.raises(CatalogDamaged, match="documents.journal.jsonl"):
        DiskTier(data / "cache", 1 << 20, catalog_url=f"sqlite:///{catalog}")
    for suffix in ("", "-wal", "-shm"):  # what the message says to do
        if (data / f"catalog.sqlite{suffix}").exists():
            shutil.move(data / f"catalog.sqlite{suffix}", tmp_path / f"aside{suffix}")

    healed = _open(data)
    assert healed.recovered == 5
    after = {d: healed.catalog.document(d) for d in healed.catalog.document_ids()}
    assert sorted(after) == sorted(before) == ["doc0", "doc1", "doc2", "doc3", "doc4"]
    for d in before:
        assert (after[d].content_hash, after[d].metadata, after[d].source, after[d].num_tokens) == (
            before[d].content_hash,
            before[d].metadata,
            before[d].source,
            before[d].num_tokens,
        )
    assert healed.search("zebra xylophones", 1)[0].doc_id == "doc1"
    healed.close()
    assert _open(data).recovered == 0  # rebuilt once: the next start finds the documents in the catalog


def test_the_journal_is_compacted_to_the_live_documents(tmp_path):
    r = _open(tmp_path)
    for round_ in range(5):
        r.add_document("same", f"version {round_} " + paragraphs(1, seed=round_))
    r.close()
    journal = tmp_path / "documents.journal.jsonl"
    assert journal.exists() and len(journal.read_text().splitlines()) <= 5
    r = _open(tmp_path)  # opening compacts it: one line per live document
    r.close()
    assert len(journal.read_text().splitlines()) == 1


def test_a_catalog_whose_text_is_no_longer_utf8_is_damaged_not_a_crash(tmp_path, monkeypatch):
    """Random bytes in a page can make SQLite hand back text that is not UTF-8; sqlite3 raises that as a
    bare UnicodeDecodeError (seen from a pragma at connect): it is damage, with the healing message."""
    from ragkv.storage import catalog as catalog_module

    def garbage(*_args, **_kwargs):
        raise UnicodeDecodeError("utf-8", b"\xc3\x28", 0, 1, "invalid continuation byte")

    monkeypatch.setattr(catalog_module, "create_tables", garbage)
    with pytest.raises(CatalogDamaged, match="documents.journal.jsonl"):
        catalog_module.Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}", "disk")
