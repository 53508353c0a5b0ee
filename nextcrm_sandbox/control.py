"""Plumbing the emulators share for their unauthenticated control APIs under ``/_sandbox/<provider>``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping, MutableMapping
from typing import Any, ClassVar, Protocol, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nextcrm_sandbox.oauth import OAuthError, json_response

__all__ = [
    "ControlClient",
    "ControlError",
    "ControlServer",
    "bool_field",
    "clear_scoped_faults",
    "control_endpoint",
    "int_field",
    "lookup",
    "number_field",
    "optional_int_field",
    "read_json_object",
    "reject_unknown_fields",
]

_V = TypeVar("_V")


class ControlError(Exception):
    """A control-API request the sandbox refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body (``{}`` when empty), so handlers can rely on a dict; 400 otherwise."""
    raw = await request.body()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise ControlError(400, "body must be JSON") from None
    if not isinstance(body, dict):
        raise ControlError(400, "body must be a JSON object")
    return body


def control_endpoint(
    handler: Callable[..., Awaitable[Any]],
    *,
    bad_request: tuple[type[Exception], ...] = (),
    oauth_errors: bool = False,
) -> Callable[..., Awaitable[Response]]:
    """Answer a control handler's result as 200 JSON (a ``Response`` as is) and its refusals as JSON errors.

    ``ControlError`` gives its status and ``{"error": message}``; the ``bad_request`` exception types give 400 and
    their text; with ``oauth_errors``, ``OAuthError`` gives its status and RFC 6749 body.
    """
    oauth: tuple[type[OAuthError], ...] = (OAuthError,) if oauth_errors else ()

    async def endpoint(*args: Any) -> Response:
        try:
            result = await handler(*args)
            return result if isinstance(result, Response) else json_response(200, result)
        except ControlError as err:
            return json_response(err.status, {"error": err.message})
        except oauth as err:
            return json_response(err.status, err.body())
        except bad_request as err:
            return json_response(400, {"error": str(err)})

    endpoint.__name__ = handler.__name__
    return endpoint


def lookup(table: Mapping[str, _V], key: str, noun: str) -> _V:
    """``table[key]`` for a control call naming one object; 404 ``no <noun> '<key>'`` when there is none."""
    value = table.get(key)
    if value is None:
        raise ControlError(404, f"no {noun} {key!r}")
    return value


def int_field(body: Mapping[str, Any], name: str, default: Any, minimum: int = 0, *, nullable: bool = False) -> Any:
    """``body[name]`` (or ``default``) as an integer ``>= minimum``; ``None`` passes when ``nullable``."""
    value = body.get(name, default)
    if nullable and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ControlError(400, f"{name} must be an integer >= {minimum}")
    return value


def optional_int_field(body: Mapping[str, Any], name: str, default: Any, minimum: int | None = 0) -> Any:
    """``body[name]`` (or ``default``) as ``None`` or an integer, at least ``minimum`` unless that is ``None``."""
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(400, f"{name} must be an integer")
    if minimum is not None and value < minimum:
        raise ControlError(400, f"{name} must be >= {minimum}")
    return value


def number_field(body: Mapping[str, Any], name: str, default: float, minimum: float = 0.0) -> float:
    """``body[name]`` (or ``default``) as a float ``>= minimum``, so knobs are checked the same way everywhere."""
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ControlError(400, f"{name} must be a number >= {minimum}")
    return float(value)


def bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    """``body[name]`` (or ``default``), which must be a JSON boolean."""
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ControlError(400, f"{name} must be true or false")
    return value


class ControlServer(Protocol):
    """What a control client needs of a running ``SandboxServer``."""

    def control(self, method: str, path: str, **kwargs: Any) -> Any: ...


class ControlClient:
    """Base of the typed control-API clients: calls ``prefix + path`` through ``server.control``."""

    prefix: ClassVar[str] = ""

    def __init__(self, server: ControlServer) -> None:
        self.server = server

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.server.control(method, f"{self.prefix}{path}", **kwargs)

    def _set_faults(self, scope_key: str, scope: str | None, faults: Mapping[str, Any]) -> dict[str, Any]:
        body = dict(faults)
        if scope is not None:
            body[scope_key] = scope
        return self._call("POST", "/faults", json=body)

    def _clear_faults(self, scope_key: str, scope: str | None) -> dict[str, Any]:
        return self._call("DELETE", "/faults", params={scope_key: scope} if scope else None)


def reject_unknown_fields(body: Mapping[str, Any], allowed: Collection[str], kind: str) -> None:
    """Refuse a body naming fields the call does not know (400 ``unknown <kind> fields: [...]``), so typos fail."""
    unknown = set(body) - set(allowed)
    if unknown:
        raise ControlError(400, f"unknown {kind} fields: {sorted(unknown)}")


def clear_scoped_faults(faults: MutableMapping[str | None, Any], scope: str | None) -> dict[str, str]:
    """Drop the injected faults of one scope, or of all when ``scope`` is empty: the ``DELETE /faults`` answer."""
    if scope:
        faults.pop(scope, None)
    else:
        faults.clear()
    return {"cleared": scope or "all"}
