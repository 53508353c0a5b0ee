"""Schedules and sensors built from the registry.

- `<provider>_hourly`: re-syncs today's partition of every active connection, every hour.
- `connections_sensor`: keeps each provider's dynamic connection partitions equal to the rows of
  `integration_connections`, so a connection added by any means (CLI, the CRM app, SQL) appears.
"""

from datetime import UTC, datetime

import dagster as dg
import psycopg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.partitions import connection_day_partitions, connections_partitions_name
from nextcrm_pipelines.resources import MirrorDatabase


def sync_job_name(provider: str) -> str:
    return f"{provider}_sync"


def build_sync_job(provider: Provider) -> UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        sync_job_name(provider.name),
        selection=dg.AssetSelection.groups(provider.name),
        partitions_def=connection_day_partitions(provider.name),
        description=f"Sync every {provider.name} entity for one connection x day.",
    )


def build_hourly_schedule(provider: Provider) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{provider.name}_hourly",
        cron_schedule="7 * * * *",
        job_name=sync_job_name(provider.name),
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-sync today's partition of every active {provider.name} connection.",
    )
    def _hourly(context: dg.ScheduleEvaluationContext, mirror: MirrorDatabase):
        scheduled = context.scheduled_execution_time or datetime.now(UTC)
        today = scheduled.astimezone(UTC).date().isoformat()
        with psycopg.connect(mirror.url()) as conn:
            active = vault.list_connections(conn, provider=provider.name, status="active")
        for connection in active:
            yield dg.RunRequest(
                run_key=f"{connection.id}|{scheduled.astimezone(UTC):%Y-%m-%dT%H}",
                partition_key=dg.MultiPartitionKey({"connection": connection.id, "date": today}),
            )

    return _hourly


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
