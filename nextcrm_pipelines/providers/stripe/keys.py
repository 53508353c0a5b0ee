"""Checking a Stripe API key before it is stored (`nextcrm-pipelines connections add stripe`).

Connectors check a key by asking Stripe whose it is: `GET /v1/account`, which answers the account the key
belongs to (with `Stripe-Account`, the connected account a Connect platform acts on). A wrong or revoked key is
refused there with 401, a platform key that cannot act on the given connected account with 403. A restricted
key (`rk_...`) may lack read access to the account yet read everything a sync needs, so for it a 403 there is
settled by listing one charge instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import AuthenticationFailed, ProviderError, RetryPolicy
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.stripe.client import PROVIDER, StripeApi

# A key is checked while the user waits: a few quick attempts, not a sync's patience.
KEY_CHECK_RETRY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=2.0, budget_seconds=15.0)


def _refused(exc: ProviderError) -> AuthenticationFailed:
    """The refusal of a key being checked, in Stripe's words (keys are already redacted from them)."""
    reason = str(exc).partition(": ")[2] or "no reason given"
    return AuthenticationFailed(f"Stripe refused the API key: {reason}", provider=PROVIDER, endpoint=exc.endpoint,
                                status=exc.status)  # fmt: skip


def check_credentials(secrets: Mapping[str, str], *, base_url: str | None = None, tenant: str | None = None,
                      retry: RetryPolicy = KEY_CHECK_RETRY) -> str | None:  # fmt: skip
    """The id of the Stripe account the `api_key` in `secrets` reaches (with a Connect `tenant`, that account).

    A restricted key without read access to the account passes when it may list charges; its account is then
    not known (None). A refused key raises `AuthenticationFailed` with Stripe's reason and no key in it; a
    Stripe that cannot be reached raises its `ProviderError`: nothing could be checked.
    """
    connection = Connection(id="", provider=PROVIDER, display_name="", external_tenant=tenant, base_url=base_url)
    restricted = str(secrets.get("api_key", "")).startswith("rk_")
    with StripeApi(connection, Secrets(dict(secrets)), retry=retry) as api:
        try:
            return str(api.get("/v1/account", {})["id"])
        except AuthenticationFailed as exc:
            raise _refused(exc) from None
        except ProviderError as exc:
            if exc.status != 403:
                raise
            if not restricted:
                raise _refused(exc) from None
        try:
            api.get("/v1/charges", {"limit": 1})
        except ProviderError as exc:
            if exc.status in (401, 403):
                raise _refused(exc) from None
            raise
        return None
