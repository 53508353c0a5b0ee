"""Shared fixtures: a real Postgres (TEST_DATABASE_URL or an embedded server), a fresh schema per
test, a fresh encryption key, and the sandbox emulators over real HTTP on loopback."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import consent, free_port
from nextcrm_pipelines_tests.helpers import last_midday
from nextcrm_sandbox.billionmail import BillionMailControl
from nextcrm_sandbox.mautic import MauticControl
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="nextcrm-test-pg-"))
    server = ensure_embedded_postgres(folder)
    try:
        yield server.url
    finally:
        stop_embedded_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def schema(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A freshly migrated schema of its own for each test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("NEXTCRM_DB_SCHEMA", name)
    monkeypatch.setenv("DATABASE_URL", database_url)
    db.upgrade(database_url, name)
    try:
        yield name
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("NEXTCRM_SECRET_KEY", key)
    monkeypatch.delenv("NEXTCRM_SECRET_KEY_PREVIOUS", raising=False)
    return key


@pytest.fixture
def box(secret_key: str) -> SecretBox:
    return SecretBox([secret_key])


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture
def stripe_account(sandbox: SandboxServer, request: pytest.FixtureRequest):
    """Factory: a fresh sandbox Stripe account with a unique key; returns the key."""

    def make(charges: int = 300, subscriptions: int = 60, days: int = 10, seed: int = 11, **extra) -> str:
        key = f"sk_test_{uuid.uuid4().hex}"
        sandbox.add_stripe_account(api_key=key, seed=seed, charges=charges, subscriptions=subscriptions,
                                   days=days, requests_per_second=0, **extra)  # fmt: skip
        return key

    return make


@pytest.fixture
def stripe_connection(database_url: str, schema: str, box: SecretBox, sandbox: SandboxServer):
    """Factory: a vault connection to a sandbox Stripe account."""

    def make(api_key: str, name: str = "Acme", **settings) -> Connection:
        with psycopg.connect(database_url) as conn:
            return vault.add_connection(
                conn, provider="stripe", display_name=name, secrets={"api_key": api_key}, box=box,
                base_url=sandbox.url, settings=settings,
            )  # fmt: skip

    return make


@pytest.fixture
def own_stripe(database_url: str, schema: str, box: SecretBox):
    """Factory for tests that move the sandbox clock or mutate data: a sandbox of their own (stopped
    afterwards) with one Stripe account and a vault connection to it; returns (server, key, connection)."""
    servers: list[SandboxServer] = []

    def make(seed: int, charges: int, subscriptions: int, days: int) -> tuple[SandboxServer, str, Connection]:
        server = SandboxServer().start()
        servers.append(server)
        key = f"sk_test_{uuid.uuid4().hex}"
        server.add_stripe_account(api_key=key, seed=seed, charges=charges, subscriptions=subscriptions, days=days,
                                  requests_per_second=0)  # fmt: skip
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(conn, provider="stripe", display_name=f"Own {seed}",
                                              secrets={"api_key": key}, box=box, base_url=server.url)  # fmt: skip
        return server, key, connection

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def own_sandbox() -> Iterator[SandboxServer]:
    """A sandbox of the test's own, for tests that move its clock (stopped afterwards)."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def midday_sandbox() -> Iterator[SandboxServer]:
    """A sandbox of the test's own whose clock starts at 12:00 UTC, for tests about "today so far" or
    "now": the same at any hour the suite runs, with no midnight within the test's reach."""
    with SandboxServer(now=last_midday()) as server:
        yield server


@pytest.fixture
def paypal(database_url, schema, box):
    """Factory: a sandbox PayPal merchant app and a vault connection to it."""

    def make(server, settings=None, **spec):
        control = PayPalControl(server)
        client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
        account = control.add_account(client_id, secret, **{"seed": 3, "transactions": 300, "subscriptions": 8,
                                                            "days": 5, "requests_per_minute": 0, **spec})  # fmt: skip
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(
                conn, provider="paypal", display_name=f"PayPal {account['id']}", box=box,
                secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"},
                base_url=f"{server.url}/paypal",
                settings={"requests_per_second": 0, "mode": "sandbox", **(settings or {})},
            )  # fmt: skip
        control.client_id = client_id
        return control, account["id"], connection

    return make


@pytest.fixture
def billionmail(database_url, schema, box, sandbox):
    def make(**spec):
        control = BillionMailControl(sandbox)
        password = f"pw-{uuid.uuid4().hex[:8]}"
        account = control.add_account(**{"seed": 4, "campaigns": 40, "contacts": 60, "days": 20,
                                         "password": password, **spec})  # fmt: skip
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(
                conn, provider="billionmail", display_name=f"BM {account['id']}", box=box,
                secrets={"username": account["username"], "password": password},
                base_url=f"{sandbox.url}{account['base_path']}",
            )  # fmt: skip
        return control, account["id"], connection, password

    return make


@pytest.fixture
def mautic(database_url, schema, box, sandbox):
    def make(grant: str = "authorization_code", settings=None, server: SandboxServer | None = None, **spec):
        server = server or sandbox
        control = MauticControl(server)
        client_id, secret = f"mautic-{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}"
        clients = [{"client_id": client_id, "client_secret": secret}]
        account = control.add_account(**{"seed": 6, "campaigns": 45, "contacts": 20, "days": 6, "clients": clients,
                                         **spec})  # fmt: skip
        base_url = f"{server.url}{account['base_path']}"
        provider = get_provider("mautic")
        if grant == "authorization_code":
            (connection,) = connect(spec=provider.oauth, discover=provider.discover_tenants,
                                    app=OAuthApp(client_id, secret, f"http://127.0.0.1:{free_port()}/callback"),
                                    database_url=database_url, box=box, base_url=base_url,
                                    name=f"Mautic {account['id']}", on_url=consent,
                                    connection_settings={"page_size": 7, **(settings or {})})  # fmt: skip
        else:
            with psycopg.connect(database_url) as conn:
                connection = vault.add_connection(
                    conn, provider="mautic", display_name=f"Mautic cc {account['id']}", box=box, base_url=base_url,
                    secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"},
                    settings={"page_size": 7, **(settings or {})},
                )  # fmt: skip
        return control, account["id"], connection

    return make
