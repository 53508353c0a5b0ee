"""Mirror tables: MYOB customers and customer payments; the line count of MYOB invoices.

`myob_customers` holds every customer card, inactive ones too (flagged `deleted`, status `Inactive`),
with the email, phone and postal address of its first address. `myob_customer_payments` holds every
payment received with its customer and the invoices it pays (`invoice_ids`, a text array with a GIN
index: an invoice's payments are `invoice_ids @> ARRAY['<uid>']`). MYOB hard-deletes cards and
payments without a trace; the id sweep flags them. Both are entity tables created with their
connection checks (`core.tables.create_entity_table`).

`myob_invoices` gains `line_items`: invoices are now read from their layout's endpoint, whose answers
carry the lines (kept in `raw`). The write path and the table metadata keep typed columns before the
mirror columns, and Postgres only appends a column, so the table is rebuilt with the column in its
place: the old one is renamed aside, the new one created (indexes, connection checks), the rows copied
(their counts taken from `raw` where it holds lines; a re-sync of a day fills the others), the old one
dropped.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import create_entity_table, entity_table, in_schema

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

ASIDE = "_before_0017"


def _invoices(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "myob_invoices",
        sa.Column("number", sa.Text),
        sa.Column("invoice_type", sa.Text,
                  comment="The invoice's layout: Item, Service, Professional, TimeBilling or Miscellaneous."),
        sa.Column("status", sa.Text, nullable=False,
                  comment="Open, Closed or Credit; Deleted once the id sweep finds the invoice gone."),
        sa.Column("customer_id", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("issue_date", sa.Date),
        sa.Column("due_date", sa.Date),
        sa.Column("currency", sa.Text, comment="Null for the company file's own currency (MYOB does not name it)."),
        sa.Column("subtotal", sa.Numeric),
        sa.Column("total_tax", sa.Numeric),
        sa.Column("total", sa.Numeric),
        sa.Column("balance_due", sa.Numeric),
        sa.Column("row_version", sa.Text),
        sa.Column("line_items", sa.Integer,
                  comment="How many lines the invoice has; the lines themselves are raw->'Lines' (read from the "
                  "invoice's layout endpoint)."),
        sa.Index("myob_invoices_by_updated", "connection_id", "source_updated_at"),
        deleted_status="Deleted",
        metadata=metadata,
    )  # fmt: skip


def _customers(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "myob_customers",
        sa.Column("display_id", sa.Text, comment="The card ID (DisplayID), e.g. CUS000001."),
        sa.Column("company_name", sa.Text),
        sa.Column("first_name", sa.Text),
        sa.Column("last_name", sa.Text),
        sa.Column("is_individual", sa.Boolean),
        sa.Column("status", sa.Text, nullable=False,
                  comment="Active or Inactive (IsActive; an inactive card is flagged deleted); Deleted once the id "
                  "sweep finds the card gone."),
        sa.Column("email", sa.Text, comment="From the card's first address."),
        sa.Column("phone", sa.Text, comment="Phone1 of the card's first address."),
        sa.Column("street", sa.Text),
        sa.Column("city", sa.Text),
        sa.Column("state", sa.Text),
        sa.Column("postcode", sa.Text),
        sa.Column("country", sa.Text),
        sa.Column("currency", sa.Text, comment="The card's foreign currency; null for the company file's own."),
        sa.Column("current_balance", sa.Numeric),
        sa.Column("row_version", sa.Text),
        sa.Index("myob_customers_by_updated", "connection_id", "source_updated_at"),
        deleted_status="Deleted",
        metadata=metadata,
    )  # fmt: skip


def _payments(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "myob_customer_payments",
        sa.Column("receipt_number", sa.Text),
        sa.Column("customer_id", sa.Text, comment="The paying customer (myob_customers.id)."),
        sa.Column("customer_name", sa.Text),
        sa.Column("invoice_ids", pg.ARRAY(sa.Text), nullable=False,
                  comment="The invoices (myob_invoices.id) the payment applies to: its Invoices lines of type "
                  "Invoice."),
        sa.Column("payment_date", sa.Date),
        sa.Column("currency", sa.Text, comment="Null for the company file's own currency (MYOB does not name it)."),
        sa.Column("exchange_rate", sa.Numeric),
        sa.Column("amount", sa.Numeric, comment="The amount received, in the payment's currency."),
        sa.Column("payment_method", sa.Text),
        sa.Column("memo", sa.Text),
        sa.Column("deposit_to", sa.Text, comment="Account or UndepositedFunds."),
        sa.Column("deposit_account_id", sa.Text),
        sa.Column("deposit_account_name", sa.Text),
        sa.Column("row_version", sa.Text),
        sa.Index("myob_customer_payments_by_updated", "connection_id", "source_updated_at"),
        sa.Index("myob_customer_payments_by_invoice", "invoice_ids", postgresql_using="gin"),
        metadata=metadata,
    )  # fmt: skip


def _rebuild_invoices_with_line_items(bind: sa.Connection, schema: str, table: sa.Table) -> None:
    indexes = bind.execute(
        sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = :schema AND tablename = :name"),
        {"schema": schema, "name": table.name},
    ).scalars()
    for index in list(indexes):
        op.execute(f'ALTER INDEX "{schema}"."{index}" RENAME TO "{index}{ASIDE}"')
    op.execute(f'ALTER TABLE "{schema}"."{table.name}" RENAME TO "{table.name}{ASIDE}"')
    create_entity_table(bind, table, schema)
    kept = [c.name for c in table.columns if c.name != "line_items"]
    aside = sa.table(f"{table.name}{ASIDE}", *(sa.column(name) for name in kept), schema=schema)
    lines = sa.literal_column("raw->'Lines'")
    counted = sa.case((sa.func.jsonb_typeof(lines) == "array", sa.func.jsonb_array_length(lines)), else_=None)
    copy = table.insert().from_select([*kept, "line_items"], sa.select(*aside.c, counted))
    in_schema(bind, schema).execute(copy)
    op.drop_table(f"{table.name}{ASIDE}", schema=schema)


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    bind = op.get_bind()
    _rebuild_invoices_with_line_items(bind, schema, _invoices(metadata))
    for table in (_customers(metadata), _payments(metadata)):
        create_entity_table(bind, table, schema)


def downgrade(schema: str) -> None:
    for name in ("myob_customer_payments", "myob_customers"):
        op.drop_table(name, schema=schema)
    op.drop_column("myob_invoices", "line_items", schema=schema)
