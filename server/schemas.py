"""Request schemas of the HTTP API: the OpenAI chat / completion bodies plus ragkv's own fields
(`documents`, `retrieve`, `blend`), and the document / retrieval endpoints. Unknown OpenAI fields
(top_p, seed, ...) are accepted and ignored; ragkv fields are strict.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..blend.config import validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlendOptions(_Strict):
    """How the request's chunks are fused (server defaults where absent)."""

    strategy: str | None = None
    recompute_ratio: float | None = None

    @model_validator(mode="after")
    def _check(self) -> BlendOptions:
        validate(self.strategy or "cacheblend", 0.0 if self.recompute_ratio is None else self.recompute_ratio)
        return self


class RetrieveOptions(_Strict):
    """Search the tenant's ingested chunks; `query` defaults to the question."""

    query: str | None = None
    k: int = Field(4, ge=1)


class TextDocument(_Strict):
    text: str


class ChunkRef(_Strict):
    """An ingested chunk by its catalog id (as `/v1/retrieve` returns it)."""

    chunk_id: int = Field(ge=0)


DocumentItem = str | TextDocument | ChunkRef


class RagkvFields(BaseModel):
    """The ragkv extension fields shared by both completion endpoints."""

    documents: list[DocumentItem] | None = None
    retrieve: RetrieveOptions | None = None
    blend: BlendOptions | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for p in self.content:
            if p.type != "text":
                raise ValueError(f"messages: content part type {p.type!r} is not supported; accepted: text")
        return "".join(p.text or "" for p in self.content)


class _Completion(RagkvFields):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Completion):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages is empty: send at least one user message (the question)")
        if not any(m.role == "user" and m.text().strip() for m in v):
            raise ValueError("messages has no user message with text: the last user message is the question")
        return v


class CompletionRequest(_Completion):
    """`POST /v1/completions`: the prompt is the question."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) != 1 or not texts[0].strip():
            raise ValueError("prompt must be one non-empty string (batched prompts are not supported)")
        return v


class DocumentIn(_Strict):
    """One document to ingest."""

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)
    metadata: dict = Field(default_factory=dict)


class DocumentsRequest(_Strict):
    """`POST /v1/documents`."""

    documents: list[DocumentIn] = Field(min_length=1)


class RetrieveRequest(_Strict):
    """`POST /v1/retrieve`."""

    query: str = Field(min_length=1)
    k: int = Field(4, ge=1)


def chat_question(messages: list[ChatMessage]) -> str:
    """The question of a chat: the last user message. System messages and earlier turns, if any, are
    prepended to it as `Role: text` lines, so they sit in the query segment after the passages
    (always computed fresh, never cached)."""
    last = max(i for i, m in enumerate(messages) if m.role == "user" and m.text().strip())
    history = [f"{m.role.capitalize()}: {m.text().strip()}" for m in messages[:last] if m.text().strip()]
    question = messages[last].text().strip()
    return "\n".join([*history, f"User: {question}"]) if history else question
