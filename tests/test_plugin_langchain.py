"""LangChain plugin with the real langchain-core: an LCEL chain answers over ingested documents, the
retrieved chunks are fused by id from their cached KV, and a second call hits the chunk caches."""

from __future__ import annotations

import pytest
from plugin_helpers import hits, local_backend, needs_retrieval

pytest.importorskip("langchain_core")
pytestmark = needs_retrieval

QUESTION = "Where does the Rhine bend north?"


@pytest.fixture(scope="module")
def backend(smollm2, tmp_path_factory):
    return local_backend(smollm2, tmp_path_factory.mktemp("lc"))


def test_retriever_returns_ragkv_chunks(backend):
    from ragkv.adapters.langchain import RagkvRetriever

    docs = RagkvRetriever(engine=backend, k=2).invoke(QUESTION)
    assert len(docs) == 2 and docs[0].metadata["doc_id"] == "rhine" and docs[0].metadata["chunk_id"] is not None


def test_lcel_chain_answers_and_second_call_hits_caches(backend):
    from ragkv.adapters.langchain import RagkvChatModel, RagkvRetriever, rag_chain

    chain = rag_chain(
        RagkvRetriever(engine=backend, k=2), RagkvChatModel(engine=backend, max_new_tokens=6), parse=False
    )
    first = chain.invoke(QUESTION)
    second = chain.invoke(QUESTION)
    assert first.content.strip() and second.content == first.content
    info = second.response_metadata["ragkv"]
    assert hits(info) == 2 and info["misses"] == 0  # ingested chunks, sent by id: their precomputed KV is fused
    text = "".join(
        rag_chain(RagkvRetriever(engine=backend, k=2), RagkvChatModel(engine=backend, max_new_tokens=6)).stream(
            QUESTION
        )
    )
    assert text.strip() == first.content.strip()


def test_chat_model_with_plain_documents_caches_them(backend):
    from ragkv.adapters.langchain import RagkvChatModel, with_documents

    chat = RagkvChatModel(engine=backend, max_new_tokens=4)
    docs = ["Mercury is the closest planet to the Sun.", "Neptune is the farthest planet."]
    a = chat.invoke([with_documents("Which planet is closest to the Sun?", docs)]).response_metadata["ragkv"]
    b = chat.invoke("Which planet is closest to the Sun?", documents=docs).response_metadata["ragkv"]
    assert a["misses"] == 2 and hits(b) == 2 and b["misses"] == 0
