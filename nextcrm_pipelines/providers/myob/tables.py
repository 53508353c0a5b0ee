"""MYOB Business's mirror table: `myob_invoices`."""

import sqlalchemy as sa

from nextcrm_pipelines.core.tables import entity_table

INVOICES = entity_table(
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
    sa.Index("myob_invoices_by_updated", "connection_id", "source_updated_at"),
    deleted_status="Deleted",
)  # fmt: skip
