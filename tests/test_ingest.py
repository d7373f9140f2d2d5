"""Ingestion: every format, per-file errors, KV of every chunk in the store, skip, resume, delete / replace."""

from __future__ import annotations

import json

import pytest
import torch
from retriever_fakes import DictStore, HashEmbedder, minimal_pdf, paragraphs, tiny_byte_adapter

from ragkv.chunk_cache import chunk_key, precompute
from ragkv.engine.ingest import IngestConfig, Ingester
from ragkv.retriever import Retriever, RetrieverConfig

CFG = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120, max_document_bytes=4000)
# neighbour variants off: these tests count the base entries ingestion stores (tests/test_neighbour_variants.py)
ICFG = IngestConfig(
    kv_batch_tokens=300, max_tokens_per_pass=256, documents_per_batch=2, progress=False, neighbour_variants=0
)


@pytest.fixture(scope="module")
def adapter():
    return tiny_byte_adapter()


def _ingester(tmp_path, adapter, store, cfg=ICFG):
    retriever = Retriever.open(tmp_path / "data", adapter, CFG, HashEmbedder())
    return Ingester(adapter, store, retriever, cfg)


def _corpus(root):
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(paragraphs(5, seed=1))
    (docs / "b.md").write_text("# Title\n\n" + paragraphs(3, seed=2))
    (docs / "sub" / "c.html").write_text(
        "<html><head><style>p{}</style></head><body><h1>Maple</h1>"
        "<p>Quartz tide &amp; orbit.</p><script>x()</script></body></html>"
    )
    (docs / "d.pdf").write_bytes(minimal_pdf("Zebra xylophone inside a PDF file."))
    lines = [
        json.dumps({"id": "j1", "text": paragraphs(2, seed=5), "metadata": {"lang": "en"}}),
        "{not json",
        json.dumps({"id": "j3", "title": "no text field"}),
        "",
        json.dumps({"text": "River delta without an id."}),
    ]
    (docs / "e.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def test_ingest_formats_errors_and_kv(tmp_path, adapter):
    docs = _corpus(tmp_path)
    (docs / "empty.txt").write_text("")
    (docs / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (docs / "notes.docx").write_text("unknown format")
    (docs / "big.txt").write_text("word " * 1000)  # 5000 bytes > max_document_bytes
    store = DictStore()
    ing = _ingester(tmp_path, adapter, store)
    report = ing.ingest([docs, tmp_path / "missing.txt"])
    errors = {(e.path.rsplit("/", 1)[-1], e.line): e.message for e in report.errors}
    assert errors.keys() == {
        ("empty.txt", None),
        ("blob.txt", None),
        ("notes.docx", None),
        ("big.txt", None),
        ("e.jsonl", 2),
        ("e.jsonl", 3),
        ("missing.txt", None),
    }
    assert "accepted: .txt" in errors[("notes.docx", None)] and "binary" in errors[("blob.txt", None)]
    assert "over the limit" in errors[("big.txt", None)] and "invalid JSON" in errors[("e.jsonl", 2)]
    assert report.documents_added == 6  # a, b, c, d, j1 and the id-less JSONL line
    ids = ing.retriever.catalog.document_ids()
    assert "j1" in ids and any(i.endswith("e.jsonl#5") for i in ids)
    assert ing.retriever.catalog.document("j1").metadata["lang"] == "en"
    html = next(i for i in ids if i.endswith("c.html"))
    assert ing.retriever.catalog.document(html).num_tokens == len("Maple\n\nQuartz tide & orbit.")
    assert ing.retriever.search("zebra xylophone", k=1)[0].doc_id.endswith("d.pdf")
    # every chunk's KV is in the store, equal to one-by-one precompute
    keys = ing.retriever.chunk_keys()
    assert report.kv_computed == len(keys) == len(store.entries) and report.kv_cached == 0
    hit = ing.retriever.search("maple quartz", k=1)[0]
    assert hit.key == chunk_key(adapter, hit.token_ids)
    torch.testing.assert_close(store.entries[hit.key].kv, precompute(adapter, hit.token_ids).kv, rtol=1e-4, atol=1e-5)
    # re-running skips everything
    again = _ingester(tmp_path, adapter, store).ingest([docs])
    assert again.documents_unchanged == 6 and again.documents_added == 0
    assert again.kv_computed == 0 and again.kv_cached == len(keys)


def test_resume_after_interruption(tmp_path, adapter):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(paragraphs(4, seed=20 + i))
    store = DictStore(fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        _ingester(tmp_path, adapter, store).ingest([docs])
    done = len(store.entries)
    assert 0 < done < 30
    store.fail_after = None
    report = _ingester(tmp_path, adapter, store).ingest([docs])
    assert report.documents_unchanged > 0 and report.documents == 6
    assert report.kv_cached == done
    keys = _ingester(tmp_path, adapter, store).retriever.chunk_keys()
    assert report.kv_computed == len(keys) - done and len(store.entries) == len(keys)


def test_replace_and_remove_invalidate_kv(tmp_path, adapter):
    docs = tmp_path / "docs"
    docs.mkdir()
    shared = paragraphs(2, seed=40)
    (docs / "a.txt").write_text(shared + "\n\n" + paragraphs(3, seed=41))
    (docs / "b.txt").write_text(shared + "\n\n" + paragraphs(3, seed=42))
    store = DictStore()
    ing = _ingester(tmp_path, adapter, store)
    ing.ingest([docs])
    before = set(store.entries)
    (docs / "a.txt").write_text(shared + "\n\n" + paragraphs(3, seed=43))
    report = ing.ingest([docs / "a.txt"])
    assert report.documents_replaced == 1 and report.invalidated
    assert not set(report.invalidated) & set(store.entries)  # dropped from the store
    assert set(report.invalidated) <= before
    assert set(store.entries) == set(ing.retriever.chunk_keys())
    dropped = ing.remove([str((docs / "b.txt").resolve())])
    assert dropped and not set(dropped) & set(store.entries)
    assert set(store.entries) == set(ing.retriever.chunk_keys())  # shared chunks still used by a
    with pytest.raises(ValueError, match="no document"):
        ing.remove(["nope"])


def test_prepacked_ingest_equals_one_by_one(tmp_path, adapter):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(paragraphs(8, seed=50))
    packed, single = DictStore(), DictStore()
    _ingester(tmp_path / "p", adapter, packed).ingest([docs])
    _ingester(
        tmp_path / "s", adapter, single, IngestConfig(max_tokens_per_pass=0, progress=False, neighbour_variants=0)
    ).ingest([docs])
    assert packed.entries.keys() == single.entries.keys()
    for k, kv in packed.entries.items():
        torch.testing.assert_close(kv.kv, single.entries[k].kv, rtol=1e-4, atol=1e-5)
