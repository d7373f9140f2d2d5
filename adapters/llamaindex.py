"""LlamaIndex plugin (`llama-index-core`): `RagkvLlamaRetriever` over the ragkv index, `RagkvLLM` (a
CustomLLM whose `complete(prompt, documents=...)` fuses documents as separate cached chunks) and
`RagkvQueryEngine`, which retrieves and answers with the nodes as chunks, never pasted into a prompt.
In-process (`engine=`) or against a sidecar (`url=`, `api_key=`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.response.schema import Response
from llama_index.core.llms import CompletionResponse, CompletionResponseGen, CustomLLM, LLMMetadata
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from pydantic import PrivateAttr

from .ragkv_backend import Backend, Passage, Reply, backend_for


class RagkvLlamaRetriever(BaseRetriever):
    """The `k` best chunks of the ragkv index as nodes (metadata: chunk_id, doc_id)."""

    def __init__(
        self,
        engine=None,
        url: str | None = None,
        api_key: str | None = None,
        namespace: str | None = None,
        k: int = 4,
        backend: Backend | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend or backend_for(engine, url, api_key, namespace)
        self.k = k

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [
            NodeWithScore(
                node=TextNode(
                    text=p.text, id_=f"chunk-{p.chunk_id}", metadata={"chunk_id": p.chunk_id, "doc_id": p.doc_id}
                ),
                score=p.score,
            )
            for p in self.backend.retrieve(query_bundle.query_str, self.k)
        ]


def to_passages(documents: Sequence[NodeWithScore | TextNode | str]) -> list[Passage]:
    """Nodes (a ragkv `chunk_id` in metadata is kept) or strings -> Passages."""
    out = []
    for d in documents:
        node = d.node if isinstance(d, NodeWithScore) else d
        out.append(
            Passage(str(node)) if isinstance(node, str) else Passage(node.get_content(), node.metadata.get("chunk_id"))
        )
    return out


class RagkvLLM(CustomLLM):
    """An LLM over ragkv; `complete(question, documents=[...])` fuses the documents' cached chunks."""

    strategy: str | None = None
    recompute_ratio: float | None = None
    max_new_tokens: int | None = None
    _backend: Backend = PrivateAttr()

    def __init__(
        self,
        engine=None,
        url: str | None = None,
        api_key: str | None = None,
        namespace: str | None = None,
        backend: Backend | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(**fields)
        self._backend = backend or backend_for(engine, url, api_key, namespace)

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="ragkv", num_output=self.max_new_tokens or 32, is_chat_model=False)

    def _options(self) -> dict:
        return {
            k: v
            for k, v in (
                ("strategy", self.strategy),
                ("recompute_ratio", self.recompute_ratio),
                ("max_new_tokens", self.max_new_tokens),
            )
            if v is not None
        }

    def answer(self, question: str, documents: Sequence = ()) -> Reply:
        """The Reply (text + ragkv accounting) for `question` over `documents`."""
        return self._backend.answer(question, to_passages(documents), **self._options())

    def complete(
        self, prompt: str, formatted: bool = False, documents: Sequence = (), **kwargs: Any
    ) -> CompletionResponse:
        reply = self.answer(prompt, documents)
        return CompletionResponse(text=reply.text, additional_kwargs={"ragkv": reply.info})

    def stream_complete(
        self, prompt: str, formatted: bool = False, documents: Sequence = (), **kwargs: Any
    ) -> CompletionResponseGen:
        text = ""
        for item in self._backend.stream(prompt, to_passages(documents), **self._options()):
            if isinstance(item, Reply):
                yield CompletionResponse(text=text, delta="", additional_kwargs={"ragkv": item.info})
            else:
                text += item
                yield CompletionResponse(text=text, delta=item)


class RagkvQueryEngine(CustomQueryEngine):
    """Retrieve with `retriever`, answer with `llm` over the nodes as separate cached chunks."""

    retriever: BaseRetriever
    llm: RagkvLLM

    def custom_query(self, query_str: str) -> Response:
        nodes = self.retriever.retrieve(query_str)
        reply = self.llm.answer(query_str, nodes)
        return Response(response=reply.text, source_nodes=nodes, metadata={"ragkv": reply.info})
