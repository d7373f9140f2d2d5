"""The OpenAPI document as the server really answers: every error reply has the shape of `ErrorResponse`
(`server.errors`), validation failures answer 400 (not FastAPI's default 422), and each operation lists
the statuses it can give (auth, limits, the queue, a catalog down). Clients generate code from it;
tests/test_server_schemathesis.py checks the server against it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .schemas import MAX_INT64

_WHY = {
    400: "Bad request: a value out of range or of the wrong type, malformed JSON; `error.param` names the field",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`), when API keys are configured",
    404: "No such document (or `chunk_id`) in the key's namespace",
    413: "Request body over `server.max_body_bytes`",
    429: "The model queue (or the tenant's share of it) is full; retry after `Retry-After` seconds",
    501: "This model has no retrieval (no embedder)",
    503: "Shutting down, or the document catalog is unreachable; retry after `Retry-After` seconds",
}
_MODEL_QUEUE = {400, 401, 413, 429, 503}  # every request that runs on the model worker
_ANSWERS = {
    ("/v1/chat/completions", "post"): _MODEL_QUEUE | {404, 501},  # 404: a chunk_id the namespace lacks
    ("/v1/completions", "post"): _MODEL_QUEUE | {404, 501},
    ("/v1/documents", "post"): _MODEL_QUEUE | {501},
    ("/v1/retrieve", "post"): _MODEL_QUEUE | {501},
    ("/v1/documents/{doc_id}", "get"): {401, 404, 413, 429, 503},
    ("/v1/documents/{doc_id}", "delete"): {401, 404, 413, 429, 503},
    ("/v1/cache/stats", "get"): {401, 413},
    ("/metrics", "get"): {401, 413},
    ("/healthz", "get"): {413},
}
_STREAMED = ("/v1/chat/completions", "/v1/completions")  # `stream: true` answers server-sent events
_EVENT = {  # one server-sent event (OpenAPI before 3.2: `schema` describes each event of the stream)
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk object, or [DONE] at the end"}},
}
_EVENTS = {"text/event-stream": {"schema": _EVENT}}
_PROMETHEUS = {"text/plain": {"schema": {"type": "string"}}}  # the text exposition format
_RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error reply: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


def describe(app: FastAPI) -> None:
    """Make `app.openapi()` list the real responses of every operation and a bearer security scheme."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = openapi


def _document(app: FastAPI) -> dict:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs"), ErrorResponse=error_schema)
    _integer_bounds(schemas)
    _limits(schemas, app.state.settings.server)
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = _ANSWERS.get((path, method), set())
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in _STREAMED:
                responses["200"]["content"].update(_EVENTS)
            if path == "/metrics":
                responses["200"]["content"] = _PROMETHEUS
            for code in sorted(codes):
                reply = {"description": _WHY[code], "content": error}
                if code in (429, 503):
                    reply["headers"] = _RETRY
                responses[str(code)] = reply
            if 401 in codes:
                op["security"] = [{"bearer": []}, {}]  # required only when API keys are configured
    return spec


def _integer_bounds(node) -> None:
    """Integer bounds back as integers. FastAPI's OpenAPI model types every bound as a float, so
    `chunk_id`'s maximum 2**63 - 1 came out as 9.223372036854776e18, which is 2**63: a client (or
    schemathesis) comparing as JSON does took ids past int64 for valid. Bounds up to 2**53 are exact in
    a float and turn back; the int64 one is written from `MAX_INT64`."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                bound = node.get(key)
                if isinstance(bound, float) and bound.is_integer() and abs(bound) <= 2**53:
                    node[key] = int(bound)
                elif bound == 2.0**63:  # the only wider bound the schemas declare (`le=MAX_INT64`)
                    node[key] = MAX_INT64
        for child in node.values():
            _integer_bounds(child)
    elif isinstance(node, list):
        for child in node:
            _integer_bounds(child)


def _limits(schemas: dict, server) -> None:
    """This server's request limits (`server.*` settings) written into the request schemas."""
    for name in ("ChatRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field]["anyOf"][0]["maximum"] = server.max_tokens_limit
        props["documents"]["anyOf"][0]["maxItems"] = server.max_documents
        for item in props["documents"]["anyOf"][0]["items"]["anyOf"]:
            if item.get("type") == "string":
                item["maxLength"] = server.max_document_chars
    schemas["TextDocument"]["properties"]["text"]["maxLength"] = server.max_document_chars
    for name in ("RetrieveOptions", "RetrieveRequest"):
        schemas[name]["properties"]["k"]["maximum"] = server.max_retrieve_k
    schemas["DocumentsRequest"]["properties"]["documents"]["maxItems"] = server.max_documents
