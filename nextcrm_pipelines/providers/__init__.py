"""The provider registry: one line per provider."""

from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.providers import billionmail, mautic, myob, paypal, quickbooks, stripe, xero

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        stripe.PROVIDER,
        xero.PROVIDER,
        myob.PROVIDER,
        quickbooks.PROVIDER,
        paypal.PROVIDER,
        billionmail.PROVIDER,
        mautic.PROVIDER,
    )
}


def get_provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(PROVIDERS))}") from None
