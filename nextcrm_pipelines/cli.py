"""`nextcrm-pipelines`: database, connections, secrets, sandbox, demo and dev server commands.

Secrets are read from the provider's environment variable or a hidden prompt, never from a
command-line argument (which would land in shell history and `ps`).
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click
import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.vault import SecretBox, VaultError, ensure_local_key
from nextcrm_pipelines.providers import PROVIDERS, get_provider

if TYPE_CHECKING:
    import dagster as dg


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group()
def main() -> None:
    """NextCRM integration pipelines: provider data mirrored into Postgres by Dagster."""


# --- database ---------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """The Postgres database (DATABASE_URL, or the embedded server)."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema to the latest migration."""
    from nextcrm_pipelines import environment

    env = environment.prepare(upgrade=False)
    revision = db.upgrade(env.database_url, env.schema)
    click.echo(f"schema {env.schema} at revision {revision} on {settings.redact_url(env.database_url)}")


@db_group.command("url")
def db_url() -> None:
    """Print the database URL (password redacted), starting the embedded server if needed."""
    click.echo(settings.redact_url(settings.database_url()))


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded server (no effect when DATABASE_URL points elsewhere)."""
    from nextcrm_pipelines.core.embedded_pg import stop_embedded_postgres

    stopped = stop_embedded_postgres(settings.data_dir())
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")


# --- connections ------------------------------------------------------------------------------


def _box() -> SecretBox:
    try:
        return SecretBox.from_environment()
    except VaultError as exc:
        _fail(str(exc))
        raise


def _register_partition(provider: str, connection_id: str) -> None:
    """Make the connection visible in the Dagster UI now (the connections sensor would, too)."""
    from dagster import DagsterInstance

    from nextcrm_pipelines.partitions import connections_partitions_name

    try:
        instance = DagsterInstance.get()
        name = connections_partitions_name(provider)
        if not instance.has_dynamic_partition(name, connection_id):
            instance.add_dynamic_partitions(name, [connection_id])
    except Exception as exc:
        click.echo(f"note: the Dagster instance was not updated ({type(exc).__name__}); "
                   "the connections sensor will add the partition", err=True)  # fmt: skip


@main.group("connections")
def connections_group() -> None:
    """Connected provider accounts (secrets encrypted at rest)."""


@connections_group.command("add")
@click.argument("provider", type=click.Choice(sorted(p.name for p in PROVIDERS.values() if p.secret_fields)))
@click.option("--name", "display_name", required=True, help="Display name of the account.")
@click.option("--tenant", "external_tenant", help="Provider account/tenant id (Stripe: acct_... for Connect).")
@click.option("--base-url", help="API base URL override (a sandbox); default: the provider's real API.")
@click.option("--setting", "settings_kv", multiple=True, help="Non-secret option key=value (repeatable).")
def connections_add(provider: str, display_name: str, external_tenant: str | None, base_url: str | None,
                    settings_kv: tuple[str, ...]) -> None:  # fmt: skip
    """Add (or re-connect) an account. Secrets come from the environment or a hidden prompt."""
    from nextcrm_pipelines import environment

    spec = get_provider(provider)
    secrets: dict[str, str] = {}
    for field in spec.secret_fields:
        value = os.environ.get(field.env_var)
        if not value and field.optional:
            continue
        if not value:
            if not sys.stdin.isatty():
                _fail(f"set {field.env_var} (or run interactively to be prompted)")
            value = click.prompt(field.prompt, hide_input=True)
        secrets[field.name] = value.strip()
    secrets.update(spec.fixed_secrets)
    if spec.base_url_env and not base_url:
        base_url = os.environ.get(spec.base_url_env, "").strip() or None
        if not base_url:
            _fail(f"{provider} is self-hosted: pass --base-url or set {spec.base_url_env}")
    options: dict[str, object] = {
        name: os.environ.get(variable, default).strip().lower()
        for name, (variable, default) in spec.env_settings.items()
    }
    for item in settings_kv:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--setting expects key=value, got {item!r}")
        options[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        connection = vault.add_connection(
            conn, provider=provider, display_name=display_name, secrets=secrets, box=_box(),
            external_tenant=external_tenant, base_url=base_url, settings=options,
        )  # fmt: skip
    _register_partition(provider, connection.id)
    click.echo(f"connection {connection.id} ({provider}, {display_name!r}) is active")


@main.command("connect")
@click.argument("provider", type=click.Choice(sorted(p.name for p in PROVIDERS.values() if p.discover_tenants)))
@click.option("--name", "display_name", help="Display name (default: the organisation's name from the provider).")
@click.option("--base-url", help="Provider base URL override, e.g. the sandbox: http://127.0.0.1:12111/xero.")
@click.option("--open-browser", is_flag=True, help="Open the authorisation URL in a browser too.")
@click.option("--timeout", default=300, show_default=True, help="Seconds to wait for the provider's redirect.")
def connect_command(provider: str, display_name: str | None, base_url: str | None, open_browser: bool,
                    timeout: int) -> None:  # fmt: skip
    """Authorise an account with OAuth and store one connection per organisation it reaches.

    The app comes from <PROVIDER>_CLIENT_ID, <PROVIDER>_CLIENT_SECRET and <PROVIDER>_REDIRECT_URI
    (an http://localhost:<port>/<path> URI registered with the provider; this command listens there).
    Headless: open the printed URL on any machine whose browser can reach that redirect URI.
    """
    import webbrowser

    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.connect import ConnectError, connect
    from nextcrm_pipelines.core.http import ProviderError
    from nextcrm_pipelines.core.oauth import OAuthConfigError

    spec = get_provider(provider)
    assert spec.oauth is not None and spec.discover_tenants is not None
    try:
        app = spec.oauth.app_from_environment()
    except OAuthConfigError as exc:
        _fail(str(exc))
        raise
    if not base_url and spec.base_url_env:
        base_url = os.environ.get(spec.base_url_env, "").strip() or None
    extra: dict[str, object] = {}
    if provider == "quickbooks":
        extra["environment"] = os.environ.get("QUICKBOOKS_ENVIRONMENT", "sandbox").strip().lower()
    env = environment.prepare()

    def show(url: str) -> None:
        click.echo(f"Authorise {provider} in a browser (waiting up to {timeout}s for the redirect to "
                   f"{app.redirect_uri}):\n{url}")  # fmt: skip
        if open_browser:
            webbrowser.open(url)

    try:
        stored = connect(spec=spec.oauth, discover=spec.discover_tenants, app=app, database_url=env.database_url,
                         box=_box(), base_url=base_url, name=display_name, on_url=show, timeout=timeout,
                         connection_settings=extra)  # fmt: skip
    except (ConnectError, OAuthConfigError, ProviderError) as exc:
        _fail(str(exc))
        raise
    for connection in stored:
        _register_partition(provider, connection.id)
        click.echo(f"connection {connection.id} ({provider}, {connection.display_name!r}, "
                   f"tenant {connection.external_tenant}) is active")  # fmt: skip


@connections_group.command("list")
def connections_list() -> None:
    """List connections and their sync state (never their secrets)."""
    from nextcrm_pipelines import environment

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        rows = vault.list_connections(conn)
    if not rows:
        click.echo("no connections yet: add one with `nextcrm-pipelines connections add stripe --name ...`")
        return
    click.echo(f"{'id':32} {'provider':10} {'status':13} {'last sync':10} {'last synced at':25} error")
    for c in rows:
        synced = c.last_synced_at.isoformat(timespec="seconds") if c.last_synced_at else "-"
        click.echo(f"{c.id:32} {c.provider:10} {c.status:13} {c.sync_status:10} {synced:25} {c.last_error or ''}")


def _set_status(connection_id: str, status: str) -> None:
    from nextcrm_pipelines import environment

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        vault.get_connection(conn, connection_id)
        vault.set_status(conn, connection_id, status)
    click.echo(f"connection {connection_id} is {status}")


@connections_group.command("disable")
@click.argument("connection_id")
def connections_disable(connection_id: str) -> None:
    """Stop syncing a connection (its data and history stay)."""
    _set_status(connection_id, "disabled")


@connections_group.command("enable")
@click.argument("connection_id")
def connections_enable(connection_id: str) -> None:
    """Resume syncing a disabled connection."""
    _set_status(connection_id, "active")


# --- secrets ----------------------------------------------------------------------------------


@main.group("secrets")
def secrets_group() -> None:
    """The encryption key of the connection vault."""


@secrets_group.command("generate-key")
def secrets_generate_key() -> None:
    """Print a new key for NEXTCRM_SECRET_KEY."""
    from cryptography.fernet import Fernet

    click.echo(Fernet.generate_key().decode())


@secrets_group.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored secret under the current key, and record it as the vault's key.

    With env keys: set NEXTCRM_SECRET_KEY to the new key and NEXTCRM_SECRET_KEY_PREVIOUS to the
    old one(s), run this, then drop the old keys. With the local key file (demo): a new key is
    generated, everything is re-encrypted, and the file then holds only the new key.

    Safe while receivers and syncs run: secrets being written when it starts are written first and
    then re-encrypted. Afterwards every write of secrets uses the recorded key, and a process that
    was started without it (the old key only) refuses to write, before it calls any token endpoint,
    saying to restart it with the new key. No row is left under the old key once this has finished,
    so the old key can be dropped then; restart the processes that ran with it alone.
    """
    from cryptography.fernet import Fernet

    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core import vault as keys

    env = environment.prepare()
    uses_file = not os.environ.get("NEXTCRM_SECRET_KEY")
    if uses_file:
        old = keys.configured_keys()
        if not old:
            _fail("no key configured: nothing to rotate")
        new = Fernet.generate_key().decode()
        box = SecretBox([new, *old])
        keys.key_file().write_text("\n".join([new, *old]) + "\n")
    else:
        box = _box()
    with psycopg.connect(env.database_url) as conn:
        rotated, current = vault.rotate_secrets(conn, box)
    if uses_file:
        keys.key_file().write_text(new + "\n")
    click.echo(f"re-encrypted {rotated} connection secret(s); {current} already used the current key "
               f"(fingerprint {box.fingerprint}, now recorded as the vault's key)")  # fmt: skip


# --- sandbox ----------------------------------------------------------------------------------


@main.group("sandbox")
def sandbox_group() -> None:
    """Local emulators of the providers (demo and tests)."""


@sandbox_group.command("serve", context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sandbox_serve(args: tuple[str, ...]) -> None:
    """Serve the emulators on loopback (see --help of `python -m nextcrm_pipelines.sandbox.server`)."""
    from nextcrm_pipelines.sandbox import server

    server.main(list(args))


# --- demo and dev -----------------------------------------------------------------------------

DEMO_API_KEY = "sk_test_nextcrm_demo_0000000000000000"
DEMO_DAYS = 7
# The demo connection points here; `make dev` serves the same sandbox account on this port so the
# connection keeps working from the UI and the hourly schedule.
SANDBOX_PORT = 12111
WEBHOOK_PORT = 8787
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
    from nextcrm_pipelines.sandbox.server import SandboxServer

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
    from nextcrm_pipelines.sandbox.myob import MyobControl
    from nextcrm_pipelines.sandbox.quickbooks import QuickBooksControl
    from nextcrm_pipelines.sandbox.xero import XeroControl

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
    from nextcrm_pipelines.sandbox.billionmail import BillionMailControl
    from nextcrm_pipelines.sandbox.mautic import MauticControl
    from nextcrm_pipelines.sandbox.paypal import PayPalControl

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
        # A run over a range of days materializes each day with the same metadata: the run's totals.
        for materialization in result.asset_materializations_for_node(name)[:1]:
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
    """Embedded Postgres + sandbox + a demo Stripe connection; materialise recent days; print counts."""
    import dagster as dg

    from nextcrm_pipelines import environment
    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name

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
        day_keys = [(today - timedelta(days=n)).isoformat() for n in range(days - 1, -1, -1)]
        for connection in connections:
            instance.add_dynamic_partitions(connections_partitions_name(connection.provider), [connection.id])
            daily = get_provider(connection.provider).daily
            selection = {
                "tags": {
                    "dagster/asset_partition_range_start": f"{connection.id}|{day_keys[0]}",
                    "dagster/asset_partition_range_end": f"{connection.id}|{day_keys[-1]}",
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
            click.echo(_demo_progress(connection, result, len(day_keys) if daily else None))
    click.echo(f"materialised {len(day_keys)} day(s) for " + ", ".join(c.id for c in connections) + ":")
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
                from nextcrm_pipelines.sandbox.stripe import StripeControl
                from nextcrm_pipelines.webhooks.app import receiver_url

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


@main.group("webhooks")
def webhooks_group() -> None:
    """The webhook receiver (verified provider events into the inbox)."""


@webhooks_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=WEBHOOK_PORT, show_default=True, help="Port to listen on.")
def webhooks_serve(host: str, port: int) -> None:
    """Serve POST /webhooks/{provider}/{connection_id} until interrupted."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.webhooks.app import serve

    env = environment.prepare()
    _box()  # fail now, clearly, when no encryption key is configured
    click.echo(f"webhook receiver on http://{host}:{port}/webhooks/<provider>/<connection id>")
    serve(database_url=env.database_url, schema=env.schema, host=host, port=port)


@webhooks_group.command("configure")
@click.argument("connection_id")
@click.option("--base-url", default=f"http://127.0.0.1:{WEBHOOK_PORT}", show_default=True,
              help="Public base URL of the receiver (what the provider can reach).")  # fmt: skip
def webhooks_configure(connection_id: str, base_url: str) -> None:
    """Store a connection's webhook signing secret and print the URL to register with the provider."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.webhooks.app import receiver_url

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        connection = vault.get_connection(conn, connection_id)
        spec = get_provider(connection.provider).webhooks
        if spec is None:
            raise click.ClickException(f"{connection.provider} sends no webhooks: its syncs poll")
        value = os.environ.get(spec.env_var) or click.prompt(
            f"{connection.provider} webhook {spec.secret_name.replace('_', ' ')} (or set {spec.env_var})",
            hide_input=True,
        )
        vault.update_secrets(conn, connection_id, {spec.secret_name: value}, _box())
    click.echo(f"stored the webhook {spec.secret_name} of {connection_id} (encrypted)")
    url = receiver_url(base_url, connection.provider, connection_id)
    click.echo(f"register this endpoint with {connection.provider}: {url}")


@webhooks_group.command("replay")
@click.option("--provider", "provider_name", type=click.Choice(sorted(PROVIDERS)), help="Only this provider's events.")
@click.option("--connection", "connection_id", help="Only this connection's events.")
@click.option("--event", "event_ids", multiple=True, help="Only these provider event ids (repeatable).")
@click.option("--status", "statuses", multiple=True, default=("dead",), show_default=True,
              type=click.Choice(["dead", "failed", "processed"]), help="Statuses to re-queue.")  # fmt: skip
def webhooks_replay(provider_name: str | None, connection_id: str | None, event_ids: tuple[str, ...],
                    statuses: tuple[str, ...]) -> None:  # fmt: skip
    """Re-queue inbox events (by default the dead ones) so the next sensor tick applies them again."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.webhooks.inbox import requeue

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        requeued, unreadable = requeue(conn, env.schema, provider=provider_name, connection_id=connection_id,
                                       event_ids=event_ids, statuses=statuses)  # fmt: skip
    click.echo(f"re-queued {requeued} event(s); the webhook sensors apply them on their next tick")
    if unreadable:
        click.echo(f"left {unreadable} refused body(ies) as they are: they hold no readable event", err=True)


# --- ad-hoc sync --------------------------------------------------------------------------------


@main.command("sync")
@click.argument("connection_id")
@click.option("--entity", "entities", multiple=True, help="Entity to sync (default: all of the provider's).")
@click.option("--from", "start", type=click.DateTime(["%Y-%m-%d"]), required=True, help="First day (UTC).")
@click.option("--to", "end", type=click.DateTime(["%Y-%m-%d"]), help="Last day (UTC, inclusive; default: --from).")
def sync(connection_id: str, entities: tuple[str, ...], start: datetime, end: datetime | None) -> None:
    """Sync days of one connection outside Dagster (same engine, same sync logs)."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.runner import day_window, sync_partitions

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        connection = vault.get_connection(conn, connection_id)
    provider = get_provider(connection.provider)
    first, last = start.date(), (end or start).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    failed = 0
    for name in entities or [e.name for e in provider.entities]:
        results = sync_partitions(
            database_url=env.database_url, schema=env.schema, provider=provider, entity_name=name,
            connection_id=connection_id, windows=[day_window(d) for d in days],
            partitions=[f"{connection_id}|{d}" for d in days],
        )  # fmt: skip
        for day, result in zip(days, results, strict=True):
            click.echo(f"{name} {day}: {result.summary()}" + (f" - {result.error}" if result.error else ""))
            failed += result.status == "failed"
    if failed:
        _fail(f"{failed} partition(s) failed; committed data stays, re-run to finish")


if __name__ == "__main__":
    main()
