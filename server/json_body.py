"""Request bodies read with exact integers.

JSON has one number type: `9223372036854775806.0` is the integer 2**63 - 2, and JSON Schema (the OpenAPI
document) calls it an integer. Python's parser reads every number with a fraction or exponent as a float,
which rounds any integer above 2**53: that value became 2**63 and a valid chunk id got a 400 (past the
int64 maximum), and `9007199254740993.0` would silently name chunk 9007199254740992. `exact_number` keeps
such an integral literal an int when the float would have changed it; everything else is the float it was.
`ExactJsonRoute` makes every endpoint of a router read its body that way.
"""

from __future__ import annotations

import json
from decimal import Decimal

from fastapi import Request
from fastapi.routing import APIRoute

WIDEST_INT = 2**64  # no integer field accepts more; bigger integral literals (1e300) stay floats


def exact_number(literal: str) -> float | int:
    """The JSON number `literal` (one with a fraction or exponent) as a float, or as the exact int it
    spells when it is integral, within `WIDEST_INT`, and the float would not be that integer."""
    value = float(literal)
    if not value.is_integer() or abs(value) > 2 * WIDEST_INT:
        return value
    exact = Decimal(literal)
    if exact != exact.to_integral_value() or abs(exact) > WIDEST_INT or int(exact) == value:
        return value
    return int(exact)


def loads(body: bytes | str):
    """`json.loads` with `exact_number` for every number that has a fraction or exponent."""
    return json.loads(body, parse_float=exact_number)


class ExactJsonRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class ExactJsonRoute(APIRoute):
    """An endpoint whose JSON body is read by `loads` (FastAPI calls `request.json()` for it)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def exact_handler(request: Request):
            return await handler(ExactJsonRequest(request.scope, request.receive))

        return exact_handler
