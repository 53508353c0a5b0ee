"""Mautic JSON -> rows of `mautic_campaigns`, `mautic_contacts` and `mautic_segments`.

`dateModified` is null until a record is first edited, so a record's version (and the day it
belongs to) is `dateModified`, falling back to `dateAdded`. Counts and memberships the listings do
not carry are set by the client before mapping, and kept in the raw JSON so that a change of them
changes the row: a campaign's live member count as `contactCount`, a segment's as `memberCount`, a
contact's segment ids as `segmentIds`. Mautic has no tombstones: campaigns and segments deleted
upstream are flagged by the id sweep, contacts by the `mautic.lead_post_delete` webhook and the sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.mautic import tables

CAMPAIGNS_TABLE = table_spec(tables.CAMPAIGNS)
CONTACTS_TABLE = table_spec(tables.CONTACTS)
SEGMENTS_TABLE = table_spec(tables.SEGMENTS)


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 with offset (`2015-07-20T13:11:56-05:00`) as aware UTC; null stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def changed_at(raw: dict[str, Any]) -> datetime:
    """A record's version: `dateModified`, else `dateAdded` (never-edited records)."""
    moment = parse_time(raw.get("dateModified")) or parse_time(raw.get("dateAdded"))
    if moment is None:
        raise ValueError("record has neither dateModified nor dateAdded")
    return moment


def _count(value: Any) -> int | None:
    if isinstance(value, dict | list):
        return len(value)
    return None


def campaign_row(raw: dict[str, Any], version: datetime) -> Row:
    category = raw.get("category")
    count = raw.get("contactCount")
    return Row.build(
        str(raw["id"]),
        CAMPAIGNS_TABLE.values(
            name=raw.get("name"),
            alias=raw.get("alias"),
            description=raw.get("description"),
            category=category.get("title") if isinstance(category, dict) else category,
            published=bool(raw.get("isPublished")),
            publish_up=parse_time(raw.get("publishUp")),
            publish_down=parse_time(raw.get("publishDown")),
            contact_count=int(count) if count not in (None, "") else None,
            event_count=_count(raw.get("events")),
            segment_count=_count(raw.get("lists")),
            created_by=raw.get("createdByUser"),
        ),
        created_at=parse_time(raw.get("dateAdded")),
        version=version,
        deleted=False,
        raw=raw,
    )


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(float(value))
    except (TypeError, ValueError):
        return None


def _ids(values: Any) -> list[str]:
    """Ids in numeric order, as text."""
    return sorted({str(v) for v in values or ()}, key=lambda v: (len(v), v))


def contact_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A contact's field values by alias: `fields.all`, or the grouped `fields.core`... when `all` is absent."""
    fields = raw.get("fields")
    if not isinstance(fields, dict):
        return {}
    flat = fields.get("all")
    if isinstance(flat, dict):
        return flat
    found: dict[str, Any] = {}
    for group in fields.values():
        if isinstance(group, dict):
            for alias, field in group.items():
                if isinstance(field, dict):
                    found[alias] = field.get("value")
    return found


def contact_row(raw: dict[str, Any], version: datetime) -> Row:
    """A contact: its core fields, owner, tags, do-not-contact channels and segment ids (`segmentIds`)."""
    values = contact_fields(raw)
    owner = raw.get("owner")
    tags = raw.get("tags")
    dnc = raw.get("doNotContact")
    return Row.build(
        str(raw["id"]),
        CONTACTS_TABLE.values(
            first_name=_text(values.get("firstname")),
            last_name=_text(values.get("lastname")),
            email=_text(values.get("email")),
            phone=_text(values.get("phone")),
            mobile=_text(values.get("mobile")),
            company=_text(values.get("company")),
            position=_text(values.get("position")),
            address1=_text(values.get("address1")),
            address2=_text(values.get("address2")),
            city=_text(values.get("city")),
            state=_text(values.get("state")),
            zipcode=_text(values.get("zipcode")),
            country=_text(values.get("country")),
            points=_int(raw.get("points", values.get("points"))),
            owner_id=_text(owner.get("id")) if isinstance(owner, dict) else _text(owner),
            identified_at=parse_time(raw.get("dateIdentified")),
            last_active_at=parse_time(raw.get("lastActive")),
            tags=sorted(t["tag"] if isinstance(t, dict) else str(t) for t in tags or () if t) if tags else [],
            do_not_contact=sorted({str(d.get("channel")) for d in dnc if isinstance(d, dict)}) if dnc else [],
            segment_ids=_ids(raw.get("segmentIds")),
        ),
        created_at=parse_time(raw.get("dateAdded")),
        version=version,
        deleted=False,
        raw=raw,
    )


def segment_row(raw: dict[str, Any], version: datetime) -> Row:
    """A segment (Mautic's `lists`), with the live member count the client sets as `memberCount`."""
    category = raw.get("category")
    count = raw.get("memberCount")
    filters = raw.get("filters")
    return Row.build(
        str(raw["id"]),
        SEGMENTS_TABLE.values(
            name=raw.get("name"),
            public_name=raw.get("publicName"),
            alias=raw.get("alias"),
            description=raw.get("description"),
            category=category.get("title") if isinstance(category, dict) else _text(category),
            published=bool(raw.get("isPublished")),
            is_global=raw.get("isGlobal") if isinstance(raw.get("isGlobal"), bool) else None,
            is_preference_center=raw.get("isPreferenceCenter")
            if isinstance(raw.get("isPreferenceCenter"), bool)
            else None,
            member_count=_int(count),
            filter_count=_count(filters),
            created_by=raw.get("createdByUser"),
        ),
        created_at=parse_time(raw.get("dateAdded")),
        version=version,
        deleted=False,
        raw=raw,
    )
