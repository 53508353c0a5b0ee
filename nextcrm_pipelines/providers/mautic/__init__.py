"""Mautic: campaigns, contacts and segments of a self-hosted install, over OAuth 2.0 (authorisation code or
client credentials)."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sweep import Drift, IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.mautic.actions import ACTIONS
from nextcrm_pipelines.providers.mautic.client import OAUTH, MauticApi, discover_tenants
from nextcrm_pipelines.providers.mautic.records import (
    CAMPAIGNS_TABLE,
    CONTACTS_TABLE,
    SEGMENTS_TABLE,
    campaign_row,
    contact_row,
    segment_row,
)
from nextcrm_pipelines.providers.mautic.webhooks import WEBHOOKS

CAMPAIGNS = EntitySpec(
    name="mautic_campaigns",
    table=CAMPAIGNS_TABLE,
    to_row=campaign_row,
    description="Mautic campaigns changed in the day (dateModified, or dateAdded while never modified), with "
    "category, published state and window, contact and event counts; deleted ones flagged by the daily id sweep.",
    partition_column="source_updated_at",
)

CONTACTS = EntitySpec(
    name="mautic_contacts",
    table=CONTACTS_TABLE,
    to_row=contact_row,
    description="Mautic contacts changed in the day (dateModified, or dateAdded while never modified), with "
    "name, email, phones, address, points, owner, tags and the ids of the segments they are in; deleted ones "
    "flagged by the mautic.lead_post_delete webhook and the daily id sweep.",
    partition_column="source_updated_at",
)

SEGMENTS = EntitySpec(
    name="mautic_segments",
    table=SEGMENTS_TABLE,
    to_row=segment_row,
    description="Mautic segments with published state, filters and their live member count: the whole list on every "
    "run (partitioned by connection only), since joining or leaving a segment changes its count without changing "
    "the segment; segments deleted upstream flagged deleted.",
    partition_column="source_updated_at",
    daily=False,
)

PROVIDER = Provider(
    name="mautic",
    category="marketing",
    entities=(CAMPAIGNS, CONTACTS, SEGMENTS),
    fetchers={
        CAMPAIGNS.name: lambda api, window: api.campaigns(window),
        CONTACTS.name: lambda api, window: api.contacts(window),
        SEGMENTS.name: lambda api, window: api.segments(),
    },
    open_client=MauticApi,
    # `connections add mautic` stores client credentials (machine to machine); `connect mautic` runs
    # the authorisation-code flow against MAUTIC_BASE_URL.
    secret_fields=(
        SecretField("client_id", "MAUTIC_CLIENT_ID", "Mautic API credentials: public key (client id)"),
        SecretField("client_secret", "MAUTIC_CLIENT_SECRET", "Mautic API credentials: secret key"),
    ),
    oauth=OAUTH,
    discover_tenants=discover_tenants,
    id_sweeps={
        CAMPAIGNS.name: IdSweep(list_ids=lambda api: api.campaign_ids(), is_gone=MauticApi.campaign_gone),
        # Joining or leaving a segment does not date the contact: the daily sweep compares every membership with
        # the stored segment_ids and reads the contacts that differ again.
        CONTACTS.name: IdSweep(
            list_ids=lambda api: api.contact_ids(),
            is_gone=MauticApi.contact_gone,
            drift=Drift(
                "segment_ids", list_values=lambda api: api.segment_memberships(), reread=MauticApi.contacts_read_again
            ),
        ),
        SEGMENTS.name: IdSweep(list_ids=lambda api: api.segment_ids(), is_gone=MauticApi.segment_gone),
    },
    fixed_secrets={"grant_type": "client_credentials"},
    base_url_env="MAUTIC_BASE_URL",
    webhooks=WEBHOOKS,
    actions=ACTIONS,
)

__all__ = ["CAMPAIGNS", "CONTACTS", "PROVIDER", "SEGMENTS", "MauticApi"]
