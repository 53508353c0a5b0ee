"""Stripe webhooks: `Stripe-Signature` (`t=`, one or more `v1=`) over `t.body`, 300 s tolerance; events
carry the object, which is upserted as of the event's time. The object of `customer.deleted` and
`invoice.deleted` is the last state of what was deleted: it is stored marked `"deleted": true`.

Events reach only their own account. A Connect endpoint receives the events of every connected
account, each naming it in `account`: an event is applied only to the connection whose tenant is that
account. An event without `account` is the endpoint's own account's; when the receiver checked it
against the app-wide secret from the environment (the connection has none of its own), any
connection's URL would have accepted it, so it is first read back from Stripe with this connection's
key (`GET /v1/events/{id}`): an event Stripe does not know for this account changes nothing.

Stripe stamps events in whole seconds and delivers them in any order. Events of one kind (`*.updated`)
about one object in the same second have the same version, so which came last is unknown: when such a
tie carries different content (two in one batch, or one against the stored row), the object is read
from Stripe instead (`GET /v1/<objects>/{id}`, at least as new as either) and stored at that version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.core.upsert import BatchCounts, Row, TableSpec
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
    for spec, found, path, build in ((PAYMENTS_TABLE, payments, "charges", charge_row),
                                     (SUBSCRIPTIONS_TABLE, subscriptions, "subscriptions", subscription_row),
                                     (CUSTOMERS_TABLE, customers, "customers", customer_row),
                                     (INVOICES_TABLE, invoices, "invoices", invoice_row)):  # fmt: skip
        if found:
            counts.add(context.upsert(spec, _settle_ties(context, spec, found, path, build)))
    return counts


def _settle_ties(context: ApplyContext, spec: TableSpec, rows: list[Row], path: str,
                 build: Callable[[dict[str, Any], datetime], Row]) -> list[Row]:  # fmt: skip
    """`rows`, with each object whose newest version ties with different content (in the batch, or against the
    stored row) replaced by the object as Stripe serves it now, at that version (see the module doc)."""
    newest: dict[str, tuple[datetime, set[bytes]]] = {}
    for row in rows:
        top = newest.get(row.id)
        if top is None or row.version > top[0]:
            newest[row.id] = (row.version, {row.raw_hash})
        elif row.version == top[0]:
            top[1].add(row.raw_hash)
    tied = {rid for rid, (_, hashes) in newest.items() if len(hashes) > 1}
    stored = context.conn.execute(
        sql.SQL("SELECT id, source_updated_at, raw_hash FROM {} WHERE connection_id = %s AND id = ANY(%s)").format(
            table(spec.name, context.schema)
        ),
        (context.connection_id, list(newest)),
    ).fetchall()
    tied |= {rid for rid, version, digest in stored
             if version == newest[rid][0] and bytes(digest) not in newest[rid][1]}  # fmt: skip
    if not tied:
        return rows
    read: dict[str, Row] = {}
    for rid in sorted(tied):
        try:
            obj = context.client().get(f"/v1/{path}/{rid}", {})
        except ProviderError as exc:
            if exc.status != 404:
                raise
            continue  # gone (a deleted draft): its events say so
        if not obj.get("deleted"):  # a deleted customer reads as a stub: its last data is in its events
            read[rid] = build(obj, newest[rid][0])
    if read:
        log.info("stripe webhooks of %s: %d %s object(s) changed twice in one second, read from Stripe",
                 context.connection_id, len(read), spec.name)  # fmt: skip
    return [row for row in rows if row.id not in read] + list(read.values())


WEBHOOKS = WebhookSpec("webhook_secret", "STRIPE_WEBHOOK_SECRET", verify, events, ("stripe-signature",), apply=apply)
