"""Xero webhooks: `x-xero-signature` = base64 HMAC-SHA256 of the body with the app's webhook key.

Deliveries carry thin events without ids (each is known by its hash); an intent-to-receive delivery
has no events and is answered without storing anything. Applying re-reads the invoices and contacts
the events name, many ids per request, and upserts their current state under the never-regress rule
by `UpdatedDateUTC`, exactly as a sync maps them: voids, deletes and archives arrive as UPDATE events
and the re-read status flags the row deleted. One app's webhook carries events of every organisation
it is connected to, so events of another organisation than the connection's are skipped.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.upsert import BatchCounts, Row, TableSpec
from nextcrm_pipelines.providers.xero.records import (
    CONTACTS_TABLE,
    INVOICES_TABLE,
    contact_row,
    invoice_row,
    updated_at,
)
from nextcrm_pipelines.webhooks.inbox import ApplyContext, InboxRow
from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Refetch:
    """How one event category is re-read and mapped."""

    table: TableSpec
    id_field: str
    to_row: Callable[[dict[str, Any], datetime], Row]
    many: Callable[[Any, Sequence[str]], list[dict[str, Any]]]
    one: Callable[[Any, str], dict[str, Any] | None]


_REFETCH = {
    "INVOICE": _Refetch(INVOICES_TABLE, "InvoiceID", invoice_row, lambda api, ids: api.invoices_by_id(ids),
                        lambda api, rid: api.invoice(rid)),
    "CONTACT": _Refetch(CONTACTS_TABLE, "ContactID", contact_row, lambda api, ids: api.contacts_by_id(ids),
                        lambda api, rid: api.contact(rid)),
}  # fmt: skip


@dataclass
class _Wanted:
    """The ids one category's events name (each once) and the latest event time per id."""

    seen_at: dict[str, datetime] = field(default_factory=dict)
    events: int = 0

    def add(self, record_id: str, at: datetime | None) -> None:
        self.events += 1
        at = at or datetime.now(UTC)
        held = self.seen_at.get(record_id)
        self.seen_at[record_id] = at if held is None or at > held else held


def _refetch(context: ApplyContext, category: str, wanted: _Wanted) -> BatchCounts:
    """Upsert the current state of the wanted records; flag deleted those Xero no longer knows (404)."""
    how = _REFETCH[category]
    api = context.client()
    ids = list(wanted.seen_at)
    found = {str(raw[how.id_field]).lower(): raw for raw in how.many(api, ids)}
    gone = []
    for record_id in ids:
        if record_id.lower() in found:
            continue
        # Absent from the `IDs` answer: only a 404 on the record itself says it is gone.
        single = how.one(api, record_id)
        if single is None:
            gone.append(record_id)
        else:
            found[record_id.lower()] = single
    rows, unmapped = [], []
    for record_id, raw in found.items():
        try:
            rows.append(how.to_row(raw, updated_at(raw)))
        except Exception as exc:
            unmapped.append(f"{record_id} ({type(exc).__name__}: {exc})")
    counts = context.upsert(how.table, rows) if rows else BatchCounts()
    if gone:
        # Gone when we asked: no stored version can be newer than that (the provider's clock may run ahead).
        version = max(datetime.now(UTC), *(wanted.seen_at[rid] for rid in gone))
        counts.add(context.bury(how.table, gone, version))
    if unmapped:
        raise ValueError(f"Xero {how.table.name} record(s) could not be mapped: {'; '.join(unmapped)[:500]}")
    return counts


def apply(context: ApplyContext, rows: list[InboxRow]) -> BatchCounts:
    """Re-read the invoices and contacts the events name and upsert them as a sync would.

    Repeated events for one record cost one read; events of another organisation and other categories
    (SUBSCRIPTION, CREDITNOTE, ...) change nothing and count as unchanged.
    """
    tenant = context.tenant().lower()
    wanted: dict[str, _Wanted] = {category: _Wanted() for category in _REFETCH}
    counts = BatchCounts()
    foreign = 0
    for row in rows:
        event = row.payload if isinstance(row.payload, dict) else {}
        if str(event.get("tenantId") or "").lower() != tenant:
            foreign += 1
            continue
        category = str(event.get("eventCategory") or "").upper()
        if category not in wanted:
            counts.unchanged += 1
            context.skip()
            continue
        record_id = str(event.get("resourceId") or "").strip()
        try:
            uuid.UUID(record_id)
        except ValueError:
            raise ValueError(f"Xero {category} event (inbox id {row.id}) has no resourceId GUID") from None
        wanted[category].add(record_id, row.occurred_at)
    if foreign:
        log.warning("xero webhooks of %s: %d event(s) of another organisation skipped", context.connection_id, foreign)
        counts.unchanged += foreign
        context.skip(foreign)
    for category, ids in wanted.items():
        if ids.seen_at:
            counts.unchanged += ids.events - len(ids.seen_at)  # repeated events of one record: read once
            counts.add(_refetch(context, category, ids))
    return counts


WEBHOOKS = WebhookSpec(
    "webhook_key", "XERO_WEBHOOK_KEY", base64_hmac_verifier("x-xero-signature"), events, ("x-xero-signature",),
    handshake=lambda payload: isinstance(payload, dict) and payload.get("events") == [],
    apply=apply,
)  # fmt: skip
