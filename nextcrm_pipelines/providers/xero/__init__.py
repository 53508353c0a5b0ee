"""Xero: sales invoices and bills, and contacts, per organisation (tenant)."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.xero.client import OAUTH, XeroApi, discover_tenants
from nextcrm_pipelines.providers.xero.records import CONTACTS_TABLE, INVOICES_TABLE, contact_row, invoice_row
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

PROVIDER = Provider(
    name="xero",
    category="accounting",
    entities=(INVOICES, CONTACTS),
    fetchers={
        INVOICES.name: lambda api, window: api.invoices(window),
        CONTACTS.name: lambda api, window: api.contacts(window),
    },
    open_client=XeroApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    webhooks=WEBHOOKS,
)

__all__ = ["CONTACTS", "INVOICES", "PROVIDER", "XeroApi"]
