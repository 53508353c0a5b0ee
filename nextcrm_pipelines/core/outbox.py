"""The outbox: actions NextCRM asks a provider to perform, sent exactly once.

A caller inserts a row into `integration_outbox` (`submit`, the CLI, SQL). An apply run claims due rows
of one provider durably: `sending` under a new claim number with a lease, committed before anything is
sent, so two runs never take the same row and a row whose run died is found again when its lease lapses.
For each row it then:

1. checks the action and its payload (`core.actions.validate_payload`): a bad one ends `failed`, naming
   the field, and nothing is sent;
2. if an earlier attempt may have reached the provider (the row was `unknown`, or its claim lapsed while
   `sending`), and the provider takes no idempotency key, looks the object up by the reference the action
   set and adopts it if it is there;
3. otherwise sends it, with the row's idempotency key on every attempt (providers that take one replay
   their first answer);
4. upserts what the provider answered into the mirror (the engine's never-regress rule), then marks the
   row `succeeded` with the object and its id.

A provider's 4xx ends the row `failed` with its message. A request that never reached the provider (or
was turned away with a 429) goes back to `pending`; one that may have (a timeout, a reset connection, a
5xx) to `unknown`; both are retried with exponential backoff and end `dead` after the last attempt,
visible and retryable (`retry`). Refused credentials hold the row, spending no attempt, until the
connection is active again. Every status change is guarded by the claim it expects.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.actions import (
    HOLD,
    MAYBE_SENT,
    REFUSED,
    ActionInvalid,
    ActionSpec,
    Sent,
    outcome_of,
    validate_payload,
)
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed, ProviderError
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.upsert import UpsertWriter
from nextcrm_pipelines.core.vault import SecretBox

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
# How long a claim holds its rows without being renewed; renewed as the run goes.
LEASE_SECONDS = 300.0
RENEW_EVERY_SECONDS = 60.0
# The first retry's wait (doubling each attempt, at most an hour): `NEXTCRM_ACTION_RETRY_SECONDS`.
RETRY_ENV = "NEXTCRM_ACTION_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 30.0
MAX_RETRY_SECONDS = 3600.0
# Rows claimed by one apply run at most.
RUN_LIMIT = 1000

STATUSES = ("pending", "sending", "succeeded", "failed", "unknown", "dead", "cancelled")
LAPSED = "the run sending it ended before recording the outcome (its claim lapsed): the outcome is unknown"

_DUE = (
    "((o.status IN ('pending', 'unknown') AND o.next_attempt_at <= now()) "
    "OR (o.status = 'sending' AND o.lease_until < now())) "
    # Rows of an active connection; a row whose connection was removed is taken to be failed.
    "AND (EXISTS (SELECT 1 FROM {connections} c WHERE c.id = o.connection_id AND c.status = 'active') "
    "OR NOT EXISTS (SELECT 1 FROM {connections} c WHERE c.id = o.connection_id))"
)


def retry_seconds() -> float:
    """The first retry's wait in seconds (`NEXTCRM_ACTION_RETRY_SECONDS`, default 30)."""
    value = os.environ.get(RETRY_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise ValueError(f"{RETRY_ENV} must be a number of seconds, got {value!r}") from None


def _claims_sequence(schema: str) -> str:
    return f'"{schema}".outbox_claims'


@dataclass(frozen=True)
class Submitted:
    """What `submit` did: the row's id, and whether it is new (False: the key was already used for it)."""

    id: int
    created: bool


def submit(conn: psycopg.Connection, schema: str, *, connection_id: str, action: str, payload: dict[str, Any],
           idempotency_key: str | None = None, requested_by: str | None = None) -> Submitted:  # fmt: skip
    """Insert an action (committed). The same idempotency key again gives back the first row, unless it
    asked for something else, which is refused: a key names one action."""
    outbox = table("integration_outbox", schema)
    key = sql.SQL("%(key)s") if idempotency_key else sql.SQL("DEFAULT")
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {outbox} (connection_id, action, payload, idempotency_key, requested_by) "
            "VALUES (%(connection)s, %(action)s, %(payload)s, {key}, %(by)s) "
            "ON CONFLICT (connection_id, idempotency_key) DO NOTHING RETURNING id"
        ).format(outbox=outbox, key=key),
        {"connection": connection_id, "action": action, "payload": Jsonb(payload), "key": idempotency_key,
         "by": requested_by},
    ).fetchone()  # fmt: skip
    if row is not None:
        conn.commit()
        return Submitted(int(row[0]), True)
    first = conn.execute(
        sql.SQL("SELECT id, action, payload FROM {} WHERE connection_id = %s AND idempotency_key = %s").format(outbox),
        (connection_id, idempotency_key),
    ).fetchone()
    conn.commit()
    if first[1] != action or first[2] != payload:
        raise ActionInvalid(f"idempotency key {idempotency_key!r} was already used for action {first[0]} "
                            f"({first[1]}) with other content: a key names one action")  # fmt: skip
    return Submitted(int(first[0]), False)


@dataclass(frozen=True)
class DueBatch:
    """The next bounded batch of a provider's due actions: what a sensor keys one apply run by."""

    count: int
    first_id: int
    last_id: int
    generation: int

    @property
    def run_key(self) -> str:
        """Every claim and retry moves a row's generation past all earlier ones, so a batch Dagster already
        ran never comes back under the same key."""
        return f"{self.first_id}-{self.last_id}:{self.count}:g{self.generation}"


def _due_sql(schema: str, head: str, tail: str = "") -> sql.Composed:
    return sql.SQL(head + " FROM {outbox} o WHERE o.provider = %(provider)s AND " + _DUE + tail).format(
        outbox=table("integration_outbox", schema), connections=table("integration_connections", schema)
    )


def due_batch(conn: psycopg.Connection, schema: str, provider: str, limit: int = RUN_LIMIT) -> DueBatch | None:
    """The first `limit` due actions of `provider` by id, or None when nothing is due."""
    inner = _due_sql(schema, "SELECT o.id, o.generation", " ORDER BY o.id LIMIT %(limit)s")
    row = conn.execute(
        sql.SQL("SELECT count(*), min(id), max(id), coalesce(max(generation), 0) FROM ({}) AS due").format(inner),
        {"provider": provider, "limit": limit},
    ).fetchone()
    return DueBatch(*(int(value) for value in row)) if row[0] else None


@dataclass(frozen=True)
class Claimed:
    """A row this run holds: `was` is its status before the claim (`unknown` or a lapsed `sending`: an
    earlier attempt may have reached the provider)."""

    id: int
    connection_id: str
    action: str
    payload: Any
    idempotency_key: str
    attempts: int
    was: str

    @property
    def maybe_sent(self) -> bool:
        return self.was in ("unknown", "sending")


def _claim(conn: psycopg.Connection, schema: str, provider: str, size: int, lease: float) -> tuple[int, list[Claimed]]:
    """Take up to `size` due rows durably: `sending` under a new claim number with a lease, committed.

    Each claim is an attempt. A lapsed claim that was the last attempt ends `dead` (its outcome unknown)
    instead of being taken again, so an action that kills every run cannot stall the outbox.
    """
    outbox = table("integration_outbox", schema)
    claim = int(conn.execute("SELECT nextval(%s::regclass)", (_claims_sequence(schema),)).fetchone()[0])
    order = " ORDER BY o.id LIMIT %(size)s FOR UPDATE OF o SKIP LOCKED"
    taken = _due_sql(schema, "SELECT o.id, o.status AS was", order)
    rows = conn.execute(
        sql.SQL(
            "UPDATE {outbox} AS w SET "
            "status = CASE WHEN t.was = 'sending' AND w.attempts >= %(max)s THEN 'dead' ELSE 'sending' END, "
            "attempts = w.attempts + CASE WHEN t.was = 'sending' AND w.attempts >= %(max)s THEN 0 ELSE 1 END, "
            "error = CASE WHEN t.was = 'sending' THEN %(lapsed)s ELSE w.error END, "
            "completed_at = CASE WHEN t.was = 'sending' AND w.attempts >= %(max)s THEN now() END, "
            "claim = %(claim)s, generation = %(claim)s, lease_until = now() + make_interval(secs => %(lease)s), "
            "updated_at = now() "
            "FROM ({taken}) AS t WHERE w.id = t.id "
            "RETURNING w.id, w.connection_id, w.action, w.payload, w.idempotency_key, w.attempts, t.was, w.status"
        ).format(outbox=outbox, taken=taken),
        {"max": MAX_ATTEMPTS, "lapsed": LAPSED, "claim": claim, "lease": lease, "provider": provider, "size": size},
    ).fetchall()
    conn.commit()
    claimed = sorted((Claimed(*row[:7]) for row in rows if row[7] == "sending"), key=lambda c: c.id)
    if len(rows) > len(claimed):
        log.error("%s actions: %d ended dead after their last claim lapsed", provider, len(rows) - len(claimed))
    return claim, claimed


def _renew(conn: psycopg.Connection, schema: str, claim: int, lease: float) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET lease_until = now() + make_interval(secs => %s) "
                "WHERE claim = %s AND status = 'sending'").format(table("integration_outbox", schema)),
        (lease, claim),
    )  # fmt: skip
    conn.commit()


def _set(conn: psycopg.Connection, schema: str, claimed: Claimed, claim: int, assignments: str,
         params: dict[str, Any]) -> bool:  # fmt: skip
    """Apply `assignments` to the row if this claim still holds it (not committed); whether it did."""
    done = conn.execute(
        sql.SQL("UPDATE {} SET " + assignments + ", updated_at = now() "
                "WHERE id = %(id)s AND claim = %(claim)s AND status = 'sending'").format(
            table("integration_outbox", schema)
        ),
        {**params, "id": claimed.id, "claim": claim},
    )  # fmt: skip
    if done.rowcount == 0:
        log.warning("action %d: its claim lapsed and another run took it; that run records the outcome", claimed.id)
    return done.rowcount == 1


@dataclass
class ActionsOutcome:
    """What one apply run did."""

    succeeded: int = 0
    adopted: int = 0
    failed: int = 0
    retrying: int = 0
    dead: int = 0
    held: int = 0
    # entity name -> connections whose rows of that entity the run wrote (to materialise their partitions)
    written: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    lines: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed + self.retrying + self.dead + self.held


def _safe(text: str, limit: int = 2000) -> str:
    return text[:limit]


def _backoff(attempts: int, base: float) -> float:
    return min(base * 2 ** max(0, attempts - 1), MAX_RETRY_SECONDS)


def _record_success(conn: psycopg.Connection, schema: str, provider: Provider, connection_id: str,
                    claimed: Claimed, claim: int, sent: Sent, started: datetime, outcome: ActionsOutcome,
                    run_id: str | None, writers: dict[str, UpsertWriter] | None = None) -> None:  # fmt: skip
    """Upsert what the provider answered into the mirror, then mark the row `succeeded`. A crash in between
    leaves the row to be sent again under its key (or found): the same object, which the mirror already holds.
    `writers` keeps one writer per entity across a connection's actions (its staging table and statistics
    check are then set up once, not per action)."""
    writers = {} if writers is None else writers
    by_entity: dict[str, list[Any]] = defaultdict(list)
    for item in sent.mirrored:
        entity = provider.entity(item.entity)
        by_entity[item.entity].append(entity.to_row(item.raw, item.version))
    for name, rows in by_entity.items():
        writer = writers.get(name)
        if writer is None:
            writer = writers[name] = UpsertWriter(conn, provider.entity(name).table, connection_id, schema)
        known = len(writer.failures)
        writer.write(rows, may_be_stored=True)
        if len(writer.failures) > known:
            refused = writer.failures[known:]
            raise RuntimeError(f"the mirror refused {name} row(s) {', '.join(f.id for f in refused[:5])}: "
                               f"{refused[0].error}")  # fmt: skip
        outcome.written[name].add(connection_id)
    _set(conn, schema, claimed, claim,
         "status = 'succeeded', result = %(result)s, result_id = %(result_id)s, error = NULL, "
         "sent_at = coalesce(sent_at, %(started)s), completed_at = now(), lease_until = NULL, run_id = %(run)s",
         {"result": Jsonb(sent.result), "result_id": sent.result_id, "started": started, "run": run_id})  # fmt: skip
    conn.commit()  # without the claim, the mirror rows stand (never-regress); the run that took the row records it


def _record_failure(conn: psycopg.Connection, schema: str, claimed: Claimed, claim: int, error: BaseException,
                    started: datetime | None, base: float, outcome: ActionsOutcome,
                    run_id: str | None) -> str:  # fmt: skip
    """Record a failed attempt by what it means; returns the status the row got."""
    kind = outcome_of(error)
    message = _safe(f"{type(error).__name__}: {error}" if not isinstance(error, ProviderError) else str(error))
    sent = "sent_at = coalesce(sent_at, %(started)s)" if started is not None else "sent_at = sent_at"
    params = {"error": message, "started": started, "run": run_id}
    if kind == REFUSED:
        status = "failed"
        assignments = "status = 'failed', error = %(error)s, completed_at = now(), lease_until = NULL, run_id = %(run)s"
        outcome.failed += 1
    elif kind == HOLD:
        # Not the action's fault: given back without spending an attempt, due again once the connection is active.
        status = "unknown" if claimed.maybe_sent else "pending"
        assignments = ("status = %(status)s, attempts = attempts - 1, error = %(error)s, lease_until = NULL, "
                       "next_attempt_at = now()")  # fmt: skip
        params["status"] = status
        outcome.held += 1
    else:
        may_have_acted = kind == MAYBE_SENT or claimed.maybe_sent
        if claimed.attempts >= MAX_ATTEMPTS:
            status = "dead"
            assignments = "status = 'dead', error = %(error)s, completed_at = now(), lease_until = NULL"
            outcome.dead += 1
        else:
            status = "unknown" if may_have_acted else "pending"
            assignments = ("status = %(status)s, error = %(error)s, lease_until = NULL, "
                           "next_attempt_at = now() + make_interval(secs => %(delay)s)")  # fmt: skip
            params.update(status=status, delay=_backoff(claimed.attempts, base))
            outcome.retrying += 1
    _set(conn, schema, claimed, claim, f"{assignments}, {sent}", params)
    conn.commit()
    return status


def apply_due(*, database_url: str, schema: str, provider: Provider, run_id: str | None = None,
              limit: int = RUN_LIMIT, box: SecretBox | None = None, opener: Any = None,
              lease: float = LEASE_SECONDS, retry_base: float | None = None) -> ActionsOutcome:  # fmt: skip
    """Claim up to `limit` due actions of `provider` and carry each out exactly once (see the module)."""
    base = retry_seconds() if retry_base is None else retry_base
    outcome = ActionsOutcome()
    with psycopg.connect(libpq_url(database_url)) as conn:
        claim, rows = _claim(conn, schema, provider.name, limit, lease)
        renewed = time.monotonic()
        by_connection: dict[str, list[Claimed]] = defaultdict(list)
        for row in rows:
            by_connection[row.connection_id].append(row)
        for connection_id, claimed_rows in sorted(by_connection.items()):
            opened = partial(opener or _open_connection(), database_url=database_url, provider=provider,
                             connection_id=connection_id, box=box, lock=False, wait=False, run_id=run_id)  # fmt: skip
            run = _ConnectionRun(conn, schema, provider, connection_id, claim, base, outcome, run_id, opened)
            with run:
                for claimed in claimed_rows:
                    if time.monotonic() - renewed > RENEW_EVERY_SECONDS:
                        _renew(conn, schema, claim, lease)
                        renewed = time.monotonic()
                    outcome.lines.append(run.apply(claimed))
    return outcome


def _open_connection() -> Any:
    from nextcrm_pipelines.core.runner import open_connection

    return open_connection


@dataclass
class _ConnectionRun:
    """One connection's share of an apply run: its client (opened once, on first need) and its rows."""

    conn: psycopg.Connection
    schema: str
    provider: Provider
    connection_id: str
    claim: int
    base: float
    outcome: ActionsOutcome
    run_id: str | None
    opener: Any
    _stack: ExitStack = field(default_factory=ExitStack)
    _client: Any = None
    _writers: dict[str, UpsertWriter] = field(default_factory=dict)

    def __enter__(self) -> _ConnectionRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def client(self) -> Any:
        if self._client is None:
            try:
                _, _, self._client, _ = self._stack.enter_context(self.opener())
            except vault.ConnectionNotFound:
                raise ActionInvalid(f"no connection {self.connection_id!r}: nothing was sent") from None
        return self._client

    def _needs_reauth(self, error: BaseException) -> None:
        """The provider refused the connection's credentials while sending: mark it `needs_reauth` with the
        command that fixes it (as a sync would), so its actions wait instead of being claimed again at once."""
        from nextcrm_pipelines.core.runner import reauth_hint

        connection = vault.get_connection(self.conn, self.connection_id)
        message = str(error) if vault.has_fix(str(error)) else f"{error}; {reauth_hint(self.provider, connection)}"
        if connection.status == "active":
            vault.set_status(self.conn, self.connection_id, "needs_reauth", message)
        self.conn.commit()
        self._stack.close()  # the client of refused credentials is not used again
        self._client = None

    def apply(self, claimed: Claimed) -> str:
        """Carry out one claimed row and record its outcome; returns the run log's line for it."""
        from nextcrm_pipelines.core.runner import ConnectionUnavailable

        conn, schema, claim, outcome = self.conn, self.schema, self.claim, self.outcome
        where = f"action {claimed.id} {claimed.action} on {self.connection_id}"
        try:
            spec = self.provider.actions.get(claimed.action)
            if spec is None:
                known = ", ".join(sorted(self.provider.actions)) or "none"
                raise ActionInvalid(f"{self.provider.name} has no action {claimed.action!r} (its actions: {known})")
            payload = validate_payload(spec, claimed.payload)
            sent, started, adopted = _carry_out(self.client(), spec, payload, claimed)
            _record_success(conn, schema, self.provider, self.connection_id, claimed, claim, sent, started, outcome,
                            self.run_id, self._writers)  # fmt: skip
        except ActionInvalid as exc:
            conn.rollback()
            _set(conn, schema, claimed, claim,
                 "status = 'failed', error = %(error)s, completed_at = now(), lease_until = NULL, run_id = %(run)s",
                 {"error": _safe(str(exc)), "run": self.run_id})  # fmt: skip
            conn.commit()
            outcome.failed += 1
            return f"{where}: failed before sending: {exc}"
        except ConnectionUnavailable as exc:
            conn.rollback()
            status = _record_failure(conn, schema, claimed, claim, _Held(str(exc)), None, self.base, outcome,
                                     self.run_id)  # fmt: skip
            return f"{where}: {status}, {exc}"
        except Exception as exc:
            conn.rollback()
            started = getattr(exc, "_nextcrm_started", None)
            status = _record_failure(conn, schema, claimed, claim, exc, started, self.base, outcome, self.run_id)
            if outcome_of(exc) == HOLD:
                self._needs_reauth(exc)
            return f"{where}: {status}: {_safe(str(exc), 300)}"
        outcome.succeeded += 1
        outcome.adopted += adopted
        found = " (adopted the object an earlier attempt made)" if adopted else ""
        return f"{where}: succeeded{found} -> {sent.result_id}"


class _Held(AuthenticationFailed):
    """The connection cannot be used now (disabled, re-authorisation needed): the action waits for it."""

    def __init__(self, message: str):
        super().__init__(message, provider="outbox")


def _carry_out(client: Any, spec: ActionSpec, payload: Any, claimed: Claimed) -> tuple[Sent, datetime, bool]:
    """Find (if an earlier attempt may have acted and the provider takes no key) or send; returns (what the
    provider answered, when the send began, whether an earlier attempt's object was adopted)."""
    from datetime import UTC

    started = datetime.now(UTC)
    if claimed.maybe_sent and spec.find is not None:
        found = spec.find(client, payload, claimed.idempotency_key)
        if found is not None:
            return found, started, True
    try:
        return spec.send(client, payload, claimed.idempotency_key), started, False
    except Exception as exc:
        exc._nextcrm_started = started  # type: ignore[attr-defined]
        raise


# --- what the CLI and the API read and change -----------------------------------------------------


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    connection_id: str
    provider: str | None
    action: str
    status: str
    attempts: int
    idempotency_key: str
    result_id: str | None
    error: str | None
    requested_by: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    payload: Any = None
    result: Any = None


_ENTRY = ("id, connection_id, provider, action, status, attempts, idempotency_key, result_id, error, requested_by, "
          "created_at, updated_at, completed_at, payload, result")  # fmt: skip


def list_actions(conn: psycopg.Connection, schema: str, *, status: str | None = None, connection_id: str | None = None,
                 limit: int = 50) -> list[OutboxEntry]:  # fmt: skip
    """The newest actions first, optionally of one status or connection."""
    where, params = [], []
    if status:
        where.append("status = %s")
        params.append(status)
    if connection_id:
        where.append("connection_id = %s")
        params.append(connection_id)
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    rows = conn.execute(
        sql.SQL(f"SELECT {_ENTRY} FROM {{}} {clause} ORDER BY id DESC LIMIT %s").format(
            table("integration_outbox", schema)
        ),
        (*params, limit),
    ).fetchall()
    return [OutboxEntry(*row) for row in rows]


def get_action(conn: psycopg.Connection, schema: str, action_id: int) -> OutboxEntry:
    row = conn.execute(
        sql.SQL(f"SELECT {_ENTRY} FROM {{}} WHERE id = %s").format(table("integration_outbox", schema)), (action_id,)
    ).fetchone()
    if row is None:
        raise KeyError(f"no action {action_id}")
    return OutboxEntry(*row)


def retry(conn: psycopg.Connection, schema: str, action_id: int) -> str:
    """Make a `failed` or `dead` action due again with a fresh count of attempts, under the same key; returns
    its new status (`unknown` when an earlier attempt may have reached the provider: it is looked up first)."""
    row = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = CASE WHEN status = 'dead' AND sent_at IS NOT NULL THEN 'unknown' ELSE 'pending' "
            "END, attempts = 0, next_attempt_at = now(), completed_at = NULL, updated_at = now(), "
            "generation = nextval(%s::regclass) WHERE id = %s AND status IN ('failed', 'dead') RETURNING status"
        ).format(table("integration_outbox", schema)),
        (_claims_sequence(schema), action_id),
    ).fetchone()
    conn.commit()
    if row is None:
        entry = get_action(conn, schema, action_id)
        raise ActionInvalid(f"action {action_id} is {entry.status}: only failed or dead actions are retried")
    return str(row[0])


def cancel(conn: psycopg.Connection, schema: str, action_id: int) -> None:
    """Cancel an action that has not been sent and may not have reached the provider (`pending`, `failed`, `dead`
    never sent); one that may have (`sending`, `unknown`) cannot be taken back here."""
    row = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'cancelled', completed_at = now(), updated_at = now() WHERE id = %s AND "
            "(status IN ('pending', 'failed') OR (status = 'dead' AND sent_at IS NULL)) RETURNING id"
        ).format(table("integration_outbox", schema)),
        (action_id,),
    ).fetchone()
    conn.commit()
    if row is None:
        entry = get_action(conn, schema, action_id)
        maybe_sent = entry.status in ("sending", "unknown", "dead")
        why = (
            ": it may have reached the provider, so it cannot be cancelled here"
            if maybe_sent
            else ": nothing to cancel"
        )
        raise ActionInvalid(f"action {action_id} is {entry.status}{why}")


def describe(entry: OutboxEntry) -> str:
    """One action as the CLI shows it (the payload and result as JSON: ids and amounts, as the caller gave them)."""
    lines = [
        f"action {entry.id}: {entry.action} on {entry.connection_id} ({entry.provider or 'no provider'})",
        f"  status: {entry.status} after {entry.attempts} attempt(s); key {entry.idempotency_key}",
        f"  requested by: {entry.requested_by or '-'}; created {entry.created_at:%Y-%m-%d %H:%M:%S %Z}",
    ]
    if entry.result_id:
        lines.append(f"  result: {entry.result_id}")
    if entry.error:
        lines.append(f"  error: {entry.error}")
    lines.append("  payload: " + json.dumps(entry.payload, sort_keys=True))
    return "\n".join(lines)


def statuses_of(conn: psycopg.Connection, schema: str, ids: Sequence[int]) -> dict[int, str]:
    """The status of each of these actions."""
    query = sql.SQL("SELECT id, status FROM {} WHERE id = ANY(%s)").format(table("integration_outbox", schema))
    rows = conn.execute(query, (list(ids),)).fetchall()
    return {int(i): str(s) for i, s in rows}
