"""Every table of the project, defined once as SQLAlchemy metadata: the shared machinery tables here,
each provider's entity tables in its `tables.py`, all in one `METADATA`.

Alembic compares migrations against it, the write path derives its plain column lists from it once
at import (`table_spec`), and Dagster's column schemas are read from it. Tables carry no schema:
every table lives in the one schema named at run time (`settings.db_schema()`), given to SQLAlchemy
with `in_schema` (a `schema_translate_map`) and to Alembic as the connection's search path.

An entity table (`entity_table`) is the provider's key, its typed columns and the mirror columns
the write path fills. Instead of a foreign key, its rows' connection is checked by two triggers
(`connection_check_ddl`, from revision 0008 on): the check on `integration_connections` finds
the entity tables by those triggers, so a new table is protected once it has them.
"""

from __future__ import annotations

import importlib
from collections import namedtuple
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.upsert import ROW_KEY_COLUMNS, ROW_MIRROR_COLUMNS, TableSpec

METADATA = sa.MetaData()
TZ = sa.DateTime(timezone=True)
# The largest TOAST target Postgres accepts: a row is compressed or moved out of line only past one
# 8 kB page, so typical records (raw JSON included) are written and read uncompressed (revision 0006).
ROW_TARGET = 8160
# The trigger function that checks, per statement, that inserted rows name a connection that exists;
# the check on `integration_connections` treats every table that calls it as an entity table.
CONNECTION_CHECK = "entity_rows_need_their_connection"

# What every entity table's shared columns hold (stored as column comments: Dagster shows them).
KEY_COMMENTS = {
    "connection_id": "The connection (integration_connections.id) the row was synced through.",
    "id": "The provider's id of the record.",
}
MIRROR_COMMENTS = {
    "created_at": "When the record was created upstream.",
    "source_updated_at": "When the stored state was true upstream (updated time, event time or read time); "
    "a write never replaces a row with an older state.",
    "deleted": "The record is gone upstream (voided, deleted, archived or ended); the row keeps its last data.",
    "raw": "The provider's JSON of the record, as read.",
    "raw_hash": "XXH3-128 hash of raw: a re-sync skips records whose hash is unchanged.",
    "synced_at": "When this row was last written.",
}

# The type each column is sent as by binary COPY. `raw` (jsonb) goes as bytes already in jsonb's
# binary form (see `upsert.JSONB_BINARY_VERSION`): the column's type, not the client's, decides.
_COPY_TYPES = {
    "TEXT": "text",
    "TEXT[]": "text[]",
    "NUMERIC": "numeric",
    "BOOLEAN": "bool",
    "INTEGER": "int4",
    "BIGINT": "int8",
    "DATE": "date",
    "TIMESTAMP WITH TIME ZONE": "timestamptz",
    "BYTEA": "bytea",
    "JSONB": "bytea",
}


def key_columns(id_comment: str | None = None) -> list[sa.Column]:
    """The key of every entity table: the connection and the provider's id."""
    return [
        sa.Column("connection_id", sa.Text, primary_key=True, comment=KEY_COMMENTS["connection_id"]),
        sa.Column("id", sa.Text, primary_key=True, comment=id_comment or KEY_COMMENTS["id"]),
    ]


def mirror_columns() -> list[sa.Column]:
    """The columns every entity table ends with, in this order; the database alone sets `synced_at`."""
    return [
        sa.Column("created_at", TZ, comment=MIRROR_COMMENTS["created_at"]),
        sa.Column("source_updated_at", TZ, nullable=False, comment=MIRROR_COMMENTS["source_updated_at"]),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false(), comment=MIRROR_COMMENTS["deleted"]),
        sa.Column("raw", pg.JSONB, nullable=False, comment=MIRROR_COMMENTS["raw"]),
        sa.Column("raw_hash", sa.LargeBinary, nullable=False, comment=MIRROR_COMMENTS["raw_hash"]),
        sa.Column("synced_at", TZ, nullable=False, server_default=sa.func.now(), comment=MIRROR_COMMENTS["synced_at"],
                  info={"written_by": "database"}),
    ]  # fmt: skip


def entity_table(
    name: str,
    *columns: sa.Column | sa.Index | sa.Constraint,
    deleted_status: str | None = None,
    id_comment: str | None = None,
    metadata: sa.MetaData = METADATA,
) -> sa.Table:
    """An entity table: the key, `columns` (typed fields and indexes) and the mirror columns.

    `deleted_status` is what the `status` column says of a record hard-deleted upstream (a tombstone
    or an id sweep sets it). A migration passes a `metadata` of its own, so that its table stays as
    it was when the migration was written.
    """
    return sa.Table(
        name,
        metadata,
        *key_columns(id_comment),
        *(c for c in columns if isinstance(c, sa.Column)),
        *mirror_columns(),
        *(c for c in columns if not isinstance(c, sa.Column)),
        info={"entity": True, "deleted_status": deleted_status},
        postgresql_with={"toast_tuple_target": ROW_TARGET},
    )


def is_entity(table: sa.Table) -> bool:
    return bool(table.info.get("entity"))


def written_columns(table: sa.Table) -> list[sa.Column]:
    """The columns the write path sends, in table order (all but those only the database sets)."""
    return [c for c in table.columns if c.info.get("written_by") != "database"]


def copy_type(column: sa.Column) -> str:
    """The Postgres type name binary COPY sends `column` as."""
    compiled = column.type.compile(dialect=pg.dialect())
    try:
        return _COPY_TYPES[compiled.split("(")[0]]
    except KeyError:
        raise ValueError(f"column {column.table.name}.{column.name} has type {compiled}, which the write path "
                         "does not send; add it to core/tables.py") from None  # fmt: skip


def table_spec(table: sa.Table) -> TableSpec:
    """The write path's plain view of an entity table (names and COPY types), derived once at import.

    The write path sends each row as its key, its typed values, then the mirror columns it carries
    (`Row`): a table laid out otherwise is refused here, when its module is imported.
    """
    if not is_entity(table):
        raise ValueError(f"{table.name} is not an entity table")
    written = written_columns(table)
    names = tuple(c.name for c in written)
    head, tail = len(ROW_KEY_COLUMNS), len(ROW_MIRROR_COLUMNS)
    if names[:head] != ROW_KEY_COLUMNS or names[-tail:] != ROW_MIRROR_COLUMNS:
        raise ValueError(f"{table.name} does not start with {ROW_KEY_COLUMNS} and end with {ROW_MIRROR_COLUMNS}")
    typed = names[head:-tail]
    return TableSpec(
        name=table.name,
        copy_columns=names,
        copy_types=tuple(copy_type(c) for c in written),
        values=namedtuple(f"{table.name}_values", typed),
        deleted_status=table.info.get("deleted_status"),
    )


def in_schema(bind: sa.Connection, schema: str) -> sa.Connection:
    """`bind` with the project's tables placed in `schema` for the statements it runs."""
    return bind.execution_options(schema_translate_map={None: schema})


def connection_check_ddl(schema: str, name: str) -> list[str]:
    """The triggers that check an entity table's rows name a connection that exists (revision 0008).

    Inserts are checked once per statement (the statement's new rows, locked `FOR KEY SHARE` as a
    foreign key would lock them), a changed `connection_id` row by row; deleting a connection, or
    changing its id, is refused while any table carrying the insert check holds its rows.
    """
    target = f'"{schema}"."{name}"'
    return [
        f"""CREATE TRIGGER connection_exists_after_insert AFTER INSERT ON {target}
            REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
            EXECUTE FUNCTION "{schema}".{CONNECTION_CHECK}()""",
        f"""CREATE TRIGGER connection_exists_after_update AFTER UPDATE OF connection_id ON {target}
            FOR EACH ROW WHEN (OLD.connection_id IS DISTINCT FROM NEW.connection_id)
            EXECUTE FUNCTION "{schema}".entity_row_needs_its_connection()""",
    ]


def create_entity_table(bind: sa.Connection, table: sa.Table, schema: str) -> None:
    """Create `table` (with its indexes) in `schema` and attach its connection checks.

    All a migration does to add an entity table: `create_entity_table(op.get_bind(), entity_table(
    "name", ..., metadata=sa.MetaData()), schema)`. Nothing else names the entity tables.
    """
    table.create(in_schema(bind, schema))
    for statement in connection_check_ddl(schema, table.name):
        bind.exec_driver_sql(statement)


def project_metadata() -> sa.MetaData:
    """`METADATA` with every provider's tables in it (each registers them when its module is imported)."""
    from nextcrm_pipelines.providers import PROVIDER_NAMES

    for name in PROVIDER_NAMES:
        importlib.import_module(f"nextcrm_pipelines.providers.{name}.tables")
    return METADATA


def table_named(name: str) -> sa.Table:
    """The project's table called `name`."""
    tables: Mapping[str, sa.Table] = METADATA.tables
    if name not in tables:
        tables = project_metadata().tables
    if name not in tables:
        raise KeyError(f"no table {name!r} is defined")
    return tables[name]


CONNECTIONS = sa.Table(
    "integration_connections",
    METADATA,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("external_tenant", sa.Text),
    sa.Column("base_url", sa.Text),
    sa.Column("status", sa.Text, nullable=False, server_default="active"),
    sa.Column("sync_status", sa.Text, nullable=False, server_default="never_synced"),
    sa.Column("last_error", sa.Text),
    sa.Column("last_synced_at", TZ),
    sa.Column("settings", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("secrets_encrypted", sa.Text),
    sa.Column("token_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("token_expires_at", TZ),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.CheckConstraint("status IN ('active', 'needs_reauth', 'disabled')", name="connection_status_known"),
    sa.UniqueConstraint("provider", "display_name", name="connection_name_unique_per_provider"),
)

SYNC_LOGS = sa.Table(
    "integration_sync_logs",
    METADATA,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("connection_id", sa.Text, sa.ForeignKey("integration_connections.id"), nullable=False),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("asset", sa.Text, nullable=False),
    sa.Column("partition", sa.Text),
    sa.Column("window_start", TZ),
    sa.Column("window_end", TZ),
    sa.Column("run_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("total_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("synced_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("inserted_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("updated_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unchanged_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_records", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rate_limit_waits", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("started_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("completed_at", TZ),
    sa.Column("duration_seconds", sa.Numeric(12, 3)),
    sa.CheckConstraint("status IN ('running', 'success', 'failed', 'partial')", name="sync_log_status_known"),
    sa.Index("sync_logs_by_connection", "connection_id", "asset", "started_at"),
)

WEBHOOK_EVENTS = sa.Table(
    "webhook_events",
    METADATA,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("connection_id", sa.Text, sa.ForeignKey("integration_connections.id"), nullable=False),
    # The provider's event id, or a hash of the event where the provider gives none (Xero, Mautic).
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text),
    sa.Column("occurred_at", TZ),
    sa.Column("payload", pg.JSONB),
    # The exact bytes that were signed, and the headers needed to check them again.
    sa.Column("raw_body", sa.Text, nullable=False),
    sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("received_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("processed_at", TZ),
    # A failed event is retried from this time on (backoff); `dead` after the last attempt.
    sa.Column("next_attempt_at", TZ),
    # The signed delivery the event came in (PayPal signs weakly: one body per transmission id).
    sa.Column("delivery_id", sa.Text),
    # The claim of the apply run that holds the event, and when that claim lapses if the run dies.
    sa.Column("claim", sa.BigInteger),
    sa.Column("lease_until", TZ),
    # Moves on whenever the event becomes due again, so a sensor's run key never repeats.
    sa.Column("generation", sa.BigInteger, nullable=False,
              server_default=sa.text("nextval('webhook_claims'::regclass)")),
    sa.CheckConstraint("status IN ('pending', 'applying', 'processed', 'failed', 'dead')", name="webhook_status_known"),
    sa.UniqueConstraint("provider", "connection_id", "event_id", name="webhook_event_once"),
    sa.Index("webhook_events_pending", "provider", "id",
             postgresql_where=sa.text("status IN ('pending', 'failed', 'applying')")),
    sa.Index("webhook_events_claimed", "claim", postgresql_where=sa.text("status = 'applying'")),
    sa.Index("webhook_events_delivery", "provider", "connection_id", "delivery_id",
             postgresql_where=sa.text("delivery_id IS NOT NULL")),
)  # fmt: skip

OUTBOX = sa.Table(
    "integration_outbox",
    METADATA,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("connection_id", sa.Text, nullable=False),
    # Filled from the connection on insert (a row naming no connection is stored `failed`).
    sa.Column("provider", sa.Text),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("payload", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    # Sent on every attempt (providers that take one); the caller's, else generated. Unique per connection.
    sa.Column("idempotency_key", sa.Text, nullable=False, server_default=sa.text("(gen_random_uuid())::text")),
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TZ, nullable=False, server_default=sa.func.now()),
    # The claim of the apply run that holds the row (`sending`), and when that claim lapses if the run dies.
    sa.Column("claim", sa.BigInteger),
    sa.Column("lease_until", TZ),
    # Moves on whenever the row becomes due again, so a sensor's run key never repeats.
    sa.Column("generation", sa.BigInteger, nullable=False,
              server_default=sa.text("nextval('outbox_claims'::regclass)")),
    sa.Column("result", pg.JSONB),
    sa.Column("result_id", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("requested_by", sa.Text),
    sa.Column("run_id", sa.Text),
    sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
    sa.Column("sent_at", TZ),
    sa.Column("completed_at", TZ),
    sa.CheckConstraint("status IN ('pending', 'sending', 'succeeded', 'failed', 'unknown', 'dead', 'cancelled')",
                       name="outbox_status_known"),
    sa.UniqueConstraint("connection_id", "idempotency_key", name="outbox_key_once_per_connection"),
    sa.Index("outbox_due", "provider", "id", postgresql_where=sa.text("status IN ('pending', 'sending', 'unknown')")),
)  # fmt: skip

VAULT_KEYS = sa.Table(
    "vault_keys",
    METADATA,
    sa.Column("only_row", sa.Boolean, primary_key=True, server_default=sa.true()),
    sa.Column("fingerprint", sa.Text),
    sa.Column("rotated_at", TZ),
    sa.CheckConstraint("only_row", name="vault_keys_one_row"),
)
