"""BillionMail JSON -> rows of `billionmail_campaigns`, `billionmail_contacts` and `billionmail_groups`.

No BillionMail list has an updated-since filter, and neither a task's progress nor a group's counts
move its `update_time` (contacts have none): each run reads the whole lists and a row's version is
the time it was read; a record read again unchanged is left as it is (same raw JSON). `task_process`
becomes a readable status; opens and clicks come from the task's stat chart dashboard (kept under
`stats` in the raw JSON). A contact entry is one address as `contact/list` shows it for one
subscription status, under the id of one of its membership rows, with every group it is in with that
status. Records deleted in BillionMail are flagged by the id sweep of the same run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import JSONB_BINARY_VERSION, Row
from nextcrm_pipelines.providers.billionmail import tables

TASK_PROCESS = {0: "pending", 1: "processing", 2: "done", 3: "paused"}
# `active` of a contact row: the list (`status` parameter) it is shown in.
SUBSCRIPTION = {1: "subscribed", 0: "unsubscribed"}

CAMPAIGNS_TABLE = table_spec(tables.CAMPAIGNS)
CONTACTS_TABLE = table_spec(tables.CONTACTS)
GROUPS_TABLE = table_spec(tables.GROUPS)


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value not in (None, "", 0) else None


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _ref(value: Any) -> str | None:
    """An id that BillionMail writes as 0 (or omits) when there is none."""
    return None if value in (None, "", 0, "0") else str(value)


def _attributes(value: Any) -> bytes:
    """A contact's attributes as COPY sends a jsonb column (its binary form), NUL removed (Postgres stores none)."""
    attribs = value if isinstance(value, dict) else {}
    if any("\x00" in str(k) or "\x00" in str(v) for k, v in attribs.items()):
        attribs = {str(k).replace("\x00", ""): str(v).replace("\x00", "") for k, v in attribs.items()}
    return JSONB_BINARY_VERSION + orjson.dumps(attribs)


def campaign_row(raw: dict[str, Any], version: datetime) -> Row:
    stats = raw.get("stats") or {}
    process = _int(raw.get("task_process"))
    return Row.build(
        str(raw["id"]),
        CAMPAIGNS_TABLE.values(
            name=raw.get("task_name"),
            subject=raw.get("subject"),
            sender=raw.get("addresser"),
            status=TASK_PROCESS.get(process, str(process)) if process is not None else None,
            paused=bool(raw.get("pause")),
            scheduled_at=_time(raw.get("start_time")),
            recipients=_int(raw.get("recipient_count")),
            sent=_int(raw.get("sent_count")),
            delivered=_int(raw.get("success_count")),
            failed=_int(raw.get("error_count")),
            opened=_int(stats.get("opened")),
            clicked=_int(stats.get("clicked")),
            progress=_int(raw.get("progress")),
            template_name=raw.get("template_name"),
        ),
        created_at=_time(raw.get("create_time")),
        version=version,
        deleted=False,
        raw=raw,
    )


def contact_row(raw: dict[str, Any], version: datetime) -> Row:
    """A `contact/list` entry: the address, its subscription status and confirmation, the groups it is in
    with that status (`groups`, sorted by id by the client), its attributes and tags."""
    active = _int(raw.get("active"))
    groups = raw.get("groups") or ()
    tags = raw.get("tags") or ()
    return Row.build(
        str(raw["id"]),
        CONTACTS_TABLE.values(
            email=_text(raw.get("email")),
            status=SUBSCRIPTION.get(active, str(active)) if active is not None else None,
            confirmed=bool(raw.get("status")) if raw.get("status") is not None else None,
            group_id=_ref(raw.get("group_id")),
            group_ids=[str(g["id"]) for g in groups if isinstance(g, dict) and _ref(g.get("id"))],
            campaign_id=_ref(raw.get("task_id")),
            attributes=_attributes(raw.get("attribs")),
            tags=sorted(str(t["name"]) for t in tags if isinstance(t, dict) and t.get("name")),
            last_active_at=_time(raw.get("last_active_at")),
        ),
        created_at=_time(raw.get("create_time")),
        version=version,
        deleted=False,
        raw=raw,
    )


def group_row(raw: dict[str, Any], version: datetime) -> Row:
    """A `contact/group/list` entry with its counts: all contacts, subscribed ones (its recipients), unsubscribed."""
    return Row.build(
        str(raw["id"]),
        GROUPS_TABLE.values(
            name=_text(raw.get("name")),
            description=_text(raw.get("description")),
            double_optin=bool(raw.get("double_optin")) if raw.get("double_optin") is not None else None,
            contact_count=_int(raw.get("total_count")),
            subscribed_count=_int(raw.get("active_count")),
            unsubscribed_count=_int(raw.get("unsubscribe_count")),
            updated_at=_time(raw.get("update_time")),
        ),
        created_at=_time(raw.get("create_time")),
        version=version,
        deleted=False,
        raw=raw,
    )
