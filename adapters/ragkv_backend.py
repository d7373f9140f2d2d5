"""The one interface the LangChain and LlamaIndex plugins talk to: retrieve passages and answer a
question over passages passed as separate chunks (so each chunk's cached KV is reused), either
in-process (`LocalBackend` over an `Engine`) or against a running sidecar (`HttpBackend`).

A passage that came from the ragkv index carries its `chunk_id`, and is sent by id: the exact token
ids that were ingested (and precomputed) are fused, not a re-tokenization of its text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    """A piece of context: its text and, when it came from the ragkv index, its chunk id."""

    text: str
    chunk_id: int | None = None
    doc_id: str | None = None
    score: float | None = None


@dataclass(frozen=True)
class Reply:
    """An answer and the server/engine accounting (ttft_ms, parts_ms, hits, misses, recompute_fraction...)."""

    text: str
    info: dict = field(default_factory=dict)


class Backend(ABC):
    """Where answers come from."""

    @abstractmethod
    def retrieve(self, query: str, k: int) -> list[Passage]:
        """The `k` best ingested chunks for `query`."""

    @abstractmethod
    def answer(self, question: str, passages: Sequence[Passage | str], **options) -> Reply:
        """Answer `question` with each passage as its own chunk; options: strategy, recompute_ratio, max_new_tokens."""

    def stream(self, question: str, passages: Sequence[Passage | str], **options) -> Iterator[str | Reply]:
        """Text pieces, then the Reply (default: the whole answer as one piece)."""
        reply = self.answer(question, passages, **options)
        yield reply.text
        yield reply

    @abstractmethod
    def add_documents(self, documents: Sequence[dict]) -> dict:
        """Ingest `[{id, text, metadata?}]` into this backend's namespace."""


def _passage(p: Passage | str) -> Passage:
    return p if isinstance(p, Passage) else Passage(str(p))


class LocalBackend(Backend):
    """An in-process Engine and its `namespace`'s document index."""

    def __init__(self, engine, namespace: str | None = None) -> None:
        from ..engine.documents import DocumentService

        self.engine = engine
        self.namespace = namespace or engine.config.namespace
        self.documents = DocumentService(engine)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        return [Passage(h.text, h.chunk_id, h.doc_id, h.score) for h in self.documents.search(self.namespace, query, k)]

    def _chunks(self, passages: Sequence[Passage | str]) -> list[list[int]]:
        ps = [_passage(p) for p in passages]
        by_id = [p.chunk_id for p in ps if p.chunk_id is not None]
        ids = iter(self.documents.chunk_ids(self.namespace, by_id) if by_id else [])
        texts = iter(self.engine.tokenize_chunks([p.text for p in ps if p.chunk_id is None]))
        return [next(ids) if p.chunk_id is not None else next(texts) for p in ps]

    def stream(self, question: str, passages: Sequence[Passage | str], **options) -> Iterator[str | Reply]:
        for item in self.engine.generate(
            question, chunks=self._chunks(passages), stream=True, namespace=self.namespace, **options
        ):
            yield item if isinstance(item, str) else Reply(item.text, item.to_dict())

    def answer(self, question: str, passages: Sequence[Passage | str], **options) -> Reply:
        """Read whole (not streamed): the answer guard may take back tokens decided off the exact path."""
        answer = self.engine.generate(question, chunks=self._chunks(passages), namespace=self.namespace, **options)
        return Reply(answer.text, answer.to_dict())

    def add_documents(self, documents: Sequence[dict]) -> dict:
        return self.documents.ingest(self.namespace, documents)


class HttpBackend(Backend):
    """A running `ragkv serve` (its API key decides the namespace)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        from ..server.client import RagkvClient

        self.client = RagkvClient(url, api_key=api_key, timeout=timeout)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        return [Passage(c["text"], c["chunk_id"], c["doc_id"], c["score"]) for c in self.client.retrieve(query, k)]

    def answer(self, question: str, passages: Sequence[Passage | str], **options) -> Reply:
        docs = [{"chunk_id": p.chunk_id} if p.chunk_id is not None else p.text for p in map(_passage, passages)]
        out = self.client.generate(question, docs, **options)
        return Reply(out.pop("text"), out)

    def add_documents(self, documents: Sequence[dict]) -> dict:
        return self.client.add_documents(documents)


def backend_for(
    engine=None, url: str | None = None, api_key: str | None = None, namespace: str | None = None
) -> Backend:
    """`LocalBackend(engine)` or `HttpBackend(url)`; exactly one of `engine` and `url`."""
    if (engine is None) == (url is None):
        raise ValueError("give exactly one of engine= (in-process) and url= (a running `ragkv serve`)")
    if isinstance(engine, Backend):
        return engine
    return LocalBackend(engine, namespace) if engine is not None else HttpBackend(url, api_key)
