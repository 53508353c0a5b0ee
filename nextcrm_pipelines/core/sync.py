"""The incremental sync engine shared by every provider.

A provider's client yields pages of raw records for a window, each with the time its state was
true; the entity's mapping turns each into a `Row`; this engine streams them through a bounded
queue (a producer thread fetches and maps while the caller's thread writes, so HTTP and Postgres
overlap, also across the windows of a backfill), writes batches with `UpsertWriter`, and records
each window's outcome in `integration_sync_logs`. Memory is bounded by the queue depth times the
batch size, whatever the number of records or windows.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderUnreachable, RequestStats
from nextcrm_pipelines.core.upsert import BatchCounts, FailedRecord, Row, TableSpec, UpsertWriter

log = logging.getLogger(__name__)

Record = tuple[dict[str, Any], datetime]
"""A raw provider object and the time its state was true (updated time, event time or fetch time)."""

MAX_REMEMBERED_FAILURES = 200
# Rows per transaction, and batches in flight between fetching and writing: together they bound
# the memory of a sync (about BATCH_SIZE x (QUEUE_DEPTH + 2) rows at once).
BATCH_SIZE = 1000
QUEUE_DEPTH = 2


@dataclass(frozen=True)
class EntitySpec:
    """One synced entity: its asset/table name, table layout and mapping from raw JSON."""

    name: str
    table: TableSpec
    to_row: Callable[[dict[str, Any], datetime], Row]
    description: str
    # The provider's id field (named in logs when a record cannot be mapped).
    id_field: str = "id"
    # A partition holds the rows whose this-column falls in its day: `created_at` where the provider
    # lists by creation (Stripe), `source_updated_at` where windows select by updated time.
    partition_column: str = "created_at"
    # How to name a record in logs when its id is not a top-level field (PayPal's transaction_info).
    id_of: Callable[[dict[str, Any]], str] | None = None
    # False: partitioned by connection only; each run reads the whole list (small entities with no
    # usable time filter) and the provider's id sweep then flags what disappeared.
    daily: bool = True


@dataclass(frozen=True)
class Coverage:
    """Yielded by a fetch instead of a page: the provider showed data only up to `until` (PayPal's
    reporting lag), so the window is logged as covered up to there and is re-read later."""

    until: datetime


class Changes(list):
    """A page of objects changed in the window that may already be stored (an events feed), as
    opposed to a listing of objects created in it. The engine writes such pages in batches of their
    own, looked up by key: the batches of a backfill's creation listings keep copying straight in.
    """


@dataclass(frozen=True)
class SyncWindow:
    start: datetime
    end: datetime

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"


@dataclass
class SyncResult:
    """The outcome of syncing one connection x window of one entity."""

    entity: str
    connection_id: str
    window: SyncWindow
    status: str = "running"
    total: int = 0
    counts: BatchCounts = field(default_factory=BatchCounts)
    stats: RequestStats = field(default_factory=RequestStats)
    duration: float = 0.0
    error: str | None = None
    failures: list[FailedRecord] = field(default_factory=list)
    sync_log_id: int | None = None
    rows_in_window: int = 0
    # The window's position in the list of windows the sync was given.
    index: int = 0
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def synced(self) -> int:
        return self.counts.inserted + self.counts.updated

    def summary(self) -> dict[str, Any]:
        """Plain values for the sync log and Dagster metadata (no secrets: counts and the window)."""
        return {
            "status": self.status,
            "window_start": self.window.start.isoformat(),
            "window_end": self.window.end.isoformat(),
            "records": self.total,
            "rows_in_window": self.rows_in_window,
            "inserted": self.counts.inserted,
            "updated": self.counts.updated,
            "unchanged": self.counts.unchanged,
            "failed": self.counts.failed,
            **self.stats.as_dict(),
            "duration_seconds": round(self.duration, 3),
        }


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def describe_result(result: SyncResult, *, connection: bool = False) -> str:
    """One synced window as a short line for run logs and the CLI, e.g. "2026-12-03 stripe_payments:
    105 records (104 new, 1 unchanged), 3 requests, 0.4 s": counts that are zero are left out, a
    whole-list read says "whole list" for its day, a failed window leads with "FAILED: <cause>".
    `connection` puts the connection id first (for runs that hold several). Never record contents."""
    from nextcrm_pipelines.core.runner import SNAPSHOT_START  # the runner imports this module

    window = result.window
    if window.start == SNAPSHOT_START:
        when = "whole list"
    elif window.end - window.start > timedelta(days=1):
        when = f"{window.start.date()} .. {(window.end - timedelta(microseconds=1)).date()}"
    else:
        when = str(window.start.date())
    head = f"{result.connection_id} {when}" if connection else when
    counts, stats = result.counts, result.stats
    parts = [(counts.inserted, "new"), (counts.updated, "updated"), (counts.unchanged, "unchanged"),
             (counts.failed, "failed")]  # fmt: skip
    detail = ", ".join(f"{n} {label}" for n, label in parts if n)
    figures = [_plural(result.total, "record") + (f" ({detail})" if detail else ""), _plural(stats.requests, "request")]
    if stats.retries:
        figures.append(_plural(stats.retries, "retry", "retries"))
    if stats.rate_limit_waits:
        figures.append(_plural(stats.rate_limit_waits, "rate-limit wait"))
    figures.append(f"{result.duration:.2f} s" if result.duration < 0.1 else f"{result.duration:.1f} s")
    line = f"{head} {result.entity}: "
    if result.status == "failed":
        cause = str(result.exception) if result.exception is not None else result.error
        return f"{line}FAILED: {cause}; " + ", ".join(figures)
    if result.status == "partial":
        return f"{line}PARTIAL: {result.error}; " + ", ".join(figures)
    return line + ", ".join(figures)


class _Stop(Exception):
    """The writer gave up; the producer stops fetching."""


class NotTried(RuntimeError):
    """A window left unsynced because an earlier window of the same sync found the provider unreachable:
    fetching it would only have waited the same way. A later sync (the step's retry) reads it."""


class Reachability:
    """Whether the provider has answered this sync, or could not be reached (and why).

    This one serves a single process; processes sharing a backfill share one
    (`runner.WindowClaims`), so that once one of them finds the provider down the others try no
    more windows either.
    """

    def __init__(self) -> None:
        self._cause: str | None = None

    def answered(self) -> None:
        """The provider answered (or a window ended for a reason other than being unreachable)."""

    def unreachable(self, cause: str) -> None:
        """No connection to the provider could be opened: `cause` says why."""
        if self._cause is None:
            self._cause = cause

    def down(self) -> str | None:
        """Why the provider could not be reached, or None while it could be."""
        return self._cause


Fetch = Callable[[SyncWindow], Iterable[list[Record]]]
Claim = Callable[[], "int | None"]
"""The index of the next window to sync, or None when none is left (windows shared between processes)."""


def in_order(count: int) -> Claim:
    """Every window, first to last."""
    indexes = iter(range(count))
    return lambda: next(indexes, None)


def _record_id(entity: EntitySpec, raw: Any) -> str:
    """A record's id for a log line, however malformed the record."""
    if not isinstance(raw, dict):
        return "<no object>"
    try:
        return str(entity.id_of(raw) if entity.id_of else raw.get(entity.id_field, "<no id>"))
    except Exception:
        return "<no id>"


def _produce(
    windows: list[SyncWindow],
    claim: Claim,
    fetch: Fetch,
    entity: EntitySpec,
    stats: RequestStats,
    batch_size: int,
    out: queue.Queue,
    stop: threading.Event,
    fatal: tuple[type[BaseException], ...],
    fetch_started: dict[int, float],
    unreachable: tuple[type[BaseException], ...] = (),
    reachability: Reachability | None = None,
) -> None:
    """Fetch the pages of each window `claim` hands out, map records to rows and hand over batches,
    window by window, noting in `fetch_started` when each window's fetch began.

    Messages: ("rows", i, rows, failures, from a `Changes` page), ("end", i, request counts, error or
    None), then None.
    A window whose fetch fails ends with its error and the next window starts, unless the error is
    `fatal` (bad credentials: every later window would fail the same way). After an `unreachable`
    error (the provider could not be reached) the later windows end at once, `NotTried`, without a request;
    `reachability` carries that finding (and the first answer) to the processes sharing the windows.
    """
    reach = reachability or Reachability()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stop

    try:
        while not stop.is_set() and (index := claim()) is not None:
            window = windows[index]
            fetch_started[index] = time.monotonic()
            before = stats.as_dict()
            error: BaseException | None = None
            batch: list[Row] = []
            failures: list[FailedRecord] = []
            changes = False
            if (down := reach.down()) is not None:
                skipped = NotTried(f"not tried after the provider could not be reached: {down}")
                put(("end", index, dict.fromkeys(before, 0), skipped))
                continue
            try:
                for page in fetch(window):
                    reach.answered()
                    if isinstance(page, Coverage):
                        put(("covered", index, page.until))
                        continue
                    if isinstance(page, Changes) != changes:
                        if batch or failures:
                            put(("rows", index, batch, failures, changes))
                            batch, failures = [], []
                        changes = not changes
                    for raw, version in page:
                        try:
                            batch.append(entity.to_row(raw, version))
                        except Exception as exc:
                            record_id = _record_id(entity, raw)
                            failures.append(FailedRecord(str(record_id), f"{type(exc).__name__}: {exc}"[:300]))
                    if len(batch) >= batch_size or failures:
                        put(("rows", index, batch, failures, changes))
                        batch, failures = [], []
            except _Stop:
                raise
            except Exception as exc:
                error = exc
                if isinstance(exc, unreachable):
                    reach.unreachable(str(exc))
            reach.answered()
            put(("rows", index, batch, failures, changes))
            after = stats.as_dict()
            put(("end", index, {k: after[k] - before[k] for k in after}, error))
            if error is not None and isinstance(error, fatal):
                break
        put(None)
    except _Stop:
        return
    except BaseException as exc:
        try:
            put(exc)
        except _Stop:
            return
    finally:
        reach.answered()  # processes waiting for this one's first answer go on, whatever happened


def start_log(conn: psycopg.Connection, schema: str, provider: str, entity: str, connection_id: str,
              window: SyncWindow, run_id: str | None, partition: str | None, elapsed: float = 0.0) -> int:  # fmt: skip
    """Open a window's sync log row (`running`); `elapsed` dates its start back to when its work began
    (the fetch may have run, or failed, before the row is written), on the database's clock."""
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {t} (connection_id, provider, asset, partition, window_start, window_end, run_id, status, "
            "started_at) VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', now() - make_interval(secs => %s)) "
            "RETURNING id"
        ).format(t=table("integration_sync_logs", schema)),
        (connection_id, provider, entity, partition, window.start, window.end, run_id, max(0.0, elapsed)),
    ).fetchone()
    conn.commit()
    return int(row[0])


# The partition of the sync log rows webhook apply batches write (they do not take a connection's lock).
WEBHOOK_PARTITION = "webhooks"
ABANDONED = "the sync ended without finishing (its process was stopped); a later sync re-reads the window"


def close_abandoned_logs(conn: psycopg.Connection, schema: str, connection_id: str) -> int:
    """Mark the connection's sync logs still `running` as `failed`: called by a sync that holds the
    connection's lock, no other sync of it can be running, so those were left by a killed process
    (webhook apply batches, which do not take the lock, are left alone). Returns how many."""
    closed = conn.execute(
        sql.SQL(
            "UPDATE {t} SET status = 'failed', error = %s, completed_at = now() "
            "WHERE connection_id = %s AND status = 'running' AND partition IS DISTINCT FROM %s"
        ).format(t=table("integration_sync_logs", schema)),
        (ABANDONED, connection_id, WEBHOOK_PARTITION),
    ).rowcount
    conn.commit()
    return closed


def rows_created_in(conn: psycopg.Connection, schema: str, entity: EntitySpec, connection_id: str,
                    window: SyncWindow) -> int:  # fmt: skip
    """Rows of the connection that belong to the window: the partition's row count."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE connection_id = %s AND {c} >= %s AND {c} < %s").format(
            table(entity.table.name, schema), c=sql.Identifier(entity.partition_column)
        ),
        (connection_id, window.start, window.end),
    ).fetchone()
    return int(row[0])


def finish_log(conn: psycopg.Connection, schema: str, result: SyncResult) -> None:
    conn.execute(
        sql.SQL(
            """UPDATE {t} SET status = %s, total_records = %s, synced_records = %s, inserted_records = %s,
                   updated_records = %s, unchanged_records = %s, failed_records = %s, requests = %s,
                   retries = %s, rate_limit_waits = %s, error = %s, completed_at = now(),
                   duration_seconds = %s, window_end = %s
               WHERE id = %s"""
        ).format(t=table("integration_sync_logs", schema)),
        (
            result.status, result.total, result.synced, result.counts.inserted, result.counts.updated,
            result.counts.unchanged, result.counts.failed, result.stats.requests, result.stats.retries,
            result.stats.rate_limit_waits, result.error, round(result.duration, 3), result.window.end,
            result.sync_log_id,
        ),
    )  # fmt: skip
    vault.record_sync_outcome(conn, result.connection_id, result.status, result.error)
    conn.commit()


# Allocations between two young-generation collections while a sync runs (Python's default: 700).
# Parsed pages are acyclic containers by the thousand; at the default the collector runs several
# times per page and costs about a third of parsing and mapping a record.
SYNC_GC_YOUNG_THRESHOLD = 20_000
_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] = gc.get_threshold()


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Collect garbage less often while syncs run: freeze what predates them, raise the young threshold.

    A sync allocates millions of short-lived JSON containers, which trigger collections that would
    otherwise re-walk every long-lived object of the process (Dagster's included) each time. Nested
    and concurrent syncs share one setting; the last to finish restores the process's own.
    """
    global _gc_users, _gc_saved
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(_gc_saved[0], SYNC_GC_YOUNG_THRESHOLD), *_gc_saved[1:])
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0:
                gc.set_threshold(*_gc_saved)
                gc.unfreeze()


@fewer_gc_passes()
def sync_windows(
    *,
    conn: psycopg.Connection,
    schema: str,
    provider: str,
    entity: EntitySpec,
    connection_id: str,
    windows: list[SyncWindow],
    fetch: Fetch,
    stats: RequestStats,
    run_id: str | None = None,
    partitions: list[str | None] | None = None,
    batch_size: int = BATCH_SIZE,
    queue_depth: int = QUEUE_DEPTH,
    fatal: tuple[type[BaseException], ...] = (),
    claim: Claim | None = None,
    unreachable: tuple[type[BaseException], ...] = (ProviderUnreachable,),
    reachability: Reachability | None = None,
) -> list[SyncResult]:
    """Sync each window of one connection's entity over `conn`, fetching the next while writing.

    `claim` picks the windows (default: all, in order); processes that share a backfill each sync
    the ones their shared claim hands them. Results come in the order of the windows' indexes.

    Each window gets its own sync log row and result; every committed batch stays if the process
    dies. A window whose fetch failed is logged `failed` with its error (in `result.error`) and
    the others go on; a `fatal` fetch error or a database error stops the run and is raised after
    the windows seen so far are logged. After an `unreachable` error (no connection to the provider
    could be opened) the remaining windows are logged `failed` as `NotTried` at once, without a request
    (and, through a shared `reachability`, those of the processes sharing the windows).
    A window that only lost malformed records ends `partial`.

    A window's duration runs from when its fetch began (or the previous window ended, if later: the
    next window is fetched while one is written) to its log's completion, failures included: the
    windows' durations add up to the time the sync took.
    """
    partitions = partitions or [None] * len(windows)
    # Batches commit without waiting for the disk; each window's log commit (durable) flushes them.
    writer = UpsertWriter(conn, entity.table, connection_id, schema, durable=False)
    handoff: queue.Queue = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()
    # When the producer began fetching each window (time.monotonic()), by window index.
    fetch_started: dict[int, float] = {}
    producer = threading.Thread(
        target=_produce,
        args=(windows, claim or in_order(len(windows)), fetch, entity, stats, batch_size, handoff, stop, fatal,
              fetch_started, unreachable, reachability),
        name=f"fetch-{entity.name}",
        daemon=True,
    )  # fmt: skip
    results: list[SyncResult] = []
    current: SyncResult | None = None
    current_index = -1
    started = 0.0
    # When the previous window's log was completed: the next window's time starts no earlier.
    last_finished = 0.0
    raised: BaseException | None = None

    def begin(index: int) -> SyncResult:
        nonlocal started
        now = time.monotonic()
        started = max(fetch_started.get(index, now), last_finished)
        result = SyncResult(entity=entity.name, connection_id=connection_id, window=windows[index], index=index)
        result.sync_log_id = start_log(conn, schema, provider, entity.name, connection_id, windows[index], run_id,
                                       partitions[index], elapsed=now - started)  # fmt: skip
        results.append(result)
        return result

    def finish(result: SyncResult, counts: dict[str, float], error: BaseException | None) -> None:
        nonlocal last_finished
        result.stats.add(**counts)
        if error is not None:
            result.status = "failed"
            result.error = f"{type(error).__name__}: {error}"[:2000]
            result.exception = error
        elif result.counts.failed:
            result.status = "partial"
            result.error = f"{result.counts.failed} record(s) could not be stored: " + ", ".join(
                f.id for f in result.failures[:20]
            )
        else:
            result.status = "success"
        result.rows_in_window = rows_created_in(conn, schema, entity, connection_id, result.window)
        last_finished = time.monotonic()
        result.duration = last_finished - started
        finish_log(conn, schema, result)

    producer.start()
    try:
        while True:
            item = handoff.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            kind, index = item[0], item[1]
            if current is None or current_index != index:
                current, current_index = begin(index), index
            if kind == "covered":
                start, end = current.window.start, current.window.end
                current.window = SyncWindow(start, max(start, min(item[2], end)))
            elif kind == "rows":
                _, _, rows, mapping_failures, changes = item
                for failed in mapping_failures:
                    log.warning("%s: record %s skipped: %s", entity.name, failed.id, failed.error)
                current.failures.extend(mapping_failures[: MAX_REMEMBERED_FAILURES - len(current.failures)])
                current.counts.failed += len(mapping_failures)
                current.total += len(rows) + len(mapping_failures)
                if rows:
                    current.counts.add(writer.write(rows, may_be_stored=changes))
                current.failures.extend(writer.failures[: MAX_REMEMBERED_FAILURES - len(current.failures)])
                writer.failures.clear()
            else:
                _, _, counts, error = item
                finish(current, counts, error)
                if error is not None and isinstance(error, fatal):
                    raised = error
                current = None
    except BaseException as exc:
        raised = exc
        if current is not None:
            try:
                conn.rollback()
                finish(current, {}, exc)
            except psycopg.Error:
                log.exception("%s: could not record the failed sync of %s", entity.name, current.window)
    finally:
        stop.set()
        producer.join(timeout=30)
    if raised is not None:
        raise raised
    return sorted(results, key=lambda result: result.index)


def sync_entity(
    *,
    conn: psycopg.Connection,
    schema: str,
    provider: str,
    entity: EntitySpec,
    connection_id: str,
    window: SyncWindow,
    pages: Iterable[list[Record]],
    stats: RequestStats,
    run_id: str | None = None,
    partition: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> SyncResult:
    """Stream one window's `pages` into the entity's table; raises the error of a failed window."""
    (result,) = sync_windows(
        conn=conn, schema=schema, provider=provider, entity=entity, connection_id=connection_id,
        windows=[window], fetch=lambda _window: pages, stats=stats, run_id=run_id, partitions=[partition],
        batch_size=batch_size,
    )  # fmt: skip
    if result.exception is not None:
        raise result.exception
    return result
