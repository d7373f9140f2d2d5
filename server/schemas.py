"""Request schemas of the HTTP API: the OpenAI chat / completion bodies plus ragkv's own fields
(`documents`, `retrieve`, `blend`), and the document / retrieval endpoints. Unknown OpenAI fields
(top_p, seed, ...) are accepted and ignored; ragkv fields are strict.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..blend.config import SELECTIONS, SELECTIVE, STRATEGIES, validate

MAX_INT64 = 2**63 - 1  # SQL integer columns (chunk ids) hold no more
MIN_TEMPERATURE = 1e-6  # below this (but above 0) logits / temperature overflow float32 into NaN


def shown(value: str, limit: int = 64) -> str:
    """`value` quoted for an error message, cut to `limit` characters (a client's 100 kB id is not echoed)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def valid_unicode(text: str) -> str:
    """`text` if it encodes as UTF-8; a lone surrogate (e.g. JSON `"\\ud800"`) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"invalid Unicode at character {err.start}: a lone surrogate ({text[err.start]!r}); "
            "send valid UTF-8 text (surrogates only as a high + low pair)"
        ) from None
    return text


def storable(text: str) -> str:
    """`valid_unicode` text without NUL characters (SQL text columns, PostgreSQL's above all, refuse them)."""
    valid_unicode(text)
    if "\x00" in text:
        raise ValueError(f"NUL character (\\u0000) at position {text.index(chr(0))}: stored text may not contain it")
    return text


def _storable_json(value, where: str = "metadata"):
    """`value` if every string inside it (keys included) is `storable` and every number is finite (JSON
    has no NaN or Infinity: a stored one could never be read back)."""
    if isinstance(value, str):
        storable(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"{shown(where, 80)} is {value!r}: only finite numbers can be stored (JSON has no NaN or Infinity)"
        )
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable_json(k, where)
            _storable_json(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _storable_json(v, f"{where}[{i}]")
    return value


def json_int(value):
    """An integer as JSON Schema means it (2 or 2.0); true, "5" and 2.5 are refused rather than coerced."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        got = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise ValueError(f"expected an integer, got {got} ({shown(str(value).lower(), 20)})")
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
Integer = Annotated[int, BeforeValidator(json_int)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_INT64), BeforeValidator(json_int)]  # constraints first: see the schema
StoredText = Annotated[str, AfterValidator(storable), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})]
# What the schema promises for a question (the validators below check it with a clearer message)
NON_BLANK = {"minLength": 1, "pattern": r"\S"}
Prompt = Annotated[Text, Field(json_schema_extra=NON_BLANK)]
# 0 (greedy) or a temperature large enough to sample with
_TEMPERATURE = {"anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2}, {"type": "null"}]}
STRATEGY_NAMES = [*STRATEGIES, *(f"{s}+{sel}" for s in SELECTIVE for sel in SELECTIONS)]
# a chat needs a user message with some text (the question): as a string, or text parts
_QUESTION = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                {"type": "string", **NON_BLANK},
                {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["text"],
                        "properties": {"text": {"type": "string", **NON_BLANK}},
                    },
                },
            ]
        },
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlendOptions(_Strict):
    """How the request's chunks are fused (server defaults where absent)."""

    strategy: Text | None = Field(None, max_length=64, json_schema_extra={"enum": [*STRATEGY_NAMES, None]})
    recompute_ratio: float | None = Field(  # the range is checked by `validate` (one message for both)
        None, allow_inf_nan=False, strict=True, json_schema_extra={"minimum": 0.0, "maximum": 1.0}
    )
    # greedy near-ties (top-1 minus top-2 logit under this) decided on exact KV: one full prefill; 0 = off
    answer_guard: float | None = Field(None, ge=0.0, le=1e6, allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _check(self) -> BlendOptions:
        validate(self.strategy or "cacheblend", 0.0 if self.recompute_ratio is None else self.recompute_ratio)
        return self


class RetrieveOptions(_Strict):
    """Search the tenant's ingested chunks; `query` defaults to the question."""

    query: Text | None = None
    k: Integer = Field(4, ge=1, le=1024)


class TextDocument(_Strict):
    text: Text = Field(json_schema_extra=NON_BLANK)


class ChunkRef(_Strict):
    """An ingested chunk by its catalog id (as `/v1/retrieve` returns it)."""

    chunk_id: Integer = Field(ge=0, le=MAX_INT64)


DocumentItem = Annotated[Text, Field(json_schema_extra=NON_BLANK)] | TextDocument | ChunkRef


class RagkvFields(BaseModel):
    """The ragkv extension fields shared by both completion endpoints."""

    documents: list[DocumentItem] | None = None
    retrieve: RetrieveOptions | None = None
    blend: BlendOptions | None = None

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, v):
        """Each item as exactly one of its three forms, with one clear message when it is none of them."""
        if not isinstance(v, list):
            return v
        out = []
        for i, item in enumerate(v):
            try:
                if isinstance(item, str):
                    out.append(valid_unicode(item))
                elif isinstance(item, dict) and "chunk_id" in item:
                    out.append(ChunkRef.model_validate(item))
                elif isinstance(item, dict) and "text" in item:
                    out.append(TextDocument.model_validate(item))
                else:
                    raise ValueError('expected a string, {"text": ...} or {"chunk_id": ...}')
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(x) for x in first.get("loc", ()))
                raise ValueError(f"documents[{i}].{where}: {first.get('msg', 'invalid value')}") from None
            except ValueError as err:
                raise ValueError(f"documents[{i}]: {err}") from None
        return out


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Text = Field(json_schema_extra={"enum": ["text"]})  # other part types are refused
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for p in self.content:
            if p.type != "text":
                raise ValueError(f"messages: content part type {shown(p.type)} is not supported; accepted: text")
        return "".join(p.text or "" for p in self.content)


class _Completion(RagkvFields):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = Field(None, max_length=256)
    max_tokens: TokenCount | None = None
    temperature: Annotated[float | None, WithJsonSchema(_TEMPERATURE)] = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False, strict=True
    )
    stream: bool = Field(False, strict=True)
    n: Integer = Field(1, ge=1, le=1)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and 0.0 < v < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {v!r} is too small to sample with: use 0 (greedy) or a value in [{MIN_TEMPERATURE}, 2]"
            )
        return v


class ChatRequest(_Completion):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1, "contains": _QUESTION})
    max_completion_tokens: TokenCount | None = None

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

    prompt: Prompt | Annotated[list[Prompt], Field(json_schema_extra={"minItems": 1, "maxItems": 1})]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) != 1 or not texts[0].strip():
            raise ValueError("prompt must be one non-empty string (batched prompts are not supported)")
        return v


class DocumentIn(_Strict):
    """One document to ingest."""

    id: StoredText = Field(min_length=1, max_length=256)
    text: StoredText = Field(min_length=1)
    metadata: Annotated[dict, AfterValidator(_storable_json)] = Field(default_factory=dict)


class DocumentsRequest(_Strict):
    """`POST /v1/documents`."""

    documents: list[DocumentIn] = Field(min_length=1)


class RetrieveRequest(_Strict):
    """`POST /v1/retrieve`."""

    query: Text = Field(min_length=1, json_schema_extra={"pattern": r"\S"})
    k: Integer = Field(4, ge=1, le=1024)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is blank: send some text to search for")
        return v


def chat_question(messages: list[ChatMessage]) -> str:
    """The question of a chat: the last user message. System messages and earlier turns, if any, are
    prepended to it as `Role: text` lines, so they sit in the query segment after the passages
    (always computed fresh, never cached)."""
    last = max(i for i, m in enumerate(messages) if m.role == "user" and m.text().strip())
    history = [f"{m.role.capitalize()}: {m.text().strip()}" for m in messages[:last] if m.text().strip()]
    question = messages[last].text().strip()
    return "\n".join([*history, f"User: {question}"]) if history else question
