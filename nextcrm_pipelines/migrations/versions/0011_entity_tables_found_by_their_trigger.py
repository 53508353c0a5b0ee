"""The connection check finds the entity tables by their trigger; entity columns carry comments.

Revision 0008 gave the delete / id-change check on `integration_connections` the list of entity
tables as trigger arguments, so each new table meant replacing that trigger. Now the check reads
the catalog when it fires: every table whose statement trigger calls this schema's
`entity_rows_need_their_connection` is an entity table. Adding one is creating it and attaching its
two triggers (`core.tables.create_entity_table`). Only the rare delete or id change of a connection
reads the catalog; the per-statement insert check on the write path is unchanged.

The comments say what each entity table's shared columns hold, and what a few provider columns
mean; Dagster shows them as column descriptions.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

import importlib

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# The entity tables as of this revision (the ten that revision 0006 lists).
ENTITY_TABLES = importlib.import_module("nextcrm_pipelines.migrations.versions.0006_raw_inline").ENTITY_TABLES

SHARED_COMMENTS = {
    "connection_id": "The connection (integration_connections.id) the row was synced through.",
    "id": "The provider's id of the record.",
    "created_at": "When the record was created upstream.",
    "source_updated_at": "When the stored state was true upstream (updated time, event time or read time); "
    "a write never replaces a row with an older state.",
    "deleted": "The record is gone upstream (voided, deleted, archived or ended); the row keeps its last data.",
    "raw": "The provider's JSON of the record, as read.",
    "raw_hash": "XXH3-128 hash of raw: a re-sync skips records whose hash is unchanged.",
    "synced_at": "When this row was last written.",
}
_STRIPE_MAJOR = "In major units of currency (Stripe sends minor units; JPY has none)."
COLUMN_COMMENTS = {
    ("stripe_payments", "amount"): _STRIPE_MAJOR,
    ("stripe_payments", "amount_captured"): _STRIPE_MAJOR,
    ("stripe_payments", "amount_refunded"): _STRIPE_MAJOR,
    ("stripe_payments", "currency"): "ISO 4217 code, lower case.",
    ("stripe_subscriptions", "amount"): "The items' unit amounts times their quantities, summed. " + _STRIPE_MAJOR,
    ("xero_invoices", "type"): "ACCREC (a sales invoice) or ACCPAY (a bill).",
    ("quickbooks_invoices", "status"): "open, paid, voided or deleted: derived, QuickBooks has no status field.",
    ("myob_invoices", "invoice_type"): "The invoice's layout: Item, Service, Professional, TimeBilling or "
    "Miscellaneous.",
    ("myob_invoices", "status"): "Open, Closed or Credit; Deleted once the id sweep finds the invoice gone.",
    ("myob_invoices", "currency"): "Null for the company file's own currency (MYOB does not name it).",
    ("paypal_payments", "id"): "<transaction_id>:<event code> (a transaction id alone is not unique).",
    ("billionmail_campaigns", "status"): "pending, processing, done or paused; deleted once the id sweep finds "
    "the campaign gone.",
    ("mautic_campaigns", "contact_count"): "Contacts in the campaign when it was read.",
}  # fmt: skip

_FIND_ENTITY_TABLES = """
        CREATE OR REPLACE FUNCTION "{schema}".connection_keeps_its_rows() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            entity record;
            held boolean;
        BEGIN
            FOR entity IN
                SELECT c.oid::regclass AS target, c.relname AS name
                  FROM pg_catalog.pg_trigger AS t
                  JOIN pg_catalog.pg_proc AS p ON p.oid = t.tgfoid
                  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
                  JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
                 WHERE p.proname = 'entity_rows_need_their_connection' AND n.nspname = TG_TABLE_SCHEMA
                 ORDER BY c.relname
            LOOP
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE connection_id = $1)', entity.target)
                   INTO held USING OLD.id;
                IF held THEN
                    RAISE EXCEPTION 'connection "%" still has rows in table "%"', OLD.id, entity.name
                        USING ERRCODE = 'foreign_key_violation';
                END IF;
            END LOOP;
            RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
        END $$
"""

# Revision 0008's check, which reads the tables from its trigger arguments.
_LISTED_ENTITY_TABLES = """
        CREATE OR REPLACE FUNCTION "{schema}".connection_keeps_its_rows() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            entity text;
            held boolean;
        BEGIN
            FOREACH entity IN ARRAY TG_ARGV LOOP
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.%I WHERE connection_id = $1)',
                               TG_TABLE_SCHEMA, entity)
                   INTO held USING OLD.id;
                IF held THEN
                    RAISE EXCEPTION 'connection "%" still has rows in table "%"', OLD.id, entity
                        USING ERRCODE = 'foreign_key_violation';
                END IF;
            END LOOP;
            RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
        END $$
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _triggers(schema: str, arguments: str) -> None:
    connections = f'"{schema}".integration_connections'
    op.execute(f"DROP TRIGGER keeps_entity_rows_on_new_id ON {connections}")
    op.execute(f"DROP TRIGGER keeps_entity_rows_on_delete ON {connections}")
    op.execute(f"""
        CREATE TRIGGER keeps_entity_rows_on_delete BEFORE DELETE ON {connections}
        FOR EACH ROW EXECUTE FUNCTION "{schema}".connection_keeps_its_rows({arguments})
    """)  # fmt: skip
    op.execute(f"""
        CREATE TRIGGER keeps_entity_rows_on_new_id BEFORE UPDATE OF id ON {connections}
        FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
        EXECUTE FUNCTION "{schema}".connection_keeps_its_rows({arguments})
    """)  # fmt: skip


def _comments() -> dict[tuple[str, str], str]:
    comments = {(name, column): text for name in ENTITY_TABLES for column, text in SHARED_COMMENTS.items()}
    comments.update(COLUMN_COMMENTS)
    return comments


def upgrade(schema: str) -> None:
    op.execute(_FIND_ENTITY_TABLES.format(schema=schema))
    _triggers(schema, "")
    for (name, column), text in _comments().items():
        op.execute(f'COMMENT ON COLUMN "{schema}"."{name}"."{column}" IS {_quote(text)}')


def downgrade(schema: str) -> None:
    for name, column in _comments():
        op.execute(f'COMMENT ON COLUMN "{schema}"."{name}"."{column}" IS NULL')
    op.execute(_LISTED_ENTITY_TABLES.format(schema=schema))
    _triggers(schema, ", ".join(f"'{name}'" for name in ENTITY_TABLES))
