"""QuickBooks Online: invoices, customers and payments per company (realm), hard deletes and merges through
Change Data Capture."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.quickbooks.actions import ACTIONS
from nextcrm_pipelines.providers.quickbooks.client import OAUTH, QuickBooksApi, discover_tenants
from nextcrm_pipelines.providers.quickbooks.records import (
    CUSTOMERS_TABLE,
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    customer_row,
    invoice_row,
    payment_row,
)
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

CUSTOMERS = EntitySpec(
    name="quickbooks_customers",
    id_field="Id",
    partition_column="source_updated_at",
    table=CUSTOMERS_TABLE,
    to_row=customer_row,
    description="QuickBooks customers created or changed in the day, inactive ones included and flagged deleted; "
    "(within 30 days) customers merged into another flagged deleted.",
)

PAYMENTS = EntitySpec(
    name="quickbooks_payments",
    id_field="Id",
    partition_column="source_updated_at",
    table=PAYMENTS_TABLE,
    to_row=payment_row,
    description="QuickBooks payments received, created or changed in the day, with the invoices they pay; voided "
    "ones and (within 30 days) hard-deleted ones flagged deleted.",
)

PROVIDER = Provider(
    name="quickbooks",
    category="accounting",
    entities=(INVOICES, CUSTOMERS, PAYMENTS),
    fetchers={
        INVOICES.name: lambda api, window: api.invoices(window),
        CUSTOMERS.name: lambda api, window: api.customers(window),
        PAYMENTS.name: lambda api, window: api.payments(window),
    },
    open_client=QuickBooksApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    webhooks=WEBHOOKS,
    actions=ACTIONS,
)

__all__ = ["CUSTOMERS", "INVOICES", "PAYMENTS", "PROVIDER", "QuickBooksApi"]
