"""Stripe's mirror tables: `stripe_payments` (charges) and `stripe_subscriptions`."""

import sqlalchemy as sa

from nextcrm_pipelines.core.tables import TZ, entity_table

MAJOR_UNITS = "In major units of currency (Stripe sends minor units; JPY has none)."

PAYMENTS = entity_table(
    "stripe_payments",
    sa.Column("amount", sa.Numeric, nullable=False, comment=MAJOR_UNITS),
    sa.Column("amount_captured", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("amount_refunded", sa.Numeric, nullable=False, comment=MAJOR_UNITS),
    sa.Column("currency", sa.Text, nullable=False, comment="ISO 4217 code, lower case."),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("paid", sa.Boolean),
    sa.Column("captured", sa.Boolean),
    sa.Column("refunded", sa.Boolean, nullable=False),
    sa.Column("disputed", sa.Boolean),
    sa.Column("customer_id", sa.Text),
    sa.Column("payment_intent_id", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("receipt_email", sa.Text),
    sa.Column("failure_code", sa.Text),
    sa.Column("failure_message", sa.Text),
    sa.Column("livemode", sa.Boolean),
    sa.Index("stripe_payments_by_created", "connection_id", "created_at"),
)

SUBSCRIPTIONS = entity_table(
    "stripe_subscriptions",
    sa.Column("customer_id", sa.Text),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("currency", sa.Text),
    sa.Column("amount", sa.Numeric, comment="The items' unit amounts times their quantities, summed. " + MAJOR_UNITS),
    sa.Column("billing_interval", sa.Text),
    sa.Column("quantity", sa.Integer),
    sa.Column("current_period_start", TZ),
    sa.Column("current_period_end", TZ),
    sa.Column("cancel_at_period_end", sa.Boolean),
    sa.Column("canceled_at", TZ),
    sa.Column("ended_at", TZ),
    sa.Column("trial_end", TZ),
    sa.Column("livemode", sa.Boolean),
    sa.Index("stripe_subscriptions_by_created", "connection_id", "created_at"),
)
