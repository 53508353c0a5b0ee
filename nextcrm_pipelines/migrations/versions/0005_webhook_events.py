"""The webhook inbox: verified provider events, stored before they are acknowledged.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade(schema: str) -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("connection_id", sa.Text, sa.ForeignKey(f"{schema}.integration_connections.id"), nullable=False),
        # The provider's event id, or a hash of the event where the provider gives none (Xero, Mautic).
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text),
        sa.Column("occurred_at", TZ),
        sa.Column("payload", pg.JSONB),
        # The exact bytes that were signed, and the headers needed to check them again.
        sa.Column("raw_body", sa.Text, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("received_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
        sa.Column("processed_at", TZ),
        # A failed event is retried from this time on (backoff); `dead` after the last attempt.
        sa.Column("next_attempt_at", TZ),
        sa.CheckConstraint("status IN ('pending', 'processed', 'failed', 'dead')", name="webhook_status_known"),
        sa.UniqueConstraint("provider", "connection_id", "event_id", name="webhook_event_once"),
        schema=schema,
    )
    op.create_index("webhook_events_pending", "webhook_events", ["provider", "id"], schema=schema,
                    postgresql_where=sa.text("status IN ('pending', 'failed')"))  # fmt: skip


def downgrade(schema: str) -> None:
    op.drop_table("webhook_events", schema=schema)
