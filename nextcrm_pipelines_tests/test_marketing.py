"""BillionMail and Mautic through the real clients against their sandboxes, over HTTP and Postgres.

BillionMail: the whole campaign list per run (connection partitions), errors inside HTTP 200 fail
with the provider's message, an expired login token is renewed, deleted campaigns are flagged.
Mautic: the OAuth connect flow and client credentials, campaigns paged while new ones are being
added (none skipped, none read twice), both list envelopes, deletions flagged by the sweep, and
contact counts that are the live member counts (one request per campaign read) while Mautic's own
listed counts are still cached.
"""

from __future__ import annotations

from collections import Counter
from datetime import date

import dagster as dg
import httpx
import psycopg
import pytest

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.http import AuthenticationFailed, RequestStats
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.runner import day_window, snapshot_window, sweep_connection, sync_partitions
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.billionmail.client import BillionMailApi, EnvelopeError
from nextcrm_pipelines.providers.mautic.client import entities
from nextcrm_pipelines.providers.mautic.records import changed_at, parse_time
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

# --- BillionMail ------------------------------------------------------------------------------------


def materialise(provider: str, key: str) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name(provider), [key.split("|")[0]])
        return defs.resolve_job_def(f"{provider}_sync").execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False
        )


def test_billionmail_campaigns_mirror_the_whole_list_and_flag_deleted_ones(database_url, schema, billionmail):
    control, account_id, connection, _ = billionmail()
    assert materialise("billionmail", connection.id).success
    truth = {str(c["id"]): c for c in control.export(account_id, "campaigns")["records"]}
    rows = mirror(database_url, schema, "billionmail_campaigns", connection.id)
    assert set(rows) == set(truth)
    for cid, raw in truth.items():
        assert rows[cid]["name"] == raw["task_name"] and rows[cid]["recipients"] == raw["recipient_count"]
    assert any(r["opened"] for r in rows.values()) and any(r["status"] == "done" for r in rows.values())

    changed = control.changes(account_id, deletes=2, progress=3, creates=2)
    assert materialise("billionmail", connection.id).success
    rows = mirror(database_url, schema, "billionmail_campaigns", connection.id)
    for cid in map(str, changed["deleted"]):
        assert rows[cid]["deleted"] and rows[cid]["status"] == "deleted" and rows[cid]["name"]
    assert {str(c) for c in changed["created"]} <= set(rows)
    live = {str(c["id"]) for c in control.export(account_id, "campaigns")["records"]}
    assert {cid for cid, r in rows.items() if not r["deleted"]} == live


def test_billionmail_error_inside_http_200_fails_the_sync_with_its_message(database_url, schema, billionmail):
    control, account_id, connection, _ = billionmail(campaigns=5)
    control.set_faults(account=account_id, envelope_errors=5, envelope_error_code=500,
                       envelope_error_msg="Database connection lost")  # fmt: skip
    try:
        (result,) = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("billionmail"),
                                    entity_name="billionmail_campaigns", connection_id=connection.id,
                                    windows=[snapshot_window()])  # fmt: skip
    finally:
        control.clear_faults(account=account_id)
    assert result.status == "failed"
    assert "BillionMail answered code 500: Database connection lost" in result.error
    with psycopg.connect(database_url) as conn:
        stored = vault.get_connection(conn, connection.id)
    assert stored.sync_status == "failed" and "Database connection lost" in stored.last_error


def test_billionmail_error_inside_http_200_fails_the_dagster_run_with_its_message(database_url, schema, billionmail):
    from nextcrm_pipelines.assets import build_entity_asset
    from nextcrm_pipelines.providers.billionmail import CAMPAIGNS, PROVIDER
    from nextcrm_pipelines.resources import MirrorDatabase, ProviderClients

    control, account_id, connection, _ = billionmail(campaigns=5)
    asset = build_entity_asset(PROVIDER, CAMPAIGNS, retry_policy=None)  # the same asset, without retry waits
    control.set_faults(account=account_id, envelope_errors=5, envelope_error_code=500,
                       envelope_error_msg="Database connection lost")  # fmt: skip
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions(connections_partitions_name("billionmail"), [connection.id])
            result = dg.materialize([asset], instance=instance, partition_key=connection.id,
                                    resources={"mirror": MirrorDatabase(), "clients": ProviderClients()},
                                    raise_on_error=False)  # fmt: skip
    finally:
        control.clear_faults(account=account_id)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "BillionMail answered code 500: Database connection lost" in str(failure.event_specific_data.error)


def test_billionmail_expired_login_token_is_renewed_and_bad_credentials_are_clear(database_url, schema, billionmail):
    control, account_id, connection, password = billionmail(campaigns=5)
    secrets = Secrets({"username": "admin", "password": password})
    with BillionMailApi(ClientContext(connection, secrets, RequestStats())) as api:
        first = [c for page in api.campaign_ids() for c in page]
        control.expire_tokens(account_id)
        again = [c for page in api.campaign_ids() for c in page]
        assert first == again and api.logins == 1  # renewed with the refresh token, no new login
        control.expire_tokens(account_id, refresh=True)
        assert [c for page in api.campaign_ids() for c in page] == first and api.logins == 2
        with pytest.raises(EnvelopeError, match="code 404"):
            api.call("GET", "/api/batch_mail/task/find", params={"id": 999_999})
    wrong = Secrets({"username": "admin", "password": "not-it"})
    with (
        BillionMailApi(ClientContext(connection, wrong, RequestStats())) as api,
        pytest.raises(AuthenticationFailed, match="BillionMail answered code"),
    ):
        list(api.campaign_ids())


# --- Mautic -----------------------------------------------------------------------------------------


def sync_days(database_url, schema, connection, days):
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                           entity_name="mautic_campaigns", connection_id=connection.id,
                           windows=[day_window(d) for d in days])  # fmt: skip


@pytest.mark.parametrize("grant", ["authorization_code", "client_credentials"])
def test_mautic_campaigns_by_changed_day_equal_the_sandbox(database_url, schema, sandbox, mautic, grant):
    control, account_id, connection = mautic(grant)
    control.changes(account_id, edits=6, unpublishes=2)
    days = days_back(sandbox_now(sandbox).date(), 7)
    results = sync_days(database_url, schema, connection, days)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    truth = {str(c["id"]): c for c in control.export(account_id, "campaigns")["records"]}
    rows = mirror(database_url, schema, "mautic_campaigns", connection.id)
    assert set(rows) == set(truth)
    for cid, raw in truth.items():
        assert rows[cid]["name"] == raw["name"] and rows[cid]["published"] == bool(raw["isPublished"])
    # Read exactly once: the records read add up to the rows, day by day.
    assert sum(r.total for r in results) == len(rows)
    again = sync_days(database_url, schema, connection, days)
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0


def test_mautic_campaigns_added_while_paging_are_neither_skipped_nor_duplicated(
    database_url, schema, midday_sandbox, mautic
):
    # At midday half of the last day's campaigns were changed today, and those added meanwhile land today too.
    control, account_id, connection = mautic(campaigns=60, days=1, server=midday_sandbox)
    window = day_window(sandbox_now(midday_sandbox).date())
    before = {
        str(c["id"])
        for c in control.export(account_id, "campaigns")["records"]
        if window.start <= changed_at(c) < window.end
    }
    assert len(before) > 14  # more than two pages of 7
    control.set_faults(account=account_id, insert_during_paging=2)
    try:
        (result,) = sync_days(database_url, schema, connection, [window.start.date()])
    finally:
        control.clear_faults(account=account_id)
    assert result.status == "success"
    rows = mirror(database_url, schema, "mautic_campaigns", connection.id)
    assert before <= set(rows)  # nothing that existed was skipped
    assert result.total == len(rows)  # nothing was read twice
    assert len(rows) > len(before)  # campaigns created during the read came in as well
    assert set(rows) <= {str(c["id"]) for c in control.export(account_id, "campaigns")["records"]}


def test_mautic_list_envelopes_in_every_shape():
    assert [c["id"] for c in entities({"total": "2", "campaigns": {"7": {"id": 7}, "9": {"id": 9}}}, "campaigns")] == [
        7,
        9,
    ]
    assert entities({"total": 0, "campaigns": []}, "campaigns") == []
    assert entities({"total": "0", "campaigns": {}}, "campaigns") == []
    assert entities([], "campaigns") == []


def test_mautic_deleted_campaigns_are_flagged_by_the_sweep(database_url, schema, sandbox, mautic):
    control, account_id, connection = mautic()
    days = days_back(sandbox_now(sandbox).date(), 7)
    sync_days(database_url, schema, connection, days)
    deleted = control.changes(account_id, deletes=3)["deleted"]
    result = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                              entity_name="mautic_campaigns", connection_id=connection.id)  # fmt: skip
    assert result.counts.updated == 3
    rows = mirror(database_url, schema, "mautic_campaigns", connection.id)
    assert all(rows[str(cid)]["deleted"] for cid in deleted)
    assert sum(r["deleted"] for r in rows.values()) == 3


def test_mautic_contact_counts_are_live_at_one_request_per_campaign(database_url, schema, sandbox, mautic, box):
    control, account_id, connection = mautic("client_credentials", contacts=60)
    with psycopg.connect(database_url) as conn:
        client_id = vault.load_secrets(conn, connection.id, box).reveal()["client_id"]
    token = control.grant(account_id, client_id)["token"]["access_token"]
    listing = httpx.get(f"{connection.base_url}/api/campaigns", params={"limit": 0, "withContactCounts": "true"},
                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    cached = {cid: raw["contactCount"] for cid, raw in listing.json()["campaigns"].items()}  # kept for 12 hours
    control.changes(account_id, joins=12, leaves=4)
    days = days_back(sandbox_now(sandbox).date(), 7)
    routes_before = control.stats()["by_route"]
    results = sync_days(database_url, schema, connection, days)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    members = Counter(r["campaign_id"] for r in control.export(account_id, "campaign_contacts")["records"])
    campaigns = control.export(account_id, "campaigns")["records"]
    live = {str(c["id"]): members.get(str(c["id"]), 0) for c in campaigns}
    rows = mirror(database_url, schema, "mautic_campaigns", connection.id)
    assert {cid: row["contact_count"] for cid, row in rows.items()} == live
    assert {cid for cid in live if cached[cid] != live[cid]}  # the listing's figures went stale meanwhile

    def pages(day: date, field: str) -> int:
        """Pages of 7 (the last one short) that list the campaigns whose `field` falls in the day."""
        window = day_window(day)
        listed = sum(1 for c in campaigns if (at := parse_time(c[field])) and window.start <= at < window.end)
        return listed // 7 + 1

    # Each day: both listing passes, paged by id, and one member count per campaign read.
    listings = [pages(day, "dateModified") + pages(day, "dateAdded") for day in days]
    assert [r.stats.requests for r in results] == [n + r.total for n, r in zip(listings, results, strict=True)]
    assert sum(r.total for r in results) == len(rows) == len(campaigns)
    routes = control.stats()["by_route"]
    served = {route: routes[route] - routes_before.get(route, 0) for route in routes}
    assert served["GET /api/campaigns"] == sum(listings)
    assert served["GET /api/campaigns/{id}/contacts"] == len(campaigns)
