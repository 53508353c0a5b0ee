"""`nextcrm-sandbox`: the provider emulators on loopback, the quickstart demo and the local dev server.

These live beside the runtime, not in it: `nextcrm_pipelines` never imports this package, so a
production install runs without the emulators.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
import psycopg
from psycopg import sql

from nextcrm_pipelines.cli import WEBHOOK_PORT, _box, _fail
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.vault import ensure_local_key
from nextcrm_pipelines.providers import PROVIDERS, get_provider

if TYPE_CHECKING:
    import dagster as dg


@click.group()
def main() -> None:
    """Local emulators of NextCRM's providers, the quickstart demo and the dev server."""


# --- sandbox ----------------------------------------------------------------------------------


@main.command("serve", context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve the emulators on loopback (see --help of `python -m nextcrm_sandbox.server`)."""
    from nextcrm_sandbox import server as sandbox_server

    sandbox_server.main(list(args))


# --- demo and dev -----------------------------------------------------------------------------

DEMO_API_KEY = "sk_test_nextcrm_demo_0000000000000000"
DEMO_DAYS = 7
# The demo connection points here; `make dev` serves the same sandbox account on this port so the
# connection keeps working from the UI and the hourly schedule.
SANDBOX_PORT = 12111
DEMO_WEBHOOK_SECRET = "whsec_nextcrm_demo_0000000000000000"


def _wait_until_serving(url: str, process: Any, timeout: float = 60.0) -> None:
    """Wait until `url` answers (the child `process` started serving it); fail clearly if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _fail(f"the server for {url} exited with code {process.returncode}; see its output above")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    _fail(f"{url} did not answer within {timeout:.0f} s")


def _sandbox(port: int, *, subprocess: bool = False):
    """A sandbox on the well-known port holding the demo Stripe account (same data all day)."""
    from nextcrm_sandbox.server import SandboxServer

    start_of_day = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    try:
        server = SandboxServer(port=port, subprocess=subprocess).start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        _fail(f"cannot serve the sandbox on 127.0.0.1:{port} ({exc}); is `make dev` already running?")
    server.add_stripe_account(api_key=DEMO_API_KEY, seed=7, charges=3000, subscriptions=300, days=30,
                              requests_per_second=100, now=start_of_day)  # fmt: skip
    return server


# One sandbox organisation per accounting provider, connected through the real OAuth flow.
DEMO_ACCOUNTING = (("xero", "Demo Xero", 21), ("quickbooks", "Demo QuickBooks", 22), ("myob", "Demo MYOB", 23))


def _connect_in_sandbox(provider_name: str, client_id: str, secret: str, base_url: str, name: str,
                        database_url: str, **options: Any) -> list[Connection]:  # fmt: skip
    """Run the real OAuth connect flow against the sandbox, whose consent page answers at once.

    The browser step is an HTTP client following the consent redirect to the callback `connect` serves.
    """
    import socket

    import httpx

    from nextcrm_pipelines.core.connect import connect
    from nextcrm_pipelines.core.oauth import OAuthApp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = get_provider(provider_name)
    assert provider.oauth is not None and provider.discover_tenants is not None
    return connect(
        spec=provider.oauth,
        discover=provider.discover_tenants,
        app=OAuthApp(client_id, secret, f"http://127.0.0.1:{port}/callback"),
        database_url=database_url,
        box=_box(),
        base_url=base_url,
        name=name,
        on_url=lambda url: httpx.get(url, follow_redirects=True, timeout=30).raise_for_status(),
        **options,
    )


def _connect_demo_accounting(sandbox: Any, database_url: str, webhooks_to: str | None = None) -> list[Connection]:
    """Register a demo app and organisation per accounting emulator and connect it with OAuth;
    re-running re-connects the same rows (same names, same tenants). With `webhooks_to` (the
    receiver's base URL), the Xero and QuickBooks apps also send their signed webhooks there."""
    from nextcrm_sandbox.myob import MyobControl
    from nextcrm_sandbox.quickbooks import QuickBooksControl
    from nextcrm_sandbox.xero import XeroControl

    controls = {"xero": XeroControl, "quickbooks": QuickBooksControl, "myob": MyobControl}
    # The demo company file's sign-in (the sandbox default: Administrator, no password).
    os.environ.setdefault("MYOB_COMPANY_FILE_USERNAME", "Administrator")
    stored = []
    for provider_name, display_name, seed in DEMO_ACCOUNTING:
        client_id, secret = f"nextcrm-demo-{provider_name}", f"demo-secret-{provider_name}"
        controls[provider_name](sandbox).add_client(client_id, secret)
        tenant = sandbox.control("POST", f"/_sandbox/{provider_name}/tenants", json={
            "client_id": client_id, "seed": seed, "invoices": 600, "contacts": 80, "days": 30})  # fmt: skip
        connected = _connect_in_sandbox(
            provider_name, client_id, secret, f"{sandbox.url}/{provider_name}", display_name, database_url,
            extra_authorize_params={"sandbox_tenant": tenant["id"]}, connection_settings={"requests_per_second": 5},
        )  # fmt: skip
        stored += connected
        if webhooks_to and provider_name in ("xero", "quickbooks"):
            from nextcrm_pipelines.webhooks.app import receiver_url

            signing = f"demo-webhook-key-{provider_name}"
            for connection in connected:
                _store_webhook_secret(database_url, connection, signing)
                url = receiver_url(webhooks_to, provider_name, connection.id)
                if provider_name == "xero":
                    XeroControl(sandbox).subscribe_webhooks(client_id, url, signing)
                else:
                    QuickBooksControl(sandbox).subscribe_webhooks(url, signing, app=client_id)
    return stored


def _store_webhook_secret(database_url: str, connection: Connection, value: str) -> None:
    spec = get_provider(connection.provider).webhooks
    assert spec is not None
    with psycopg.connect(database_url) as conn:
        vault.update_secrets(conn, connection.id, {spec.secret_name: value}, _box())


DEMO_OTHERS = ("Demo PayPal", "Demo BillionMail", "Demo Mautic")


def _connect_demo_others(sandbox: Any, database_url: str, webhooks_to: str | None = None) -> list[Connection]:
    """PayPal (client credentials), BillionMail (admin login) and Mautic (OAuth) demo accounts in the sandbox.

    Their ids come from fixed seeds and credentials, so a re-run (or `make dev`'s own sandbox) serves
    them at the same base URLs and the same connections keep working. With `webhooks_to`, the PayPal
    and Mautic accounts also send their signed webhooks to that receiver.
    """
    from nextcrm_sandbox.billionmail import BillionMailControl
    from nextcrm_sandbox.mautic import MauticControl
    from nextcrm_sandbox.paypal import PayPalControl

    box = _box()
    paypal = PayPalControl(sandbox).add_account("nextcrm-demo-paypal", "demo-secret-paypal", seed=24,
                                                transactions=1500, subscriptions=40, days=30,
                                                requests_per_minute=600)  # fmt: skip
    mail = BillionMailControl(sandbox).add_account(seed=25, campaigns=30, contacts=300, days=30,
                                                   password="demo-password")  # fmt: skip
    mautic = MauticControl(sandbox).add_account(
        seed=26, campaigns=40, contacts=100, days=30,
        clients=[{"client_id": "nextcrm-demo-mautic", "client_secret": "demo-secret-mautic"}],
    )  # fmt: skip
    with psycopg.connect(database_url) as conn:
        stored = [
            vault.add_connection(
                conn, provider="paypal", display_name="Demo PayPal", box=box, base_url=f"{sandbox.url}/paypal",
                secrets={"client_id": "nextcrm-demo-paypal", "client_secret": "demo-secret-paypal",
                         "grant_type": "client_credentials"},
                external_tenant=paypal["id"], settings={"mode": "sandbox", "requests_per_second": 8},
            ),
            vault.add_connection(
                conn, provider="billionmail", display_name="Demo BillionMail", box=box,
                base_url=f"{sandbox.url}{mail['base_path']}",
                secrets={"username": mail["username"], "password": "demo-password"},
            ),
        ]  # fmt: skip
    stored += _connect_in_sandbox("mautic", "nextcrm-demo-mautic", "demo-secret-mautic",
                                  f"{sandbox.url}{mautic['base_path']}", "Demo Mautic", database_url)  # fmt: skip
    if webhooks_to:
        from nextcrm_pipelines.webhooks.app import receiver_url

        for connection in stored:
            url = receiver_url(webhooks_to, connection.provider, connection.id)
            if connection.provider == "paypal":
                control = PayPalControl(sandbox)
                hook = control.subscribe_webhooks(paypal["id"], url, webhook_id="WHDEMO0NEXTCRM01")
                _store_webhook_secret(database_url, connection, hook["webhook_id"])
                with psycopg.connect(database_url) as conn:  # this sandbox's own CA signs its certificates
                    vault.merge_settings(conn, connection.id, {"webhook_ca_pem": control.webhook_ca()})
            elif connection.provider == "mautic":
                MauticControl(sandbox).subscribe_webhooks(mautic["id"], url, "demo-webhook-secret-mautic")
                _store_webhook_secret(database_url, connection, "demo-webhook-secret-mautic")
    return stored


def _table_counts(database_url: str, schema: str) -> list[tuple[str, int]]:
    counts = []
    with psycopg.connect(database_url) as conn:
        for provider in PROVIDERS.values():
            for entity in provider.entities:
                query = sql.SQL("SELECT count(*) FROM {}").format(db.table(entity.table.name, schema))
                counts.append((entity.table.name, conn.execute(query).fetchone()[0]))
    return counts


def _demo_progress(connection: Connection, result: dg.ExecuteInProcessResult, days: int | None) -> str:
    """One line for a connection's demo run: what its assets' materializations counted, summed."""
    names = [entity.name for entity in get_provider(connection.provider).entities]
    totals = dict.fromkeys(("records", "inserted", "updated", "unchanged", "failed"), 0)
    for name in names:
        # Each day of the range is materialised with its own counts: the connection's line sums them.
        for materialization in result.asset_materializations_for_node(name):
            for counter in totals:
                entry = materialization.metadata.get(counter)
                totals[counter] += int(entry.value) if entry is not None else 0
    span = f"{days} day(s)" if days is not None else "the whole list"
    return (
        f"synced {connection.id}: {totals['records']} records, {totals['inserted']} inserted, {totals['updated']} "
        f"updated, {totals['unchanged']} unchanged, {totals['failed']} failed ({', '.join(names)}; {span})"
    )


@main.command("demo")
@click.option("--days", default=DEMO_DAYS, show_default=True, help="How many recent days to materialise.")
def demo(days: int) -> None:
    """Embedded Postgres + sandbox + one demo account per provider (seven); sync recent days; print counts."""
    import dagster as dg

    from nextcrm_pipelines import environment
    from nextcrm_pipelines.assets import SINCE_TAG
    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name, month_key

    created_key = ensure_local_key()
    if created_key:
        click.echo(f"generated a local encryption key at {created_key} (set NEXTCRM_SECRET_KEY in production)")
    env = environment.prepare()
    click.echo(f"database: {settings.redact_url(env.database_url)} (schema {env.schema})")
    with _sandbox(SANDBOX_PORT) as sandbox:
        with psycopg.connect(env.database_url) as conn:
            stripe = vault.add_connection(
                conn, provider="stripe", display_name="Demo Stripe", secrets={"api_key": DEMO_API_KEY},
                box=_box(), base_url=sandbox.url, settings={"requests_per_second": 100},
            )  # fmt: skip
        connections = [
            stripe,
            *_connect_demo_accounting(sandbox, env.database_url),
            *_connect_demo_others(sandbox, env.database_url),
        ]
        instance = dg.DagsterInstance.get()
        today = datetime.now(UTC).date()
        first_day = today - timedelta(days=days - 1)
        for connection in connections:
            instance.add_dynamic_partitions(connections_partitions_name(connection.provider), [connection.id])
            daily = get_provider(connection.provider).daily
            # The months holding the last `days` days, limited to those days (a month is the partition).
            selection = {
                "tags": {
                    "dagster/asset_partition_range_start": f"{connection.id}|{month_key(first_day)}",
                    "dagster/asset_partition_range_end": f"{connection.id}|{month_key(today)}",
                    SINCE_TAG: first_day.isoformat(),
                }
            } if daily else {"partition_key": connection.id}  # fmt: skip
            result = defs.resolve_job_def(f"{connection.provider}_sync").execute_in_process(
                instance=instance,
                # Errors only (a failed partition or step says why); progress is the line printed below.
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                raise_on_error=False,
                **selection,
            )
            if not result.success:
                _fail(f"the demo sync of {connection.id} failed; see the log above")
            click.echo(_demo_progress(connection, result, days if daily else None))
    click.echo(f"materialised {days} day(s) for " + ", ".join(c.id for c in connections) + ":")
    for name, count in _table_counts(env.database_url, env.schema):
        click.echo(f"  {env.schema}.{name}: {count} rows")
    click.echo(f"DATABASE_URL={settings.redact_url(env.database_url)}")


@main.command("dev")
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
def dev(port: int) -> None:
    """Serve the Dagster UI on 127.0.0.1 (and the sandbox, for the demo connection)."""
    import subprocess

    from nextcrm_pipelines import environment

    ensure_local_key()
    env = environment.prepare()
    click.echo(f"database: {settings.redact_url(env.database_url)}; Dagster home: {env.dagster_home}")
    with _sandbox(SANDBOX_PORT, subprocess=True) as sandbox:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "nextcrm_pipelines.cli", "webhooks", "serve", "--port", str(WEBHOOK_PORT)]
        )
        try:
            hooks = f"http://127.0.0.1:{WEBHOOK_PORT}"
            _wait_until_serving(f"{hooks}/healthz", receiver)
            # The sandbox's OAuth state lives in its process: connect the demo organisations to this one, and
            # point the demo accounts' webhooks at the receiver (Xero checks it with intent-to-receive).
            with psycopg.connect(env.database_url) as conn:
                demo = {c.display_name: c for c in vault.list_connections(conn)}
            if "Demo Stripe" in demo:
                from nextcrm_pipelines.webhooks.app import receiver_url
                from nextcrm_sandbox.stripe import StripeControl

                stripe = demo["Demo Stripe"]
                _store_webhook_secret(env.database_url, stripe, DEMO_WEBHOOK_SECRET)
                StripeControl(sandbox).subscribe_webhooks(DEMO_API_KEY, receiver_url(hooks, "stripe", stripe.id),
                                                          DEMO_WEBHOOK_SECRET)  # fmt: skip
            if set(demo) & {name for _, name, _ in DEMO_ACCOUNTING}:
                _connect_demo_accounting(sandbox, env.database_url, webhooks_to=hooks)
            if set(demo) & set(DEMO_OTHERS):
                _connect_demo_others(sandbox, env.database_url, webhooks_to=hooks)
            click.echo(f"sandbox: {sandbox.url}; Dagster UI: http://127.0.0.1:{port}; "
                       f"webhooks: {hooks}/webhooks/<provider>/<connection id>")  # fmt: skip
            workspace = str(settings.PROJECT_ROOT / "workspace.yaml")
            subprocess.run(
                [sys.executable, "-m", "dagster", "dev", "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
                check=False,
            )
        finally:
            receiver.terminate()
            receiver.wait(timeout=10)


if __name__ == "__main__":
    main()
