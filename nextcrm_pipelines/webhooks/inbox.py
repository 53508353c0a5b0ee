"""Applying the webhook inbox: claim due events, apply them per connection, record the outcome.

An apply run claims due rows of one provider (`pending`, or `failed` whose backoff has passed) with
`FOR UPDATE SKIP LOCKED`, in id order and bounded batches, hands each connection's events to the
provider's `apply`, and marks them `processed`. When a batch fails, its events are applied one by one
so only the bad ones fail: those are retried with exponential backoff and end `dead` after the last
attempt, their error kept (`requeue` puts them back). Events of types no table uses are processed and
counted as skipped. Applying is idempotent (the upserts never regress), so an event seen twice
changes nothing. Each batch writes a sync log row (partition `webhooks`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.connections import get_connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.sync import SyncResult, SyncWindow, finish_log, start_log
from nextcrm_pipelines.core.upsert import BatchCounts, Row, TableSpec, UpsertWriter
from nextcrm_pipelines.core.vault import SecretBox

log = logging.getLogger(__name__)

BATCH = 500
MAX_ATTEMPTS = 5
WEBHOOK_PARTITION = "webhooks"


@dataclass(frozen=True)
class InboxRow:
    id: int
    connection_id: str
    event_type: str | None
    occurred_at: datetime | None
    payload: Any


class RecordsRefused(Exception):
    """The database refused rows an event carried (the ids and the first error are in the message)."""


@dataclass
class ApplyContext:
    """What a provider's `apply` works with: the inbox session, the connection, its API client on demand
    (thin events re-fetch), and `upsert` / `bury` / `skip`, which also count what changed per table."""

    conn: psycopg.Connection
    schema: str
    connection_id: str
    database_url: str
    provider: str
    box: SecretBox | None = None
    written: dict[str, BatchCounts] = field(default_factory=dict)
    skipped: int = 0
    stats: RequestStats = field(default_factory=RequestStats)
    _stack: ExitStack = field(default_factory=ExitStack)
    _client: Any = None
    _writers: dict[str, UpsertWriter] = field(default_factory=dict)

    def client(self) -> Any:
        """The connection's provider client, opened once per batch (tokens refreshed as a sync would)."""
        if self._client is None:
            from nextcrm_pipelines.core.runner import open_connection
            from nextcrm_pipelines.providers import PROVIDERS

            opened = open_connection(database_url=self.database_url, provider=PROVIDERS[self.provider],
                                     connection_id=self.connection_id, box=self.box)  # fmt: skip
            _, _, self._client, self.stats = self._stack.enter_context(opened)
        return self._client

    def tenant(self) -> str:
        """The connection's external tenant (Xero tenant id, QuickBooks realm id): events name theirs."""
        tenant = get_connection(self.conn, self.connection_id).external_tenant
        if not tenant:
            raise ValueError(f"{self.provider} connection {self.connection_id!r} has no tenant id; reconnect it")
        return tenant

    def _writer(self, spec: TableSpec) -> UpsertWriter:
        if spec.name not in self._writers:
            self._writers[spec.name] = UpsertWriter(self.conn, spec, self.connection_id, self.schema)
        return self._writers[spec.name]

    def _count(self, spec: TableSpec, counts: BatchCounts) -> None:
        self.written.setdefault(spec.name, BatchCounts()).add(counts)

    def upsert(self, spec: TableSpec, rows: Sequence[Row]) -> BatchCounts:
        """Upsert rows under the never-regress rule; raises `RecordsRefused` if the database refused any."""
        writer = self._writer(spec)
        before = len(writer.failures)
        counts = writer.write(rows)
        self._count(spec, counts)
        refused = writer.failures[before:]
        if refused:
            ids = ", ".join(f.id for f in refused[:5])
            raise RecordsRefused(f"{len(refused)} {spec.name} row(s) refused ({ids}): {refused[0].error}")
        return counts

    def bury(self, spec: TableSpec, ids: list[str], version: datetime) -> BatchCounts:
        """Flag stored rows deleted upstream as of `version` (never regressing); returns the counts."""
        done = self._writer(spec).bury(ids, version)
        counts = BatchCounts(updated=done, unchanged=len(ids) - done)
        self._count(spec, counts)
        return counts

    def skip(self, count: int = 1) -> None:
        """Count events that touch nothing we store (processed and kept, not applied)."""
        self.skipped += count

    def close(self) -> None:
        self._stack.close()


# apply(context, events) -> counts; raises to fail the events (retried later).
Apply = Callable[[ApplyContext, list[InboxRow]], BatchCounts]


@dataclass
class ApplyOutcome:
    processed: int = 0
    failed: int = 0
    dead: int = 0
    skipped: int = 0
    counts: BatchCounts = field(default_factory=BatchCounts)
    by_table: dict[str, BatchCounts] = field(default_factory=dict)
    connections: set[str] = field(default_factory=set)
    results: list[SyncResult] = field(default_factory=list)


_DUE = "status IN ('pending', 'failed') AND (next_attempt_at IS NULL OR next_attempt_at <= now())"


@dataclass(frozen=True)
class DueBatch:
    """The next bounded batch of a provider's due events: what a sensor keys one apply run by."""

    count: int
    first_id: int
    last_id: int
    attempts: int

    @property
    def run_key(self) -> str:
        return f"{self.first_id}-{self.last_id}:{self.count}:{self.attempts}"


def due_batch(conn: psycopg.Connection, schema: str, provider: str, limit: int) -> DueBatch | None:
    """The first `limit` due events of `provider` by id, or None when nothing is due.

    Read from the inbox's status rather than from an id high-water mark, so an id that commits after
    a higher one (ids are taken at insert, rows appear at commit) is still found on a later tick.
    """
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), min(id), max(id), coalesce(sum(attempts), 0) FROM "
            "(SELECT id, attempts FROM {} WHERE provider = %s AND " + _DUE + " ORDER BY id LIMIT %s) AS due"
        ).format(table("webhook_events", schema)),
        (provider, limit),
    ).fetchone()
    return DueBatch(int(row[0]), int(row[1]), int(row[2]), int(row[3])) if row[0] else None


def apply_pending(*, database_url: str, schema: str, provider: str, apply: Apply, run_id: str | None = None,
                  batch: int = BATCH, limit: int | None = None,
                  box: SecretBox | None = None) -> ApplyOutcome:  # fmt: skip
    """Apply due events of `provider` in id order, batch by batch, until none is left (or `limit` were claimed)."""
    inbox = table("webhook_events", schema)
    outcome = ApplyOutcome()
    claimed_so_far = 0
    with psycopg.connect(libpq_url(database_url)) as conn:
        while limit is None or claimed_so_far < limit:
            size = batch if limit is None else min(batch, limit - claimed_so_far)
            claimed = conn.execute(
                sql.SQL(
                    "SELECT id, connection_id, event_type, occurred_at, payload FROM {} WHERE provider = %s AND "
                    + _DUE
                    + " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
                ).format(inbox),
                (provider, size),
            ).fetchall()
            if not claimed:
                break
            claimed_so_far += len(claimed)
            by_connection: dict[str, list[InboxRow]] = defaultdict(list)
            for row in claimed:
                by_connection[row[1]].append(InboxRow(*row))
            for connection_id, events in by_connection.items():
                context = ApplyContext(conn, schema, connection_id, database_url, provider, box)
                try:
                    _apply_one(context, events, apply, run_id, outcome)
                finally:
                    context.close()
            conn.commit()  # releases the claim on rows of connections whose apply raised before marking
        conn.commit()
    return outcome


def _mark_processed(context: ApplyContext, ids: list[int]) -> None:
    context.conn.execute(
        sql.SQL("UPDATE {} SET status = 'processed', processed_at = now(), attempts = attempts + 1, "
                "last_error = NULL, next_attempt_at = NULL WHERE id = ANY(%s)").format(
            table("webhook_events", context.schema)),
        (ids,),
    )  # fmt: skip
    context.conn.commit()


def _mark_failed(context: ApplyContext, ids: list[int], error: str) -> int:
    """Record a failed attempt (backoff 30 s x 2^attempts); returns how many of `ids` are now dead."""
    statuses = context.conn.execute(
        sql.SQL(
            "UPDATE {} SET attempts = attempts + 1, last_error = %s, "
            "status = CASE WHEN attempts + 1 >= %s THEN 'dead' ELSE 'failed' END, "
            "next_attempt_at = now() + make_interval(secs => 30 * power(2, attempts)) "
            "WHERE id = ANY(%s) RETURNING status"
        ).format(table("webhook_events", context.schema)),
        (error, MAX_ATTEMPTS, ids),
    ).fetchall()
    context.conn.commit()
    return sum(1 for (status,) in statuses if status == "dead")


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _apply_one(context: ApplyContext, events: list[InboxRow], apply: Apply, run_id: str | None,
               outcome: ApplyOutcome) -> None:  # fmt: skip
    conn, schema, provider, connection_id = context.conn, context.schema, context.provider, context.connection_id
    now = datetime.now(UTC)
    result = SyncResult(entity=f"{provider}_webhooks", connection_id=connection_id, window=SyncWindow(now, now))
    result.sync_log_id = start_log(conn, schema, provider, result.entity, connection_id, result.window, run_id,
                                   WEBHOOK_PARTITION)  # fmt: skip
    result.total = len(events)
    errors: list[str] = []
    try:
        result.counts.add(apply(context, events))
        _mark_processed(context, [e.id for e in events])
        outcome.processed += len(events)
    except Exception as exc:
        conn.rollback()
        if len(events) == 1:
            errors.append(_error_text(exc))
            outcome.dead += _mark_failed(context, [events[0].id], errors[0])
            outcome.failed += 1
        else:
            # One bad event must not hold back the others: apply them one at a time.
            log.warning("%s webhooks of %s: batch failed (%s); applying event by event", provider, connection_id,
                        _error_text(exc))  # fmt: skip
            for event in events:
                try:
                    result.counts.add(apply(context, [event]))
                    _mark_processed(context, [event.id])
                    outcome.processed += 1
                except Exception as single:
                    conn.rollback()
                    errors.append(f"event {event.id}: {_error_text(single)}")
                    outcome.dead += _mark_failed(context, [event.id], _error_text(single))
                    outcome.failed += 1
    for message in errors:
        log.error("%s webhooks of %s failed: %s", provider, connection_id, message)
    result.status = "success" if not errors else ("failed" if len(errors) == len(events) else "partial")
    result.error = "; ".join(errors)[:1000] or None
    result.duration = (datetime.now(UTC) - now).total_seconds()
    result.stats = context.stats
    outcome.counts.add(result.counts)
    outcome.skipped += context.skipped
    outcome.connections.add(connection_id)
    for name, counts in context.written.items():
        outcome.by_table.setdefault(name, BatchCounts()).add(counts)
    finish_log(conn, schema, result)
    outcome.results.append(result)


def requeue(conn: psycopg.Connection, schema: str, *, provider: str | None = None, connection_id: str | None = None,
            event_ids: Sequence[str] = (), statuses: Sequence[str] = ("dead",)) -> tuple[int, int]:  # fmt: skip
    """Put matching inbox events back to `pending` with fresh attempts (the `webhooks replay` command).

    Returns (re-queued, left alone): rows recorded without a readable event (refused bodies kept for
    audit) cannot be applied and stay as they are.
    """
    filters = [sql.SQL("status = ANY(%(statuses)s)")]
    if provider:
        filters.append(sql.SQL("provider = %(provider)s"))
    if connection_id:
        filters.append(sql.SQL("connection_id = %(connection)s"))
    if event_ids:
        filters.append(sql.SQL("event_id = ANY(%(events)s)"))
    where = sql.SQL(" AND ").join(filters)
    params = {"statuses": list(statuses), "provider": provider, "connection": connection_id, "events": list(event_ids)}
    inbox = table("webhook_events", schema)
    requeued = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'pending', attempts = 0, next_attempt_at = NULL, processed_at = NULL "
            "WHERE {} AND payload IS NOT NULL RETURNING id"
        ).format(inbox, where),
        params,
    ).rowcount
    unreadable = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} AND payload IS NULL").format(inbox, where),
                              params).fetchone()[0]  # fmt: skip
    conn.commit()
    return requeued, int(unreadable)
