"""Rotating refresh tokens survive concurrency and crashes (invariant 4 of docs/architecture.md).

Separate operating-system processes sync at the same moment with an expired access token: the
provider's token endpoint must be called once, every sync must succeed, and the stored refresh token
must be the newest (proved by moving the sandbox clock past the old token's grace period and syncing
again). A refresh whose answer is lost before our commit is recovered through the grace period.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import httpx
import psycopg
import pytest

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.http import AuthenticationFailed
from nextcrm_pipelines.core.oauth import OAuthApp, token_request
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
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

SYNC = """
import json, os, sys
from datetime import date
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
provider, entity, connection_id, day = sys.argv[1:5]
results = sync_partitions(database_url=os.environ["DATABASE_URL"], schema=os.environ["NEXTCRM_DB_SCHEMA"],
                          provider=get_provider(provider), entity_name=entity, connection_id=connection_id,
                          windows=[day_window(date.fromisoformat(day))])
print(json.dumps([[r.status, r.total, r.error] for r in results]))
"""


def sync_in_processes(database_url: str, jobs: list[tuple[str, str, str, str]]) -> list[list]:
    """Start one Python process per (provider, entity, connection, day) at once; their results."""
    env = {**os.environ, "DATABASE_URL": database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SYNC, *job], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for job in jobs
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def sync_once(database_url: str, schema: str, account, day) -> list:
    return sync_partitions(database_url=database_url, schema=schema, provider=get_provider(account.profile.provider),
                           entity_name=account.profile.entity, connection_id=account.connection.id,
                           windows=[day_window(day)])  # fmt: skip


@pytest.mark.parametrize("entity", ["xero_invoices", "quickbooks_invoices"])
def test_two_processes_with_an_expired_token_refresh_once_and_keep_the_newest(
    database_url, schema, box, own_sandbox, entity
):
    profile = PROFILES[entity]
    account = connect_account(own_sandbox, database_url, box, profile, invoices=40, contacts=10, customers=10,
                              days=2)  # fmt: skip
    original = stored_secrets(database_url, box, account.connection.id)
    if profile.provider == "quickbooks":
        # QuickBooks hands out a new refresh token only once the current one is a day old.
        own_sandbox.advance_clock(timedelta(hours=25).total_seconds())
    account.expire_access()
    expire_stored_token(database_url, box, account.connection.id)
    day = sandbox_now(own_sandbox).date().isoformat()

    outcomes = sync_in_processes(database_url, [(profile.provider, entity, account.connection.id, day)] * 2)

    assert [o[0][0] for o in outcomes] == ["success", "success"], outcomes
    assert account.refreshes() == 1
    stored = stored_secrets(database_url, box, account.connection.id)
    assert stored["refresh_token"] != original["refresh_token"]
    # The stored refresh token is the newest: once the previous one is past its grace period (Xero
    # 30 minutes, QuickBooks 24 hours), a refresh with the stored token still works.
    own_sandbox.advance_clock(timedelta(hours=25).total_seconds())
    account.expire_access()
    expire_stored_token(database_url, box, account.connection.id)
    (result,) = sync_once(database_url, schema, account, sandbox_now(own_sandbox).date())
    assert result.status == "success" and account.refreshes() == 2


def test_tenants_sharing_one_xero_grant_refresh_it_once(database_url, schema, box, own_sandbox):
    control = CONTROLS["xero"](own_sandbox)
    client_id, secret = register_app(control)
    tenants = [control.add_tenant(client_id, seed=seed, invoices=30, contacts=5, days=2,
                                  minute_window_seconds=2)["id"] for seed in (1, 2)]  # fmt: skip
    provider = get_provider("xero")
    app = OAuthApp(client_id, secret, f"http://127.0.0.1:{free_port()}/callback")
    connections = connect(spec=provider.oauth, discover=provider.discover_tenants, app=app, database_url=database_url,
                          box=box, base_url=f"{own_sandbox.url}/xero", name="Group", on_url=consent,
                          connection_settings={"requests_per_second": 0})  # fmt: skip
    assert sorted(c.external_tenant for c in connections) == sorted(tenants)
    assert len({c.settings["token_group"] for c in connections}) == 1
    grant = [g for g in control.oauth_state()["grants"] if g["client_id"] == client_id][-1]["id"]
    control.expire_access(grant)
    for connection in connections:
        expire_stored_token(database_url, box, connection.id)
    day = sandbox_now(own_sandbox).date().isoformat()

    outcomes = sync_in_processes(database_url, [("xero", "xero_invoices", c.id, day) for c in connections])

    assert [o[0][0] for o in outcomes] == ["success", "success"], outcomes
    assert control.oauth_state()["stats"].get(f"refresh_token:{grant}") == 1
    tokens = {stored_secrets(database_url, box, c.id)["refresh_token"] for c in connections}
    assert len(tokens) == 1  # both organisations hold the one newest refresh token


def test_a_refresh_answer_lost_before_our_commit_is_recovered_in_the_grace_period(
    database_url, schema, box, own_sandbox
):
    account = connect_account(own_sandbox, database_url, box, PROFILES["xero_invoices"], invoices=20, days=1)
    spec = get_provider("xero").oauth
    stored = stored_secrets(database_url, box, account.connection.id)

    def lost_refresh() -> None:
        """A process got the provider's new tokens and died before committing them."""
        with httpx.Client() as http:
            token_request(spec, client_id=stored["client_id"], client_secret=stored["client_secret"],
                          grant_type="refresh_token", base_url=account.connection.base_url, http=http,
                          refresh_token=stored["refresh_token"])  # fmt: skip

    lost_refresh()
    own_sandbox.advance_clock(timedelta(minutes=10).total_seconds())
    account.expire_access()
    expire_stored_token(database_url, box, account.connection.id)
    (result,) = sync_once(database_url, schema, account, sandbox_now(own_sandbox).date())
    assert result.status == "success" and account.refreshes() == 2
    stored = stored_secrets(database_url, box, account.connection.id)

    # Past Xero's 30-minute grace the old token is dead: the connection asks to be reconnected.
    lost_refresh()
    own_sandbox.advance_clock(timedelta(minutes=31).total_seconds())
    expire_stored_token(database_url, box, account.connection.id)
    with pytest.raises(AuthenticationFailed, match="invalid_grant"):
        sync_once(database_url, schema, account, sandbox_now(own_sandbox).date())
    with psycopg.connect(database_url) as conn:
        assert vault.get_connection(conn, account.connection.id).status == "needs_reauth"
