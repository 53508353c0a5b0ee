"""BillionMail actions through the outbox, against the sandbox over real HTTP and a real Postgres: a campaign is
created, sent or scheduled exactly once although BillionMail takes no idempotency key (a worker killed after the
install accepted, a proxy's 504 after it acted: the marker in the task's remark is found and adopted, where a
re-send would make a second campaign), what BillionMail holds lands in `billionmail_campaigns` in the same run
and a later sync changes nothing, a group's recipients are counted, and bad payloads fail naming the field
before anything reaches the install. The emulator's own behaviour (a repeated create makes a second task, an
update of a running task is refused, the 504 after acting) is checked over HTTP too."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import httpx
import pytest

from nextcrm_pipelines.core.runner import snapshot_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.billionmail.actions import create_marker, send_marker
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.outbox_helpers import (
    applier,
    crash,
    requests_served,
    route_count,
    rows,
    stored_key,
    submit,
    through_dagster,
)

BILLIONMAIL = get_provider("billionmail")
apply = applier(BILLIONMAIL)
CAMPAIGNS = "billionmail_campaigns"
CREATE = "POST /api/batch_mail/task/create"


def sync(database_url: str, schema: str, connection) -> Any:
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=BILLIONMAIL, entity_name=CAMPAIGNS,
                                connection_id=connection.id, windows=[snapshot_window()])  # fmt: skip
    assert result.status == "success", result.error
    return result


def tasks(control, account: str) -> list[dict]:
    return control.export(account, "campaigns")["records"]


def subscribed(control, account: str, group_ids: list[int]) -> set[str]:
    """Distinct subscribed addresses in the groups, from the sandbox's contact export."""
    records = control.export(account, "contacts")["records"]
    return {r["email"] for r in records if r["active"] == 1 and {g["id"] for g in r["groups"]} & set(group_ids)}


def campaign_payload(group_id: int, **extra: Any) -> dict[str, Any]:
    return {"subject": "Spring launch", "addresser": "news@example.com", "full_name": "NextCRM", "template_id": 1,
            "group_ids": [group_id], **extra}  # fmt: skip


def later(hours: int = 24) -> datetime:
    return (datetime.now(UTC) + timedelta(hours=hours)).replace(microsecond=0)


def test_a_scheduled_campaign_through_dagster_is_created_once_mirrored_and_a_later_sync_changes_nothing(
    database_url, schema, billionmail
):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    send_at = later()
    payload = campaign_payload(group_id, send_at=send_at.isoformat(), remark="Q2")
    done = submit(database_url, schema, connection.id, "create_campaign", payload, key="crm-campaign-1")
    (materialization,) = through_dagster("billionmail")
    assert materialization.asset_key == dg.AssetKey(CAMPAIGNS) and materialization.partition == connection.id
    row = rows(database_url, schema)[done.id]
    (task,) = tasks(control, account)
    assert row["status"] == "succeeded" and row["attempts"] == 1 and row["result_id"] == str(task["id"])
    assert task["subject"] == "Spring launch" and task["addresser"] == "news@example.com"
    assert task["start_time"] == int(send_at.timestamp()) and task["task_process"] == 0
    assert task["remark"] == f"Q2 {create_marker('crm-campaign-1')}" == row["result"]["remark"]
    assert [g["id"] for g in task["groups"]] == [group_id]
    # Subscribed and confirmed contacts are the recipients: at most the group's subscribed addresses.
    assert 0 < task["recipient_count"] <= len(subscribed(control, account, [group_id]))
    stored = mirror(database_url, schema, CAMPAIGNS, connection.id)[str(task["id"])]
    assert stored["status"] == "pending" and stored["scheduled_at"] == send_at and stored["subject"] == "Spring launch"
    assert stored["recipients"] == task["recipient_count"] and not stored["deleted"]
    again = sync(database_url, schema, connection)
    assert again.counts.inserted == again.counts.updated == 0
    assert mirror(database_url, schema, CAMPAIGNS, connection.id)[str(task["id"])]["raw"] == stored["raw"]


def test_a_campaign_is_rescheduled_then_sent_now_and_one_that_started_is_refused(database_url, schema, billionmail):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    created = submit(database_url, schema, connection.id, "create_campaign",
                     campaign_payload(group_id, send_at=later(48).isoformat()))  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    campaign_id = int(rows(database_url, schema)[created.id]["result_id"])
    moved_to = later(2)
    moved = submit(database_url, schema, connection.id, "send_campaign",
                   {"campaign_id": campaign_id, "send_at": moved_to.isoformat()}, key="crm-move")  # fmt: skip
    (materialization,) = through_dagster("billionmail")
    assert materialization.asset_key == dg.AssetKey(CAMPAIGNS)
    (task,) = tasks(control, account)
    assert task["start_time"] == int(moved_to.timestamp()) and task["task_process"] == 0
    assert task["subject"] == "Spring launch" and task["unsubscribe"] == 1  # the task's own values kept
    assert task["remark"].endswith(send_marker("crm-move"))
    assert create_marker(stored_key(database_url, schema, created.id)) in task["remark"]  # the create's marker stays
    assert rows(database_url, schema)[moved.id]["status"] == "succeeded"
    stored = mirror(database_url, schema, CAMPAIGNS, connection.id)[str(campaign_id)]
    assert stored["scheduled_at"] == moved_to and stored["status"] == "pending"
    again = sync(database_url, schema, connection)
    assert again.counts.inserted == again.counts.updated == 0
    # Send it now: sending starts; the remark keeps one send marker, the latest.
    now = submit(database_url, schema, connection.id, "send_campaign", {"campaign_id": campaign_id}, key="crm-now")
    through_dagster("billionmail")
    (task,) = tasks(control, account)
    assert task["task_process"] in (1, 2) and task["start_time"] <= int(time.time())
    assert task["remark"].count("[nextcrm-send:") == 1 and task["remark"].endswith(send_marker("crm-now"))
    assert rows(database_url, schema)[now.id]["status"] == "succeeded"
    assert mirror(database_url, schema, CAMPAIGNS, connection.id)[str(campaign_id)]["status"] in ("processing", "done")
    # A campaign that started is not moved: refused before any update reaches BillionMail.
    updates = route_count(control, "POST /api/batch_mail/task/update")
    refused = submit(database_url, schema, connection.id, "send_campaign",
                     {"campaign_id": campaign_id, "send_at": later().isoformat()})  # fmt: skip
    assert apply(database_url, schema).failed == 1
    row = rows(database_url, schema)[refused.id]
    assert (
        row["status"] == "failed"
        and f"campaign {campaign_id} is" in row["error"]
        and "nothing was sent" in row["error"]
    )
    assert route_count(control, "POST /api/batch_mail/task/update") == updates


def test_counting_a_groups_recipients_through_dagster_records_the_count_and_creates_nothing(
    database_url, schema, billionmail
):
    control, account, connection, _ = billionmail(campaigns=2)
    groups = control.account(account)["group_ids"]
    before = tasks(control, account)
    one = submit(database_url, schema, connection.id, "count_group_recipients", {"group_ids": [groups[0]]})
    two = submit(database_url, schema, connection.id, "count_group_recipients", {"group_ids": groups[:2]})
    assert through_dagster("billionmail") == []  # a read: no table changes
    stored = rows(database_url, schema)
    expected_one = len(subscribed(control, account, [groups[0]]))
    expected_two = len(subscribed(control, account, groups[:2]))
    assert stored[one.id]["status"] == "succeeded" and stored[one.id]["result_id"] == str(expected_one) != "0"
    assert stored[one.id]["result"] == {"group_ids": [groups[0]], "total": expected_one}
    assert stored[two.id]["result"]["total"] == expected_two >= expected_one
    assert tasks(control, account) == before


BAD = [
    (
        "create_campaign",
        {"addresser": "news@example.com", "template_id": 1, "group_ids": [1]},
        "subject: Field required",
    ),
    ("create_campaign", {**campaign_payload(1), "addresser": "not an address"}, "addresser: String should match"),
    ("create_campaign", {**campaign_payload(1), "template_id": -1}, "template_id: Input should be greater than"),
    ("create_campaign", {**campaign_payload(1), "group_ids": []}, "group_ids: List should have at least 1 item"),
    ("create_campaign", {**campaign_payload(1), "group_ids": [0]}, "group_ids.0: Input should be greater than"),
    ("create_campaign", {**campaign_payload(1), "send_at": "2030-01-01T09:00:00"}, "send_at: Input should have"),
    ("create_campaign", {**campaign_payload(1), "send_at": "2040-01-01T09:00:00Z"}, "32-bit unix seconds"),
    ("create_campaign", {**campaign_payload(1), "threads": 500}, "threads: Input should be less than or equal to 100"),
    ("create_campaign", {**campaign_payload(1), "budget": "12.50"}, "budget: Extra inputs are not permitted"),
    ("send_campaign", {}, "campaign_id: Field required"),
    ("send_campaign", {"campaign_id": "seven"}, "campaign_id: Input should be a valid integer"),
    ("count_group_recipients", {"group_ids": "1"}, "group_ids: Input should be a valid list"),
    ("delete_everything", {}, "billionmail has no action 'delete_everything'"),
]


def test_bad_payloads_fail_naming_the_field_and_nothing_reaches_billionmail(database_url, schema, billionmail):
    control, account, connection, _ = billionmail(campaigns=0)
    ids = [submit(database_url, schema, connection.id, action, payload).id for action, payload, _ in BAD]
    before = requests_served(control, account)
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
        assert stored[action_id]["sent_at"] is None
    assert requests_served(control, account) == before  # nothing reached BillionMail, not even a login


def test_billionmails_refusals_fail_with_its_message_and_create_nothing(database_url, schema, billionmail):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    no_template = submit(database_url, schema, connection.id, "create_campaign",
                         campaign_payload(group_id, template_id=99))  # fmt: skip
    no_group = submit(database_url, schema, connection.id, "create_campaign", campaign_payload(9999))
    no_task = submit(database_url, schema, connection.id, "send_campaign", {"campaign_id": 424242})
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == 3 and done.retrying == 0
    assert "BillionMail answered code 400: Template not found" in stored[no_template.id]["error"]
    assert "no contact group 9999" in stored[no_group.id]["error"]
    assert "BillionMail answered code 404: Task not found: 424242" in stored[no_task.id]["error"]
    assert tasks(control, account) == []


@pytest.mark.parametrize("with_find", [True, False], ids=["found", "without-find"])
def test_a_worker_killed_after_billionmail_created_the_campaign_leaves_one_and_the_next_run_adopts_it(
    database_url, schema, billionmail, monkeypatch, with_find
):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    done = submit(database_url, schema, connection.id, "create_campaign",
                  campaign_payload(group_id, send_at=later().isoformat()), key="crm-crash")  # fmt: skip
    crash(database_url, schema, "billionmail")
    (first,) = tasks(control, account)
    assert rows(database_url, schema)[done.id]["status"] == "sending"
    if not with_find:
        spec = BILLIONMAIL.actions["create_campaign"]
        monkeypatch.setitem(BILLIONMAIL.actions, "create_campaign", dataclasses.replace(spec, find=None))
    time.sleep(1.2)  # the dead worker's lease lapses
    after = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert after.succeeded == 1 and row["status"] == "succeeded"
    made = tasks(control, account)
    if with_find:
        # The marker in the remark found the first attempt's campaign: adopted, nothing created again.
        assert after.adopted == 1 and [t["id"] for t in made] == [first["id"]] and row["result_id"] == str(first["id"])
        assert str(first["id"]) in mirror(database_url, schema, CAMPAIGNS, connection.id)
    else:
        # BillionMail takes no idempotency key: a plain re-send makes a second campaign.
        assert after.adopted == 0 and len(made) == 2
        assert {t["remark"] for t in made} == {create_marker("crm-crash")}


def test_a_proxy_timeout_after_billionmail_acted_leaves_one_campaign(database_url, schema, billionmail):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    done = submit(database_url, schema, connection.id, "create_campaign", campaign_payload(group_id))
    control.set_faults(account, gateway_timeouts=1, route=CREATE)
    try:
        first = apply(database_url, schema)
    finally:
        control.clear_faults(account)
    row = rows(database_url, schema)[done.id]
    # The install created the task but its answer was lost: never repeated blindly, the outcome is unknown.
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 504" in row["error"]
    assert len(tasks(control, account)) == 1 and route_count(control, CREATE) >= 1
    creates = route_count(control, CREATE)
    second = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert second.succeeded == second.adopted == 1 and row["status"] == "succeeded" and row["attempts"] == 2
    assert [str(t["id"]) for t in tasks(control, account)] == [row["result_id"]]
    assert route_count(control, CREATE) == creates  # found, not sent again


def test_a_server_error_before_billionmail_acted_and_a_proxys_429_are_survived_with_one_campaign_each(
    database_url, schema, billionmail
):
    control, account, connection, _ = billionmail(campaigns=0)
    group_id = control.account(account)["group_ids"][0]
    failed = submit(database_url, schema, connection.id, "create_campaign", campaign_payload(group_id))
    control.set_faults(account, server_errors=1, route=CREATE)
    try:
        first = apply(database_url, schema)
    finally:
        control.clear_faults(account)
    assert first.retrying == 1 and rows(database_url, schema)[failed.id]["status"] == "unknown"
    assert tasks(control, account) == []
    second = apply(database_url, schema)  # looked up (nothing there), then sent
    assert second.succeeded == 1 and second.adopted == 0 and len(tasks(control, account)) == 1
    limited = submit(database_url, schema, connection.id, "create_campaign", campaign_payload(group_id))
    control.set_faults(account, proxy_rate_limited=2, route=CREATE)
    try:
        third = apply(database_url, schema)  # a 429 was turned away unread: sent again in the same run
    finally:
        control.clear_faults(account)
    row = rows(database_url, schema)[limited.id]
    assert third.succeeded == 1 and row["status"] == "succeeded" and row["attempts"] == 1
    assert len(tasks(control, account)) == 2


# --- the emulator --------------------------------------------------------------------------------------------


class Install:
    """An httpx client logged in to one sandbox install (every answer HTTP 200 with BillionMail's envelope)."""

    def __init__(self, sandbox, control, account: str, password: str) -> None:
        summary = control.account(account)
        self.http = httpx.Client(base_url=f"{sandbox.url}{summary['base_path']}", timeout=30)
        login = self.http.post("/api/login", json={"username": summary["username"], "password": password}).json()
        self.http.headers["Authorization"] = f"Bearer {login['data']['token']}"

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        response = self.http.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def test_the_emulator_makes_a_second_campaign_for_a_repeated_create_and_refuses_moving_a_running_one(
    sandbox, billionmail
):
    control, account, _, password = billionmail(campaigns=0, send_rate_per_thread=0.01)  # one mail in 20 s
    api = Install(sandbox, control, account, password)
    group_id = control.account(account)["group_ids"][0]
    body = {"addresser": "news@example.com", "subject": "Twice", "template_id": 1, "group_ids": [group_id],
            "start_time": sandbox.clock() + 3600, "remark": "[nextcrm:abc]"}  # fmt: skip
    first, second = api.post("/api/batch_mail/task/create", body), api.post("/api/batch_mail/task/create", body)
    assert first["success"] and second["success"] and first["msg"] == "Task created successfully"
    assert first["data"]["id"] != second["data"]["id"]  # no idempotency: two tasks
    listed = api.get("/api/batch_mail/task/list", page=1, page_size=10, status=-1)["data"]
    assert listed["total"] == 2 and {t["remark"] for t in listed["list"]} == {"[nextcrm:abc]"}
    # A pending task moves; a running one is refused (code 0, before anything is written).
    moved = api.post("/api/batch_mail/task/update", {"task_id": first["data"]["id"], "subject": "Twice",
                                                     "start_time": sandbox.clock() - 5})  # fmt: skip
    assert moved == {"success": True, "code": 0, "msg": "Task update successful", "data": None}
    running = api.post("/api/batch_mail/task/update", {"task_id": first["data"]["id"], "subject": "Again",
                                                       "start_time": sandbox.clock() + 99})  # fmt: skip
    assert running["success"] is False and running["code"] == 0 and "currently running" in running["msg"]
    task = api.get("/api/batch_mail/task/find", id=first["data"]["id"])["data"]
    assert task["subject"] == "Twice" and task["task_process"] in (1, 2)


def test_the_emulator_counts_distinct_subscribed_addresses_and_creates_empty_campaigns_as_billionmail_does(
    sandbox, billionmail
):
    control, account, _, password = billionmail(campaigns=0)
    api = Install(sandbox, control, account, password)
    groups = control.account(account)["group_ids"]
    assert api.post("/api/contact/group/contact_count", {}) == {
        "success": False, "code": 412, "msg": "The group_ids field is required", "data": None}  # fmt: skip
    counted = api.post("/api/contact/group/contact_count", {"group_ids": groups})
    assert counted["msg"] == "Successfully retrieved contact count"
    assert counted["data"]["total"] == len(subscribed(control, account, groups))
    empty = control.add_record(account, "group", {"name": "Nobody yet"})
    body = {"addresser": "n@example.com", "subject": "Empty", "template_id": 1, "group_ids": [empty["id"]],
            "start_time": sandbox.clock()}  # fmt: skip
    made = api.post("/api/batch_mail/task/create", body)
    assert (
        made["success"] and api.get("/api/batch_mail/task/find", id=made["data"]["id"])["data"]["recipient_count"] == 0
    )


def test_the_emulators_gateway_timeout_comes_after_the_install_acted_and_only_on_its_route(sandbox, billionmail):
    control, account, _, password = billionmail(campaigns=0)
    api = Install(sandbox, control, account, password)
    group_id = control.account(account)["group_ids"][0]
    control.set_faults(account, gateway_timeouts=1, route=CREATE)
    try:
        listed = api.get("/api/batch_mail/task/list", page=1, page_size=5)  # another route: untouched
        assert listed["success"] and listed["data"]["total"] == 0
        lost = api.http.post("/api/batch_mail/task/create", json={
            "addresser": "n@example.com", "subject": "Lost answer", "template_id": 1, "group_ids": [group_id],
            "start_time": sandbox.clock() + 60})  # fmt: skip
        assert lost.status_code == 504 and b"504 Gateway Time-out" in lost.content
    finally:
        control.clear_faults(account)
    assert [t["subject"] for t in tasks(control, account)] == ["Lost answer"]
