"""BillionMail's wire format: the response envelope, GoFrame-style parameter validation and HS256 JWTs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

PREFIX = "/billionmail"
CONTROL_PREFIX = "/_sandbox/billionmail"

ACCESS_TTL = 86_400  # jwt.accessExpiry default
REFRESH_TTL = 7 * 86_400  # jwt.refreshExpiry default
MAX_LOGIN_RETRIES = 5
LOGIN_BLOCK_SECONDS = 300
LOGIN_RETRY_WINDOW = 300
CAPTCHA_TTL = 180
SESSION_TTL = 86_400  # server.sessionMaxAge 24h
SESSION_COOKIE = "billion_mail"
SEND_RATE_PER_THREAD = 20.0  # the executor allows threads * 20 * 60 mails a minute
CONTACT_MAX_PAGE_SIZE = 100  # a bigger contact page_size silently falls back to 10
ISSUER = "billionmail"

_DAY = 86_400
_CAPTCHA_SOURCE = "34578abcdefhjkmnprstuvwxy"


# ---------------------------------------------------------------------------------------------------------
# Envelope and request parameters
# ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A BillionMail error answer: HTTP 200 with ``{"success": false, "code": ..., "msg": ..., "data": ...}``."""

    def __init__(self, code: int, msg: str, data: Any = None) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.data = data

    def envelope(self) -> dict[str, Any]:
        """The response body."""
        return {"success": False, "code": self.code, "msg": self.msg, "data": self.data}


def _ok(msg: str, data: Any = None) -> dict[str, Any]:
    return {"success": True, "code": 0, "msg": msg, "data": data}


@dataclass(frozen=True, slots=True)
class _Rule:
    """One GoFrame ``v`` tag: ``required``, ``min``, ``in`` and ``min-length``, with an optional ``#message``."""

    name: str
    required: bool = False
    min: float | None = None
    choices: tuple[Any, ...] | None = None
    min_length: int | None = None
    message: str | None = None


def _raw_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    return str(value)


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _validate(params: Mapping[str, Any], rules: Sequence[_Rule]) -> None:
    """Apply the rules in order and stop at the first failure (the standard router validates with Bail)."""
    for rule in rules:
        raw = params.get(rule.name)
        if _empty(raw):
            if rule.required:
                raise ApiError(412, rule.message or f"The {rule.name} field is required")
            continue
        text = _raw_text(raw)
        if rule.min is not None:
            try:
                ok = float(text) >= rule.min
            except ValueError:
                ok = False
            if not ok:
                bound = int(rule.min) if float(rule.min).is_integer() else rule.min
                raise ApiError(
                    412, rule.message or f"The {rule.name} value `{text}` must be equal or greater than {bound}"
                )
        if rule.choices is not None and text not in {str(c) for c in rule.choices}:
            pattern = ",".join(str(c) for c in rule.choices)
            raise ApiError(412, rule.message or f"The {rule.name} value `{text}` is not in acceptable range: {pattern}")
        if rule.min_length is not None and len(text) < rule.min_length:
            raise ApiError(
                412,
                rule.message
                or f"The {rule.name} value `{text}` length must be equal or greater than {rule.min_length}",
            )


def _to_int(value: Any, default: int = 0) -> int:
    """GoFrame's ``gconv.Int``: numbers and numeric strings convert (floats truncate), anything else is 0."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    try:
        return int(float(str(value).strip()))
    except ValueError:
        return 0


def _to_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return orjson.dumps(value).decode()
    return _raw_text(value)


def _to_int_list(value: Any) -> list[int]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [_to_int(v) for v in value]
    if isinstance(value, str) and "," in value:
        return [_to_int(v) for v in value.split(",") if v.strip()]
    return [_to_int(value)]


def _to_str_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [_to_str(v) for v in value]
    return [_to_str(value)]


# ---------------------------------------------------------------------------------------------------------
# JWT (HS256, the golang-jwt claims of ``service/rbac/jwt.go``)
# ---------------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt_encode(claims: Mapping[str, Any], secret: bytes) -> str:
    header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    payload = _b64url(orjson.dumps(dict(claims)))
    signature = hmac.new(secret, f"{header}.{payload}".encode("ascii"), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


class _TokenError(Exception):
    """A token ``ParseToken`` refuses; the message is golang-jwt's error text."""


def _jwt_decode(token: str, secret: bytes) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise _TokenError("token is malformed: token contains an invalid number of segments")
    try:
        header = orjson.loads(_b64url_decode(parts[0]))
        claims = orjson.loads(_b64url_decode(parts[1]))
        signature = _b64url_decode(parts[2])
    except (ValueError, orjson.JSONDecodeError):
        raise _TokenError("token is malformed: could not base64 decode token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _TokenError("token is malformed: could not JSON decode claim")
    if header.get("alg") != "HS256":
        raise _TokenError("token is unverifiable: error while executing keyfunc: unexpected signing method")
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise _TokenError("token signature is invalid: signature is invalid")
    return claims


@dataclass(slots=True)
class _Token:
    subject: str  # access_token or refresh_token
    expires_at: int
    revoked: bool = False
