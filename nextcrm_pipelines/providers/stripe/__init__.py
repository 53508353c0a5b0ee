"""Stripe: payments (charges) and subscriptions, read with the official SDK."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_pipelines.providers.stripe.records import (
    PAYMENTS_TABLE,
    SUBSCRIPTIONS_TABLE,
    charge_row,
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

PROVIDER = Provider(
    name="stripe",
    category="payments",
    entities=(PAYMENTS, SUBSCRIPTIONS),
    fetchers={
        PAYMENTS.name: lambda api, window: api.charges(window),
        SUBSCRIPTIONS.name: lambda api, window: api.subscriptions(window),
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
)

__all__ = ["PAYMENTS", "PROVIDER", "SUBSCRIPTIONS", "StripeApi"]
