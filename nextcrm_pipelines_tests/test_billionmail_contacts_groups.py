"""BillionMail contacts and contact groups against the sandbox, over real HTTP and a real Postgres, beyond the
per-entity contract (`test_entity_contract.py`): each list read in as many requests as it has pages (both
subscription statuses of the contact list) with rows as BillionMail serves them, an install that pages contacts in
tens, deletions flagged by the sweep of the same Dagster run, changes (unsubscribes, renames, contacts whose rows
BillionMail creates again) reaching the tables, group counts that agree with the contact rows, contacts added while
the list is read neither read twice nor skipped, and addresses that never reach logs, errors or Dagster metadata.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import Any

import dagster as dg
import psycopg
import pytest

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.runner import snapshot_window, sync_partitions
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.billionmail.client import BillionMailApi
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_sandbox.billionmail import BillionMailControl

ENTITIES = {"billionmail_contacts": "contacts", "billionmail_groups": "groups"}


@pytest.fixture
def install(database_url, schema, box, sandbox):
    """Factory: a sandbox BillionMail install and its connection (with `settings`); returns (control, account id,
    connection, secrets)."""

    def make(settings: dict[str, Any] | None = None, **spec: Any):
        control = BillionMailControl(sandbox)
        password = f"pw-{uuid.uuid4().hex[:8]}"
        account = control.add_account(**{"seed": 9, "campaigns": 3, "contacts": 120, "groups": 5, "days": 20,
                                         "password": password, **spec})  # fmt: skip
        secrets = {"username": account["username"], "password": password}
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(conn, provider="billionmail", display_name=f"BM {account['id']}",
                                              box=box, secrets=secrets, base_url=f"{sandbox.url}{account['base_path']}",
                                              settings=settings or {})  # fmt: skip
        return control, account["id"], connection, secrets

    return make


def run(database_url: str, schema: str, connection, entity: str) -> Any:
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("billionmail"),
                                entity_name=entity, connection_id=connection.id,
                                windows=[snapshot_window()])  # fmt: skip
    return result


def materialise(connection_id: str, said: list[str] | None = None) -> dg.ExecuteInProcessResult:
    """The connection's partition of the `billionmail_sync` job: each whole list read, then swept (what the run
    logged, and the metadata of its events, are added to `said`)."""
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("billionmail"), [connection_id])
        result = defs.resolve_job_def("billionmail_sync").execute_in_process(
            instance=instance, partition_key=connection_id, raise_on_error=False
        )
        if said is not None:
            said.extend(f"{entry.user_message} {entry.dagster_event}" for entry in instance.all_logs(result.run_id))
    return result


def client(connection, secrets: dict[str, str]) -> BillionMailApi:
    return BillionMailApi(ClientContext(connection, Secrets(secrets), RequestStats()))


def assert_mirror_equals_sandbox(control, account: str, database_url: str, schema: str, connection, entity: str):
    """Every entry BillionMail lists now is mirrored once as it serves it; every other row is flagged deleted."""
    records = {str(r["id"]): r for r in control.export(account, ENTITIES[entity])["records"]}
    rows = mirror(database_url, schema, entity, connection.id)
    assert {rid for rid, row in rows.items() if not row["deleted"]} == set(records)
    for rid, raw in records.items():
        differs = [key for key, value in raw.items() if rows[rid]["raw"].get(key) != value]
        assert not differs, f"{entity} {rid} differs in {differs}"
    if entity == "billionmail_contacts":
        for rid, raw in records.items():
            row = rows[rid]
            assert (row["email"], row["status"], row["confirmed"], row["group_id"], row["attributes"]) == (
                raw["email"], {1: "subscribed", 0: "unsubscribed"}[raw["active"]], raw["status"] == 1,
                str(raw["group_id"]), raw["attribs"])  # fmt: skip
            assert row["group_ids"] == [str(g["id"]) for g in raw["groups"]]
            assert int(row["created_at"].timestamp()) == raw["create_time"]
        assert all(row["status"] == "deleted" for row in rows.values() if row["deleted"])
    else:
        for rid, raw in records.items():
            row = rows[rid]
            assert (row["name"], row["contact_count"], row["subscribed_count"], row["unsubscribed_count"]) == (
                raw["name"], raw["total_count"], raw["active_count"], raw["unsubscribe_count"])  # fmt: skip
    return rows


def assert_group_counts_agree_with_the_contacts(database_url: str, schema: str, connection) -> None:
    """A group's subscribed (unsubscribed) count is the number of live subscribed (unsubscribed) entries in it."""
    contacts = mirror(database_url, schema, "billionmail_contacts", connection.id)
    members = Counter(
        (gid, row["status"]) for row in contacts.values() if not row["deleted"] for gid in row["group_ids"]
    )
    for gid, group in mirror(database_url, schema, "billionmail_groups", connection.id).items():
        if not group["deleted"]:
            assert (group["subscribed_count"], group["unsubscribed_count"]) == (
                members[(gid, "subscribed")], members[(gid, "unsubscribed")]), gid  # fmt: skip


@pytest.mark.parametrize("entity", ENTITIES)
def test_each_list_is_read_in_one_request_a_page_after_the_login(database_url, schema, install, entity):
    control, account, connection, _ = install(settings={"page_size": 4}, contacts=70, groups=14)
    result = run(database_url, schema, connection, entity)
    assert result.status == "success", result.error
    rows = assert_mirror_equals_sandbox(control, account, database_url, schema, connection, entity)
    assert result.total == len(rows) and result.counts.inserted == len(rows)
    # 4 a page: every page of each list, plus the login (contacts: the subscribed list, then the unsubscribed one).
    statuses = Counter(row.get("status") for row in rows.values())
    pages = sum(-(-n // 4) for n in statuses.values())
    assert result.stats.requests == 1 + pages and pages >= 4
    if entity == "billionmail_contacts":
        assert statuses["subscribed"] > 4 and statuses["unsubscribed"] > 0
        assert any(len(row["group_ids"]) == 2 for row in rows.values())


def test_an_install_that_pages_contacts_in_tens_is_still_read_whole(database_url, schema, install):
    # BillionMail answers a contact page_size above its maximum with 10 a page; the client asks for 100.
    control, account, connection, _ = install(contacts=64, contact_max_page_size=50)
    result = run(database_url, schema, connection, "billionmail_contacts")
    assert result.status == "success", result.error
    rows = assert_mirror_equals_sandbox(control, account, database_url, schema, connection, "billionmail_contacts")
    assert result.total == len(rows) > 10 and result.stats.requests > 6


def test_the_run_flags_deletions_and_changes_reach_the_tables(database_url, schema, install):
    control, account, connection, secrets = install(contacts=90, groups=4)
    assert materialise(connection.id).success
    for entity in ENTITIES:
        assert_mirror_equals_sandbox(control, account, database_url, schema, connection, entity)
    assert_group_counts_agree_with_the_contacts(database_url, schema, connection)
    before = mirror(database_url, schema, "billionmail_contacts", connection.id)
    groups_before = mirror(database_url, schema, "billionmail_groups", connection.id)
    subscribed = sorted((row for row in before.values() if row["status"] == "subscribed"), key=lambda r: int(r["id"]))

    control.changes(account, contact_deletes=3, contact_unsubscribes=8)
    edited, joined = subscribed[0], subscribed[1]
    doomed, renamed = "4", "3"
    with client(connection, secrets) as api:
        api.call("POST", "/api/contact/edit", json={"emails": edited["email"], "active": 1, "group_ids": [1, 2],
                                                    "attribs": '{"first_name": "Edited", "plan": 3}'})  # fmt: skip
        api.call("POST", "/api/contact/group/update", json={"group_id": int(renamed), "name": "Renamed"})
        api.call("POST", "/api/contact/group/delete", json={"group_ids": [int(doomed)]})
    other = next(g for g in ("1", "2", "3") if g not in joined["group_ids"])
    control.add_record(account, "contact", {"email": joined["email"], "group_id": int(other)})  # a newer row
    assert materialise(connection.id).success

    groups = assert_mirror_equals_sandbox(control, account, database_url, schema, connection, "billionmail_groups")
    rows = assert_mirror_equals_sandbox(control, account, database_url, schema, connection, "billionmail_contacts")
    assert_group_counts_agree_with_the_contacts(database_url, schema, connection)
    assert groups[doomed]["deleted"] and groups[doomed]["name"] == groups_before[doomed]["name"]  # its last data
    assert groups[renamed]["name"] == "Renamed" and groups[renamed]["updated_at"] > groups_before[renamed]["updated_at"]
    assert not [row for row in rows.values() if not row["deleted"] and doomed in row["group_ids"]]
    now = control.export(account, "contacts")["records"]
    listed = {r["email"]: {r2["active"] for r2 in now if r2["email"] == r["email"]} for r in now}
    # Addresses deleted (or only in the deleted group) are flagged, their rows kept with their last data.
    vanished = [row for row in before.values() if row["email"] not in listed]
    assert len(vanished) >= 3 and all(rows[row["id"]]["deleted"] and rows[row["id"]]["email"] for row in vanished)
    # Unsubscribed addresses: the row BillionMail lists them under shows the new status.
    flipped = [row for row in before.values() if row["status"] == "subscribed" and listed.get(row["email"]) == {0}
               and row["email"] != edited["email"]]  # fmt: skip
    assert len(flipped) >= 3
    assert [rows[row["id"]]["status"] for row in flipped].count("unsubscribed") >= 3
    # An edit of its groups creates the address's rows again: the old entry is flagged, the new one has the edit.
    assert rows[edited["id"]]["deleted"] and rows[edited["id"]]["status"] == "deleted"
    (now_edited,) = [row for row in rows.values() if row["email"] == edited["email"] and not row["deleted"]]
    assert now_edited["group_ids"] == ["1", "2"] and now_edited["attributes"] == {"first_name": "Edited", "plan": "3"}
    # An address added to another group is listed under that newer row, with both groups.
    (now_joined,) = [row for row in rows.values() if row["email"] == joined["email"] and row["status"] == "subscribed"
                     and not row["deleted"]]  # fmt: skip
    assert now_joined["id"] != joined["id"] and rows[joined["id"]]["deleted"]
    assert other in now_joined["group_ids"] and set(joined["group_ids"]) - {doomed} <= set(now_joined["group_ids"])


def test_contacts_added_while_the_list_is_read_are_neither_read_twice_nor_skipped(database_url, schema, install):
    control, account, connection, secrets = install(settings={"page_size": 10}, contacts=60)
    listed = {str(r["id"]) for r in control.export(account, "contacts")["records"]}
    read: list[str] = []
    with client(connection, secrets) as api:
        for number, page in enumerate(api.contacts(snapshot_window())):
            read.extend(str(raw["id"]) for raw, _ in page)
            if number < 3:  # newest first: each new contact pushes the rows already read one place down
                for _ in range(4):
                    control.add_record(account, "contact", {"group_id": 1})
    assert len(read) == len(set(read)), "a row pushed onto the next page was read twice"
    assert listed <= set(read)


def test_addresses_never_reach_logs_errors_or_dagster_metadata(database_url, schema, install, caplog):
    control, account, connection, _ = install(contacts=40)
    caplog.set_level(logging.DEBUG, logger="nextcrm_pipelines")
    said: list[str] = []
    first = materialise(connection.id, said)
    emails = {r["email"] for r in control.export(account, "contacts")["records"]}
    control.changes(account, contact_deletes=2, contact_unsubscribes=2)  # the sweep then looks entries up
    control.set_faults(account=account, envelope_errors=1, envelope_error_msg="pq: canceling statement")
    try:
        failed = run(database_url, schema, connection, "billionmail_contacts")
    finally:
        control.clear_faults(account=account)
    second = materialise(connection.id, said)
    assert first.success and second.success and failed.status == "failed"
    assert "pq: canceling statement" in str(failed.error)
    rows = mirror(database_url, schema, "billionmail_contacts", connection.id)
    assert len(emails) > 30 and sum(row["deleted"] for row in rows.values()) >= 2  # the lookups ran
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(f'SELECT coalesce(string_agg(error, \' \'), \'\') FROM "{schema}".integration_sync_logs'
                              ).fetchone()[0]  # fmt: skip
    text = " ".join([caplog.text, str(failed.error), logged, *said])
    assert "flagged deleted upstream" in text and "dagster/row_count" in text
    assert not [email for email in emails if email in text]
