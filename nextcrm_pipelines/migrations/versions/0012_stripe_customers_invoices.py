"""Mirror tables: Stripe customers and invoices.

`stripe_customers` holds every customer (a deleted one keeps its last data, flagged `deleted`);
`stripe_invoices` every invoice with its customer and subscription, amounts in major units (void
and uncollectible invoices, and deleted drafts, are flagged `deleted`). Both are entity tables
created with their connection checks (`core.tables.create_entity_table`); the shared columns carry
the comments every entity table has, and a few provider columns say what they mean.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from nextcrm_pipelines.core.tables import create_entity_table, entity_table

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
_MAJOR = "In major units of currency (Stripe sends minor units; JPY has none)."
_CURRENCY = "ISO 4217 code, lower case."


def _customers(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "stripe_customers",
        sa.Column("name", sa.Text),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("currency", sa.Text, comment="The currency the customer is billed in, lower case (null until set)."),
        sa.Column("balance", sa.Numeric,
                  comment="Credit (negative) or amount owed, added to the next invoice. " + _MAJOR),
        sa.Column("delinquent", sa.Boolean),
        sa.Column("address_line1", sa.Text),
        sa.Column("address_line2", sa.Text),
        sa.Column("address_city", sa.Text),
        sa.Column("address_state", sa.Text),
        sa.Column("address_postal_code", sa.Text),
        sa.Column("address_country", sa.Text),
        sa.Column("tax_exempt", sa.Text),
        sa.Column("livemode", sa.Boolean),
        sa.Index("stripe_customers_by_created", "connection_id", "created_at"),
        metadata=metadata,
    )  # fmt: skip


def _invoices(metadata: sa.MetaData) -> sa.Table:
    return entity_table(
        "stripe_invoices",
        sa.Column("customer_id", sa.Text),
        sa.Column("subscription_id", sa.Text),
        sa.Column("number", sa.Text),
        sa.Column("status", sa.Text, comment="draft, open, paid, uncollectible or void; void and uncollectible are "
                  "flagged deleted, and so is a deleted draft (its last status kept)."),
        sa.Column("currency", sa.Text, nullable=False, comment=_CURRENCY),
        sa.Column("subtotal", sa.Numeric, comment=_MAJOR),
        sa.Column("total", sa.Numeric, comment=_MAJOR),
        sa.Column("amount_due", sa.Numeric, comment=_MAJOR),
        sa.Column("amount_paid", sa.Numeric, comment=_MAJOR),
        sa.Column("amount_remaining", sa.Numeric, comment=_MAJOR),
        sa.Column("collection_method", sa.Text),
        sa.Column("billing_reason", sa.Text),
        sa.Column("customer_name", sa.Text),
        sa.Column("customer_email", sa.Text),
        sa.Column("description", sa.Text),
        sa.Column("attempt_count", sa.Integer),
        sa.Column("due_date", TZ),
        sa.Column("period_start", TZ),
        sa.Column("period_end", TZ),
        sa.Column("finalized_at", TZ),
        sa.Column("paid_at", TZ),
        sa.Column("voided_at", TZ),
        sa.Column("marked_uncollectible_at", TZ),
        sa.Column("hosted_invoice_url", sa.Text),
        sa.Column("livemode", sa.Boolean),
        sa.Index("stripe_invoices_by_created", "connection_id", "created_at"),
        sa.Index("stripe_invoices_by_customer", "connection_id", "customer_id"),
        metadata=metadata,
    )  # fmt: skip


def upgrade(schema: str) -> None:
    metadata = sa.MetaData()
    for table in (_customers(metadata), _invoices(metadata)):
        create_entity_table(op.get_bind(), table, schema)


def downgrade(schema: str) -> None:
    for name in ("stripe_invoices", "stripe_customers"):
        op.drop_table(name, schema=schema)
