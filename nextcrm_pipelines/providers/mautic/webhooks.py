"""Mautic webhooks: `Webhook-Signature` = base64 HMAC-SHA256 of the body with the webhook's secret.

A body maps event types to lists of events; Mautic gives no event ids, so each is known by its hash.
Applying a batch:

- contacts: a contact saved (`mautic.lead_post_save_new`, `mautic.lead_post_save_update`), its points or
  channel subscription changed, or a form submitted by it, is re-read by id as the sync reads it (with
  its segment ids) and upserted under never-regress at the sync's version (`dateModified`, else
  `dateAdded`); a contact Mautic no longer has, or one `mautic.lead_post_delete` names, is flagged
  deleted as of its latest event in the batch. Re-reading makes the outcome the same whatever the
  order of the events or how often each came.
- segments: each segment a touched contact is in or was in (its stored `segment_ids` and the re-read
  ones) is re-read with its live member count, as the sync reads it (joining or leaving sends no event,
  so a change of membership shows at the contact's next event or the next sync of its day).
- campaigns: no event is about a campaign, and joining or leaving one sends none, yet memberships
  change the contact counts our campaign rows carry, so the campaigns an event touches are refreshed,
  each once per batch: a saved contact's campaigns (its `campaign_leads` rows, removals included);
  for a deleted contact every campaign of the connection we hold (its memberships went with it); for
  an email sent or opened by a campaign, the campaign owning that campaign event (from the stored rows).
- anything else (companies, page hits, SMS, broadcast emails) touches nothing we store: counted as skipped.

A refreshed campaign is read as the sync reads it, with its live member count (the client's
`with_member_counts`, which the sync uses too), then upserted under never-regress at the sync's version;
one that Mautic answers 404 for is flagged deleted, as the id sweep does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.upsert import BatchCounts
from nextcrm_pipelines.providers.mautic.records import (
    CAMPAIGNS_TABLE,
    CONTACTS_TABLE,
    SEGMENTS_TABLE,
    campaign_row,
    changed_at,
    contact_row,
    segment_row,
)
from nextcrm_pipelines.webhooks.inbox import ApplyContext, InboxRow
from nextcrm_pipelines.webhooks.verify import InboxEvent, WebhookSpec, base64_hmac_verifier, hash_of, parse_time

CONTACT_EVENTS = frozenset(
    {
        "mautic.lead_post_save_new",
        "mautic.lead_post_save_update",
        "mautic.lead_points_change",
        "mautic.lead_channel_subscription_changed",
        "mautic.form_on_submit",  # a form can add its submitter to the campaigns it feeds
    }
)
CONTACT_DELETED = "mautic.lead_post_delete"
EMAIL_EVENTS = frozenset({"mautic.email_on_send", "mautic.email_on_open"})


def events(payload: Any) -> list[InboxEvent]:
    """One inbox event per item of each event type's list, known by the hash of its type and content."""
    if not isinstance(payload, dict):
        raise ValueError("not a Mautic webhook payload")
    found = []
    for kind, items in payload.items():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                found.append(InboxEvent(hash_of({kind: item}), kind, parse_time(item.get("timestamp")), item))
    return found


def _id(value: Any) -> str | None:
    """A Mautic id (int or digit string) as text; anything else None."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    return text if text.isdigit() else None


def contact_id(payload: dict[str, Any]) -> str | None:
    """The contact an event is about: `contact` (or the older `lead`), or a form submission's `lead`."""
    for holder in (payload, payload.get("submission")):
        if isinstance(holder, dict):
            for key in ("contact", "lead"):
                found = holder.get(key)
                if isinstance(found, dict) and _id(found.get("id")):
                    return _id(found.get("id"))
    return None


def campaign_event_id(payload: dict[str, Any]) -> str | None:
    """The campaign event behind an email: `source` `["campaign.event", id]` on send, `stat.sourceId` on open."""
    source = payload.get("source")
    if isinstance(source, list) and len(source) >= 2 and source[0] == "campaign.event":
        return _id(source[1])
    stat = payload.get("stat")
    if isinstance(stat, dict) and stat.get("source") == "campaign.event":
        return _id(stat.get("sourceId"))
    return None


def _stored_campaigns(context: ApplyContext, event_ids: Collection[str] | None = None) -> set[str]:
    """Ids of the connection's live campaign rows (those holding one of `event_ids`, when given)."""
    query = "SELECT id FROM {} WHERE connection_id = %s AND NOT deleted"
    params: list[Any] = [context.connection_id]
    if event_ids is not None:
        query += " AND raw->'events' ?| %s"
        params.append(list(event_ids))
    rows = context.conn.execute(sql.SQL(query).format(table(CAMPAIGNS_TABLE.name, context.schema)), params)
    return {campaign_id for (campaign_id,) in rows.fetchall()}


def refresh_campaigns(context: ApplyContext, ids: Iterable[str]) -> BatchCounts:
    """Re-read these campaigns and upsert them (never regressing); flag the ones Mautic no longer has."""
    wanted = sorted(set(ids), key=lambda value: (len(value), value))
    api = context.client()
    listed = api.campaigns_by_id(wanted)
    found = [raw for campaign_id in wanted if (raw := listed.get(campaign_id) or api.campaign(campaign_id))]
    counted = api.with_member_counts(found)
    kept = {str(raw["id"]) for raw in counted}
    rows = [campaign_row(raw, changed_at(raw)) for raw in counted]
    gone = [campaign_id for campaign_id in wanted if campaign_id not in kept]
    counts = BatchCounts()
    if rows:
        counts.add(context.upsert(CAMPAIGNS_TABLE, rows))
    if gone:
        counts.add(context.bury(CAMPAIGNS_TABLE, gone, datetime.now(UTC)))
    return counts


def _stored_segment_ids(context: ApplyContext, contact_ids: Collection[str]) -> set[str]:
    """The segment ids the stored rows of these contacts hold."""
    rows = context.conn.execute(
        sql.SQL("SELECT DISTINCT unnest(segment_ids) FROM {} WHERE connection_id = %s AND id = ANY(%s)").format(
            table(CONTACTS_TABLE.name, context.schema)
        ),
        (context.connection_id, list(contact_ids)),
    )
    return {segment_id for (segment_id,) in rows.fetchall()}


def refresh_contacts(context: ApplyContext, latest: dict[str, datetime], deleted: set[str]) -> BatchCounts:
    """Re-read the contacts (`latest`: id -> time of its newest event in the batch) and upsert them; flag the
    deleted ones and those Mautic no longer has as of that time; then re-count their segments, old and new."""
    api = context.client()
    wanted = sorted(set(latest) - deleted, key=lambda value: (len(value), value))
    found = api.contacts_by_id(wanted) if wanted else {}
    gone = sorted((deleted | (set(wanted) - set(found))), key=lambda value: (len(value), value))
    segments = _stored_segment_ids(context, latest)
    counts = BatchCounts()
    if found:
        counts.add(context.upsert(CONTACTS_TABLE, [contact_row(raw, changed_at(raw)) for raw in found.values()]))
        segments |= {segment_id for raw in found.values() for segment_id in raw["segmentIds"]}
    for contact_id in gone:
        counts.add(context.bury(CONTACTS_TABLE, [contact_id], latest[contact_id]))
    if segments:
        listed = api.segments_by_id(segments)
        if listed:
            counts.add(context.upsert(SEGMENTS_TABLE, [segment_row(raw, changed_at(raw)) for raw in listed.values()]))
    return counts


def apply(context: ApplyContext, rows: list[InboxRow]) -> BatchCounts:
    """Re-read the contacts the batch names (flagging deleted ones) with their segments, and refresh, once each,
    the campaigns the batch's contact and campaign-email events touch."""
    contacts: set[str] = set()
    latest: dict[str, datetime] = {}
    deleted: set[str] = set()
    email_sources: set[str] = set()
    every_campaign = False
    for row in rows:
        payload = row.payload if isinstance(row.payload, dict) else {}
        when = row.occurred_at or datetime.now(UTC)
        if row.event_type == CONTACT_DELETED:
            every_campaign = True
            if found := _id(payload.get("id")):
                deleted.add(found)
                latest[found] = max(latest.get(found, when), when)
        elif row.event_type in CONTACT_EVENTS and (found := contact_id(payload)):
            contacts.add(found)
            latest[found] = max(latest.get(found, when), when)
        elif row.event_type in EMAIL_EVENTS and (found := campaign_event_id(payload)):
            email_sources.add(found)
        else:
            context.skip()
    counts = BatchCounts()
    if latest:
        counts.add(refresh_contacts(context, latest, deleted))
    campaigns: set[str] = set()
    if every_campaign:
        campaigns |= _stored_campaigns(context)
    elif email_sources:
        campaigns |= _stored_campaigns(context, email_sources)
    if contacts - deleted:
        campaigns |= context.client().campaigns_of_contacts(contacts - deleted)
    if campaigns:
        counts.add(refresh_campaigns(context, campaigns))
    return counts


WEBHOOKS = WebhookSpec("webhook_secret", "MAUTIC_WEBHOOK_SECRET", base64_hmac_verifier("webhook-signature"), events,
                       ("webhook-signature", "x-origin-base-url"), apply=apply)  # fmt: skip
