"""Partitions: connection x day (or connection only), one dynamic connection dimension per provider.

The dynamic dimension is kept in step with `integration_connections` by the connections sensor
(and by the CLI when it adds a connection), so an account connected by any means appears in the
UI. The daily dimension ends with today (`end_offset=1`) so the schedule can re-sync it.
"""

from __future__ import annotations

import os
from datetime import date

import dagster as dg

DEFAULT_START_DATE = "2024-01-01"


def connections_partitions_name(provider: str) -> str:
    return f"{provider}_connections"


def sync_start_date() -> str:
    return os.environ.get("NEXTCRM_SYNC_START_DATE", DEFAULT_START_DATE)


def connection_day_partitions(provider: str) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition(
        {
            "connection": dg.DynamicPartitionsDefinition(name=connections_partitions_name(provider)),
            "date": dg.DailyPartitionsDefinition(start_date=sync_start_date(), end_offset=1, timezone="UTC"),
        }
    )


def connection_partitions(provider: str) -> dg.DynamicPartitionsDefinition:
    """Connection-only partitions, for entities read whole on every run (no usable time filter)."""
    return dg.DynamicPartitionsDefinition(name=connections_partitions_name(provider))


def provider_partitions(provider: str, daily: bool) -> dg.PartitionsDefinition:
    return connection_day_partitions(provider) if daily else connection_partitions(provider)


def partition_key_of(daily: bool, connection_id: str, day: date) -> str | None:
    """The partition of an entity holding a row of `connection_id` whose partition column falls on `day`
    (None before the first day the partitions cover): how writes outside a partitioned sync (webhooks,
    sweeps) name the partitions they changed."""
    if not daily:
        return connection_id
    if day < date.fromisoformat(sync_start_date()):
        return None
    return f"{connection_id}|{day.isoformat()}"
