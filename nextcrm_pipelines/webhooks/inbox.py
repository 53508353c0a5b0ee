"""Applying the webhook inbox: claim due events, apply them per connection, record the outcome.

An apply run claims due rows of one provider (`pending`, or `failed` whose backoff has passed) with
`FOR UPDATE SKIP LOCKED`, hands each connection's events to the provider's `apply`, and marks them
`processed`; an event whose apply fails is retried with exponential backoff and ends `dead` after
the last attempt, its error kept. Applying is idempotent (the upserts never regress), so an event
seen twice changes nothing. Each batch writes a sync log row (partition `webhooks`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.sync import SyncResult, SyncWindow, finish_log, start_log
from nextcrm_pipelines.core.upsert import BatchCounts
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


@dataclass
class ApplyContext:
    """What a provider's `apply` works with: the inbox session (its writes commit with the batch's
    status), the connection, and on demand the connection's API client (thin events re-fetch)."""

    conn: psycopg.Connection
    schema: str
    connection_id: str
    database_url: str
    provider: str
    box: SecretBox | None = None
    _stack: ExitStack = field(default_factory=ExitStack)
    _client: Any = None

    def client(self) -> Any:
        """The connection's provider client, opened once per batch (tokens refreshed as a sync would)."""
        if self._client is None:
            from nextcrm_pipelines.core.runner import open_connection
            from nextcrm_pipelines.providers import PROVIDERS

            opened = open_connection(database_url=self.database_url, provider=PROVIDERS[self.provider],
                                     connection_id=self.connection_id, box=self.box)  # fmt: skip
            self._client = self._stack.enter_context(opened)[2]
        return self._client

    def close(self) -> None:
        self._stack.close()


# apply(context, events) -> counts; raises to fail the batch (retried later).
Apply = Callable[[ApplyContext, list[InboxRow]], BatchCounts]


@dataclass
class ApplyOutcome:
    processed: int = 0
    failed: int = 0
    dead: int = 0
    counts: BatchCounts = field(default_factory=BatchCounts)
    results: list[SyncResult] = field(default_factory=list)


def due_events(conn: psycopg.Connection, schema: str, provider: str) -> tuple[int, int, int]:
    """(count, highest id, attempts so far) of `provider`'s due events: what the sensor keys runs by."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(max(id), 0), coalesce(sum(attempts), 0) FROM {} WHERE provider = %s "
            "AND status IN ('pending', 'failed') AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
        ).format(table("webhook_events", schema)),
        (provider,),
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


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
                    "SELECT id, connection_id, event_type, occurred_at, payload FROM {} WHERE provider = %s "
                    "AND status IN ('pending', 'failed') AND (next_attempt_at IS NULL OR next_attempt_at <= now()) "
                    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
                ).format(inbox),
                (provider, size),
            ).fetchall()
            if not claimed:
                conn.commit()
                return outcome
            claimed_so_far += len(claimed)
            by_connection: dict[str, list[InboxRow]] = defaultdict(list)
            for row in claimed:
                by_connection[row[1]].append(InboxRow(*row))
            conn.commit()
            for connection_id, events in by_connection.items():
                context = ApplyContext(conn, schema, connection_id, database_url, provider, box)
                try:
                    _apply_one(context, events, apply, run_id, outcome)
                finally:
                    context.close()
    return outcome


def _apply_one(context: ApplyContext, events: list[InboxRow], apply: Apply, run_id: str | None,
               outcome: ApplyOutcome) -> None:  # fmt: skip
    conn, schema, provider, connection_id = context.conn, context.schema, context.provider, context.connection_id
    inbox = table("webhook_events", schema)
    now = datetime.now(UTC)
    result = SyncResult(entity=f"{provider}_webhooks", connection_id=connection_id, window=SyncWindow(now, now))
    result.sync_log_id = start_log(conn, schema, provider, result.entity, connection_id, result.window, run_id,
                                   WEBHOOK_PARTITION)  # fmt: skip
    result.total = len(events)
    ids = [e.id for e in events]
    try:
        counts = apply(context, events)
        conn.execute(
            sql.SQL("UPDATE {} SET status = 'processed', processed_at = now(), attempts = attempts + 1, "
                    "last_error = NULL WHERE id = ANY(%s)").format(inbox),
            (ids,),
        )  # fmt: skip
        conn.commit()
        result.counts.add(counts)
        outcome.counts.add(counts)
        outcome.processed += len(ids)
        result.status = "success"
    except Exception as exc:
        conn.rollback()
        error = f"{type(exc).__name__}: {exc}"[:1000]
        log.error("%s webhooks of %s failed: %s", provider, connection_id, error)
        dead = conn.execute(
            sql.SQL(
                "UPDATE {} SET attempts = attempts + 1, last_error = %s, "
                "status = CASE WHEN attempts + 1 >= %s THEN 'dead' ELSE 'failed' END, "
                "next_attempt_at = now() + make_interval(secs => 30 * power(2, attempts)) "
                "WHERE id = ANY(%s) RETURNING status"
            ).format(inbox),
            (error, MAX_ATTEMPTS, ids),
        ).fetchall()
        conn.commit()
        outcome.dead += sum(1 for (status,) in dead if status == "dead")
        outcome.failed += len(ids)
        result.status, result.error = "failed", error
    finish_log(conn, schema, result)
    outcome.results.append(result)
