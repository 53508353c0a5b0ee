"""The provider contract for PayPal, BillionMail and Mautic against their sandboxes.

The same promises the accounting clients keep: read to the last page, put a record updated exactly at
midnight in one day only, survive 5xx answers and 429 bursts, renew an expired token, and turn
refused credentials into `needs_reauth` with a message that says how to fix it and leaks nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.http import AuthenticationFailed
from nextcrm_pipelines.core.runner import day_window, snapshot_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

DAILY = ["paypal", "mautic"]


def run(database_url, schema, connection, entity, windows):
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider(connection.provider),
                           entity_name=entity, connection_id=connection.id, windows=windows)  # fmt: skip


def daily_account(name, sandbox, paypal, mautic, **settings):
    """(control, account id, connection, entity, export name, id of a raw record) for a daily provider."""
    if name == "paypal":
        control, account_id, connection = paypal(sandbox, settings=settings, transactions=120, days=3)
        return control, account_id, connection, "paypal_payments"
    control, account_id, connection = mautic(settings=settings, campaigns=60, days=3)
    return control, account_id, connection, "mautic_campaigns"


@pytest.mark.parametrize("name", DAILY)
def test_reads_to_the_last_page(database_url, schema, sandbox, paypal, mautic, name):
    _, _, connection, entity = daily_account(name, sandbox, paypal, mautic, page_size=4)
    days = days_back(sandbox_now(sandbox).date(), 3)
    results = run(database_url, schema, connection, entity, [day_window(d) for d in days])
    assert all(r.status == "success" for r in results)
    assert max(r.total for r in results) > 8 and sum(r.stats.requests for r in results) > 2 * len(days)
    rows = mirror(database_url, schema, entity, connection.id)
    assert sum(r.total for r in results) == len(rows)


@pytest.mark.parametrize("name", DAILY)
def test_a_record_at_midnight_lands_in_its_own_day_once(database_url, schema, own_sandbox, paypal, mautic, name):
    control, account_id, connection, entity = daily_account(name, own_sandbox, paypal, mautic)
    today = sandbox_now(own_sandbox).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=1)
    if name == "paypal":
        raw = control.add_record(account_id, "transaction", at=midnight.timestamp())
        key = f"{raw['transaction_info']['transaction_id']}:{raw['transaction_info']['transaction_event_code']}"
    else:
        raw = control.add_record(account_id, "campaign", at=midnight.timestamp())
        key = str(raw["id"])
    before, on = run(database_url, schema, connection, entity,
                     [day_window(midnight.date() - timedelta(days=1)), day_window(midnight.date())])  # fmt: skip
    assert before.status == on.status == "success"
    column = get_provider(name).entity(entity).partition_column
    rows = mirror(database_url, schema, entity, connection.id)
    assert rows[key][column] == midnight
    earlier = {k for k, r in rows.items() if r[column] < midnight}
    assert key not in earlier and before.total == len(earlier)


@pytest.mark.parametrize("name", [*DAILY, "billionmail"])
def test_server_errors_and_429_bursts_are_survived(database_url, schema, sandbox, paypal, mautic, billionmail, name):
    if name == "billionmail":
        control, account_id, connection, _ = billionmail(campaigns=8)
        entity, windows, faults = "billionmail_campaigns", [snapshot_window()], {"server_errors": 2}
    else:
        control, account_id, connection, entity = daily_account(name, sandbox, paypal, mautic)
        windows = [day_window(d) for d in days_back(sandbox_now(sandbox).date(), 1)]
        faults = {"server_errors": 2, "rate_limited": 2}
    control.set_faults(account=account_id, **faults)
    try:
        results = run(database_url, schema, connection, entity, windows)
    finally:
        control.clear_faults(account=account_id)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    assert sum(r.stats.retries for r in results) >= len(faults) * 2 - (2 if name == "billionmail" else 0)
    if "rate_limited" in faults:
        assert sum(r.stats.rate_limit_waits for r in results) >= 2


def test_mautic_expired_access_token_is_refreshed_with_the_rotated_token_stored(
    database_url, schema, sandbox, mautic, box
):
    control, account_id, connection = mautic(campaigns=10, days=1)
    with psycopg.connect(database_url) as conn:
        before = dict(vault.load_secrets(conn, connection.id, box).reveal())
    grant = control.oauth_state(account_id)["grants"][-1]["id"]
    control.expire_access(account_id, grant)
    (result,) = run(database_url, schema, connection, "mautic_campaigns", [day_window(sandbox_now(sandbox).date())])
    assert result.status == "success"
    with psycopg.connect(database_url) as conn:
        after = dict(vault.load_secrets(conn, connection.id, box).reveal())
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # Mautic rotates: the new one is stored


@pytest.mark.parametrize("name", ["paypal", "mautic", "billionmail"])
def test_refused_credentials_mark_the_connection_with_the_fix(
    database_url, schema, sandbox, paypal, mautic, billionmail, box, name
):
    if name == "billionmail":
        _, _, connection, _ = billionmail(campaigns=3)
        secrets, windows, entity = (
            {"username": "admin", "password": "wrong"},
            [snapshot_window()],
            "billionmail_campaigns",
        )
        leaked = "wrong"
    else:
        _, _, connection, entity = daily_account(name, sandbox, paypal, mautic)
        windows = [day_window(sandbox_now(sandbox).date())]
        with psycopg.connect(database_url) as conn:
            secrets = dict(vault.load_secrets(conn, connection.id, box).reveal())
        secrets.update(client_secret="not-the-secret", expires_at=0)
        if name == "mautic":
            secrets.pop("refresh_token", None)
            secrets["grant_type"] = "client_credentials"
        leaked = "not-the-secret"
    with psycopg.connect(database_url) as conn:
        vault.add_connection(conn, provider=name, display_name=connection.display_name, secrets=secrets, box=box,
                             base_url=connection.base_url, settings=connection.settings,
                             external_tenant=connection.external_tenant)  # fmt: skip
    with pytest.raises(AuthenticationFailed) as failure:
        run(database_url, schema, connection, entity, windows)
    assert leaked not in str(failure.value)
    with psycopg.connect(database_url) as conn:
        stored = vault.get_connection(conn, connection.id)
    fix = f"`nextcrm-pipelines connections set-secret {connection.id}`"  # its own row, not a second connection
    assert stored.status == "needs_reauth" and stored.last_error.endswith(fix) and leaked not in stored.last_error
    assert stored.last_error.count("nextcrm-pipelines") == 1
