"""Mirror tables: BillionMail contacts and contact groups.

`billionmail_contacts` holds the subscriber list, one row per address and subscription status (the
list BillionMail shows it in), with the ids of the groups it is in with that status (`group_ids`, a
text array with a GIN index: a group's members are `group_ids @> ARRAY['<id>']`) and its attributes
(`jsonb`); `billionmail_groups` holds each contact group with its counts of subscribed and
unsubscribed contacts.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import TZ, create_entity_table, entity_table

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def _contacts(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "billionmail_contacts",
        sa.Column("email", sa.Text),
        sa.Column("status", sa.Text, comment="subscribed or unsubscribed: the list BillionMail shows the entry in "
                  "(an address can be subscribed to some groups and unsubscribed from others: one row each); deleted "
                  "once the sweep finds the entry gone."),
        sa.Column("confirmed", sa.Boolean, comment="The address confirmed its subscription (double opt-in)."),
        sa.Column("group_id", sa.Text, comment="The group (billionmail_groups.id) of the membership BillionMail "
                  "lists the entry under."),
        sa.Column("group_ids", pg.ARRAY(sa.Text), comment="Ids of every group (billionmail_groups.id) the address is "
                  "in with this status; find a group's members with group_ids @> ARRAY['<id>']."),
        sa.Column("campaign_id", sa.Text, comment="The campaign (billionmail_campaigns.id) that added the address, "
                  "if any."),
        sa.Column("attributes", pg.JSONB, comment="The contact's attributes (template variables), text by name."),
        sa.Column("tags", pg.ARRAY(sa.Text), comment="Names of the contact's tags (installs that have tags)."),
        sa.Column("last_active_at", TZ),
        sa.Index("billionmail_contacts_by_group", "group_ids", postgresql_using="gin"),
        deleted_status="deleted",
        id_comment="BillionMail's id of the membership row the entry is listed under: it changes when BillionMail "
        "re-creates the address's rows (an edit of its groups), and the old id is then flagged deleted.",
        metadata=metadata,
    )  # fmt: skip


def _groups(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "billionmail_groups",
        sa.Column("name", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("double_optin", sa.Boolean),
        sa.Column("contact_count", sa.Integer, comment="Contacts in the group when it was read (subscribed + "
                  "unsubscribed)."),
        sa.Column("subscribed_count", sa.Integer, comment="Subscribed contacts in the group when it was read: its "
                  "recipients."),
        sa.Column("unsubscribed_count", sa.Integer),
        sa.Column("updated_at", TZ, comment="When the group's own settings last changed (its counts move without "
                  "it)."),
        metadata=metadata,
    )  # fmt: skip


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    for table in (_contacts(metadata), _groups(metadata)):
        create_entity_table(op.get_bind(), table, schema)


def downgrade(schema: str) -> None:
    for name in ("billionmail_groups", "billionmail_contacts"):
        op.drop_table(name, schema=schema)
