"""Accounting data that changes upstream ends up right in the mirror, through the real clients.

Voids, deletes and archives are flagged (Xero's VOIDED/DELETED/ARCHIVED, QuickBooks voids and hard
deletes from Change Data Capture, MYOB hard deletes through the id sweep); a spent day limit fails
with its reset time; a 90-day backfill of one connection runs through Dagster in one run and equals
the sandbox; and `nextcrm-pipelines connect` works end to end as a user would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, date
from decimal import Decimal

import dagster as dg
import httpx
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.assets import SINCE_TAG
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import DailyLimitExhausted
from nextcrm_pipelines.core.runner import day_window, sweep_connection, sync_partitions
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    CONTROLS,
    PROFILES,
    assert_mirror_equals_export,
    connect_account,
    free_port,
    mirror,
    register_app,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now


def sync_days(database_url, schema, account, days, entity=None) -> list:
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider(account.profile.provider),
                           entity_name=entity or account.profile.entity, connection_id=account.connection.id,
                           windows=[day_window(d) for d in days])  # fmt: skip


def backfill_and_change(database_url, schema, sandbox, account, **changes) -> tuple[dict, dict]:
    today = sandbox_now(sandbox).date()
    history = days_back(today, account.profile.tenant["days"] + 1)
    assert all(r.status == "success" for r in sync_days(database_url, schema, account, history))
    before = mirror(database_url, schema, account.profile.entity, account.connection.id)
    changed = account.control.changes(account.tenant_id, **changes)
    assert all(r.status == "success" for r in sync_days(database_url, schema, account, [today]))
    return before, changed


def test_xero_voids_deletes_and_archives_are_flagged(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PROFILES["xero_invoices"])
    before, changed = backfill_and_change(database_url, schema, sandbox, account, voids=3, deletes=3, edits=3)
    rows = assert_mirror_equals_export(account, database_url, schema)
    for rid in changed["voided"]:
        assert rows[rid]["status"] == "VOIDED" and rows[rid]["deleted"] and before[rid]["status"] == "AUTHORISED"
    for rid in changed["deleted"]:
        assert rows[rid]["status"] == "DELETED" and rows[rid]["deleted"]
    for rid in changed["edited"]:
        assert rows[rid]["source_updated_at"] > before[rid]["source_updated_at"]
    assert sum(r["type"] == "ACCPAY" for r in rows.values()) and sum(r["type"] == "ACCREC" for r in rows.values())
    assert all(isinstance(r["raw"].get("LineItems"), list) for r in rows.values())

    today = sandbox_now(sandbox).date()
    sync_days(database_url, schema, account, days_back(today, 7), entity="xero_contacts")
    archived = account.control.changes(account.tenant_id, archives=2)["archived"]
    sync_days(database_url, schema, account, [today], entity="xero_contacts")
    contacts = mirror(database_url, schema, "xero_contacts", account.connection.id)
    for rid in archived:
        assert contacts[rid]["status"] == "ARCHIVED" and contacts[rid]["deleted"]
    truth = {c["ContactID"] for c in account.export("contacts")["records"]}
    assert set(contacts) == truth  # archived contacts included


def test_quickbooks_voids_and_hard_deletes_are_flagged(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PROFILES["quickbooks_invoices"])
    before, changed = backfill_and_change(database_url, schema, sandbox, account, voids=2, deletes=3)
    rows = mirror(database_url, schema, account.profile.entity, account.connection.id)
    for rid in changed["voided"]:
        assert rows[rid]["status"] == "voided" and rows[rid]["deleted"] and rows[rid]["total"] == 0
    for rid in changed["deleted"]:
        row = rows[rid]
        # A hard delete leaves only a CDC stub: the row keeps what we knew and says it is gone.
        assert row["status"] == "deleted" and row["deleted"]
        assert row["doc_number"] == before[rid]["doc_number"] and row["total"] == before[rid]["total"]
        assert row["source_updated_at"] > before[rid]["source_updated_at"]
    assert set(changed["deleted"]) <= set(map(str, account.export()["deleted_ids"]))
    live = {str(r["Id"]) for r in account.export()["records"]}
    assert {rid for rid, row in rows.items() if not row["deleted"]} <= live


def test_myob_hard_deletes_are_found_by_the_id_sweep(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PROFILES["myob_invoices"])
    before, changed = backfill_and_change(database_url, schema, sandbox, account, deletes=3, voids=1, edits=2)
    rows = mirror(database_url, schema, account.profile.entity, account.connection.id)
    assert all(not rows[rid]["deleted"] for rid in changed["deleted"])  # MYOB leaves no trace to sync

    # The daily sweep job, as its schedule runs it.
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("myob_deletion_sweep").execute_in_process(instance=instance)
        assert result.success and result.output_for_node("myob_sweep_deletions") == 3
        swept = instance.fetch_materializations(dg.AssetKey("myob_invoices"), limit=20).records
    rows = assert_mirror_equals_export(account, database_url, schema)
    # Each partition holding a flagged row is materialised, with its own count of rows changed.
    flagged_days: dict[str, int] = {}
    for rid in changed["deleted"]:
        key = f"{account.connection.id}|{month_key(rows[rid]['source_updated_at'].astimezone(UTC).date())}"
        flagged_days[key] = flagged_days.get(key, 0) + 1
    assert {r.partition_key: r.asset_materialization.metadata["rows_changed"].value for r in swept} == flagged_days
    assert {r.asset_materialization.metadata["source"].value for r in swept} == {"deletion sweep"}
    for rid in changed["deleted"]:
        assert rows[rid]["deleted"] and rows[rid]["status"] == "Deleted"
        assert rows[rid]["number"] == before[rid]["number"]
    again = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("myob"),
                             entity_name="myob_invoices", connection_id=account.connection.id)  # fmt: skip
    assert again.counts.updated == 0
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL(
                "SELECT status, updated_records FROM {} WHERE partition = 'id-sweep' AND asset = 'myob_invoices' "
                "ORDER BY id"
            ).format(table("integration_sync_logs", schema))
        ).fetchall()
    assert logged == [("success", 3), ("success", 0)]


@pytest.mark.parametrize("entity", ["xero_invoices", "myob_invoices"])
def test_a_spent_day_limit_fails_at_once_with_the_reset_time(database_url, schema, box, sandbox, entity):
    account = connect_account(sandbox, database_url, box, PROFILES[entity], invoices=10, days=1)
    account.control.set_faults(tenant=account.tenant_id, day_limit_exhausted=True)
    try:
        today = sandbox_now(sandbox).date()
        started = time.monotonic()
        with pytest.raises(DailyLimitExhausted) as failure:
            sync_days(database_url, schema, account, days_back(today, 3))
    finally:
        account.control.clear_faults(tenant=account.tenant_id)
    assert time.monotonic() - started < 10
    message = str(failure.value)
    assert "daily request limit reached" in message
    if entity == "xero_invoices":
        assert "resets at" in message
    with psycopg.connect(database_url) as conn:
        statuses = conn.execute(
            sql.SQL("SELECT status FROM {} WHERE connection_id = %s").format(table("integration_sync_logs", schema)),
            (account.connection.id,),
        ).fetchall()
    assert statuses == [("failed",)]  # the first day failed; the others were not attempted


def test_a_90_day_backfill_runs_in_one_dagster_run_and_equals_the_sandbox(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PROFILES["xero_invoices"], invoices=900, contacts=40,
                              days=89)  # fmt: skip
    days = [d.isoformat() for d in days_back(sandbox_now(sandbox).date(), 89)]
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("xero"), [account.connection.id])
        result = defs.resolve_job_def("xero_sync").execute_in_process(
            instance=instance,
            tags={  # the months holding the 90 days, limited to those days
                "dagster/asset_partition_range_start": f"{account.connection.id}|{month_key(first)}",
                "dagster/asset_partition_range_end": f"{account.connection.id}|{month_key(last)}",
                SINCE_TAG: days[0],
            },
        )
        assert result.success
        assert len(instance.get_runs()) == 1
    assert_mirror_equals_export(account, database_url, schema)
    contacts = mirror(database_url, schema, "xero_contacts", account.connection.id)
    assert set(contacts) == {c["ContactID"] for c in account.export("contacts")["records"]}
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL("SELECT asset, count(*), count(DISTINCT run_id) FROM {} GROUP BY asset ORDER BY asset").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()
    assert logged == [("xero_contacts", 90, 1), ("xero_invoices", 90, 1), ("xero_payments", 90, 1)]
    amounts = mirror(database_url, schema, "xero_invoices", account.connection.id)
    assert all(isinstance(r["total"], Decimal) for r in amounts.values())


def test_connect_command_stores_one_connection_per_xero_organisation(database_url, schema, box, sandbox, tmp_path):
    control = CONTROLS["xero"](sandbox)
    client_id, secret = register_app(control)
    names = [control.add_tenant(client_id, seed=seed, invoices=5, contacts=5, days=1)["name"] for seed in (31, 32)]
    port = free_port()
    env = {**os.environ, "XERO_CLIENT_ID": client_id, "XERO_CLIENT_SECRET": secret,
           "XERO_REDIRECT_URI": f"http://localhost:{port}/callback", "DAGSTER_HOME": str(tmp_path)}  # fmt: skip
    command = [sys.executable, "-m", "nextcrm_pipelines.cli", "connect", "xero", "--base-url", f"{sandbox.url}/xero"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("http"):
            break
    url = lines[-1].strip()
    assert "code_challenge=" in url and "state=" in url and "offline_access" in url
    assert httpx.get(url, follow_redirects=True, timeout=30).status_code == 200
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert secret not in out
    with psycopg.connect(database_url) as conn:
        stored = vault.list_connections(conn, provider="xero")
        raw = conn.execute(
            sql.SQL("SELECT secrets_encrypted FROM {}").format(table("integration_connections", schema))
        ).fetchall()
    assert sorted(c.display_name for c in stored) == sorted(names)
    assert all(c.status == "active" and c.token_expires_at is not None for c in stored)
    assert all(secret not in row[0] for row in raw)
