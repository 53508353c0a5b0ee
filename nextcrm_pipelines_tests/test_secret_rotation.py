"""Secrets survive token refreshes and key rotation.

A refresh of a token group whose one sibling cannot be decrypted keeps the rotated refresh token for
the others (the emulator revokes the old one once its grace period ends). `secrets rotate`, run while a
receiver, a sync and a connect flow hold the old key, leaves no row encrypted under a key that is then
dropped: writes in flight finish before the rotation re-encrypts, and a process without the recorded
current key refuses to write before it calls any token endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import httpx
import orjson
import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.oauth import OAuthApp, TokenManager
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.core.vault import SecretBox, VaultError
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.webhooks.app import receiver_url
from nextcrm_pipelines_tests.accounting import (
    CONTROLS,
    PROFILES,
    connect_account,
    consent,
    expire_stored_token,
    free_port,
    register_app,
    stored_secrets,
)
from nextcrm_pipelines_tests.helpers import sandbox_now
from nextcrm_pipelines_tests.webhook_helpers import receiver
from nextcrm_sandbox.paypal import PayPalControl


def sync_xero(database_url: str, schema: str, connection_id: str, day) -> list:
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider("xero"),
                           entity_name="xero_invoices", connection_id=connection_id,
                           windows=[day_window(day)])  # fmt: skip


def refreshes(control, grant: str) -> int:
    return int(control.oauth_state()["stats"].get(f"refresh_token:{grant}", 0))


def connect_xero_group(sandbox, database_url: str, box: SecretBox, tenants: int):
    """One consent reaching `tenants` organisations: that many connections sharing one grant."""
    control = CONTROLS["xero"](sandbox)
    client_id, secret = register_app(control)
    for seed in range(1, tenants + 1):
        control.add_tenant(client_id, seed=seed, invoices=10, contacts=3, days=1, minute_window_seconds=2)
    provider = get_provider("xero")
    app = OAuthApp(client_id, secret, f"http://127.0.0.1:{free_port()}/callback")
    connections = connect(spec=provider.oauth, discover=provider.discover_tenants, app=app, database_url=database_url,
                          box=box, base_url=f"{sandbox.url}/xero", name="Group", on_url=consent,
                          connection_settings={"requests_per_second": 0})  # fmt: skip
    grant = [g for g in control.oauth_state()["grants"] if g["client_id"] == client_id][-1]["id"]
    return control, grant, sorted(connections, key=lambda c: c.id)


def write_ciphertext(database_url: str, connection_id: str, ciphertext: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET secrets_encrypted = %s WHERE id = %s").format(table("integration_connections")),
            (ciphertext, connection_id),
        )


def test_a_sibling_that_cannot_be_decrypted_does_not_cost_the_group_its_refresh_token(
    database_url, schema, box, own_sandbox
):
    control, grant, (synced, sibling, broken) = connect_xero_group(own_sandbox, database_url, box, tenants=3)
    # The third organisation's secrets were sealed with a key this process no longer has.
    dropped = SecretBox([Fernet.generate_key().decode()])
    write_ciphertext(database_url, broken.id, dropped.encrypt(broken.id, stored_secrets(database_url, box, broken.id)))
    original = stored_secrets(database_url, box, synced.id)["refresh_token"]
    control.expire_access(grant)
    for connection in (synced, sibling):
        expire_stored_token(database_url, box, connection.id)

    (result,) = sync_xero(database_url, schema, synced.id, sandbox_now(own_sandbox).date())

    assert result.status == "success", result.error
    assert refreshes(control, grant) == 1
    rotated = stored_secrets(database_url, box, synced.id)["refresh_token"]
    assert rotated != original and stored_secrets(database_url, box, sibling.id)["refresh_token"] == rotated
    with psycopg.connect(database_url) as conn:
        left_out = vault.get_connection(conn, broken.id)
        assert vault.get_connection(conn, sibling.id).status == "active"
    assert left_out.status == "needs_reauth"
    assert "cannot be decrypted" in left_out.last_error and "nextcrm-pipelines connect xero" in left_out.last_error
    assert original not in left_out.last_error and rotated not in left_out.last_error

    # Past the grace period of the superseded token, the sibling refreshes with the stored one.
    own_sandbox.advance_clock(timedelta(minutes=31).total_seconds())
    control.expire_access(grant)
    expire_stored_token(database_url, box, sibling.id)
    (later,) = sync_xero(database_url, schema, sibling.id, sandbox_now(own_sandbox).date())
    assert later.status == "success", later.error
    assert refreshes(control, grant) == 2
    assert stored_secrets(database_url, box, synced.id)["refresh_token"] not in (original, rotated)


def start_rotation(database_url: str, new: str, old: str) -> tuple[subprocess.Popen, str]:
    """`nextcrm-pipelines secrets rotate` in a process of its own, as the operator runs it; returns the
    process and the application name its database session carries."""
    name = f"rotate-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DATABASE_URL": database_url, "NEXTCRM_SECRET_KEY": new, "NEXTCRM_SECRET_KEY_PREVIOUS": old,
           "PGAPPNAME": name}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "nextcrm_pipelines.cli", "secrets", "rotate"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    return process, name


def rotate(database_url: str, new: str, old: str) -> str:
    process, _ = start_rotation(database_url, new, old)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    return out


def wait_until_waiting_for_a_lock(database_url: str, process: subprocess.Popen, name: str) -> None:
    """Return once the session named `name` waits for a lock; fail if its process ends first."""
    deadline = time.monotonic() + 30
    with psycopg.connect(database_url, autocommit=True) as watch:
        query = "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
        while not watch.execute(query, (name,)).fetchone():
            if process.poll() is not None:
                out, err = process.communicate()
                pytest.fail(f"the rotation ended without waiting for the write in flight: {out}{err[-2000:]}")
            assert time.monotonic() < deadline, "the rotation never waited for the write in flight"


def unreadable_with(database_url: str, schema: str, box: SecretBox) -> list[str]:
    """Ids of the connections whose stored secrets `box` cannot decrypt."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, secrets_encrypted FROM {} WHERE secrets_encrypted IS NOT NULL ORDER BY id").format(
                table("integration_connections", schema)
            )
        ).fetchall()
    failed = []
    for cid, ciphertext in rows:
        try:
            box.decrypt(cid, ciphertext)
        except VaultError:
            failed.append(cid)
    assert rows, "no connection stored"
    return failed


def test_a_connection_stored_while_the_key_rotates_is_re_encrypted(database_url, schema, secret_key):
    old, new = secret_key, Fernet.generate_key().decode()
    with psycopg.connect(database_url) as conn:
        vault.add_connection(conn, provider="stripe", display_name="Before", secrets={"api_key": "sk_test_before"},
                             box=SecretBox([old]))  # fmt: skip
    with psycopg.connect(database_url) as adding:
        # A connect flow in a process started with the old key has stored its connection, not yet committed.
        vault.add_connection(adding, provider="stripe", display_name="During", secrets={"api_key": "sk_test_during"},
                             box=SecretBox([old]))  # fmt: skip
        rotation, name = start_rotation(database_url, new, old)
        wait_until_waiting_for_a_lock(database_url, rotation, name)
    out, err = rotation.communicate(timeout=60)
    assert rotation.returncode == 0, err[-2000:]
    assert "re-encrypted 2 connection secret(s)" in out
    assert unreadable_with(database_url, schema, SecretBox([new])) == []


def test_processes_started_with_the_old_key_refuse_to_write_once_it_is_rotated(
    database_url, schema, secret_key, own_sandbox, monkeypatch, caplog
):
    old, new = secret_key, Fernet.generate_key().decode()
    old_box = SecretBox([old])
    account = connect_account(own_sandbox, database_url, old_box, PROFILES["xero_invoices"], invoices=10, days=1)
    paypal = PayPalControl(own_sandbox)
    client_id, client_secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    merchant = paypal.add_account(client_id, client_secret, seed=5, transactions=5, subscriptions=1, days=1,
                                  requests_per_minute=0)["id"]  # fmt: skip
    webhook_id = "WH" + uuid.uuid4().hex[:15].upper()
    with psycopg.connect(database_url) as conn:
        shop = vault.add_connection(
            conn, provider="paypal", display_name="Shop", box=old_box, base_url=f"{own_sandbox.url}/paypal",
            secrets={"client_id": client_id, "client_secret": client_secret, "grant_type": "client_credentials",
                     "webhook_id": webhook_id},
            settings={"requests_per_second": 0, "mode": "sandbox", "webhook_verification": "online"},
        )  # fmt: skip

    def deliver(base: str) -> int:
        body = orjson.dumps({"id": f"WH-{uuid.uuid4().hex[:20].upper()}", "create_time": "2026-11-26T10:00:00Z",
                             "event_type": "CHECKOUT.ORDER.APPROVED", "resource_type": "checkout-order",
                             "resource": {"id": "0VF52814937998046", "status": "APPROVED"}})  # fmt: skip
        return httpx.post(receiver_url(base, "paypal", shop.id), content=body, timeout=30,
                          headers={"content-type": "application/json",
                                   **paypal.sign_webhook(body, webhook_id)}).status_code  # fmt: skip

    def paypal_tokens() -> int:
        return int(paypal.stats()["by_route"].get("POST /v1/oauth2/token", 0))

    # A sync started with the old key holds the connection's secrets and a token manager.
    with psycopg.connect(database_url) as conn:
        held = vault.load_secrets(conn, account.connection.id, old_box)
    syncing = TokenManager(spec=get_provider("xero").oauth, connection=account.connection, secrets=held,
                           box=old_box, database_url=database_url)  # fmt: skip
    with receiver(database_url, schema, old_box, cache_seconds=3600) as base:
        paypal.subscribe_webhooks(merchant, receiver_url(base, "paypal", shop.id), webhook_id, retry_delays=[60])
        assert deliver(base) == 200  # the receiver has the connection cached and a token stored

        assert "re-encrypted 2 connection secret(s)" in rotate(database_url, new, old)

        # The receiver needs a new PayPal token to verify the next delivery: it refuses before asking PayPal.
        with psycopg.connect(database_url) as conn:
            vault.update_secrets(conn, shop.id, {"access_token": "", "expires_at": "0"}, SecretBox([new]))
        asked = paypal_tokens()
        assert deliver(base) == 503
        assert paypal_tokens() == asked
        assert "restart it with the current NEXTCRM_SECRET_KEY" in caplog.text  # the operator is told why
    # The sync needs a refresh: it refuses before calling Xero's token endpoint, telling the operator why.
    account.expire_access()
    stored = stored_secrets(database_url, SecretBox([new]), account.connection.id)
    with pytest.raises(VaultError, match="restart it with the current NEXTCRM_SECRET_KEY") as refused:
        syncing.refresh_after_rejection(str(held["access_token"]))
    syncing.close()
    assert old not in str(refused.value) and new not in str(refused.value)
    assert account.refreshes() == 0
    assert stored_secrets(database_url, SecretBox([new]), account.connection.id) == stored
    # A connect flow with only the old key stores nothing; one that also holds the new key stores under it.
    with psycopg.connect(database_url) as conn, pytest.raises(VaultError, match="restart"):
        vault.add_connection(conn, provider="stripe", display_name="Stale", secrets={"api_key": "sk_test_a"},
                             box=old_box)  # fmt: skip
    with psycopg.connect(database_url) as conn:
        vault.add_connection(conn, provider="stripe", display_name="Knows both", secrets={"api_key": "sk_test_b"},
                             box=SecretBox([old, new]))  # fmt: skip

    # Restarted with the new key, the receiver and the sync work, and write under the new key.
    monkeypatch.setenv("NEXTCRM_SECRET_KEY", new)
    monkeypatch.setenv("NEXTCRM_SECRET_KEY_PREVIOUS", old)
    with receiver(database_url, schema, SecretBox([new, old])) as base:
        assert deliver(base) == 200
    expire_stored_token(database_url, SecretBox([new]), account.connection.id)
    (result,) = sync_xero(database_url, schema, account.connection.id, sandbox_now(own_sandbox).date())
    assert result.status == "success", result.error
    assert account.refreshes() == 1
    # The previous key is dropped: every stored secret opens with the new key alone.
    assert unreadable_with(database_url, schema, SecretBox([new])) == []
