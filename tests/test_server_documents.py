"""The sidecar's document endpoints over loopback: ingest, get, retrieve and delete per tenant; chat
with `retrieve` and with chunk ids fuses the ingested KV (hits, no misses); another tenant sees none
of it; and the LangChain / LlamaIndex plugins work against the sidecar (`url=`)."""

from __future__ import annotations

import httpx
import pytest
from plugin_helpers import DOCS, hits, needs_retrieval
from server_helpers import running_server

pytestmark = needs_retrieval
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("docs"), api_keys=KEYS, max_new_tokens=6) as (url, _):
        r = httpx.post(f"{url}/v1/documents", headers=A, json={"documents": DOCS}, timeout=300)
        assert r.status_code == 200 and r.json()["added"] == 3, r.text
        yield url


def chat(url, headers, **extra):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        timeout=120,
        json={"messages": [{"role": "user", "content": "Where does the Rhine bend north?"}], **extra},
    )
    return r


def test_get_retrieve_and_tenant_isolation(url):
    doc = httpx.get(f"{url}/v1/documents/rhine", headers=A).json()
    assert doc["id"] == "rhine" and len(doc["chunks"]) == 1 and doc["chunks"][0]["key"].startswith("tenant-a/")
    assert httpx.get(f"{url}/v1/documents/rhine", headers=B).status_code == 404
    found = httpx.post(f"{url}/v1/retrieve", headers=A, json={"query": "Rhine Basel", "k": 2}).json()["chunks"]
    assert found[0]["doc_id"] == "rhine"
    assert httpx.post(f"{url}/v1/retrieve", headers=B, json={"query": "Rhine Basel", "k": 2}).json()["chunks"] == []


def test_chat_with_retrieve_and_chunk_ids_hits_ingested_kv(url):
    r = chat(url, A, retrieve={"k": 2}).json()["ragkv"]
    assert hits(r) == 2 and r["misses"] == 0 and r["retrieved"][0]["doc_id"] == "rhine"
    cid = r["retrieved"][0]["chunk_id"]
    by_id = chat(url, A, documents=[{"chunk_id": cid}]).json()["ragkv"]
    assert hits(by_id) == 1 and by_id["misses"] == 0
    other = chat(url, B, documents=[{"chunk_id": cid}])
    assert other.status_code == 404 and "unknown chunk_id" in other.json()["error"]["message"]


def test_plugins_against_the_sidecar(url):
    pytest.importorskip("langchain_core", reason="the langchain extra is not installed: pip install -e '.[langchain]'")
    pytest.importorskip(
        "llama_index.core", reason="the llamaindex extra is not installed: pip install -e '.[llamaindex]'"
    )
    from ragkv.adapters.langchain import RagkvChatModel, RagkvRetriever, rag_chain
    from ragkv.adapters.llamaindex import RagkvLlamaRetriever, RagkvLLM, RagkvQueryEngine

    chain = rag_chain(
        RagkvRetriever(url=url, api_key="key-a", k=2), RagkvChatModel(url=url, api_key="key-a"), parse=False
    )
    m = chain.invoke("Who wrote the first computer program?")
    assert m.content.strip() and hits(m.response_metadata["ragkv"]) == 2
    qe = RagkvQueryEngine(
        retriever=RagkvLlamaRetriever(url=url, api_key="key-a", k=2), llm=RagkvLLM(url=url, api_key="key-a")
    )
    resp = qe.query("Which way does Venus spin?")
    assert str(resp).strip() and hits(resp.metadata["ragkv"]) == 2 and resp.metadata["ragkv"]["misses"] == 0


def test_delete_document(url):
    r = httpx.delete(f"{url}/v1/documents/venus", headers=A).json()
    assert r["deleted"] and len(r["invalidated_keys"]) == 1
    assert httpx.get(f"{url}/v1/documents/venus", headers=A).status_code == 404
    assert httpx.delete(f"{url}/v1/documents/venus", headers=A).status_code == 404
