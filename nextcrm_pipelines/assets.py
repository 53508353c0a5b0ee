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

import time
import warnings
from collections import defaultdict
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg

from nextcrm_pipelines.core.http import AuthenticationFailed, DailyLimitExhausted, NotGranted, ProviderError
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import (
    ConnectionUnavailable,
    day_window,
    snapshot_window,
    sweep_connection,
    sync_partitions,
    whole_list_done,
    windows_done,
    windows_held_whole,
)
from nextcrm_pipelines.core.sync import EntitySpec, NotTried, SyncResult, SyncWindow, describe_result, rows_created_in
from nextcrm_pipelines.dagster_tables import table_metadata
from nextcrm_pipelines.partitions import provider_partitions, sync_start_date
from nextcrm_pipelines.resources import MirrorDatabase, ProviderClients

# A sync step that failed for a reason a retry can fix (a provider's outage, 5xx beyond the HTTP client's
# own retries, a lost database connection) runs again after about 30 s, 1.5 min and 3.5 min (+-30 s, so
# the runs of many connections do not come back at once): about five minutes, the span of a provider's
# usual brief outage. Each attempt fails fast when the provider cannot be reached at all (three connection
# attempts within a few seconds, then the connection's other days are not tried), and says in the run's
# log what failed and when the next attempt comes; the last names the cause. Days a retry finds finished
# are not synced again, and the hourly schedule re-reads any day still not held whole.
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
# Errors that retrying the step cannot fix: the user reconnects (or grants a missing scope), the provider's day
# resets, or the other run holding the connection finishes (a later run, not a retry inside this one, syncs it).
NOT_RETRYABLE = (AuthenticationFailed, ConnectionUnavailable, DailyLimitExhausted, NotGranted)


def describe_sync(result: SyncResult, *, connection: bool = False) -> str:
    """One synced window as a one-line sentence for the run's log, e.g. "2026-12-03 stripe_payments: 105
    records (104 new, 1 unchanged), 3 requests, 0.4 s" (see `core.sync.describe_result`); `connection`
    puts the connection id first, for runs that hold several connections."""
    return describe_result(result, connection=connection)


def _log_results(context: dg.AssetExecutionContext, results: list[SyncResult], connection: bool) -> None:
    """Log each synced window in one line; a run of windows not tried (the provider was unreachable) in one."""
    index = 0
    while index < len(results):
        result = results[index]
        if not isinstance(result.exception, NotTried):
            (context.log.error if result.status == "failed" else context.log.info)(
                describe_sync(result, connection=connection)
            )
            index += 1
            continue
        end = index
        while end + 1 < len(results) and isinstance(results[end + 1].exception, NotTried):
            end += 1
        first, last = result.window.start.date(), results[end].window.start.date()
        when = f"{first} .. {last}" if end > index else str(first)
        head = f"{result.connection_id} {when}" if connection else when
        days = end - index + 1
        context.log.error(f"{head} {result.entity}: FAILED: not tried ({days} day{'s' if days != 1 else ''}) "
                          "after the provider could not be reached")  # fmt: skip
        index = end + 1


def _seconds(seconds: float) -> str:
    """A wait in seconds, as a person would say it: "~0.2 s", "~43 s", "~3.5 min"."""
    if seconds >= 120:
        return f"~{seconds / 60:.1f} min"
    return f"~{seconds:.0f} s" if seconds >= 10 else f"~{seconds:.1f} s"


def _attempt_failed(context: dg.AssetExecutionContext, policy: dg.RetryPolicy | None, started: float, cause: str,
                    metadata: Mapping[str, Any] | None = None, retryable: bool = True,
                    advice: str = "") -> Exception:  # fmt: skip
    """What ends a failed attempt of a sync step (begun at `started`, `time.monotonic()`), in place of
    Dagster's own retry: with attempts left, a `RetryRequested` after logging "attempt 1 of 4 failed after
    1.6 s: <cause>; next attempt in ~30 s" (the wait drawn from `policy` as Dagster would); otherwise the
    final `Failure`, which names the cause (Dagster's policy would end with only "Exceeded max_retries"),
    followed by `advice` (what the user can do)."""
    attempt = context.retry_number + 1
    attempts = policy.max_retries + 1 if policy is not None else 1
    took = f"after {time.monotonic() - started:.1f} s"
    if retryable and attempt < attempts:
        assert policy is not None
        wait = policy.calculate_delay(attempt)
        context.log.warning(f"attempt {attempt} of {attempts} failed {took}: {cause}; next attempt in {_seconds(wait)}")
        retry = dg.RetryRequested(max_retries=policy.max_retries, seconds_to_wait=wait)
        retry.__cause__ = dg.Failure(cause, metadata=metadata)
        return retry
    if attempts > 1 and (retryable or attempt > 1):
        cause = f"attempt {attempt} of {attempts} failed {took}: {cause}"
    return dg.Failure(cause + advice, metadata=metadata, allow_retries=False)


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
        """Why the partition failed: each failed day and its cause; the days not tried after the provider
        could not be reached are counted, not listed."""
        if self.error:
            return self.error
        failed = [r for r in self.results if r.status == "failed"]
        errors = [_cause(r) if self.span is None else f"{r.window.start.date()}: {_cause(r)}"  # whole list: no day
                  for r in failed if not isinstance(r.exception, NotTried)]  # fmt: skip
        not_tried = sum(isinstance(r.exception, NotTried) for r in failed)
        if not_tried:
            errors.append(f"{not_tried} more day{'s' if not_tried != 1 else ''} not tried")
        return "; ".join(errors)


def _cause(result: SyncResult) -> str:
    """A failed window's error as raised (it names provider, connection and cause), else as logged."""
    return str(result.exception) if result.exception is not None else str(result.error)


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
    partitions_def = provider_partitions(provider.name, entity.daily)
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
        started = time.monotonic()
        try:
            planned = yield from _sync_step(context, mirror, clients)
        except (dg.Failure, dg.RetryRequested, dg.DagsterError):
            raise
        except Exception as exc:  # a lost database, a helper process that died: retried like a provider's outage
            raise _attempt_failed(context, retry_policy, started, f"{type(exc).__name__}: {exc}") from exc
        failed = [p for p in planned if p.failed]
        if failed:
            cause = f"{len(failed)} of {len(planned)} partition(s) failed: " + "; ".join(
                f"{p.key}: {p.reason()}" for p in failed[:5]
            )
            others = "the other partitions are materialised, " if len(failed) < len(planned) else ""
            raise _attempt_failed(
                context, retry_policy, started, cause,
                metadata={"failed_partitions": ", ".join(p.key for p in failed[:100])},
                retryable=any(p.retryable for p in failed),
                advice=f" ({others}committed data stays; re-execute from failure to sync only what failed)",
            )  # fmt: skip

    def _sync_step(
        context: dg.AssetExecutionContext, mirror: MirrorDatabase, clients: ProviderClients
    ) -> Generator[dg.AssetMaterialization, None, list[_Partition]]:
        """Sync the run's partitions, connection by connection, materialising each partition as it is
        done; returns them all, the failed ones with their causes."""
        url, schema, box = mirror.url(), mirror.schema(), mirror.secret_box()
        recent = context.run.tags.get(SCOPE_TAG) == RECENT_SCOPE
        since = run_since(context.run.tags, datetime.now(UTC).date())
        planned = _planned(partitions_def, entity, list(context.partition_keys))
        family = _run_family(context)
        by_connection: dict[str, list[_Partition]] = defaultdict(list)
        for partition in planned:
            by_connection[partition.connection_id].append(partition)
        # Log lines name the connection only when the run holds several.
        several = len(by_connection) > 1
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
                if not entity.daily and whole_list_done(reads, schema, entity.name, connection_id, family,
                                                        swept=entity.name in provider.id_sweeps):  # fmt: skip
                    # A retry, or a re-execution from failure, reads again only the connections that failed.
                    for partition in partitions:
                        partition.skipped = len(partition.windows)
                    context.log.info(f"{entity.name} {connection_id}: read whole by an earlier attempt of this run; "
                                     "not read again")  # fmt: skip
                    continue
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
                except ProviderError as exc:  # before any window (a client that could not open): retryable
                    for partition in partitions:
                        partition.error = str(exc)
                    context.log.error(f"{entity.name} {connection_id}: {exc}")
                    continue
                for (partition, _), result in zip(todo, synced, strict=True):
                    partition.results.append(result)
                _log_results(context, synced, several)
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
        return planned

    return _sync


def build_provider_assets(
    provider: Provider, retry_policy: dg.RetryPolicy | None = SYNC_RETRY_POLICY
) -> list[dg.AssetsDefinition]:
    """One asset per entity of the provider."""
    return [build_entity_asset(provider, entity, retry_policy) for entity in provider.entities]
