"""Mirror tables: Mautic contacts, segments and segment membership.

`mautic_contacts` holds each contact with the ids of the segments it is in (`segment_ids`, a text
array with a GIN index: a contact's segments are on its row, a segment's members are
`segment_ids @> ARRAY['<id>']`); `mautic_segments` holds each segment with its member count.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import TZ, create_entity_table, entity_table

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def _contacts(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "mautic_contacts",
        sa.Column("first_name", sa.Text),
        sa.Column("last_name", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("mobile", sa.Text),
        sa.Column("company", sa.Text),
        sa.Column("position", sa.Text),
        sa.Column("address1", sa.Text),
        sa.Column("address2", sa.Text),
        sa.Column("city", sa.Text),
        sa.Column("state", sa.Text),
        sa.Column("zipcode", sa.Text),
        sa.Column("country", sa.Text),
        sa.Column("points", sa.Integer),
        sa.Column("owner_id", sa.Text, comment="The Mautic user who owns the contact."),
        sa.Column("identified_at", TZ, comment="When the contact was first identified (null: an anonymous visitor)."),
        sa.Column("last_active_at", TZ),
        sa.Column("tags", pg.ARRAY(sa.Text)),
        sa.Column("do_not_contact", pg.ARRAY(sa.Text), comment="Channels the contact may not be contacted on."),
        sa.Column("segment_ids", pg.ARRAY(sa.Text), comment="Ids of the segments (mautic_segments.id) the contact is "
                  "in when it was read; find a segment's members with segment_ids @> ARRAY['<id>']."),
        sa.Index("mautic_contacts_by_updated", "connection_id", "source_updated_at"),
        sa.Index("mautic_contacts_by_segment", "segment_ids", postgresql_using="gin"),
        metadata=metadata,
    )  # fmt: skip


def _segments(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "mautic_segments",
        sa.Column("name", sa.Text),
        sa.Column("public_name", sa.Text),
        sa.Column("alias", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("category", sa.Text),
        sa.Column("published", sa.Boolean),
        sa.Column("is_global", sa.Boolean),
        sa.Column("is_preference_center", sa.Boolean),
        sa.Column("member_count", sa.Integer, comment="Contacts in the segment when it was read."),
        sa.Column("filter_count", sa.Integer),
        sa.Column("created_by", sa.Text),
        sa.Index("mautic_segments_by_updated", "connection_id", "source_updated_at"),
        metadata=metadata,
    )


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    for table in (_contacts(metadata), _segments(metadata)):
        create_entity_table(op.get_bind(), table, schema)


def downgrade(schema: str) -> None:
    for name in ("mautic_segments", "mautic_contacts"):
        op.drop_table(name, schema=schema)
