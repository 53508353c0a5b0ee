"""PayPal: payments (Transaction Search rows), subscriptions, billing plans and invoices, per merchant app;
signed webhooks; orders, captures, refunds, plans and subscription changes through the outbox."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.paypal.actions import ACTIONS
from nextcrm_pipelines.providers.paypal.client import OAUTH, PayPalApi
from nextcrm_pipelines.providers.paypal.records import (
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    PLANS_TABLE,
    SUBSCRIPTIONS_TABLE,
    invoice_row,
    payment_key,
    payment_row,
    plan_row,
    subscription_row,
)
from nextcrm_pipelines.providers.paypal.webhooks import WEBHOOKS

PAYMENTS = EntitySpec(
    name="paypal_payments",
    table=PAYMENTS_TABLE,
    to_row=payment_row,
    description="PayPal transactions initiated in the day (Transaction Search, every event code), read as far as "
    "PayPal shows them; the day is read again until PayPal's three-hour lag has passed.",
    id_of=payment_key,
)
SUBSCRIPTIONS = EntitySpec(
    name="paypal_subscriptions",
    table=SUBSCRIPTIONS_TABLE,
    to_row=subscription_row,
    description="PayPal subscriptions with a transaction in the day, fetched by id with their plan; cancelled and "
    "expired ones flagged deleted.",
    partition_column="source_updated_at",
)
PLANS = EntitySpec(
    name="paypal_plans",
    table=PLANS_TABLE,
    to_row=plan_row,
    description="PayPal billing plans with their product and regular billing cycle (interval, price, currency); the "
    "whole list on every run (partitioned by connection only), inactive (archived) plans flagged deleted.",
    daily=False,
)
INVOICES = EntitySpec(
    name="paypal_invoices",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="PayPal invoices created in the day (Invoicing v2 search) with their recipient, dates and amounts, "
    "plus older invoices paid in it; cancelled invoices and deleted drafts flagged deleted.",
)

PROVIDER = Provider(
    name="paypal",
    category="payments",
    entities=(PAYMENTS, SUBSCRIPTIONS, PLANS, INVOICES),
    fetchers={
        PAYMENTS.name: lambda api, window: api.transactions(window),
        SUBSCRIPTIONS.name: lambda api, window: api.subscriptions(window),
        PLANS.name: lambda api, window: api.plans(window),
        INVOICES.name: lambda api, window: api.invoices(window),
    },
    open_client=PayPalApi,
    secret_fields=(
        SecretField("client_id", "PAYPAL_CLIENT_ID", "PayPal REST app client id"),
        SecretField("client_secret", "PAYPAL_CLIENT_SECRET", "PayPal REST app secret"),
    ),
    oauth=OAUTH,
    fixed_secrets={"grant_type": "client_credentials"},
    env_settings={"mode": ("PAYPAL_MODE", "sandbox")},
    webhooks=WEBHOOKS,
    id_sweeps={INVOICES.name: IdSweep(list_ids=lambda api: api.invoice_ids(), is_gone=PayPalApi.invoice_gone)},
    actions=ACTIONS,
)

__all__ = ["INVOICES", "PAYMENTS", "PLANS", "PROVIDER", "SUBSCRIPTIONS", "PayPalApi"]
