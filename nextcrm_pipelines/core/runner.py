"""Sync one connection x window of one entity: load the connection, open its client, run the engine.

Shared by the Dagster assets, the CLI and the benchmarks so they exercise the same path. A
session-level advisory lock per connection keeps two syncs of one connection from overlapping,
however they were launched (Dagster's tag concurrency limit covers runs; this covers the rest).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import AuthenticationFailed, DailyLimitExhausted, RequestStats
from nextcrm_pipelines.core.oauth import TokenManager, reconnect_hint
from nextcrm_pipelines.core.provider import ClientContext, Provider
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.sweep import sweep_deletions
from nextcrm_pipelines.core.sync import BATCH_SIZE, SyncResult, SyncWindow, sync_windows
from nextcrm_pipelines.core.vault import SecretBox

log = logging.getLogger(__name__)


class ConnectionUnavailable(RuntimeError):
    """The connection exists but may not sync now (disabled, or waiting for re-authorisation)."""


def day_window(day: date) -> SyncWindow:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return SyncWindow(start, start + timedelta(days=1))


SNAPSHOT_START = datetime(1970, 1, 1, tzinfo=UTC)


def snapshot_window() -> SyncWindow:
    """The window of a whole-list read: everything the provider holds, as of now."""
    return SyncWindow(SNAPSHOT_START, datetime.now(UTC))


def reauth_hint(provider: Provider, connection: Connection) -> str:
    """What the user runs to give a connection working credentials again."""
    if provider.oauth is not None and provider.discover_tenants is not None:
        return f"reconnect with `{reconnect_hint(connection)}`"
    command = f'nextcrm-pipelines connections add {provider.name} --name "{connection.display_name}"'
    return f"store a working key with `{command}`"


@contextmanager
def connection_lock(conn: psycopg.Connection, connection_id: str) -> Iterator[None]:
    """Hold a session-level Postgres advisory lock for `connection_id` on `conn` for the block."""
    key = zlib.crc32(f"nextcrm-sync:{connection_id}".encode())
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        conn.commit()


@contextmanager
def open_connection(
    *, database_url: str, provider: Provider, connection_id: str, box: SecretBox | None = None
) -> Iterator[tuple[psycopg.Connection, Connection, Any, RequestStats]]:
    """Check and lock one connection, open its client; yields (session, connection, client, stats).

    Bad credentials met inside the block mark the connection `needs_reauth` with the command that
    fixes it, then propagate as `AuthenticationFailed`.
    """
    box = box or SecretBox.from_environment()
    stats = RequestStats()
    with psycopg.connect(libpq_url(database_url)) as conn:
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
        context = ClientContext(connection=connection, secrets=secrets, stats=stats, tokens=tokens)
        try:
            with connection_lock(conn, connection_id), provider.open_client(context) as client:
                yield conn, connection, client, stats
        except AuthenticationFailed as exc:
            conn.rollback()
            if vault.get_connection(conn, connection_id).status != "needs_reauth":
                vault.set_status(conn, connection_id, "needs_reauth", f"{exc}; {reauth_hint(provider, connection)}")
                conn.commit()
            log.error("%s", exc)
            raise
        finally:
            if tokens is not None:
                tokens.close()


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
) -> list[SyncResult]:
    """Sync several windows of one connection with one client and one database session.

    The next window is fetched while the previous one is written. A window that fails is logged
    and reported in its result (`status == "failed"`); bad credentials mark the connection
    `needs_reauth` and raise `AuthenticationFailed`.
    """
    entity = provider.entity(entity_name)
    fetch = provider.fetchers[entity_name]
    with open_connection(database_url=database_url, provider=provider, connection_id=connection_id, box=box) as (
        conn, _, client, stats,
    ):  # fmt: skip
        return sync_windows(
            conn=conn,
            schema=schema,
            provider=provider.name,
            entity=entity,
            connection_id=connection_id,
            windows=windows,
            fetch=lambda window: fetch(client, window),
            stats=stats,
            run_id=run_id,
            partitions=partitions,
            batch_size=batch_size,
            fatal=(AuthenticationFailed, DailyLimitExhausted),
        )


def sweep_connection(
    *,
    database_url: str,
    schema: str,
    provider: Provider,
    entity_name: str,
    connection_id: str,
    box: SecretBox | None = None,
    run_id: str | None = None,
) -> SyncResult:
    """Run the entity's deletion sweep for one connection (see `core.sweep`); raises if it failed."""
    entity = provider.entity(entity_name)
    with open_connection(database_url=database_url, provider=provider, connection_id=connection_id, box=box) as (
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
