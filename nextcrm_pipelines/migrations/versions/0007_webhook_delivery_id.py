"""The inbox keeps the id of the signed delivery an event came in, for providers that sign weakly.

PayPal signs `transmission_id|time|webhook_id|crc32(body)`: a CRC-32 can be matched by a different
body, so the receiver accepts one body per transmission id, and needs to find earlier deliveries of
that id quickly.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.add_column("webhook_events", sa.Column("delivery_id", sa.Text), schema=schema)
    op.create_index("webhook_events_delivery", "webhook_events", ["provider", "connection_id", "delivery_id"],
                    schema=schema, postgresql_where=sa.text("delivery_id IS NOT NULL"))  # fmt: skip


def downgrade(schema: str) -> None:
    op.drop_index("webhook_events_delivery", "webhook_events", schema=schema)
    op.drop_column("webhook_events", "delivery_id", schema=schema)
