"""``MyobControl``: typed calls to the MYOB sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nextcrm_sandbox.control import ControlClient
from nextcrm_sandbox.myob.model import CONTROL_PREFIX


class MyobControl(ControlClient):
    """Typed calls to the ``/_sandbox/myob`` control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._call("POST", path, json=dict(body))

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        *,
        redirect_uris: Iterable[str] = (),
        key_mode: str = "new",
        username: str | None = None,
        **limits: Any,
    ) -> dict[str, Any]:
        """Register an app (API key): its secret, redirect URIs, key generation and limit knobs."""
        body: dict[str, Any] = {
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uris": list(redirect_uris),
            "key_mode": key_mode,
            **limits,
        }
        if username is not None:
            body["username"] = username
        return self._post("/clients", body)

    def add_tenant(
        self, client_id: str, *, seed: int = 0, invoices: int = 100, customers: int = 20, days: float = 30, **knobs: Any
    ) -> dict[str, Any]:
        """Generate a company file of ``client_id``; returns ``{id, name, counts, cf_uri, ...}``."""
        body = {"client_id": client_id, "seed": seed, "invoices": invoices, "customers": customers, "days": days}
        return self._post("/tenants", {**body, **knobs})

    def grant(self, client_id: str, tenant: str | None = None, *, scope: str | None = None) -> dict[str, Any]:
        """Consent without the browser: ``{grant_id, token, businessId, businessName}``."""
        body: dict[str, Any] = {"client_id": client_id}
        if tenant is not None:
            body["tenant"] = tenant
        if scope is not None:
            body["scope"] = scope
        return self._post("/grants", body)

    def changes(self, tenant: str, **counts: int) -> dict[str, list[str]]:
        """Apply edits (an edit may pay an invoice: a new customer payment), voids (reversals), deletes, creates,
        archives, customer edits, creates and deletes (cards without transactions), payment deletes... now on the
        sandbox clock; returns the ids of each kind of change."""
        return self._post(f"/tenants/{tenant}/changes", counts)

    def add_record(
        self, tenant: str, entity: str, fields: Mapping[str, Any] | None = None, *, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Create an invoice, customer or payment stamped ``updated_at`` (default now); returns it in full.

        A payment pays the whole balance of an open invoice: ``fields={"Invoice": {"UID": ...}}`` names it,
        else one is picked.
        """
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._post(f"/tenants/{tenant}/records", body)

    def update_record(
        self, tenant: str, record_id: str, fields: Mapping[str, Any] | None = None, *, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Change a record's fields and stamp it ``updated_at`` (default now); returns it in full."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("PATCH", f"/tenants/{tenant}/records/{record_id}", json=body)

    def export(self, tenant: str, entity: str) -> dict[str, Any]:
        """Every current ``invoice`` (full shape, with ``Lines`` and ``InvoiceType``), ``customer`` or ``payment``, and
        the hard-deleted ids."""
        return self._call("GET", f"/tenants/{tenant}/export/{entity}")

    def set_faults(self, tenant: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject faults (``server_errors``, ``rate_limited``, ``gateway_timeouts``, ``day_limit_exhausted``...)."""
        return self._set_faults("tenant", tenant, faults)

    def clear_faults(self, tenant: str | None = None) -> dict[str, Any]:
        """Remove injected faults (all, or one company file's)."""
        params = {"tenant": tenant} if tenant is not None else None
        return self._call("DELETE", "/faults", params=params)

    def stats(self) -> dict[str, Any]:
        """Request counts (total, per path pattern, per status) and token-endpoint counts."""
        return self._call("GET", "/stats")

    def settings(self, **policy: Any) -> dict[str, Any]:
        """Read or change the OAuth knobs (``access_ttl``, ``rotate``, ``grace``, ``expires_in_as_string``...)."""
        if not policy:
            return self._call("GET", "/settings")
        return self._post("/settings", policy)

    def revoke(self, grant_id: str) -> dict[str, Any]:
        """The user disconnected the app: every token of the grant stops working."""
        return self._post(f"/oauth/grants/{grant_id}/revoke", {})

    def expire_access(self, grant_id: str) -> dict[str, Any]:
        """Make the grant's access tokens expire now."""
        return self._post(f"/oauth/grants/{grant_id}/expire-access", {})
