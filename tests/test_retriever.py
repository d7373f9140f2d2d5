"""Retriever: search, dedup, delete / replace invalidation, restart, index rebuild and IVF / HNSW kinds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from retriever_fakes import HashEmbedder, byte_tokenizer, paragraphs

from ragkv.retriever import Retriever, RetrieverConfig, VectorIndex

CFG = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120)


@pytest.fixture(scope="module")
def model():
    return SimpleNamespace(tokenizer=byte_tokenizer(), fingerprint="tiny-model", tokenizer_fingerprint="bytes")


def _open(tmp_path, model, cfg=CFG, embedder=None):
    return Retriever.open(tmp_path, model, cfg, embedder or HashEmbedder())


def test_search_finds_the_document(tmp_path, model):
    r = _open(tmp_path, model)
    r.add_document("cats", "Cats purr and sleep in the sun. A cat chases mice at night.")
    r.add_document("ships", "Ships sail across the ocean. The harbour is full of boats and sailors.")
    hits = r.search("which animal purrs and chases mice", k=2)
    assert hits[0].doc_id == "cats" and hits[0].score > hits[1].score
    assert hits[0].text.startswith("Cats purr") and hits[0].key == r.key(hits[0].token_ids)
    assert list(hits[0].token_ids) == model.tokenizer(hits[0].text, add_special_tokens=False)["input_ids"]


def test_identical_chunks_are_stored_once(tmp_path, model):
    emb = HashEmbedder()
    r = _open(tmp_path, model, embedder=emb)
    shared = paragraphs(6, seed=1)
    a = r.add_document("a", shared)
    texts_after_a = emb.texts
    b = r.add_document("b", shared, metadata={"copy": True})
    assert a.new_chunks == len(a.chunks) > 1 and b.new_chunks == 0
    assert emb.texts == texts_after_a  # nothing re-embedded
    assert [k for k, _ in a.chunks] == [k for k, _ in b.chunks]
    assert len(r.catalog.chunk_keys()) == len(a.chunks) == r.index.ntotal
    assert r.remove_document("a") == ()  # b still uses every chunk: no KV to invalidate
    assert r.index.ntotal == len(b.chunks)


def test_delete_and_replace_invalidate_keys_and_index_rows(tmp_path, model):
    r = _open(tmp_path, model)
    common = "Shared intro paragraph about rivers and stones and the tide. " * 2
    a = r.add_document("a", common + "\n\n" + paragraphs(3, seed=2))
    b = r.add_document("b", common + "\n\n" + paragraphs(3, seed=4))
    keys_a, keys_b = {k for k, _ in a.chunks}, {k for k, _ in b.chunks}
    assert keys_a & keys_b  # the intro chunk is shared
    n = r.index.ntotal
    dropped = r.remove_document("a")
    assert set(dropped) == keys_a - keys_b and r.index.ntotal == n - len(dropped)
    assert all(h.doc_id == "b" for h in r.search("rivers stones tide", k=50))
    assert r.remove_document("a") is None
    # replace b: the chunks only the old text had are invalidated, the unchanged ones are not
    b2 = r.add_document("b", common + "\n\n" + paragraphs(3, seed=9))
    assert b2.status == "replaced"
    assert set(b2.invalidated) == keys_b - {k for k, _ in b2.chunks}
    assert r.index.ntotal == len({k for k, _ in b2.chunks})
    assert r.add_document("b", common + "\n\n" + paragraphs(3, seed=9)).status == "unchanged"


def test_catalog_and_index_survive_restart(tmp_path, model):
    r = _open(tmp_path, model)
    for i in range(4):
        r.add_document(f"d{i}", paragraphs(4, seed=10 + i), metadata={"i": i})
    r.save()
    before = [(h.chunk_id, h.doc_id, round(h.score, 5)) for h in r.search("maple quartz orbit", k=5)]
    r.close()
    r2 = _open(tmp_path, model)
    assert r2.index.generation == r2.catalog.generation and r2.index.ntotal > 0
    assert [(h.chunk_id, h.doc_id, round(h.score, 5)) for h in r2.search("maple quartz orbit", k=5)] == before
    assert r2.catalog.document("d2").metadata == {"i": 2}
    assert r2.add_document("d1", paragraphs(4, seed=11), metadata={"i": 1}).status == "unchanged"


def test_stale_or_missing_index_is_rebuilt_from_catalog(tmp_path, model):
    r = _open(tmp_path, model)
    r.add_document("d0", paragraphs(3, seed=1))
    r.save()
    r.add_document("d1", paragraphs(3, seed=2))  # catalog moved on; the index file was not saved (a crash)
    n = r.index.ntotal
    r.close()
    r2 = _open(tmp_path, model)
    assert r2.index.ntotal == n and r2.index.generation == r2.catalog.generation
    (tmp_path / "index" / "chunks.faiss").write_bytes(b"garbage")
    r2.close()
    r3 = _open(tmp_path, model)
    assert r3.index.ntotal == n
    assert {h.doc_id for h in r3.search("alpha beta", k=n)} == {"d0", "d1"}


def test_catalog_refuses_other_tokenizer(tmp_path, model):
    _open(tmp_path, model).add_document("d", "Some text.")
    other = SimpleNamespace(tokenizer=model.tokenizer, fingerprint="tiny-model", tokenizer_fingerprint="other")
    with pytest.raises(ValueError, match="tokenizer"):
        _open(tmp_path, other)


def test_a_search_only_retriever_needs_no_model(tmp_path, model):
    """`ragkv retrieve` opens the retriever with no model: the hits and their keys are the catalog's, the
    embedder is still checked, documents cannot be added, and a journal is left for the next full open."""
    full = _open(tmp_path, model)
    full.add_document("cats", "Cats purr and sleep in the sun. A cat chases mice at night.")
    full.add_document("ships", "Ships sail across the ocean. The harbour is full of boats and sailors.")
    expected = full.search("which animal purrs", k=2)
    full.close()
    journal = (tmp_path / "documents.journal.jsonl").read_text()

    search_only = Retriever.open(tmp_path, None, CFG, HashEmbedder())
    assert search_only.search("which animal purrs", k=2) == expected  # same hits, same keys, no model
    with pytest.raises(ValueError, match="search only"):
        search_only.add_document("birds", "Birds sing.")
    search_only.close()
    with pytest.raises(ValueError, match="embedder"):  # a question embedded by another encoder would not match
        Retriever.open(tmp_path, None, CFG, SimpleNamespace(name="other", dim=64, embed=None))

    for suffix in ("", "-wal", "-shm"):  # a catalog moved aside: only a retriever with the model rebuilds it
        (tmp_path / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    assert Retriever.open(tmp_path, None, CFG, HashEmbedder()).recovered == 0
    assert (tmp_path / "documents.journal.jsonl").read_text() == journal  # untouched, not compacted away
    assert _open(tmp_path, model).recovered == 2


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_kinds(tmp_path, kind):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((600, 16)).astype(np.float32)  # [N, 16]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(100, 700, dtype=np.int64)
    cfg = RetrieverConfig(index_kind=kind, ivf_nprobe=64)
    index = VectorIndex(16, cfg)
    index.build(ids, vecs)
    assert index.built_kind == kind and not index.needs_rebuild()
    _, got = index.search(vecs[:20], 1)
    assert (got[:, 0] == ids[:20]).mean() >= 0.95
    index.remove(ids[:10])
    if kind == "hnsw":
        assert index.needs_rebuild()  # HNSW cannot delete in place
        index.build(ids[10:], vecs[10:])
    _, got = index.search(vecs[:10], 1)
    assert not set(got[:, 0]) & set(ids[:10])
    index.generation = 7
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", cfg)
    assert loaded.built_kind == kind and loaded.generation == 7 and loaded.ntotal == 590
