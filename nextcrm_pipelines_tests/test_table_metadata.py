"""The table metadata (core/tables.py and each provider's tables.py) is the one definition of every
table: the migrations build exactly it, the write path sends columns in its order, Dagster's column
schema is read from it, and a new entity table made with its helper is protected by the connection
check without any trigger being edited."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from psycopg import sql

from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.tables import (
    create_entity_table,
    entity_table,
    is_entity,
    project_metadata,
    table_named,
    written_columns,
)
from nextcrm_pipelines.dagster_tables import table_metadata
from nextcrm_pipelines.providers import PROVIDERS

ENTITIES = [entity for provider in PROVIDERS.values() for entity in provider.entities]


def _copy_of_project_metadata() -> sa.MetaData:
    copy = sa.MetaData()
    for table in project_metadata().sorted_tables:
        table.to_metadata(copy)
    return copy


def test_a_migrated_schema_is_exactly_the_table_metadata(database_url, schema):
    assert db.schema_differences(database_url, schema) == []


def test_a_column_the_migrations_lack_is_a_difference(database_url, schema):
    changed = _copy_of_project_metadata()
    changed.tables["stripe_payments"].append_column(sa.Column("statement_descriptor", sa.Text))
    changed.tables["xero_invoices"].c.type.comment = "Something else."
    differences = db.schema_differences(database_url, schema, changed)
    flat = [d[0] if isinstance(d, list) else d for d in differences]
    assert sorted((d[0], d[2]) for d in flat) == [
        ("add_column", "stripe_payments"),
        ("modify_comment", "xero_invoices"),
    ]
    added = next(d for d in flat if d[0] == "add_column")
    assert added[3].name == "statement_descriptor"


def test_every_synced_entity_is_an_entity_table_of_the_metadata():
    entity_tables = {t.name for t in project_metadata().sorted_tables if is_entity(t)}
    assert {entity.table.name for entity in ENTITIES} == entity_tables


@pytest.mark.parametrize("entity", ENTITIES, ids=lambda e: e.name)
def test_the_write_path_sends_columns_in_the_tables_order(database_url, schema, entity):
    spec = entity.table
    table = table_named(spec.name)
    assert list(spec.copy_columns) == [c.name for c in written_columns(table)]
    with psycopg.connect(database_url) as conn:
        stored = [
            name
            for (name,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
                " ORDER BY ordinal_position",
                (schema, spec.name),
            )
        ]
    assert stored == [c.name for c in table.columns]
    assert list(spec.copy_columns) == [name for name in stored if name != "synced_at"]
    assert list(spec.values._fields) == list(spec.copy_columns[2:-5])


def _connection(conn: psycopg.Connection, schema: str, connection_id: str) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} (id, provider, display_name) VALUES (%s, 'stripe', %s)").format(
            db.table("integration_connections", schema)
        ),
        (connection_id, connection_id),
    )


def _widget(conn: psycopg.Connection, schema: str, connection_id: str, widget_id: str) -> None:
    conn.execute(
        sql.SQL("INSERT INTO {} (connection_id, id, label, source_updated_at, raw, raw_hash)"
                " VALUES (%s, %s, 'a widget', %s, '{{}}', '')").format(db.table("widgets", schema)),
        (connection_id, widget_id, datetime(2026, 1, 1, tzinfo=UTC)),
    )  # fmt: skip


def _connection_triggers(conn: psycopg.Connection, schema: str) -> list[str]:
    return [
        definition
        for (definition,) in conn.execute(
            "SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t WHERE t.tgrelid = %s::regclass ORDER BY t.tgname",
            (f'"{schema}".integration_connections',),
        )
    ]


def test_an_entity_table_made_with_the_helper_keeps_its_rows_connection(database_url, schema):
    with psycopg.connect(database_url) as conn:
        triggers_before = _connection_triggers(conn, schema)
    widgets = entity_table("widgets", sa.Column("label", sa.Text), metadata=sa.MetaData())
    engine = sa.create_engine(settings.sqlalchemy_url(database_url), poolclass=sa.pool.NullPool)
    with engine.begin() as bind:
        create_entity_table(bind, widgets, schema)
    engine.dispose()

    with psycopg.connect(database_url) as conn:
        assert _connection_triggers(conn, schema) == triggers_before
        _connection(conn, schema, "known")
        conn.commit()
        missing = 'connection "unknown", which does not exist'
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=missing) as refused:
            _widget(conn, schema, "unknown", "w1")
        assert refused.value.sqlstate == "23503"
        conn.rollback()
        _widget(conn, schema, "known", "w1")
        conn.commit()
        connections = db.table("integration_connections", schema)
        for statement in ("DELETE FROM {} WHERE id = 'known'", "UPDATE {} SET id = 'renamed' WHERE id = 'known'"):
            with pytest.raises(psycopg.errors.ForeignKeyViolation, match='still has rows in table "widgets"') as kept:
                conn.execute(sql.SQL(statement).format(connections))
            assert kept.value.sqlstate == "23503"
            conn.rollback()
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(connections)).fetchone()[0] == 1
        conn.execute(sql.SQL("DELETE FROM {}").format(db.table("widgets", schema)))
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = 'known'").format(connections))  # nothing left: allowed
        conn.commit()
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(connections)).fetchone()[0] == 0


def test_dagster_column_schema_is_read_from_the_metadata():
    metadata = table_metadata("stripe_payments", "crm_mirror")
    assert metadata["dagster/table_name"] == "crm_mirror.stripe_payments"
    columns = {c.name: c for c in metadata["dagster/column_schema"].columns}
    assert list(columns) == [c.name for c in table_named("stripe_payments").columns]
    assert columns["amount"].type == "numeric" and not columns["amount"].constraints.nullable
    assert columns["raw"].type == "jsonb" and columns["created_at"].type == "timestamp with time zone"
    assert columns["customer_id"].constraints.nullable
    assert not columns["id"].constraints.nullable
    assert columns["amount"].description.startswith("In major units of currency")
    assert metadata["dagster/column_schema"].constraints.other == ["primary key (connection_id, id)"]
