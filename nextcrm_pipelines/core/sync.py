"""The incremental sync engine shared by every provider.

A provider's client yields pages of raw records for a window, each with the time its state was
true; the entity's mapping turns each into a `Row`; this engine streams them through a bounded
queue (a producer thread fetches and maps while the caller's thread writes, so HTTP and Postgres
overlap), writes batches with `UpsertWriter`, and records the outcome in `integration_sync_logs`.
Memory is bounded by the queue depth times the batch size, whatever the number of records.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.upsert import BatchCounts, FailedRecord, Row, TableSpec, UpsertWriter

log = logging.getLogger(__name__)

Record = tuple[dict[str, Any], datetime]
"""A raw provider object and the time its state was true (updated time, event time or fetch time)."""

MAX_REMEMBERED_FAILURES = 200


@dataclass(frozen=True)
class EntitySpec:
    """One synced entity: its asset/table name, table layout and mapping from raw JSON."""

    name: str
    table: TableSpec
    to_row: Callable[[dict[str, Any], datetime], Row]
    description: str


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


class _Stop(Exception):
    """The writer gave up; the producer stops fetching."""


def _produce(
    pages: Iterable[list[Record]],
    entity: EntitySpec,
    batch_size: int,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Fetch pages, map records to rows and hand over batches; map failures travel as FailedRecord."""

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stop

    try:
        batch: list[Row] = []
        failures: list[FailedRecord] = []
        for page in pages:
            for raw, version in page:
                try:
                    batch.append(entity.to_row(raw, version))
                except Exception as exc:
                    record_id = raw.get("id", "<no id>") if isinstance(raw, dict) else "<not an object>"
                    failures.append(FailedRecord(str(record_id), f"{type(exc).__name__}: {exc}"[:300]))
            if len(batch) >= batch_size or failures:
                put((batch, failures))
                batch, failures = [], []
        put((batch, failures))
        put(None)
    except _Stop:
        return
    except BaseException as exc:
        try:
            put(exc)
        except _Stop:
            return


def _start_log(conn: psycopg.Connection, schema: str, provider: str, entity: str, connection_id: str,
               window: SyncWindow, run_id: str | None, partition: str | None) -> int:  # fmt: skip
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {t} (connection_id, provider, asset, partition, window_start, window_end, run_id, status) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, 'running') RETURNING id"
        ).format(t=table("integration_sync_logs", schema)),
        (connection_id, provider, entity, partition, window.start, window.end, run_id),
    ).fetchone()
    conn.commit()
    return int(row[0])


def _rows_created_in(conn: psycopg.Connection, schema: str, entity: EntitySpec, connection_id: str,
                    window: SyncWindow) -> int:  # fmt: skip
    """Rows of the connection created in the window: the partition's row count."""
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE connection_id = %s AND created_at >= %s AND created_at < %s").format(
            table(entity.table.name, schema)
        ),
        (connection_id, window.start, window.end),
    ).fetchone()
    return int(row[0])


def _finish_log(conn: psycopg.Connection, schema: str, result: SyncResult) -> None:
    conn.execute(
        sql.SQL(
            """UPDATE {t} SET status = %s, total_records = %s, synced_records = %s, inserted_records = %s,
                   updated_records = %s, unchanged_records = %s, failed_records = %s, requests = %s,
                   retries = %s, rate_limit_waits = %s, error = %s, completed_at = now(),
                   duration_seconds = %s
               WHERE id = %s"""
        ).format(t=table("integration_sync_logs", schema)),
        (
            result.status, result.total, result.synced, result.counts.inserted, result.counts.updated,
            result.counts.unchanged, result.counts.failed, result.stats.requests, result.stats.retries,
            result.stats.rate_limit_waits, result.error, round(result.duration, 3), result.sync_log_id,
        ),
    )  # fmt: skip
    vault.record_sync_outcome(conn, result.connection_id, result.status, result.error)
    conn.commit()


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
    batch_size: int = 5000,
    queue_depth: int = 3,
) -> SyncResult:
    """Stream `pages` into the entity's table over `conn`; every committed batch stays if the sync dies.

    Raises the fetch or write error after recording it (status `failed`); a run that only lost
    individual malformed records ends `partial` with their ids in the log and the result.
    """
    result = SyncResult(entity=entity.name, connection_id=connection_id, window=window, stats=stats)
    started = time.monotonic()
    result.sync_log_id = _start_log(conn, schema, provider, entity.name, connection_id, window, run_id, partition)
    writer = UpsertWriter(conn, entity.table, connection_id, schema)
    handoff: queue.Queue = queue.Queue(maxsize=queue_depth)
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(pages, entity, batch_size, handoff, stop), name=f"fetch-{entity.name}", daemon=True
    )
    producer.start()
    failure: BaseException | None = None
    try:
        while True:
            item = handoff.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            rows, mapping_failures = item
            for failed in mapping_failures:
                log.warning("%s: record %s skipped: %s", entity.name, failed.id, failed.error)
            result.failures.extend(mapping_failures[: MAX_REMEMBERED_FAILURES - len(result.failures)])
            result.counts.failed += len(mapping_failures)
            result.total += len(rows) + len(mapping_failures)
            if rows:
                result.counts.add(writer.write(rows))
            result.failures.extend(writer.failures[: MAX_REMEMBERED_FAILURES - len(result.failures)])
            writer.failures.clear()
    except BaseException as exc:
        failure = exc
        conn.rollback()
    finally:
        stop.set()
        producer.join(timeout=30)
    result.duration = time.monotonic() - started
    if failure is not None:
        result.status = "failed"
        result.error = f"{type(failure).__name__}: {failure}"[:2000]
    elif result.counts.failed:
        result.status = "partial"
        result.error = f"{result.counts.failed} record(s) could not be stored: " + ", ".join(
            f.id for f in result.failures[:20]
        )
    else:
        result.status = "success"
    result.rows_in_window = _rows_created_in(conn, schema, entity, connection_id, window)
    _finish_log(conn, schema, result)
    if failure is not None:
        raise failure
    return result
