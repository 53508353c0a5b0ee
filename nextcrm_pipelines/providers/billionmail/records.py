"""BillionMail JSON -> rows of `billionmail_campaigns` (batch-mail tasks with their delivery stats).

The list has no updated-since filter and `update_time` does not move when a task progresses, so each
run reads the whole list and a row's version is the time it was read. `task_process` becomes a
readable status; opens and clicks come from the task's stat chart dashboard (kept under `stats` in
the raw JSON). Campaigns deleted in BillionMail are flagged by the id sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.upsert import Row, TableSpec

TASK_PROCESS = {0: "pending", 1: "processing", 2: "done", 3: "paused"}

CAMPAIGNS_TABLE = TableSpec(
    "billionmail_campaigns",
    (
        ("name", "text"), ("subject", "text"), ("sender", "text"), ("status", "text"), ("paused", "bool"),
        ("scheduled_at", "timestamptz"), ("recipients", "int4"), ("sent", "int4"), ("delivered", "int4"),
        ("failed", "int4"), ("opened", "int4"), ("clicked", "int4"), ("progress", "int4"),
        ("template_name", "text"),
    ),
    deleted_status="deleted",
)  # fmt: skip


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value not in (None, "", 0) else None


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def campaign_row(raw: dict[str, Any], version: datetime) -> Row:
    stats = raw.get("stats") or {}
    process = _int(raw.get("task_process"))
    return Row.build(
        str(raw["id"]),
        (
            raw.get("task_name"),
            raw.get("subject"),
            raw.get("addresser"),
            TASK_PROCESS.get(process, str(process)) if process is not None else None,
            bool(raw.get("pause")),
            _time(raw.get("start_time")),
            _int(raw.get("recipient_count")),
            _int(raw.get("sent_count")),
            _int(raw.get("success_count")),
            _int(raw.get("error_count")),
            _int(stats.get("opened")),
            _int(stats.get("clicked")),
            _int(raw.get("progress")),
            raw.get("template_name"),
        ),
        created_at=_time(raw.get("create_time")),
        version=version,
        deleted=False,
        raw=raw,
    )
