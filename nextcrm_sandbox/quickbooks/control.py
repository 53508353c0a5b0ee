"""``QuickBooksControl``: typed calls to the QuickBooks sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nextcrm_sandbox.quickbooks.model import CONTROL_PREFIX, SCOPE_ACCOUNTING
from nextcrm_sandbox.webhooks import WebhookControl


class QuickBooksControl(WebhookControl):
    """Typed calls to the QuickBooks control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: Iterable[str] = (),
        environment: str | None = None,
    ) -> dict[str, Any]:
        """Register an app (``environment`` pins it to sandbox or production companies)."""
        body: dict[str, Any] = {"client_id": client_id, "client_secret": client_secret}
        body["redirect_uris"] = list(redirect_uris)
        if environment is not None:
            body["environment"] = environment
        return self._call("POST", "/clients", json=body)

    def add_tenant(self, client_id: str, **spec: Any) -> dict[str, Any]:
        """Create a company for an app; ``spec`` takes seed, invoices, customers, days and the knobs."""
        return self._call("POST", "/tenants", json={"client_id": client_id, **spec})

    def tenants(self) -> list[dict[str, Any]]:
        """Summaries of every company."""
        return self._call("GET", "/tenants")

    def grant(self, client_id: str, realm_id: str | None = None, scope: str = SCOPE_ACCOUNTING) -> dict[str, Any]:
        """Consent without the browser: ``{"grant_id", "token": {access_token, refresh_token, ...}}``."""
        subject = {"realm_id": realm_id} if realm_id else {}
        return self._call("POST", "/oauth/grants", json={"client_id": client_id, "scope": scope, "subject": subject})

    def revoke_grant(self, grant_id: str) -> dict[str, Any]:
        """The user disconnected the app."""
        return self._call("POST", f"/oauth/grants/{grant_id}/revoke")

    def expire_access(self, grant_id: str) -> dict[str, Any]:
        """Expire the grant's access tokens now."""
        return self._call("POST", f"/oauth/grants/{grant_id}/expire-access")

    def oauth_state(self) -> dict[str, Any]:
        """Token-call statistics and grants."""
        return self._call("GET", "/oauth")

    def changes(self, tenant: str, **counts: int) -> dict[str, list[str]]:
        """Apply edits, voids, deletes, creates, archives (and customer_edits, customer_creates, customer_merges,
        payment_voids, payment_deletes) now."""
        return self._call("POST", f"/tenants/{tenant}/changes", json=counts)

    def add_record(
        self,
        tenant: str,
        entity: str,
        fields: Mapping[str, Any] | None = None,
        updated_at: float | None = None,
    ) -> dict[str, Any]:
        """Create an invoice, customer or payment (at ``updated_at``) and return it as the API would."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant}/records", json=body)

    def update_record(
        self,
        tenant: str,
        record_id: str,
        fields: Mapping[str, Any] | None = None,
        updated_at: float | None = None,
        entity: str | None = None,
    ) -> dict[str, Any]:
        """Change a record (at ``updated_at``) and return it as the API would."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        if entity is not None:
            body["entity"] = entity
        return self._call("PATCH", f"/tenants/{tenant}/records/{record_id}", json=body)

    def export(self, tenant: str, entity: str) -> dict[str, Any]:
        """``{"records": [...], "deleted_ids": [...]}`` for ``invoice``, ``customer`` or ``payment``."""
        return self._call("GET", f"/tenants/{tenant}/export/{entity}")

    def void_invoice(self, tenant: str, invoice_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Void one invoice (at ``updated_at``); returns it as the API now shows it."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/invoices/{invoice_id}/void", json=body)

    def delete_invoice(self, tenant: str, invoice_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Hard-delete one invoice (at ``updated_at``)."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/invoices/{invoice_id}/delete", json=body)

    def merge_invoices(self, tenant: str, source: str, into: str, updated_at: float | None = None) -> dict[str, Any]:
        """Merge invoice ``source`` into ``into``: ``{"merged": <into as the API shows it>, "deleted_id": source}``."""
        body: dict[str, Any] = {"from": source, "into": into}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant}/invoices/merge", json=body)

    def merge_customers(self, tenant: str, source: str, into: str, updated_at: float | None = None) -> dict[str, Any]:
        """Merge customer ``source`` into ``into``: ``{"merged": <into as the API shows it>, "deleted_id": source}``."""
        body: dict[str, Any] = {"from": source, "into": into}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant}/customers/merge", json=body)

    def void_payment(self, tenant: str, payment_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Void one payment (at ``updated_at``): the invoices it paid are owed again; returns it as the API shows it."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/payments/{payment_id}/void", json=body)

    def delete_payment(self, tenant: str, payment_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Hard-delete one payment (at ``updated_at``): the invoices it paid are owed again."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/payments/{payment_id}/delete", json=body)

    def subscribe_webhooks(
        self,
        url: str,
        verifier_token: str,
        *,
        app: str | None = None,
        realm: str | None = None,
        format: str = "legacy",
        hold: bool = False,
        duplicate_rate: float = 0.0,
        retry_delays: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Deliver the events of an app's realms (or of one realm) to ``url``: ``{"id", "account", "url"}``."""
        body: dict[str, Any] = {"url": url, "verifier_token": verifier_token, "format": format, "hold": hold,
                                "duplicate_rate": duplicate_rate}  # fmt: skip
        body.update({k: v for k, v in (("app", app), ("realm", realm)) if v is not None})
        if retry_delays is not None:
            body["retry_delays"] = list(retry_delays)
        return self._call("POST", "/webhooks", json=body)

    def set_faults(self, tenant: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject server_errors, rate_limited, day_limit_exhausted, latency_ms (for one tenant or all)."""
        return self._set_faults("tenant", tenant, faults)

    def clear_faults(self, tenant: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one tenant, or all)."""
        return self._clear_faults("tenant", tenant)

    def stats(self) -> dict[str, Any]:
        """Request counts per route and status, per tenant, and the OAuth statistics."""
        return self._call("GET", "/stats")
