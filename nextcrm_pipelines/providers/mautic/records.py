"""Mautic JSON -> rows of `mautic_campaigns`.

`dateModified` is null until a campaign is first edited, so a campaign's version (and the day it
belongs to) is `dateModified`, falling back to `dateAdded`. `contact_count` is the live member count
the client sets as `contactCount`. Mautic has no tombstones: campaigns deleted upstream are flagged by
the id sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.mautic import tables

CAMPAIGNS_TABLE = table_spec(tables.CAMPAIGNS)


def parse_time(value: Any) -> datetime | None:
    """ISO 8601 with offset (`2015-07-20T13:11:56-05:00`) as aware UTC; null stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def changed_at(raw: dict[str, Any]) -> datetime:
    moment = parse_time(raw.get("dateModified")) or parse_time(raw.get("dateAdded"))
    if moment is None:
        raise ValueError("campaign has neither dateModified nor dateAdded")
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
