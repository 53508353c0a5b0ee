"""QuickBooks Online: invoices per company (realm), hard deletes through Change Data Capture."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.quickbooks.client import OAUTH, QuickBooksApi, discover_tenants
from nextcrm_pipelines.providers.quickbooks.records import INVOICES_TABLE, invoice_row
from nextcrm_pipelines.providers.quickbooks.webhooks import WEBHOOKS

INVOICES = EntitySpec(
    name="quickbooks_invoices",
    id_field="Id",
    partition_column="source_updated_at",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="QuickBooks invoices created or changed in the day; voided ones and (within 30 days) hard-deleted "
    "ones flagged deleted.",
)

PROVIDER = Provider(
    name="quickbooks",
    category="accounting",
    entities=(INVOICES,),
    fetchers={INVOICES.name: lambda api, window: api.invoices(window)},
    open_client=QuickBooksApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    webhooks=WEBHOOKS,
)

__all__ = ["INVOICES", "PROVIDER", "QuickBooksApi"]
