"""MYOB Business (AccountRight): invoices (with their lines), customers and customer payments per company file;
hard deletes found by an id sweep; customer cards and service invoices created through the outbox (`actions`)."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.myob.actions import ACTIONS
from nextcrm_pipelines.providers.myob.client import OAUTH, MyobApi, discover_tenants
from nextcrm_pipelines.providers.myob.records import (
    CUSTOMER_PAYMENTS_TABLE,
    CUSTOMERS_TABLE,
    INVOICES_TABLE,
    customer_row,
    invoice_row,
    payment_row,
)

INVOICES = EntitySpec(
    name="myob_invoices",
    id_field="UID",
    partition_column="source_updated_at",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="MYOB invoices (every layout, with their lines) created or changed in the day; invoices deleted in "
    "MYOB are flagged deleted by the daily id sweep.",
)

CUSTOMERS = EntitySpec(
    name="myob_customers",
    id_field="UID",
    partition_column="source_updated_at",
    table=CUSTOMERS_TABLE,
    to_row=customer_row,
    description="MYOB customer cards created or changed in the day, inactive ones included and flagged deleted; "
    "cards deleted in MYOB are flagged deleted by the daily id sweep.",
)

CUSTOMER_PAYMENTS = EntitySpec(
    name="myob_customer_payments",
    id_field="UID",
    partition_column="source_updated_at",
    table=CUSTOMER_PAYMENTS_TABLE,
    to_row=payment_row,
    description="MYOB customer payments recorded or changed in the day, with the invoices they pay; payments "
    "deleted in MYOB are flagged deleted by the daily id sweep.",
)

PROVIDER = Provider(
    name="myob",
    category="accounting",
    entities=(INVOICES, CUSTOMERS, CUSTOMER_PAYMENTS),
    fetchers={
        INVOICES.name: lambda api, window: api.invoices(window),
        CUSTOMERS.name: lambda api, window: api.customers(window),
        CUSTOMER_PAYMENTS.name: lambda api, window: api.customer_payments(window),
    },
    open_client=MyobApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    id_sweeps={
        INVOICES.name: IdSweep(list_ids=lambda api: api.invoice_ids(), is_gone=MyobApi.invoice_gone),
        CUSTOMERS.name: IdSweep(list_ids=lambda api: api.customer_ids(), is_gone=MyobApi.customer_gone),
        CUSTOMER_PAYMENTS.name: IdSweep(list_ids=lambda api: api.payment_ids(), is_gone=MyobApi.payment_gone),
    },
    actions=ACTIONS,
)

__all__ = ["CUSTOMERS", "CUSTOMER_PAYMENTS", "INVOICES", "PROVIDER", "MyobApi"]
