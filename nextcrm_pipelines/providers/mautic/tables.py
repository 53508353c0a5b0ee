"""Mautic's mirror table: `mautic_campaigns`."""

import sqlalchemy as sa

from nextcrm_pipelines.core.tables import TZ, entity_table

CAMPAIGNS = entity_table(
    "mautic_campaigns",
    sa.Column("name", sa.Text),
    sa.Column("alias", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("category", sa.Text),
    sa.Column("published", sa.Boolean),
    sa.Column("publish_up", TZ),
    sa.Column("publish_down", TZ),
    sa.Column("contact_count", sa.Integer, comment="Contacts in the campaign when it was read."),
    sa.Column("event_count", sa.Integer),
    sa.Column("segment_count", sa.Integer),
    sa.Column("created_by", sa.Text),
    sa.Index("mautic_campaigns_by_updated", "connection_id", "source_updated_at"),
)
