"""The invariants of docs/architecture.md, proved on the Stripe slice: real Postgres, sandbox over HTTP."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
import stripe
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed
from nextcrm_pipelines.core.runner import day_window, sync_partitions, sync_workers
from nextcrm_pipelines.core.sync import ABANDONED
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.helpers import (
    charges_by_id,
    days_back,
    expected_charges,
    mirror_rows,
    sandbox_now,
    sync_days,
    wait_until_blocked,
)
from nextcrm_sandbox.server import SandboxServer


def sdk(sandbox: SandboxServer, api_key: str) -> stripe.StripeClient:
    return stripe.StripeClient(api_key, base_addresses={"api": sandbox.url}, max_network_retries=0)


def test_backfill_mirrors_every_charge_exactly(database_url, schema, sandbox, stripe_account, stripe_connection):
    key = stripe_account(charges=400, days=10)
    connection = stripe_connection(key)
    days = days_back(sandbox_now(sandbox).date(), 10)
    results = sync_days(database_url, schema, connection.id, "stripe_payments", days)
    assert all(r.status == "success" for r in results)
    assert charges_by_id(database_url, schema) == expected_charges(sandbox, key)


def test_rerunning_a_partition_changes_nothing(database_url, schema, sandbox, stripe_account, stripe_connection):
    key = stripe_account(charges=300, subscriptions=80, days=5)
    connection = stripe_connection(key)
    days = days_back(sandbox_now(sandbox).date(), 5)
    for entity in ("stripe_payments", "stripe_subscriptions"):
        sync_days(database_url, schema, connection.id, entity, days)
    before = {e: mirror_rows(database_url, schema, e) for e in ("stripe_payments", "stripe_subscriptions")}
    again = sync_days(database_url, schema, connection.id, "stripe_payments", days)
    again += sync_days(database_url, schema, connection.id, "stripe_subscriptions", days)
    after = {e: mirror_rows(database_url, schema, e) for e in ("stripe_payments", "stripe_subscriptions")}
    assert after == before  # every column, synced_at included
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0
    assert sum(r.counts.unchanged for r in again) == sum(r.total for r in again) > 0


def test_old_partition_backfill_does_not_overwrite_newer_row(database_url, schema, own_stripe):
    own, key, connection = own_stripe(seed=5, charges=200, subscriptions=10, days=5)
    now = sandbox_now(own)
    old_day = (now - timedelta(days=3)).date()
    charge = next(c for c in own.stripe_export(key, "charges")
                  if c["status"] == "succeeded" and not c["refunded"]
                  and datetime.fromtimestamp(c["created"], UTC).date() == old_day)  # fmt: skip
    sdk(own, key).v1.refunds.create({"charge": charge["id"]})
    # The newer state arrives first (today's events), then the old day is backfilled: its
    # `charge.succeeded` event carries the pre-refund state and must not win.
    sync_days(database_url, schema, connection.id, "stripe_payments", [now.date()])
    sync_days(database_url, schema, connection.id, "stripe_payments", [old_day])
    row = charges_by_id(database_url, schema)[charge["id"]]
    assert row[4] is True and row[1] == row[0]  # refunded in full, as in the sandbox


def test_engine_never_replaces_a_row_with_an_older_version(database_url, schema, stripe_connection):

    from nextcrm_pipelines.core.http import RequestStats
    from nextcrm_pipelines.core.sync import SyncWindow, sync_entity
    from nextcrm_pipelines.providers.stripe import PAYMENTS

    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    base = {"id": "ch_x", "object": "charge", "amount": 500, "currency": "usd", "status": "succeeded",
            "created": int(t0.timestamp()), "refunded": False, "amount_refunded": 0}  # fmt: skip

    def write(raw, version):
        with psycopg.connect(database_url) as conn:
            return sync_entity(conn=conn, schema=schema, provider="stripe", entity=PAYMENTS,
                           connection_id=connection.id, window=SyncWindow(t0, t0 + timedelta(days=1)),
                           pages=[[(raw, version)]], stats=RequestStats())  # fmt: skip

    write({**base, "refunded": True, "amount_refunded": 500}, t0 + timedelta(hours=5))
    stale = write(base, t0 + timedelta(hours=1))
    assert stale.counts.unchanged == 1 and stale.counts.updated == 0
    assert charges_by_id(database_url, schema)["ch_x"][1] == Decimal("5.00")
    newer = write({**base, "refunded": True, "amount_refunded": 200}, t0 + timedelta(hours=6))
    assert newer.counts.updated == 1
    assert charges_by_id(database_url, schema)["ch_x"][1] == Decimal("2.00")


def test_a_batch_copied_as_all_new_that_meets_a_stored_id_is_redone_exactly(database_url, schema, stripe_connection):
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def charge(n: int, **extra) -> dict:
        return {"id": f"ch_{n}", "object": "charge", "amount": 100 + n, "currency": "usd", "status": "succeeded",
                "created": int(t0.timestamp()), "refunded": False, "amount_refunded": 0, **extra}  # fmt: skip

    with psycopg.connect(database_url) as conn:
        writer = UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema, durable=False)
        first = writer.write([charge_row(charge(n), t0) for n in range(5)])  # none stored: the next goes straight in
        with psycopg.connect(database_url) as other:  # meanwhile another writer (a webhook, say) stores ch_7
            UpsertWriter(other, PAYMENTS_TABLE, connection.id, schema).write([charge_row(charge(7), t0)])
        later = t0 + timedelta(hours=1)
        second = writer.write(
            [charge_row(charge(n), later) for n in (5, 6)]
            + [charge_row(charge(7, refunded=True, amount_refunded=107), later)]
        )
        third = writer.write([charge_row(charge(n), later) for n in (8, 9)])
    assert (first.inserted, second.inserted, second.updated, third.inserted) == (5, 2, 1, 2)
    mirrored = charges_by_id(database_url, schema)
    assert sorted(mirrored) == sorted(f"ch_{n}" for n in range(10))
    assert mirrored["ch_7"] == (Decimal("1.07"), Decimal("1.07"), "usd", "succeeded", True)


def _copied_as_new_then_redone(caplog) -> int:
    return sum("copied as all new met a stored id" in r.getMessage() for r in caplog.records)


def test_changes_are_looked_up_while_a_listing_copies_straight_in(database_url, schema, stripe_connection, caplog):
    """A batch from an events feed goes by lookup even after all-new batches, instead of being
    copied, refused by the unique key and copied again."""
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    caplog.set_level(logging.DEBUG, logger="nextcrm_pipelines.core.upsert")
    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    later = t0 + timedelta(hours=1)
    refunded = [charge_row(_charge(n, t0, refunded=True, amount_refunded=100 + n), later) for n in (3, 4)]
    with psycopg.connect(database_url) as conn:
        writer = UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema)
        listed = writer.write([charge_row(_charge(n, t0), t0) for n in range(5)])
        changed = writer.write([*refunded, charge_row(_charge(9, t0), later)], may_be_stored=True)
        again = writer.write([charge_row(_charge(n, t0), t0) for n in range(10, 15)])
        assert _copied_as_new_then_redone(caplog) == 0
        # Unmarked, the same changes are first copied as new and refused by the key.
        plain = UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema)
        plain.write([charge_row(_charge(n, t0), t0) for n in range(20, 25)])
        plain.write([charge_row(_charge(n, t0, refunded=True, amount_refunded=100 + n), later) for n in (20, 26)])
        assert _copied_as_new_then_redone(caplog) == 1
    assert (listed.inserted, changed.updated, changed.inserted, again.inserted) == (5, 2, 1, 5)
    mirrored = charges_by_id(database_url, schema)
    assert mirrored["ch_00003"][4] and mirrored["ch_00004"][4] and not mirrored["ch_00002"][4]


def test_a_backfill_writes_the_events_feed_apart_from_the_listings(database_url, schema, own_stripe, caplog):
    """Recent days also read the events feed, whose refunds name charges stored days before."""
    caplog.set_level(logging.DEBUG, logger="nextcrm_pipelines.core.upsert")
    server, key, connection = own_stripe(seed=5, charges=1500, subscriptions=5, days=6)
    client = sdk(server, key)
    oldest = sorted(server.stripe_export(key, "charges"), key=lambda c: c["created"])[:40]
    for charge in oldest:  # refunded today: today's events name charges of the first day
        if charge["status"] == "succeeded" and not charge["refunded"]:
            client.v1.refunds.create({"charge": charge["id"]})
    days = days_back(sandbox_now(server).date(), 6)
    results = backfill(database_url, schema, connection.id, days, workers=1, batch_size=100)
    assert all(r.status == "success" for r in results)
    assert charges_by_id(database_url, schema) == expected_charges(server, key)
    assert _copied_as_new_then_redone(caplog) == 0


def _charge(n: int, created: datetime, **extra) -> dict:
    return {"id": f"ch_{n:05d}", "object": "charge", "amount": 100 + n, "currency": "usd", "status": "succeeded",
            "created": int(created.timestamp()), "refunded": False, "amount_refunded": 0, **extra}  # fmt: skip


def _write_in_thread(writer, rows, barrier: threading.Barrier | None = None) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            if barrier is not None:
                barrier.wait(timeout=30)
            outcome["counts"] = writer.write(rows)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _rollback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rolled back by the database" in r.getMessage()]


def test_writers_inserting_the_same_ids_in_opposite_orders_queue_rather_than_deadlock(
    database_url, schema, stripe_connection, caplog
):
    """Two sessions copying the same new ids (two backfill processes meeting on a day the events feed
    shares) take them in one order, so one waits for the other instead of both being stuck."""
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    later = t0 + timedelta(hours=1)
    count, rounds = 4000, 3  # each round new ids; one round meeting in the middle is enough to deadlock
    outcomes = []
    with psycopg.connect(database_url) as one, psycopg.connect(database_url) as two:
        writers = [UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema) for conn in (one, two)]
        for first in range(0, count * rounds, count):
            ids = range(first, first + count)
            ascending = [charge_row(_charge(n, t0), t0) for n in ids]
            descending = [charge_row(_charge(n, t0, refunded=True, amount_refunded=100 + n), later) for n in ids]
            descending.reverse()
            together = threading.Barrier(2)
            started = [
                _write_in_thread(w, rows, together) for w, rows in zip(writers, (ascending, descending), strict=True)
            ]
            for thread, outcome in started:
                thread.join(timeout=60)
                outcomes.append(outcome)
    assert [o.get("error") for o in outcomes] == [None] * 2 * rounds
    assert _rollback_warnings(caplog) == []
    assert sum(o["counts"].inserted for o in outcomes) == count * rounds
    mirrored = charges_by_id(database_url, schema)
    assert len(mirrored) == count * rounds
    # Whichever wrote first, the newer version is what stays.
    assert all(refunded for *_, refunded in mirrored.values())


def test_a_batch_the_database_rolls_back_is_written_again(database_url, schema, stripe_connection, caplog):
    """A deadlock the ordering cannot prevent (here with a session inserting in the other order by
    hand) rolls one batch back; the writer writes it again and nothing is lost."""
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    later = t0 + timedelta(hours=1)
    insert = sql.SQL(
        "INSERT INTO {} (connection_id, id, amount, amount_refunded, currency, status, refunded,"
        " source_updated_at, raw, raw_hash) VALUES (%s, %s, 1, 0, 'usd', 'succeeded', false, %s, '{{}}', '')"
    ).format(table("stripe_payments", schema))
    with psycopg.connect(database_url) as conn, psycopg.connect(database_url) as other:
        # The writer's session finds the deadlock first and is the one rolled back.
        conn.execute("SET deadlock_timeout = '1s'")
        conn.commit()
        other.execute("SET deadlock_timeout = '60s'")
        other.execute(insert, (connection.id, "ch_00002", t0))  # uncommitted
        writer = UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema)
        rows = [charge_row(_charge(n, t0, refunded=True, amount_refunded=100 + n), later) for n in (1, 2)]
        thread, outcome = _write_in_thread(writer, rows)
        wait_until_blocked(database_url, conn, "the writer")  # stored ch_00001, waits for ch_00002
        other.execute(insert, (connection.id, "ch_00001", t0))  # closes the cycle; returns once the writer yields
        other.commit()
        thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert (outcome["counts"].inserted, outcome["counts"].updated) == (0, 2)
    assert len(_rollback_warnings(caplog)) == 1 and "deadlock" in _rollback_warnings(caplog)[0]
    assert charges_by_id(database_url, schema) == {
        "ch_00001": (Decimal("1.01"), Decimal("1.01"), "usd", "succeeded", True),
        "ch_00002": (Decimal("1.02"), Decimal("1.02"), "usd", "succeeded", True),
    }


@pytest.mark.parametrize("others_first", [False, True], ids=["table-never-analysed", "new-connection"])
def test_a_backfill_looks_ids_up_by_key_probes_not_by_reading_the_connection(
    database_url, schema, stripe_connection, others_first
):
    """A backfill outgrows the table's statistics at once; its lookups must still probe the primary key
    rather than read every row of the connection for each batch (through either index on it)."""
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def batch(prefix: str, number: int) -> list:
        return [charge_row({"id": f"ch_{prefix}{number}_{n}", "object": "charge", "amount": n, "currency": "usd",
                            "status": "succeeded", "created": int(t0.timestamp()) + n, "amount_refunded": 0}, t0)
                for n in range(1000)]  # fmt: skip

    payments = table("stripe_payments", schema)
    with psycopg.connect(database_url) as conn:
        # Only what the writer does may change the statistics: no autovacuum ANALYZE in between.
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(payments))
        conn.commit()
        if others_first:  # another connection's rows, analysed before this one's first backfill
            other = UpsertWriter(conn, PAYMENTS_TABLE, stripe_connection("sk_test_other", name="Other").id, schema)
            for number in range(5):
                other.write(batch("o", number))
            conn.execute(sql.SQL("ANALYZE {}").format(payments))
            conn.commit()
        connection = stripe_connection("sk_test_unused")
        writer = UpsertWriter(conn, PAYMENTS_TABLE, connection.id, schema, durable=False)
        for number in range(5):
            assert writer.write(batch("n", number)).inserted == 1000
        probe = [f"ch_n{number}_{n}" for number in range(5) for n in range(0, 1000, 5)]
        plan = "\n".join(
            line for (line,) in conn.execute(sql.SQL("EXPLAIN ") + writer._existing, (probe, connection.id))
        )
        again = writer.write(batch("n", 2))
    assert "stripe_payments_pkey" in plan, plan
    assert "by_created" not in plan and "Seq Scan on stripe_payments" not in plan, plan
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 1000)


def kill_when(child: subprocess.Popen, ready, timeout: float = 60) -> None:
    """SIGKILL `child` as soon as `ready()` holds; fail if it ends first (the sync was too quick to kill)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not ready():
            assert child.poll() is None, "the sync finished before it could be killed; slow it down"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)


def test_sync_killed_midway_and_rerun_ends_with_exactly_the_sandbox_data(
    database_url, schema, sandbox, stripe_account, stripe_connection, secret_key
):
    key = stripe_account(charges=3000, subscriptions=5, days=1)
    connection = stripe_connection(key)
    today = sandbox_now(sandbox).date()
    days = days_back(today, 1)
    sandbox.set_stripe_faults(api_key=key, latency_ms=40)
    script = textwrap.dedent(
        f"""
        from datetime import date
        from nextcrm_pipelines_tests.helpers import sync_days
        days = [date.fromisoformat(d) for d in {[d.isoformat() for d in days]!r}]
        sync_days({database_url!r}, {schema!r}, {connection.id!r}, "stripe_payments", days, batch_size=200)
        """
    )
    env = {**os.environ, "NEXTCRM_SECRET_KEY": secret_key, "NEXTCRM_DB_SCHEMA": schema}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    kill_when(child, lambda: len(mirror_rows(database_url, schema, "stripe_payments", "id")) >= 400)
    partial = len(mirror_rows(database_url, schema, "stripe_payments", "id"))
    expected = expected_charges(sandbox, key)
    assert 0 < partial < len(expected)
    left = logs_by_id(database_url, schema)
    stranded = [log_id for log_id, (status, _) in left.items() if status == "running"]
    assert len(stranded) == 1  # as the killed run left it
    sandbox.clear_stripe_faults(api_key=key)
    sync_days(database_url, schema, connection.id, "stripe_payments", days)
    mirrored = mirror_rows(database_url, schema, "stripe_payments", "id")
    assert len(mirrored) == len({r[0] for r in mirrored})  # no duplicates
    assert charges_by_id(database_url, schema) == expected  # no gaps, same amounts
    # The re-run holds the connection's lock, so the log the killed run left `running` is closed as failed.
    logs = logs_by_id(database_url, schema)
    assert logs[stranded[0]] == ("failed", ABANDONED)
    assert [status for status, _ in logs.values()].count("running") == 0


def logs_by_id(database_url: str, schema: str) -> dict[int, tuple]:
    """(status, error) of each sync log row by id."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(sql.SQL("SELECT id, status, error FROM {}").format(
            table("integration_sync_logs", schema))).fetchall()  # fmt: skip
    return {row[0]: row[1:] for row in rows}


def backfill(database_url: str, schema: str, connection_id: str, days: list, **kwargs) -> list:
    """One call for all the days, as a Dagster backfill run makes it."""
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider("stripe"),
                           entity_name="stripe_payments", connection_id=connection_id,
                           windows=[day_window(d) for d in days], **kwargs)  # fmt: skip


def sync_logs(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT window_start, status, inserted_records FROM {} ORDER BY window_start").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()


def test_backfill_windows_split_between_processes_land_exactly_once_each(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=900, subscriptions=5, days=8)
    connection = stripe_connection(key)
    days = days_back(sandbox_now(sandbox).date(), 8)
    assert sync_workers(get_provider("stripe"), len(days), 2) == 2
    assert sync_workers(get_provider("xero"), len(days), 2) == 1  # a rotating refresh token: one process
    results = backfill(database_url, schema, connection.id, days, workers=2)
    assert [r.window for r in results] == [day_window(d) for d in days]  # in the order asked
    assert all(r.status == "success" for r in results)
    assert charges_by_id(database_url, schema) == expected_charges(sandbox, key)
    created = {}
    for charge in sandbox.stripe_export(key, "charges"):
        day = datetime.fromtimestamp(charge["created"], UTC).date()
        created[day] = created.get(day, 0) + 1
    assert [r.rows_in_window for r in results] == [created.get(d, 0) for d in days]
    logs = sync_logs(database_url, schema)
    assert [(start.date(), status) for start, status, _ in logs] == [(d, "success") for d in days]
    assert sum(inserted for *_, inserted in logs) == len(expected_charges(sandbox, key))
    again = backfill(database_url, schema, connection.id, days, workers=2)
    assert sum(r.synced for r in again) == 0 and charges_by_id(database_url, schema) == expected_charges(sandbox, key)


def _claim_all(claims, number: int, out) -> None:
    """In a spawned process: claim windows until none is left, at a pace of its own."""
    claim, taken = claims.claimer(number), []
    while (index := claim()) is not None:
        taken.append(index)
        time.sleep(0.001 * (number + 1))
    out.put((number, taken))


def test_processes_sharing_a_backfill_claim_every_window_exactly_once():
    from nextcrm_pipelines.core.runner import WindowClaims

    context = multiprocessing.get_context("spawn")
    claims = WindowClaims(90, 3, context)
    claims.answered()  # the provider answered process 0: the helpers may start
    out = context.Queue()
    processes = [context.Process(target=_claim_all, args=(claims, k, out)) for k in range(3)]
    for process in processes:
        process.start()
    taken = dict(out.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=10)
    assert sorted(i for indexes in taken.values() for i in indexes) == list(range(90))
    for number, indexes in taken.items():
        own = [i for i in indexes if number * 30 <= i < (number + 1) * 30]
        assert own == list(range(number * 30, number * 30 + len(own)))  # its own run, front to back
        assert indexes[: len(own)] == own  # before it helps anyone


def test_a_process_whose_run_is_done_takes_the_longest_run_left_from_the_back():
    from nextcrm_pipelines.core.runner import WindowClaims

    claims = WindowClaims(11, 3, multiprocessing.get_context("spawn"))  # runs 0-2, 3-6, 7-10
    first, second, third = (claims.claimer(k) for k in range(3))
    claims.answered()  # the provider answered process 0: the helpers may start
    assert [first() for _ in range(3)] == [0, 1, 2]
    assert third() == 7
    # Run 1 (3-6) is the longest left: taken from its far end, away from where its owner writes.
    assert [first() for _ in range(4)] == [6, 5, 4, 3]
    assert [second() for _ in range(2)] == [10, 9]  # its own run is gone: it helps with run 2
    assert [third(), third(), first(), second()] == [8, None, None, None]


def _spawned_children(pid: int) -> list[int]:
    """Processes started by `pid` through multiprocessing's spawn (its sync helpers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                spawned = b"spawn_main" in cmdline.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and spawned:
            found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_backfill_killed_midway_stops_in_every_process_and_rerun_ends_exact(
    database_url, schema, sandbox, stripe_account, stripe_connection, secret_key
):
    key = stripe_account(charges=3000, subscriptions=5, days=6)
    connection = stripe_connection(key)
    days = days_back(sandbox_now(sandbox).date(), 6)
    sandbox.set_stripe_faults(api_key=key, latency_ms=200)  # every process is mid-way when the kill comes
    script = textwrap.dedent(
        f"""
        from datetime import date
        from nextcrm_pipelines_tests.test_stripe_sync import backfill
        days = [date.fromisoformat(d) for d in {[d.isoformat() for d in days]!r}]
        backfill({database_url!r}, {schema!r}, {connection.id!r}, days, workers=2, batch_size=100)
        """
    )
    env = {**os.environ, "NEXTCRM_SECRET_KEY": secret_key, "NEXTCRM_DB_SCHEMA": schema}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    helpers: list[int] = []

    def midway() -> bool:
        helpers[:] = helpers or _spawned_children(child.pid)
        return bool(helpers) and len(mirror_rows(database_url, schema, "stripe_payments", "id")) >= 200

    kill_when(child, midway)
    assert helpers, "the backfill never started a helper process"
    # A helper left running would go on for seconds (its windows at 200 ms a request); one that
    # watches its parent exits at once.
    deadline = time.monotonic() + 2
    while any(_running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in helpers), "a helper outlived the killed sync"
    partial = len(mirror_rows(database_url, schema, "stripe_payments", "id"))
    time.sleep(1.0)
    assert len(mirror_rows(database_url, schema, "stripe_payments", "id")) == partial  # nobody writes on
    expected = expected_charges(sandbox, key)
    assert 0 < partial < len(expected)
    sandbox.clear_stripe_faults(api_key=key)
    backfill(database_url, schema, connection.id, days, workers=2)
    mirrored = mirror_rows(database_url, schema, "stripe_payments", "id")
    assert len(mirrored) == len({r[0] for r in mirrored})
    assert charges_by_id(database_url, schema) == expected


def test_refund_made_after_first_sync_shows_after_next_days_sync(database_url, schema, own_stripe):
    own, key, connection = own_stripe(seed=9, charges=200, subscriptions=10, days=3)
    sync_days(database_url, schema, connection.id, "stripe_payments", days_back(sandbox_now(own).date(), 3))
    charge = next(c for c in own.stripe_export(key, "charges") if c["status"] == "succeeded" and not c["refunded"])
    assert charges_by_id(database_url, schema)[charge["id"]][4] is False
    own.advance_clock(86400)
    sdk(own, key).v1.refunds.create({"charge": charge["id"], "amount": 100})
    sync_days(database_url, schema, connection.id, "stripe_payments", [sandbox_now(own).date()])
    row = charges_by_id(database_url, schema)[charge["id"]]
    assert row[1] == expected_charges(own, key)[charge["id"]][1] > 0
    assert charges_by_id(database_url, schema) == expected_charges(own, key)


def test_jpy_and_usd_amounts_are_exact(database_url, schema, sandbox, stripe_account, stripe_connection):
    key = stripe_account(charges=500, days=5)
    connection = stripe_connection(key)
    sync_days(database_url, schema, connection.id, "stripe_payments", days_back(sandbox_now(sandbox).date(), 5))
    truth = {c["id"]: c for c in sandbox.stripe_export(key, "charges")}
    rows = mirror_rows(database_url, schema, "stripe_payments", "id, amount, currency, pg_typeof(amount)::text, "
                       "jsonb_typeof(raw), (raw->>'amount')::bigint")  # fmt: skip
    currencies = {r[2] for r in rows}
    assert {"jpy", "usd"} <= currencies
    for record_id, amount, currency, pg_type, raw_type, raw_amount in rows:
        assert pg_type == "numeric" and raw_type == "object"
        minor = truth[record_id]["amount"]
        assert raw_amount == minor
        if currency == "jpy":
            assert amount == Decimal(minor) and amount == amount.to_integral_value()
        elif currency == "usd":
            assert amount * 100 == Decimal(minor)


def test_subscriptions_include_canceled_and_a_cancellation_becomes_visible(database_url, schema, own_stripe):
    own, key, connection = own_stripe(seed=3, charges=20, subscriptions=150, days=4)
    days = days_back(sandbox_now(own).date(), 4)
    sync_days(database_url, schema, connection.id, "stripe_subscriptions", days)
    truth = own.stripe_export(key, "subscriptions")
    rows = {r[0]: r[1:] for r in mirror_rows(database_url, schema, "stripe_subscriptions", "id, status, deleted")}
    assert set(rows) == {s["id"] for s in truth}
    assert any(s["status"] == "canceled" for s in truth)
    for s in truth:
        assert rows[s["id"]] == (s["status"], s["status"] in ("canceled", "incomplete_expired"))
    active = next(s for s in truth if s["status"] == "active")
    sdk(own, key).v1.subscriptions.cancel(active["id"])
    sync_days(database_url, schema, connection.id, "stripe_subscriptions", [sandbox_now(own).date()])
    rows = {r[0]: r[1:] for r in mirror_rows(database_url, schema, "stripe_subscriptions", "id, status, deleted")}
    assert rows[active["id"]] == ("canceled", True)


def test_429_bursts_and_5xx_are_survived(database_url, schema, sandbox, stripe_account, stripe_connection):
    key = stripe_account(charges=300, days=2)
    connection = stripe_connection(key)
    sandbox.set_stripe_faults(api_key=key, rate_limit_burst=6, server_errors=3)
    results = sync_days(database_url, schema, connection.id, "stripe_payments",
                        days_back(sandbox_now(sandbox).date(), 2))  # fmt: skip
    assert charges_by_id(database_url, schema) == expected_charges(sandbox, key)
    assert sum(r.stats.rate_limit_waits for r in results) >= 6
    assert sum(r.stats.retries for r in results) >= 9
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL("SELECT sum(retries), sum(rate_limit_waits) FROM {}").format(table("integration_sync_logs", schema))
        ).fetchone()
    assert logged[0] >= 9 and logged[1] >= 6


def test_wrong_api_key_fails_with_a_clear_message_and_marks_the_connection(
    database_url, schema, sandbox, stripe_connection
):
    connection = stripe_connection("sk_test_this_key_is_wrong_12345")
    with pytest.raises(AuthenticationFailed) as failure:
        sync_days(database_url, schema, connection.id, "stripe_payments", days_back(sandbox_now(sandbox).date(), 0))
    message = str(failure.value)
    assert "stripe connection 'stripe-acme'" in message and "HTTP 401" in message
    # One hint, the one that fixes this connection (a second `connections add` would make another connection).
    assert message.endswith("; store working credentials with `nextcrm-pipelines connections set-secret stripe-acme`")
    assert message.count("nextcrm-pipelines") == 1
    assert "sk_test_this_key_is_wrong_12345" not in message and "2345" not in message
    with psycopg.connect(database_url) as conn:
        status, error = conn.execute(
            sql.SQL("SELECT status, last_error FROM {} WHERE id = %s").format(table("integration_connections", schema)),
            (connection.id,),
        ).fetchone()
    assert status == "needs_reauth" and error == message  # the cause and its one fix


def test_a_wrong_key_met_by_a_helper_process_fails_the_same_way(database_url, schema, sandbox, stripe_connection):
    connection = stripe_connection("sk_test_this_key_is_wrong_12345")
    days = days_back(sandbox_now(sandbox).date(), 6)
    with pytest.raises(AuthenticationFailed) as failure:
        backfill(database_url, schema, connection.id, days, workers=2)
    message = str(failure.value)
    assert "stripe connection 'stripe-acme'" in message and "HTTP 401" in message
    assert "sk_test_this_key_is_wrong_12345" not in message and "2345" not in message
    with psycopg.connect(database_url) as conn:
        status = conn.execute(
            sql.SQL("SELECT status FROM {} WHERE id = %s").format(table("integration_connections", schema)),
            (connection.id,),
        ).fetchone()[0]
    assert status == "needs_reauth"


def test_malformed_record_is_logged_with_its_id_and_the_rest_lands(database_url, schema, stripe_connection, caplog):

    from nextcrm_pipelines.core.http import RequestStats
    from nextcrm_pipelines.core.sync import SyncWindow, sync_entity
    from nextcrm_pipelines.providers.stripe import PAYMENTS

    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    good = [{"id": f"ch_{i}", "object": "charge", "amount": 100 + i, "currency": "eur", "status": "succeeded",
             "created": int(t0.timestamp()) + i} for i in range(50)]  # fmt: skip
    bad = [{**good[0], "id": "ch_bad_amount", "amount": "12.5"}, {**good[0], "id": "ch_no_currency", "currency": None},
           {**good[0], "id": "ch_no_status", "status": None}]  # fmt: skip
    with psycopg.connect(database_url) as conn:
        result = sync_entity(conn=conn, schema=schema, provider="stripe", entity=PAYMENTS,
                         connection_id=connection.id, window=SyncWindow(t0, t0 + timedelta(days=1)),
                         pages=[[(r, t0) for r in good[:25] + bad[:1]],
                                [(r, t0) for r in good[25:] + bad[1:]]],
                         stats=RequestStats())  # fmt: skip
    assert result.status == "partial" and result.counts.failed == 3 and result.counts.inserted == 50
    assert {f.id for f in result.failures} == {"ch_bad_amount", "ch_no_currency", "ch_no_status"}
    assert "ch_bad_amount" in caplog.text and "ch_no_currency" in caplog.text and "ch_no_status" in caplog.text
    assert len(mirror_rows(database_url, schema, "stripe_payments", "id")) == 50
    with psycopg.connect(database_url) as conn:
        status, failed, error = conn.execute(
            sql.SQL("SELECT status, failed_records, error FROM {}").format(table("integration_sync_logs", schema))
        ).fetchone()
    assert status == "partial" and failed == 3 and "ch_bad_amount" in error


def test_syncs_collect_less_often_while_they_run_and_restore_the_collector_after():
    import gc
    import threading

    from nextcrm_pipelines.core.sync import SYNC_GC_YOUNG_THRESHOLD, fewer_gc_passes

    own = gc.get_threshold()
    inside: list[tuple[int, int, int]] = []
    entered, release = threading.Event(), threading.Event()

    def other_sync() -> None:
        with fewer_gc_passes():
            inside.append(gc.get_threshold())
            entered.set()
            release.wait(5)

    with fewer_gc_passes():
        assert gc.get_threshold()[0] >= SYNC_GC_YOUNG_THRESHOLD and gc.get_freeze_count() > 0
        concurrent = threading.Thread(target=other_sync)
        concurrent.start()
        assert entered.wait(5)
    # The first sync ended while the other still runs: the setting stays until the last one ends.
    assert gc.get_threshold()[0] >= SYNC_GC_YOUNG_THRESHOLD
    release.set()
    concurrent.join()
    assert inside and inside[0][0] >= SYNC_GC_YOUNG_THRESHOLD
    assert gc.get_threshold() == own and gc.get_freeze_count() == 0
