"""PayPal: payments (Transaction Search rows) and subscriptions, per merchant app; signed webhooks."""

from nextcrm_pipelines.core.provider import Provider, SecretField
from nextcrm_pipelines.core.sync import EntitySpec
from nextcrm_pipelines.providers.paypal.client import OAUTH, PayPalApi
from nextcrm_pipelines.providers.paypal.records import (
    PAYMENTS_TABLE,
    SUBSCRIPTIONS_TABLE,
    payment_key,
    payment_row,
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

PROVIDER = Provider(
    name="paypal",
    category="payments",
    entities=(PAYMENTS, SUBSCRIPTIONS),
    fetchers={
        PAYMENTS.name: lambda api, window: api.transactions(window),
        SUBSCRIPTIONS.name: lambda api, window: api.subscriptions(window),
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
)

__all__ = ["PAYMENTS", "PROVIDER", "SUBSCRIPTIONS", "PayPalApi"]
