"""Shared retrieval in PostgreSQL (retriever/pgvector_index.py): recall@10 against faiss flat, in-place
add/remove, sync with the catalog, and two retrievers on one catalog seeing each other's documents.

Needs PostgreSQL with the `vector` extension (RAGKV_TEST_PG_URL or .ci/pg_url from .ci/postgres.sh,
which installs postgresql-NN-pgvector when apt has it); skips with the reason otherwise. The faiss
fallback (SQLite, or PostgreSQL without pgvector) is checked without any server.
"""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from retriever_fakes import HashEmbedder, paragraphs, tiny_byte_adapter
from storage_helpers import pg_url_or_skip

from ragkv.retriever import RetrieverConfig
from ragkv.retriever.index import VectorIndex
from ragkv.retriever.pgvector_index import TABLE, PgVectorIndex


@pytest.fixture
def pg_engine():
    url = pg_url_or_skip()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is None:
            pytest.skip("PostgreSQL has no pgvector extension (install postgresql-NN-pgvector)")
    yield engine
    with engine.begin() as conn:  # leave nothing for the next test (a catalog binds its model on first use)
        for table in (TABLE, *CATALOG_TABLES):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()


CATALOG_TABLES = ("ragkv_document_chunks", "ragkv_documents", "ragkv_retriever_chunks", "ragkv_retriever_meta")


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)  # [n, dim]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sqlite_catalog_keeps_faiss(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.sqlite'}")
    assert PgVectorIndex.open(engine, 8) is None


def test_recall_at_10_matches_faiss_flat(pg_engine):
    cfg = RetrieverConfig(hnsw_ef_search=100)
    vecs, queries = _unit(2000, 32, 0), _unit(50, 32, 1)
    ids = np.arange(10, 2010, dtype=np.int64)
    pg = PgVectorIndex.open(pg_engine, 32, cfg)
    pg.build(ids, vecs)
    flat = VectorIndex(32)
    flat.build(ids, vecs)
    _, exact = flat.search(queries, 10)
    scores, got = pg.search(queries, 10)
    recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, exact)])
    assert got.shape == (50, 10) and recall >= 0.99
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first, scores are inner products


def test_add_remove_and_sync_in_place(pg_engine):
    pg = PgVectorIndex.open(pg_engine, 8)
    v = _unit(5, 8, 2)
    pg.build(np.arange(5), v)
    pg.remove(np.array([0, 1]))
    assert pg.ntotal == 3 and 0 not in pg.search(v[:1], 5)[1][0]
    assert pg.sync(np.arange(2, 7), np.concatenate([v[2:], _unit(2, 8, 3)])) == (2, 0)
    assert pg.sync(np.arange(3, 7), _unit(4, 8, 3)) == (0, 1) and pg.ntotal == 4
    with pytest.raises(ValueError, match=r"shape \[N, 8\]"):
        pg.add(np.arange(2), _unit(2, 4, 0))


def test_two_retrievers_on_one_catalog_see_each_others_documents(pg_engine, tmp_path):
    from ragkv.retriever import Retriever
    from ragkv.retriever.catalog import Catalog

    url = pg_engine.url.render_as_string(hide_password=False)
    model = tiny_byte_adapter()
    cfg = RetrieverConfig(chunk_min_tokens=64, chunk_max_tokens=128)
    a = Retriever(model, Catalog(url), HashEmbedder(), tmp_path / "a" / "i.faiss", cfg)
    b = Retriever(model, Catalog(url), HashEmbedder(), tmp_path / "b" / "i.faiss", cfg)
    try:
        assert isinstance(a.index, PgVectorIndex) and isinstance(b.index, PgVectorIndex)
        a.add_document("doc-1", paragraphs(3, seed=5))
        hits = b.search("alpha river", 3)
        assert hits and all(h.doc_id == "doc-1" for h in hits)  # committed by a, found by b
    finally:
        for r in (a, b):
            for d in r.catalog.document_ids():
                r.remove_document(d)
            r.close()


def test_postgres_without_pgvector_keeps_faiss():
    url = pg_url_or_skip()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        has = conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
    if has is not None:
        pytest.skip("this PostgreSQL has pgvector")
    assert PgVectorIndex.open(engine, 8) is None
    engine.dispose()
