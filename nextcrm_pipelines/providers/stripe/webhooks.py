"""Stripe webhooks: `Stripe-Signature` (`t=`, one or more `v1=`) over `t.body`, 300 s tolerance; events
carry the object, which is upserted as of the event's time. The object of `customer.deleted` and
`invoice.deleted` is the last state of what was deleted: it is stored marked `"deleted": true`.

Events reach only their own account. A Connect endpoint receives the events of every connected
account, each naming it in `account`: an event is applied only to the connection whose tenant is that
account. An event without `account` is the endpoint's own account's; when the receiver checked it
against the app-wide secret from the environment (the connection has none of its own), any
connection's URL would have accepted it, so it is first read back from Stripe with this connection's
key (`GET /v1/events/{id}`): an event Stripe does not know for this account changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.upsert import BatchCounts
from nextcrm_pipelines.providers.stripe.records import (
    CUSTOMERS_TABLE,
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    SUBSCRIPTIONS_TABLE,
    charge_row,
    customer_row,
    event_version,
    invoice_row,
    subscription_row,
)
from nextcrm_pipelines.webhooks.inbox import ApplyContext, InboxRow, provider_knows
from nextcrm_pipelines.webhooks.verify import (
    InboxEvent,
    InvalidSignature,
    WebhookSpec,
    hmac_sha256,
    parse_time,
    signature_matches,
)

log = logging.getLogger(__name__)

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
    # ASCII digits only (`isdigit` passes "²"), and few enough that `int` takes them.
    if not timestamp or not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12 or not signatures:
        raise InvalidSignature("Stripe-Signature lacks a timestamp or a v1 signature")
    expected = hmac_sha256(secret, timestamp.encode() + b"." + body).hex()
    if not any(signature_matches(expected, candidate) for candidate in signatures):
        raise InvalidSignature("no v1 signature matches")
    if int(timestamp) < now - TOLERANCE_SECONDS:
        raise InvalidSignature("timestamp outside the 300 s tolerance (a replay?)")


def events(payload: Any) -> list[InboxEvent]:
    """A Stripe delivery is one Event object."""
    if not isinstance(payload, dict) or not str(payload.get("id", "")).startswith("evt_"):
        raise ValueError("not a Stripe event")
    return [InboxEvent(payload["id"], payload.get("type"), parse_time(payload.get("created")), payload)]


def _is_ours(context: ApplyContext, event: dict[str, Any]) -> bool:
    """Whether the event belongs to the connection's Stripe account (see the module doc)."""
    account = event.get("account")
    if account:
        return account == context.connection().external_tenant
    if not context.signed_with_app_secret(WEBHOOKS.secret_name):
        return True
    return provider_knows(lambda: context.client().get(f"/v1/events/{event.get('id')}", {}))


def apply(context: ApplyContext, rows: list[InboxRow]) -> BatchCounts:
    """Upsert the charge, subscription, customer or invoice an event carries, as of the event's time
    (never regressing); a deleted customer or invoice is flagged deleted with its last data.

    Events carrying other objects (refunds, payment intents, an `invoice.upcoming` preview without
    an id) are counted as skipped, and so are events of another account.
    """
    payments, subscriptions, customers, invoices = [], [], [], []
    foreign = 0
    for row in rows:
        if not _is_ours(context, row.payload or {}):
            foreign += 1
            context.skip()
            continue
        obj = ((row.payload or {}).get("data") or {}).get("object") or {}
        version = event_version(row.occurred_at, row.event_type) if row.occurred_at else datetime.now(UTC)
        if obj.get("object") == "charge":
            payments.append(charge_row(obj, version))
        elif obj.get("object") == "subscription":
            subscriptions.append(subscription_row(obj, version))
        elif obj.get("object") in ("customer", "invoice") and obj.get("id"):
            if str(row.event_type or "").endswith(".deleted"):
                obj = {**obj, "deleted": True}
            if obj["object"] == "customer":
                customers.append(customer_row(obj, version))
            else:
                invoices.append(invoice_row(obj, version))
        else:
            context.skip()
    if foreign:
        log.warning("stripe webhooks of %s: %d event(s) of another account skipped", context.connection_id, foreign)
    counts = BatchCounts()
    for spec, found in ((PAYMENTS_TABLE, payments), (SUBSCRIPTIONS_TABLE, subscriptions),
                        (CUSTOMERS_TABLE, customers), (INVOICES_TABLE, invoices)):  # fmt: skip
        if found:
            counts.add(context.upsert(spec, found))
    return counts


WEBHOOKS = WebhookSpec("webhook_secret", "STRIPE_WEBHOOK_SECRET", verify, events, ("stripe-signature",), apply=apply)
