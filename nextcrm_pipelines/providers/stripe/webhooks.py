"""Stripe webhooks: `Stripe-Signature` (`t=`, one or more `v1=`) over `t.body`, 300 s tolerance."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from nextcrm_pipelines.webhooks.verify import InboxEvent, InvalidSignature, WebhookSpec, hmac_sha256, parse_time

TOLERANCE_SECONDS = 300


def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float) -> None:
    """Passes if any `v1` matches HMAC-SHA256(secret, "t.body") and `t` is not older than 300 s."""
    timestamp, signatures = None, []
    for item in headers.get("stripe-signature", "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            signatures.append(value)
    if not timestamp or not timestamp.isdigit() or not signatures:
        raise InvalidSignature("Stripe-Signature lacks a timestamp or a v1 signature")
    expected = hmac_sha256(secret, timestamp.encode() + b"." + body).hex()
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise InvalidSignature("no v1 signature matches")
    if int(timestamp) < now - TOLERANCE_SECONDS:
        raise InvalidSignature("timestamp outside the 300 s tolerance (a replay?)")


def events(payload: Any) -> list[InboxEvent]:
    """A Stripe delivery is one Event object."""
    if not isinstance(payload, dict) or not str(payload.get("id", "")).startswith("evt_"):
        raise ValueError("not a Stripe event")
    return [InboxEvent(payload["id"], payload.get("type"), parse_time(payload.get("created")), payload)]


WEBHOOKS = WebhookSpec("webhook_secret", "STRIPE_WEBHOOK_SECRET", verify, events, ("stripe-signature",))
