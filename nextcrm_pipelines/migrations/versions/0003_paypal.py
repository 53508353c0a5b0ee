"""Mirror tables of PayPal: payments (Transaction Search rows) and subscriptions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
_foundation = importlib.import_module("nextcrm_pipelines.migrations.versions.0001_foundation_and_stripe")
mirror_columns = _foundation.mirror_columns
_key = _foundation.key_columns


def upgrade(schema: str) -> None:
    op.create_table(
        "paypal_payments",
        *_key(schema),  # id: <transaction_id>:<event code> (a transaction id alone is not unique)
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
        *mirror_columns(),
        schema=schema,
    )
    op.create_index("paypal_payments_by_created", "paypal_payments", ["connection_id", "created_at"], schema=schema)
    op.create_index("paypal_payments_by_transaction", "paypal_payments", ["connection_id", "transaction_id"],
                    schema=schema)  # fmt: skip
    op.create_table(
        "paypal_subscriptions",
        *_key(schema),
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
        *mirror_columns(),
        schema=schema,
    )


def downgrade(schema: str) -> None:
    for name in ("paypal_subscriptions", "paypal_payments"):
        op.drop_table(name, schema=schema)
