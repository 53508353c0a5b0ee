"""``MauticControl``: typed calls to the Mautic sandbox's control API through a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nextcrm_sandbox.mautic.model import CONTROL_PREFIX, PREFIX
from nextcrm_sandbox.webhooks import WebhookControl


class MauticControl(WebhookControl):
    """Typed calls to ``/_sandbox/mautic/...`` through a running ``SandboxServer`` (``server.control``)."""

    prefix = CONTROL_PREFIX

    def add_account(self, **spec: Any) -> dict[str, Any]:
        """Generate an installation: seed, days, campaigns, contacts, segments, emails, clients, users, knobs."""
        return self._call("POST", "/accounts", json=spec)

    def accounts(self) -> list[dict[str, Any]]:
        """Summaries of every installation."""
        return self._call("GET", "/accounts")

    def account(self, account_id: str) -> dict[str, Any]:
        """One installation's summary: base_path, counts, clients, users, knobs."""
        return self._call("GET", f"/accounts/{account_id}")

    def configure(self, account_id: str, **knobs: Any) -> dict[str, Any]:
        """Change knobs (api_enabled, basic_auth, rate_limit, ...) without regenerating data."""
        return self._call("PATCH", f"/accounts/{account_id}", json=knobs)

    def delete_account(self, account_id: str) -> dict[str, Any]:
        """Remove an installation."""
        return self._call("DELETE", f"/accounts/{account_id}")

    def add_client(
        self,
        account_id: str,
        client_id: str,
        client_secret: str,
        grant_types: Sequence[str] | None = None,
        redirect_uris: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Create API credentials (all three grant types unless ``grant_types`` narrows them)."""
        body: dict[str, Any] = {"client_id": client_id, "client_secret": client_secret}
        body["redirect_uris"] = list(redirect_uris)
        if grant_types is not None:
            body["grant_types"] = list(grant_types)
        return self._call("POST", f"/accounts/{account_id}/clients", json=body)

    def grant(self, account_id: str, client_id: str, user: str | None = None, scope: str = "") -> dict[str, Any]:
        """Consent without the browser: ``{"grant_id", "token": {access_token, refresh_token, ...}}``."""
        body: dict[str, Any] = {"client_id": client_id, "scope": scope}
        if user is not None:
            body["user"] = user
        return self._call("POST", f"/accounts/{account_id}/oauth/grants", json=body)

    def revoke_grant(self, account_id: str, grant_id: str) -> dict[str, Any]:
        """The admin revoked the app's access: every token of the grant stops working."""
        return self._call("POST", f"/accounts/{account_id}/oauth/grants/{grant_id}/revoke")

    def expire_access(self, account_id: str, grant_id: str) -> dict[str, Any]:
        """Make the grant's access tokens expire now."""
        return self._call("POST", f"/accounts/{account_id}/oauth/grants/{grant_id}/expire-access")

    def oauth_state(self, account_id: str) -> dict[str, Any]:
        """Token calls per grant type and grant, and the grants."""
        return self._call("GET", f"/accounts/{account_id}/oauth")

    def changes(self, account_id: str, **counts: int) -> dict[str, list[int]]:
        """Apply creates/edits/deletes/publishes/unpublishes/joins/leaves and contact_* changes now (contact changes
        send their webhooks; joins and leaves none)."""
        return self._call("POST", f"/accounts/{account_id}/changes", json=counts)

    def add_record(
        self, account_id: str, entity: str, fields: Mapping[str, Any] | None = None, at: float | None = None
    ) -> dict[str, Any]:
        """Create a campaign, contact, segment or email added at ``at`` (unix seconds; default now)."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if at is not None:
            body["at"] = at
        return self._call("POST", f"/accounts/{account_id}/records", json=body)

    def update_record(
        self,
        account_id: str,
        entity: str,
        record_id: int,
        fields: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> dict[str, Any]:
        """Edit a record as a user would at ``at`` (sets ``dateModified``)."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if at is not None:
            body["at"] = at
        return self._call("PATCH", f"/accounts/{account_id}/records/{entity}/{record_id}", json=body)

    def delete_record(self, account_id: str, entity: str, record_id: int) -> dict[str, Any]:
        """Delete a record now."""
        return self._call("DELETE", f"/accounts/{account_id}/records/{entity}/{record_id}")

    def export(self, account_id: str, entity: str) -> dict[str, Any]:
        """``{"records", "deleted_ids"}`` for campaigns, contacts, segments, emails, campaign_contacts or
        segment_contacts."""
        return self._call("GET", f"/accounts/{account_id}/export/{entity}")

    def add_to_campaign(self, account_id: str, campaign_id: int, contact_id: int) -> dict[str, Any]:
        """Add a contact to a campaign as a user would (re-adds a removed one); Mautic sends no webhook for it."""
        return self._call("POST", f"/accounts/{account_id}/campaigns/{campaign_id}/contacts/{contact_id}/add")

    def remove_from_campaign(self, account_id: str, campaign_id: int, contact_id: int) -> dict[str, Any]:
        """Remove a contact from a campaign (kept as manually removed); Mautic sends no webhook for it."""
        return self._call("POST", f"/accounts/{account_id}/campaigns/{campaign_id}/contacts/{contact_id}/remove")

    def add_to_segment(self, account_id: str, segment_id: int, contact_id: int) -> dict[str, Any]:
        """Add a contact to a segment as a user would (re-adds a removed one); Mautic sends no webhook for it."""
        return self._call("POST", f"/accounts/{account_id}/segments/{segment_id}/contacts/{contact_id}/add")

    def remove_from_segment(self, account_id: str, segment_id: int, contact_id: int) -> dict[str, Any]:
        """Remove a contact from a segment (kept as manually removed); Mautic sends no webhook for it."""
        return self._call("POST", f"/accounts/{account_id}/segments/{segment_id}/contacts/{contact_id}/remove")

    # --- webhooks -----------------------------------------------------------------------------------------

    def subscribe_webhooks(self, account_id: str, url: str, secret: str, **options: Any) -> dict[str, Any]:
        """Create a webhook of the installation to ``url`` with its ``secret``; options: ``events``, ``mode``
        (``immediate`` or ``queue``), ``webhook_limit``, ``order``, ``site_url``, ``hold``, ``duplicate_rate``,
        ``retry_delays`` (queue mode). ``site_url`` defaults to the installation's URL on this server."""
        body = {"account": account_id, "url": url, "secret": secret, **options}
        server_url = getattr(self.server, "url", None)
        if "site_url" not in body and isinstance(server_url, str):
            body["site_url"] = f"{server_url}{PREFIX}/{account_id}"
        return self._call("POST", "/webhooks", json=body)

    def webhook(self, sub_id: str) -> dict[str, Any]:
        """One webhook: account, url, events, mode, webhook_limit, order, site_url, retry_delays, queued."""
        return self._call("GET", f"/webhooks/{sub_id}")

    def process_webhooks(self, account_id: str | None = None) -> int:
        """Run ``mautic:webhooks:process``: send queue-mode events in batches; returns how many bodies went out."""
        body = {} if account_id is None else {"account": account_id}
        return self._call("POST", "/webhooks/process", json=body)["sent"]

    def set_faults(self, account: str | None = None, **faults: Any) -> dict[str, Any]:
        """server_errors, server_error_status, rate_limited, latency_ms, insert_during_paging, repeat_pages and
        lost_answers (writes carried out, then answered with a 5xx), for one account or all."""
        return self._set_faults("account", account, faults)

    def clear_faults(self, account: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one account, or all)."""
        return self._clear_faults("account", account)

    def stats(self) -> dict[str, Any]:
        """Request counts: total, per route pattern, per status, per account (with OAuth counts)."""
        return self._call("GET", "/stats")
