"""``XeroControl``: typed calls to the Xero sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nextcrm_sandbox.webhooks import WebhookControl
from nextcrm_sandbox.xero.api import CONTROL_PREFIX, DEFAULT_SCOPE


class XeroControl(WebhookControl):
    """Typed calls to ``/_sandbox/xero/...`` through a running ``SandboxServer`` (``server.control``)."""

    prefix = CONTROL_PREFIX

    def add_client(self, client_id: str, client_secret: str, redirect_uris: Iterable[str] = ()) -> dict[str, Any]:
        """Register an app (no redirect URIs → any loopback ``http`` URI is accepted)."""
        body = {"client_id": client_id, "client_secret": client_secret, "redirect_uris": list(redirect_uris)}
        return self._call("POST", "/oauth/clients", json=body)

    def add_tenant(
        self, client_id: str, *, seed: int = 0, invoices: int = 100, contacts: int = 20, days: float = 30, **knobs: Any
    ) -> dict[str, Any]:
        """Generate an organisation of the app; returns ``{"id", "name", "counts", ...}``."""
        body = {"client_id": client_id, "seed": seed, "invoices": invoices, "contacts": contacts, "days": days, **knobs}
        return self._call("POST", "/tenants", json=body)

    def tenant(self, tenant_id: str) -> dict[str, Any]:
        """One organisation's summary and knobs."""
        return self._call("GET", f"/tenants/{tenant_id}")

    def configure(self, tenant_id: str, **settings: Any) -> dict[str, Any]:
        """Change an organisation's knobs (limits, windows, date flags) without regenerating it."""
        return self._call("PATCH", f"/tenants/{tenant_id}", json=settings)

    def grant(self, client_id: str, scope: str = DEFAULT_SCOPE, tenants: list[str] | None = None) -> dict[str, Any]:
        """Consent without the browser: ``{"grant_id", "token", "tenants", "auth_event_id"}``."""
        body: dict[str, Any] = {"client_id": client_id, "scope": scope}
        if tenants is not None:
            body["tenants"] = tenants
        return self._call("POST", "/grants", json=body)

    def revoke_grant(self, grant_id: str) -> dict[str, Any]:
        """The user disconnects the app: every token of the grant stops working."""
        return self._call("POST", f"/oauth/grants/{grant_id}/revoke")

    def expire_access(self, grant_id: str) -> dict[str, Any]:
        """Make the grant's access tokens expire now."""
        return self._call("POST", f"/oauth/grants/{grant_id}/expire-access")

    def oauth_state(self) -> dict[str, Any]:
        """Token-call counts and grants."""
        return self._call("GET", "/oauth")

    def changes(self, tenant_id: str, **counts: int) -> dict[str, list[str]]:
        """Apply edits/voids/deletes/creates/archives (and contact_edits/contact_creates, payments/payment_deletes)
        now; the answer lists the ids of each kind (``payments_created``, ``payments_deleted``...)."""
        return self._call("POST", f"/tenants/{tenant_id}/changes", json=counts)

    def add_record(
        self, tenant_id: str, entity: str, fields: Mapping[str, Any] | None = None, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Create an invoice, contact or payment (optionally at an exact updated time, unix seconds).

        A payment pays ``fields["Invoice"]["InvoiceID"]`` (default: the oldest invoice with something due, or a
        new one), all that is due unless ``Amount`` says otherwise."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant_id}/records", json=body)

    def update_record(
        self, tenant_id: str, record_id: str, fields: Mapping[str, Any] | None = None, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Change an invoice, contact or payment (``Status: DELETED`` deletes it) and set its updated time."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("PATCH", f"/tenants/{tenant_id}/records/{record_id}", json=body)

    def purge_record(self, tenant_id: str, record_id: str) -> dict[str, Any]:
        """Remove an invoice or contact outright (reads of it then answer 404; Xero itself never does this)."""
        return self._call("DELETE", f"/tenants/{tenant_id}/records/{record_id}")

    def export(self, tenant_id: str, entity: str) -> dict[str, Any]:
        """``{"records": [...], "deleted_ids": [...]}`` for ``invoices``, ``contacts`` or ``payments``."""
        return self._call("GET", f"/tenants/{tenant_id}/export/{entity}")

    def set_faults(self, tenant: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject faults for one organisation (or all): server_errors, rate_limited, day_limit_exhausted, ..."""
        return self._set_faults("tenant", tenant, faults)

    def clear_faults(self, tenant: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one organisation, or all)."""
        return self._clear_faults("tenant", tenant)

    def stats(self) -> dict[str, Any]:
        """Request counts (total, per path pattern, per status, per tenant) and OAuth counts."""
        return self._call("GET", "/stats")

    def subscribe_webhooks(self, client_id: str, url: str, key: str, **knobs: Any) -> dict[str, Any]:
        """Point the app's webhook at ``url``, signed with ``key``; runs the intent-to-receive check first.

        Returns the subscription with its ``status`` (``OK``: events flow; ``failed``: none are sent) and the
        checks. ``knobs``: ``duplicate_rate``, ``hold``, ``retry_delays`` (seconds; default about 24 h of tries).
        """
        return self._call("POST", "/webhooks", json={"client_id": client_id, "url": url, "key": key, **knobs})

    def webhook(self, sub_id: str) -> dict[str, Any]:
        """One subscription: url, status, whether events are sent, the last intent-to-receive checks."""
        return self._call("GET", f"/webhooks/{sub_id}")

    def intent_to_receive(self, sub_id: str, key: str | None = None) -> dict[str, Any]:
        """Run the intent-to-receive check again (with a reset webhook key, if given)."""
        return self._call("POST", f"/webhooks/{sub_id}/intent-to-receive", json={} if key is None else {"key": key})
