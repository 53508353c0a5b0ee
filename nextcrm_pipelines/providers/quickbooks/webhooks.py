"""QuickBooks webhooks: `intuit-signature` = base64 HMAC-SHA256 of the body with the verifier token.

Both payload shapes are read: the legacy `eventNotifications` (entities per realm, no ids: each is
known by its hash) and the CloudEvents array (with ids).
"""

from __future__ import annotations

from typing import Any

from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time


def events(payload: Any) -> list[InboxEvent]:
    if isinstance(payload, list):
        return [
            InboxEvent(str(e.get("id") or hash_of(e)), e.get("type"), parse_time(e.get("time")), e)
            for e in payload
            if isinstance(e, dict)
        ]
    if isinstance(payload, dict) and isinstance(payload.get("eventNotifications"), list):
        found = []
        for note in payload["eventNotifications"]:
            for entity in (note.get("dataChangeEvent") or {}).get("entities") or []:
                event = {"realmId": note.get("realmId"), **entity}
                kind = f"{entity.get('name')}.{entity.get('operation')}"
                found.append(InboxEvent(hash_of(event), kind, parse_time(entity.get("lastUpdated")), event))
        return found
    raise ValueError("not a QuickBooks webhook payload")


WEBHOOKS = WebhookSpec("webhook_verifier_token", "QUICKBOOKS_WEBHOOK_VERIFIER_TOKEN",
                       base64_hmac_verifier("intuit-signature"), events, ("intuit-signature",))  # fmt: skip
