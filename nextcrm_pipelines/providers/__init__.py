"""The provider registry: one name per provider, the name of its package.

A provider's package is imported when it is first asked for, so a process that syncs one provider
(a backfill's helper process) loads only that one; `PROVIDERS` imports them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nextcrm_pipelines.core.provider import Provider

PROVIDER_NAMES: tuple[str, ...] = ("stripe", "xero", "myob", "quickbooks", "paypal", "billionmail", "mautic")


def get_provider(name: str) -> Provider:
    """The provider called `name`, its package imported on first use."""
    if name not in PROVIDER_NAMES:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(PROVIDER_NAMES))}")
    return importlib.import_module(f"{__name__}.{name}").PROVIDER


def __getattr__(attribute: str) -> dict[str, Provider]:
    if attribute == "PROVIDERS":
        providers = {name: get_provider(name) for name in PROVIDER_NAMES}
        globals()["PROVIDERS"] = providers
        return providers
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
