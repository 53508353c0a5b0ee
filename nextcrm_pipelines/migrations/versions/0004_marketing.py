"""Mirror tables of the marketing providers: BillionMail and Mautic campaigns.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
_foundation = importlib.import_module("nextcrm_pipelines.migrations.versions.0001_foundation_and_stripe")
mirror_columns = _foundation.mirror_columns
_key = _foundation.key_columns


def upgrade(schema: str) -> None:
    op.create_table(
        "billionmail_campaigns",
        *_key(schema),
        sa.Column("name", sa.Text),
        sa.Column("subject", sa.Text),
        sa.Column("sender", sa.Text),
        sa.Column("status", sa.Text),  # pending, processing, done, paused; deleted once swept
        sa.Column("paused", sa.Boolean),
        sa.Column("scheduled_at", TZ),
        sa.Column("recipients", sa.Integer),
        sa.Column("sent", sa.Integer),
        sa.Column("delivered", sa.Integer),
        sa.Column("failed", sa.Integer),
        sa.Column("opened", sa.Integer),
        sa.Column("clicked", sa.Integer),
        sa.Column("progress", sa.Integer),
        sa.Column("template_name", sa.Text),
        *mirror_columns(),
        schema=schema,
    )
    op.create_table(
        "mautic_campaigns",
        *_key(schema),
        sa.Column("name", sa.Text),
        sa.Column("alias", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("category", sa.Text),
        sa.Column("published", sa.Boolean),
        sa.Column("publish_up", TZ),
        sa.Column("publish_down", TZ),
        sa.Column("contact_count", sa.Integer),
        sa.Column("event_count", sa.Integer),
        sa.Column("segment_count", sa.Integer),
        sa.Column("created_by", sa.Text),
        *mirror_columns(),
        schema=schema,
    )
    op.create_index("mautic_campaigns_by_updated", "mautic_campaigns", ["connection_id", "source_updated_at"],
                    schema=schema)  # fmt: skip


def downgrade(schema: str) -> None:
    for name in ("mautic_campaigns", "billionmail_campaigns"):
        op.drop_table(name, schema=schema)
