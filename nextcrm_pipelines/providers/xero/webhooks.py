"""Xero webhooks: `x-xero-signature` = base64 HMAC-SHA256 of the body with the app's webhook key.

Deliveries carry thin events without ids (each is known by its hash); an intent-to-receive delivery
has no events and is answered without storing anything.
"""

from __future__ import annotations

from typing import Any

from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time


def events(payload: Any) -> list[InboxEvent]:
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise ValueError("not a Xero webhook payload")
    return [
        InboxEvent(
            hash_of(event),
            f"{event.get('eventCategory')}.{event.get('eventType')}",
            parse_time(event.get("eventDateUtc")),
            event,
        )
        for event in payload["events"]
        if isinstance(event, dict)
    ]


WEBHOOKS = WebhookSpec(
    "webhook_key", "XERO_WEBHOOK_KEY", base64_hmac_verifier("x-xero-signature"), events, ("x-xero-signature",),
    handshake=lambda payload: isinstance(payload, dict) and payload.get("events") == [],
)  # fmt: skip
