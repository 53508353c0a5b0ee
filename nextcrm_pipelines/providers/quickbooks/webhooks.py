"""QuickBooks webhooks: `intuit-signature` = base64 HMAC-SHA256 of the body with the app's verifier token.

Both payload shapes are read: the legacy `eventNotifications` (entities per realm, no ids: each is
known by its hash) and the CloudEvents array (`qbo.<entity>.<operation>.v1`, with ids). Events name
an invoice, customer or payment by id only, so applying re-reads the records they name (one query per
entity for many ids, each id once) and upserts them as a sync maps them, never regressing by
`MetaData.LastUpdatedTime`: Create, Update, Emailed and Void re-read (a void shows as the `voided`
status), Delete flags an invoice or payment deleted as of the event's time (a customer's Delete makes
it inactive, which a re-read shows), Merge flags the merged-away `deletedId` deleted and re-reads the
survivor. A hard delete leaves nothing to query, so an id that is no longer found counts as deleted
only when Change Data Capture reports it `Deleted`. One app's webhook carries every realm it is
connected to: events of another realm than the connection's are skipped, as are other entities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.upsert import BatchCounts, Row, TableSpec
from nextcrm_pipelines.providers.quickbooks.records import (
    CUSTOMERS_TABLE,
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    customer_row,
    invoice_row,
    payment_row,
    updated_at,
)
from nextcrm_pipelines.webhooks.inbox import ApplyContext, InboxRow
from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time

log = logging.getLogger(__name__)

# Legacy operation names, and the CloudEvents `type` verbs that mean the same.
OPERATIONS = {
    "create": "Create", "created": "Create", "update": "Update", "updated": "Update",
    "delete": "Delete", "deleted": "Delete", "merge": "Merge", "merged": "Merge",
    "void": "Void", "voided": "Void", "emailed": "Emailed",
}  # fmt: skip
REFETCHED = frozenset({"Create", "Update", "Void", "Emailed", "Merge"})
# How far before an event Change Data Capture is asked for the deletion of a record it names.
CDC_LEEWAY = timedelta(minutes=5)


@dataclass(frozen=True)
class Mirrored:
    """An entity whose events are applied: its QuickBooks name, table and mapping."""

    entity: str
    table: TableSpec
    to_row: Callable[[dict[str, Any], datetime], Row]
    # What a Delete event means: a hard delete (a tombstone now) or, for name lists, made inactive (re-read).
    delete_is_final: bool = True


MIRRORED = {
    "invoice": Mirrored("Invoice", INVOICES_TABLE, invoice_row),
    "customer": Mirrored("Customer", CUSTOMERS_TABLE, customer_row, delete_is_final=False),
    "payment": Mirrored("Payment", PAYMENTS_TABLE, payment_row),
}


@dataclass(frozen=True)
class EntityChange:
    """One entity change an event reports, whichever payload shape carried it."""

    realm: str
    entity: str
    operation: str
    id: str
    deleted_id: str | None
    at: datetime | None


def entity_change(event: Any) -> EntityChange:
    """The change one stored event reports; ValueError when the event lacks what applying needs."""
    if not isinstance(event, dict):
        raise ValueError("a QuickBooks event is a JSON object")
    if "realmId" in event or "name" in event:
        realm, entity, verb = event.get("realmId"), event.get("name"), event.get("operation")
        entity_id, deleted_id, at = event.get("id"), event.get("deletedId"), parse_time(event.get("lastUpdated"))
    else:
        parts = str(event.get("type") or "").split(".")
        if len(parts) != 4 or parts[0] != "qbo":
            raise ValueError(f"CloudEvents type {event.get('type')!r} is not qbo.<entity>.<operation>.v<n>")
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        realm, entity, verb, entity_id = event.get("intuitaccountid"), parts[1], parts[2], event.get("intuitentityid")
        deleted_id, at = event.get("deletedId") or data.get("deletedId"), parse_time(event.get("time"))
    missing = [name for name, value in (("realm", realm), ("entity", entity), ("operation", verb), ("id", entity_id))
               if value in (None, "")]  # fmt: skip
    if missing:
        raise ValueError(f"QuickBooks event without {', '.join(missing)}")
    operation = OPERATIONS.get(str(verb).lower(), str(verb))
    return EntityChange(str(realm), str(entity), operation, str(entity_id),
                        None if deleted_id in (None, "") else str(deleted_id), at)  # fmt: skip


def events(payload: Any) -> list[InboxEvent]:
    """Split a verified delivery into inbox events; ValueError when an event cannot be applied."""
    if isinstance(payload, list):
        found = [
            InboxEvent(str(e.get("id") or hash_of(e)), e.get("type"), parse_time(e.get("time")), e)
            for e in payload
            if isinstance(e, dict)
        ]
    elif isinstance(payload, dict) and isinstance(payload.get("eventNotifications"), list):
        found = []
        for note in payload["eventNotifications"]:
            change = note.get("dataChangeEvent") if isinstance(note, dict) else None
            entities = change.get("entities") if isinstance(change, dict) else None
            if not isinstance(entities, list) or not all(isinstance(entity, dict) for entity in entities):
                raise ValueError("an eventNotifications item is not {realmId, dataChangeEvent: {entities: [...]}}")
            for entity in entities:
                event = {"realmId": note.get("realmId"), **entity}
                kind = f"{entity.get('name')}.{entity.get('operation')}"
                found.append(InboxEvent(hash_of(event), kind, parse_time(entity.get("lastUpdated")), event))
    else:
        raise ValueError("not a QuickBooks webhook payload")
    for event in found:
        entity_change(event.payload)
    return found


def deleted_stub(record_id: str, at: datetime) -> dict[str, Any]:
    """What Change Data Capture says of a hard-deleted (or merged-away) record, for an id a Delete or Merge
    event names."""
    return {"domain": "QBO", "status": "Deleted", "Id": record_id, "MetaData": {"LastUpdatedTime": at.isoformat()}}


def _already_deleted(context: ApplyContext, spec: TableSpec, ids: set[str]) -> set[str]:
    """The ids whose stored row already says the record was hard-deleted."""
    found = context.conn.execute(
        sql.SQL("SELECT id FROM {} WHERE connection_id = %s AND id = ANY(%s) AND status = %s").format(
            table(spec.name, context.schema)
        ),
        (context.connection_id, sorted(ids), spec.deleted_status),
    ).fetchall()
    return {r[0] for r in found}


def apply(context: ApplyContext, rows: list[InboxRow]) -> BatchCounts:
    """Re-read the records the events name, flag deleted and merged-away ones, and upsert as a sync would.

    Repeated ids cost one read; events of other realms and of other entities change nothing and are
    counted as skipped. Rows that can be written are written before an id that is neither found nor
    reported deleted fails the events (retried later).
    """
    realm = context.tenant()
    counts = BatchCounts()
    foreign = 0
    reread: dict[str, dict[str, datetime]] = {}  # entity -> id -> earliest event time naming it
    rows_out: dict[str, list[Row]] = {}
    now = datetime.now(UTC)
    for row in rows:
        try:
            change = entity_change(row.payload)
        except ValueError as exc:
            raise ValueError(f"inbox event {row.id}: {exc}") from None
        if change.realm != realm:
            foreign += 1
            continue
        kind = change.entity.lower()
        mirrored = MIRRORED.get(kind)
        if mirrored is None or change.operation not in REFETCHED | {"Delete"}:
            context.skip()
            continue
        at = change.at or row.occurred_at or now
        out = rows_out.setdefault(kind, [])
        if change.operation == "Delete" and mirrored.delete_is_final:
            out.append(mirrored.to_row(deleted_stub(change.id, at), at))
            continue
        if change.operation == "Merge" and change.deleted_id:
            out.append(mirrored.to_row(deleted_stub(change.deleted_id, at), at))
        wanted = reread.setdefault(kind, {})
        wanted[change.id] = min(at, wanted.get(change.id, at))
    if foreign:
        log.warning("quickbooks webhooks of %s: %d event(s) of another realm skipped", context.connection_id, foreign)
        context.skip(foreign)
    unexplained: dict[str, set[str]] = {}
    api = context.client() if reread else None
    for kind, wanted in reread.items():
        mirrored, out = MIRRORED[kind], rows_out[kind]
        found = api.records_by_id(mirrored.entity, wanted)
        out.extend(mirrored.to_row(raw, updated_at(raw)) for raw in found)
        missing = set(wanted) - {str(raw["Id"]) for raw in found} - {r.id for r in out if r.tombstone}
        if missing:
            since = min(wanted[i] for i in missing) - CDC_LEEWAY
            stubs = api.deleted_records(mirrored.entity, missing, since)
            out.extend(mirrored.to_row(stub, updated_at(stub)) for stub in stubs)
            left = missing - {str(stub["Id"]) for stub in stubs}
            left -= _already_deleted(context, mirrored.table, left) if left else set()
            if left:
                unexplained[mirrored.entity] = left
    for kind, out in rows_out.items():
        if out:
            counts.add(context.upsert(MIRRORED[kind].table, out))
    if unexplained:
        named = "; ".join(f"{entity.lower()}(s) {sorted(ids, key=lambda i: (len(i), i))[:20]}"
                          for entity, ids in sorted(unexplained.items()))  # fmt: skip
        raise LookupError(
            f"QuickBooks {named} named by webhooks are neither found nor reported deleted by Change Data Capture; "
            "the events are retried"
        )
    return counts


WEBHOOKS = WebhookSpec("webhook_verifier_token", "QUICKBOOKS_WEBHOOK_VERIFIER_TOKEN",
                       base64_hmac_verifier("intuit-signature"), events, ("intuit-signature",),
                       apply=apply)  # fmt: skip
