"""BillionMail JSON -> rows of `billionmail_campaigns` (batch-mail tasks with their delivery stats).

The list has no updated-since filter and `update_time` does not move when a task progresses, so each
run reads the whole list and a row's version is the time it was read. `task_process` becomes a
readable status; opens and clicks come from the task's stat chart dashboard (kept under `stats` in
the raw JSON). Campaigns deleted in BillionMail are flagged by the id sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.billionmail import tables

TASK_PROCESS = {0: "pending", 1: "processing", 2: "done", 3: "paused"}

CAMPAIGNS_TABLE = table_spec(tables.CAMPAIGNS)


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value not in (None, "", 0) else None


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


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
