"""Sync one connection x window of one entity: load the connection, open its client, run the engine.

Shared by the Dagster assets, the CLI and the benchmarks so they exercise the same path. A
session-level advisory lock per connection keeps two syncs of one connection from overlapping,
however they were launched. Dagster runs take it without waiting (`wait=False`): a run must not sit
in a run slot behind another run, so it reports the connection busy, naming the run that holds it
(each sync's session carries its run id as `application_name`).

A backfill of a provider that allows it (`Provider.parallel_windows`) syncs its windows in several
processes under that one lock: one Python process cannot keep both the client work (parsing,
mapping) and Postgres busy, because its threads share one interpreter lock.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed, DailyLimitExhausted, NotGranted, RequestStats
from nextcrm_pipelines.core.oauth import TokenManager, reconnect_hint
from nextcrm_pipelines.core.provider import ClientContext, Provider
from nextcrm_pipelines.core.settings import db_schema, libpq_url
from nextcrm_pipelines.core.sweep import SWEEP_PARTITION, sweep_deletions
from nextcrm_pipelines.core.sync import (
    BATCH_SIZE,
    Claim,
    EntitySpec,
    Reachability,
    SyncResult,
    SyncWindow,
    close_abandoned_logs,
    sync_windows,
)
from nextcrm_pipelines.core.vault import SecretBox

log = logging.getLogger(__name__)

# Processes that sync the windows of one backfill side by side (1: all in this process). A window
# is the unit: each keeps its own transactions and sync log whichever process syncs it.
SYNC_WORKERS_ENV = "NEXTCRM_SYNC_WORKERS"
# Fewer windows than this sync in one process: starting a helper costs about half a second.
PARALLEL_MIN_WINDOWS = 4
# How long a helper waits for the first process's first answer from the provider before it starts anyway.
HELPER_START_TIMEOUT = 300.0
# Room for the cause of an unreachable provider shared between processes (a URL and a short reason).
UNREACHABLE_CAUSE_BYTES = 1024


# The `application_name` of a session syncing for a Dagster run: "nextcrm run <run id>", so a run that finds
# the connection's lock taken can say which run holds it.
HOLDER_PREFIX = "nextcrm run "


class ConnectionUnavailable(RuntimeError):
    """The connection exists but may not sync now (disabled, or waiting for re-authorisation)."""


class ConnectionBusy(ConnectionUnavailable):
    """Another process holds the connection's lock (a sync) and the caller chose not to wait for it."""


def day_window(day: date) -> SyncWindow:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return SyncWindow(start, start + timedelta(days=1))


SNAPSHOT_START = datetime(1970, 1, 1, tzinfo=UTC)


def snapshot_window() -> SyncWindow:
    """The window of a whole-list read: everything the provider holds, as of now."""
    return SyncWindow(SNAPSHOT_START, datetime.now(UTC))


def authorised_in_browser(provider: Provider, connection: Connection) -> bool:
    """Whether the connection was authorised through the OAuth flow (`connect`), not with stored credentials:
    OAuth providers without credential fields, and Mautic connections `connect` made (they carry a token group)."""
    if provider.oauth is None or provider.discover_tenants is None:
        return False
    return not provider.secret_fields or "token_group" in (connection.settings or {})


def reauth_command(provider: Provider, connection: Connection) -> str:
    """The command that gives this connection working credentials again, in its own row: `connections
    set-secret <id>` for API keys, logins and client credentials, else the `connect` flow for its tenant."""
    return reconnect_hint(connection, by_credentials=not authorised_in_browser(provider, connection))


def reauth_hint(provider: Provider, connection: Connection) -> str:
    """What the user runs to give a connection working credentials again (the one hint its error carries)."""
    return vault.fix_hint(reauth_command(provider, connection), authorised_in_browser(provider, connection))


@contextmanager
def connection_lock(conn: psycopg.Connection, connection_id: str, wait: bool = True) -> Iterator[None]:
    """Hold a session-level Postgres advisory lock for `connection_id` on `conn` for the block.

    `wait=False` raises `ConnectionBusy` at once when another session holds it, for callers that have
    other work to do rather than wait for a sync to end (webhook apply runs). The key names the schema too:
    advisory locks are per database, and two deployments may keep their tables in one database.
    """
    key = zlib.crc32(f"nextcrm-sync:{db_schema()}:{connection_id}".encode())
    if wait:
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    elif not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        conn.rollback()
        raise ConnectionBusy(f"connection {connection_id!r} is being synced by {_holder(conn, key)}")
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        conn.commit()


def _holder(conn: psycopg.Connection, key: int) -> str:
    """Who holds a connection's lock: the session's `application_name` names the run (see `open_connection`)."""
    row = conn.execute(
        "SELECT a.application_name, a.backend_start FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s LIMIT 1",
        (key,),
    ).fetchone()
    conn.rollback()
    if row is None:
        return "another process (it may just have finished)"
    name, since = row
    if name.startswith(HOLDER_PREFIX):
        return f"run {name[len(HOLDER_PREFIX) :]} (connected since {since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"
    return f"another process ({name or 'unnamed'}, connected since {since.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"


def windows_done(
    conn: psycopg.Connection, schema: str, entity_name: str, connection_id: str, run_ids: Collection[str]
) -> set[datetime]:
    """Start times of the windows of one connection's entity that a sync of one of `run_ids` finished
    (`success`, or `partial` with its lost records logged): a retry or re-execution skips them."""
    if not run_ids:
        return set()
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT window_start FROM {} WHERE connection_id = %s AND asset = %s "
            "AND run_id = ANY(%s) AND status IN ('success', 'partial')"
        ).format(table("integration_sync_logs", schema)),
        (connection_id, entity_name, list(run_ids)),
    ).fetchall()
    return {row[0] for row in rows}


def whole_list_done(conn: psycopg.Connection, schema: str, entity_name: str, connection_id: str,
                    run_ids: Collection[str], swept: bool) -> bool:  # fmt: skip
    """Whether a sync of one of `run_ids` read this connection's whole list to the end (`success`, or
    `partial` with its lost records logged) and, for an entity with an id sweep (`swept`), swept it: a retry
    or re-execution of the run does not read that connection again."""
    if not run_ids:
        return False
    rows = conn.execute(
        sql.SQL(
            "SELECT partition = %s, bool_or(status IN ('success', 'partial')) FROM {} "
            "WHERE connection_id = %s AND asset = %s AND run_id = ANY(%s) GROUP BY 1"
        ).format(table("integration_sync_logs", schema)),
        (SWEEP_PARTITION, connection_id, entity_name, list(run_ids)),
    ).fetchall()
    done = {bool(sweep): bool(ok) for sweep, ok in rows}
    return done.get(False, False) and (not swept or done.get(True, False))


def windows_held_whole(
    conn: psycopg.Connection, schema: str, entity_name: str, connection_id: str, starts: Collection[datetime]
) -> set[datetime]:
    """Which of the day windows starting at `starts` the mirror holds whole for one connection's entity:
    the newest finished sync of the day succeeded, began after the day ended and saw all of it (no
    reporting lag cut it short). The hourly runs skip those and sync the rest."""
    if not starts:
        return set()
    rows = conn.execute(
        sql.SQL(
            """
            SELECT window_start FROM (
                SELECT window_start, window_end, status, started_at,
                       row_number() OVER (PARTITION BY window_start ORDER BY started_at DESC, id DESC) AS newest
                FROM {}
                WHERE connection_id = %s AND asset = %s AND status <> 'running' AND window_start = ANY(%s)
            ) AS syncs
            WHERE newest = 1 AND status = 'success'
              AND started_at >= window_start + interval '1 day' AND window_end >= window_start + interval '1 day'
            """
        ).format(table("integration_sync_logs", schema)),
        (connection_id, entity_name, list(starts)),
    ).fetchall()
    return {row[0] for row in rows}


def database_now(database_url: str) -> datetime:
    """The database's clock: rows written after this moment carry a later `synced_at`."""
    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute("SELECT now()").fetchone()[0]


def rows_changed_since(
    database_url: str, schema: str, entity: EntitySpec, connection_ids: Collection[str], since: datetime
) -> dict[tuple[str, date | None], int]:
    """Rows of `entity` written since `since`, by connection and by the UTC day of their partition column:
    which partitions a webhook apply or a deletion sweep changed."""
    if not connection_ids:
        return {}
    with psycopg.connect(libpq_url(database_url)) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT connection_id, ({col} AT TIME ZONE 'UTC')::date, count(*) FROM {t} "
                "WHERE connection_id = ANY(%s) AND synced_at >= %s GROUP BY 1, 2"
            ).format(col=sql.Identifier(entity.partition_column), t=table(entity.table.name, schema)),
            (list(connection_ids), since),
        ).fetchall()
    return {(connection_id, day): count for connection_id, day, count in rows}


@contextmanager
def open_connection(
    *,
    database_url: str,
    provider: Provider,
    connection_id: str,
    box: SecretBox | None = None,
    lock: bool = True,
    rate_share: float = 1.0,
    wait: bool = True,
    run_id: str | None = None,
) -> Iterator[tuple[psycopg.Connection, Connection, Any, RequestStats]]:
    """Check and lock one connection, open its client; yields (session, connection, client, stats).

    Bad credentials met inside the block mark the connection `needs_reauth` with the command that
    fixes it, then propagate as `AuthenticationFailed`; a scope the grant lacks (`NotGranted`) gets the same
    command but leaves the connection active. `lock=False` is for a helper process of a
    sync that already holds the connection's lock; `wait=False` raises `ConnectionBusy` instead of
    waiting for a lock another run holds.
    """
    box = box or SecretBox.from_environment()
    stats = RequestStats()
    # `run_id` names the session after its Dagster run, so a run that finds the connection taken can say whose.
    with psycopg.connect(libpq_url(database_url), application_name=_session_name(run_id)) as conn:
        connection = vault.get_connection(conn, connection_id)
        if connection.provider != provider.name:
            raise ConnectionUnavailable(f"connection {connection_id!r} is a {connection.provider} connection")
        if connection.status != "active":
            hint = (
                reauth_hint(provider, connection)
                if connection.status == "needs_reauth"
                else f"enable it with `nextcrm-pipelines connections enable {connection_id}`"
            )
            raise ConnectionUnavailable(f"connection {connection_id!r} is {connection.status}: {hint}")
        secrets = vault.load_secrets(conn, connection_id, box)
        conn.commit()
        tokens = None
        if provider.oauth is not None:
            tokens = TokenManager(spec=provider.oauth, connection=connection, secrets=secrets, box=box,
                                  database_url=database_url)  # fmt: skip
        context = ClientContext(connection=connection, secrets=secrets, stats=stats, tokens=tokens,
                                rate_share=rate_share)  # fmt: skip
        try:
            with (
                connection_lock(conn, connection_id, wait) if lock else nullcontext(),
                provider.open_client(context) as client,
            ):
                yield conn, connection, client, stats
        except AuthenticationFailed as exc:
            conn.rollback()
            if not vault.has_fix(str(exc)):  # the error names its cause; it gets the one command that fixes it
                exc.args = (f"{exc}; {reauth_hint(provider, connection)}",)
            stored = vault.get_connection(conn, connection_id)
            # A token refresh already marked it (with its fix); a failed window's sync outcome may have replaced
            # that error since with the bare cause, which gets the fix back.
            if stored.status != "needs_reauth" or not vault.has_fix(stored.last_error):
                vault.set_status(conn, connection_id, "needs_reauth", str(exc))
                conn.commit()
            log.error("%s", exc)
            raise
        except NotGranted as exc:  # this entity needs a scope the grant lacks: the connection itself stays active
            conn.rollback()
            if not vault.has_fix(str(exc)):
                exc.args = (f"{exc}; {reauth_hint(provider, connection)}",)
            vault.record_sync_outcome(conn, connection_id, "failed", str(exc))  # `connections list` shows the fix
            conn.commit()
            log.error("%s", exc)
            raise
        finally:
            if tokens is not None:
                tokens.close()


# Opens one connection's client the way `open_connection` does (same keywords, same yield): the Dagster
# resource `ProviderClients` passes its own, so a test can hand the assets a different client.
Opener = Callable[..., AbstractContextManager[tuple[psycopg.Connection, Connection, Any, RequestStats]]]


def _session_name(run_id: str | None) -> str:
    """The Postgres `application_name` of a sync's session: its run, when a Dagster run started it."""
    return f"{HOLDER_PREFIX}{run_id}"[:63] if run_id else "nextcrm-pipelines"


def sync_workers(provider: Provider, window_count: int, workers: int | None = None) -> int:
    """How many processes sync `window_count` windows: `workers`, else NEXTCRM_SYNC_WORKERS, else
    up to 2 by the CPUs; 1 for providers that do not allow it and for a few windows."""
    if not provider.parallel_windows or window_count < PARALLEL_MIN_WINDOWS:
        return 1
    if workers is None:
        configured = os.environ.get(SYNC_WORKERS_ENV, "").strip()
        if configured and not configured.isdigit():
            raise ValueError(f"{SYNC_WORKERS_ENV} must be a whole number of processes, got {configured!r}")
        workers = int(configured) if configured else min(2, os.cpu_count() or 1)
    return max(1, min(workers, window_count // 2))


def sync_partitions(
    *,
    database_url: str,
    schema: str,
    provider: Provider,
    entity_name: str,
    connection_id: str,
    windows: list[SyncWindow],
    partitions: list[str | None] | None = None,
    box: SecretBox | None = None,
    run_id: str | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    wait: bool = True,
    opener: Opener | None = None,
) -> list[SyncResult]:
    """Sync several windows of one connection with one client and one database session.

    The next window is fetched while the previous one is written, and a long backfill of a provider
    that allows it is shared between processes (`sync_workers`). A window that fails is logged
    and reported in its result (`status == "failed"`); bad credentials mark the connection
    `needs_reauth` and raise `AuthenticationFailed`. Results come in the order of `windows`.
    `wait=False` raises `ConnectionBusy` at once when another sync holds the connection, instead of
    waiting for it (a Dagster run must not sit in a run slot waiting for another run).
    """
    partitions = partitions or [None] * len(windows)
    job = _Group(database_url=database_url, schema=schema, provider=provider.name, entity_name=entity_name,
                 connection_id=connection_id, windows=windows, partitions=partitions, box=box, run_id=run_id,
                 batch_size=batch_size, wait=wait, opener=opener)  # fmt: skip
    count = sync_workers(provider, len(windows), workers)
    if count == 1:
        return _sync_group(job, provider)
    return _sync_in_processes(job, provider, count)


@dataclass(frozen=True)
class _Group:
    """The windows of one connection's entity to sync, and how; processes that share them each
    sync the windows their claim hands out."""

    database_url: str = field(repr=False)  # may hold a password
    schema: str
    provider: str
    entity_name: str
    connection_id: str
    windows: list[SyncWindow]
    partitions: list[str | None]
    box: SecretBox | None = field(repr=False)
    run_id: str | None
    batch_size: int
    lock: bool = True
    rate_share: float = 1.0
    wait: bool = True
    opener: Opener | None = field(default=None, repr=False)


def _sync_group(
    job: _Group,
    provider: Provider,
    alongside: Callable[[], AbstractContextManager[Any]] = nullcontext,
    claim: Claim | None = None,
    reachability: Reachability | None = None,
) -> list[SyncResult]:
    """Sync `job`'s windows in this process (those `claim` hands out, else all, with `reachability`
    shared with the processes that share them); `alongside` wraps the sync, inside the connection's lock."""
    fetch = provider.fetchers[job.entity_name]
    with (
        (job.opener or open_connection)(
            database_url=job.database_url, provider=provider, connection_id=job.connection_id, box=job.box,
            lock=job.lock, rate_share=job.rate_share, wait=job.wait, run_id=job.run_id,
        ) as (conn, _, client, stats),
        alongside(),
    ):  # fmt: skip
        if job.lock and close_abandoned_logs(conn, job.schema, job.connection_id):
            log.warning("%s: sync logs left running by a stopped sync are marked failed", job.connection_id)
        return sync_windows(
            conn=conn,
            schema=job.schema,
            provider=provider.name,
            entity=provider.entity(job.entity_name),
            connection_id=job.connection_id,
            windows=job.windows,
            fetch=lambda window: fetch(client, window),
            stats=stats,
            run_id=job.run_id,
            partitions=job.partitions,
            batch_size=job.batch_size,
            fatal=(AuthenticationFailed, DailyLimitExhausted, NotGranted),
            claim=claim,
            reachability=reachability,
        )


class WindowClaims(Reachability):
    """Hands the windows of one backfill out to `count` processes, shared through shared memory.

    Each process starts with its own run of consecutive windows, taken front to back; one whose run
    is done takes windows from the back of the longest run left, one after another. Processes thus
    finish together however unevenly the windows weigh (recent days also read the events feed, a
    helper starts half a second late), and still write far-apart days until they meet: two sessions
    writing neighbouring days at once contend for the same index pages (about a third more Postgres
    CPU, measured on a backfill).

    It is also the processes' shared `Reachability`. Helpers (processes 1 and up) take their first
    window only once process 0 has had an answer from the provider or found it unreachable: when the
    provider is down, one window fails naming the cause and every other is `NotTried`, however the
    processes' starts interleave, rather than one failed window per process.
    """

    def __init__(self, window_count: int, count: int, context: Any) -> None:
        bounds = [k * window_count // count for k in range(count + 1)]
        # Run k is [next[k], end[k]): stored as next_0, end_0, next_1, end_1, ...
        self._runs = context.Array("q", [b for k in range(count) for b in (bounds[k], bounds[k + 1])])
        self.count = count
        self._settled = context.Event()  # process 0 had an answer, or found the provider unreachable
        self._cause = context.Array("c", UNREACHABLE_CAUSE_BYTES)  # why it was unreachable; empty while it was not

    def answered(self) -> None:
        self._settled.set()

    def unreachable(self, cause: str) -> None:
        with self._cause.get_lock():
            if not self._cause.value:
                self._cause.value = cause.encode()[: UNREACHABLE_CAUSE_BYTES - 1].decode(errors="ignore").encode()
        self._settled.set()

    def down(self) -> str | None:
        with self._cause.get_lock():
            return self._cause.value.decode() or None

    def claimer(self, number: int) -> Claim:
        """The claim of process `number` (0 to count - 1), for use in that process."""
        runs, count = self._runs, self.count
        taking_from = [number]
        waiting = [number > 0]

        def claim() -> int | None:
            if waiting[0]:
                # A safety bound only: process 0 settles it at its first answer, or when its fetching ends.
                self._settled.wait(HELPER_START_TIMEOUT)
                waiting[0] = False
            with runs.get_lock():
                run = taking_from[0]
                if runs[2 * run] >= runs[2 * run + 1]:  # that run is done: help the longest one left
                    left = [runs[2 * k + 1] - runs[2 * k] for k in range(count)]
                    run = max(range(count), key=left.__getitem__)
                    if left[run] <= 0:
                        return None
                    taking_from[0] = run
                if run == number:
                    runs[2 * run] += 1
                    return runs[2 * run] - 1
                runs[2 * run + 1] -= 1
                return runs[2 * run + 1]

        return claim


def _sync_in_processes(job: _Group, provider: Provider, count: int) -> list[SyncResult]:
    """Sync the windows in `count` processes (this one and helpers) that share them by `WindowClaims`,
    each with its share of the rate. Helpers start once this process holds the connection's lock
    and are waited for (or stopped, if this process fails) before it lets the lock go."""
    share = 1.0 / count
    context = multiprocessing.get_context("spawn")  # forking a threaded process is unsafe
    claims = WindowClaims(len(job.windows), count, context)
    results: list[SyncResult] = []

    @contextmanager
    def helpers() -> Iterator[None]:
        started: list[tuple[Any, Any]] = []
        try:
            for number in range(1, count):
                receiver, sender = context.Pipe(duplex=False)
                helper_job = replace(job, lock=False, rate_share=share)
                process = context.Process(target=_helper_main, name=f"sync-{job.entity_name}-{number}", daemon=True,
                                          args=(helper_job, claims, number, sender))  # fmt: skip
                process.start()
                sender.close()
                started.append((process, receiver))
            yield
            for process, receiver in started:
                results.extend(_helper_results(process, receiver))
        finally:
            for process, receiver in started:
                if process.is_alive():
                    process.terminate()
                process.join(timeout=10)
                receiver.close()

    own = _sync_group(replace(job, lock=True, rate_share=share), provider, alongside=helpers, claim=claims.claimer(0),
                      reachability=claims)  # fmt: skip
    return sorted([*own, *results], key=lambda result: result.index)


def _helper_results(process: Any, receiver: Any) -> list[SyncResult]:
    """A helper's results, or its error raised here (bad credentials stay `AuthenticationFailed`)."""
    try:
        kind, payload = receiver.recv()
    except EOFError:
        process.join(timeout=10)
        raise RuntimeError(
            f"sync helper {process.name} stopped (exit code {process.exitcode}) before it finished"
        ) from None
    if kind == "error":
        raise payload
    return payload


def _exit_with_parent() -> None:
    """Stop this helper when the process that started it is gone (killed included): its lock went with it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _transferable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _helper_main(job: _Group, claims: WindowClaims, number: int, sender: Any) -> None:
    """A helper process: sync its windows and send the results (or the error that stopped it) back."""
    _exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from nextcrm_pipelines.providers import get_provider

    try:
        results = _sync_group(job, get_provider(job.provider), claim=claims.claimer(number), reachability=claims)
        for result in results:
            if result.exception is not None:
                result.exception = _transferable(result.exception)
        sender.send(("ok", results))
    except BaseException as exc:
        sender.send(("error", _transferable(exc)))
    finally:
        sender.close()


def sweep_connection(
    *,
    database_url: str,
    schema: str,
    provider: Provider,
    entity_name: str,
    connection_id: str,
    box: SecretBox | None = None,
    run_id: str | None = None,
    opener: Opener | None = None,
) -> SyncResult:
    """Run the entity's deletion sweep for one connection (see `core.sweep`); raises if it failed."""
    entity = provider.entity(entity_name)
    with (opener or open_connection)(database_url=database_url, provider=provider, connection_id=connection_id,
                                     box=box, run_id=run_id) as (
        conn, _, client, stats,
    ):  # fmt: skip
        result = sweep_deletions(conn=conn, schema=schema, provider=provider.name, entity=entity,
                                 connection_id=connection_id, sweep=provider.id_sweeps[entity_name], client=client,
                                 stats=stats, run_id=run_id)  # fmt: skip
    if result.exception is not None:
        raise result.exception
    return result


def sync_partition(
    *,
    database_url: str,
    schema: str,
    provider: Provider,
    entity_name: str,
    connection_id: str,
    window: SyncWindow,
    box: SecretBox | None = None,
    run_id: str | None = None,
    partition: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> SyncResult:
    """Sync one window of one connection; raises the error if it failed."""
    (result,) = sync_partitions(
        database_url=database_url, schema=schema, provider=provider, entity_name=entity_name,
        connection_id=connection_id, windows=[window], partitions=[partition], box=box, run_id=run_id,
        batch_size=batch_size,
    )  # fmt: skip
    if result.exception is not None:
        log.error("%s", result.exception)
        raise result.exception
    return result
