"""PayPal's mirror tables: `paypal_payments` (Transaction Search rows) and `paypal_subscriptions`."""

import sqlalchemy as sa

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
