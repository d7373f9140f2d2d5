"""Bearer API keys: each key maps to a namespace (tenant), and every chunk key, catalog and index a
request touches is that namespace's. Without configured keys the server is open and everyone is the
default namespace. `/metrics` (counters of every tenant) then needs the admin key `server.metrics_key`
unless `server.metrics_public` exposes it.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def _bearer(request: Request) -> str:
    """The request's bearer token (401 when it has none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def metrics_access(request: Request) -> None:
    """Admit a `/metrics` scrape: open without API keys or with `metrics_public`; else the admin key only."""
    server = request.app.state.settings.server
    if not server.api_keys or server.metrics_public:
        return
    token = _bearer(request)
    if server.metrics_key is None or not _same(server.metrics_key, token):
        raise ApiError(
            401,
            "/metrics shows every tenant's counters: send 'Authorization: Bearer <server.metrics_key>' "
            "(set server.metrics_key, or server.metrics_public = true to serve it without a key)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def tenant(request: Request) -> str:
    """The namespace of the request's API key (401 when keys are configured and it has none or a wrong one)."""
    settings = request.app.state.settings
    if not settings.api_keys:
        return settings.namespace
    token = _bearer(request)
    for key, namespace in settings.api_keys.items():
        if _same(key, token):
            return namespace
    raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
