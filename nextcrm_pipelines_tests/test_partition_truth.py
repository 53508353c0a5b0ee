"""Every partition tells its own truth: in a ranged run each month gets its own materialization and
figures, a month with a failed day fails alone, and re-executing the run syncs only the failed day.

The failing day comes from a `ProviderClients` resource of the test's own, which hands the asset a
Stripe client whose listing of that day fails: the resource is the seam the code location offers.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.definitions import build_definitions
from nextcrm_pipelines.partitions import connection_month_partitions, connections_partitions_name, month_key
from nextcrm_pipelines_tests.helpers import WrappingClients, sandbox_now

FAILING_DAY_ENV = "NEXTCRM_TEST_FAILING_DAY"


class _FailsOneDay:
    """A Stripe client whose charge listing of one day fails like a provider outage; all else is the real client."""

    def __init__(self, client: Any, day: str) -> None:
        self._client, self._day = client, day

    def charges(self, window):
        if window.start.date().isoformat() == self._day:
            raise ProviderError(f"charges of {self._day}: provider answered 500 (test)")
        return self._client.charges(window)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class FailingDayClients(WrappingClients):
    """The real clients, except that the day named by NEXTCRM_TEST_FAILING_DAY (when set) cannot be listed."""

    def wrap(self, connection: Any, client: Any) -> Any:
        day = os.environ.get(FAILING_DAY_ENV)
        return _FailsOneDay(client, day) if day else client


def stripe_sync_with_a_failing_day() -> dg.JobDefinition:
    """The Stripe sync job with the failing-day clients and no step retries (a reconstructable target)."""
    return build_definitions(clients=FailingDayClients(), retry_policy=None).resolve_job_def("stripe_sync")


def _logs(database_url: str, schema: str, run_id: str) -> list[tuple[str, datetime, int]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT asset, window_start, requests FROM {} WHERE run_id = %s ORDER BY asset, 2").format(
                table("integration_sync_logs", schema)
            ),
            (run_id,),
        ).fetchall()


def _rows_in_month(database_url: str, schema: str, connection_id: str, month: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE connection_id = %s AND date_trunc('month', created_at AT TIME "
                    "ZONE 'UTC') = %s::timestamp").format(table("stripe_payments", schema)),
            (connection_id, month),
        ).fetchone()[0]  # fmt: skip


def _months_back(today: date, count: int) -> list[str]:
    months, first = [], today.replace(day=1)
    for _ in range(count):
        months.insert(0, month_key(first))
        first = (first - timedelta(days=1)).replace(day=1)
    return months


def test_a_ranged_run_materialises_each_month_alone_and_a_reexecution_syncs_only_the_failed_day(
    database_url, schema, sandbox, stripe_account, stripe_connection, monkeypatch
):
    today = sandbox_now(sandbox).date()
    months = _months_back(today, 10)
    monkeypatch.setenv("NEXTCRM_SYNC_START_DATE", months[0])
    key = stripe_account(charges=600, subscriptions=10, days=(today - date.fromisoformat(months[0])).days + 1)
    connection = stripe_connection(key)
    keys = [f"{connection.id}|{month}" for month in months]
    failing_day = (date.fromisoformat(months[3]) + timedelta(days=9)).isoformat()  # the 10th of the 4th month
    monkeypatch.setenv(FAILING_DAY_ENV, failing_day)
    job = dg.reconstructable(stripe_sync_with_a_failing_day)
    asset = dg.AssetKey("stripe_payments")
    partitions = connection_month_partitions("stripe")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        with dg.execute_job(job, instance=instance, tags=tags, raise_on_error=False) as first:
            assert not first.success
            first_run = first.run_id
        status = instance.get_status_by_partition(asset, keys, partitions)
        assert {k: s.value for k, s in status.items()} == {
            k: ("FAILED" if k == keys[3] else "MATERIALIZED") for k in keys
        }
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset), limit=100).records
        counted = {r.partition_key: r.asset_materialization.metadata["dagster/row_count"].value for r in records}
        assert sorted(counted) == sorted(k for k in keys if k != keys[3])
        # Each month's own row count, not the run's sum: what the table holds for that month.
        assert counted == {k: _rows_in_month(database_url, schema, connection.id, k.split("|")[1]) for k in counted}
        assert len(set(counted.values())) > 1
        failure = next(e for e in instance.all_logs(first_run) if e.dagster_event and e.dagster_event.is_step_failure)
        assert f"{keys[3]}: {failing_day}" in failure.dagster_event.step_failure_data.error.message
        # The subscriptions asset of the same run did not fail: every one of its months is materialised.
        subs = instance.get_status_by_partition(dg.AssetKey("stripe_subscriptions"), keys, partitions)
        assert {s.value for s in subs.values()} == {"MATERIALIZED"}

        # The provider recovers; re-executing from failure syncs that one day of the charges, nothing else.
        monkeypatch.delenv(FAILING_DAY_ENV)
        before = sandbox.stripe_stats(key)["requests"]
        options = dg.ReexecutionOptions.from_failure(first_run, instance)
        # The same partition range, as the UI's "re-execute from failure" gives it.
        with dg.execute_job(job, instance=instance, reexecution_options=options, tags=tags) as again:
            assert again.success
            second_run = again.run_id
        logs = _logs(database_url, schema, second_run)
        assert [(asset_name, start.date().isoformat()) for asset_name, start, _ in logs] == [
            ("stripe_payments", failing_day)
        ]
        assert sandbox.stripe_stats(key)["requests"] - before == logs[0][2] > 0
        status = instance.get_status_by_partition(asset, keys, partitions)
        assert {s.value for s in status.values()} == {"MATERIALIZED"}
        latest = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[keys[3]]), limit=1
        ).records[0]
        assert latest.run_id == second_run
        assert latest.asset_materialization.metadata["dagster/row_count"].value == _rows_in_month(
            database_url, schema, connection.id, months[3]
        )
