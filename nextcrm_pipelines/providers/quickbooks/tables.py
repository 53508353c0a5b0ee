"""QuickBooks Online's mirror tables: `quickbooks_invoices`, `quickbooks_customers` and `quickbooks_payments`."""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import entity_table

INVOICES = entity_table(
    "quickbooks_invoices",
    sa.Column("doc_number", sa.Text),
    sa.Column("status", sa.Text, nullable=False,
              comment="open, paid, voided or deleted: derived, QuickBooks has no status field."),
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
    sa.Index("quickbooks_invoices_by_updated", "connection_id", "source_updated_at"),
    deleted_status="deleted",
)  # fmt: skip

CUSTOMERS = entity_table(
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
)  # fmt: skip

PAYMENTS = entity_table(
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
)  # fmt: skip
