"""The code location: its snapshot, runs through Dagster, the schedule and the connections sensor."""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.assets import SINCE_TAG
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
from nextcrm_pipelines_tests.helpers import charges_by_id, days_back, expected_charges, sandbox_now

SNAPSHOT = Path(__file__).with_name("code_location_snapshot.json")


def _describe(partitions: dg.PartitionsDefinition) -> str:
    if isinstance(partitions, dg.DynamicPartitionsDefinition):
        return f"DynamicPartitionsDefinition:{partitions.name}"
    return f"{type(partitions).__name__}:{partitions.cron_schedule}:{partitions.timezone}"


def code_location_snapshot() -> dict:
    repo = defs.get_repository_def()
    assets = {}
    for key, asset in sorted(repo.assets_defs_by_key.items(), key=lambda kv: kv[0].to_user_string()):
        partitions = asset.partitions_def
        dims = partitions.partitions_defs if isinstance(partitions, dg.MultiPartitionsDefinition) else []
        assets[key.to_user_string()] = {
            "group": asset.group_names_by_key[key],
            "partitions": {d.name: _describe(d.partitions_def) for d in dims} or {"connection": _describe(partitions)},
            "backfill_policy": str(asset.backfill_policy.policy_type.value) if asset.backfill_policy else None,
            "retry_policy": bool(asset.op.retry_policy) if asset.is_executable else None,
        }  # fmt: skip
    return {
        "assets": assets,
        "asset_checks": sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in repo.asset_checks_defs_by_key),
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "schedules": {s.name: s.cron_schedule for s in repo.schedule_defs},
        "sensors": sorted(s.name for s in repo.sensor_defs),
    }


def test_code_location_matches_its_snapshot():
    current = code_location_snapshot()
    assert current == json.loads(SNAPSHOT.read_text()), (
        "the code location changed; if intended, update the snapshot:\n" + json.dumps(current, indent=2)
    )


def _materialize(instance: dg.DagsterInstance, connection_id: str, day: str) -> dg.ExecuteInProcessResult:
    """The month partition holding `day`, synced from `day` on (a run limited by `nextcrm/since`)."""
    return defs.resolve_job_def("stripe_sync").execute_in_process(
        instance=instance,
        partition_key=dg.MultiPartitionKey({"connection": connection_id, "month": month_key(date.fromisoformat(day))}),
        tags={SINCE_TAG: day},
        raise_on_error=False,
    )


def _rows_in_month(database_url: str, schema: str, connection_id: str, day: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE connection_id = %s AND date_trunc('month', created_at AT TIME "
                    "ZONE 'UTC') = date_trunc('month', %s::date)").format(table("stripe_payments", schema)),
            (connection_id, day),
        ).fetchone()[0]  # fmt: skip


def _all_event_text(instance: dg.DagsterInstance, run_id: str) -> str:
    records = instance.all_logs(run_id)
    return "\n".join(dg.serialize_value(r) for r in records)


def test_a_partition_materialises_through_dagster_with_metadata_and_no_secret_anywhere(
    database_url, schema, sandbox, stripe_account, stripe_connection, caplog
):
    key = stripe_account(charges=300, subscriptions=20, days=2)
    connection = stripe_connection(key)
    today = sandbox_now(sandbox).date().isoformat()
    caplog.set_level(logging.DEBUG)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        result = _materialize(instance, connection.id, today)
        assert result.success
        materialization = result.asset_materializations_for_node("stripe_payments")[0]
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        assert metadata["records"] >= metadata["inserted"] > 0  # records read include the events feed
        assert {"requests", "retries", "rate_limit_waits", "window", "duration_seconds"} <= set(metadata)
        run = instance.get_run_by_id(result.run_id)
        texts = [_all_event_text(instance, result.run_id), json.dumps(run.run_config), caplog.text]
        assert all(key not in text for text in texts)
    mirrored, truth = charges_by_id(database_url, schema), expected_charges(sandbox, key)
    created_today = {c["id"] for c in sandbox.stripe_export(key, "charges")
                     if datetime.fromtimestamp(c["created"], UTC).date().isoformat() == today}  # fmt: skip
    assert created_today and created_today <= set(mirrored)
    # The partition is the month: its row count is what the table holds for that month.
    assert metadata["dagster/row_count"] == _rows_in_month(database_url, schema, connection.id, today) > 0
    assert all(truth[record_id] == values for record_id, values in mirrored.items())
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT t::text FROM {} t").format(table("integration_connections", schema))
        ).fetchone()[0]
        logs = conn.execute(
            sql.SQL("SELECT status, total_records, run_id FROM {} WHERE asset = 'stripe_payments'").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()
    assert key not in stored and key[8:] not in stored
    assert logs == [("success", metadata["records"], result.run_id)]
    assert metadata["inserted"] == len(mirrored)


def test_a_wrong_key_fails_the_run_without_retrying_and_leaks_nothing(database_url, schema, sandbox, stripe_connection):
    bad_key = "sk_test_definitely_not_valid_98765"
    connection = stripe_connection(bad_key, name="Broken")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        result = _materialize(instance, connection.id, sandbox_now(sandbox).date().isoformat())
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.step_failure_data.error.message
        assert "stripe connection 'stripe-broken'" in message and "HTTP 401" in message
        assert bad_key not in _all_event_text(instance, result.run_id)
        assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def _hourly_requests(instance: dg.DagsterInstance, when: datetime) -> list[dg.RunRequest]:
    schedule = defs.resolve_schedule_def("stripe_hourly")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=when,
        resources={"mirror": defs.resources["mirror"]},
        repository_def=defs.get_repository_def(),
    ) as context:
        return list(schedule.evaluate_tick(context).run_requests or [])


def test_hourly_schedule_syncs_active_connections_in_blocks_over_recent_days(
    database_url, schema, stripe_connection, monkeypatch
):
    from nextcrm_pipelines.core import connections as vault

    monkeypatch.setenv("NEXTCRM_CONNECTIONS_PER_RUN", "2")
    names = ["Alpha", "Beta", "Off One", "Gamma", "Off Two"]
    made = {name: stripe_connection(f"sk_test_{n}", name=name) for n, name in enumerate(names)}
    with psycopg.connect(database_url) as conn:
        for name in ("Off One", "Off Two"):
            vault.set_status(conn, made[name].id, "disabled")
    ids = [made[name].id for name in names]
    when = datetime(2026, 11, 26, 14, 7, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), ids)
        requests = _hourly_requests(instance, when)
        partitions = defs.get_assets_def("stripe_payments").partitions_def
        covered = [
            partitions.get_partition_keys_in_range(
                dg.PartitionKeyRange(r.tags["dagster/asset_partition_range_start"],
                                     r.tags["dagster/asset_partition_range_end"]),
                dynamic_partitions_store=instance,
            )
            for r in requests
        ]  # fmt: skip
    # Blocks of two partitions in Dagster's order: (Alpha, Beta), (Off One, Gamma) -> Gamma alone, (Off Two) -> none.
    # The recent days (the 24th to the 26th) lie in one month: its partition; the run syncs only those days.
    assert [sorted(keys) for keys in covered] == [sorted(f"{c}|2026-11-01" for c in ids[:2]), [f"{ids[3]}|2026-11-01"]]
    assert all(r.tags["nextcrm/scope"] == "recent" and r.partition_key is None for r in requests)
    assert [r.run_key for r in requests] == [f"{ids[0]}..{ids[1]}|2026-11-26T14", f"{ids[3]}..{ids[3]}|2026-11-26T14"]


def test_a_recent_scope_run_syncs_today_and_only_the_recent_days_not_held_whole(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    from nextcrm_pipelines.assets import RECENT_SCOPE, SCOPE_TAG

    key = stripe_account(charges=300, subscriptions=10, days=4)
    connection = stripe_connection(key)
    days = [d.isoformat() for d in days_back(datetime.now(UTC).date(), 2)]
    tags = {
        SCOPE_TAG: RECENT_SCOPE,
        "dagster/asset_partition_range_start": f"{connection.id}|{month_key(date.fromisoformat(days[0]))}",
        "dagster/asset_partition_range_end": f"{connection.id}|{month_key(date.fromisoformat(days[-1]))}",
    }

    def synced_days(run_id: str) -> list[str]:
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                sql.SQL("SELECT window_start FROM {} WHERE run_id = %s AND asset = 'stripe_payments' ORDER BY 1")
                .format(table("integration_sync_logs", schema)), (run_id,),
            ).fetchall()  # fmt: skip
        return [row[0].astimezone(UTC).date().isoformat() for row in rows]

    job = defs.resolve_job_def("stripe_sync")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        first = job.execute_in_process(instance=instance, tags=tags)
        assert synced_days(first.run_id) == days  # nothing held yet: every day is read
        # The day before yesterday's sync saw it only in part (a provider's reporting lag, say).
        with psycopg.connect(database_url) as conn:
            conn.execute(
                sql.SQL("UPDATE {} SET window_end = window_start + interval '20 hours' "
                        "WHERE run_id = %s AND window_start = %s").format(table("integration_sync_logs", schema)),
                (first.run_id, datetime.fromisoformat(f"{days[0]}T00:00:00+00:00")),
            )  # fmt: skip
        second = job.execute_in_process(instance=instance, tags=tags)
    # Yesterday's sync began after it ended and saw all of it; today is always read again.
    assert synced_days(second.run_id) == [days[0], days[2]]
    first_day = datetime.fromisoformat(f"{days[0]}T00:00:00+00:00").timestamp()
    in_range = {c["id"] for c in sandbox.stripe_export(key, "charges") if c["created"] >= first_day}
    stored, expected = charges_by_id(database_url, schema), expected_charges(sandbox, key)
    # Every charge created in the range, and any older one today's events feed changed, as the provider has it.
    assert in_range <= stored.keys() and {id_: expected[id_] for id_ in stored} == stored


def test_connections_sensor_adds_partitions_for_rows_added_by_any_means(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} (id, provider, display_name) VALUES ('stripe-from-sql', 'stripe', 'From SQL')")
            .format(table("integration_connections", schema))
        )  # fmt: skip
    sensor = defs.resolve_sensor_def("connections_sensor")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), ["stripe-gone"])
        context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
        result = sensor(context)
    requests = {type(r).__name__: r.partition_keys for r in result.dynamic_partitions_requests}
    assert requests == {
        "AddDynamicPartitionsRequest": ["stripe-from-sql"],
        "DeleteDynamicPartitionsRequest": ["stripe-gone"],
    }


def test_a_date_range_backfills_in_one_run(database_url, schema, sandbox, stripe_account, stripe_connection):
    key = stripe_account(charges=200, subscriptions=20, days=3)
    connection = stripe_connection(key)
    days = [d.isoformat() for d in days_back(sandbox_now(sandbox).date(), 3)]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        result = defs.resolve_job_def("stripe_sync").execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": f"{connection.id}|{month_key(date.fromisoformat(days[0]))}",
                "dagster/asset_partition_range_end": f"{connection.id}|{month_key(date.fromisoformat(days[-1]))}",
            },
        )
        assert result.success
    assert charges_by_id(database_url, schema) == expected_charges(sandbox, key)
    with psycopg.connect(database_url) as conn:
        windows = conn.execute(
            sql.SQL("SELECT window_start, partition, run_id FROM {} WHERE asset = 'stripe_payments'").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()
    # Every day of the months, through today, each synced and logged once, in one run.
    first = date.fromisoformat(days[0]).replace(day=1)
    assert sorted(w.date() for w, _, _ in windows) == [
        first + timedelta(days=n) for n in range((date.fromisoformat(days[-1]) - first).days + 1)
    ]
    assert {p for _, p, _ in windows} == {f"{connection.id}|{month_key(date.fromisoformat(d))}" for d in days}
    assert len({run for _, _, run in windows}) == 1


def test_registry_names_each_provider_by_its_package_and_loads_only_the_one_asked_for():
    from nextcrm_pipelines.providers import PROVIDER_NAMES, PROVIDERS, get_provider

    assert sorted(PROVIDERS) == sorted(PROVIDER_NAMES)
    assert all(get_provider(name).name == name for name in PROVIDER_NAMES)
    with pytest.raises(KeyError, match="known: billionmail, mautic"):
        get_provider("nosuch")
    # A backfill's helper process asks for one provider; the others stay unimported.
    probe = (
        "import json, sys\n"
        "from nextcrm_pipelines.providers import get_provider\n"
        "get_provider('stripe')\n"
        "prefix = 'nextcrm_pipelines.providers.'\n"
        "print(json.dumps(sorted({m[len(prefix):].split('.')[0] for m in sys.modules if m.startswith(prefix)})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["stripe"]


def test_the_package_imports_only_dagsters_public_modules():
    package = Path(__file__).resolve().parents[1] / "nextcrm_pipelines"
    private = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            private += [
                f"{path.relative_to(package)}:{node.lineno} {m}" for m in modules if re.match(r"dagster\w*\._", m)
            ]
    assert private == []


# Dagster's own, which the code location cannot avoid: building a resource without config fields (the
# mirror's settings come from the environment) reads pydantic's deprecated `__fields__` (dagster_shared's
# `model_fields` takes the empty `model_fields` for missing). A DeprecationWarning: Python hides it by default.
DAGSTER_OWN_WARNING = r"The `__fields__` attribute is deprecated"

# Loads the code location in a fresh interpreter (import-time warnings included) with every warning an
# error, then resolves each job, schedule and sensor the way the CLI, the tests and the daemon reach them.
LOAD_WITHOUT_WARNINGS = f"""
import warnings
warnings.simplefilter("error")
warnings.filterwarnings("ignore", message={DAGSTER_OWN_WARNING!r}, category=DeprecationWarning)
import dagster as dg
from nextcrm_pipelines.definitions import defs
dg.Definitions.validate_loadable(defs)
repository = defs.get_repository_def()
for job in repository.get_all_jobs():
    defs.resolve_job_def(job.name)
for schedule in repository.schedule_defs:
    defs.resolve_schedule_def(schedule.name)
for sensor in repository.sensor_defs:
    defs.resolve_sensor_def(sensor.name)
"""


def test_loading_and_resolving_the_code_location_warns_nothing():
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_WARNINGS], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stderr == ""


def test_an_apply_run_claims_at_most_the_events_its_config_allows(database_url, schema, box):
    from nextcrm_pipelines.automation import ApplyWebhooksConfig
    from nextcrm_pipelines_tests.test_webhook_inbox import charge, insert_event, stripe_connection, stripe_event
    from nextcrm_pipelines_tests.webhook_helpers import inbox_rows

    connection_id = stripe_connection(database_url, box)
    with psycopg.connect(database_url) as conn:
        for n in range(3):
            insert_event(conn, schema, connection_id, stripe_event(f"evt_cfg{n}", charge(f"ch_cfg{n}", 100 + n)))
    job = defs.resolve_job_def("stripe_apply_webhooks")
    with dg.instance_for_test() as instance:
        limited = dg.RunConfig(ops={"stripe_apply_inbox": ApplyWebhooksConfig(max_events=2)})
        first = job.execute_in_process(instance=instance, run_config=limited)
        assert first.output_for_node("stripe_apply_inbox") == 2
        assert [r[2] for r in inbox_rows(database_url, schema)] == ["processed", "processed", "pending"]
        rest = job.execute_in_process(instance=instance)  # the default: the run limit
        assert rest.output_for_node("stripe_apply_inbox") == 1
    assert [r[2] for r in inbox_rows(database_url, schema)] == ["processed"] * 3


def test_a_partitions_log_line_reads_as_a_sentence_not_a_dict(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    connection = stripe_connection(stripe_account(charges=40, subscriptions=4, days=1))
    today = sandbox_now(sandbox).date().isoformat()
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        result = _materialize(instance, connection.id, today)
        assert result.success
        lines = [r.user_message for r in instance.all_logs(result.run_id) if r.level == logging.INFO]
    (line,) = [text for text in lines if text.startswith(f"{today} stripe_payments: ")]
    pattern = r"(\d+) records \((\d+) new(, \d+ unchanged)?\), (\d+) requests, [\d.]+ s"
    assert re.fullmatch(pattern, line.split(": ", 1)[1]), line


def test_each_asset_shows_its_tables_columns_as_the_database_has_them(database_url, schema):
    repo = defs.get_repository_def()
    with psycopg.connect(database_url) as conn:
        for key, asset in repo.assets_defs_by_key.items():
            if not asset.is_executable:  # a connection health asset: observed, it holds no table
                continue
            metadata = asset.metadata_by_key[key]
            table_name = metadata["table"]
            stored = [
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                    "ORDER BY ordinal_position",
                    (schema, table_name),
                )
            ]
            assert [c.name for c in metadata["dagster/column_schema"].columns] == stored, table_name
            assert metadata["dagster/table_name"].endswith(f".{table_name}")


def test_an_hourly_tick_with_nothing_to_sync_names_each_connection_and_what_brings_it_back(
    database_url, schema, stripe_connection
):
    from nextcrm_pipelines.core import connections as vault

    expired = stripe_connection("sk_test_expired", name="Expired Key")
    off = stripe_connection("sk_test_off", name="Switched Off")
    with psycopg.connect(database_url) as conn:
        vault.set_status(conn, expired.id, "needs_reauth", "HTTP 401")
        vault.set_status(conn, off.id, "disabled")
    schedule = defs.resolve_schedule_def("stripe_hourly")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [expired.id, off.id])
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime(2026, 11, 26, 14, 7, tzinfo=UTC),
            resources={"mirror": defs.resources["mirror"]},
            repository_def=defs.get_repository_def(),
        ) as context:
            result = schedule.evaluate_tick(context)
    assert not result.run_requests
    assert result.skip_message.startswith("no stripe connection to sync: ")
    assert f"{expired.id}: needs_reauth, store working credentials with `nextcrm-pipelines connections set-secret " \
        f"{expired.id}`" in result.skip_message  # fmt: skip
    assert f"{off.id}: disabled, enable it with `nextcrm-pipelines connections enable {off.id}`" in result.skip_message
