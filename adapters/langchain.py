"""LangChain plugin (`langchain-core`): `RagkvRetriever` over the ragkv index and `RagkvChatModel`, a
chat model that fuses the documents it is given as separate cached chunks instead of pasting them
into the prompt. Both work in-process (`engine=`) or against a sidecar (`url=`, `api_key=`).

Documents reach the chat model as `documents=` at invoke time or in the last human message's
`additional_kwargs["documents"]` (what `with_documents` builds); `rag_chain(retriever, chat)` is the
LCEL chain `question -> retrieve -> chat -> text`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

from .ragkv_backend import Backend, Passage, Reply, backend_for


class _Connected:
    """Fields shared by the retriever and the chat model: where ragkv runs."""

    def _connect(self) -> Backend:
        return backend_for(self.engine, self.url, self.api_key, self.namespace)


class RagkvRetriever(_Connected, BaseRetriever):
    """The `k` best chunks of the ragkv index as Documents (metadata: chunk_id, doc_id, score)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    engine: Any = None
    url: str | None = None
    api_key: str | None = None
    namespace: str | None = None
    k: int = 4
    _backend: Backend = PrivateAttr()

    def model_post_init(self, _: Any) -> None:
        self._backend = self._connect()

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [
            Document(page_content=p.text, metadata={"chunk_id": p.chunk_id, "doc_id": p.doc_id, "score": p.score})
            for p in self._backend.retrieve(query, self.k)
        ]


def to_passages(documents: Sequence[Document | str]) -> list[Passage]:
    """LangChain Documents (a ragkv `chunk_id` in metadata is kept) or strings -> Passages."""
    return [
        Passage(d.page_content, d.metadata.get("chunk_id")) if isinstance(d, Document) else Passage(str(d))
        for d in documents
    ]


def with_documents(question: str, documents: Sequence[Document | str]) -> HumanMessage:
    """A human message carrying `documents` for RagkvChatModel (each becomes its own cached chunk)."""
    return HumanMessage(content=question, additional_kwargs={"documents": list(documents)})


class RagkvChatModel(_Connected, BaseChatModel):
    """A chat model answering over documents fused from their cached chunk KV."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    engine: Any = None
    url: str | None = None
    api_key: str | None = None
    namespace: str | None = None
    strategy: str | None = None
    recompute_ratio: float | None = None
    max_new_tokens: int | None = None
    _backend: Backend = PrivateAttr()

    def model_post_init(self, _: Any) -> None:
        self._backend = self._connect()

    @property
    def _llm_type(self) -> str:
        return "ragkv"

    def _request(self, messages: list[BaseMessage], documents) -> tuple[str, list[Passage], dict]:
        humans = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
        if not humans:
            raise ValueError("RagkvChatModel needs a human message: the last one is the question")
        last = messages[humans[-1]]
        docs = documents if documents is not None else last.additional_kwargs.get("documents", [])
        history = [f"{m.type.capitalize()}: {m.text}" for m in messages[: humans[-1]] if m.text]
        question = "\n".join([*history, f"User: {last.text}"]) if history else last.text
        options = {
            k: v
            for k, v in (
                ("strategy", self.strategy),
                ("recompute_ratio", self.recompute_ratio),
                ("max_new_tokens", self.max_new_tokens),
            )
            if v is not None
        }
        return question, to_passages(docs), options

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        documents=None,
        **kwargs: Any,
    ) -> ChatResult:
        question, passages, options = self._request(messages, documents)
        reply = self._backend.answer(question, passages, **options)
        message = AIMessage(content=reply.text, response_metadata={"ragkv": reply.info})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        documents=None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        question, passages, options = self._request(messages, documents)
        for item in self._backend.stream(question, passages, **options):
            if isinstance(item, Reply):
                yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata={"ragkv": item.info}))
            else:
                if run_manager:
                    run_manager.on_llm_new_token(item)
                yield ChatGenerationChunk(message=AIMessageChunk(content=item))


def rag_chain(retriever: BaseRetriever, chat: BaseChatModel, parse: bool = True):
    """LCEL: question -> {documents: retriever, question} -> message with documents -> chat (-> text)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    chain = (
        {"documents": retriever, "question": RunnablePassthrough()}
        | RunnableLambda(lambda x: [with_documents(x["question"], x["documents"])])
        | chat
    )
    return chain | StrOutputParser() if parse else chain
