"""Stripe: payments (charges), subscriptions, customers and invoices, read with the official SDK."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.stripe.actions import ACTIONS
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_pipelines.providers.stripe.keys import check_credentials
from nextcrm_pipelines.providers.stripe.records import (
    CUSTOMERS_TABLE,
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    SUBSCRIPTIONS_TABLE,
    charge_row,
    customer_row,
    invoice_row,
    subscription_row,
)
from nextcrm_pipelines.providers.stripe.webhooks import WEBHOOKS

PAYMENTS = EntitySpec(
    name="stripe_payments",
    table=PAYMENTS_TABLE,
    to_row=charge_row,
    description="Stripe charges created or changed in the day (refunds and failures included).",
)
SUBSCRIPTIONS = EntitySpec(
    name="stripe_subscriptions",
    table=SUBSCRIPTIONS_TABLE,
    to_row=subscription_row,
    description="Stripe subscriptions created or changed in the day, in every status (canceled included).",
)
CUSTOMERS = EntitySpec(
    name="stripe_customers",
    table=CUSTOMERS_TABLE,
    to_row=customer_row,
    description="Stripe customers created or changed in the day (deleted ones flagged, their last data kept).",
)
INVOICES = EntitySpec(
    name="stripe_invoices",
    table=INVOICES_TABLE,
    to_row=invoice_row,
    description="Stripe invoices created or changed in the day, in every status (void, uncollectible and "
    "deleted drafts flagged).",
)

PROVIDER = Provider(
    name="stripe",
    category="payments",
    entities=(PAYMENTS, SUBSCRIPTIONS, CUSTOMERS, INVOICES),
    fetchers={
        PAYMENTS.name: lambda api, window: api.charges(window),
        SUBSCRIPTIONS.name: lambda api, window: api.subscriptions(window),
        CUSTOMERS.name: lambda api, window: api.customers(window),
        INVOICES.name: lambda api, window: api.invoices(window),
    },
    open_client=lambda ctx: StripeApi(ctx.connection, ctx.secrets, stats=ctx.stats, rate_share=ctx.rate_share),
    secret_fields=(
        SecretField("api_key", "STRIPE_SECRET_KEY", "Stripe secret or restricted key (sk_... / rk_...)"),
        SecretField(
            "webhook_secret", "STRIPE_WEBHOOK_SECRET", "Stripe webhook signing secret (whsec_...)", optional=True
        ),
    ),
    webhooks=WEBHOOKS,
    parallel_windows=True,
    actions=ACTIONS,
    check_credentials=check_credentials,
)

__all__ = ["CUSTOMERS", "INVOICES", "PAYMENTS", "PROVIDER", "SUBSCRIPTIONS", "StripeApi"]
