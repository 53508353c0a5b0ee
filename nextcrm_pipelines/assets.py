"""Asset factory: one partitioned asset per provider entity, built from the registry.

A run may hold many partitions, of one connection or of several (a backfill runs as one process, see
`BackfillPolicy.single_run`; the hourly schedule syncs a block of connections per run). Each partition
tells its own truth: it gets its own `AssetMaterialization` as soon as its windows are synced, with its
own row count, counts and requests; a partition whose window failed gets none, so Dagster shows it
failed while the others stay materialised. The run then fails naming the failed days, and a retry or
a re-execution syncs only the windows the run (or the runs it re-executes) did not finish, which the
sync logs record. Re-running is always safe: writes are idempotent and never regress.

One connection is synced by one run at a time: a run that finds a connection taken by another does
not wait for it inside a run slot; it reports that connection's partitions failed at once, naming
the run that holds it (a scheduled run leaves them to its next tick instead).
"""

import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg

from nextcrm_pipelines.core.http import AuthenticationFailed, DailyLimitExhausted
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import (
    ConnectionUnavailable,
    day_window,
    snapshot_window,
    sweep_connection,
    sync_partitions,
    windows_done,
    windows_held_whole,
)
from nextcrm_pipelines.core.sync import EntitySpec, SyncResult, SyncWindow, rows_created_in
from nextcrm_pipelines.dagster_tables import table_metadata
from nextcrm_pipelines.partitions import provider_partitions, sync_start_date
from nextcrm_pipelines.resources import MirrorDatabase, ProviderClients

SYNC_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
# Set by the hourly schedule: the run keeps recent partitions current. It syncs only the days not yet
# held whole (today, and days whose last sync failed, lost records or saw only part of the day), and
# leaves a connection that is busy or unavailable to the next tick rather than failing.
SCOPE_TAG = "nextcrm/scope"
RECENT_SCOPE = "recent"
# The recent days: today and the two before.
RECENT_DAYS = 3
# A run tagged with a day (YYYY-MM-DD) syncs only the days of its partitions from that day on: the demo's
# last week, or a user's "just this month's last days" without re-reading the whole month.
SINCE_TAG = "nextcrm/since"
COUNTERS = (
    "rows_in_window", "records", "inserted", "updated", "unchanged",
    "failed", "requests", "retries", "rate_limit_waits",
)  # fmt: skip
# Errors that retrying the step cannot fix: the user reconnects, the provider's day resets, or the
# other run holding the connection finishes (a later run, not a retry inside this one, syncs it).
NOT_RETRYABLE = (AuthenticationFailed, ConnectionUnavailable, DailyLimitExhausted)


def describe_sync(result: SyncResult) -> str:
    """One synced window as a log line: its status, counts, requests, window and error (never record contents)."""
    counts, stats = result.counts, result.stats
    return (
        f"{result.status}, {result.total} records ({result.rows_in_window} in the window): {counts.inserted} inserted, "
        f"{counts.updated} updated, {counts.unchanged} unchanged, {counts.failed} failed; {stats.requests} requests, "
        f"{stats.retries} retries, {stats.rate_limit_waits} rate-limit waits; "
        f"window {result.window.start.isoformat()} .. {result.window.end.isoformat()}, {result.duration:.1f} s"
        + (f" - {result.error}" if result.error else "")
    )


def partition_metadata(results: list[SyncResult]) -> dict[str, Any]:
    """One partition's materialization metadata: its row count and counters, summed over its windows."""
    totals: dict[str, int] = dict.fromkeys(COUNTERS, 0)
    for result in results:
        for name, value in result.summary().items():
            if name in totals:
                totals[name] += int(value)
    metadata: dict[str, Any] = {"dagster/row_count": totals.pop("rows_in_window"), **totals}
    if results:
        metadata["window"] = (
            f"{min(r.window.start for r in results).isoformat()} .. " + max(r.window.end for r in results).isoformat()
        )
        metadata["duration_seconds"] = dg.FloatMetadataValue(round(sum(r.duration for r in results), 3))
        metadata["sync_log_ids"] = ", ".join(str(r.sync_log_id) for r in results[:50])
    failed_ids = [f.id for r in results for f in r.failures][:50]
    if failed_ids:
        metadata["failed_record_ids"] = ", ".join(failed_ids)
    return metadata


@dataclass
class _Partition:
    """One partition of the run: its connection, the windows it covers, and what became of them."""

    key: str
    connection_id: str
    windows: list[SyncWindow]
    # The days the partition holds, whole: what its row count counts (None: the whole list).
    span: SyncWindow | None = None
    results: list[SyncResult] = field(default_factory=list)
    skipped: int = 0
    error: str | None = None
    retryable: bool = True

    @property
    def failed(self) -> bool:
        return self.error is not None or any(r.status == "failed" for r in self.results)

    def reason(self) -> str:
        errors = [f"{r.window.start.date()}: {r.error}" for r in self.results if r.status == "failed"]
        return self.error or "; ".join(errors)


def _planned(partitions_def: dg.PartitionsDefinition, entity: EntitySpec, keys: list[str]) -> list[_Partition]:
    """The run's partitions with their windows: each day of a month partition (from the sync start date,
    through today), or the whole list."""
    planned = []
    first_synced, tomorrow = date.fromisoformat(sync_start_date()), datetime.now(UTC).date() + timedelta(days=1)
    for key in keys:
        if not entity.daily:
            planned.append(_Partition(key, key, [snapshot_window()]))
            continue
        assert isinstance(partitions_def, dg.MultiPartitionsDefinition)
        dims = partitions_def.get_partition_key_from_str(key).keys_by_dimension
        time_def = partitions_def.get_partitions_def_for_dimension("month")
        assert isinstance(time_def, dg.TimeWindowPartitionsDefinition)
        span = time_def.time_window_for_partition_key(dims["month"])
        first = max(span.start.astimezone(UTC).date(), first_synced)
        last = min(span.end.astimezone(UTC).date(), tomorrow)
        days = [first + timedelta(days=n) for n in range((last - first).days)]
        window = SyncWindow(day_window(first).start, day_window(last).start) if days else None
        planned.append(_Partition(key, dims["connection"], [day_window(day) for day in days], span=window))
    return planned


def run_since(tags: Mapping[str, str], today: date) -> date | None:
    """The first day a run syncs when its tags limit it: `nextcrm/since`, or the recent days of the hourly
    scope; None syncs every day of its partitions."""
    if tags.get(SCOPE_TAG) == RECENT_SCOPE:
        return today - timedelta(days=RECENT_DAYS - 1)
    since = tags.get(SINCE_TAG)
    if since is None:
        return None
    try:
        return date.fromisoformat(since)
    except ValueError:
        raise dg.Failure(
            f"run tag {SINCE_TAG} must be a date (YYYY-MM-DD), got {since!r}", allow_retries=False
        ) from None


def _run_family(context: dg.AssetExecutionContext) -> set[str]:
    """This run and, for a re-execution, the runs it re-executes: windows they finished are not synced again."""
    run = context.run
    family = {run.run_id}
    if run.root_run_id:
        family.add(run.root_run_id)
        related = context.instance.get_run_records(dg.RunsFilter(tags={"dagster/root_run_id": run.root_run_id}))
        family.update(record.dagster_run.run_id for record in related)
    return family


def build_entity_asset(
    provider: Provider, entity: EntitySpec, retry_policy: dg.RetryPolicy | None = SYNC_RETRY_POLICY
) -> dg.AssetsDefinition:
    partitions_def = provider_partitions(provider.name, provider.daily)
    # A single-run backfill is deliberate (a range of days is one run in one process); Dagster 1.13 still
    # calls @asset's `backfill_policy` beta and would say so once per asset whenever the code loads.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
        asset = dg.asset(
            name=entity.name,
            group_name=provider.name,
            description=entity.description,
            partitions_def=partitions_def,
            backfill_policy=dg.BackfillPolicy.single_run(),
            retry_policy=retry_policy,
            kinds={"postgres", provider.name},
            # The table's name and columns, from its definition (the UI's columns tab).
            metadata={**table_metadata(entity.table.name), "table": entity.table.name, "provider": provider.name},
            tags={"nextcrm/provider": provider.name},
            # The provider's pool (limit in dagster.yaml) bounds how many steps call it at once across runs:
            # its app-wide request budget holds however many runs are queued.
            pool=provider.name,
            # Partitions are materialised one by one as they finish (the step yields their events and no
            # output, see the module docstring): an output would give every partition of a range the same
            # metadata, and materialise the failed ones too.
            output_required=False,
        )

    @asset
    def _sync(
        context: dg.AssetExecutionContext, mirror: MirrorDatabase, clients: ProviderClients
    ) -> Iterator[dg.AssetMaterialization]:
        url, schema, box = mirror.url(), mirror.schema(), mirror.secret_box()
        recent = context.run.tags.get(SCOPE_TAG) == RECENT_SCOPE
        since = run_since(context.run.tags, datetime.now(UTC).date())
        planned = _planned(partitions_def, entity, list(context.partition_keys))
        family = _run_family(context)
        by_connection: dict[str, list[_Partition]] = defaultdict(list)
        for partition in planned:
            by_connection[partition.connection_id].append(partition)
        # One autocommit session for the step's reads of the sync logs and row counts (each connection's
        # sync opens its own): a block of 50 connections would otherwise open hundreds of sessions.
        with psycopg.connect(url, autocommit=True) as reads:
            for connection_id, partitions in sorted(by_connection.items()):
                done = windows_done(reads, schema, entity.name, connection_id, family) if entity.daily else set()
                if since is not None and entity.daily:
                    done |= {w.start for p in partitions for w in p.windows if w.start.date() < since}
                if recent and entity.daily:
                    starts = {w.start for p in partitions for w in p.windows}
                    done |= windows_held_whole(reads, schema, entity.name, connection_id, starts)
                todo = [(p, w) for p in partitions for w in p.windows if w.start not in done]
                for partition in partitions:
                    partition.skipped = sum(w.start in done for w in partition.windows)
                if not todo:
                    continue
                try:
                    synced = sync_partitions(
                        database_url=url, schema=schema, provider=provider, entity_name=entity.name,
                        connection_id=connection_id, windows=[w for _, w in todo], partitions=[p.key for p, _ in todo],
                        box=box, run_id=context.run.run_id, wait=False, opener=clients.opener(),
                    )  # fmt: skip
                    if not entity.daily and entity.name in provider.id_sweeps and synced[0].status != "failed":
                        swept = sweep_connection(database_url=url, schema=schema, provider=provider,
                                                 entity_name=entity.name, connection_id=connection_id, box=box,
                                                 run_id=context.run.run_id, opener=clients.opener())  # fmt: skip
                        context.log.info(
                            f"{entity.name} {connection_id}: {swept.counts.updated} flagged deleted upstream"
                        )
                        synced[0].counts.updated += swept.counts.updated
                except NOT_RETRYABLE as exc:
                    if recent and isinstance(exc, ConnectionUnavailable):
                        context.log.warning(f"{entity.name} {connection_id}: left for the next run - {exc}")
                        for partition in partitions:
                            partition.skipped = len(partition.windows)
                        continue
                    for partition in partitions:
                        partition.error, partition.retryable = str(exc), False
                    context.log.error(f"{entity.name} {connection_id}: {exc}")
                    continue
                for (partition, _), result in zip(todo, synced, strict=True):
                    partition.results.append(result)
                    log = context.log.error if result.status == "failed" else context.log.info
                    log(f"{entity.name} {partition.key}: {describe_sync(result)}")
                for partition in partitions:
                    if partition.results and not partition.failed:
                        metadata = partition_metadata(partition.results)
                        if partition.span is not None:  # the rows of the whole month, not only of the days synced now
                            metadata["dagster/row_count"] = rows_created_in(
                                reads, schema, entity, connection_id, partition.span
                            )
                        yield dg.AssetMaterialization(
                            asset_key=context.asset_key,
                            partition=partition.key,
                            metadata={
                                **metadata,
                                "days_synced": len(partition.results),
                                "days_skipped": partition.skipped,
                            },
                        )
        failed = [p for p in planned if p.failed]
        if failed:
            raise dg.Failure(
                f"{len(failed)} of {len(planned)} partition(s) failed; the others are materialised and committed "
                "data stays; re-execute from failure to sync only what failed: "
                + "; ".join(f"{p.key}: {p.reason()}" for p in failed[:5]),
                metadata={"failed_partitions": ", ".join(p.key for p in failed[:100])},
                allow_retries=any(p.retryable for p in failed),
            )

    return _sync


def build_provider_assets(
    provider: Provider, retry_policy: dg.RetryPolicy | None = SYNC_RETRY_POLICY
) -> list[dg.AssetsDefinition]:
    """One asset per entity of the provider."""
    return [build_entity_asset(provider, entity, retry_policy) for entity in provider.entities]
