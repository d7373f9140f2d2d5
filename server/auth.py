"""Bearer API keys: each key maps to a namespace (tenant), and every chunk key, catalog and index a
request touches is that namespace's. Without configured keys the server is open and everyone is the
default namespace.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def tenant(request: Request) -> str:
    """The namespace of the request's API key (401 when keys are configured and it has none or a wrong one)."""
    settings = request.app.state.settings
    if not settings.api_keys:
        return settings.namespace
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    token = token.strip()
    for key, namespace in settings.api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return namespace
    raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
