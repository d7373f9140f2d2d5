"""Retrievers sharing one catalog: tenants isolated over one shared SQLite and one shared PostgreSQL
database; several processes on one data dir see each other's documents (the index follows the
catalog), a save never stamps a stale index, and a catalog of the unscoped layout is migrated."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from retriever_fakes import HashEmbedder, byte_tokenizer
from storage_helpers import pg_url_or_skip, unique_name

from ragkv.retriever import Catalog, Retriever, RetrieverConfig, VectorIndex

CFG = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def model():
    return SimpleNamespace(tokenizer=byte_tokenizer(), fingerprint="tiny-model", tokenizer_fingerprint="bytes")


def _open(path, model, namespace="default", url=None):
    cfg = RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120, namespace=namespace)
    return Retriever.open(path, model, cfg, HashEmbedder(), catalog_url=url)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.sqlite'}"
        return
    url = pg_url_or_skip()
    yield url
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # leave nothing for the next run
        for table in ("ragkv_document_chunks", "ragkv_documents", "ragkv_retriever_chunks", "ragkv_retriever_meta"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    engine.dispose()


def test_tenants_sharing_one_catalog_are_isolated(tmp_path, model, shared_url):
    a_ns, b_ns = unique_name("tenant-a"), unique_name("tenant-b")
    a = _open(tmp_path / "a", model, a_ns, shared_url)
    b = _open(tmp_path / "b", model, b_ns, shared_url)
    secret = a.add_document("secret", "The vault code of tenant alpha is quartz maple orbit.")
    b.add_document("public", "Tenant beta writes about rivers and stones and the tide.")
    b.add_document("secret", "Beta has its own document under the same id: lamps and clouds.")  # no clash
    assert b.catalog.document("secret").content_hash != a.catalog.document("secret").content_hash
    hits = b.search("vault code quartz maple orbit", k=50)
    assert hits and all(h.key.namespace == b_ns for h in hits)
    assert "quartz" not in " ".join(h.text for h in hits)
    a_ids = [cid for cid, _, _ in a.catalog.document("secret").chunks]
    assert b.catalog.chunks(a_ids) == {}  # chunk ids of another tenant are unknown here
    assert sorted(b.catalog.document_ids()) == ["public", "secret"] and a.catalog.document_ids() == ["secret"]
    assert set(b.chunk_keys()).isdisjoint(k for k, _ in secret.chunks)
    assert b.remove_document("secret") is not None and a.catalog.document("secret") is not None
    fresh_b = _open(tmp_path / "b2", model, b_ns, shared_url)  # a rebuilt index holds only b's chunks
    assert fresh_b.index.ntotal == len(fresh_b.chunk_keys()) and all(
        h.key.namespace == b_ns for h in fresh_b.search("quartz maple orbit vault", k=50)
    )
    for r in (a, b, fresh_b):
        r.close()


def test_the_index_follows_another_processes_writes(tmp_path, model):
    one = _open(tmp_path, model)
    two = _open(tmp_path, model)  # a second process on the same data dir
    one.add_document("cats", "Cats purr and sleep in the sun. A cat chases mice at night.")
    two.add_document("ships", "Ships sail across the ocean. The harbour is full of boats and sailors.")
    one.add_document("birds", "Birds sing at dawn and fly south in winter over the hills.")
    assert two.search("cats purr mice", k=1)[0].doc_id == "cats"
    assert one.search("ships harbour sailors", k=1)[0].doc_id == "ships"
    two.add_document("owls", "Owls hunt at night in the quiet forest and hoot.")
    one.save()  # must not stamp an index without "owls" with the catalog's generation
    assert VectorIndex.load(tmp_path / "index" / "chunks.faiss", CFG).generation == one.catalog.generation
    restarted = _open(tmp_path, model)
    for doc, query in [
        ("cats", "cats purr mice"),
        ("ships", "ships harbour sailors"),
        ("birds", "birds sing dawn"),
        ("owls", "owls hunt forest hoot"),
    ]:
        assert restarted.search(query, k=1)[0].doc_id == doc
    for r in (one, two, restarted):
        r.close()


_PROCESS = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    sys.path.insert(0, sys.argv[1])
    from retriever_fakes import HashEmbedder, byte_tokenizer
    from ragkv.retriever import Retriever, RetrieverConfig
    data, name, n = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    def text(who, i):  # four unrelated words per document: the hashing embedder tells them apart
        return " ".join(hashlib.sha1(f"{who}/{i}/{j}".encode()).hexdigest()[:12] for j in range(4))
    model = SimpleNamespace(tokenizer=byte_tokenizer(), fingerprint="tiny-model", tokenizer_fingerprint="bytes")
    r = Retriever.open(data, model, RetrieverConfig(chunk_min_tokens=60, chunk_max_tokens=120), HashEmbedder())
    for i in range(n):
        r.add_document(f"{name}-{i}", text(name, i))
        if i % 10 == 0:
            r.save()
    r.save()
    (data / f"{name}.done").touch()
    while len(list(data.glob("*.done"))) < int(sys.argv[5]):
        time.sleep(0.05)
    found = {
        who: sum(r.search(text(who, i), k=1)[0].doc_id == f"{who}-{i}" for i in range(n))
        for who in sys.argv[6:]
    }
    r.close()
    print(json.dumps({"found": found}))
    """
)


def test_three_processes_on_one_data_dir_lose_no_document(tmp_path, model):
    """Two 'servers' and an 'ingest', 12 documents each, then a restart (a fresh retriever here): all found
    by everyone. (`docs/BENCHMARKS.md` has the same with 50 documents each.)"""
    names, n = ["serve1", "serve2", "ingest"], 12
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "ragkv").symlink_to(TESTS.parent)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "py")}
    data = tmp_path / "data"
    data.mkdir()
    Catalog(f"sqlite:///{data / 'catalog.sqlite'}").close()  # create the tables once, before the race

    def run(name, count):
        args = [str(TESTS), str(data), name, str(count), str(len(names)), *names]
        return subprocess.Popen([sys.executable, "-c", _PROCESS, *args], env=env, stdout=subprocess.PIPE, text=True)

    procs = [run(name, n) for name in names]
    found = [json.loads(p.communicate(timeout=240)[0])["found"] for p in procs]
    assert found == [dict.fromkeys(names, n)] * len(names)
    restarted = Retriever.open(data, model, CFG, HashEmbedder())

    def text(who, i):
        return " ".join(hashlib.sha1(f"{who}/{i}/{j}".encode()).hexdigest()[:12] for j in range(4))

    found = {who: sum(restarted.search(text(who, i), k=1)[0].doc_id == f"{who}-{i}" for i in range(n)) for who in names}
    assert found == dict.fromkeys(names, n)
    restarted.close()


def test_an_unscoped_catalog_is_migrated(tmp_path, model):
    db = tmp_path / "catalog.sqlite"
    with sqlite3.connect(db) as conn:  # the first layout: no namespace columns
        conn.executescript(
            """
            CREATE TABLE ragkv_retriever_meta (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE ragkv_documents (id VARCHAR(512) PRIMARY KEY, source TEXT NOT NULL,
                content_hash VARCHAR(64) NOT NULL, metadata JSON NOT NULL, num_tokens INTEGER NOT NULL,
                updated FLOAT NOT NULL);
            CREATE TABLE ragkv_retriever_chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, key VARCHAR(160) NOT NULL
                UNIQUE, text TEXT NOT NULL, token_ids BLOB NOT NULL, num_tokens INTEGER NOT NULL,
                embedding BLOB NOT NULL);
            CREATE TABLE ragkv_document_chunks (doc_id VARCHAR(512), position INTEGER, chunk_id INTEGER NOT NULL,
                overlap INTEGER NOT NULL, PRIMARY KEY (doc_id, position));
            """
        )
        vec = HashEmbedder().embed(["tenant words here"])[0].tobytes()
        conn.execute(
            "INSERT INTO ragkv_retriever_chunks VALUES (1, 'acme/' || ?, 'tenant words here', ?, 1, ?)",
            ("a" * 64, b"\x01\x00\x00\x00", vec),
        )
        conn.execute("INSERT INTO ragkv_documents VALUES ('d1', 'api', 'h', '{\"x\": 1}', 1, 0)")
        conn.execute("INSERT INTO ragkv_document_chunks VALUES ('d1', 0, 1, 0)")
        conn.execute("INSERT INTO ragkv_retriever_meta VALUES ('generation', '4')")
    acme = Catalog(f"sqlite:///{db}", "acme")
    doc = acme.document("d1")
    assert doc is not None and doc.metadata == {"x": 1} and doc.chunks == ((1, "acme/" + "a" * 64, 0),)
    assert Catalog(f"sqlite:///{db}", "default").document("d1") is None and acme.generation == 5
