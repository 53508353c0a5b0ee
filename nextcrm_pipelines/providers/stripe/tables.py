"""Stripe's mirror tables: `stripe_payments` (charges), `stripe_subscriptions`, `stripe_customers` and
`stripe_invoices`."""

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

CUSTOMERS = entity_table(
    "stripe_customers",
    sa.Column("name", sa.Text),
    sa.Column("email", sa.Text),
    sa.Column("phone", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("currency", sa.Text, comment="The currency the customer is billed in, lower case (null until set)."),
    sa.Column(
        "balance", sa.Numeric, comment="Credit (negative) or amount owed, added to the next invoice. " + MAJOR_UNITS
    ),
    sa.Column("delinquent", sa.Boolean),
    sa.Column("address_line1", sa.Text),
    sa.Column("address_line2", sa.Text),
    sa.Column("address_city", sa.Text),
    sa.Column("address_state", sa.Text),
    sa.Column("address_postal_code", sa.Text),
    sa.Column("address_country", sa.Text),
    sa.Column("tax_exempt", sa.Text),
    sa.Column("livemode", sa.Boolean),
    sa.Index("stripe_customers_by_created", "connection_id", "created_at"),
)

INVOICES = entity_table(
    "stripe_invoices",
    sa.Column("customer_id", sa.Text),
    sa.Column("subscription_id", sa.Text),
    sa.Column("number", sa.Text),
    sa.Column(
        "status",
        sa.Text,
        comment="draft, open, paid, uncollectible or void; void and uncollectible are "
        "flagged deleted, and so is a deleted draft (its last status kept).",
    ),
    sa.Column("currency", sa.Text, nullable=False, comment="ISO 4217 code, lower case."),
    sa.Column("subtotal", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("total", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("amount_due", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("amount_paid", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("amount_remaining", sa.Numeric, comment=MAJOR_UNITS),
    sa.Column("collection_method", sa.Text),
    sa.Column("billing_reason", sa.Text),
    sa.Column("customer_name", sa.Text),
    sa.Column("customer_email", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("attempt_count", sa.Integer),
    sa.Column("due_date", TZ),
    sa.Column("period_start", TZ),
    sa.Column("period_end", TZ),
    sa.Column("finalized_at", TZ),
    sa.Column("paid_at", TZ),
    sa.Column("voided_at", TZ),
    sa.Column("marked_uncollectible_at", TZ),
    sa.Column("hosted_invoice_url", sa.Text),
    sa.Column("livemode", sa.Boolean),
    sa.Index("stripe_invoices_by_created", "connection_id", "created_at"),
    sa.Index("stripe_invoices_by_customer", "connection_id", "customer_id"),
)
