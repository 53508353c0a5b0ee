"""Connection health in the Dagster UI, the one command that fixes a connection, and the partitions the
connections sensor keeps.

The sensor's ticks are evaluated as the daemon evaluates them, and what they return is recorded in a real
Dagster instance the way the daemon records it (asset events, then partition requests); syncs run through
Dagster against the sandbox, and the fixes run through the CLI or the OAuth flow they name.
"""

from __future__ import annotations

import re
import shlex
import uuid
from datetime import date

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from nextcrm_pipelines.assets import SINCE_TAG
from nextcrm_pipelines.cli import main
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.health import HEALTH_CHECK, health_asset_key
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    connect_account,
    consent,
    expire_stored_token,
    free_port,
    stored_secrets,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days

STRIPE = health_asset_key("stripe")
CHECK = dg.AssetCheckKey(STRIPE, HEALTH_CHECK)


def tick(instance: dg.DagsterInstance, cursor: str | None = None):
    """One evaluation of the connections sensor, recorded as the daemon records it."""
    sensor = defs.resolve_sensor_def("connections_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mirror": defs.resources["mirror"]})
    data = sensor.evaluate_tick(context)
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    for request in data.dynamic_partitions_requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return data


def observations(data, connection_id: str) -> list[dg.AssetObservation]:
    return [e for e in data.asset_events if isinstance(e, dg.AssetObservation) and e.partition == connection_id]


def checks(data, asset_key: dg.AssetKey = STRIPE) -> list[dg.AssetCheckEvaluation]:
    return [e for e in data.asset_events if isinstance(e, dg.AssetCheckEvaluation) and e.asset_key == asset_key]


def latest_health(instance: dg.DagsterInstance, connection_id: str) -> dict[str, object]:
    """The metadata of the connection's latest observation, as the UI reads it from the instance."""
    (record,) = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=STRIPE, asset_partitions=[connection_id]), limit=1
    ).records
    return {name: value.value for name, value in record.asset_observation.metadata.items()}


def latest_check(instance: dg.DagsterInstance) -> dg.AssetCheckEvaluation:
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([CHECK])[CHECK]
    return record.event.dagster_event.event_specific_data


def connection_rows(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(table("integration_connections", schema))
        ).fetchone()[0]


def sync_month(instance: dg.DagsterInstance, connection_id: str, day: date) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def("stripe_sync").execute_in_process(
        instance=instance,
        partition_key=dg.MultiPartitionKey({"connection": connection_id, "month": month_key(day)}),
        tags={SINCE_TAG: day.isoformat()},
        raise_on_error=False,
    )


def test_a_refused_key_shows_in_the_ui_with_the_command_that_fixes_it_and_set_secret_brings_it_back(
    database_url, schema, box, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=20, subscriptions=3, days=2)
    wrong = f"sk_test_wrong_{uuid.uuid4().hex}"
    connection = stripe_connection(wrong, name=f"Health {uuid.uuid4().hex[:8]}")
    today = sandbox_now(sandbox).date()
    fix = f"nextcrm-pipelines connections set-secret {connection.id}"
    with dg.instance_for_test() as instance:
        first = tick(instance)
        assert [o.metadata["status"].value for o in observations(first, connection.id)] == ["active"]
        assert [c.passed for c in checks(first)] == [True]

        failed = sync_month(instance, connection.id, today)
        assert not failed.success

        second = tick(instance, first.cursor)
        (observed,) = observations(second, connection.id)
        health = latest_health(instance, connection.id)
        assert health["display_name"] == connection.display_name
        assert (health["status"], health["sync_status"], health["fix"]) == ("needs_reauth", "failed", fix)
        assert "HTTP 401" in health["last_error"] and "set-secret" not in health["last_error"]
        assert wrong not in str(observed) and wrong[-6:] not in str(observed)
        (evaluation,) = checks(second)
        assert latest_check(instance) == evaluation
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.metadata["needs_reauth"].value == 1
        assert f"{connection.id} ({connection.display_name}): needs_reauth, fix with `{fix}`" in (
            evaluation.metadata["need_action"].value
        )

        # Nothing changed: nothing is written, whether the sensor kept its cursor or lost it.
        assert tick(instance, second.cursor).asset_events == []
        assert not any(isinstance(e, dg.AssetObservation) for e in tick(instance).asset_events)

        # The stored error names its fix once; following it updates this connection, it adds none.
        with psycopg.connect(database_url) as conn:
            stored = vault.get_connection(conn, connection.id)
        assert stored.last_error.endswith(f"; store working credentials with `{fix}`")
        assert stored.last_error.count("nextcrm-pipelines") == 1
        rows = connection_rows(database_url, schema)
        outcome = CliRunner().invoke(main, shlex.split(fix)[1:], env={"STRIPE_SECRET_KEY": key},
                                     catch_exceptions=False)  # fmt: skip
        assert outcome.exit_code == 0, outcome.output
        assert f"stored new credentials for {connection.id}" in outcome.output and "is active" in outcome.output
        assert key not in outcome.output
        assert connection_rows(database_url, schema) == rows
        with psycopg.connect(database_url) as conn:
            fixed = vault.get_connection(conn, connection.id)
            assert vault.load_secrets(conn, connection.id, box)["api_key"] == key
        assert (fixed.status, fixed.last_error, fixed.display_name) == ("active", None, connection.display_name)

        assert sync_month(instance, connection.id, today).success
        third = tick(instance, second.cursor)
        assert len(observations(third, connection.id)) == 1
        health = latest_health(instance, connection.id)
        assert (health["status"], health["sync_status"], health["fix"]) == ("active", "success", "nothing to fix")
        assert health["last_error"] == ""
        (evaluation,) = checks(third)
        assert evaluation.passed and latest_check(instance).passed


def test_the_check_executed_from_the_ui_lists_what_needs_action(database_url, schema, stripe_connection):
    broken = stripe_connection("sk_test_broken", name="Broken Key")
    off = stripe_connection("sk_test_off", name="Switched Off")
    with psycopg.connect(database_url) as conn:
        # A live-mode-shaped key, assembled here so no key-shaped literal sits in the repository.
        key = "_".join(("sk", "live", "abcdef123456"))
        vault.set_status(conn, broken.id, "needs_reauth", f"HTTP 401 for ops@example.com with {key}")
        vault.set_status(conn, off.id, "disabled")
    job = dg.define_asset_job("health_checks", selection=dg.AssetSelection.checks(CHECK))
    checked = dg.Definitions.merge(defs, dg.Definitions(jobs=[job]))
    with dg.instance_for_test() as instance:
        result = checked.resolve_job_def("health_checks").execute_in_process(instance=instance)
        (evaluation,) = result.get_asset_check_evaluations()
        observed = tick(instance)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    listed = evaluation.metadata["need_action"].value.splitlines()
    assert listed == [
        f"{broken.id} (Broken Key): needs_reauth, fix with `nextcrm-pipelines connections set-secret {broken.id}`",
        f"{off.id} (Switched Off): disabled, fix with `nextcrm-pipelines connections enable {off.id}`",
    ]
    # A stored error reaches the UI without the addresses or key-shaped strings it might hold.
    (health,) = observations(observed, broken.id)
    error = health.metadata["last_error"].value
    assert "HTTP 401" in error and "ops@example.com" not in error and "abcdef123456" not in error


def test_connections_list_names_each_connection_with_the_one_command_that_fixes_it(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        refused = vault.add_connection(conn, provider="stripe", display_name="Refused Ltd",
                                       secrets={"api_key": "sk_test_x"}, box=box)  # fmt: skip
        off = vault.add_connection(conn, provider="billionmail", display_name="Newsletters", box=box,
                                   secrets={"username": "u", "password": "p"}, base_url="http://mail.test")  # fmt: skip
        vault.add_connection(conn, provider="stripe", display_name="Fine Co", secrets={"api_key": "sk_test_y"}, box=box)
        # An error stored before errors held one hint: two hints, neither of which fixed this row.
        legacy = (
            "HTTP 401: Invalid API Key; store a valid key with `nextcrm-pipelines connections add stripe`; "
            'store a working key with `nextcrm-pipelines connections add stripe --name "Refused Ltd"`'
        )
        vault.set_status(conn, refused.id, "needs_reauth", legacy)
        vault.set_status(conn, off.id, "disabled")
        conn.commit()
    listed = CliRunner().invoke(main, ["connections", "list"], catch_exceptions=False).output.splitlines()
    assert re.match(r"id\s+name\s+provider\s+status\s+last sync\s+last synced at\s+error / fix$", listed[0])
    rows = {line.split()[0]: line for line in listed[1:]}
    assert "Refused Ltd" in rows[refused.id] and "Newsletters" in rows[off.id] and "Fine Co" in rows["stripe-fine-co"]
    assert rows[refused.id].endswith(
        "HTTP 401: Invalid API Key; store working credentials with "
        f"`nextcrm-pipelines connections set-secret {refused.id}`"
    )
    assert rows[off.id].endswith(f"enable it with `nextcrm-pipelines connections enable {off.id}`")
    assert all(line.count("nextcrm-pipelines") <= 1 for line in listed[1:])


def test_set_secret_refuses_a_connection_authorised_in_a_browser(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        books = vault.add_connection(conn, provider="xero", display_name="Books", secrets={"refresh_token": "r"},
                                     box=box, external_tenant="t-1", settings={"token_group": "xero:1"})  # fmt: skip
    outcome = CliRunner().invoke(main, ["connections", "set-secret", books.id])
    assert outcome.exit_code != 0
    assert "re-authorise it with `nextcrm-pipelines connect xero --name Books`" in outcome.output


def test_connecting_again_as_the_hint_says_updates_the_same_connection(database_url, schema, box, sandbox):
    """The OAuth hint reconnects the connection's own row, found by its tenant, even when its id no longer
    follows from its name (renamed in the CRM, or created by it)."""
    profile = PROFILES["xero_invoices"]
    account = connect_account(sandbox, database_url, box, profile, invoices=3, contacts=3, days=1)
    renamed = f"Renamed {uuid.uuid4().hex[:6]}"
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("UPDATE {} SET display_name = %s WHERE id = %s").format(
            table("integration_connections", schema)), (renamed, account.connection.id))  # fmt: skip
    account.revoke()
    expire_stored_token(database_url, box, account.connection.id)
    with pytest.raises(AuthenticationFailed):
        sync_days(
            database_url, schema, account.connection.id, profile.entity, days_back(sandbox_now(sandbox).date(), 0)
        )
    with psycopg.connect(database_url) as conn:
        refused = vault.get_connection(conn, account.connection.id)
    (command,) = re.findall(r"`(nextcrm-pipelines [^`]+)`", refused.last_error)
    args = shlex.split(command)
    assert args[:3] == ["nextcrm-pipelines", "connect", "xero"]
    options = dict(zip(args[3::2], args[4::2], strict=True))
    assert options == {"--name": renamed, "--base-url": f"{sandbox.url}/xero"}
    rows = connection_rows(database_url, schema)

    provider = get_provider("xero")
    (reconnected,) = connect(
        spec=provider.oauth, discover=provider.discover_tenants,
        app=OAuthApp(account.client_id, account.client_secret, f"http://127.0.0.1:{free_port()}/callback"),
        database_url=database_url, box=box, base_url=options["--base-url"], name=options["--name"], on_url=consent,
        extra_authorize_params={"sandbox_tenant": account.tenant_id},
    )  # fmt: skip
    assert connection_rows(database_url, schema) == rows
    assert (reconnected.id, reconnected.display_name, reconnected.status) == (account.connection.id, renamed, "active")
    assert reconnected.last_error is None and reconnected.settings["requests_per_second"] == 0
    assert stored_secrets(database_url, box, account.connection.id)["refresh_token"]
    (result,) = sync_days(database_url, schema, account.connection.id, profile.entity,
                          days_back(sandbox_now(sandbox).date(), 0))  # fmt: skip
    assert result.status == "success"


def test_the_sensor_removes_a_typed_partition_and_says_why(database_url, schema, stripe_connection, capfd):
    kept = stripe_connection("sk_test_kept", name="Kept")
    name = connections_partitions_name("stripe")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(name, ["typo-123"])
        data = tick(instance)
        assert set(instance.get_dynamic_partitions(name)) == {kept.id}
        quiet = tick(instance, data.cursor)
    removed = (f"removed partition(s) 'typo-123' from {name}: no such stripe connection; add connections with "
               "`nextcrm-pipelines connections add` or `connect`, not the partition dialog")  # fmt: skip
    added = f"added 1 partition(s) to {name} for new connections: '{kept.id}'"
    assert removed in data.skip_message and added in data.skip_message
    logged = capfd.readouterr().err
    assert removed in logged and added in logged
    assert quiet.skip_message == "no change (1 connection(s))" and quiet.asset_events == []
