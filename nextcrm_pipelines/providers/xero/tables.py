"""Xero's mirror tables: `xero_invoices` (sales and bills) and `xero_contacts`."""

import sqlalchemy as sa

from nextcrm_pipelines.core.tables import entity_table

INVOICES = entity_table(
    "xero_invoices",
    sa.Column("invoice_number", sa.Text),
    sa.Column("type", sa.Text, nullable=False, comment="ACCREC (a sales invoice) or ACCPAY (a bill)."),
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
    sa.Index("xero_invoices_by_updated", "connection_id", "source_updated_at"),
)

CONTACTS = entity_table(
    "xero_contacts",
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
    sa.Index("xero_contacts_by_updated", "connection_id", "source_updated_at"),
)
