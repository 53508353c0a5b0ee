"""The fast, idempotent, never-regressing write path into one entity table.

Per batch, in one transaction: look up the stored hashes of the batch's ids and drop records whose
raw JSON is unchanged (a re-sync then costs an index lookup, not a rewrite); binary `COPY` records
not stored yet straight into the table (once a batch found none of its ids stored, as in a backfill,
the next is copied without the lookup: should an id exist after all, the unique key refuses the
COPY and the batch is redone with it); binary `COPY` changed ones into a temporary table and apply
them with one `INSERT ... SELECT ... ON CONFLICT DO UPDATE` that only replaces a row when the
incoming version is not older than the stored one and the content differs. Should another writer
insert one of the "new" ids in between, the unique key refuses the direct COPY and the batch is
redone through the staged upsert, so the fast path never trades away correctness. A batch that
the database refuses is split in halves until the bad records are isolated, so one malformed
record is logged with its id and the rest still lands.

NUL (U+0000), which providers' strings sometimes hold, is a character Postgres stores in neither
`text` nor `jsonb`. A refused batch is first searched for it: every NUL is removed from the rows'
text values and from every string (keys included) of their raw JSON, the raw hash is taken again
over what is then stored, and the batch is written again. Records without NUL cost nothing for
this (no per-record check on the way in: the database's refusal is the check), and a record that
holds one lands without it instead of being refused; a re-read finds its stored copy unchanged.

Writers run side by side (the processes of one backfill, a webhook sensor beside a sync) and may
hold the same ids: each batch takes its rows in id order, so two sessions inserting the same keys
wait for each other rather than deadlock, and a batch the database still rolls back (a deadlock
among other statements, a serialization failure) is written again from the start.

A tombstone row says only "this id is gone upstream since `version`" (a QuickBooks CDC delete stub,
an id missing from a MYOB id sweep): a stored row keeps its last known data and is flagged deleted
(and given the table's deleted status) under the same never-regress guard; an id never stored is
inserted as the stub.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

import orjson
import psycopg
import psycopg.errors
import xxhash
from psycopg import sql
from psycopg.types.string import BytesBinaryDumper

from nextcrm_pipelines.core import settings
from nextcrm_pipelines.core.db import table

log = logging.getLogger(__name__)

# jsonb's binary wire form is this version byte followed by the JSON text. Rows carry their raw JSON
# in that form, so binary COPY sends it as plain bytes (psycopg's C bytes dumper, nothing per row
# in Python) and the server reads it as jsonb: the column's type, not the client's, decides that.
JSONB_BINARY_VERSION = b"\x01"
# What the database says of one bad record (a value it cannot store, a required field missing):
# the batch is split until that record is alone, logged and skipped.
RECORD_ERRORS = (psycopg.DataError, psycopg.errors.NotNullViolation, psycopg.errors.CheckViolation)
# What the database says when it rolled a transaction back for its own reasons (SQLSTATE class 40:
# deadlock, serialization failure); psycopg gives each its own class, none derived from another.
ROLLED_BACK = (psycopg.errors.TransactionRollback, psycopg.errors.SerializationFailure,
               psycopg.errors.DeadlockDetected)  # fmt: skip
# Times a batch is written again after such a rollback before the error is raised.
ROLLBACK_RETRIES = 5

# The columns a `Row` fills besides its typed values, in the order it sends them: the key first, the
# mirror columns last. Every entity table is laid out so (core/tables.py derives each `TableSpec`).
ROW_KEY_COLUMNS = ("connection_id", "id")
ROW_MIRROR_COLUMNS = ("created_at", "source_updated_at", "deleted", "raw", "raw_hash")


@dataclass(frozen=True)
class TableSpec:
    """An entity table as the write path sees it: plain names and COPY types, derived once from the
    table's metadata (`core.tables.table_spec`), so nothing per row touches SQLAlchemy."""

    name: str
    # Every column a row fills, in table order: the key, the typed values, the mirror columns.
    copy_columns: tuple[str, ...]
    # The type each of them is sent as by binary COPY (`raw` goes as bytes in jsonb's binary form).
    copy_types: tuple[str, ...]
    # Builds a row's typed values in the table's column order, by name: `spec.values(amount=..., ...)`.
    values: type[tuple[Any, ...]]
    # What the `status` column says of a row whose record was hard-deleted upstream (see tombstones).
    deleted_status: str | None = None


class Row(NamedTuple):
    """One mapped record, ready to write (a named tuple: a backfill builds one per record)."""

    id: str
    values: tuple[Any, ...]
    created_at: datetime | None
    version: datetime
    deleted: bool
    # The raw JSON in jsonb's binary form (JSONB_BINARY_VERSION, then the text), as COPY sends it.
    raw_jsonb: bytes
    raw_hash: bytes
    tombstone: bool = False

    @property
    def raw(self) -> bytes:
        """The raw JSON text."""
        return self.raw_jsonb[len(JSONB_BINARY_VERSION) :]

    @classmethod
    def build(
        cls,
        id: str,
        values: tuple[Any, ...],
        *,
        created_at: datetime | None,
        version: datetime,
        deleted: bool,
        raw: dict[str, Any],
        tombstone: bool = False,
    ) -> Row:
        """A row from the provider's object: serialises the raw JSON once and hashes it.

        The hash only tells whether the stored copy of this record differs from the incoming one, so
        it needs to be wide (128 bits: an accidental match is out of reach), not cryptographic. XXH3
        costs 0.1 µs a record where BLAKE2b cost 2.4 µs, and it keeps the GIL: hashlib releases it
        for inputs over 2 kB, and each time the mapping thread then waits for the writing thread.
        """
        text = orjson.dumps(raw)
        digest = xxhash.xxh3_128_digest(text)
        return cls(id, values, created_at, version, deleted or tombstone, JSONB_BINARY_VERSION + text, digest,
                   tombstone)  # fmt: skip


@dataclass
class BatchCounts:
    """What one write did: rows inserted, updated, left unchanged (same or older) and refused."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0

    def add(self, other: BatchCounts) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.failed += other.failed


@dataclass(frozen=True)
class FailedRecord:
    id: str
    error: str


# How orjson writes NUL inside a JSON string (it escapes every control character this way).
NUL_ESCAPE = b"\\u0000"


def _strip_nul(value: Any) -> Any:
    """`value` with NUL removed from every string in it, dict keys included (JSON-shaped values)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def without_nul(row: Row) -> Row:
    """`row` with NUL removed from its text values and raw JSON, re-hashed; `row` itself if it holds none.

    Postgres stores NUL in neither `text` nor `jsonb`, and the characters around it are what the
    provider's user wrote, so dropping it loses nothing a reader of the mirror could use.
    """
    values = row.values
    if any(isinstance(v, str) and "\x00" in v for v in values):
        values = tuple(v.replace("\x00", "") if isinstance(v, str) else v for v in values)
    raw_jsonb, raw_hash = row.raw_jsonb, row.raw_hash
    if NUL_ESCAPE in raw_jsonb:  # may also be an escaped backslash followed by "u0000": then it stays as is
        text = orjson.dumps(_strip_nul(orjson.loads(row.raw)))
        if text != row.raw:
            raw_jsonb, raw_hash = JSONB_BINARY_VERSION + text, xxhash.xxh3_128_digest(text)
    if values is row.values and raw_jsonb is row.raw_jsonb:
        return row
    return row._replace(values=values, raw_jsonb=raw_jsonb, raw_hash=raw_hash)


def dedupe_latest(rows: Sequence[Row]) -> list[Row]:
    """One row per id: the newest version wins, and on a tie the one that came later."""
    latest: dict[str, Row] = {}
    for row in rows:
        held = latest.get(row.id)
        if held is None or row.version >= held.version:
            latest[row.id] = row
    return list(latest.values())


class UpsertWriter:
    """Writes batches of rows for one connection into one entity table, one transaction each.

    With `durable=False` a batch's commit does not wait for its WAL to reach disk: the caller then
    commits something durably after the batches it reports (the sync's window log), which flushes
    them too, since WAL is flushed in order. A server crash in between loses the batches and the
    report together, so the window is simply synced again.
    """

    def __init__(
        self, conn: psycopg.Connection, spec: TableSpec, connection_id: str, schema: str, *, durable: bool = True
    ):
        self.conn = conn
        # COPY picks a column's dumper by type, and for `bytea` psycopg's last registered one is the
        # DB-API `Binary` wrapper's, a Python method per value; this puts the C bytes dumper back.
        conn.adapters.register_dumper(bytes, BytesBinaryDumper)
        self.durable = durable
        self.spec = spec
        self.connection_id = connection_id
        self.failures: list[FailedRecord] = []
        target = table(spec.name, schema)
        self._stage = sql.Identifier(f"stage_{spec.name}")
        columns = sql.SQL(", ").join(map(sql.Identifier, spec.copy_columns))
        updatable = [c for c in spec.copy_columns if c not in ROW_KEY_COLUMNS]
        self._create_stage = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {target} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        ).format(stage=self._stage, target=target)
        self._copy_stage = sql.SQL("COPY {stage} ({columns}) FROM STDIN (FORMAT BINARY)").format(
            stage=self._stage, columns=columns
        )
        self._copy_target = sql.SQL("COPY {target} ({columns}) FROM STDIN (FORMAT BINARY)").format(
            target=target, columns=columns
        )
        # One primary-key probe per id. A plain `id = ANY(...)` on a table never analysed is planned
        # as a scan of every row of the connection, for each batch. `LIMIT 1` keeps the subquery from
        # being flattened into a join. The probe still needs statistics that know the connection
        # (see `_know_connection`): otherwise its rows look as few as one id's, and the planner may
        # probe through the other index on `connection_id`, reading all of them for every id.
        self._existing = sql.SQL(
            "SELECT k.id, t.raw_hash FROM unnest(%s::text[]) AS k(id) CROSS JOIN LATERAL"
            " (SELECT raw_hash FROM {target} WHERE connection_id = %s AND id = k.id LIMIT 1) AS t"
        ).format(target=target)
        self._merge = sql.SQL(
            """
            INSERT INTO {target} AS t ({columns}, synced_at)
            SELECT {columns}, now() FROM {stage}
            ON CONFLICT (connection_id, id) DO UPDATE SET {assignments}, synced_at = now()
            WHERE t.source_updated_at <= EXCLUDED.source_updated_at
              AND t.raw_hash IS DISTINCT FROM EXCLUDED.raw_hash
            RETURNING (xmax = 0) AS inserted
            """
        ).format(
            target=target,
            columns=columns,
            stage=self._stage,
            assignments=sql.SQL(", ").join(
                sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updatable
            ),
        )
        status = (
            sql.SQL(", status = {}").format(sql.Literal(spec.deleted_status)) if spec.deleted_status else sql.SQL("")
        )
        self._bury = sql.SQL(
            """
            UPDATE {target} AS t SET deleted = true, source_updated_at = s.version{status}, synced_at = now()
            FROM unnest(%s::text[], %s::timestamptz[]) AS s(id, version)
            WHERE t.connection_id = %s AND t.id = s.id AND t.source_updated_at <= s.version
              AND (NOT t.deleted OR t.source_updated_at < s.version)
            """
        ).format(target=target, status=status)
        self._analyze = sql.SQL("ANALYZE {target} (connection_id)").format(target=target)
        self._schema = schema or settings.db_schema()
        self._stage_ready = False
        # The last lookup found none of its batch stored: the next batch is tried as all new.
        self._all_new = False
        self._statistics_checked = False

    def _tuple(self, row: Row) -> tuple[Any, ...]:
        return (
            self.connection_id, row.id, *row.values,
            row.created_at, row.version, row.deleted, row.raw_jsonb, row.raw_hash,
        )  # fmt: skip

    def write(self, rows: Sequence[Row], *, may_be_stored: bool = False) -> BatchCounts:
        """Upsert `rows` (any order, duplicates allowed) and commit; returns the counts.

        `may_be_stored`: the rows are changes to objects (an events feed), so the batch is looked up
        by key even when the batches before it were all new.
        """
        counts = BatchCounts()
        unique = dedupe_latest(rows)
        counts.unchanged += len(rows) - len(unique)
        if not unique:
            return counts
        # Keys in one order in every session: concurrent inserts of the same ids queue, never cross.
        unique.sort(key=attrgetter("id"))
        try:
            counts.add(self._write_retrying(unique, may_be_stored))
        except RECORD_ERRORS as exc:
            self.conn.rollback()
            cleaned = [without_nul(row) for row in unique]
            if any(c is not r for c, r in zip(cleaned, unique, strict=True)):
                # Rows without NUL never come back here: a batch refused again is split as below.
                counts.add(self.write(cleaned, may_be_stored=may_be_stored))
            elif len(unique) == 1:
                self._record_failure(unique[0].id, exc)
                counts.failed += 1
            else:
                half = len(unique) // 2
                counts.add(self.write(unique[:half], may_be_stored=may_be_stored))
                counts.add(self.write(unique[half:], may_be_stored=may_be_stored))
        if not self._statistics_checked and counts.inserted:
            self._know_connection()
        return counts

    def _know_connection(self) -> None:
        """Once per writer, after its first committed batch: analyse the table's `connection_id` if
        the planner's statistics do not list this connection (a new connection, a table never
        analysed), so that the lookups of the batches that follow are planned as key probes.

        Autovacuum would get there too, but only after a backfill has written for a minute or more.
        A table busy with another ANALYZE or VACUUM is left to it rather than waited for.
        """
        self._statistics_checked = True
        known = self.conn.execute(
            "SELECT %s = ANY(most_common_vals::text::text[]) FROM pg_stats"
            " WHERE schemaname = %s AND tablename = %s AND attname = 'connection_id'",
            (self.connection_id, self._schema, self.spec.name),
        ).fetchone()
        if known is not None and known[0]:
            self.conn.commit()
            return
        try:
            self.conn.execute("SET LOCAL lock_timeout = '200ms'")
            self.conn.execute(self._analyze)
            self.conn.commit()
        except psycopg.errors.LockNotAvailable:
            self.conn.rollback()

    def _write_retrying(self, rows: list[Row], may_be_stored: bool) -> BatchCounts:
        """`_write_unique`, again from the start while the database rolls the batch back."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._write_unique(rows, may_be_stored)
            except ROLLED_BACK as exc:
                self.conn.rollback()
                self._all_new = False
                if attempt > ROLLBACK_RETRIES:
                    raise
                reason = str(exc).splitlines()[0][:200]
                log.warning("%s: batch of %d rolled back by the database (%s); writing it again (attempt %d)",
                            self.spec.name, len(rows), reason, attempt + 1)  # fmt: skip
                time.sleep(random.uniform(0, 0.05 * attempt))

    def _write_unique(self, rows: list[Row], may_be_stored: bool) -> BatchCounts:
        if self._all_new and not may_be_stored and not any(r.tombstone for r in rows):
            try:
                return self._insert_all(rows)
            except psycopg.errors.UniqueViolation:
                self.conn.rollback()
                self._all_new = False
                log.debug("%s: a batch copied as all new met a stored id; writing it again with a lookup",
                          self.spec.name)  # fmt: skip
        try:
            return self._write_once(rows, direct_inserts=True, may_be_stored=may_be_stored)
        except psycopg.errors.UniqueViolation:
            self.conn.rollback()
            return self._write_once(rows, direct_inserts=False, may_be_stored=may_be_stored)

    def _insert_all(self, rows: list[Row]) -> BatchCounts:
        """COPY every row straight into the table; the unique key refuses the batch if one is stored."""
        with self.conn.cursor() as cur:
            if not self.durable:
                cur.execute("SET LOCAL synchronous_commit = off")
            self._copy(cur, self._copy_target, rows)
        self.conn.commit()
        return BatchCounts(inserted=len(rows))

    def _bury_rows(self, cur: psycopg.Cursor, ids: list[str], versions: list[datetime]) -> int:
        cur.execute(self._bury, (ids, versions, self.connection_id))
        return cur.rowcount

    def bury(self, ids: list[str], version: datetime) -> int:
        """Flag stored rows deleted upstream as of `version` (never-regress guarded) and commit."""
        with self.conn.cursor() as cur:
            done = self._bury_rows(cur, ids, [version] * len(ids))
        self.conn.commit()
        return done

    def _record_failure(self, record_id: str, exc: Exception) -> None:
        message = str(exc).splitlines()[0][:300]
        log.warning("%s: record %s refused by the database: %s", self.spec.name, record_id, message)
        self.failures.append(FailedRecord(record_id, message))

    def _copy(self, cur: psycopg.Cursor, statement: sql.Composed, rows: list[Row]) -> None:
        with cur.copy(statement) as copy:
            copy.set_types(self.spec.copy_types)
            for row in rows:
                copy.write_row(self._tuple(row))

    def _write_once(self, rows: list[Row], *, direct_inserts: bool, may_be_stored: bool) -> BatchCounts:
        counts = BatchCounts()
        with self.conn.cursor() as cur:
            if not self.durable:
                cur.execute("SET LOCAL synchronous_commit = off")
            if not self._stage_ready:
                cur.execute(self._create_stage)
            stored = dict(cur.execute(self._existing, ([r.id for r in rows], self.connection_id)).fetchall())
            if not may_be_stored:  # changes say nothing of whether the next listing's batch is new
                self._all_new = not stored
            buried = [r for r in rows if r.tombstone and r.id in stored]
            if buried:
                rows = [r for r in rows if not (r.tombstone and r.id in stored)]
                done = self._bury_rows(cur, [r.id for r in buried], [r.version for r in buried])
                counts.updated += done
                counts.unchanged += len(buried) - done
            new = [r for r in rows if r.id not in stored] if direct_inserts else []
            staged = [r for r in rows if stored.get(r.id) != r.raw_hash and (r.id in stored or not direct_inserts)]
            counts.unchanged += len(rows) - len(new) - len(staged)
            if new:
                self._copy(cur, self._copy_target, new)
                counts.inserted += len(new)
            if staged:
                self._copy(cur, self._copy_stage, staged)
                inserted_flags = cur.execute(self._merge).fetchall()
                inserted = sum(1 for (flag,) in inserted_flags if flag)
                counts.inserted += inserted
                counts.updated += len(inserted_flags) - inserted
                counts.unchanged += len(staged) - len(inserted_flags)
        self.conn.commit()
        self._stage_ready = True
        return counts
