"""What a provider's webhooks plug into the receiver: signature check and event extraction.

A provider's `WebhookSpec` (in its `providers/<name>/webhooks.py`) says which connection secret (or
environment variable) keys its signature, how to check it over the exact bytes received, and how a
verified body splits into inbox events (one per provider event, with the provider's id or, where
there is none, a hash of the event). Every comparison is constant-time.

A provider whose check needs the connection itself or the network (PayPal: a certificate to download
from an allowed host, or PayPal's own verify endpoint) gives `verify_connection`, an async check
that sees a `VerifyContext`; it raises `InvalidSignature` (401) or `VerificationUnavailable` (503,
so the provider delivers again later).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.vault import SecretBox


class InvalidSignature(Exception):
    """The request is not signed by the provider with this connection's secret."""


class VerificationUnavailable(Exception):
    """The signature cannot be checked now (a certificate host or the provider's verify endpoint is
    unreachable); the delivery is refused with a retryable status, not as forged."""


@dataclass(frozen=True)
class VerifyContext:
    """What a connection-aware check sees: the delivery, the connection (base URL, settings) and its secrets."""

    headers: Mapping[str, str]
    body: bytes
    secret: str = field(repr=False)
    now: float
    connection: Connection
    secrets: Mapping[str, Any] = field(repr=False)
    database_url: str = field(repr=False)
    box: SecretBox = field(repr=False)


@dataclass(frozen=True)
class InboxEvent:
    """One event of a verified delivery, as stored in `webhook_events`."""

    event_id: str
    event_type: str | None
    occurred_at: datetime | None
    payload: Any


@dataclass(frozen=True)
class WebhookSpec:
    """How one provider signs its webhooks and how its bodies split into events."""

    secret_name: str
    env_var: str
    verify: Callable[[Mapping[str, str], bytes, str, float], None]
    events: Callable[[Any], list[InboxEvent]]
    audit_headers: tuple[str, ...]
    # Xero's intent-to-receive deliveries carry no events: answer them and store nothing.
    handshake: Callable[[Any], bool] = field(default=lambda payload: False)
    # apply(conn, schema, connection_id, inbox rows) -> counts (see `webhooks.inbox`); None: not applied yet.
    apply: Callable[..., Any] | None = None
    # A check that needs the connection or the network; when given, the receiver awaits it instead of `verify`.
    verify_connection: Callable[[VerifyContext], Awaitable[None]] | None = None
    # The header naming one signed delivery, where the signature covers only a checksum of the body
    # (PayPal: CRC-32, which a different body can match): a second, different body under an id
    # already received is refused.
    delivery_header: str | None = None


def hmac_sha256(secret: str, message: bytes) -> bytes:
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def signature_matches(expected: str, given: str) -> bool:
    """Constant-time equality of a computed signature and a header's; a header that is not ASCII (sent as
    Latin-1 bytes, which `hmac.compare_digest` refuses for text) never matches."""
    return given.isascii() and hmac.compare_digest(expected, given)


def hash_of(value: Any) -> str:
    """A stable id for an event the provider gives no id (canonical JSON, SHA-256)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def parse_time(value: Any) -> datetime | None:
    """Unix seconds or ISO 8601 (offset optional, UTC assumed) as aware UTC; anything else None.

    Seconds no calendar date holds (`1e30`) raise ValueError: the event that carries them cannot be read.
    """
    if value is None:
        return None
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError("a Unix time out of the calendar's range") from None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def base64_hmac_verifier(header: str) -> Callable[[Mapping[str, str], bytes, str, float], None]:
    """A check of `header` = base64(HMAC-SHA256(secret, raw body)) (Xero, QuickBooks, Mautic)."""

    def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float) -> None:
        given = headers.get(header, "")
        expected = base64.b64encode(hmac_sha256(secret, body)).decode()
        if not given or not signature_matches(expected, given.strip()):
            raise InvalidSignature(f"{header} does not match")

    return verify
