"""Schedules and sensors built from the registry.

- `<provider>_hourly`: keeps every active connection current, a block of connections per run: each run
  syncs today and the recent days not yet held whole (see `assets.SCOPE_TAG`). A provider that also has
  whole-list entities reads those in `<provider>_lists_hourly` (a job's assets share one partitioning).
- `<provider>_daily_sweep`: for providers that hard-delete without a trace (MYOB), compares id sets
  once a day and flags the rows whose record is gone.
- `<provider>_webhooks_sensor` and `<provider>_apply_webhooks`: verified inbox events applied soon after
  they arrive (providers whose events carry what the tables need).
- `<provider>_actions_sensor` and `<provider>_apply_actions`: NextCRM's actions on the provider, from the
  outbox, carried out soon after they are submitted, each exactly once (see `core.outbox`).
- `connections_sensor`: keeps each provider's dynamic connection partitions equal to the rows of
  `integration_connections`, so a connection added by any means (CLI, the CRM app, SQL) appears.
"""

import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql
from pydantic import Field

from nextcrm_pipelines.assets import RECENT_DAYS, RECENT_SCOPE, SCOPE_TAG, describe_sync
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import outbox
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import database_now, reauth_hint, rows_changed_since, sweep_connection
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.health import health_tick
from nextcrm_pipelines.partitions import connections_partitions_name, month_key, partition_key_of, sync_start_date
from nextcrm_pipelines.resources import MirrorDatabase, ProviderClients
from nextcrm_pipelines.webhooks.inbox import apply_pending, due_batch


@dataclass(frozen=True)
class SyncJob:
    """One of a provider's sync jobs, with the hourly schedule that runs it: the provider's entities of one
    partitioning (a Dagster job's assets share one partitions definition)."""

    name: str
    schedule: str
    daily: bool
    entities: tuple[EntitySpec, ...]


def sync_jobs(provider: Provider) -> list[SyncJob]:
    """`<provider>_sync` (with `<provider>_hourly`) syncs the provider's entities; a provider that has both
    daily and whole-list entities syncs the whole-list ones in `<provider>_lists_sync` (`<provider>_lists_hourly`)."""
    daily, lists = provider.daily_entities, provider.list_entities
    if not daily or not lists:
        return [SyncJob(f"{provider.name}_sync", f"{provider.name}_hourly", bool(daily), provider.entities)]
    return [
        SyncJob(f"{provider.name}_sync", f"{provider.name}_hourly", True, daily),
        SyncJob(f"{provider.name}_lists_sync", f"{provider.name}_lists_hourly", False, lists),
    ]


def sync_job_name(provider: Provider, entity: EntitySpec) -> str:
    """The sync job that materialises `entity`."""
    return next(job.name for job in sync_jobs(provider) if entity in job.entities)


def build_sync_jobs(provider: Provider) -> list[Any]:
    """The asset jobs that materialise the provider's entities (their partitions are their assets' own).
    Definitions resolves them into jobs; callers take one with `defs.resolve_job_def` (Dagster names no
    public type for the unresolved job `define_asset_job` returns)."""
    return [
        dg.define_asset_job(
            job.name,
            selection=dg.AssetSelection.assets(*(entity.name for entity in job.entities)),
            description=f"Sync {', '.join(entity.name for entity in job.entities)} for one connection"
            + (" x month, day by day." if job.daily else " (the whole list)."),
        )
        for job in sync_jobs(provider)
    ]


# Connections synced by one hourly run: a run costs a process start (seconds of CPU), so a block of
# connections shares one; several blocks run side by side under the run queue's limit.
CONNECTIONS_PER_RUN_ENV = "NEXTCRM_CONNECTIONS_PER_RUN"
DEFAULT_CONNECTIONS_PER_RUN = 50


def connections_per_run() -> int:
    """Connections per hourly run (`NEXTCRM_CONNECTIONS_PER_RUN`, default 50)."""
    value = os.environ.get(CONNECTIONS_PER_RUN_ENV, "").strip()
    if value and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"{CONNECTIONS_PER_RUN_ENV} must be a whole number of connections, got {value!r}")
    return int(value) if value else DEFAULT_CONNECTIONS_PER_RUN


def connection_blocks(ordered: list[str], active: set[str], size: int) -> list[tuple[str, str]]:
    """Split the connection partitions (in Dagster's order) into runs of `size` and give each run's first
    and last active connection: a partition range is contiguous in that order, so a run also holds the
    inactive connections between them, which a recent-scope run leaves alone."""
    blocks = []
    for offset in range(0, len(ordered), size):
        chosen = [key for key in ordered[offset : offset + size] if key in active]
        if chosen:
            blocks.append((chosen[0], chosen[-1]))
    return blocks


def connect_hint(provider: Provider) -> str:
    """The command that connects a first account of `provider`."""
    if provider.oauth is not None and provider.discover_tenants is not None:
        return f"`nextcrm-pipelines connect {provider.name}`"
    return f'`nextcrm-pipelines connections add {provider.name} --name "Account name"`'


def skipped_connections(provider: Provider, stored: list[Connection], partitioned: set[str]) -> list[str]:
    """Why each connection the hourly runs leave out is left out, with what brings it back."""
    reasons = []
    for connection in stored:
        if connection.status == "needs_reauth":
            reasons.append(f"{connection.id}: needs_reauth, {reauth_hint(provider, connection)}")
        elif connection.status != "active":
            reasons.append(f"{connection.id}: {connection.status}, enable it with "
                           f"`nextcrm-pipelines connections enable {connection.id}`")  # fmt: skip
        elif connection.id not in partitioned:
            reasons.append(f"{connection.id}: no partition yet (the connections sensor adds it within a minute)")
    return reasons


def build_hourly_schedules(provider: Provider) -> list[dg.ScheduleDefinition]:
    """One hourly schedule per sync job of the provider."""
    return [build_hourly_schedule(provider, job) for job in sync_jobs(provider)]


def build_hourly_schedule(provider: Provider, job: SyncJob) -> dg.ScheduleDefinition:
    entities = ", ".join(entity.name for entity in job.entities)

    @dg.schedule(
        name=job.schedule,
        cron_schedule="7 * * * *",
        job_name=job.name,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Keep {entities} of every active {provider.name} connection current: "
        + ("today, and recent days not yet held whole" if job.daily else "the whole list")
        + ", a block of connections per run.",
    )
    def _hourly(context: dg.ScheduleEvaluationContext, mirror: MirrorDatabase):
        scheduled = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
        with psycopg.connect(mirror.url()) as conn:
            stored = vault.list_connections(conn, provider=provider.name)
        active = {c.id for c in stored if c.status == "active"}
        ordered = context.instance.get_dynamic_partitions(connections_partitions_name(provider.name))
        blocks = connection_blocks(list(ordered), active, connections_per_run())
        skipped = skipped_connections(provider, stored, set(ordered))
        if not blocks:
            return dg.SkipReason(
                f"no {provider.name} connection to sync"
                + (": " + "; ".join(skipped) if skipped else f" (none is connected: {connect_hint(provider)})")
            )
        for reason in skipped:  # the tick's log, beside its run requests
            context.log.info(f"skipped {reason}")
        # The months holding the recent days (two around a month's start); the run syncs only those days.
        first_day = max(scheduled.date() - timedelta(days=RECENT_DAYS - 1), date.fromisoformat(sync_start_date()))
        months = (month_key(first_day), month_key(scheduled.date()))
        requests = []
        for first, last in blocks:
            start, end = (f"{first}|{months[0]}", f"{last}|{months[1]}") if job.daily else (first, last)
            requests.append(
                dg.RunRequest(
                    run_key=f"{first}..{last}|{scheduled:%Y-%m-%dT%H}",
                    tags={
                        SCOPE_TAG: RECENT_SCOPE,
                        "dagster/asset_partition_range_start": start,
                        "dagster/asset_partition_range_end": end,
                    },
                )
            )
        return requests

    return _hourly


# Partition keys named at most in one tick's log line (the rest are counted).
NAMED_KEYS = 20


def _keys(keys: list[str]) -> str:
    named = ", ".join(repr(key) for key in keys[:NAMED_KEYS])
    return named + (f" and {len(keys) - NAMED_KEYS} more" if len(keys) > NAMED_KEYS else "")


def build_connections_sensor(providers: list[Provider]) -> dg.SensorDefinition:
    """Keeps the connection partitions equal to `integration_connections` (saying what it added and removed, and
    why) and records each connection's health when it changes (see `nextcrm_pipelines.health`)."""

    @dg.sensor(
        name="connections_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keep each provider's connection partitions in step with integration_connections, and record "
        "each connection's health (<provider>_connection_health) when it changes.",
    )
    def _connections(context: dg.SensorEvaluationContext, mirror: MirrorDatabase) -> dg.SensorResult:
        with psycopg.connect(mirror.url()) as conn:
            stored = vault.list_connections(conn)
        requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
        notes = []
        for provider in providers:
            name = connections_partitions_name(provider.name)
            wanted = {c.id for c in stored if c.provider == provider.name}
            present = set(context.instance.get_dynamic_partitions(name))
            added, removed = sorted(wanted - present), sorted(present - wanted)
            if added:
                requests.append(dg.AddDynamicPartitionsRequest(name, added))
                notes.append(f"added {len(added)} partition(s) to {name} for new connections: {_keys(added)}")
            if removed:
                # A key typed into the UI's "add partition" dialog is no connection: nothing could sync it.
                requests.append(dg.DeleteDynamicPartitionsRequest(name, removed))
                notes.append(f"removed partition(s) {_keys(removed)} from {name}: no such {provider.name} connection; "
                             f"add connections with `nextcrm-pipelines connections add` or `connect`, not the "
                             f"partition dialog")  # fmt: skip
        health = health_tick(context.instance, providers, stored, context.cursor)
        for note in notes + health.notes:
            context.log.info(note)
        summary = "; ".join(notes + health.notes) or f"no change ({len(stored)} connection(s))"
        return dg.SensorResult(dynamic_partitions_requests=requests, asset_events=health.events,
                               cursor=health.cursor, skip_reason=summary)  # fmt: skip

    return _connections


def materialize_changed_partitions(
    context: dg.OpExecutionContext,
    provider: Provider,
    entity: EntitySpec,
    connection_ids: list[str],
    since: datetime,
    database_url: str,
    schema: str,
    metadata: dict[str, Any],
) -> int:
    """Materialise each partition of `entity` that rows written since `since` fall in (a webhook apply, a
    sweep), each with its own count of rows changed; returns how many partitions that was."""
    changed: dict[str, int] = defaultdict(int)
    for (connection_id, day), count in rows_changed_since(database_url, schema, entity, connection_ids, since).items():
        key = partition_key_of(entity.daily, connection_id, day) if day is not None or not entity.daily else None
        if key is not None:
            changed[key] += count
    # A connection the connections sensor has not listed yet gets its partitions now, as the sensor would.
    name = connections_partitions_name(provider.name)
    missing = sorted(set(connection_ids) - set(context.instance.get_dynamic_partitions(name)))
    if missing and changed:
        context.instance.add_dynamic_partitions(name, missing)
    held = partition_row_counts(database_url, schema, entity, sorted({key.split("|")[0] for key in changed}))
    materialized = 0
    for key, count in sorted(changed.items()):
        # The row count is what the partition holds now (as a sync reports it), beside what this run changed.
        row_count = {"dagster/row_count": held.get(key, 0), "rows_changed": count}
        context.log_event(
            dg.AssetMaterialization(asset_key=entity.name, partition=key, metadata={**metadata, **row_count})
        )
        materialized += 1
    return materialized


def partition_row_counts(
    database_url: str, schema: str, entity: EntitySpec, connection_ids: list[str]
) -> dict[str, int]:
    """Rows each partition of the connections holds (by month of the partition column, from the first day synced)."""
    if not connection_ids:
        return {}
    if entity.daily:
        first = datetime.combine(date.fromisoformat(sync_start_date()), time(), tzinfo=UTC)
        query = sql.SQL(
            "SELECT connection_id, to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-01'), count(*) FROM {t} "
            "WHERE connection_id = ANY(%s) AND {c} >= %s GROUP BY 1, 2"
        ).format(t=table(entity.table.name, schema), c=sql.Identifier(entity.partition_column))
        params: tuple[Any, ...] = (connection_ids, first)
    else:
        query = sql.SQL("SELECT connection_id, NULL, count(*) FROM {} WHERE connection_id = ANY(%s) GROUP BY 1").format(
            table(entity.table.name, schema)
        )
        params = (connection_ids,)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(query, params).fetchall()
    return {(f"{connection_id}|{key}" if entity.daily else connection_id): int(n) for connection_id, key, n in rows}


def sweep_job_name(provider: str) -> str:
    return f"{provider}_deletion_sweep"


def daily_sweeps(provider: Provider) -> list[str]:
    """The daily entities with an id sweep: the sweep job runs theirs (whole-list entities sweep within their runs)."""
    return [name for name in provider.id_sweeps if provider.entity(name).daily]


def build_sweep_job(provider: Provider) -> dg.JobDefinition:
    """A job that runs the provider's id sweeps of daily entities (deletions without tombstones) for every
    active connection."""

    @dg.op(name=f"{provider.name}_sweep_deletions", description="Flag rows whose record was deleted upstream.",
           pool=provider.name)  # fmt: skip
    def _sweep(context: dg.OpExecutionContext, mirror: MirrorDatabase, clients: ProviderClients) -> dg.Output[int]:
        url, schema, box = mirror.url(), mirror.schema(), mirror.secret_box()
        with psycopg.connect(url) as conn:
            active = vault.list_connections(conn, provider=provider.name, status="active")
        flagged, failures = 0, []
        for connection in active:
            for entity_name in daily_sweeps(provider):
                since = database_now(url)
                try:
                    result = sweep_connection(database_url=url, schema=schema, provider=provider,
                                              entity_name=entity_name, connection_id=connection.id, box=box,
                                              run_id=context.run_id, opener=clients.opener())  # fmt: skip
                except Exception as exc:
                    context.log.error(f"{entity_name} sweep of {connection.id} failed: {exc}")
                    failures.append(f"{connection.id}: {exc}")
                    continue
                flagged += result.counts.updated
                context.log.info(f"sweep: {describe_sync(result, connection=True)}")
                materialize_changed_partitions(
                    context, provider, provider.entity(entity_name), [connection.id], since, url, schema,
                    {"source": "deletion sweep", "ids_listed": result.total, "sync_log_id": result.sync_log_id},
                )  # fmt: skip
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
        pool=provider.name,
        # An unexpected error (the database went away) is tried again; events it held are released or
        # their lease lapses, so the retry takes them. Failed events are not: they have their own backoff.
        retry_policy=dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL),
    )
    def _apply(
        context: dg.OpExecutionContext, config: ApplyWebhooksConfig, mirror: MirrorDatabase, clients: ProviderClients
    ) -> dg.Output[int]:
        url, schema = mirror.url(), mirror.schema()
        since = database_now(url)
        outcome = apply_pending(database_url=url, schema=schema, provider=provider.name, apply=apply,
                                run_id=context.run_id, limit=config.max_events, box=mirror.secret_box(),
                                opener=clients.opener())  # fmt: skip
        for result in outcome.results:
            context.log.info(describe_sync(result, connection=True))
        counts = outcome.counts
        metadata = {"processed": outcome.processed, "failed": outcome.failed, "dead": outcome.dead,
                    "held": outcome.held, "skipped_types": outcome.skipped, "inserted": counts.inserted,
                    "updated": counts.updated, "unchanged": counts.unchanged,
                    "connections": len(outcome.connections)}  # fmt: skip
        for table_name in sorted(outcome.by_table):
            if table_name in tables:
                materialize_changed_partitions(
                    context, provider, provider.entity(tables[table_name]), sorted(outcome.connections), since, url,
                    schema, {"source": "webhooks", "sync_log_ids": ", ".join(str(r.sync_log_id) for r in
                                                                            outcome.results[:50])},
                )  # fmt: skip
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


def actions_job_name(provider: str) -> str:
    return f"{provider}_apply_actions"


ACTIONS_APPLY_TAG = "nextcrm/actions_apply"


class ApplyActionsConfig(dg.Config):
    """What an apply run may take on: the sensor asks for a full batch, a user may launch a smaller one."""

    max_actions: int = Field(default=outbox.RUN_LIMIT, description="Actions claimed at most by this run.")


def build_actions_job(provider: Provider) -> dg.JobDefinition:
    """A job that carries out a bounded batch of the provider's due outbox actions (see `core.outbox`).

    Each entity table the actions wrote gets an asset materialization per changed partition (read your
    writes shows in the asset's history beside the syncs).
    """
    entities = {entity.name: entity for entity in provider.entities}

    @dg.op(
        name=f"{provider.name}_send_actions",
        description=f"Carry out the due {provider.name} actions of the outbox, each exactly once.",
        pool=provider.name,
        # A lost database is tried again: the rows it held are found again when their lease lapses.
        retry_policy=dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL),
    )
    def _send(
        context: dg.OpExecutionContext, config: ApplyActionsConfig, mirror: MirrorDatabase, clients: ProviderClients
    ) -> dg.Output[int]:
        url, schema = mirror.url(), mirror.schema()
        since = database_now(url)
        done = outbox.apply_due(database_url=url, schema=schema, provider=provider, run_id=context.run_id,
                                limit=config.max_actions, box=mirror.secret_box(), opener=clients.opener())  # fmt: skip
        for line in done.lines:
            context.log.info(line)
        for name, connection_ids in sorted(done.written.items()):
            materialize_changed_partitions(context, provider, entities[name], sorted(connection_ids), since, url,
                                           schema, {"source": "actions"})  # fmt: skip
        metadata = {"processed": done.processed, "succeeded": done.succeeded, "adopted": done.adopted,
                    "failed": done.failed, "retrying": done.retrying, "dead": done.dead, "held": done.held}  # fmt: skip
        return dg.Output(done.processed, metadata=metadata)

    @dg.job(name=actions_job_name(provider.name),
            tags={"nextcrm/provider": provider.name, ACTIONS_APPLY_TAG: provider.name},
            description=f"Carry out NextCRM's {provider.name} actions from the outbox, each exactly once.")  # fmt: skip
    def _job() -> None:
        _send()

    return _job


def actions_sensor_interval() -> int:
    """Seconds between actions sensor ticks (`NEXTCRM_ACTIONS_SENSOR_SECONDS`, default 15)."""
    return int(os.environ.get("NEXTCRM_ACTIONS_SENSOR_SECONDS", "15"))


def build_actions_sensor(provider: Provider) -> dg.SensorDefinition:
    """Requests one apply run per bounded batch of due actions; writes nothing itself. The run key names the
    batch (ids, size, newest generation), so the same due set asks for nothing new."""

    @dg.sensor(
        name=f"{provider.name}_actions_sensor",
        job_name=actions_job_name(provider.name),
        minimum_interval_seconds=actions_sensor_interval(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Carry out NextCRM's {provider.name} actions soon after they are submitted.",
    )
    def _sensor(context: dg.SensorEvaluationContext, mirror: MirrorDatabase):
        with psycopg.connect(mirror.url()) as conn:
            batch = outbox.due_batch(conn, mirror.schema(), provider.name)
        if batch is None:
            return dg.SkipReason(f"no due {provider.name} actions")
        op = f"{provider.name}_send_actions"
        return dg.RunRequest(
            run_key=f"{provider.name}:{batch.run_key}",
            run_config=dg.RunConfig(ops={op: ApplyActionsConfig(max_actions=outbox.RUN_LIMIT)}),
            tags={"nextcrm/actions": str(batch.count), "nextcrm/action_ids": f"{batch.first_id}-{batch.last_id}"},
        )

    return _sensor
