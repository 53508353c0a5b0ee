"""MYOB Business (AccountRight): invoices per company file; hard deletes found by an id sweep."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.myob.client import OAUTH, MyobApi, discover_tenants
from nextcrm_pipelines.providers.myob.records import INVOICES_TABLE, invoice_row

INVOICES = EntitySpec(
    name="myob_invoices",
    id_field="UID",
    partition_column="source_updated_at",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="MYOB invoices (every layout) created or changed in the day; invoices deleted in MYOB are flagged "
    "deleted by the daily id sweep.",
)

PROVIDER = Provider(
    name="myob",
    category="accounting",
    entities=(INVOICES,),
    fetchers={INVOICES.name: lambda api, window: api.invoices(window)},
    open_client=MyobApi,
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    id_sweeps={INVOICES.name: IdSweep(list_ids=lambda api: api.invoice_ids(), is_gone=MyobApi.invoice_gone)},
)

__all__ = ["INVOICES", "PROVIDER", "MyobApi"]
