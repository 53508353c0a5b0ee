"""The vault records which key secrets are encrypted under: one row, `vault_keys`.

`secrets rotate` writes the fingerprint of its new key there under an exclusive lock; every write of
secrets holds that row shared and seals under the recorded key, so a process still running with the
superseded key refuses to write instead of leaving rows that only the dropped key opens. The
fingerprint stays empty until the first rotation (every key is accepted until then).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade(schema: str) -> None:
    op.create_table(
        "vault_keys",
        sa.Column("only_row", sa.Boolean, primary_key=True, server_default=sa.true()),
        sa.Column("fingerprint", sa.Text),
        sa.Column("rotated_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("only_row", name="vault_keys_one_row"),
        schema=schema,
    )
    op.execute(f'INSERT INTO "{schema}".vault_keys (only_row) VALUES (true)')


def downgrade(schema: str) -> None:
    op.drop_table("vault_keys", schema=schema)
