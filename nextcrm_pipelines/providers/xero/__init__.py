"""Xero: sales invoices and bills, contacts and payments, per organisation (tenant)."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.xero.actions import ACTIONS
from nextcrm_pipelines.providers.xero.client import OAUTH, XeroApi, discover_tenants
from nextcrm_pipelines.providers.xero.records import (
    CONTACTS_TABLE,
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    contact_row,
    invoice_row,
    payment_row,
)
from nextcrm_pipelines.providers.xero.webhooks import WEBHOOKS

INVOICES = EntitySpec(
    name="xero_invoices",
    id_field="InvoiceID",
    partition_column="source_updated_at",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="Xero invoices (sales ACCREC and bills ACCPAY) created or changed in the day; voided and deleted "
    "ones flagged deleted.",
)
CONTACTS = EntitySpec(
    name="xero_contacts",
    id_field="ContactID",
    partition_column="source_updated_at",
    table=CONTACTS_TABLE,
    to_row=contact_row,
    description="Xero contacts created or changed in the day, archived ones included and flagged deleted.",
)
PAYMENTS = EntitySpec(
    name="xero_payments",
    id_field="PaymentID",
    partition_column="source_updated_at",
    table=PAYMENTS_TABLE,
    to_row=payment_row,
    description="Xero payments made or changed in the day, each with the invoice it pays; deleted ones flagged "
    "deleted. Xero sends no payment webhooks: a payment reaches the table with its day's sync.",
)

PROVIDER = Provider(
    name="xero",
    category="accounting",
    entities=(INVOICES, CONTACTS, PAYMENTS),
    fetchers={
        INVOICES.name: lambda api, window: api.invoices(window),
        CONTACTS.name: lambda api, window: api.contacts(window),
        PAYMENTS.name: lambda api, window: api.payments(window),
    },
    open_client=XeroApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    webhooks=WEBHOOKS,
    actions=ACTIONS,
)

__all__ = ["CONTACTS", "INVOICES", "PAYMENTS", "PROVIDER", "XeroApi"]
