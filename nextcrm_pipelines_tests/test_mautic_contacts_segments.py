"""Mautic contacts and segments against the sandbox, over real HTTP and a real Postgres, beyond the per-entity
contract (`test_entity_contract.py`): segment membership on the contact and live member counts on the segment,
paging by id stopping when the provider repeats a page, no contact named in logs, Mautic's error envelope,
segments synced whole in a job of their own, and joins and leaves (which do not date the contact) brought into the
contacts' segment ids by the daily sweep.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import httpx
import pytest

from nextcrm_pipelines.automation import daily_sweeps
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.core.runner import day_window, snapshot_window, sweep_connection, sync_partitions
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

ENTITIES = {"mautic_contacts": "contacts", "mautic_segments": "segments"}


def run(database_url: str, schema: str, connection, entity: str, days) -> list:
    """Sync the days of a daily entity, or the whole list of one read whole (segments), whatever the days."""
    daily = get_provider("mautic").entity(entity).daily
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                           entity_name=entity, connection_id=connection.id,
                           windows=[day_window(d) for d in days] if daily else [snapshot_window()])  # fmt: skip


def memberships(control, account: str) -> dict[str, list[str]]:
    """Contact id -> the segments it is in now (not manually removed), from the sandbox's own state."""
    found: dict[str, set[str]] = {}
    for row in control.export(account, "segment_contacts")["records"]:
        if row["manually_removed"] == "0":
            found.setdefault(row["lead_id"], set()).add(row["leadlist_id"])
    return {lead: sorted(ids, key=int) for lead, ids in found.items()}


def member_counts(control, account: str) -> dict[str, int]:
    counts = Counter(seg for ids in memberships(control, account).values() for seg in ids)
    return {str(s["id"]): counts.get(str(s["id"]), 0) for s in control.export(account, "segments")["records"]}


def assert_mirror_equals_sandbox(control, account: str, database_url: str, schema: str, connection, entity: str):
    """Every current record mirrored once, as the provider serves it; every other row flagged deleted."""
    truth = control.export(account, ENTITIES[entity])
    records = {str(r["id"]): r for r in truth["records"]}
    rows = mirror(database_url, schema, entity, connection.id)
    assert set(records) <= set(rows), sorted(set(records) - set(rows))[:3]
    gone = {rid for rid in set(rows) - set(records) if not rows[rid]["deleted"]}
    assert not gone and set(rows) - set(records) <= {str(i) for i in truth["deleted_ids"]}
    for rid, raw in records.items():
        differs = [key for key, value in raw.items() if rows[rid]["raw"].get(key) != value]
        assert not differs, f"{entity} {rid} differs in {differs}"
    if entity == "mautic_contacts":
        joined = memberships(control, account)
        assert {rid: rows[rid]["segment_ids"] for rid in records} == {rid: joined.get(rid, []) for rid in records}
        for rid, raw in records.items():
            fields = raw["fields"]["all"]
            assert (rows[rid]["email"], rows[rid]["first_name"], rows[rid]["city"], rows[rid]["points"]) == (
                fields.get("email"), fields.get("firstname"), fields.get("city"), raw["points"])  # fmt: skip
    else:
        counts = member_counts(control, account)
        assert {rid: rows[rid]["member_count"] for rid in records} == counts
        assert {rid: rows[rid]["name"] for rid in records} == {rid: r["name"] for rid, r in records.items()}
    return rows


def test_a_membership_change_shows_when_the_contact_and_segment_are_read_again(database_url, schema, sandbox,
                                                                               mautic):  # fmt: skip
    control, account, connection = mautic("client_credentials", contacts=30, segments=6, days=2)
    days = days_back(sandbox_now(sandbox).date(), 2)
    for entity in ENTITIES:
        run(database_url, schema, connection, entity, days)
    segment = str(control.export(account, "segments")["records"][0]["id"])
    joined = memberships(control, account)
    outsider = next(str(c["id"]) for c in control.export(account, "contacts")["records"]
                    if segment not in joined.get(str(c["id"]), []))  # fmt: skip
    control.add_to_segment(account, int(segment), int(outsider))
    control.update_record(account, "contacts", int(outsider), {"position": "Buyer"})  # read again: today
    today = [sandbox_now(sandbox).date()]
    for entity in ENTITIES:
        run(database_url, schema, connection, entity, today)
    contact = mirror(database_url, schema, "mautic_contacts", connection.id)[outsider]
    assert segment in contact["segment_ids"] and contact["position"] == "Buyer"
    control.update_record(account, "segments", int(segment), {"description": "Edited"})
    run(database_url, schema, connection, "mautic_segments", today)
    counted = mirror(database_url, schema, "mautic_segments", connection.id)[segment]
    assert counted["member_count"] == member_counts(control, account)[segment]


def test_the_daily_sweep_brings_joins_and_leaves_into_the_contacts_segment_ids(database_url, schema, sandbox,
                                                                               mautic):  # fmt: skip
    control, account, connection = mautic("client_credentials", settings={"id_page_size": 3}, contacts=40,
                                          segments=4, days=6)  # fmt: skip
    today = sandbox_now(sandbox).date()
    run(database_url, schema, connection, "mautic_contacts", days_back(today, 6))
    # Contacts of earlier days: today's sync does not read them again.
    contacts = [str(c["id"]) for c in control.export(account, "contacts")["records"]
                if (c["dateModified"] or c["dateAdded"])[:10] < (today - timedelta(days=1)).isoformat()]  # fmt: skip
    joined = memberships(control, account)
    segment = str(control.export(account, "segments")["records"][0]["id"])
    outsiders = [c for c in contacts if segment not in joined.get(c, [])][:3]
    members = [c for c in contacts if segment in joined.get(c, [])][:2]
    assert len(outsiders) == 3 and len(members) == 2
    for contact in outsiders:
        control.add_to_segment(account, int(segment), int(contact))
    for contact in members:
        control.remove_from_segment(account, int(segment), int(contact))
    # Their dateModified did not move: today's sync leaves them as they were.
    run(database_url, schema, connection, "mautic_contacts", [today])
    stale = mirror(database_url, schema, "mautic_contacts", connection.id)
    assert all(segment not in stale[c]["segment_ids"] for c in outsiders)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("mautic_deletion_sweep").execute_in_process(instance=instance)
        assert result.success
        changed = {e.partition for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
                   and e.asset_key.path[-1] == "mautic_contacts"}  # fmt: skip
    rows = assert_mirror_equals_sandbox(control, account, database_url, schema, connection, "mautic_contacts")
    assert all(segment in rows[c]["segment_ids"] for c in outsiders)
    assert all(segment not in rows[c]["segment_ids"] for c in members)
    assert changed and all(p.startswith(connection.id) for p in changed)  # their partitions are materialised
    again = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                             entity_name="mautic_contacts", connection_id=connection.id)  # fmt: skip
    assert again.counts.updated == 0  # read again only what differed


@pytest.mark.parametrize("path", ["contacts", "segments", "campaigns"])
def test_paging_by_id_stops_when_the_provider_repeats_a_page(database_url, schema, sandbox, mautic, path):
    entity = f"mautic_{path}"
    control, account, connection = mautic("client_credentials", settings={"page_size": 3}, contacts=40,
                                          segments=20, campaigns=20, days=1)  # fmt: skip
    control.set_faults(account=account, repeat_pages=50)
    try:
        results = run(database_url, schema, connection, entity, [sandbox_now(sandbox).date() - timedelta(days=1),
                                                                  sandbox_now(sandbox).date()])  # fmt: skip
    finally:
        control.clear_faults(account=account)
    failed = [r for r in results if r.status == "failed"]
    assert failed, "a repeated page must fail the window, not loop"
    for result in failed:
        assert isinstance(result.exception, ProviderError) and "same page again" in str(result.exception)
        assert result.stats.requests < 20  # stopped at the first repeat (plus member counts), not after 50


def test_contacts_are_never_named_in_logs_or_errors(database_url, schema, sandbox, mautic, caplog):
    control, account, connection = mautic("client_credentials", contacts=20, days=1)
    control.set_faults(account=account, repeat_pages=5)
    try:
        results = run(database_url, schema, connection, "mautic_contacts", days_back(sandbox_now(sandbox).date(), 1))
    finally:
        control.clear_faults(account=account)
    said = caplog.text + " ".join(str(r.error) for r in results)
    people: list[Any] = [c["fields"]["all"].get(k) for c in control.export(account, "contacts")["records"]
                         for k in ("email", "lastname")]  # fmt: skip
    assert not [p for p in people if p and p in said]


UNEMULATED = [("POST", "/api/segments/new"), ("PUT", "/api/contacts/batch/edit"), ("DELETE", "/api/segments/1/delete"),
              ("POST", "/api/segments")]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), UNEMULATED)
def test_unemulated_routes_answer_with_mautics_error_envelope(sandbox, mautic, method, path):
    control, account, connection = mautic("client_credentials", contacts=5, segments=2, days=1)
    client_id = next(iter(control.account(account)["clients"]))["client_id"]
    token = control.grant(account, client_id)["token"]["access_token"]
    response = httpx.request(method, f"{connection.base_url}{path}", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    assert response.json() == {"errors": [{"message": f"Requested URL not found: {path}", "code": 404, "type": None}]}


def test_segments_sync_whole_in_their_own_job_and_schedule_beside_the_daily_entities(database_url, schema, sandbox,
                                                                                     mautic):  # fmt: skip
    import dagster as dg

    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name

    control, account, connection = mautic("client_credentials", contacts=20, segments=8, days=2)
    # A Dagster job's assets share one partitioning: the daily entities and the whole-list one get a job each.
    daily, lists = defs.resolve_job_def("mautic_sync"), defs.resolve_job_def("mautic_lists_sync")
    synced = {job.name: {key.to_user_string() for key in job.asset_layer.executable_asset_keys}
              for job in (daily, lists)}  # fmt: skip
    assert synced == {"mautic_sync": {"mautic_campaigns", "mautic_contacts"}, "mautic_lists_sync": {"mautic_segments"}}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("mautic"), [connection.id])
        schedule = defs.resolve_schedule_def("mautic_lists_hourly")
        with dg.build_schedule_context(instance=instance, resources={"mirror": defs.resources["mirror"]},
                                       scheduled_execution_time=datetime.now(UTC).replace(minute=7),
                                       repository_def=defs.get_repository_def()) as context:  # fmt: skip
            (request,) = schedule.evaluate_tick(context).run_requests
        assert schedule.job_name == "mautic_lists_sync"
        # The whole list of each connection: the range is of connection keys, no month.
        assert (request.tags["dagster/asset_partition_range_start"],
                request.tags["dagster/asset_partition_range_end"]) == (connection.id, connection.id)  # fmt: skip
        result = lists.execute_in_process(instance=instance, partition_key=connection.id,
                                          tags={"nextcrm/scope": "recent"})  # fmt: skip
        assert result.success
        (materialization,) = result.asset_materializations_for_node("mautic_segments")
        assert materialization.partition == connection.id
    rows = mirror(database_url, schema, "mautic_segments", connection.id)
    assert materialization.metadata["dagster/row_count"].value == len(rows) == 8
    assert_mirror_equals_sandbox(control, account, database_url, schema, connection, "mautic_segments")
    # The daily sweep job leaves segments to their own runs (each re-lists them whole).
    assert "mautic_segments" not in daily_sweeps(get_provider("mautic"))
    assert "mautic_contacts" in daily_sweeps(get_provider("mautic"))
