"""A provider that is down: the error names the URL and a plain cause, an attempt fails within seconds and
logs the time it really took, the run says when it tries again and its failure names the last cause; and
the one-line log of a synced day, on real syncs against the sandbox."""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.assets import describe_sync
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderUnreachable
from nextcrm_pipelines.core.runner import day_window, snapshot_window, sync_partitions
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.definitions import build_definitions
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.helpers import sandbox_now

STRIPE = get_provider("stripe")


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed, so a connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def down_stripe(database_url: str, schema: str, box: SecretBox) -> tuple[Connection, str, int]:
    """A Stripe connection whose API address is a closed loopback port; returns (connection, key, port)."""
    port, key = closed_port(), f"sk_test_{uuid.uuid4().hex}"
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name="Down", secrets={"api_key": key},
                                          box=box, base_url=f"http://127.0.0.1:{port}")  # fmt: skip
    return connection, key, port


def _log_rows(database_url: str, schema: str, connection_id: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL(
                "SELECT window_start, status, duration_seconds, requests, error, completed_at - started_at FROM {} "
                "WHERE connection_id = %s AND asset = 'stripe_payments' ORDER BY window_start"
            ).format(table("integration_sync_logs", schema)),
            (connection_id,),
        ).fetchall()


def test_an_unreachable_stripe_fails_fast_naming_the_url_and_the_cause_and_logs_the_real_duration(
    database_url, schema, down_stripe
):
    connection, key, port = down_stripe
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in (2, 1, 0)]
    started = time.monotonic()
    results = sync_partitions(database_url=database_url, schema=schema, provider=STRIPE,
                              entity_name="stripe_payments", connection_id=connection.id,
                              windows=[day_window(d) for d in days])  # fmt: skip
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == ["failed"] * 3
    first = str(results[0].exception)
    assert isinstance(results[0].exception, ProviderUnreachable)
    assert re.search(
        rf"could not reach Stripe at http://127\.0\.0\.1:{port}/v1/charges: connection refused "
        r"\(3 attempts over \d+\.\d s\)",
        first,
    ), first
    assert "?" not in first and key not in first and key not in results[0].error
    # The days after it are not tried: the provider is down, each would only wait the same way.
    assert all("not tried" in r.error and f"127.0.0.1:{port}" in r.error for r in results[1:])
    assert [r.stats.requests for r in results] == [3, 0, 0]
    # Failing fast: three connection attempts with short waits, not minutes of retries.
    assert elapsed < 10
    rows = _log_rows(database_url, schema, connection.id)
    assert [(row[0], row[1], row[3]) for row in rows] == [(day_window(d).start, "failed", r.stats.requests)
                                                          for d, r in zip(days, results, strict=True)]  # fmt: skip
    # The log and the result carry the time the attempt took, failure included; the durations of the days
    # add up to the sync's time (opening the connection and the session aside).
    assert float(rows[0][2]) == round(results[0].duration, 3)
    assert float(rows[0][2]) >= 0.5  # at least the two waits between the three attempts
    assert sum(float(row[2]) for row in rows) >= elapsed - 0.5
    assert rows[0][5].total_seconds() >= float(rows[0][2]) - 0.2  # started_at is when the day's fetch began
    assert "could not reach Stripe" in rows[0][4]


def test_processes_sharing_a_backfill_of_a_provider_that_is_down_try_it_once_between_them(
    database_url, schema, down_stripe, monkeypatch
):
    connection, _, port = down_stripe
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in range(8, 0, -1)]
    # This process finds the provider down only after its helper has started (a spawned process, with the
    # real fetcher): were the helper to take a window of its own before then, it would try it too.
    real_fetch = STRIPE.fetchers["stripe_payments"]

    def late_fetch(client, window):
        time.sleep(4)
        yield from real_fetch(client, window)

    monkeypatch.setitem(STRIPE.fetchers, "stripe_payments", late_fetch)
    results = sync_partitions(database_url=database_url, schema=schema, provider=STRIPE,
                              entity_name="stripe_payments", connection_id=connection.id,
                              windows=[day_window(d) for d in days], workers=2)  # fmt: skip
    assert [r.status for r in results] == ["failed"] * len(days)
    tried = [r for r in results if r.stats.requests]
    assert len(tried) == 1 and tried[0].window == day_window(days[0]), [r.error for r in results]
    assert isinstance(tried[0].exception, ProviderUnreachable)
    # Every other day, the helper's included, is not tried, and says why with the first one's cause.
    not_tried = (r"^NotTried: not tried after the provider could not be reached: .*"
                 rf"could not reach Stripe at http://127\.0\.0\.1:{port}/v1/charges: connection refused")  # fmt: skip
    assert all(re.search(not_tried, r.error) for r in results[1:]), [r.error for r in results]


def test_a_run_against_a_provider_that_is_down_says_when_it_tries_again_and_fails_naming_the_cause(
    database_url, schema, down_stripe
):
    connection, _, port = down_stripe
    last = datetime.now(UTC).date().replace(day=1) - timedelta(days=1)  # the whole of last month
    first = last.replace(day=1)
    defs = build_definitions(retry_policy=dg.RetryPolicy(max_retries=1, delay=0.2))
    job = defs.resolve_job_def("stripe_sync")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            partition_key=dg.MultiPartitionKey({"connection": connection.id, "month": month_key(first)}),
            asset_selection=[dg.AssetKey("stripe_payments")],
            raise_on_error=False,
        )
        elapsed = time.monotonic() - started
        records = instance.all_logs(result.run_id)
    assert not result.success
    # Each attempt fails within seconds: three connection attempts, then the month's other days not tried
    # (before, each of the 30 days waited out six attempts: minutes per attempt).
    assert elapsed < 60
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    cause = rf"could not reach Stripe at http://127\.0\.0\.1:{port}/v1/charges: connection refused"
    messages = [r.user_message for r in records if r.level >= logging.WARNING and not r.dagster_event]
    (retry_line,) = [m for m in messages if re.match(r"attempt 1 of 2 failed after \d+\.\d s: ", m)]
    assert re.search(cause, retry_line) and re.search(r"; next attempt in ~0\.2 s$", retry_line), retry_line
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "Exceeded max_retries" not in message, message
    assert re.search(rf"Failure: attempt 2 of 2 failed after \d+\.\d s: .*{cause}", message), message
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("attempt 2 of 2 failed after ") and re.search(cause, description), description
    assert f"; {last.day - 1} more days not tried" in description
    # The first day's own line in the run's logs, then one for the days after it, in each attempt.
    day_line = rf"{first} stripe_payments: FAILED: .*{cause}"
    assert sum(bool(re.search(day_line, m)) for m in messages) == 2
    rest = (f"{first + timedelta(days=1)} .. {last} stripe_payments: FAILED: not tried ({last.day - 1} days) "
            "after the provider could not be reached")  # fmt: skip
    assert messages.count(rest) == 2


def test_a_synced_days_log_line_is_one_short_sentence(database_url, schema, sandbox, stripe_account,
                                                      stripe_connection):  # fmt: skip
    key = stripe_account(charges=40, subscriptions=4, days=1)
    connection = stripe_connection(key)
    today = sandbox_now(sandbox).date()

    def sync() -> list:
        return sync_partitions(database_url=database_url, schema=schema, provider=STRIPE,
                               entity_name="stripe_payments", connection_id=connection.id,
                               windows=[day_window(today)])  # fmt: skip

    (first,) = sync()
    assert first.counts.inserted > 0 and first.stats.retries == 0
    line = describe_sync(first)
    expected = rf"{today} stripe_payments: {first.total} records \({first.counts.inserted} new\), " + (
        rf"{first.stats.requests} requests, \d+\.\d+ s"
    )
    assert re.fullmatch(expected, line), line
    # With several connections in a run, each line names its connection first.
    assert describe_sync(first, connection=True) == f"{connection.id} {line}"

    sandbox.set_stripe_faults(key, rate_limit_burst=1)  # one 429 the client waits out and retries
    try:
        (again,) = sync()
    finally:
        sandbox.clear_stripe_faults(key)
    line = describe_sync(again)
    expected = (
        rf"{today} stripe_payments: {again.total} records \({again.total} unchanged\), "
        rf"{again.stats.requests} requests, 1 retry, 1 rate-limit wait, \d+\.\d+ s"
    )
    assert re.fullmatch(expected, line), line
    assert "{" not in line and "'" not in line


def test_a_whole_list_sync_and_a_failed_day_read_as_such(database_url, schema, billionmail, down_stripe):
    _, _, bm_connection, _ = billionmail(campaigns=5)
    (whole,) = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("billionmail"),
                               entity_name="billionmail_campaigns", connection_id=bm_connection.id,
                               windows=[snapshot_window()])  # fmt: skip
    assert re.fullmatch(
        rf"whole list billionmail_campaigns: 5 records \(5 new\), {whole.stats.requests} requests, \d+\.\d+ s",
        describe_sync(whole),
    ), describe_sync(whole)

    connection, _, port = down_stripe
    today = datetime.now(UTC).date()
    (failed,) = sync_partitions(database_url=database_url, schema=schema, provider=STRIPE,
                                entity_name="stripe_payments", connection_id=connection.id,
                                windows=[day_window(today)])  # fmt: skip
    line = describe_sync(failed)
    assert line.startswith(f"{today} stripe_payments: FAILED: "), line
    assert f"could not reach Stripe at http://127.0.0.1:{port}/v1/charges: connection refused" in line
    assert re.search(r"; 0 records, 3 requests, 2 retries, \d+\.\d+ s$", line), line


def test_an_unreachable_provider_behind_the_shared_http_client_is_named_with_its_url_and_cause(
    database_url, schema, box
):
    port = closed_port()
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="billionmail", display_name="Mail Down", box=box,
                                          secrets={"username": "admin", "password": "pw-never-shown"},
                                          base_url=f"http://127.0.0.1:{port}/bm")  # fmt: skip
    started = time.monotonic()
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("billionmail"),
                                entity_name="billionmail_campaigns", connection_id=connection.id,
                                windows=[snapshot_window()])  # fmt: skip
    assert time.monotonic() - started < 10
    assert result.status == "failed" and isinstance(result.exception, ProviderUnreachable)
    message = str(result.exception)
    assert re.fullmatch(
        rf"billionmail connection '{connection.id}': could not reach BillionMail at http://127\.0\.0\.1:{port}/bm/\S+: "
        r"connection refused \(3 attempts over \d+\.\d s\)",
        message,
    ), message
    assert "pw-never-shown" not in message and "?" not in message and result.stats.requests == 3
    # Through Dagster, the whole-list partition's failure names the cause, not a day of its window (1970-01-01).
    defs = build_definitions(retry_policy=None)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("billionmail"), [connection.id])
        run = defs.resolve_job_def("billionmail_sync").execute_in_process(
            instance=instance, partition_key=connection.id, raise_on_error=False
        )
    failures = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == len(get_provider("billionmail").entities)  # each entity's step says it
    for failure in failures:
        description = failure.step_failure_data.user_failure_data.description
        assert f"{connection.id}: billionmail connection" in description and "1970" not in description, description
