"""Secrets survive token refreshes and key rotation.

A refresh of a token group whose one sibling cannot be decrypted keeps the rotated refresh token for
the others (the emulator revokes the old one once its grace period ends). `secrets rotate`, run while a
receiver, a sync and a connect flow hold the old key, leaves no row encrypted under a key that is then
dropped: writes in flight finish before the rotation re-encrypts, and a process without the recorded
current key refuses to write before it calls any token endpoint.
"""

from __future__ import annotations

from datetime import timedelta

import psycopg
from cryptography.fernet import Fernet
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    CONTROLS,
    consent,
    expire_stored_token,
    free_port,
    register_app,
    stored_secrets,
)
from nextcrm_pipelines_tests.helpers import sandbox_now


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
