"""Xero's mirror tables: `xero_invoices` (sales and bills), `xero_contacts` and `xero_payments`."""

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

PAYMENTS = entity_table(
    "xero_payments",
    sa.Column("payment_type", sa.Text, nullable=False,
              comment="ACCRECPAYMENT (received for a sales invoice), ACCPAYPAYMENT (made for a bill), or a credit "
                      "note, prepayment or overpayment payment type."),
    sa.Column("status", sa.Text, nullable=False, comment="AUTHORISED or DELETED (flagged deleted)."),
    sa.Column("payment_date", sa.Date, comment="The day paid (the organisation's calendar day)."),
    sa.Column("amount", sa.Numeric, comment="In the currency of the invoice it pays."),
    sa.Column("currency", sa.Text, comment="The currency of the invoice it pays."),
    sa.Column("currency_rate", sa.Numeric, comment="Units of the currency per unit of the base currency."),
    sa.Column("bank_amount", sa.Numeric, comment="In the currency of the bank account."),
    sa.Column("reference", sa.Text),
    sa.Column("invoice_id", sa.Text, comment="The invoice (xero_invoices.id) or credit note the payment is for."),
    sa.Column("invoice_number", sa.Text),
    sa.Column("invoice_type", sa.Text),
    sa.Column("contact_id", sa.Text, comment="The contact (xero_contacts.id) of that invoice."),
    sa.Column("account_id", sa.Text, comment="The bank account paid into or from."),
    sa.Column("account_code", sa.Text),
    sa.Column("is_reconciled", sa.Boolean),
    sa.Column("batch_payment_id", sa.Text),
    sa.Index("xero_payments_by_updated", "connection_id", "source_updated_at"),
    sa.Index("xero_payments_by_invoice", "connection_id", "invoice_id"),
)  # fmt: skip
