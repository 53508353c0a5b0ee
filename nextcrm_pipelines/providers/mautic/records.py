"""Mautic JSON -> rows of `mautic_campaigns`.

`dateModified` is null until a campaign is first edited, so a campaign's version (and the day it
belongs to) is `dateModified`, falling back to `dateAdded`. `contact_count` is the live member count
the client sets as `contactCount`. Mautic has no tombstones: campaigns deleted upstream are flagged by
the id sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.upsert import Row, TableSpec

CAMPAIGNS_TABLE = TableSpec(
    "mautic_campaigns",
    (
        ("name", "text"), ("alias", "text"), ("description", "text"), ("category", "text"), ("published", "bool"),
        ("publish_up", "timestamptz"), ("publish_down", "timestamptz"), ("contact_count", "int4"),
        ("event_count", "int4"), ("segment_count", "int4"), ("created_by", "text"),
    ),
)  # fmt: skip


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
        (
            raw.get("name"),
            raw.get("alias"),
            raw.get("description"),
            category.get("title") if isinstance(category, dict) else category,
            bool(raw.get("isPublished")),
            parse_time(raw.get("publishUp")),
            parse_time(raw.get("publishDown")),
            int(count) if count not in (None, "") else None,
            _count(raw.get("events")),
            _count(raw.get("lists")),
            raw.get("createdByUser"),
        ),
        created_at=parse_time(raw.get("dateAdded")),
        version=version,
        deleted=False,
        raw=raw,
    )
