"""The outbox: actions NextCRM asks a provider to perform, each sent exactly once.

A caller inserts a row (connection, action, payload, optionally its own idempotency key); an apply
run claims due rows durably (`sending` under a claim number and a lease, committed before anything
is sent) and records the outcome: `succeeded` with the provider's object, `failed` (refused: a bad
payload or the provider's 4xx), `unknown` (the request may have reached the provider: retried under
the same key, or after looking the object up), `dead` after the last attempt, `cancelled` by a user.
The idempotency key is unique per connection, so a caller retrying its insert gets its first row.

`provider` is filled from the connection when the row is inserted; a row naming no connection is
stored `failed` at once, saying so, and nothing is ever sent for it.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
STATUSES = "('pending', 'sending', 'succeeded', 'failed', 'unknown', 'dead', 'cancelled')"


def upgrade(schema: str) -> None:
    op.execute(f'CREATE SEQUENCE "{schema}".outbox_claims AS bigint')
    op.create_table(
        "integration_outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("connection_id", sa.Text, nullable=False),
        sa.Column("provider", sa.Text),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("payload", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("idempotency_key", sa.Text, nullable=False, server_default=sa.text("gen_random_uuid()::text")),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("claim", sa.BigInteger),
        sa.Column("lease_until", TZ),
        sa.Column("generation", sa.BigInteger, nullable=False,
                  server_default=sa.text(f"nextval('\"{schema}\".outbox_claims')")),
        sa.Column("result", pg.JSONB),
        sa.Column("result_id", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("requested_by", sa.Text),
        sa.Column("run_id", sa.Text),
        sa.Column("created_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.Column("sent_at", TZ),
        sa.Column("completed_at", TZ),
        sa.CheckConstraint(f"status IN {STATUSES}", name="outbox_status_known"),
        sa.UniqueConstraint("connection_id", "idempotency_key", name="outbox_key_once_per_connection"),
        schema=schema,
    )  # fmt: skip
    op.create_index("outbox_due", "integration_outbox", ["provider", "id"], schema=schema,
                    postgresql_where=sa.text("status IN ('pending', 'sending', 'unknown')"))  # fmt: skip
    op.execute(f"""
        CREATE FUNCTION "{schema}".outbox_row_takes_its_provider() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            SELECT c.provider INTO NEW.provider FROM "{schema}".integration_connections c
             WHERE c.id = NEW.connection_id;
            IF NEW.provider IS NULL THEN
                NEW.status := 'failed';
                NEW.error := format('no connection %L: nothing was sent (see `nextcrm-pipelines connections list`)',
                                    NEW.connection_id);
                NEW.completed_at := now();
            END IF;
            RETURN NEW;
        END $$""")
    op.execute(f"""CREATE TRIGGER outbox_row_takes_its_provider BEFORE INSERT ON "{schema}".integration_outbox
                   FOR EACH ROW EXECUTE FUNCTION "{schema}".outbox_row_takes_its_provider()""")


def downgrade(schema: str) -> None:
    op.drop_table("integration_outbox", schema=schema)
    op.execute(f'DROP FUNCTION "{schema}".outbox_row_takes_its_provider()')
    op.execute(f'DROP SEQUENCE "{schema}".outbox_claims')
