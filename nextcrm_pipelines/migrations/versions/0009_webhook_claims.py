"""The inbox's claims are durable: an apply run marks the events it takes `applying`, under a lease.

Before this, a run's row locks were its claim, and they ended with the first commit, so a second
run could take the same events. Now a claim is a committed state: `claim` names the claim that holds
the row (from a sequence, so every claim is new), `lease_until` says when the claim lapses if its
run dies, and status changes are guarded by the claim they expect. `generation` moves on whenever an
event becomes due again (claimed, replayed, released), so the sensor's run key for a due batch
never repeats one that Dagster already ran.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

STATUSES = "('pending', 'applying', 'processed', 'failed', 'dead')"
OLD_STATUSES = "('pending', 'processed', 'failed', 'dead')"


def upgrade(schema: str) -> None:
    op.execute(f'CREATE SEQUENCE "{schema}".webhook_claims AS bigint')
    op.add_column("webhook_events", sa.Column("claim", sa.BigInteger), schema=schema)
    op.add_column("webhook_events", sa.Column("lease_until", sa.DateTime(timezone=True)), schema=schema)
    op.add_column(
        "webhook_events",
        sa.Column("generation", sa.BigInteger, nullable=False,
                  server_default=sa.text(f"nextval('\"{schema}\".webhook_claims')")),
        schema=schema,
    )  # fmt: skip
    op.drop_constraint("webhook_status_known", "webhook_events", schema=schema)
    op.create_check_constraint("webhook_status_known", "webhook_events", f"status IN {STATUSES}", schema=schema)
    op.drop_index("webhook_events_pending", "webhook_events", schema=schema)
    op.create_index("webhook_events_pending", "webhook_events", ["provider", "id"], schema=schema,
                    postgresql_where=sa.text("status IN ('pending', 'failed', 'applying')"))  # fmt: skip
    # A run renews and releases what its claim holds by the claim number.
    op.create_index("webhook_events_claimed", "webhook_events", ["claim"], schema=schema,
                    postgresql_where=sa.text("status = 'applying'"))  # fmt: skip


def downgrade(schema: str) -> None:
    op.execute(f"UPDATE \"{schema}\".webhook_events SET status = 'pending' WHERE status = 'applying'")
    op.drop_index("webhook_events_claimed", "webhook_events", schema=schema)
    op.drop_index("webhook_events_pending", "webhook_events", schema=schema)
    op.create_index("webhook_events_pending", "webhook_events", ["provider", "id"], schema=schema,
                    postgresql_where=sa.text("status IN ('pending', 'failed')"))  # fmt: skip
    op.drop_constraint("webhook_status_known", "webhook_events", schema=schema)
    op.create_check_constraint("webhook_status_known", "webhook_events", f"status IN {OLD_STATUSES}", schema=schema)
    for column in ("generation", "lease_until", "claim"):
        op.drop_column("webhook_events", column, schema=schema)
    op.execute(f'DROP SEQUENCE "{schema}".webhook_claims')
