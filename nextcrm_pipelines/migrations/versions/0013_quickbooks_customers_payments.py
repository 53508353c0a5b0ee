"""Mirror tables: QuickBooks customers and payments.

`quickbooks_customers` holds every customer, inactive ones too (QuickBooks "deletes" a customer by
making it inactive: flagged `deleted`, status `inactive`) and those merged into another (a Change Data
Capture stub: status `deleted`, the row keeps its last data). `quickbooks_payments` holds every
payment received with its customer and the invoices it pays (`invoice_ids`, a text array with a GIN
index: an invoice's payments are `invoice_ids @> ARRAY['<id>']`); voided and hard-deleted payments are
flagged `deleted`. Both are entity tables created with their connection checks
(`core.tables.create_entity_table`); the shared columns carry the comments every entity table has, and
a few provider columns say what they mean.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import create_entity_table, entity_table

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def _customers(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "quickbooks_customers",
        sa.Column("display_name", sa.Text),
        sa.Column("company_name", sa.Text),
        sa.Column("given_name", sa.Text),
        sa.Column("family_name", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("address_line1", sa.Text),
        sa.Column("city", sa.Text),
        sa.Column("region", sa.Text),
        sa.Column("postal_code", sa.Text),
        sa.Column("country", sa.Text),
        sa.Column("status", sa.Text, nullable=False,
                  comment="active, inactive (QuickBooks' delete of a customer) or deleted (merged into another)."),
        sa.Column("parent_id", sa.Text, comment="The parent customer of a sub-customer or job (ParentRef)."),
        sa.Column("currency", sa.Text),
        sa.Column("balance", sa.Numeric, comment="Open balance, in the customer's currency."),
        sa.Column("balance_with_jobs", sa.Numeric),
        sa.Column("sync_token", sa.Text),
        sa.Index("quickbooks_customers_by_updated", "connection_id", "source_updated_at"),
        deleted_status="deleted",
        metadata=metadata,
    )  # fmt: skip


def _payments(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "quickbooks_payments",
        sa.Column("payment_ref_num", sa.Text),
        sa.Column("status", sa.Text, nullable=False,
                  comment="applied, unapplied (some of it applies to no invoice), voided or deleted: derived."),
        sa.Column("customer_id", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("invoice_ids", pg.ARRAY(sa.Text), nullable=False,
                  comment="The invoices (quickbooks_invoices.id) the payment applies to: its lines' LinkedTxn."),
        sa.Column("txn_date", sa.Date),
        sa.Column("currency", sa.Text),
        sa.Column("exchange_rate", sa.Numeric),
        sa.Column("total", sa.Numeric),
        sa.Column("unapplied", sa.Numeric),
        sa.Column("deposit_account_id", sa.Text),
        sa.Column("sync_token", sa.Text),
        sa.Index("quickbooks_payments_by_updated", "connection_id", "source_updated_at"),
        sa.Index("quickbooks_payments_by_invoice", "invoice_ids", postgresql_using="gin"),
        deleted_status="deleted",
        metadata=metadata,
    )  # fmt: skip


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    for table in (_customers(metadata), _payments(metadata)):
        create_entity_table(op.get_bind(), table, schema)


def downgrade(schema: str) -> None:
    for name in ("quickbooks_payments", "quickbooks_customers"):
        op.drop_table(name, schema=schema)
