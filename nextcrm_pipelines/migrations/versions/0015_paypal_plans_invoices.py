"""Mirror tables: PayPal billing plans and invoices.

`paypal_plans` holds every billing plan of the merchant's app with its product and the summary of its
regular billing cycle (interval, price and currency, total cycles) and trial; an INACTIVE plan (PayPal's
archive: plans are never deleted) keeps its row, flagged `deleted`. `paypal_invoices` holds every
Invoicing v2 invoice with its number, status, recipient, dates and amounts (total, due, paid, refunded),
and the PayPal transactions that paid it (`payment_ids`, a text array with a GIN index: an invoice of a
`paypal_payments` row is `payment_ids @> ARRAY['<transaction_id>']`); a CANCELLED invoice and a deleted
draft are flagged `deleted`. Both are entity tables created with their connection checks
(`core.tables.create_entity_table`).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import TZ, create_entity_table, entity_table

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def _plans(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "paypal_plans",
        sa.Column("product_id", sa.Text, comment="The catalog product the plan sells."),
        sa.Column("name", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("status", sa.Text,
                  comment="CREATED, ACTIVE or INACTIVE; INACTIVE (PayPal's archive) is flagged deleted."),
        sa.Column("usage_type", sa.Text),
        sa.Column("interval_unit", sa.Text, comment="DAY, WEEK, MONTH or YEAR: how often the regular cycle bills."),
        sa.Column("interval_count", sa.Integer, comment="Units between two bills of the regular cycle."),
        sa.Column("price", sa.Numeric, comment="The regular cycle's fixed price (null for tiered or volume pricing)."),
        sa.Column("currency", sa.Text, comment="ISO 4217 code of the regular cycle's price."),
        sa.Column("total_cycles", sa.Integer, comment="Times the regular cycle bills; 0 bills until cancelled."),
        sa.Column("trial_cycles", sa.Integer, comment="Trial cycles billed before the regular cycle (0: no trial)."),
        sa.Column("setup_fee", sa.Numeric),
        sa.Column("quantity_supported", sa.Boolean),
        sa.Index("paypal_plans_by_product", "connection_id", "product_id"),
        metadata=metadata,
    )  # fmt: skip


def _invoices(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "paypal_invoices",
        sa.Column("invoice_number", sa.Text),
        sa.Column("status", sa.Text, comment="DRAFT, SCHEDULED, SENT, UNPAID, PAYMENT_PENDING, PARTIALLY_PAID, PAID, "
                  "MARKED_AS_PAID, PARTIALLY_REFUNDED, REFUNDED, MARKED_AS_REFUNDED or CANCELLED; CANCELLED (void) "
                  "is flagged deleted, and so is a deleted draft (its last status kept)."),
        sa.Column("reference", sa.Text, comment="The merchant's reference, such as a PO number."),
        sa.Column("currency", sa.Text),
        sa.Column("amount", sa.Numeric, comment="The invoice total."),
        sa.Column("due_amount", sa.Numeric, comment="What is left to pay."),
        sa.Column("paid_amount", sa.Numeric),
        sa.Column("refunded_amount", sa.Numeric),
        sa.Column("recipient_email", sa.Text, comment="The first recipient's billing email address."),
        sa.Column("recipient_name", sa.Text),
        sa.Column("recipient_business_name", sa.Text),
        sa.Column("invoice_date", sa.Date),
        sa.Column("due_date", sa.Date),
        sa.Column("term_type", sa.Text, comment="DUE_ON_RECEIPT, DUE_ON_DATE_SPECIFIED or NET_10 to NET_90."),
        sa.Column("payment_ids", pg.ARRAY(sa.Text), comment="The PayPal transactions (paypal_payments.transaction_id) "
                  "paying the invoice, when the read carried them."),
        sa.Column("first_sent_at", TZ),
        sa.Column("cancelled_at", TZ),
        sa.Column("archived", sa.Boolean, comment="Archived by the merchant (still listed)."),
        sa.Index("paypal_invoices_by_created", "connection_id", "created_at"),
        sa.Index("paypal_invoices_by_number", "connection_id", "invoice_number"),
        sa.Index("paypal_invoices_by_payment", "payment_ids", postgresql_using="gin"),
        metadata=metadata,
    )  # fmt: skip


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    for table in (_plans(metadata), _invoices(metadata)):
        create_entity_table(op.get_bind(), table, schema)


def downgrade(schema: str) -> None:
    for name in ("paypal_invoices", "paypal_plans"):
        op.drop_table(name, schema=schema)
