"""The deployment surface: the embedded server, dagster.yaml on Postgres, per-connection exclusion."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.automation import WEBHOOK_APPLY_TAG
from nextcrm_pipelines.core import settings
from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, shared_buffers_mb, stop_embedded_postgres
from nextcrm_pipelines.core.runner import connection_lock


def test_embedded_server_is_reused_and_keeps_data_across_restarts():
    folder = Path(tempfile.mkdtemp(prefix="nextcrm-embedded-"))
    try:
        first = ensure_embedded_postgres(folder)
        assert ensure_embedded_postgres(folder) == first  # a running server is reused
        with psycopg.connect(first.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert stop_embedded_postgres(folder)
        again = ensure_embedded_postgres(folder)
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
            # Sized for backfills at every start, not Postgres's 128 MB default.
            buffers = "SELECT setting::bigint * current_setting('block_size')::int FROM pg_settings WHERE name = %s"
            assert conn.execute(buffers, ("shared_buffers",)).fetchone()[0] == shared_buffers_mb() * 1024 * 1024
            assert shared_buffers_mb() > 128  # this machine has more than 1 GB of memory
    finally:
        stop_embedded_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def project_instance(database_url: str, monkeypatch: pytest.MonkeyPatch):
    """A Dagster instance built from the project's dagster.yaml, storage in a schema of its own."""
    storage_schema = f"dagster_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(storage_schema)))
    url = settings.dagster_storage_url(database_url).replace("search_path%3Ddagster", f"search_path%3D{storage_schema}")
    artifacts = tempfile.mkdtemp(prefix="nextcrm-dagster-")
    monkeypatch.setenv("NEXTCRM_DAGSTER_STORAGE_URL", url)
    monkeypatch.setenv("NEXTCRM_DAGSTER_ARTIFACTS", artifacts)
    monkeypatch.setenv("NEXTCRM_DAGSTER_COMPUTE_LOGS", artifacts + "/logs")
    try:
        yield lambda: dg.DagsterInstance.from_config(str(settings.PROJECT_ROOT))
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(storage_schema)))
        shutil.rmtree(artifacts, ignore_errors=True)


def test_dagster_yaml_stores_runs_in_postgres_and_limits_runs_per_connection(project_instance):
    instance = project_instance()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    for key in ("dagster/partition/connection", "dagster/partition"):  # connection x day, and connection-only
        assert {"key": key, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    # One webhook apply run per provider at a time: the job carries the tag the limit counts.
    assert {"key": WEBHOOK_APPLY_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    from nextcrm_pipelines.definitions import defs

    assert defs.resolve_job_def("stripe_apply_webhooks").tags[WEBHOOK_APPLY_TAG] == "stripe"
    instance.add_dynamic_partitions("stripe_connections", ["stripe-acme"])
    run = instance.create_run_for_job(dg.GraphDefinition(name="noop", node_defs=[]).to_job(), run_id=None)
    instance.report_engine_event("stored in Postgres", run)
    instance.dispose()
    restarted = project_instance()  # a new process would read the same storage
    assert restarted.get_run_by_id(run.run_id) is not None
    assert any(e.message == "stored in Postgres" for e in restarted.all_logs(run.run_id))
    assert restarted.get_dynamic_partitions("stripe_connections") == ["stripe-acme"]
    restarted.dispose()


def test_syncs_of_one_connection_never_overlap(database_url):
    order: list[str] = []

    def hold(connection_id: str, label: str) -> None:
        with psycopg.connect(database_url) as conn, connection_lock(conn, connection_id):
            order.append(label)

    with psycopg.connect(database_url) as conn, connection_lock(conn, "stripe-shared"):
        waiter = threading.Thread(target=hold, args=("stripe-shared", "second"))
        waiter.start()
        time.sleep(0.5)
        hold("stripe-other", "other")  # other connections are not blocked
        order.append("first done")
    waiter.join(timeout=10)
    assert order == ["other", "first done", "second"]


def test_a_connection_of_the_same_id_in_another_schema_is_another_lock(database_url, monkeypatch):
    from nextcrm_pipelines.core.runner import ConnectionBusy

    monkeypatch.setenv("NEXTCRM_DB_SCHEMA", "deployment_a")
    with (
        psycopg.connect(database_url) as conn,
        connection_lock(conn, "stripe-acme"),
        psycopg.connect(database_url) as other,
    ):
        with pytest.raises(ConnectionBusy), connection_lock(other, "stripe-acme", wait=False):  # the same deployment
            pass
        monkeypatch.setenv("NEXTCRM_DB_SCHEMA", "deployment_b")  # another deployment in the same database
        with connection_lock(other, "stripe-acme", wait=False):
            pass
