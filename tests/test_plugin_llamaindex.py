"""LlamaIndex plugin with the real llama-index-core: a query engine answers over ingested documents
with the retrieved nodes fused as cached chunks, and a second call hits the chunk caches."""

from __future__ import annotations

import pytest
from plugin_helpers import hits, local_backend, needs_retrieval

pytest.importorskip("llama_index.core")
pytestmark = needs_retrieval


@pytest.fixture(scope="module")
def backend(smollm2, tmp_path_factory):
    return local_backend(smollm2, tmp_path_factory.mktemp("li"))


def test_query_engine_answers_and_second_call_hits(backend):
    from ragkv.adapters.llamaindex import RagkvLlamaRetriever, RagkvLLM, RagkvQueryEngine

    engine = RagkvQueryEngine(
        retriever=RagkvLlamaRetriever(backend=backend, k=2), llm=RagkvLLM(backend=backend, max_new_tokens=6)
    )
    first = engine.query("Who wrote the first computer program?")
    second = engine.query("Who wrote the first computer program?")
    assert str(first).strip() and str(second) == str(first)
    assert first.source_nodes[0].node.metadata["doc_id"] == "ada"
    assert hits(second.metadata["ragkv"]) == 2 and second.metadata["ragkv"]["misses"] == 0


def test_llm_complete_and_stream_with_documents(backend):
    from ragkv.adapters.llamaindex import RagkvLLM

    llm = RagkvLLM(backend=backend, max_new_tokens=4)
    docs = ["Mars has two moons.", "Jupiter has many moons."]
    a = llm.complete("How many moons does Mars have?", documents=docs)
    pieces = list(llm.stream_complete("How many moons does Mars have?", documents=docs))
    assert a.text.strip() and pieces[-1].text.strip() == a.text.strip()
    assert a.additional_kwargs["ragkv"]["misses"] == 2 and hits(pieces[-1].additional_kwargs["ragkv"]) == 2
