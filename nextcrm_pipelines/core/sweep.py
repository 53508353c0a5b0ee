"""The deletion sweep for providers that hard-delete without a trace (MYOB keeps no tombstones).

Every id that exists upstream is streamed into a temporary table (bounded memory, any size), and
the stored rows of the connection that are neither deleted nor newer than the sweep's start but
missing from that list are the candidates. Paging a list while it changes can miss an id, so a
candidate is flagged only after the provider confirms it is gone (a single-record read answering
404); then it is buried like any tombstone: kept with its last data, `deleted` set, under the
never-regress guard. Each sweep writes a sync log row (partition `id-sweep`).

Some data of a record changes upstream without its update time moving (a Mautic contact's segment
memberships), so no incremental read finds the change. A sweep with `Drift` streams that data's current
values the same way, compares them with a text-array column of the stored rows, and reads the records that
differ again: the row then holds what the provider holds, at the version it has (an equal version with
other content replaces the row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.sync import EntitySpec, Record, SyncResult, SyncWindow, finish_log, start_log
from nextcrm_pipelines.core.upsert import UpsertWriter

log = logging.getLogger(__name__)

SWEEP_PARTITION = "id-sweep"


@dataclass(frozen=True)
class Drift:
    """Data of a record that changes upstream without its update time: the text-array `column` of the stored
    rows, every current (record id, element) pair in pages (`list_values`), and how to read records again by
    id (`reread`: their records as the sync gives them, absent ids left out)."""

    column: str
    list_values: Callable[[Any], Iterator[list[tuple[str, str]]]]
    reread: Callable[[Any, list[str]], list[Record]]


@dataclass(frozen=True)
class IdSweep:
    """How to list every current id of an entity, and to confirm that one id is really gone; with `drift`, the
    data that moves without the record's update time, checked in the same sweep."""

    list_ids: Callable[[Any], Iterator[list[str]]]
    is_gone: Callable[[Any, str, dict[str, Any]], bool]
    drift: Drift | None = None


# Records read again per request when their drifted data is refreshed.
REREAD_CHUNK = 200


def sweep_deletions(
    *,
    conn: psycopg.Connection,
    schema: str,
    provider: str,
    entity: EntitySpec,
    connection_id: str,
    sweep: IdSweep,
    client: Any,
    stats: RequestStats,
    run_id: str | None = None,
) -> SyncResult:
    """Flag the connection's rows whose record no longer exists upstream; returns the logged result."""
    started_at = datetime.now(UTC)
    started = time.monotonic()
    before = stats.as_dict()
    result = SyncResult(entity=entity.name, connection_id=connection_id, window=SyncWindow(started_at, started_at))
    result.sync_log_id = start_log(conn, schema, provider, entity.name, connection_id, result.window, run_id,
                                   SWEEP_PARTITION)  # fmt: skip
    target = table(entity.table.name, schema)
    refreshed = 0
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE nextcrm_sweep_ids (id text) ON COMMIT DROP")
            with cur.copy("COPY nextcrm_sweep_ids (id) FROM STDIN") as copy:
                for page in sweep.list_ids(client):
                    result.total += len(page)
                    for record_id in page:
                        copy.write_row((record_id,))
            cur.execute("CREATE INDEX ON nextcrm_sweep_ids (id)")
            cur.execute("ANALYZE nextcrm_sweep_ids")
            candidates = cur.execute(
                sql.SQL(
                    "SELECT t.id, t.raw FROM {t} AS t WHERE t.connection_id = %s AND NOT t.deleted "
                    "AND t.source_updated_at < %s "
                    "AND NOT EXISTS (SELECT 1 FROM nextcrm_sweep_ids s WHERE s.id = t.id)"
                ).format(t=target),
                (connection_id, started_at),
            ).fetchall()
        conn.commit()
        gone = [record_id for record_id, raw in candidates if sweep.is_gone(client, record_id, raw)]
        if len(gone) < len(candidates):
            log.info("%s: %d id(s) missing from the listing still exist upstream; left as they are",
                     entity.name, len(candidates) - len(gone))  # fmt: skip
        writer = UpsertWriter(conn, entity.table, connection_id, schema)
        result.counts.updated = writer.bury(gone, started_at) if gone else 0
        if sweep.drift is not None:
            refreshed = _refresh_drifted(conn, schema, entity, connection_id, sweep.drift, client, writer, started_at)
        result.counts.updated += refreshed
        result.counts.unchanged = result.total
        result.status = "success"
    except Exception as exc:
        conn.rollback()
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        result.exception = exc
    after = stats.as_dict()
    result.stats.add(**{k: after[k] - before[k] for k in after})
    result.duration = time.monotonic() - started
    finish_log(conn, schema, result)
    again = f", read {refreshed} again (their {sweep.drift.column} changed upstream)" if sweep.drift else ""
    log.info("%s: id sweep of %s listed %d, flagged %d deleted%s", entity.name, connection_id, result.total,
             result.counts.updated - refreshed, again)  # fmt: skip
    return result


def _refresh_drifted(conn: psycopg.Connection, schema: str, entity: EntitySpec, connection_id: str, drift: Drift,
                     client: Any, writer: UpsertWriter, started_at: datetime) -> int:  # fmt: skip
    """Read again the stored records whose `drift.column` differs from what the provider lists now (compared as
    sets); returns how many rows that changed. Rows changed since the sweep began are left to their writers."""
    target = table(entity.table.name, schema)
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE nextcrm_sweep_values (id text, value text) ON COMMIT DROP")
        with cur.copy("COPY nextcrm_sweep_values (id, value) FROM STDIN") as copy:
            for page in drift.list_values(client):
                for pair in page:
                    copy.write_row(pair)
        cur.execute("CREATE INDEX ON nextcrm_sweep_values (id)")
        cur.execute("ANALYZE nextcrm_sweep_values")
        drifted = [row[0] for row in cur.execute(
            sql.SQL(
                "SELECT t.id FROM {t} AS t LEFT JOIN (SELECT id, array_agg(DISTINCT value ORDER BY value) AS v "
                "FROM nextcrm_sweep_values GROUP BY id) AS s ON s.id = t.id "
                "WHERE t.connection_id = %s AND NOT t.deleted AND t.source_updated_at < %s "
                "AND coalesce(s.v, '{{}}') IS DISTINCT FROM ARRAY(SELECT DISTINCT x FROM unnest(t.{c}) AS x ORDER BY x)"
            ).format(t=target, c=sql.Identifier(drift.column)),
            (connection_id, started_at),
        ).fetchall()]  # fmt: skip
    conn.commit()
    changed = 0
    for start in range(0, len(drifted), REREAD_CHUNK):
        records = drift.reread(client, drifted[start : start + REREAD_CHUNK])
        counts = writer.write([entity.to_row(raw, version) for raw, version in records], may_be_stored=True)
        changed += counts.inserted + counts.updated
    return changed
