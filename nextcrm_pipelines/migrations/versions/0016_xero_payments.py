"""Mirror table: Xero payments.

`xero_payments` holds every payment of the organisation (`GET /Payments`): received for sales invoices,
made for bills, or paying a credit note, each with its type, date, amount in the currency of the document
it pays (and that currency and rate), the amount in the bank account's currency, its reference, the
invoice it pays (`invoice_id`, indexed: an invoice's payments are `invoice_id = '<InvoiceID>'`) with that
invoice's number, type and contact, the bank account, and whether it is reconciled. Xero never removes a
payment: a deleted one stays readable with status DELETED and is flagged `deleted`. An entity table
created with its connection checks (`core.tables.create_entity_table`).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from nextcrm_pipelines.core.tables import create_entity_table, entity_table

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def _payments(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "xero_payments",
        sa.Column("payment_type", sa.Text, nullable=False,
                  comment="ACCRECPAYMENT (received for a sales invoice), ACCPAYPAYMENT (made for a bill), or a "
                          "credit note, prepayment or overpayment payment type."),
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
        metadata=metadata,
    )  # fmt: skip


def upgrade(schema: str) -> None:
    create_entity_table(op.get_bind(), _payments(sa.MetaData()), schema)


def downgrade(schema: str) -> None:
    op.drop_table("xero_payments", schema=schema)
