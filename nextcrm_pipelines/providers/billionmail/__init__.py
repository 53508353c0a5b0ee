"""BillionMail: campaigns (batch-mail tasks) of a self-hosted install."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.billionmail.client import BillionMailApi
from nextcrm_pipelines.providers.billionmail.records import CAMPAIGNS_TABLE, campaign_row

CAMPAIGNS = EntitySpec(
    name="billionmail_campaigns",
    table=CAMPAIGNS_TABLE,
    to_row=campaign_row,
    description="BillionMail campaigns with recipients, sends, deliveries, failures, opens and clicks; the whole list "
    "on every run (partitioned by connection only), campaigns deleted upstream flagged deleted.",
    daily=False,
    partition_column="source_updated_at",
)

PROVIDER = Provider(
    name="billionmail",
    category="marketing",
    entities=(CAMPAIGNS,),
    fetchers={CAMPAIGNS.name: lambda api, window: api.campaigns(window)},
    open_client=lambda ctx: BillionMailApi(ctx),
    secret_fields=(
        SecretField("username", "BILLIONMAIL_USERNAME", "BillionMail admin user name"),
        SecretField("password", "BILLIONMAIL_PASSWORD", "BillionMail admin password"),
        SecretField("api_key", "BILLIONMAIL_API_KEY", "BillionMail API key (optional)", optional=True),
    ),
    id_sweeps={CAMPAIGNS.name: IdSweep(list_ids=lambda api: api.campaign_ids(), is_gone=BillionMailApi.campaign_gone)},
    env_settings={"safe_path": ("BILLIONMAIL_SAFE_PATH", "")},
    base_url_env="BILLIONMAIL_BASE_URL",
)

__all__ = ["CAMPAIGNS", "PROVIDER", "BillionMailApi"]
