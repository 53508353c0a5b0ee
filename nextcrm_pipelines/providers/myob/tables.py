"""MYOB Business's mirror tables: `myob_invoices` (with their lines), `myob_customers` and `myob_customer_payments`."""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

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
    sa.Column("line_items", sa.Integer,
              comment="How many lines the invoice has; the lines themselves are raw->'Lines' (read from the "
              "invoice's layout endpoint)."),
    sa.Index("myob_invoices_by_updated", "connection_id", "source_updated_at"),
    deleted_status="Deleted",
)  # fmt: skip

CUSTOMERS = entity_table(
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
)  # fmt: skip

CUSTOMER_PAYMENTS = entity_table(
    "myob_customer_payments",
    sa.Column("receipt_number", sa.Text),
    sa.Column("customer_id", sa.Text, comment="The paying customer (myob_customers.id)."),
    sa.Column("customer_name", sa.Text),
    sa.Column("invoice_ids", pg.ARRAY(sa.Text), nullable=False,
              comment="The invoices (myob_invoices.id) the payment applies to: its Invoices lines of type Invoice."),
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
)  # fmt: skip
