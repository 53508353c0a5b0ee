"""BillionMail's mirror table: `billionmail_campaigns` (batch-mail tasks with their delivery stats)."""

import sqlalchemy as sa

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
