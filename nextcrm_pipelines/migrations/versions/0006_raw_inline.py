"""Entity tables keep rows up to a full page uncompressed, raw JSON included.

With the default TOAST target (about 2 kB per row), Postgres pglz-compresses almost every
provider record's raw JSON on each insert and decompresses it on each read of a field; for a
backfill that is the most expensive part of a write. Raising the target to a page keeps typical
records (1-8 kB) inline and uncompressed; larger ones are still compressed or moved out of line.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ENTITY_TABLES = (
    "stripe_payments", "stripe_subscriptions", "xero_invoices", "xero_contacts", "quickbooks_invoices",
    "myob_invoices", "paypal_payments", "paypal_subscriptions", "billionmail_campaigns", "mautic_campaigns",
)  # fmt: skip
# The largest target Postgres accepts: a row is TOASTed only past what fits one 8 kB page.
ROW_TARGET = 8160


def upgrade(schema: str) -> None:
    for name in ENTITY_TABLES:
        op.execute(f'ALTER TABLE "{schema}"."{name}" SET (toast_tuple_target = {ROW_TARGET})')


def downgrade(schema: str) -> None:
    for name in ENTITY_TABLES:
        op.execute(f'ALTER TABLE "{schema}"."{name}" RESET (toast_tuple_target)')
