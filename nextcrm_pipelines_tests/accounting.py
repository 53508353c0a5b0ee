"""Accounting test kit: connect a sandbox organisation through the real OAuth flow, read the truth back.

`connect_account` registers a fresh app and organisation in the provider's emulator and runs
`core.connect.connect` against it, the browser step being an HTTP client that follows the sandbox's
consent redirect to our callback server. Each provider's `Profile` says where its facts live: asset,
export name, id and total fields.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.providers import get_provider
from nextcrm_sandbox.myob import MyobControl
from nextcrm_sandbox.quickbooks import QuickBooksControl
from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.xero import XeroControl

CONTROLS: dict[str, Any] = {"xero": XeroControl, "quickbooks": QuickBooksControl, "myob": MyobControl}


@dataclass(frozen=True)
class Profile:
    """Where one synced entity's facts live in the emulator and in the mirror."""

    provider: str
    entity: str
    export: str
    id_field: str
    total: Callable[[dict[str, Any]], Any] | None
    tenant: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.entity


def _myob_total(raw: dict[str, Any]) -> Any:
    return raw.get("TotalAmountForeign") if raw.get("ForeignCurrency") else raw.get("TotalAmount")


PROFILES = {
    "xero_invoices": Profile("xero", "xero_invoices", "invoices", "InvoiceID", lambda raw: raw.get("Total"),
                             {"invoices": 120, "contacts": 30, "days": 6, "minute_window_seconds": 2}),
    "xero_contacts": Profile("xero", "xero_contacts", "contacts", "ContactID", None,
                             {"invoices": 20, "contacts": 120, "days": 6, "minute_window_seconds": 2}),
    "xero_payments": Profile("xero", "xero_payments", "payments", "PaymentID", None,
                             {"invoices": 260, "contacts": 30, "days": 6, "minute_window_seconds": 2}),
    "quickbooks_invoices": Profile("quickbooks", "quickbooks_invoices", "invoice", "Id",
                                   lambda raw: raw.get("TotalAmt"), {"invoices": 120, "customers": 30, "days": 6},
                                   {"throttle_wait_seconds": 0.2}),
    "quickbooks_customers": Profile("quickbooks", "quickbooks_customers", "customer", "Id", None,
                                    {"invoices": 30, "customers": 120, "days": 6}, {"throttle_wait_seconds": 0.2}),
    "quickbooks_payments": Profile("quickbooks", "quickbooks_payments", "payment", "Id",
                                   lambda raw: raw.get("TotalAmt"), {"invoices": 220, "customers": 30, "days": 6},
                                   {"throttle_wait_seconds": 0.2}),
    "myob_invoices": Profile("myob", "myob_invoices", "invoice", "UID", _myob_total,
                             {"invoices": 120, "customers": 30, "days": 6, "requests_per_second": 0}),
}  # fmt: skip


@dataclass
class Account:
    """A connected sandbox organisation."""

    profile: Profile
    sandbox: SandboxServer
    control: Any
    connection: Connection
    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)

    def export(self, entity: str | None = None) -> dict[str, Any]:
        return self.control.export(self.tenant_id, entity or self.profile.export)

    def _oauth(self, method: str, path: str = "") -> Any:
        return self.sandbox.control(method, f"/_sandbox/{self.profile.provider}/oauth{path}")

    def grant_id(self) -> str:
        """The newest grant of this account's app (the one the connect flow created)."""
        grants = [g for g in self._oauth("GET")["grants"] if g["client_id"] == self.client_id]
        return grants[-1]["id"]

    def refreshes(self) -> int:
        """Refresh-token calls the provider answered for this account's grant."""
        return int(self._oauth("GET")["stats"].get(f"refresh_token:{self.grant_id()}", 0))

    def revoke(self) -> None:
        """The user disconnects the app at the provider."""
        self._oauth("POST", f"/grants/{self.grant_id()}/revoke")

    def expire_access(self) -> None:
        """The provider expires the grant's access tokens early (we still think they are valid)."""
        self._oauth("POST", f"/grants/{self.grant_id()}/expire-access")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def consent(url: str) -> None:
    """The user's browser: open the authorisation URL and follow the redirect back to the callback."""
    response = httpx.get(url, follow_redirects=True, timeout=30)
    response.raise_for_status()


def register_app(control: Any) -> tuple[str, str]:
    client_id, secret = f"app-{uuid.uuid4().hex[:12]}", f"secret-{uuid.uuid4().hex}"
    control.add_client(client_id, secret)
    return client_id, secret


def connect_account(
    sandbox: SandboxServer,
    database_url: str,
    box: SecretBox,
    profile: Profile,
    *,
    name: str | None = None,
    settings: Mapping[str, Any] | None = None,
    **tenant: Any,
) -> Account:
    """A new app and organisation in the emulator, connected through the OAuth flow; one connection."""
    control = CONTROLS[profile.provider](sandbox)
    client_id, secret = register_app(control)
    spec = {"seed": 5, **profile.tenant, **tenant}
    created = control.add_tenant(client_id=client_id, **spec)
    provider = get_provider(profile.provider)
    assert provider.oauth is not None and provider.discover_tenants is not None
    app = OAuthApp(client_id, secret, f"http://127.0.0.1:{free_port()}/callback")
    # MYOB company files have their own sign-in, which the connect flow reads from the environment.
    file_user = {"MYOB_COMPANY_FILE_USERNAME": spec.get("username", "Administrator"),
                 "MYOB_COMPANY_FILE_PASSWORD": spec.get("password", "")}  # fmt: skip
    saved = {name: os.environ.get(name) for name in file_user}
    os.environ.update(file_user if profile.provider == "myob" else {})
    try:
        (connection,) = connect(
            spec=provider.oauth,
            discover=provider.discover_tenants,
            app=app,
            database_url=database_url,
            box=box,
            base_url=f"{sandbox.url}/{profile.provider}",
            name=name or f"{profile.provider} {created['id'][:8]}",
            on_url=consent,
            extra_authorize_params={"sandbox_tenant": created["id"]},
            connection_settings={"requests_per_second": 0, **profile.settings, **(settings or {})},
        )
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return Account(profile, sandbox, control, connection, created["id"], client_id, secret)


def stored_secrets(database_url: str, box: SecretBox, connection_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        return dict(vault.load_secrets(conn, connection_id, box).reveal())


def expire_stored_token(database_url: str, box: SecretBox, connection_id: str) -> None:
    """Make our copy of the access token look expired (as if 30 minutes had passed here)."""
    secrets = stored_secrets(database_url, box, connection_id)
    secrets["expires_at"] = int(datetime.now(UTC).timestamp()) - 60
    with psycopg.connect(database_url) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET secrets_encrypted = %s WHERE id = %s").format(table("integration_connections")),
            (box.encrypt(connection_id, secrets), connection_id),
        )


def decimal_of(value: Any) -> Decimal | None:
    return None if value is None else Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def mirror(database_url: str, schema: str, entity: str, connection_id: str) -> dict[str, dict[str, Any]]:
    """The mirror's rows of one connection, by id."""
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(
            sql.SQL("SELECT * FROM {} WHERE connection_id = %s").format(table(entity, schema)), (connection_id,)
        )
        names = [d.name for d in cur.description]
        return {row[1]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def assert_mirror_equals_export(account: Account, database_url: str, schema: str) -> dict[str, dict[str, Any]]:
    """Every current record is mirrored once with its exact total; every other row is flagged deleted."""
    profile = account.profile
    truth = account.export()
    records = {str(r[profile.id_field]): r for r in truth["records"]}
    rows = mirror(database_url, schema, profile.entity, account.connection.id)
    missing = set(records) - set(rows)
    assert not missing, f"{len(missing)} record(s) not mirrored, e.g. {sorted(missing)[:3]}"
    extra = {rid for rid in set(rows) - set(records) if not rows[rid]["deleted"]}
    assert not extra, f"{len(extra)} mirrored row(s) gone upstream but not flagged deleted: {sorted(extra)[:3]}"
    assert set(rows) - set(records) <= {str(i) for i in truth.get("deleted_ids", [])}
    if profile.total is not None:
        wrong = [rid for rid, raw in records.items() if rows[rid]["total"] != decimal_of(profile.total(raw))]
        assert not wrong, f"totals differ for {wrong[:3]}"
    for rid, raw in records.items():
        stored = rows[rid]["raw"]
        differs = [key for key, value in stored.items() if raw.get(key) != value]
        assert not differs, f"raw JSON of {rid} differs from the provider's in {differs}"
    return rows
