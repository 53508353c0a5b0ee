"""PayPal's mirror tables: `paypal_payments` (Transaction Search rows), `paypal_subscriptions`, `paypal_plans`
(billing plans) and `paypal_invoices` (Invoicing v2)."""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import TZ, entity_table

PAYMENTS = entity_table(
    "paypal_payments",
    sa.Column("transaction_id", sa.Text, nullable=False),
    sa.Column("event_code", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("amount", sa.Numeric),
    sa.Column("fee", sa.Numeric),
    sa.Column("currency", sa.Text),
    sa.Column("payer_id", sa.Text),
    sa.Column("payer_email", sa.Text),
    sa.Column("payer_name", sa.Text),
    sa.Column("invoice_id", sa.Text),
    sa.Column("reference_id", sa.Text),
    sa.Column("reference_type", sa.Text),
    sa.Column("subscription_id", sa.Text),
    sa.Index("paypal_payments_by_created", "connection_id", "created_at"),
    sa.Index("paypal_payments_by_transaction", "connection_id", "transaction_id"),
    id_comment="<transaction_id>:<event code> (a transaction id alone is not unique).",
)

SUBSCRIPTIONS = entity_table(
    "paypal_subscriptions",
    sa.Column("plan_id", sa.Text),
    sa.Column("plan_name", sa.Text),
    sa.Column("status", sa.Text),
    sa.Column("subscriber_email", sa.Text),
    sa.Column("subscriber_payer_id", sa.Text),
    sa.Column("subscriber_name", sa.Text),
    sa.Column("quantity", sa.Integer),
    sa.Column("start_time", TZ),
    sa.Column("next_billing_time", TZ),
    sa.Column("last_payment_amount", sa.Numeric),
    sa.Column("currency", sa.Text),
    sa.Column("outstanding_balance", sa.Numeric),
    sa.Column("status_update_time", TZ),
)

PLANS = entity_table(
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
)  # fmt: skip

INVOICES = entity_table(
    "paypal_invoices",
    sa.Column("invoice_number", sa.Text),
    sa.Column("status", sa.Text, comment="DRAFT, SCHEDULED, SENT, UNPAID, PAYMENT_PENDING, PARTIALLY_PAID, PAID, "
              "MARKED_AS_PAID, PARTIALLY_REFUNDED, REFUNDED, MARKED_AS_REFUNDED or CANCELLED; CANCELLED (void) is "
              "flagged deleted, and so is a deleted draft (its last status kept)."),
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
)  # fmt: skip
