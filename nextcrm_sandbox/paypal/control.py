"""``PayPalControl``: typed calls to the PayPal sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping
from typing import Any

from nextcrm_sandbox.paypal.model import CONTROL_PREFIX
from nextcrm_sandbox.webhooks import WebhookControl


class PayPalControl(WebhookControl):
    """Typed calls to the PayPal control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def add_account(self, client_id: str, client_secret: str, **spec: Any) -> dict[str, Any]:
        """Create a merchant app: seed, transactions, subscriptions, plans, invoices, days, currencies, id and knobs."""
        return self._call("POST", "/accounts", json={"client_id": client_id, "client_secret": client_secret, **spec})

    def accounts(self) -> list[dict[str, Any]]:
        """Summaries of every account."""
        return self._call("GET", "/accounts")

    def account(self, account_id: str) -> dict[str, Any]:
        """One account's summary (counts, knobs, app id)."""
        return self._call("GET", f"/accounts/{account_id}")

    def changes(self, account_id: str, **counts: int) -> dict[str, list[str]]:
        """Apply transactions, refunds, subscription_updates, cancels, plan_updates, invoices (new, sent),
        invoice_payments (open invoices paid through PayPal) and invoice_cancels now."""
        return self._call("POST", f"/accounts/{account_id}/changes", json=counts)

    def add_record(
        self, account_id: str, entity: str, fields: Mapping[str, Any] | None = None, at: int | None = None
    ) -> dict[str, Any]:
        """Create a transaction, subscription, plan or invoice (at ``at``) and return it as the API would."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if at is not None:
            body["at"] = at
        return self._call("POST", f"/accounts/{account_id}/records", json=body)

    def bulk(self, account_id: str, day: str, count: int) -> dict[str, Any]:
        """``count`` transactions spread over the UTC day ``YYYY-MM-DD``."""
        return self._call("POST", f"/accounts/{account_id}/bulk", json={"day": day, "count": count})

    def set_knobs(self, account_id: str, **knobs: Any) -> dict[str, Any]:
        """Change knobs of a running account (all but ``date_style``)."""
        return self._call("PATCH", f"/accounts/{account_id}/knobs", json=knobs)

    def expire_tokens(self, account_id: str) -> dict[str, Any]:
        """Expire every access token of the account's app now."""
        return self._call("POST", f"/accounts/{account_id}/expire-tokens")

    def export(self, account_id: str, entity: str, visible: bool = False) -> dict[str, Any]:
        """``{"records", "deleted_ids"}`` for transactions, subscriptions, plans or invoices."""
        params = {"visible": "true"} if visible else None
        return self._call("GET", f"/accounts/{account_id}/export/{entity}", params=params)

    def set_faults(self, account: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject server_errors, rate_limited, latency_ms, token_errors, data_unavailable (one account or all)."""
        return self._set_faults("account", account, faults)

    def clear_faults(self, account: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one account, or all)."""
        return self._clear_faults("account", account)

    def stats(self) -> dict[str, Any]:
        """Request counts per route and status, per account, and the OAuth statistics."""
        return self._call("GET", "/stats")

    def oauth_state(self) -> dict[str, Any]:
        """Token calls per grant type and the grants."""
        return self._call("GET", "/oauth")

    def subscribe_webhooks(self, account_id: str, url: str, webhook_id: str | None = None,
                           **options: Any) -> dict[str, Any]:  # fmt: skip
        """Deliver the account's events to ``url`` for ``webhook_id`` (assigned when None); options:
        ``event_types``, ``retry_delays``, ``hold``, ``duplicate_rate``, ``cert``. Returns ``{"id", "account",
        "url", "webhook_id"}`` (``id`` names the subscription in the hold/release/flush calls)."""
        webhook_id = webhook_id or "WH" + uuid.uuid4().hex[:15].upper()
        body = {"account": account_id, "url": url, "webhook_id": webhook_id, **options}
        return {**self._call("POST", "/webhooks", json=body), "webhook_id": webhook_id}

    def webhook_ca(self) -> str:
        """The sandbox CA's PEM: a sandbox connection's ``webhook_ca_pem`` setting."""
        return self._call("GET", "/webhook-ca")["pem"]

    def mint_webhook_cert(self, kind: str) -> dict[str, str]:
        """Publish a certificate of ``kind`` (``valid``, ``expired``, ``untrusted``, ``wrong_cn``).

        Returns ``{"name", "kind", "cert_url"}``."""
        return self._call("POST", "/webhook-certs", json={"kind": kind})

    def sign_webhook(self, body: bytes, webhook_id: str, cert: str | None = None,
                     at: int | None = None) -> dict[str, str]:  # fmt: skip
        """The PAYPAL-* headers a delivery of ``body`` would carry (signed now, or at ``at``)."""
        payload: dict[str, Any] = {"body_base64": base64.b64encode(body).decode(), "webhook_id": webhook_id}
        if cert is not None:
            payload["cert"] = cert
        if at is not None:
            payload["at"] = at
        return self._call("POST", "/webhook-signatures", json=payload)["headers"]
