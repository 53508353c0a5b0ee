"""``BillionMailControl``: typed calls to the BillionMail control API of a running ``SandboxServer``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nextcrm_sandbox.billionmail.wire import CONTROL_PREFIX
from nextcrm_sandbox.control import ControlClient


class BillionMailControl(ControlClient):
    """Typed calls to the BillionMail control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def add_account(self, **spec: Any) -> dict[str, Any]:
        """Create an installation: username, password, api_key, seed, campaigns, contacts, groups, days, knobs."""
        return self._call("POST", "/accounts", json=spec)

    def delete_account(self, account_id: str) -> dict[str, Any]:
        """Remove an installation."""
        return self._call("DELETE", f"/accounts/{account_id}")

    def accounts(self) -> list[dict[str, Any]]:
        """Summaries of every installation."""
        return self._call("GET", "/accounts")

    def account(self, account_id: str) -> dict[str, Any]:
        """One installation's summary (base_path, counts, template and group ids, knobs)."""
        return self._call("GET", f"/accounts/{account_id}")

    def changes(self, account_id: str, **counts: int) -> dict[str, list[Any]]:
        """Apply creates, edits, deletes, progress (and contact_creates/unsubscribes/deletes) now."""
        return self._call("POST", f"/accounts/{account_id}/changes", json=counts)

    def add_record(
        self, account_id: str, entity: str, fields: Mapping[str, Any] | None = None, at: int | None = None
    ) -> dict[str, Any]:
        """Create a campaign, contact, group or api_key (at ``at``) and return it as the API shows it."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if at is not None:
            body["at"] = at
        return self._call("POST", f"/accounts/{account_id}/records", json=body)

    def export(self, account_id: str, entity: str) -> dict[str, Any]:
        """``{"records": [...], "deleted_ids": [...]}`` for campaigns, contacts, groups, api_keys or api_mails."""
        return self._call("GET", f"/accounts/{account_id}/export/{entity}")

    def expire_tokens(self, account_id: str, refresh: bool = False) -> dict[str, Any]:
        """Expire the install's access tokens now (and its refresh tokens with ``refresh=True``)."""
        return self._call("POST", f"/accounts/{account_id}/expire-tokens", json={"refresh": refresh})

    def captchas(self, account_id: str) -> dict[str, str]:
        """The answers of the live captchas, by ``validateCodeId``."""
        return self._call("GET", f"/accounts/{account_id}/captchas")["captchas"]

    def set_knobs(self, account_id: str, **knobs: Any) -> dict[str, Any]:
        """Change knobs of a running installation; returns all knobs."""
        return self._call("POST", f"/accounts/{account_id}/knobs", json=knobs)

    def set_faults(self, account: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject server_errors, latency_ms, envelope_errors (+ code/msg), send_failures, proxy_rate_limited (the
        HTTP 429 of a reverse proxy's request limit in front of the install) or gateway_timeouts (the proxy's 504
        after the install carried the request out), for one account or all; `route` ("POST /api/...") limits
        them to one route."""
        return self._set_faults("account", account, faults)

    def clear_faults(self, account: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one account, or all)."""
        return self._clear_faults("account", account)

    def stats(self) -> dict[str, Any]:
        """Request counts: total, per route, per HTTP status, per envelope code, per account."""
        return self._call("GET", "/stats")
