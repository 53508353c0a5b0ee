"""Runs of one connection never overlap, through the real daemon and run queue.

A ranged backfill carries no per-connection tag, so the queue starts it beside a single-partition run
of the same connection launched with it. Whichever run takes the connection second must not wait for
the other inside its run slot: it fails that connection's partitions at once, naming the run that
holds the connection; their syncs never overlap, and the provider sees one client at a time, within
the connection's request rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from nextcrm_pipelines.assets import SINCE_TAG
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.settings import PROJECT_ROOT
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
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


def _launch(tags: dict[str, str]) -> subprocess.Popen:
    """Submit a run of the Stripe sync job to the instance's queue, as `dagster job launch` does."""
    return subprocess.Popen(
        [str(BIN / "dagster"), "job", "launch", "-w", str(WORKSPACE), "-j", "stripe_sync", "--tags", json.dumps(tags)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
    )  # fmt: skip


def _wait(instance: dg.DagsterInstance, condition, what: str, timeout: float = 240) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        if condition(runs):
            return runs
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}: {[(r.run_id, r.status) for r in instance.get_runs()]}")


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
    months = [month_key(date.fromisoformat(day)) for day in (days[0], days[-1])]
    backfill_tags = {
        "dagster/asset_partition_range_start": f"{connection.id}|{months[0]}",
        "dagster/asset_partition_range_end": f"{connection.id}|{months[1]}",
        SINCE_TAG: days[0],
    }
    single_tags = {"dagster/partition": f"{connection.id}|{months[1]}", "dagster/partition/connection": connection.id,
                   "dagster/partition/month": months[1], SINCE_TAG: days[-1]}  # fmt: skip
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
            launches = [_launch(tags) for tags in (backfill_tags, single_tags)]  # together, as two users would
            for launch in launches:
                assert launch.wait(timeout=180) == 0, launch.stderr.read()
            runs = _wait(instance, lambda runs: len(runs) == 2 and all(r.is_finished for r in runs), "both runs")
            starts, busy = {}, []
            for run in runs:
                for e in instance.all_logs(run.run_id):
                    if e.dagster_event and e.dagster_event.is_step_start:
                        starts[(run.run_id, e.step_key)] = e.timestamp
                    elif e.dagster_event and e.dagster_event.is_step_failure:
                        message = e.dagster_event.step_failure_data.error.message
                        busy.append((run.run_id, e.timestamp - starts[(run.run_id, e.step_key)], message))
            statuses = {run.run_id: run.status for run in runs}
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    # A run that found the connection taken said by which run, and failed at once instead of waiting for it
    # (the backfill holds the connection for tens of seconds).
    assert busy and dg.DagsterRunStatus.FAILURE in statuses.values()
    for run_id, waited, message in busy:
        (other,) = set(statuses) - {run_id}
        assert f"is being synced by run {other}" in message and waited < 10, (waited, message)
    with psycopg.connect(database_url) as conn:
        logs = conn.execute(
            sql.SQL("SELECT run_id, started_at, completed_at FROM {} WHERE connection_id = %s").format(
                table("integration_sync_logs", schema)
            ),
            (connection.id,),
        ).fetchall()
    # Syncs of the two runs never overlapped in time.
    for run_a, start_a, end_a in logs:
        for run_b, start_b, end_b in logs:
            assert run_a == run_b or end_a <= start_b or end_b <= start_a
    assert sandbox.stripe_stats(key)["rate_limited"] == 0  # one client at a time, within the rate
