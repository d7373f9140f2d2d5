"""What the sidecar needs from an Engine (`ragkv.engine.Engine` is the one implementation; tests use
small stand-ins): tokenize documents, build a request with the configured defaults, answer it as a
stream of text pieces ending in an `Answer`, and the store it reports on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..engine.answer import Answer
from ..engine.request import FusionRequest


class ServedEngine(Protocol):
    store: Any  # a TieredStore: stats, flush, close

    def tokenize_chunks(self, documents: Sequence[str]) -> list[list[int]]: ...

    def request(self, question: str, documents: Sequence[str] | None = None, **options) -> FusionRequest: ...

    def answer_events(self, request: FusionRequest) -> Iterator[str | Answer]: ...
