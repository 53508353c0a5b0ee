"""What NextCRM asks BillionMail to do, through the outbox (`core.outbox`): create a campaign (a batch-mail
task), send or schedule one that has not started, and count the recipients of contact groups.

BillionMail takes no idempotency key and answers a repeated `task/create` with a second task. Writes are
therefore sent once (`HttpClient.send(once=True)`: never repeated when the install may have acted) and carry a
marker derived from the outbox row's key in the task's `remark`, which BillionMail stores and lists: before any
re-send of an action whose outcome is unknown the outbox calls the action's `find`, which looks for the marker
and adopts the task it is on. What BillionMail holds afterwards is read back in the shape the sync reads
(`task/list` row with its stats) and goes into `billionmail_campaigns` in the same run.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, Field, field_validator

from nextcrm_pipelines.core.actions import ActionInvalid, ActionSpec, Mirrored, Payload, Sent
from nextcrm_pipelines.providers.billionmail.client import NOT_FOUND, BillionMailApi, EnvelopeError
from nextcrm_pipelines.providers.billionmail.records import TASK_PROCESS

CAMPAIGNS = "billionmail_campaigns"
# BillionMail keeps times as 32-bit unix seconds (`start_time INTEGER`).
LAST_START = datetime(2038, 1, 19, 3, 14, 7, tzinfo=UTC)
# A sender address: something@domain.tld, as BillionMail's `addresser` (VARCHAR(320)).
ADDRESS = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
_SEND_MARKER = re.compile(r"\s*\[nextcrm-send:[0-9a-f]+\]")

GroupId = Annotated[int, Field(ge=1)]


def _distinct(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _start_ok(value: datetime | None) -> datetime | None:
    if value is not None and value > LAST_START:
        raise ValueError("BillionMail keeps times as 32-bit unix seconds: at most 2038-01-19T03:14:07Z")
    return value


class CreateCampaign(Payload):
    """A new campaign to the subscribed, confirmed contacts of `group_ids`, sent at `send_at` (at once without)."""

    subject: str = Field(min_length=1, max_length=998)
    addresser: str = Field(max_length=320, pattern=ADDRESS, description="The sender address")
    full_name: str | None = Field(default=None, max_length=255, description="The sender's display name")
    template_id: int = Field(ge=1, description="The email template's id")
    group_ids: list[GroupId] = Field(min_length=1, max_length=100, description="The contact groups sent to")
    send_at: AwareDatetime | None = Field(default=None, description="When sending starts (now when absent)")
    threads: int = Field(default=5, ge=1, le=100, description="Mails sent at once (BillionMail's speed)")
    track_open: bool = True
    track_click: bool = True
    unsubscribe: bool = Field(default=True, description="Whether mails carry an unsubscribe link")
    remark: str | None = Field(default=None, max_length=500)

    distinct_groups = field_validator("group_ids")(_distinct)
    start_in_range = field_validator("send_at")(_start_ok)


class SendCampaign(Payload):
    """Send a campaign that has not started now, or schedule it for `send_at`."""

    campaign_id: int = Field(ge=1, description="The campaign's (task's) id")
    send_at: AwareDatetime | None = Field(default=None, description="When sending starts (now when absent)")

    start_in_range = field_validator("send_at")(_start_ok)


class CountGroupRecipients(Payload):
    """How many distinct subscribed addresses the contact groups hold."""

    group_ids: list[GroupId] = Field(min_length=1, max_length=100)

    distinct_groups = field_validator("group_ids")(_distinct)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def create_marker(key: str) -> str:
    """The reference a campaign created for outbox key `key` carries in its remark."""
    return f"[nextcrm:{_digest(key)}]"


def send_marker(key: str) -> str:
    """The reference a campaign sent or scheduled for outbox key `key` carries in its remark (the latest only)."""
    return f"[nextcrm-send:{_digest(key)}]"


def _start_time(send_at: datetime | None) -> int:
    return int(send_at.timestamp()) if send_at is not None else int(time.time())


def _read_back(api: BillionMailApi, task_id: Any) -> Sent:
    """The campaign as the sync reads it, for the outbox row and the mirror."""
    record = api.campaign(task_id)
    if record is None:  # deleted again before it could be read: nothing to mirror
        return Sent({"id": task_id}, str(task_id))
    raw, version = record
    return Sent(raw, str(raw["id"]), (Mirrored(CAMPAIGNS, raw, version),))


def _adopt(record: tuple[dict[str, Any], datetime] | None) -> Sent | None:
    if record is None:
        return None
    raw, version = record
    return Sent(raw, str(raw["id"]), (Mirrored(CAMPAIGNS, raw, version),))


def create_campaign(api: BillionMailApi, payload: CreateCampaign, key: str) -> Sent:
    """Check the groups exist (a campaign to a missing group would be created empty), create the task once,
    then read it back."""
    for group_id in payload.group_ids:
        try:
            api.call("GET", "/api/contact/group/info", params={"group_id": group_id})
        except EnvelopeError as exc:
            if exc.code == NOT_FOUND:
                raise ActionInvalid(f"create_campaign: BillionMail has no contact group {group_id}: nothing was "
                                    "sent") from None  # fmt: skip
            raise
    remark = " ".join(part for part in (payload.remark, create_marker(key)) if part)
    body = {
        "addresser": payload.addresser,
        "subject": payload.subject,
        "full_name": payload.full_name or "",
        "template_id": payload.template_id,
        "group_ids": payload.group_ids,
        "is_record": 1,
        "unsubscribe": int(payload.unsubscribe),
        "threads": payload.threads,
        "track_open": int(payload.track_open),
        "track_click": int(payload.track_click),
        "start_time": _start_time(payload.send_at),
        "warmup": 0,
        "remark": remark,
    }
    data = api.post("/api/batch_mail/task/create", body) or {}
    return _read_back(api, data["id"])


def find_created(api: BillionMailApi, payload: CreateCampaign, key: str) -> Sent | None:
    """The campaign an earlier attempt created, by the marker in its remark."""
    return _adopt(api.campaign_marked(create_marker(key)))


def send_campaign(api: BillionMailApi, payload: SendCampaign, key: str) -> Sent:
    """Move the start of a campaign that has not started (`task/update`), then read it back.

    `task/update` writes the 0/1 fields it is sent as given (absent: 0) and needs the subject, so the task's
    own values go with the new `start_time`."""
    task = api.call("GET", "/api/batch_mail/task/find", params={"id": payload.campaign_id}) or {}
    state = task.get("task_process")
    if state != 0 or task.get("pause"):
        status = "paused" if task.get("pause") else TASK_PROCESS.get(state, f"in state {state}")
        raise ActionInvalid(f"send_campaign: campaign {payload.campaign_id} is {status}: only a campaign that has "
                            "not started is sent or scheduled; nothing was sent")  # fmt: skip
    remark = _SEND_MARKER.sub("", str(task.get("remark") or "")).strip()
    body = {
        "task_id": payload.campaign_id,
        "addresser": task.get("addresser") or "",
        "subject": task.get("subject") or "",
        "full_name": task.get("full_name") or "",
        "template_id": task.get("template_id") or 0,
        "threads": task.get("threads") or 0,
        "unsubscribe": int(task.get("unsubscribe") or 0),
        "warmup": int(task.get("warmup") or 0),
        "start_time": _start_time(payload.send_at),
        "remark": " ".join(part for part in (remark, send_marker(key)) if part),
    }
    api.post("/api/batch_mail/task/update", body)
    return _read_back(api, payload.campaign_id)


def find_sent(api: BillionMailApi, payload: SendCampaign, key: str) -> Sent | None:
    """The campaign, if an earlier attempt's update reached it (its remark carries this action's marker)."""
    record = api.campaign(payload.campaign_id)
    if record is None or send_marker(key) not in str(record[0].get("remark") or ""):
        return None
    return _adopt(record)


def count_group_recipients(api: BillionMailApi, payload: CountGroupRecipients, key: str) -> Sent:
    """`contact/group/contact_count`: distinct subscribed addresses of the groups (a read: sending it again is
    harmless). A campaign created now would take the confirmed ones among them."""
    data = api.post("/api/contact/group/contact_count", {"group_ids": payload.group_ids}, once=False) or {}
    total = int(data.get("total") or 0)
    return Sent({"group_ids": payload.group_ids, "total": total}, str(total))


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_campaign", CreateCampaign, create_campaign,
                   "Create a campaign to contact groups, sent at once or at send_at.", find=find_created,
                   entities=(CAMPAIGNS,)),
        ActionSpec("send_campaign", SendCampaign, send_campaign,
                   "Send a campaign that has not started now, or schedule it for send_at.", find=find_sent,
                   entities=(CAMPAIGNS,)),
        ActionSpec("count_group_recipients", CountGroupRecipients, count_group_recipients,
                   "Count the subscribed addresses of contact groups."),
    )
}  # fmt: skip
