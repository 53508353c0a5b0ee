"""PayPal through the real client against its sandbox: complete days, split windows, the 3-hour lag.

Transaction Search returns at most 10,000 rows per query and 31 days per window and shows rows up to
three hours late; these tests prove a busy day is read whole, long windows are cut, late rows are
picked up by the next run (and the day is logged as covered only as far as PayPal showed it), money
is exact and re-runs change nothing. Subscriptions are found through transactions.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.oauth import TokenManager
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.core.sync import Coverage, SyncWindow
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.paypal.client import PayPalApi
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now


def sync(database_url, schema, connection, entity, days):
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider("paypal"),
                           entity_name=entity, connection_id=connection.id,
                           windows=[day_window(d) for d in days])  # fmt: skip


def visible_truth(control, account_id) -> dict[str, dict]:
    records = control.export(account_id, "transactions", visible=True)["records"]
    return {f"{r['transaction_info']['transaction_id']}:{r['transaction_info']['transaction_event_code']}": r
            for r in records}  # fmt: skip


def logged_windows(database_url, schema, connection_id) -> list[tuple[datetime, datetime]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT window_start, window_end FROM {} WHERE connection_id = %s ORDER BY id").format(
                table("integration_sync_logs", schema)
            ),
            (connection_id,),
        ).fetchall()


def test_days_equal_what_paypal_shows_with_exact_money_and_idempotent_reruns(database_url, schema, sandbox, paypal):
    control, account_id, connection = paypal(sandbox, subscriptions=40)
    now = sandbox_now(sandbox)
    days = days_back(now.date(), 6)
    # Generated plans may all start with a trial; one payment a day ago makes sure a subscription is billed.
    billed = control.export(account_id, "subscriptions")["records"][0]["id"]
    control.add_record(account_id, "transaction", {"subscription_id": billed},
                       at=int((now - timedelta(days=1)).timestamp()))  # fmt: skip
    results = sync(database_url, schema, connection, "paypal_payments", days)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    truth = visible_truth(control, account_id)
    rows = mirror(database_url, schema, "paypal_payments", connection.id)
    assert set(rows) == set(truth) and len(truth) > 100
    for key, raw in truth.items():
        info = raw["transaction_info"]
        assert rows[key]["amount"] == Decimal(info["transaction_amount"]["value"])
        assert rows[key]["currency"] == info["transaction_amount"]["currency_code"]
    # Rows sharing a transaction id are kept apart by their event code.
    assert len({r["transaction_id"] for r in rows.values()}) <= len(rows)
    # Today is logged as covered only up to what PayPal had refreshed.
    start, end = logged_windows(database_url, schema, connection.id)[-1]
    assert end < start + timedelta(days=1)
    again = sync(database_url, schema, connection, "paypal_payments", days)
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0

    subs = sync(database_url, schema, connection, "paypal_subscriptions", days)
    assert all(r.status == "success" for r in subs)
    mirrored = mirror(database_url, schema, "paypal_subscriptions", connection.id)
    referenced = {r["subscription_id"] for r in rows.values() if r["subscription_id"]}
    assert billed in referenced and set(mirrored) == referenced
    truth_subs = {s["id"]: s for s in control.export(account_id, "subscriptions")["records"]}
    for sid, row in mirrored.items():
        assert row["status"] == truth_subs[sid]["status"] and row["plan_name"]
        assert row["deleted"] == (truth_subs[sid]["status"] in ("CANCELLED", "EXPIRED"))


def test_a_day_over_10000_transactions_is_read_whole_by_splitting(database_url, schema, sandbox, paypal):
    control, account_id, connection = paypal(sandbox, transactions=20, subscriptions=1, days=3)
    busy = sandbox_now(sandbox).date() - timedelta(days=2)
    control.bulk(account_id, busy.isoformat(), 12_500)
    (result,) = sync(database_url, schema, connection, "paypal_payments", [busy])
    assert result.status == "success"
    window = day_window(busy)
    truth = {k for k, r in visible_truth(control, account_id).items()
             if window.start.isoformat()[:10] == r["transaction_info"]["transaction_initiation_date"][:10]}  # fmt: skip
    rows = mirror(database_url, schema, "paypal_payments", connection.id)
    assert len(truth) > 12_500 - 1 and set(rows) == truth
    assert control.stats()["accounts"][account_id]["searches"] > 25  # split queries, each paged


def test_a_45_day_window_is_cut_into_windows_of_at_most_31_days(database_url, schema, own_sandbox, paypal, box):
    control, account_id, connection = paypal(own_sandbox, transactions=200, days=44)
    now = sandbox_now(own_sandbox)
    window = SyncWindow(datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=45), now)
    with psycopg.connect(database_url) as conn:
        secrets = vault.load_secrets(conn, connection.id, box)
    tokens = TokenManager(spec=get_provider("paypal").oauth, connection=connection, secrets=secrets, box=box,
                          database_url=database_url)  # fmt: skip
    with PayPalApi(ClientContext(connection, secrets, RequestStats(), tokens)) as api:
        pages = list(api.transactions(window))
    tokens.close()
    rows = [raw for page in pages if not isinstance(page, Coverage) for raw, _ in page]
    assert len(rows) == len(visible_truth(control, account_id))
    by_status = control.stats()["by_status"]
    assert not any(str(status).startswith("4") for status in by_status), by_status  # no window refused


def test_late_transactions_are_picked_up_by_the_next_run(database_url, schema, midday_sandbox, paypal):
    # At midday PayPal has refreshed today up to 09:00, so today's window is cut short of its end.
    control, account_id, connection = paypal(midday_sandbox, transactions=50, days=2)
    now = sandbox_now(midday_sandbox)
    late = control.add_record(account_id, "transaction", at=(now - timedelta(hours=1)).timestamp())
    late_key = f"{late['transaction_info']['transaction_id']}:{late['transaction_info']['transaction_event_code']}"
    days = days_back(now.date(), 1)
    first = sync(database_url, schema, connection, "paypal_payments", days)
    assert all(r.status == "success" for r in first)
    assert late_key not in mirror(database_url, schema, "paypal_payments", connection.id)
    after = sandbox_now(midday_sandbox)
    today = first[-1].window
    assert today.start < today.end <= after - timedelta(hours=3) + timedelta(seconds=1)  # not claimed as seen

    midday_sandbox.advance_clock(timedelta(hours=3, minutes=5).total_seconds())
    sync(database_url, schema, connection, "paypal_payments", days_back(sandbox_now(midday_sandbox).date(), 1))
    assert late_key in mirror(database_url, schema, "paypal_payments", connection.id)


def test_the_client_credentials_token_is_reused_and_renewed_after_a_401(database_url, schema, sandbox, paypal):
    control, account_id, connection = paypal(sandbox, transactions=30, days=1)
    today = [sandbox_now(sandbox).date()]

    def tokens_issued() -> int:
        return sum(g["client_id"] == control.client_id for g in control.oauth_state()["grants"])

    sync(database_url, schema, connection, "paypal_payments", today)
    sync(database_url, schema, connection, "paypal_payments", today)
    assert tokens_issued() == 1  # stored encrypted and reused by the next sync
    control.expire_tokens(account_id)
    (result,) = sync(database_url, schema, connection, "paypal_payments", today)
    assert result.status == "success" and tokens_issued() == 2
