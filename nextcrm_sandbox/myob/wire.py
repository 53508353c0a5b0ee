"""How the MYOB sandbox answers: JSON with URIs rebuilt from the request's origin, ETags and gzip, OData query
strings, route patterns for statistics, and MYOB's error answers for scopes, methods and rate limits."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nextcrm_sandbox.control import ControlError
from nextcrm_sandbox.myob.apps import _App
from nextcrm_sandbox.myob.data import _Row
from nextcrm_sandbox.myob.model import (
    _BASE_B,
    _GZIP_MIN_BYTES,
    _JSON,
    API_PREFIX,
    LEGACY_SCOPE,
    MyobError,
    _bad_query,
    _token_invalid,
)


def _control_json(status: int, payload: Any, origin: str | None = None) -> Response:
    body = orjson.dumps(payload)
    if origin is not None:
        body = body.replace(_BASE_B, f"{origin}{API_PREFIX}".encode())
    return Response(body, status_code=status, headers={"content-type": "application/json"})


def _origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def _query_string(params: Iterable[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='$')}={quote(v, safe=chr(39) + '$(),:/')}" for k, v in params)


def _path_pattern(segments: list[str]) -> str:
    if not segments or segments[0].lower() != "accountright":
        return "/api/{unknown}"
    parts = ["/accountright"]
    if len(segments) > 1:
        parts.append("{cf}")
    rest = segments[2:]
    lowered = [s.lower() for s in rest]
    if lowered[:2] == ["sale", "invoice"]:
        parts += ["Sale", "Invoice", *["{layout}", "{uid}"][: len(rest) - 2]]
    elif lowered[:2] == ["contact", "customer"]:
        parts += ["Contact", "Customer", *["{uid}"][: len(rest) - 2]]
    elif lowered[:2] == ["sale", "customerpayment"]:
        parts += ["Sale", "CustomerPayment", *["{uid}"][: len(rest) - 2]]
    elif rest:
        parts.append("{unknown}")
    return "/".join(parts) if len(parts) > 1 else "/accountright/"


def _require_scope(scopes: set[str], needed: str) -> None:
    if LEGACY_SCOPE not in scopes and needed not in scopes:
        raise _token_invalid()


def _method_not_allowed(method: str, allowed: str) -> MyobError:
    return MyobError(
        405,
        "MethodNotAllowed",
        f"The requested resource does not support http method '{method}'.",
        headers={"allow": allowed},
    )


def _not_emulated(method: str) -> MyobError:
    return MyobError(501, "NotImplemented", f"{method} of this resource is not emulated by the sandbox")


def _daily_limit() -> MyobError:
    return MyobError(
        403, "RateLimitError", "API key has exceeded the daily rate limit", details="Header: x-myobapi-key"
    )


def _second_limit(app: _App) -> MyobError:
    return MyobError(
        app.per_second_status,
        "RateLimitError",
        "API key has exceeded the per second rate limit",
        details="Header: x-myobapi-key",
    )


def _query_int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad_query(f"The value '{value}' is not valid for {name}") from None
    if number < 0:
        raise _bad_query(f"{name} must not be negative")
    return number


def _entity(value: Any) -> str:
    names = {
        "invoice": "invoice",
        "invoices": "invoice",
        "customer": "customer",
        "customers": "customer",
        "contact": "customer",
        "contacts": "customer",
        "payment": "payment",
        "payments": "payment",
        "customerpayment": "payment",
        "customerpayments": "payment",
    }
    entity = names.get(str(value).lower()) if isinstance(value, str) else None
    if entity is None:
        raise ControlError(404, "entity must be 'invoice', 'customer' or 'payment'")
    return entity


def _view(row: _Row, drop: frozenset[str]) -> dict[str, Any]:
    if not drop:
        return row.rec
    return {k: v for k, v in row.rec.items() if k not in drop}


def _json_ok(request: Request, payload: Any, headers: dict[str, str]) -> Response:
    body = orjson.dumps(payload).replace(_BASE_B, f"{_origin(request)}{API_PREFIX}".encode())
    etag = '"' + hashlib.sha1(body).hexdigest() + '"'
    out = {**headers, "etag": etag}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=out)
    out["content-type"] = _JSON
    if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", "").lower():
        body = gzip.compress(body, compresslevel=1)
        out["content-encoding"] = "gzip"
        out["vary"] = "Accept-Encoding"
    return Response(body, status_code=200, headers=out)
