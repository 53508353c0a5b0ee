"""Partitions: connection x month (or connection only), one dynamic connection dimension per provider.

A month holds ~30 days of one connection: partitions grow by one per connection a month, so a
deployment of 1,000 connections holds ~36,000 keys per asset after three years, where connection x
day would hold ~1.1 million, ten times the 100,000 Dagster recommends (docs/scaling.md has the
figures). The day stays the unit of work inside a partition: each day is synced, logged and re-run
on its own, and a run can be limited to recent days (see `assets.SINCE_TAG`).

The dynamic dimension is kept in step with `integration_connections` by the connections sensor
(and by the CLI when it adds a connection), so an account connected by any means appears in the
UI. The monthly dimension ends with the current month (`end_offset=1`) so the schedule can re-sync it.
"""

from __future__ import annotations

import os
from datetime import date

import dagster as dg

DEFAULT_START_DATE = "2024-01-01"


def connections_partitions_name(provider: str) -> str:
    return f"{provider}_connections"


def sync_start_date() -> str:
    """The first day synced (`NEXTCRM_SYNC_START_DATE`, default 2024-01-01)."""
    return os.environ.get("NEXTCRM_SYNC_START_DATE", DEFAULT_START_DATE)


def month_key(day: date) -> str:
    """The monthly dimension's key of the month holding `day` (its first day, as Dagster names it)."""
    return f"{day:%Y-%m}-01"


def connection_month_partitions(provider: str) -> dg.MultiPartitionsDefinition:
    """Connection x month, from the month of the sync start date through the current month."""
    first = date.fromisoformat(sync_start_date())
    return dg.MultiPartitionsDefinition(
        {
            "connection": dg.DynamicPartitionsDefinition(name=connections_partitions_name(provider)),
            "month": dg.MonthlyPartitionsDefinition(start_date=month_key(first), end_offset=1, timezone="UTC"),
        }
    )


def connection_partitions(provider: str) -> dg.DynamicPartitionsDefinition:
    """Connection-only partitions, for entities read whole on every run (no usable time filter)."""
    return dg.DynamicPartitionsDefinition(name=connections_partitions_name(provider))


def provider_partitions(provider: str, daily: bool) -> dg.PartitionsDefinition:
    """A provider's partitions: connection x month when its entities sync day by day, else connection only."""
    return connection_month_partitions(provider) if daily else connection_partitions(provider)


def partition_key_of(daily: bool, connection_id: str, day: date) -> str | None:
    """The partition of an entity holding a row of `connection_id` whose partition column falls on `day`
    (None before the first day synced): how syncs, webhooks and sweeps name the partition a day is in."""
    if not daily:
        return connection_id
    if day < date.fromisoformat(sync_start_date()):
        return None
    return f"{connection_id}|{month_key(day)}"
