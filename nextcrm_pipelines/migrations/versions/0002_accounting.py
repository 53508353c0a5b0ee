"""Mirror tables of the accounting providers: Xero invoices and contacts, QuickBooks and MYOB invoices.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
# The key and mirror columns every entity table carries are the foundation migration's.
_foundation = importlib.import_module("nextcrm_pipelines.migrations.versions.0001_foundation_and_stripe")
mirror_columns = _foundation.mirror_columns
_key = _foundation.key_columns


def upgrade(schema: str) -> None:
    op.create_table(
        "xero_invoices",
        *_key(schema),
        sa.Column("invoice_number", sa.Text),
        sa.Column("type", sa.Text, nullable=False),  # ACCREC (sales) or ACCPAY (bills)...
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("contact_id", sa.Text),
        sa.Column("contact_name", sa.Text),
        sa.Column("reference", sa.Text),
        sa.Column("issue_date", sa.Date),
        sa.Column("due_date", sa.Date),
        sa.Column("currency", sa.Text),
        sa.Column("subtotal", sa.Numeric),
        sa.Column("total_tax", sa.Numeric),
        sa.Column("total", sa.Numeric),
        sa.Column("amount_due", sa.Numeric),
        sa.Column("amount_paid", sa.Numeric),
        sa.Column("amount_credited", sa.Numeric),
        sa.Column("line_items", sa.Integer),
        *mirror_columns(),
        schema=schema,
    )
    op.create_table(
        "xero_contacts",
        *_key(schema),
        sa.Column("name", sa.Text),
        sa.Column("first_name", sa.Text),
        sa.Column("last_name", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("contact_number", sa.Text),
        sa.Column("account_number", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("is_customer", sa.Boolean),
        sa.Column("is_supplier", sa.Boolean),
        sa.Column("default_currency", sa.Text),
        sa.Column("tax_number", sa.Text),
        sa.Column("merged_to_contact_id", sa.Text),
        *mirror_columns(),
        schema=schema,
    )
    op.create_table(
        "quickbooks_invoices",
        *_key(schema),
        sa.Column("doc_number", sa.Text),
        sa.Column("status", sa.Text, nullable=False),  # open, paid, voided, deleted (QuickBooks has no field)
        sa.Column("customer_id", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("txn_date", sa.Date),
        sa.Column("due_date", sa.Date),
        sa.Column("currency", sa.Text),
        sa.Column("subtotal", sa.Numeric),
        sa.Column("total_tax", sa.Numeric),
        sa.Column("total", sa.Numeric),
        sa.Column("balance", sa.Numeric),
        sa.Column("sync_token", sa.Text),
        *mirror_columns(),
        schema=schema,
    )
    op.create_table(
        "myob_invoices",
        *_key(schema),
        sa.Column("number", sa.Text),
        sa.Column("invoice_type", sa.Text),  # layout: Item, Service, Professional, TimeBilling, Miscellaneous
        sa.Column("status", sa.Text, nullable=False),  # Open, Closed, Credit
        sa.Column("customer_id", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("issue_date", sa.Date),
        sa.Column("due_date", sa.Date),
        sa.Column("currency", sa.Text),
        sa.Column("subtotal", sa.Numeric),
        sa.Column("total_tax", sa.Numeric),
        sa.Column("total", sa.Numeric),
        sa.Column("balance_due", sa.Numeric),
        sa.Column("row_version", sa.Text),
        *mirror_columns(),
        schema=schema,
    )
    for name in ("xero_invoices", "xero_contacts", "quickbooks_invoices", "myob_invoices"):
        op.create_index(f"{name}_by_updated", name, ["connection_id", "source_updated_at"], schema=schema)


def downgrade(schema: str) -> None:
    for name in ("myob_invoices", "quickbooks_invoices", "xero_contacts", "xero_invoices"):
        op.drop_table(name, schema=schema)
