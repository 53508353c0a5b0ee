"""Every entity row belongs to a connection that exists: the per-statement checks that stand in for
a foreign key (migration 0008; found by their trigger since 0011) refuse what the key refused, and
lock what it locked, in every entity table the metadata defines."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import psycopg
import psycopg.errors
import pytest
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.tables import is_entity, project_metadata
from nextcrm_pipelines_tests.helpers import wait_until_blocked

ENTITY_TABLES = [t.name for t in project_metadata().sorted_tables if is_entity(t)]

# A value of each type the entity tables' required columns use.
_FILLER = {
    "text": "x", "numeric": 0, "boolean": False, "integer": 0, "bigint": 0, "date": datetime(2026, 1, 1).date(),
    "timestamp with time zone": datetime(2026, 1, 1, tzinfo=UTC), "jsonb": psycopg.types.json.Jsonb({}), "bytea": b"",
    "ARRAY": [],
}  # fmt: skip


def _insert(conn: psycopg.Connection, schema: str, name: str, connection_id: str, row_id: str) -> None:
    """Insert a row with every required column filled (the rest left to defaults or NULL)."""
    required = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
        " AND is_nullable = 'NO' AND column_default IS NULL AND column_name NOT IN ('connection_id', 'id')"
        " ORDER BY ordinal_position",
        (schema, name),
    ).fetchall()
    columns = ["connection_id", "id", *(c for c, _ in required)]
    conn.execute(
        sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table(name, schema),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        ),
        [connection_id, row_id, *(_FILLER[t] for _, t in required)],
    )


def _count(conn: psycopg.Connection, schema: str, name: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table(name, schema))).fetchone()[0]


def _connection(conn: psycopg.Connection, schema: str, connection_id: str) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} (id, provider, display_name) VALUES (%s, 'stripe', %s)").format(
            table("integration_connections", schema)
        ),
        (connection_id, connection_id),
    )


@pytest.mark.parametrize("name", ENTITY_TABLES)
def test_entity_rows_must_name_a_connection_that_exists(database_url, schema, name):
    with psycopg.connect(database_url) as conn:
        _connection(conn, schema, "known")
        conn.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match='connection "unknown", which does not exist'):
            _insert(conn, schema, name, "unknown", "r1")
        conn.rollback()
        assert _count(conn, schema, name) == 0
        _insert(conn, schema, name, "known", "r1")
        conn.commit()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match='connection "unknown", which does not exist'):
            conn.execute(
                sql.SQL("UPDATE {} SET connection_id = 'unknown'").format(table(name, schema))
            )  # fmt: skip
        conn.rollback()
        connections = table("integration_connections", schema)
        for statement in ("DELETE FROM {} WHERE id = 'known'", "UPDATE {} SET id = 'renamed' WHERE id = 'known'"):
            with pytest.raises(psycopg.errors.ForeignKeyViolation, match=f'still has rows in table "{name}"'):
                conn.execute(sql.SQL(statement).format(connections))
            conn.rollback()
        conn.execute(sql.SQL("UPDATE {} SET display_name = 'Renamed' WHERE id = 'known'").format(connections))
        conn.execute(sql.SQL("DELETE FROM {}").format(table(name, schema)))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 'known'").format(connections))  # nothing left: allowed
        conn.commit()
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(connections)).fetchone()[0] == 0


def test_a_batch_for_a_connection_that_does_not_exist_is_refused_whole(database_url, schema):
    from nextcrm_pipelines.core.upsert import UpsertWriter
    from nextcrm_pipelines.providers.stripe.records import PAYMENTS_TABLE, charge_row

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    charges = [
        {"id": f"ch_{n}", "object": "charge", "amount": 100, "currency": "usd", "status": "succeeded",
         "created": int(t0.timestamp()), "refunded": False, "amount_refunded": 0}
        for n in range(50)
    ]  # fmt: skip
    with psycopg.connect(database_url) as conn:
        writer = UpsertWriter(conn, PAYMENTS_TABLE, "no-such-connection", schema)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            writer.write([charge_row(c, t0) for c in charges])
        conn.rollback()
        assert _count(conn, schema, "stripe_payments") == 0


def test_deleting_a_connection_waits_for_a_write_in_flight_and_is_then_refused(database_url, schema):
    """The check locks the connection as a foreign key would: a delete cannot slip in between a
    batch's check and its commit and leave the batch's rows without their connection."""
    with psycopg.connect(database_url) as setup:
        _connection(setup, schema, "acme")
    outcome: dict = {}
    with psycopg.connect(database_url) as writer, psycopg.connect(database_url) as deleter:
        _insert(writer, schema, "stripe_payments", "acme", "ch_1")  # checked, not committed yet

        def delete() -> None:
            try:
                deleter.execute(
                    sql.SQL("DELETE FROM {} WHERE id = 'acme'").format(table("integration_connections", schema))
                )
                deleter.commit()
                outcome["deleted"] = True
            except psycopg.Error as exc:
                deleter.rollback()
                outcome["error"] = exc

        thread = threading.Thread(target=delete)
        thread.start()
        wait_until_blocked(database_url, deleter, "the delete")
        assert thread.is_alive()
        writer.commit()
        thread.join(timeout=30)
    assert "deleted" not in outcome
    assert isinstance(outcome["error"], psycopg.errors.ForeignKeyViolation)
    with psycopg.connect(database_url) as conn:
        assert _count(conn, schema, "stripe_payments") == 1
        assert conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(table("integration_connections", schema))
        ).fetchone()[0] == 1  # fmt: skip


def test_upgrading_a_database_that_holds_rows_keeps_them_and_their_check(database_url):
    from nextcrm_pipelines.core import db

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        db.upgrade(database_url, schema, "0007")
        with psycopg.connect(database_url) as conn:
            _connection(conn, schema, "acme")
            _insert(conn, schema, "stripe_payments", "acme", "ch_1")
        assert db.upgrade(database_url, schema, "0008") == "0008"
        with psycopg.connect(database_url) as conn:
            assert _count(conn, schema, "stripe_payments") == 1
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                _insert(conn, schema, "stripe_payments", "unknown", "ch_2")
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
