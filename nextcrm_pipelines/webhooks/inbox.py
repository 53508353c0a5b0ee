"""Applying the webhook inbox: claim due events, apply them per connection, record the outcome.

An apply run claims due rows of one provider (`pending`, `failed` whose backoff has passed, or
`applying` under a lapsed lease) in id order and bounded batches. The claim is durable: the rows are
set `applying` under a new claim number with a lease and committed before anything is applied, so
two runs never take the same event, and every later status change is guarded by that claim. Each
connection's events go to the provider's `apply` and are marked `processed`. When a batch fails, its
events are applied one by one so only the bad ones fail: those are retried with exponential backoff
and end `dead` after the last attempt, their error kept (`requeue` puts them back).

Only events of `active` connections are due: a disabled connection's events are held and those of
one that needs re-authorisation wait, spending no attempts, until it is active again. An event whose
connection is being synced is given back for a little while instead of waiting for the sync's lock.
Events of types no table uses are processed and counted as skipped. Applying is idempotent (the
upserts never regress), so an event seen twice changes nothing. Each batch writes a sync log row
(partition `webhooks`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.connections import (
    Connection,
    connect_command,
    fix_hint,
    get_connection,
    load_secrets,
)
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderError, RequestStats
from nextcrm_pipelines.core.runner import ConnectionBusy, ConnectionUnavailable
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.sync import WEBHOOK_PARTITION, SyncResult, SyncWindow, finish_log, start_log
from nextcrm_pipelines.core.upsert import BatchCounts, Row, TableSpec, UpsertWriter
from nextcrm_pipelines.core.vault import SecretBox

log = logging.getLogger(__name__)

BATCH = 500
MAX_ATTEMPTS = 5


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
    # The claim this run holds the events by (status changes are guarded by it).
    claim: int = 0
    written: dict[str, BatchCounts] = field(default_factory=dict)
    skipped: int = 0
    stats: RequestStats = field(default_factory=RequestStats)
    _stack: ExitStack = field(default_factory=ExitStack)
    _client: Any = None
    _connection: Connection | None = None
    _own_secret: bool | None = None
    _writers: dict[str, UpsertWriter] = field(default_factory=dict)
    # Opens the connection's client (the Dagster `ProviderClients` resource's, else `open_connection`).
    opener: Callable[..., AbstractContextManager[Any]] | None = None

    def client(self) -> Any:
        """The connection's provider client, opened once per batch (tokens refreshed as a sync would)."""
        if self._client is None:
            from nextcrm_pipelines.core.runner import open_connection
            from nextcrm_pipelines.providers import PROVIDERS

            # Never wait for a sync of the connection: raise `ConnectionBusy`, and the events wait instead.
            opened = (self.opener or open_connection)(database_url=self.database_url, box=self.box, wait=False,
                                                      provider=PROVIDERS[self.provider],
                                                      connection_id=self.connection_id)  # fmt: skip
            _, _, self._client, self.stats = self._stack.enter_context(opened)
        return self._client

    def connection(self) -> Connection:
        """The connection's row (read once per batch)."""
        if self._connection is None:
            self._connection = get_connection(self.conn, self.connection_id)
        return self._connection

    def signed_with_app_secret(self, secret_name: str) -> bool:
        """True when the connection has no webhook secret of its own, so the receiver checked its deliveries
        against the app-wide one from the environment: any connection's delivery would pass that check, so
        `apply` must itself make sure each event is this connection's account's."""
        if self._own_secret is None:
            box = self.box or SecretBox.from_environment()
            self._own_secret = bool(load_secrets(self.conn, self.connection_id, box).get(secret_name))
        return not self._own_secret

    def tenant(self) -> str:
        """The connection's external tenant (Xero tenant id, QuickBooks realm id): events name theirs."""
        connection = self.connection()
        if not connection.external_tenant:
            raise ValueError(f"{self.provider} connection {self.connection_id!r} has no tenant id; "
                             f"{fix_hint(connect_command(connection), by_browser=True)}")  # fmt: skip
        tenant = connection.external_tenant
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
    # Events given back unspent: their connection was busy, disabled or waiting for re-authorisation.
    held: int = 0


# Due: waiting (pending, or failed whose backoff has passed), or claimed by a run whose lease lapsed
# (it died); and the connection is active: a disabled connection's events are held, and those of one
# that needs re-authorisation wait, spending no attempts, until it is active again.
_DUE = (
    "((e.status IN ('pending', 'failed') AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= now())) "
    "OR (e.status = 'applying' AND e.lease_until < now())) "
    "AND EXISTS (SELECT 1 FROM {connections} c WHERE c.id = e.connection_id AND c.status = 'active')"
)
# How long a claim holds its events without being renewed; renewed between connections once half is gone.
LEASE_SECONDS = 600
# How long events wait when their connection is being synced (an apply run does not wait for it).
BUSY_DEFER_SECONDS = 30
LAPSED = "the run applying it ended before finishing (its claim lapsed)"


def _claims_sequence(schema: str) -> str:
    """The sequence that numbers claims and generations (`nextval` takes it as text)."""
    return f'"{schema}".webhook_claims'


def provider_knows(read: Callable[[], Any]) -> bool:
    """Whether the provider knows what `read` asks it for: False on its 404; its other errors are raised
    (the event is retried). How `apply` tells an event of this connection's account from another's."""
    try:
        read()
    except ProviderError as exc:
        if exc.status == 404:
            return False
        raise
    return True


@dataclass(frozen=True)
class DueBatch:
    """The next bounded batch of a provider's due events: what a sensor keys one apply run by."""

    count: int
    first_id: int
    last_id: int
    id_sum: int
    generation: int

    @property
    def run_key(self) -> str:
        """Names the work, not just the ids: every claim, release and replay moves an event's generation
        past all earlier ones, so a batch Dagster already ran never comes back under the same key."""
        return f"{self.first_id}-{self.last_id}:{self.count}:{self.id_sum}:g{self.generation}"


def _due_sql(schema: str, head: str, tail: str = "") -> sql.Composed:
    """`head` over the due events of the provider `%(provider)s`, then `tail` (ordering, limits)."""
    return sql.SQL(head + " FROM {inbox} e WHERE e.provider = %(provider)s AND " + _DUE + tail).format(
        inbox=table("webhook_events", schema), connections=table("integration_connections", schema)
    )


def due_batch(conn: psycopg.Connection, schema: str, provider: str, limit: int) -> DueBatch | None:
    """The first `limit` due events of `provider` by id, or None when nothing is due.

    Read from the inbox's status rather than from an id high-water mark, so an id that commits after
    a higher one (ids are taken at insert, rows appear at commit) is still found on a later tick.
    """
    inner = _due_sql(schema, "SELECT e.id, e.generation", " ORDER BY e.id LIMIT %(limit)s")
    row = conn.execute(
        sql.SQL("SELECT count(*), min(id), max(id), coalesce(sum(id), 0), coalesce(max(generation), 0) "
                "FROM ({}) AS due").format(inner),
        {"provider": provider, "limit": limit},
    ).fetchone()  # fmt: skip
    return DueBatch(*(int(value) for value in row)) if row[0] else None


def _claim(conn: psycopg.Connection, schema: str, provider: str, size: int, lease: float) -> tuple[int, list[InboxRow]]:
    """Take up to `size` due events durably: `applying` under a new claim number with a lease, committed.

    A lapsed claim counts as an attempt (a run died holding it); one that was the last attempt ends
    `dead` instead of being taken again, so an event that kills every run cannot stall the inbox.
    """
    inbox = table("webhook_events", schema)
    claim = int(conn.execute("SELECT nextval(%s::regclass)", (_claims_sequence(schema),)).fetchone()[0])
    taken = _due_sql(schema, "SELECT e.id", " ORDER BY e.id LIMIT %(size)s FOR UPDATE OF e SKIP LOCKED")
    rows = conn.execute(
        sql.SQL(
            "UPDATE {inbox} AS w SET "
            "status = CASE WHEN w.status = 'applying' AND w.attempts + 1 >= %(max)s THEN 'dead' ELSE 'applying' END, "
            "attempts = w.attempts + CASE WHEN w.status = 'applying' THEN 1 ELSE 0 END, "
            "last_error = CASE WHEN w.status = 'applying' THEN %(lapsed)s ELSE w.last_error END, "
            "claim = %(claim)s, generation = %(claim)s, lease_until = now() + make_interval(secs => %(lease)s), "
            "next_attempt_at = NULL "
            "FROM ({taken}) AS t WHERE w.id = t.id "
            "RETURNING w.id, w.connection_id, w.event_type, w.occurred_at, w.payload, w.status"
        ).format(inbox=inbox, taken=taken),
        {"max": MAX_ATTEMPTS, "lapsed": LAPSED, "claim": claim, "lease": lease, "provider": provider, "size": size},
    ).fetchall()
    conn.commit()
    events = sorted((InboxRow(*row[:5]) for row in rows if row[5] == "applying"), key=lambda e: e.id)
    buried = len(rows) - len(events)
    if buried:
        log.error("%s webhooks: %d event(s) ended dead after their last claim lapsed", provider, buried)
    return claim, events


def _renew(conn: psycopg.Connection, schema: str, claim: int, lease: float) -> None:
    """Push the claim's lease on, so a long run keeps what it has not applied yet."""
    conn.execute(
        sql.SQL("UPDATE {} SET lease_until = now() + make_interval(secs => %s) "
                "WHERE claim = %s AND status = 'applying'").format(table("webhook_events", schema)),
        (lease, claim),
    )  # fmt: skip
    conn.commit()


def release(conn: psycopg.Connection, schema: str, claim: int, ids: Sequence[int] | None = None,
            delay: float = 0.0) -> int:  # fmt: skip
    """Give events of `claim` back without spending an attempt (due again after `delay` seconds).

    For events their run could not apply now through no fault of theirs: the connection is being
    synced, was disabled or needs re-authorisation, or the run is ending early.
    """
    done = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = CASE WHEN last_error IS NULL THEN 'pending' ELSE 'failed' END, claim = NULL, "
            "lease_until = NULL, generation = nextval(%s::regclass), "
            "next_attempt_at = now() + make_interval(secs => %s) "
            "WHERE claim = %s AND status = 'applying' AND (%s::bigint[] IS NULL OR id = ANY(%s))"
        ).format(table("webhook_events", schema)),
        (_claims_sequence(schema), delay or None, claim, ids, ids),  # no delay: NULL, due at once
    ).rowcount
    conn.commit()
    return done


def apply_pending(*, database_url: str, schema: str, provider: str, apply: Apply, run_id: str | None = None,
                  batch: int = BATCH, limit: int | None = None, box: SecretBox | None = None,
                  lease: float = LEASE_SECONDS,
                  opener: Callable[..., AbstractContextManager[Any]] | None = None) -> ApplyOutcome:  # fmt: skip
    """Apply due events of `provider` in id order, batch by batch, until none is left (or `limit` were claimed).

    Each batch is claimed durably before anything is applied, so runs that overlap never take the
    same event; every status change afterwards is guarded by the claim, so a run whose claim lapsed
    and was taken over cannot overwrite what the other run recorded. Whatever this run still holds
    when it stops early (an error, a kill the process survives) is released for the next run; a run
    that ends normally holds nothing by then.
    """
    outcome = ApplyOutcome()
    claimed_so_far = 0
    claims: list[int] = []
    with psycopg.connect(libpq_url(database_url)) as conn:
        try:
            while limit is None or claimed_so_far < limit:
                size = batch if limit is None else min(batch, limit - claimed_so_far)
                claim, claimed = _claim(conn, schema, provider, size, lease)
                claims.append(claim)
                if not claimed:
                    break
                claimed_so_far += len(claimed)
                renewed = time.monotonic()
                by_connection: dict[str, list[InboxRow]] = defaultdict(list)
                for row in claimed:
                    by_connection[row.connection_id].append(row)
                for connection_id, events in by_connection.items():
                    if time.monotonic() - renewed > lease / 2:  # half the lease gone: push it on
                        _renew(conn, schema, claim, lease)
                        renewed = time.monotonic()
                    context = ApplyContext(conn, schema, connection_id, database_url, provider, box, claim=claim,
                                           opener=opener)  # fmt: skip
                    try:
                        _apply_one(context, events, apply, run_id, outcome)
                    finally:
                        context.close()
        except BaseException:
            _release_all(conn, schema, provider, claims)
            raise
    return outcome


def _release_all(conn: psycopg.Connection, schema: str, provider: str, claims: list[int]) -> None:
    """Give back whatever the claims of a run stopping early still hold; on a broken session the leases
    lapse instead."""
    try:
        conn.rollback()
        for claim in claims:
            left = release(conn, schema, claim)
            if left:
                log.warning("%s webhooks: %d claimed event(s) released unapplied", provider, left)
    except psycopg.Error as exc:
        log.warning("%s webhooks: claims not released (%s); they lapse with their lease", provider,
                    type(exc).__name__)  # fmt: skip


def _guarded(context: ApplyContext, assignments: str, ids: list[int], params: tuple[Any, ...]) -> list[tuple]:
    """Update `ids` only while this run's claim still holds them; warn about any taken over meanwhile."""
    rows = context.conn.execute(
        sql.SQL("UPDATE {} SET " + assignments + ", claim = NULL, lease_until = NULL "
                "WHERE id = ANY(%s) AND claim = %s AND status = 'applying' RETURNING status").format(
            table("webhook_events", context.schema)),
        (*params, ids, context.claim),
    ).fetchall()  # fmt: skip
    context.conn.commit()
    if len(rows) < len(ids):
        log.warning("%s webhooks of %s: %d event(s) were no longer this run's (claim lapsed); left to their new run",
                    context.provider, context.connection_id, len(ids) - len(rows))  # fmt: skip
    return rows


def _mark_processed(context: ApplyContext, ids: list[int]) -> None:
    _guarded(context, "status = 'processed', processed_at = now(), attempts = attempts + 1, last_error = NULL, "
             "next_attempt_at = NULL", ids, ())  # fmt: skip


def _mark_failed(context: ApplyContext, ids: list[int], error: str) -> int:
    """Record a failed attempt (backoff 30 s x 2^attempts); returns how many of `ids` are now dead."""
    statuses = _guarded(
        context,
        "attempts = attempts + 1, last_error = %s, status = CASE WHEN attempts + 1 >= %s THEN 'dead' ELSE 'failed' "
        "END, next_attempt_at = now() + make_interval(secs => 30 * power(2, attempts))",
        ids,
        (error, MAX_ATTEMPTS),
    )
    return sum(1 for (status,) in statuses if status == "dead")


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _defer_seconds(exc: ConnectionUnavailable) -> float:
    """How long events wait when their connection cannot be used: a while if a sync holds it; none if it
    is inactive (its events are not due until it is active again)."""
    return BUSY_DEFER_SECONDS if isinstance(exc, ConnectionBusy) else 0.0


def _hold(context: ApplyContext, events: list[InboxRow], exc: ConnectionUnavailable, sync_log_id: int) -> None:
    """The connection cannot be used now: give its events back unspent, and drop the empty sync log."""
    context.conn.rollback()
    release(context.conn, context.schema, context.claim, [e.id for e in events], _defer_seconds(exc))
    context.conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(
        table("integration_sync_logs", context.schema)), (sync_log_id,))  # fmt: skip
    context.conn.commit()
    log.info("%s webhooks of %s: %d event(s) wait: %s", context.provider, context.connection_id, len(events), exc)


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
    except ConnectionUnavailable as exc:
        _hold(context, events, exc, result.sync_log_id)
        outcome.held += len(events)
        return
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
            for number, event in enumerate(events):
                try:
                    result.counts.add(apply(context, [event]))
                    _mark_processed(context, [event.id])
                    outcome.processed += 1
                except ConnectionUnavailable as single:
                    conn.rollback()
                    release(conn, schema, context.claim, [e.id for e in events[number:]], _defer_seconds(single))
                    outcome.held += len(events) - number
                    result.total = number
                    break
                except Exception as single:
                    conn.rollback()
                    errors.append(f"event {event.id}: {_error_text(single)}")
                    outcome.dead += _mark_failed(context, [event.id], _error_text(single))
                    outcome.failed += 1
    for message in errors:
        log.error("%s webhooks of %s failed: %s", provider, connection_id, message)
    result.status = "success" if not errors else ("failed" if len(errors) == result.total else "partial")
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
            "UPDATE {} SET status = 'pending', attempts = 0, next_attempt_at = NULL, processed_at = NULL, "
            "claim = NULL, lease_until = NULL, generation = nextval({}::regclass) "
            "WHERE {} AND payload IS NOT NULL RETURNING id"
        ).format(inbox, sql.Literal(_claims_sequence(schema)), where),
        params,
    ).rowcount
    unreadable = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} AND payload IS NULL").format(inbox, where),
                              params).fetchone()[0]  # fmt: skip
    conn.commit()
    return requeued, int(unreadable)
