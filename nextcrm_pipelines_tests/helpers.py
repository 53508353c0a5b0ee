"""Test helpers: reading the mirror and the sandbox's truth, and syncing day ranges."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines.core.runner import day_window, sync_partition
from nextcrm_pipelines.core.sync import SyncResult
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.resources import ProviderClients
from nextcrm_sandbox.server import SandboxServer


def sandbox_now(sandbox: SandboxServer) -> datetime:
    return datetime.fromtimestamp(sandbox.clock(), UTC)


def last_midday(at: datetime | None = None) -> int:
    """The latest 12:00 UTC not after `at` (default: now), in unix seconds.

    A sandbox started there has twelve hours of its day behind it and twelve ahead at whatever hour the
    tests run, and is never ahead of the wall clock that the code under test reads in places.
    """
    at = at or datetime.now(UTC)
    midday = datetime(at.year, at.month, at.day, 12, tzinfo=UTC)
    return int((midday if midday <= at else midday - timedelta(days=1)).timestamp())


def days_back(today: date, days: int) -> list[date]:
    return [today - timedelta(days=n) for n in range(days, -1, -1)]


def sync_days(database_url: str, schema: str, connection_id: str, entity: str, days: list[date],
              **kwargs: Any) -> list[SyncResult]:  # fmt: skip
    """Sync each day in its own call (as separate runs would); ids are `<provider>-<name>`."""
    provider = get_provider(connection_id.split("-", 1)[0])
    return [
        sync_partition(
            database_url=database_url,
            schema=schema,
            provider=provider,
            entity_name=entity,
            connection_id=connection_id,
            window=day_window(day),
            **kwargs,
        )
        for day in days
    ]


def mirror_rows(database_url: str, schema: str, name: str, columns: str = "*") -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT " + columns + " FROM {} ORDER BY connection_id, id").format(table(name, schema))
        ).fetchall()


def charges_by_id(database_url: str, schema: str) -> dict[str, tuple[Decimal, Decimal, str, str, bool]]:
    rows = mirror_rows(
        database_url, schema, "stripe_payments", "id, amount, amount_refunded, currency, status, refunded"
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def expected_charges(sandbox: SandboxServer, api_key: str) -> dict[str, tuple[Decimal, Decimal, str, str, bool]]:
    return {
        c["id"]: (
            minor_to_major(c["amount"], c["currency"]),
            minor_to_major(c["amount_refunded"], c["currency"]),
            c["currency"],
            c["status"],
            c["refunded"],
        )
        for c in sandbox.stripe_export(api_key, "charges")
    }


def wait_until_blocked(database_url: str, session: psycopg.Connection, what: str, timeout: float = 30) -> None:
    """Return once `session` waits for a lock another session holds; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as watch:
        query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
        while not watch.execute(query, (session.info.backend_pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, f"{what} never waited for a lock"
            time.sleep(0.01)


class WrappingClients(ProviderClients):
    """The real provider clients, each handed to `wrap(connection, client)` before the assets get it: a test's
    faults go in at the seam the code location offers (the `clients` resource), all else stays real."""

    def wrap(self, connection: Any, client: Any) -> Any:
        return client

    def open(self, **kwargs: Any):
        @contextmanager
        def opened() -> Iterator[tuple]:
            with super(WrappingClients, self).open(**kwargs) as (conn, connection, client, stats):
                yield conn, connection, self.wrap(connection, client), stats

        return opened()
