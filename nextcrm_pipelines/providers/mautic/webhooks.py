"""Mautic webhooks: `Webhook-Signature` = base64 HMAC-SHA256 of the body with the webhook's secret.

A body maps event types to lists of events; Mautic gives no event ids, so each is known by its hash.
"""

from __future__ import annotations

from typing import Any

from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time


def events(payload: Any) -> list[InboxEvent]:
    if not isinstance(payload, dict):
        raise ValueError("not a Mautic webhook payload")
    found = []
    for kind, items in payload.items():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                found.append(InboxEvent(hash_of({kind: item}), kind, parse_time(item.get("timestamp")), item))
    return found


WEBHOOKS = WebhookSpec("webhook_secret", "MAUTIC_WEBHOOK_SECRET", base64_hmac_verifier("webhook-signature"), events,
                       ("webhook-signature", "x-origin-base-url"))  # fmt: skip
