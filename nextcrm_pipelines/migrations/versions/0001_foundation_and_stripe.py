"""Connection vault, sync logs and the Stripe mirror tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def mirror_columns() -> list[sa.Column]:
    """Columns every synced entity table carries besides its typed fields."""
    return [
        sa.Column("created_at", TZ),
        # The time the stored state was true at (provider updated time, event time or observation
        # time); the never-regress guard compares it.
        sa.Column("source_updated_at", TZ, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("raw", pg.JSONB, nullable=False),
        # A hash of the raw JSON (core/upsert.py): a re-sync skips unchanged records before they reach the table.
        sa.Column("raw_hash", sa.LargeBinary, nullable=False),
        sa.Column("synced_at", TZ, nullable=False, server_default=sa.func.now()),
    ]


def key_columns(schema: str) -> list[sa.Column]:
    """The key of every synced entity table: the connection and the provider's id."""
    return [
        sa.Column("connection_id", sa.Text, sa.ForeignKey(f"{schema}.integration_connections.id"), primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
    ]


def upgrade(schema: str) -> None:
    op.create_table(
        "integration_connections",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("external_tenant", sa.Text),
        sa.Column("base_url", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default="active"),
        sa.Column("sync_status", sa.Text, nullable=False, server_default="never_synced"),
        sa.Column("last_error", sa.Text),
        sa.Column("last_synced_at", TZ),
        sa.Column("settings", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("secrets_encrypted", sa.Text),
        sa.Column("token_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("token_expires_at", TZ),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("status IN ('active', 'needs_reauth', 'disabled')", name="connection_status_known"),
        sa.UniqueConstraint("provider", "display_name", name="connection_name_unique_per_provider"),
        schema=schema,
    )
    op.create_table(
        "integration_sync_logs",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("connection_id", sa.Text, sa.ForeignKey(f"{schema}.integration_connections.id"), nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("asset", sa.Text, nullable=False),
        sa.Column("partition", sa.Text),
        sa.Column("window_start", TZ),
        sa.Column("window_end", TZ),
        sa.Column("run_id", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("total_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("synced_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("inserted_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("unchanged_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed_records", sa.Integer, nullable=False, server_default="0"),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rate_limit_waits", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("started_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("completed_at", TZ),
        sa.Column("duration_seconds", sa.Numeric(12, 3)),
        sa.CheckConstraint("status IN ('running', 'success', 'failed', 'partial')", name="sync_log_status_known"),
        schema=schema,
    )
    op.create_index(
        "sync_logs_by_connection", "integration_sync_logs", ["connection_id", "asset", "started_at"], schema=schema
    )

    op.create_table(
        "stripe_payments",
        sa.Column("connection_id", sa.Text, sa.ForeignKey(f"{schema}.integration_connections.id"), primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("amount", sa.Numeric, nullable=False),
        sa.Column("amount_captured", sa.Numeric),
        sa.Column("amount_refunded", sa.Numeric, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
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
        *mirror_columns(),
        schema=schema,
    )
    op.create_table(
        "stripe_subscriptions",
        sa.Column("connection_id", sa.Text, sa.ForeignKey(f"{schema}.integration_connections.id"), primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("customer_id", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("currency", sa.Text),
        sa.Column("amount", sa.Numeric),
        sa.Column("billing_interval", sa.Text),
        sa.Column("quantity", sa.Integer),
        sa.Column("current_period_start", TZ),
        sa.Column("current_period_end", TZ),
        sa.Column("cancel_at_period_end", sa.Boolean),
        sa.Column("canceled_at", TZ),
        sa.Column("ended_at", TZ),
        sa.Column("trial_end", TZ),
        sa.Column("livemode", sa.Boolean),
        *mirror_columns(),
        schema=schema,
    )
    for name in ("stripe_payments", "stripe_subscriptions"):
        op.create_index(f"{name}_by_created", name, ["connection_id", "created_at"], schema=schema)


def downgrade(schema: str) -> None:
    for name in ("stripe_subscriptions", "stripe_payments", "integration_sync_logs", "integration_connections"):
        op.drop_table(name, schema=schema)
