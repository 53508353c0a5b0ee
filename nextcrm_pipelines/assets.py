"""Asset factory: one partitioned asset per provider entity, built from the registry.

A run may hold many connection x day partitions (a backfill runs as one process, see
`BackfillPolicy.single_run`); each partition is synced and logged on its own, a failed day does
not stop the others, and the run fails at the end naming what failed so the retry policy (or the
user) re-runs it. Re-running is always safe: writes are idempotent and never regress.
"""

import warnings
from collections import defaultdict
from datetime import date
from typing import Any

import dagster as dg

from nextcrm_pipelines.core.http import AuthenticationFailed, DailyLimitExhausted
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import (
    ConnectionUnavailable,
    day_window,
    snapshot_window,
    sweep_connection,
    sync_partitions,
)
from nextcrm_pipelines.core.sync import EntitySpec, SyncResult, SyncWindow
from nextcrm_pipelines.partitions import provider_partitions
from nextcrm_pipelines.resources import MirrorDatabase

SYNC_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
COUNTERS = (
    "rows_in_window", "records", "inserted", "updated", "unchanged",
    "failed", "requests", "retries", "rate_limit_waits",
)  # fmt: skip


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


def _metadata(results: list[SyncResult]) -> dict[str, Any]:
    totals: dict[str, int] = defaultdict(int)
    for result in results:
        for name, value in result.summary().items():
            if name in COUNTERS:
                totals[name] += int(value)
    metadata: dict[str, Any] = {"dagster/row_count": totals.pop("rows_in_window", 0), **totals}
    if results:
        metadata["window"] = (
            f"{min(r.window.start for r in results).isoformat()} .. " + max(r.window.end for r in results).isoformat()
        )
        metadata["duration_seconds"] = dg.FloatMetadataValue(round(sum(r.duration for r in results), 3))
        metadata["partitions"] = len(results)
        metadata["sync_log_ids"] = ", ".join(str(r.sync_log_id) for r in results[:50])
    failed_ids = [f.id for r in results for f in r.failures][:50]
    if failed_ids:
        metadata["failed_record_ids"] = ", ".join(failed_ids)
    return metadata


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
            metadata={"table": entity.table.name, "provider": provider.name},
            tags={"nextcrm/provider": provider.name},
        )

    @asset
    def _sync(context: dg.AssetExecutionContext, mirror: MirrorDatabase) -> dg.MaterializeResult:
        work: dict[str, list[tuple[SyncWindow, str]]] = defaultdict(list)
        for key in context.partition_keys:
            if not entity.daily:
                # The whole list as of now; the provider's id sweep then flags what disappeared.
                work[key].append((snapshot_window(), key))
                continue
            dims = partitions_def.get_partition_key_from_str(key).keys_by_dimension
            work[dims["connection"]].append((day_window(date.fromisoformat(dims["date"])), key))
        url, schema, box = mirror.url(), mirror.schema(), mirror.secret_box()
        results: list[SyncResult] = []
        for connection_id, items in sorted(work.items()):
            items.sort(key=lambda item: item[0].start)
            partitions = [key for _, key in items]
            try:
                synced = sync_partitions(
                    database_url=url, schema=schema, provider=provider, entity_name=entity.name,
                    connection_id=connection_id, windows=[w for w, _ in items], partitions=partitions,
                    box=box, run_id=context.run.run_id,
                )  # fmt: skip
                if not entity.daily and entity.name in provider.id_sweeps and synced[0].status != "failed":
                    swept = sweep_connection(database_url=url, schema=schema, provider=provider,
                                             entity_name=entity.name, connection_id=connection_id, box=box,
                                             run_id=context.run.run_id)  # fmt: skip
                    context.log.info(f"{entity.name} {connection_id}: {swept.counts.updated} flagged deleted upstream")
                    synced[0].counts.updated += swept.counts.updated
            except (AuthenticationFailed, ConnectionUnavailable, DailyLimitExhausted) as exc:
                # Retrying cannot help before the user reconnects or the provider's day resets.
                raise dg.Failure(str(exc), allow_retries=False) from None
            for partition, result in zip(partitions, synced, strict=True):
                log = context.log.error if result.status == "failed" else context.log.info
                log(f"{entity.name} {partition}: {describe_sync(result)}")
                if len(context.partition_keys) > 1:
                    context.log_event(
                        dg.AssetObservation(
                            asset_key=context.asset_key, partition=partition, metadata=_metadata([result])
                        )
                    )
            results.extend(synced)
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise dg.Failure(
                f"{len(failed)} of {len(results)} partition(s) failed; committed data stays, re-run to finish: "
                + "; ".join(f"{r.window.start.date()}: {r.error}" for r in failed[:5]),
                metadata=_metadata([r for r in results if r.status != "failed"]),
            )
        return dg.MaterializeResult(metadata=_metadata(results))

    return _sync


def build_provider_assets(provider: Provider) -> list[dg.AssetsDefinition]:
    return [build_entity_asset(provider, entity) for entity in provider.entities]
