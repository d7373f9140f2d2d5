"""A sidecar whose document catalog is on PostgreSQL keeps answering when the database goes away:
completions and /v1/retrieve answer 200 from the local index and the catalog rows read before, with
a warning; /metrics says the catalog is down; document writes answer 503 with Retry-After (never 500);
the link reconnects by itself; a restarted sidecar finds every document committed before the outage.
The outage is a TCP proxy in front of the test PostgreSQL that the test cuts (the database itself
keeps running for everyone else); the test works in a database of its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
import sqlalchemy as sa
from retriever_fakes import HashEmbedder
from storage_helpers import pg_url_or_skip
from tcp_proxy import TcpProxy
from tiny_engine import tiny_engine_adapter

from ragkv.engine import Engine, EngineConfig
from ragkv.retriever import RetrieverConfig
from ragkv.retriever.pgvector_index import PgVectorIndex
from ragkv.storage import MemoryTier, TieredStore

DOCS = [
    {"id": "rhine", "text": "The Rhine bends north at Basel and flows past the old stone bridge to the sea."},
    {"id": "lake", "text": "Lake Constance feeds the Rhine; maple trees line the quartz road by the lake."},
]
ASK = {"messages": [{"role": "user", "content": "Where does the Rhine bend?"}], "max_tokens": 2}
RETRIEVE = {**ASK, "retrieve": {"query": "Where does the Rhine bend?", "k": 2}}


@pytest.fixture
def pg_database():
    """A fresh database on the test PostgreSQL (skips without one), dropped afterwards."""
    url = pg_url_or_skip()
    name = f"ragkv_outage_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield sa.engine.make_url(url).set(database=name)
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _app(catalog_url: str, data_dir):
    from ragkv.server.app import create_app
    from ragkv.server.settings import load_settings

    config = EngineConfig(
        data_dir=str(data_dir),
        catalog_url=catalog_url,
        max_new_tokens=2,
        retriever=RetrieverConfig(chunk_min_tokens=8, chunk_max_tokens=64),
    )
    engine = Engine(tiny_engine_adapter(), TieredStore([MemoryTier()]), config, embedder=HashEmbedder())
    return create_app(load_settings(data_dir=str(data_dir), max_new_tokens=2), engine), engine


def _ingested_behind_a_proxy(pg_database, data_dir):
    """(proxy, catalog URL through it, app, engine): a sidecar whose catalog is reached through a TCP
    proxy, with DOCS ingested and one retrieval answered (both checked) before anything is cut."""
    proxy = TcpProxy(pg_database.host or "127.0.0.1", pg_database.port or 5432)
    url = pg_database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    app, engine = _app(url, data_dir)
    added, before = _call(
        app, ("POST", "/v1/documents", {"documents": DOCS}), ("POST", "/v1/chat/completions", RETRIEVE)
    )
    assert added.status_code == 200 and added.json()["added"] == 2
    assert before.status_code == 200 and len(before.json()["ragkv"]["retrieved"]) == 2
    assert before.json()["ragkv"]["warnings"] == []
    return proxy, url, app, engine


def _call(app, *requests):
    """Send (method, path, json) requests in order to `app`; their responses."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
            return [await c.request(m, path, json=body) for m, path, body in requests]

    return asyncio.run(main())


def test_a_catalog_outage_degrades_answers_and_a_restart_keeps_what_was_committed(pg_database, tmp_path, monkeypatch):
    # the local faiss index answers during the outage; with pgvector (now in CI's PostgreSQL) the index lives
    # in the unreachable database, so searches find nothing then: see the next test
    monkeypatch.setattr(PgVectorIndex, "open", classmethod(lambda cls, *a, **k: None))
    proxy, url, app, engine = _ingested_behind_a_proxy(pg_database, tmp_path / "a")

    proxy.cut()  # PostgreSQL is gone for this sidecar
    during = _call(
        app,
        ("POST", "/v1/chat/completions", RETRIEVE),
        ("POST", "/v1/chat/completions", {**ASK, "documents": ["The Rhine bends north at Basel."]}),
        ("POST", "/v1/retrieve", {"query": "Rhine", "k": 2}),
        ("POST", "/v1/documents", {"documents": [{"id": "new", "text": "A document written during the outage."}]}),
        ("POST", "/v1/chat/completions", {**ASK, "documents": [{"chunk_id": 10**6}]}),  # a row never read
        ("GET", "/metrics", None),
    )
    answer, given, searched, write, by_id, metrics = during
    assert answer.status_code == 200 and given.status_code == 200 and searched.status_code == 200
    assert by_id.status_code == 200 and "answered without the documents given as chunk_id" in str(by_id.json())
    r = answer.json()["ragkv"]
    assert len(r["retrieved"]) == 2  # the local index and the rows read before the outage
    assert any("document catalog" in w and "unreachable" in w for w in r["warnings"])
    assert given.json()["ragkv"]["warnings"] and searched.json()["warnings"] and searched.json()["chunks"]
    assert write.status_code == 503 and "Retry-After" in write.headers and "unreachable" in write.text
    m = metrics.text
    assert "ragkv_catalog_up 0.0" in m and "ragkv_catalog_outages 1.0" in m and "ragkv_degraded_answers_total 3.0" in m

    proxy.restore()
    link = next(iter(engine.catalog_links.values()))
    link._retry_at = 0.0  # the backoff has passed: the next call probes and reconnects
    after, metrics = _call(app, ("POST", "/v1/chat/completions", RETRIEVE), ("GET", "/metrics", None))
    assert after.status_code == 200 and after.json()["ragkv"]["warnings"] == [] and link.up
    assert "ragkv_catalog_up 1.0" in metrics.text
    app.state.worker.close()

    restarted, _ = _app(url, tmp_path / "b")  # a new sidecar (its own empty index dir) on the same catalog
    got, found = _call(
        restarted, ("GET", "/v1/documents/rhine", None), ("POST", "/v1/retrieve", {"query": "Lake Constance", "k": 2})
    )
    assert got.status_code == 200 and got.json()["id"] == "rhine"
    assert {c["doc_id"] for c in found.json()["chunks"]} == {"rhine", "lake"}
    restarted.state.worker.close()
    proxy.close()


def test_a_sidecar_started_while_the_catalog_is_down_answers_and_opens_it_later(pg_database, tmp_path):
    proxy = TcpProxy(pg_database.host or "127.0.0.1", pg_database.port or 5432)
    url = pg_database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.cut()
    app, engine = _app(url, tmp_path)
    retrieve = {**ASK, "retrieve": {"query": "Rhine", "k": 2}}
    (down,) = _call(app, ("POST", "/v1/chat/completions", retrieve))
    assert down.status_code == 200 and down.json()["ragkv"]["retrieved"] == []
    assert any("document catalog" in w for w in down.json()["ragkv"]["warnings"])
    proxy.restore()
    next(iter(engine.catalog_links.values()))._retry_at = 0.0
    added, up = _call(app, ("POST", "/v1/documents", {"documents": DOCS}), ("POST", "/v1/chat/completions", retrieve))
    assert added.status_code == 200 and up.status_code == 200 and up.json()["ragkv"]["retrieved"]
    assert up.json()["ragkv"]["warnings"] == []
    app.state.worker.close()
    proxy.close()


def test_connections_the_server_killed_are_replaced_without_a_warning(pg_database, tmp_path):
    url = pg_database.render_as_string(hide_password=False)
    app, engine = _app(url, tmp_path)
    retrieve = {**ASK, "retrieve": {"query": "Rhine", "k": 2}}
    (added,) = _call(app, ("POST", "/v1/documents", {"documents": DOCS}))
    assert added.status_code == 200
    admin = sa.create_engine(url)
    with admin.connect() as conn:  # as a PostgreSQL restart does to every pooled connection
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
    admin.dispose()
    assert killed >= 1
    (answer,) = _call(app, ("POST", "/v1/chat/completions", retrieve))
    assert answer.status_code == 200 and answer.json()["ragkv"]["retrieved"]
    assert answer.json()["ragkv"]["warnings"] == []  # pre-ping replaced the dead connection: no outage
    assert all(link.outages == 0 for link in engine.catalog_links.values())
    app.state.worker.close()


def test_with_pgvector_a_catalog_outage_answers_without_retrieval_and_says_so(pg_database, tmp_path):
    with sa.create_engine(pg_database).connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first() is None:
            pytest.skip("this PostgreSQL has no pgvector")
    proxy, _, app, _ = _ingested_behind_a_proxy(pg_database, tmp_path / "a")
    proxy.cut()
    (during,) = _call(app, ("POST", "/v1/chat/completions", RETRIEVE))
    assert during.status_code == 200 and during.json()["ragkv"]["retrieved"] == []
    assert any("unreachable" in w for w in during.json()["ragkv"]["warnings"])
    proxy.restore()
    app.state.worker.close()
