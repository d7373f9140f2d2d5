"""What the sidecar needs from an Engine (`ragkv.engine.Engine` is the one implementation; tests use
small stand-ins): tokenize documents, build a request with the configured defaults, answer it as a
stream of text pieces ending in an `Answer`, and the store it reports on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from ..engine.answer import Answer
from ..engine.request import FusionRequest


class ServedEngine(Protocol):
    store: Any  # a TieredStore: stats, flush, close

    def tokenize_chunks(self, documents: Sequence[str]) -> list[list[int]]: ...

    def request(self, question: str, documents: Sequence[str] | None = None, **options) -> FusionRequest: ...

    def answer_events(self, request: FusionRequest) -> Iterator[str | Answer]: ...


@runtime_checkable
class BatchingEngine(ServedEngine, Protocol):
    """An engine the scheduler can batch (engine/batch.py): fuse a request to its first-token logits,
    its model and EOS ids for the decode steps, its tokenizer for the text, its configuration and
    prompt template for the batch budget, a fused prompt's answer guard, and the final `Answer`.
    A stand-in without these is served one request at a time."""

    model: Any
    tokenizer: Any
    eos_ids: set[int]
    config: Any  # EngineConfig: the batch budget and, with `template`, each request's size (engine/batch_budget.py)
    template: Any

    def fuse(self, request: FusionRequest) -> Any: ...

    def answer_guard(self, run: Any) -> Any: ...

    def answer(self, fusion: Any, tokens: list[int], text: str, guard: Any = None) -> Answer: ...

    def after_answer(self, fusion: Any) -> None: ...
