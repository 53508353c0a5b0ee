"""The contract every accounting client meets against its sandbox, over real HTTP and a real Postgres.

For each synced entity (Xero invoices and contacts, QuickBooks invoices, MYOB invoices): paging to
the last page, exact window boundaries, surviving 429s and 5xx, refreshing an expired token (ahead of
expiry and after a 401) with the rotated refresh token stored, and `invalid_grant` turning into
`needs_reauth` with the command that fixes it. Each test connects a new organisation through the
real OAuth connect flow.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    Profile,
    assert_mirror_equals_export,
    connect_account,
    expire_stored_token,
    mirror,
    stored_secrets,
)
from nextcrm_pipelines_tests.contract import all_cases
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

ALL = list(PROFILES.values())
# Entities with a case in the per-entity contract (`test_entity_contract.py`) are paged, cut at midnight and
# faulted there; their tokens are still refreshed here.
UNCONTRACTED = [profile for profile in ALL if profile.entity not in {case.entity for case in all_cases()}]


def sync_range(database_url: str, schema: str, account, days) -> list:
    provider = get_provider(account.profile.provider)
    return sync_partitions(
        database_url=database_url, schema=schema, provider=provider, entity_name=account.profile.entity,
        connection_id=account.connection.id, windows=[day_window(d) for d in days],
    )  # fmt: skip


@pytest.mark.parametrize("profile", UNCONTRACTED, ids=str)
def test_pages_to_the_last_page_and_equals_the_sandbox(database_url, schema, box, sandbox, profile: Profile):
    account = connect_account(sandbox, database_url, box, profile, settings={"page_size": 10})
    today = sandbox_now(sandbox).date()
    results = sync_range(database_url, schema, account, days_back(today, profile.tenant["days"] + 1))
    assert all(r.status == "success" for r in results), [r.error for r in results if r.error]
    assert_mirror_equals_export(account, database_url, schema)
    # More records than one page per day: the client went past the first page.
    busiest = max(r.total for r in results)
    assert busiest > 10 and sum(r.stats.requests for r in results) > len(results)
    # Re-running changes nothing.
    again = sync_range(database_url, schema, account, days_back(today, profile.tenant["days"] + 1))
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0


@pytest.mark.parametrize("profile", UNCONTRACTED, ids=str)
def test_a_record_updated_exactly_at_midnight_lands_in_one_day_once(database_url, schema, box, sandbox, profile):
    account = connect_account(sandbox, database_url, box, profile, invoices=10, contacts=10, customers=10)
    today = sandbox_now(sandbox).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=1)
    entity = {"xero_contacts": "contact", "quickbooks_customers": "customer",
              "quickbooks_payments": "payment"}.get(profile.entity, "invoice")  # fmt: skip
    record = account.control.add_record(account.tenant_id, entity, updated_at=midnight.timestamp())
    record_id = str(record.get(profile.id_field) or record.get("record", {}).get(profile.id_field))
    before, on = sync_range(database_url, schema, account, [midnight.date() - timedelta(days=1), midnight.date()])
    assert before.status == on.status == "success"
    assert record_id in mirror(database_url, schema, profile.entity, account.connection.id)
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL("SELECT window_start, inserted_records FROM {} WHERE connection_id = %s ORDER BY id").format(
                table("integration_sync_logs", schema)
            ),
            (account.connection.id,),
        ).fetchall()
    assert [start for start, _ in logged] == [midnight - timedelta(days=1), midnight]
    row = mirror(database_url, schema, profile.entity, account.connection.id)[record_id]
    assert row["source_updated_at"] == midnight
    # The earlier day's window ended at that midnight (exclusive): the record came in with its own day.
    assert on.total >= 1 and before.counts.inserted + on.counts.inserted == before.total + on.total


@pytest.mark.parametrize("profile", UNCONTRACTED, ids=str)
def test_429_bursts_and_server_errors_are_survived(database_url, schema, box, sandbox, profile):
    account = connect_account(sandbox, database_url, box, profile, invoices=30, contacts=30, customers=30, days=1)
    account.control.set_faults(tenant=account.tenant_id, server_errors=2, rate_limited=2)
    try:
        today = sandbox_now(sandbox).date()
        results = sync_range(database_url, schema, account, days_back(today, 2))
    finally:
        account.control.clear_faults(tenant=account.tenant_id)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    assert sum(r.stats.retries for r in results) >= 4
    assert sum(r.stats.rate_limit_waits for r in results) >= 2
    assert_mirror_equals_export(account, database_url, schema)


@pytest.mark.parametrize("profile", ALL, ids=str)
def test_expired_tokens_are_refreshed_and_the_new_tokens_stored(database_url, schema, box, sandbox, profile):
    account = connect_account(sandbox, database_url, box, profile, invoices=10, contacts=10, customers=10, days=1)
    first = stored_secrets(database_url, box, account.connection.id)
    today = [sandbox_now(sandbox).date()]

    # Ahead of expiry: our copy says the token is about to expire, so the client refreshes first.
    expire_stored_token(database_url, box, account.connection.id)
    (result,) = sync_range(database_url, schema, account, today)
    assert result.status == "success" and account.refreshes() == 1
    second = stored_secrets(database_url, box, account.connection.id)
    assert second["access_token"] != first["access_token"] and second["expires_at"] > first["expires_at"] - 120

    # After a 401: the provider expired the token early; one refresh, then the request is replayed.
    account.expire_access()
    (result,) = sync_range(database_url, schema, account, today)
    assert result.status == "success" and account.refreshes() == 2
    third = stored_secrets(database_url, box, account.connection.id)
    assert third["access_token"] != second["access_token"]
    with psycopg.connect(database_url) as conn:
        stored = vault.get_connection(conn, account.connection.id)
    assert stored.status == "active" and stored.token_version >= 3


@pytest.mark.parametrize("profile", ALL, ids=str)
def test_invalid_grant_marks_the_connection_needs_reauth_with_the_fix(database_url, schema, box, sandbox, profile):
    account = connect_account(sandbox, database_url, box, profile, invoices=5, contacts=5, customers=5, days=1)
    secrets = stored_secrets(database_url, box, account.connection.id)
    account.revoke()
    expire_stored_token(database_url, box, account.connection.id)
    with pytest.raises(AuthenticationFailed) as failure:
        sync_range(database_url, schema, account, [sandbox_now(sandbox).date()])
    message = str(failure.value)
    assert "invalid_grant" in message and f"nextcrm-pipelines connect {profile.provider}" in message
    for value in (secrets["refresh_token"], secrets["access_token"], account.client_secret):
        assert value not in message
    with psycopg.connect(database_url) as conn:
        stored = vault.get_connection(conn, account.connection.id)
    assert stored.status == "needs_reauth" and f"nextcrm-pipelines connect {profile.provider}" in stored.last_error
    assert secrets["refresh_token"] not in stored.last_error
