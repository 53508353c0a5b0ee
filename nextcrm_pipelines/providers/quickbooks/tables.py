"""QuickBooks Online's mirror table: `quickbooks_invoices`."""

import sqlalchemy as sa

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
