"""Schedules and sensors built from the registry.

- `<provider>_hourly`: re-syncs today's partition of every active connection, every hour, and the
  recent days a sync has not yet covered whole (see `incompletely_covered_days`).
- `<provider>_daily_sweep`: for providers that hard-delete without a trace (MYOB), compares id sets
  once a day and flags the rows whose record is gone.
- `<provider>_webhooks_sensor` and `<provider>_apply_webhooks`: verified inbox events applied soon after
  they arrive (providers whose events carry what the tables need).
- `connections_sensor`: keeps each provider's dynamic connection partitions equal to the rows of
  `integration_connections`, so a connection added by any means (CLI, the CRM app, SQL) appears.
"""

import os
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field

from nextcrm_pipelines.assets import describe_sync
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import sweep_connection
from nextcrm_pipelines.core.sweep import SWEEP_PARTITION
from nextcrm_pipelines.partitions import connections_partitions_name
from nextcrm_pipelines.resources import MirrorDatabase
from nextcrm_pipelines.webhooks.inbox import apply_pending, due_batch


def sync_job_name(provider: str) -> str:
    return f"{provider}_sync"


def build_sync_job(provider: Provider):
    """The asset job that materialises every entity of the provider (its partitions are its assets' own).
    Definitions resolves it into a job; callers take that with `defs.resolve_job_def`."""
    return dg.define_asset_job(
        sync_job_name(provider.name),
        selection=dg.AssetSelection.groups(provider.name),
        description=f"Sync every {provider.name} entity for one connection"
        + (" x day." if provider.daily else " (the whole list)."),
    )


def build_hourly_schedule(provider: Provider) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{provider.name}_hourly",
        cron_schedule="7 * * * *",
        job_name=sync_job_name(provider.name),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-sync today's partition of every active {provider.name} connection, and recent days"
        " not yet covered whole.",
    )
    def _hourly(context: dg.ScheduleEvaluationContext, mirror: MirrorDatabase):
        scheduled = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
        today = scheduled.date()
        with psycopg.connect(mirror.url()) as conn:
            active = vault.list_connections(conn, provider=provider.name, status="active")
            unfinished = {c.id: incompletely_covered_days(conn, c.id, today) for c in active} if provider.daily else {}
        for connection in active:
            if not provider.daily:
                yield dg.RunRequest(run_key=f"{connection.id}|{scheduled:%Y-%m-%dT%H}", partition_key=connection.id)
                continue
            for day in [*unfinished[connection.id], today]:
                yield dg.RunRequest(
                    run_key=f"{connection.id}|{day}|{scheduled:%Y-%m-%dT%H}",
                    partition_key=dg.MultiPartitionKey({"connection": connection.id, "date": day.isoformat()}),
                )

    return _hourly


def incompletely_covered_days(conn: psycopg.Connection, connection_id: str, today: date, back: int = 2) -> list[date]:
    """Recent days (of the `back` before `today`) that some entity does not yet hold whole, which the hourly
    schedule re-reads until a sync covers them: the day's latest finished sync of the entity lost records
    (`partial`) or failed, or its syncs so far saw only part of the day (a provider's reporting lag, e.g.
    PayPal's three hours)."""
    rows = conn.execute(
        sql.SQL(
            """
            SELECT window_start FROM (
                SELECT window_start, status,
                       row_number() OVER latest AS newest,
                       max(window_end) FILTER (WHERE status IN ('success', 'partial')) OVER day AS covered_until
                FROM {t}
                WHERE connection_id = %s AND status <> 'running' AND partition <> %s
                  AND window_start >= %s AND window_start < %s
                WINDOW day AS (PARTITION BY asset, window_start),
                       latest AS (day ORDER BY started_at DESC, id DESC)
            ) AS syncs
            WHERE newest = 1
              AND (status IN ('partial', 'failed') OR covered_until < window_start + interval '1 day')
            """
        ).format(t=table("integration_sync_logs")),
        (connection_id, SWEEP_PARTITION, today - timedelta(days=back), today),
    ).fetchall()
    return sorted({row[0].astimezone(UTC).date() for row in rows})


def build_connections_sensor(providers: list[Provider]) -> dg.SensorDefinition:
    @dg.sensor(
        name="connections_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keep each provider's connection partitions in step with integration_connections.",
    )
    def _connections(context: dg.SensorEvaluationContext, mirror: MirrorDatabase) -> dg.SensorResult:
        with psycopg.connect(mirror.url()) as conn:
            stored = vault.list_connections(conn)
        requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
        for provider in providers:
            name = connections_partitions_name(provider.name)
            wanted = {c.id for c in stored if c.provider == provider.name}
            present = set(context.instance.get_dynamic_partitions(name))
            if wanted - present:
                requests.append(dg.AddDynamicPartitionsRequest(name, sorted(wanted - present)))
            if present - wanted:
                requests.append(dg.DeleteDynamicPartitionsRequest(name, sorted(present - wanted)))
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return _connections


def sweep_job_name(provider: str) -> str:
    return f"{provider}_deletion_sweep"


def build_sweep_job(provider: Provider) -> dg.JobDefinition:
    """A job that runs the provider's id sweeps (deletions without tombstones) for every active connection."""

    @dg.op(name=f"{provider.name}_sweep_deletions", description="Flag rows whose record was deleted upstream.")
    def _sweep(context: dg.OpExecutionContext, mirror: MirrorDatabase) -> dg.Output[int]:
        url, schema, box = mirror.url(), mirror.schema(), mirror.secret_box()
        with psycopg.connect(url) as conn:
            active = vault.list_connections(conn, provider=provider.name, status="active")
        flagged, failures = 0, []
        for connection in active:
            for entity_name in provider.id_sweeps:
                try:
                    result = sweep_connection(database_url=url, schema=schema, provider=provider,
                                              entity_name=entity_name, connection_id=connection.id, box=box,
                                              run_id=context.run_id)  # fmt: skip
                except Exception as exc:
                    context.log.error(f"{entity_name} sweep of {connection.id} failed: {exc}")
                    failures.append(f"{connection.id}: {exc}")
                    continue
                flagged += result.counts.updated
                context.log.info(f"{entity_name} sweep of {connection.id}: {result.summary()}")
                context.log_event(
                    dg.AssetObservation(
                        asset_key=entity_name,
                        metadata={
                            "connection": connection.id,
                            "ids_listed": result.total,
                            "flagged_deleted": result.counts.updated,
                            "sync_log_id": result.sync_log_id,
                        },
                    )
                )
        if failures:
            raise dg.Failure(f"{len(failures)} sweep(s) failed: " + "; ".join(failures[:5]))
        return dg.Output(flagged, metadata={"connections": len(active), "flagged_deleted": flagged})

    @dg.job(name=sweep_job_name(provider.name), tags={"nextcrm/provider": provider.name},
            description=f"Find {provider.name} records deleted upstream by comparing id sets.")  # fmt: skip
    def _job() -> None:
        _sweep()

    return _job


def build_sweep_schedule(provider: Provider) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{provider.name}_daily_sweep",
        cron_schedule="23 3 * * *",
        job_name=sweep_job_name(provider.name),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Flag {provider.name} records deleted upstream, once a day.",
    )


def webhook_job_name(provider: str) -> str:
    return f"{provider}_apply_webhooks"


WEBHOOK_RUN_LIMIT = 5000
# One apply run per provider at a time (a tag concurrency limit in dagster.yaml): runs queue rather than
# compete for the same inbox and the provider's request budget.
WEBHOOK_APPLY_TAG = "nextcrm/webhook_apply"


def webhook_job_tags(provider: str) -> dict[str, str]:
    """The apply job's tags: its provider, and the key that limits its runs to one at a time."""
    return {"nextcrm/provider": provider, WEBHOOK_APPLY_TAG: provider}


class ApplyWebhooksConfig(dg.Config):
    """What an apply run may take on: the sensor asks for a full batch, a user may launch a smaller one."""

    max_events: int = Field(default=WEBHOOK_RUN_LIMIT, description="Events claimed at most by this run.")


def build_webhook_job(provider: Provider) -> dg.JobDefinition:
    """A job that applies a bounded batch of the provider's due inbox events (see `webhooks.inbox`).

    Each entity table the batch changed gets an asset materialization (counts, connections, the run's
    sync logs), so webhook updates show in the asset's history beside the partitioned syncs.
    """
    assert provider.webhooks is not None and provider.webhooks.apply is not None
    apply = provider.webhooks.apply
    tables = {entity.table.name: entity.name for entity in provider.entities}

    @dg.op(
        name=f"{provider.name}_apply_inbox",
        description=f"Apply the due {provider.name} webhook events.",
        # An unexpected error (the database went away) is tried again; events it held are released or
        # their lease lapses, so the retry takes them. Failed events are not: they have their own backoff.
        retry_policy=dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL),
    )
    def _apply(context: dg.OpExecutionContext, config: ApplyWebhooksConfig, mirror: MirrorDatabase) -> dg.Output[int]:
        outcome = apply_pending(database_url=mirror.url(), schema=mirror.schema(), provider=provider.name,
                                apply=apply, run_id=context.run_id, limit=config.max_events,
                                box=mirror.secret_box())  # fmt: skip
        for result in outcome.results:
            context.log.info(f"{result.entity} {result.connection_id}: {describe_sync(result)}")
        counts = outcome.counts
        metadata = {"processed": outcome.processed, "failed": outcome.failed, "dead": outcome.dead,
                    "held": outcome.held, "skipped_types": outcome.skipped, "inserted": counts.inserted,
                    "updated": counts.updated, "unchanged": counts.unchanged,
                    "connections": len(outcome.connections)}  # fmt: skip
        for table_name, written in sorted(outcome.by_table.items()):
            if table_name not in tables:
                continue
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=tables[table_name],
                    description=f"{provider.name} webhook events applied",
                    metadata={
                        "source": "webhooks",
                        "inserted": written.inserted,
                        "updated": written.updated,
                        "unchanged": written.unchanged,
                        "connections": sorted(outcome.connections),
                        "sync_log_ids": [r.sync_log_id for r in outcome.results],
                    },
                )
            )
        if outcome.failed:
            message = f"{outcome.failed} event(s) failed, retried with backoff ({outcome.dead} now dead)"
            raise dg.Failure(f"{message}; see webhook_events.last_error", metadata=metadata, allow_retries=False)
        return dg.Output(outcome.processed, metadata=metadata)

    @dg.job(name=webhook_job_name(provider.name), tags=webhook_job_tags(provider.name),
            description=f"Apply verified {provider.name} webhook events from the inbox.")  # fmt: skip
    def _job() -> None:
        _apply()

    return _job


def webhook_sensor_interval() -> int:
    """Seconds between webhook sensor ticks (`NEXTCRM_WEBHOOK_SENSOR_SECONDS`, default 30)."""
    return int(os.environ.get("NEXTCRM_WEBHOOK_SENSOR_SECONDS", "30"))


def build_webhook_sensor(provider: Provider) -> dg.SensorDefinition:
    """Requests one apply run per bounded batch of due inbox events; writes nothing itself.

    The run key names the batch (its id range, size and the newest generation among its events), so
    re-evaluating the same due set requests nothing new, while new events, a late-committing lower
    id, a retry after backoff, a replay or a claim that lapsed with its run make a new key.

    The sensor names its job (which `Definitions` holds) rather than holding it: Definitions would otherwise
    rebuild the sensor around the job with its resources bound, which Dagster 1.13 announces with a
    BetaWarning about the sensor's (unset) `owners`.
    """

    @dg.sensor(
        name=f"{provider.name}_webhooks_sensor",
        job_name=webhook_job_name(provider.name),
        minimum_interval_seconds=webhook_sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Apply {provider.name} webhook events soon after they arrive.",
    )
    def _sensor(context: dg.SensorEvaluationContext, mirror: MirrorDatabase):
        with psycopg.connect(mirror.url()) as conn:
            batch = due_batch(conn, mirror.schema(), provider.name, WEBHOOK_RUN_LIMIT)
        if batch is None:
            return dg.SkipReason(f"no due {provider.name} webhook events")
        op = f"{provider.name}_apply_inbox"
        return dg.RunRequest(
            run_key=f"{provider.name}:{batch.run_key}",
            run_config=dg.RunConfig(ops={op: ApplyWebhooksConfig(max_events=WEBHOOK_RUN_LIMIT)}),
            tags={
                "nextcrm/webhook_events": str(batch.count),
                "nextcrm/webhook_ids": f"{batch.first_id}-{batch.last_id}",
            },
        )

    return _sensor
