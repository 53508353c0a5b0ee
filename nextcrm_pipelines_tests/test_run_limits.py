"""Runs of one connection never overlap, through the real daemon and run queue.

A ranged backfill carries no per-connection tag, so the queue starts it beside a single-partition run
of the same connection. The run that comes second must not wait for the first inside its run slot:
it fails that connection's partitions at once, naming the run that holds the connection, and the
provider sees only one client at a time, within the connection's request rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.settings import PROJECT_ROOT
from nextcrm_pipelines.partitions import connections_partitions_name
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

BIN = Path(sys.executable).parent
WORKSPACE = PROJECT_ROOT / "workspace.yaml"


def _dagster_home(tmp_path: Path) -> Path:
    """A Dagster home with the project's run queue and limits (sqlite storage in the folder)."""
    project = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = {
        "concurrency": project["concurrency"],
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {"dequeue_interval_seconds": 1},
        },
        "telemetry": {"enabled": False},
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def _launch(tags: dict[str, str]) -> None:
    subprocess.run(
        [str(BIN / "dagster"), "job", "launch", "-w", str(WORKSPACE), "-j", "stripe_sync", "--tags", json.dumps(tags)],
        check=True, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT,
    )  # fmt: skip


def _wait(instance: dg.DagsterInstance, condition, what: str, timeout: float = 240) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if condition(runs):
            return runs
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}: {[(r.run_id, r.status) for r in instance.get_runs()]}")


def _syncing(database_url: str, schema: str, run_id: str) -> bool:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE run_id = %s AND status = 'running')").format(
                table("integration_sync_logs", schema)
            ),
            (run_id,),
        ).fetchone()[0]


def test_a_backfill_and_a_single_partition_run_of_one_connection_never_overlap(
    database_url, schema, sandbox, stripe_account, stripe_connection, tmp_path, monkeypatch
):
    key = stripe_account(charges=1200, subscriptions=20, days=8)
    sandbox.set_stripe_faults(key, latency_ms=1500)  # a backfill that takes a while
    connection = stripe_connection(key, requests_per_second=20)
    days = [d.isoformat() for d in days_back(sandbox_now(sandbox).date(), 7)]
    home = _dagster_home(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )  # fmt: skip
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
            _launch({"dagster/asset_partition_range_start": f"{connection.id}|{days[0]}",
                     "dagster/asset_partition_range_end": f"{connection.id}|{days[-1]}"})  # fmt: skip
            (backfill,) = _wait(instance, lambda runs: runs and _syncing(database_url, schema, runs[0].run_id),
                                "the backfill to start syncing")  # fmt: skip
            _launch({"dagster/partition": f"{connection.id}|{days[-1]}", "dagster/partition/connection": connection.id,
                     "dagster/partition/date": days[-1]})  # fmt: skip
            runs = _wait(instance, lambda runs: len(runs) == 2 and all(r.is_finished for r in runs), "both runs")
            by_id = {run.run_id: run for run in runs}
            single = next(run for run in runs if run.run_id != backfill.run_id)
            records = {r.dagster_run.run_id: r for r in instance.get_run_records(dg.RunsFilter(run_ids=list(by_id)))}
            failure = next(
                e.dagster_event.step_failure_data.error.message
                for e in instance.all_logs(single.run_id)
                if e.dagster_event and e.dagster_event.is_step_failure
            )
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert by_id[backfill.run_id].status == dg.DagsterRunStatus.SUCCESS
    assert single.status == dg.DagsterRunStatus.FAILURE
    assert f"is being synced by run {backfill.run_id}" in failure
    # It failed at once, long before the backfill it would otherwise have waited for ended.
    assert records[single.run_id].end_time < records[backfill.run_id].end_time
    with psycopg.connect(database_url) as conn:
        logs = conn.execute(
            sql.SQL("SELECT run_id, started_at, completed_at FROM {} WHERE connection_id = %s").format(
                table("integration_sync_logs", schema)
            ),
            (connection.id,),
        ).fetchall()
    assert {run_id for run_id, _, _ in logs} == {backfill.run_id}  # the second run synced nothing
    assert sandbox.stripe_stats(key)["rate_limited"] == 0  # one client at a time, within the rate
