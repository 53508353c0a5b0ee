"""BillionMail's mirror tables: `billionmail_campaigns` (batch-mail tasks with their delivery stats),
`billionmail_contacts` (the subscriber list, with the groups each entry is in) and `billionmail_groups`
(contact groups with their recipient counts)."""

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core.tables import TZ, entity_table

CAMPAIGNS = entity_table(
    "billionmail_campaigns",
    sa.Column("name", sa.Text),
    sa.Column("subject", sa.Text),
    sa.Column("sender", sa.Text),
    sa.Column("status", sa.Text,
              comment="pending, processing, done or paused; deleted once the id sweep finds the campaign gone."),
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
    deleted_status="deleted",
)  # fmt: skip

CONTACTS = entity_table(
    "billionmail_contacts",
    sa.Column("email", sa.Text),
    sa.Column("status", sa.Text, comment="subscribed or unsubscribed: the list BillionMail shows the entry in "
              "(an address can be subscribed to some groups and unsubscribed from others: one row each); deleted "
              "once the sweep finds the entry gone."),
    sa.Column("confirmed", sa.Boolean, comment="The address confirmed its subscription (double opt-in)."),
    sa.Column("group_id", sa.Text, comment="The group (billionmail_groups.id) of the membership BillionMail lists "
              "the entry under."),
    sa.Column("group_ids", pg.ARRAY(sa.Text), comment="Ids of every group (billionmail_groups.id) the address is in "
              "with this status; find a group's members with group_ids @> ARRAY['<id>']."),
    sa.Column("campaign_id", sa.Text, comment="The campaign (billionmail_campaigns.id) that added the address, "
              "if any."),
    sa.Column("attributes", pg.JSONB, comment="The contact's attributes (template variables), text by name."),
    sa.Column("tags", pg.ARRAY(sa.Text), comment="Names of the contact's tags (installs that have tags)."),
    sa.Column("last_active_at", TZ),
    sa.Index("billionmail_contacts_by_group", "group_ids", postgresql_using="gin"),
    deleted_status="deleted",
    id_comment="BillionMail's id of the membership row the entry is listed under: it changes when BillionMail "
    "re-creates the address's rows (an edit of its groups), and the old id is then flagged deleted.",
)  # fmt: skip

GROUPS = entity_table(
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
)  # fmt: skip
