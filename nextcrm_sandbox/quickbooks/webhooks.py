"""QuickBooks' webhooks from the sandbox: the retry schedule and subscription fields, the legacy ``eventNotifications``
and CloudEvents bodies of a realm's changes, and the ``intuit-signature`` signer."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import uuid
from collections.abc import Sequence
from functools import partial

import orjson

from nextcrm_sandbox.quickbooks.data import DataChange, QuickBooksCompany
from nextcrm_sandbox.webhooks import Signer

# Intuit documents no retry schedule for webhooks (``docs/providers/quickbooks.md``, Webhooks): the emulator retries a
# refused or failed delivery six times, after 30 s, 2 min, 10 min, 30 min, 2 h and 6 h (about 9 h in all).
WEBHOOK_RETRY_DELAYS = (30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_FORMATS = ("legacy", "cloudevents")
CLOUDEVENTS_PER_DELIVERY = 100
_CLOUDEVENT_VERBS = {
    "Create": "created", "Update": "updated", "Delete": "deleted", "Merge": "merged", "Void": "voided",
    "Emailed": "emailed",
}  # fmt: skip
_SUBSCRIBE_FIELDS = frozenset({"url", "duplicate_rate", "hold", "retry_delays", "app", "realm", "verifier_token",
                               "format"})  # fmt: skip


def legacy_notification(company: QuickBooksCompany, changes: Sequence[DataChange]) -> bytes:
    """One ``eventNotifications`` body for one realm: ids only, ``lastUpdated`` with the company's offset."""
    entities = []
    for change in changes:
        stamp = company.stamp(change.at)
        entity = {"name": change.entity, "id": change.id, "operation": change.operation,
                  "lastUpdated": stamp[:-3] + stamp[-2:]}  # fmt: skip
        if change.deleted_id:
            entity["deletedId"] = change.deleted_id
        entities.append(entity)
    note = {"realmId": company.realm_id, "dataChangeEvent": {"entities": entities}}
    return orjson.dumps({"eventNotifications": [note]})


def cloudevents_batches(company: QuickBooksCompany, changes: Sequence[DataChange]) -> list[bytes]:
    """CloudEvents JSON arrays of at most 100 events: uuid ids, ``qbo.<entity>.<verb>.v1``, ISO UTC ``time``.

    A merge names the merged-away record in ``data.deletedId`` (the legacy ``deletedId``; unverified).
    """
    events = []
    for change in changes:
        moment = dt.datetime.fromtimestamp(change.at, dt.UTC).isoformat(timespec="milliseconds")
        events.append({
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "intuit.qbo.sandbox",
            "type": f"qbo.{change.entity.lower()}.{_CLOUDEVENT_VERBS[change.operation]}.v1",
            "datacontenttype": "application/json",
            "time": moment.replace("+00:00", "Z"),
            "intuitentityid": change.id,
            "intuitaccountid": company.realm_id,
            "data": {"deletedId": change.deleted_id} if change.deleted_id else {},
        })  # fmt: skip
    step = CLOUDEVENTS_PER_DELIVERY
    return [orjson.dumps(events[i : i + step]) for i in range(0, len(events), step)]


def _intuit_sign(key: bytes, body: bytes, at: int) -> dict[str, str]:
    return {"intuit-signature": base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()}


def intuit_signer(verifier_token: str) -> Signer:
    """``intuit-signature``: base64 HMAC-SHA256 of the exact body with the app's verifier token (a partial, not
    a closure, so subscriptions are saved with the sandbox's state)."""
    return partial(_intuit_sign, verifier_token.encode())
