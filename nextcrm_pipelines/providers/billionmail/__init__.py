"""BillionMail: campaigns (batch-mail tasks), contacts and contact groups of a self-hosted install."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.billionmail.actions import ACTIONS
from nextcrm_pipelines.providers.billionmail.client import BillionMailApi
from nextcrm_pipelines.providers.billionmail.records import (
    CAMPAIGNS_TABLE,
    CONTACTS_TABLE,
    GROUPS_TABLE,
    campaign_row,
    contact_row,
    group_row,
)

CAMPAIGNS = EntitySpec(
    name="billionmail_campaigns",
    table=CAMPAIGNS_TABLE,
    to_row=campaign_row,
    description="BillionMail campaigns with recipients, sends, deliveries, failures, opens and clicks; the whole list "
    "on every run (partitioned by connection only), campaigns deleted upstream flagged deleted.",
    daily=False,
    partition_column="source_updated_at",
)

CONTACTS = EntitySpec(
    name="billionmail_contacts",
    table=CONTACTS_TABLE,
    to_row=contact_row,
    description="BillionMail's subscriber list: each address once per subscription status (subscribed, "
    "unsubscribed) with its confirmation, the ids of its groups, attributes and tags; the whole list on every run "
    "(partitioned by connection only), entries gone upstream flagged deleted.",
    daily=False,
    partition_column="source_updated_at",
)

GROUPS = EntitySpec(
    name="billionmail_groups",
    table=GROUPS_TABLE,
    to_row=group_row,
    description="BillionMail contact groups with their counts of contacts, subscribed (recipients) and "
    "unsubscribed; the whole list on every run (partitioned by connection only), deleted groups flagged deleted.",
    daily=False,
    partition_column="source_updated_at",
)

PROVIDER = Provider(
    name="billionmail",
    category="marketing",
    entities=(CAMPAIGNS, CONTACTS, GROUPS),
    fetchers={
        CAMPAIGNS.name: lambda api, window: api.campaigns(window),
        CONTACTS.name: lambda api, window: api.contacts(window),
        GROUPS.name: lambda api, window: api.groups(window),
    },
    open_client=lambda ctx: BillionMailApi(ctx),
    secret_fields=(
        SecretField("username", "BILLIONMAIL_USERNAME", "BillionMail admin user name"),
        SecretField("password", "BILLIONMAIL_PASSWORD", "BillionMail admin password"),
        SecretField("api_key", "BILLIONMAIL_API_KEY", "BillionMail API key (optional)", optional=True),
    ),
    id_sweeps={
        CAMPAIGNS.name: IdSweep(list_ids=lambda api: api.campaign_ids(), is_gone=BillionMailApi.campaign_gone),
        CONTACTS.name: IdSweep(list_ids=lambda api: api.contact_ids(), is_gone=BillionMailApi.contact_gone),
        GROUPS.name: IdSweep(list_ids=lambda api: api.group_ids(), is_gone=BillionMailApi.group_gone),
    },
    env_settings={"safe_path": ("BILLIONMAIL_SAFE_PATH", "")},
    base_url_env="BILLIONMAIL_BASE_URL",
    actions=ACTIONS,
)

__all__ = ["CAMPAIGNS", "CONTACTS", "GROUPS", "PROVIDER", "BillionMailApi"]
