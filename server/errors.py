"""HTTP errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the handlers
that map validation failures, bad values, a full queue and missing features onto them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine.documents import RetrievalUnavailable, UnknownChunks
from ..retriever import CatalogUnavailable
from .worker import QueueFull, ShuttingDown

log = logging.getLogger("ragkv.server")
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented",
    503: "unavailable",
}


class ApiError(Exception):
    """An error reply: status, a message naming what was wrong and what is accepted, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The JSON error body every failure uses."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "field required"
    if first.get("type") == "model_attributes_type" and not loc:
        return "the body must be a JSON object", None
    param = ".".join(loc) or None
    more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return (f"{param}: {msg}{more}" if param else msg + more), param


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, err: ApiError):
        return error_response(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        return error_response(400, *_validation_message(err))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException):
        return error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(_: Request, err: ValueError):
        return error_response(400, str(err))

    @app.exception_handler(UnknownChunks)
    async def _unknown_chunks(_: Request, err: UnknownChunks):
        return error_response(404, str(err), "documents")

    @app.exception_handler(QueueFull)
    async def _full(request: Request, err: QueueFull):
        request.app.state.metrics.rejected.inc()
        return error_response(429, f"{err}; retry after {retry_after_s}s", headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(ShuttingDown)
    async def _closing(_: Request, err: ShuttingDown):
        return error_response(503, str(err), headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(CatalogUnavailable)
    async def _catalog_down(_: Request, err: CatalogUnavailable):  # document writes and reads by id need it
        return error_response(503, str(err), headers={"Retry-After": str(retry_after_s)})

    @app.exception_handler(RetrievalUnavailable)
    async def _no_retrieval(_: Request, err: RetrievalUnavailable):
        return error_response(501, str(err))

    @app.exception_handler(Exception)
    async def _crash(_: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}: {err}")
