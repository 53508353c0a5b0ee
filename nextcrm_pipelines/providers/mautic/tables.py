"""Mautic's mirror tables: `mautic_campaigns`, `mautic_contacts` (with their segment ids) and `mautic_segments`."""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

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

CONTACTS = entity_table(
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
)  # fmt: skip

SEGMENTS = entity_table(
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
)
