"""``StripeControl``: typed calls to the Stripe sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nextcrm_sandbox.webhooks import WebhookControl


class StripeControl(WebhookControl):
    """Typed calls to the Stripe webhook control API of a running ``SandboxServer``."""

    prefix = "/_sandbox/stripe"

    def subscribe_webhooks(self, api_key: str, url: str, secret: str | Sequence[str], **options: Any) -> dict[str, Any]:
        """Deliver the account's new events to ``url`` signed with ``secret``; options: ``enabled_events``,
        ``retry_delays``, ``hold``, ``duplicate_rate``, ``timestamp_offset``. Returns ``{"id", "account", "url"}``."""
        signing = secret if isinstance(secret, str) else list(secret)
        return self._call("POST", "/webhooks", json={"api_key": api_key, "url": url, "secret": signing, **options})
