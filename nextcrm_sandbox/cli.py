"""`nextcrm-sandbox`: the provider emulators on loopback, the quickstart demo and the local dev server.

These live beside the runtime, not in it: `nextcrm_pipelines` never imports this package, so a
production install runs without the emulators.

`dev` is a small supervisor: it serves the sandbox (its state kept in the data folder), the webhook
receiver, a Dagster code server, the Dagster webserver and the daemon as children of its own, each in a
process group of its own, restarts one that exits, and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import psycopg
from psycopg import sql

from nextcrm_pipelines.cli import WEBHOOK_PORT, _box, _fail
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.vault import ensure_local_key
from nextcrm_pipelines.providers import PROVIDERS, get_provider
from nextcrm_sandbox.server import READY_PREFIX, serve_command

if TYPE_CHECKING:
    import dagster as dg


@click.group()
def main() -> None:
    """Local emulators of NextCRM's providers, the quickstart demo and the dev server."""


main.add_command(serve_command, "serve")


# --- demo and dev -----------------------------------------------------------------------------

DEMO_API_KEY = "sk_test_nextcrm_demo_0000000000000000"
DEMO_DAYS = 7
# The demo connections point here; `make dev` serves the same sandbox accounts (on this port unless
# SANDBOX_PORT says otherwise, and then the demo connections are pointed at that port).
SANDBOX_PORT = 12111
UI_PORT = 3000
DEMO_WEBHOOK_SECRET = "whsec_nextcrm_demo_0000000000000000"


def _sandbox(port: int) -> Any:
    """The sandbox of the data folder (restored from `sandbox/` there, as `make dev` serves it) on `port`."""
    from nextcrm_sandbox.server import SandboxServer

    try:
        return SandboxServer(port=port, state_dir=sandbox_state_dir()).start()
    except (OSError, RuntimeError, TimeoutError) as exc:
        _fail(f"cannot serve the sandbox on 127.0.0.1:{port} ({exc}); is `make dev` already running?")


def sandbox_state_dir() -> Path:
    """Where the sandbox keeps its accounts between runs of `demo` and `dev`."""
    return settings.data_dir() / "sandbox"


# The demo's data begins 30 days before its first run; its partitions begin with that month.
DEMO_HISTORY_DAYS = 30


def demo_start_date(create: bool) -> str | None:
    """The first day the demo's partitions cover: chosen by the first `make demo` (the month its sandbox data
    begins) and kept in the data folder, so a connection synced for 30 days does not look almost all missing
    beside three years of empty months. None when no demo has run (and `create` is false)."""
    from nextcrm_pipelines.partitions import month_key

    kept = settings.data_dir() / "demo-start-date"
    if kept.exists():
        return kept.read_text().strip()
    if not create:
        return None
    first = month_key(datetime.now(UTC).date() - timedelta(days=DEMO_HISTORY_DAYS))
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(first + "\n")
    return first


def _use_demo_start_date(create: bool) -> None:
    """Start the partitions at the demo's first month unless NEXTCRM_SYNC_START_DATE says otherwise."""
    if not os.environ.get("NEXTCRM_SYNC_START_DATE"):
        first = demo_start_date(create)
        if first is not None:
            os.environ["NEXTCRM_SYNC_START_DATE"] = first


def _add_demo_stripe(sandbox: Any) -> None:
    """The demo Stripe account, generated from a fixed seed with the clock at the start of today."""
    start_of_day = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    sandbox.control("POST", "/_sandbox/stripe/accounts", json={
        "api_key": DEMO_API_KEY, "seed": 7, "charges": 3000, "subscriptions": 300, "days": 30,
        "requests_per_second": 100, "now": start_of_day})  # fmt: skip


# One sandbox organisation per accounting provider, connected through the real OAuth flow.
DEMO_ACCOUNTING = (("xero", "Demo Xero", 21), ("quickbooks", "Demo QuickBooks", 22), ("myob", "Demo MYOB", 23))


def _connect_in_sandbox(provider_name: str, client_id: str, secret: str, base_url: str, name: str,
                        database_url: str, **options: Any) -> list[Connection]:  # fmt: skip
    """Run the real OAuth connect flow against the sandbox, whose consent page answers at once.

    The browser step is an HTTP client following the consent redirect to the callback `connect` serves.
    """
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


def _demo_client_id(provider_name: str) -> str:
    return f"nextcrm-demo-{provider_name}"


def _connect_demo_accounting_one(sandbox: Any, provider_name: str, display_name: str, seed: int,
                                 database_url: str) -> list[Connection]:  # fmt: skip
    """Register the demo app and organisation of one accounting emulator and connect it with OAuth;
    re-running re-connects the same rows (same name, same tenant)."""
    from nextcrm_sandbox.myob import MyobControl
    from nextcrm_sandbox.quickbooks import QuickBooksControl
    from nextcrm_sandbox.xero import XeroControl

    controls = {"xero": XeroControl, "quickbooks": QuickBooksControl, "myob": MyobControl}
    # The demo company file's sign-in (the sandbox default: Administrator, no password).
    os.environ.setdefault("MYOB_COMPANY_FILE_USERNAME", "Administrator")
    client_id, secret = _demo_client_id(provider_name), f"demo-secret-{provider_name}"
    controls[provider_name](sandbox).add_client(client_id, secret)
    tenant = sandbox.control("POST", f"/_sandbox/{provider_name}/tenants", json={
        "client_id": client_id, "seed": seed, "invoices": 600, "contacts": 80, "days": 30})  # fmt: skip
    return _connect_in_sandbox(
        provider_name, client_id, secret, f"{sandbox.url}/{provider_name}", display_name, database_url,
        extra_authorize_params={"sandbox_tenant": tenant["id"]}, connection_settings={"requests_per_second": 5},
    )  # fmt: skip


def _connect_demo_accounting(sandbox: Any, database_url: str) -> list[Connection]:
    """The demo organisation of each accounting emulator (Xero, QuickBooks, MYOB), connected with OAuth."""
    stored = []
    for provider_name, display_name, seed in DEMO_ACCOUNTING:
        stored += _connect_demo_accounting_one(sandbox, provider_name, display_name, seed, database_url)
    return stored


def _store_webhook_secret(database_url: str, connection: Connection, value: str) -> None:
    spec = get_provider(connection.provider).webhooks
    assert spec is not None
    with psycopg.connect(database_url) as conn:
        vault.update_secrets(conn, connection.id, {spec.secret_name: value}, _box())


DEMO_OTHERS = ("Demo PayPal", "Demo BillionMail", "Demo Mautic")


def _add_demo_paypal(sandbox: Any, database_url: str) -> Connection:
    """The demo PayPal merchant (client credentials); its id comes from a fixed seed and client id."""
    from nextcrm_sandbox.paypal import PayPalControl

    paypal = PayPalControl(sandbox).add_account(_demo_client_id("paypal"), "demo-secret-paypal", seed=24,
                                                transactions=1500, subscriptions=40, days=30,
                                                requests_per_minute=600)  # fmt: skip
    with psycopg.connect(database_url) as conn:
        return vault.add_connection(
            conn, provider="paypal", display_name="Demo PayPal", box=_box(), base_url=f"{sandbox.url}/paypal",
            secrets={"client_id": _demo_client_id("paypal"), "client_secret": "demo-secret-paypal",
                     "grant_type": "client_credentials"},
            external_tenant=paypal["id"], settings={"mode": "sandbox", "requests_per_second": 8},
        )  # fmt: skip


def _add_demo_billionmail(sandbox: Any, database_url: str) -> Connection:
    """The demo BillionMail installation (admin login); its id comes from a fixed seed."""
    from nextcrm_sandbox.billionmail import BillionMailControl

    mail = BillionMailControl(sandbox).add_account(seed=25, campaigns=30, contacts=300, days=30,
                                                   password="demo-password")  # fmt: skip
    with psycopg.connect(database_url) as conn:
        return vault.add_connection(
            conn, provider="billionmail", display_name="Demo BillionMail", box=_box(),
            base_url=f"{sandbox.url}{mail['base_path']}",
            secrets={"username": mail["username"], "password": "demo-password"},
        )  # fmt: skip


def _connect_demo_mautic(sandbox: Any, database_url: str) -> list[Connection]:
    """The demo Mautic installation, connected with OAuth; its id comes from a fixed seed."""
    from nextcrm_sandbox.mautic import MauticControl

    mautic = MauticControl(sandbox).add_account(
        seed=26, campaigns=40, contacts=100, days=30,
        clients=[{"client_id": _demo_client_id("mautic"), "client_secret": "demo-secret-mautic"}],
    )  # fmt: skip
    return _connect_in_sandbox("mautic", _demo_client_id("mautic"), "demo-secret-mautic",
                               f"{sandbox.url}{mautic['base_path']}", "Demo Mautic", database_url)  # fmt: skip


def _connect_demo_others(sandbox: Any, database_url: str) -> list[Connection]:
    """PayPal (client credentials), BillionMail (admin login) and Mautic (OAuth) demo accounts in the sandbox.

    Their ids come from fixed seeds and credentials, so a re-run (or `make dev`'s own sandbox) serves
    them at the same base URLs and the same connections keep working.
    """
    return [
        _add_demo_paypal(sandbox, database_url),
        _add_demo_billionmail(sandbox, database_url),
        *_connect_demo_mautic(sandbox, database_url),
    ]


# The signing secret each demo account's webhooks use (PayPal's is the id of the webhook the sandbox
# registers: a new one for each receiver address, as PayPal keeps a webhook id for good).
_DEMO_HOOK_KEYS = {"stripe": DEMO_WEBHOOK_SECRET, "xero": "demo-webhook-key-xero",
                   "quickbooks": "demo-webhook-key-quickbooks", "mautic": "demo-webhook-secret-mautic"}  # fmt: skip


def _subscribe_demo_webhooks(sandbox: Any, database_url: str, hooks: str, connection: Connection,
                             subscriptions: list[dict[str, Any]]) -> bool:  # fmt: skip
    """Have the sandbox deliver a demo connection's webhooks to the receiver at `hooks`; True when it subscribed.

    A subscription already delivering there (restored with the sandbox) is kept; one to another receiver
    address of the same connection (an earlier WEBHOOK_PORT) is removed first, so events are sent once.
    """
    from nextcrm_pipelines.webhooks.app import receiver_url
    from nextcrm_sandbox.mautic import MauticControl
    from nextcrm_sandbox.paypal import PayPalControl
    from nextcrm_sandbox.quickbooks import QuickBooksControl
    from nextcrm_sandbox.stripe import StripeControl
    from nextcrm_sandbox.xero import XeroControl

    provider = connection.provider
    url = receiver_url(hooks, provider, connection.id)
    if any(sub["url"] == url for sub in subscriptions):
        return False
    path = urlsplit(url).path
    for sub in subscriptions:
        if urlsplit(sub["url"]).path == path:
            sandbox.control("DELETE", f"/_sandbox/{provider}/webhooks/{sub['id']}")
    key = _DEMO_HOOK_KEYS.get(provider)
    if provider == "stripe":
        StripeControl(sandbox).subscribe_webhooks(DEMO_API_KEY, url, DEMO_WEBHOOK_SECRET)
    elif provider == "xero":  # the intent-to-receive check reaches the receiver now
        XeroControl(sandbox).subscribe_webhooks(_demo_client_id("xero"), url, key)
    elif provider == "quickbooks":
        QuickBooksControl(sandbox).subscribe_webhooks(url, key, app=_demo_client_id("quickbooks"))
    elif provider == "mautic":
        account = urlsplit(connection.base_url or "").path.rstrip("/").rsplit("/", 1)[-1]
        MauticControl(sandbox).subscribe_webhooks(account, url, key)
    elif provider == "paypal":
        control = PayPalControl(sandbox)
        key = control.subscribe_webhooks(connection.external_tenant, url)["webhook_id"]
        with psycopg.connect(database_url) as conn:  # this sandbox's own CA signs its certificates
            vault.merge_settings(conn, connection.id, {"webhook_ca_pem": control.webhook_ca()})
    else:
        return False
    _store_webhook_secret(database_url, connection, key)
    return True


DEMO_NAMES = {"stripe": "Demo Stripe", **{p: name for p, name, _ in DEMO_ACCOUNTING},
              "paypal": "Demo PayPal", "billionmail": "Demo BillionMail", "mautic": "Demo Mautic"}  # fmt: skip


def _restored(listing: dict[str, Any], connection: Connection) -> bool:
    """Whether the sandbox (restored from its state) already holds the account a demo connection points at."""
    entry = listing.get(connection.provider) or {}
    if connection.provider in ("xero", "quickbooks", "myob"):
        client_id = _demo_client_id(connection.provider)
        return any(tenant.get("client_id") == client_id for tenant in entry.get("tenants", []))
    if connection.provider == "paypal":
        return any(account.get("client_id") == _demo_client_id("paypal") for account in entry.get("accounts", []))
    if connection.provider == "mautic":
        return any(_demo_client_id("mautic") in account.get("clients", []) for account in entry.get("accounts", []))
    if connection.provider == "billionmail":
        path = urlsplit(connection.base_url or "").path
        return any(path.endswith(f"/{account['id']}") for account in entry.get("accounts", []))
    return False


def _on_sandbox(url: str | None, sandbox_url: str) -> str | None:
    """`url` moved to the sandbox at `sandbox_url` (same path) when it is a loopback address; else None."""
    if not url or not url.startswith(("http://", "https://")):
        return None
    parts = urlsplit(url)
    return sandbox_url + parts.path if parts.hostname in ("127.0.0.1", "localhost") else None


def _provision_dev(sandbox: Any, database_url: str, hooks: str | None) -> list[str]:
    """Make the dev sandbox serve what the demo connections in the database point at; returns what it did.

    Demo connections are first pointed at this sandbox's address (the account ids in their paths come from
    fixed seeds, so they stay right). An account the sandbox restored from its state is kept as it is (its
    records, grants and tokens live on); a missing one is created, and an OAuth one connected again. Then
    the webhooks of the demo connections go to the receiver at `hooks`. The demo Stripe account is always
    there. A provider that fails is named and the others are still set up.
    """
    listing = sandbox.control("GET", "/_sandbox/accounts")
    with psycopg.connect(database_url) as conn:
        present = {c.display_name: c for c in vault.list_connections(conn)}
    demo = {provider: present[name] for provider, name in DEMO_NAMES.items()
            if name in present and present[name].provider == provider}  # fmt: skip
    moved = []
    with psycopg.connect(database_url) as conn:
        for provider, connection in demo.items():
            wanted = _on_sandbox(connection.base_url, sandbox.url)
            tenant = _on_sandbox(connection.external_tenant, sandbox.url)  # a Mautic installation's URL
            if wanted is not None and (
                wanted != connection.base_url or tenant not in (None, connection.external_tenant)
            ):
                vault.set_base_url(conn, connection.id, wanted, tenant)
                moved.append(connection.id)
            # Addresses the provider gave at connect time (MYOB's company file URI) move with the sandbox too.
            addresses = {key: _on_sandbox(value, sandbox.url) for key, value in connection.settings.items()
                         if isinstance(value, str)}  # fmt: skip
            changed = {key: url for key, url in addresses.items() if url not in (None, connection.settings[key])}
            if changed:
                vault.merge_settings(conn, connection.id, changed)
                moved += [] if connection.id in moved else [connection.id]
            demo[provider] = vault.get_connection(conn, connection.id)
    created, kept, failed = [], [], []
    if not any(account["id"] == DEMO_API_KEY for account in listing.get("stripe", {}).get("accounts", [])):
        _add_demo_stripe(sandbox)
        created.append("stripe")
    elif "stripe" in demo:
        kept.append("stripe")
    seeds = {provider: (name, seed) for provider, name, seed in DEMO_ACCOUNTING}
    for provider, connection in demo.items():
        if provider == "stripe":
            continue
        if _restored(listing, connection):
            kept.append(provider)
            continue
        try:
            if provider in seeds:
                _connect_demo_accounting_one(sandbox, provider, *seeds[provider], database_url)
            elif provider == "paypal":
                _add_demo_paypal(sandbox, database_url)
            elif provider == "billionmail":
                _add_demo_billionmail(sandbox, database_url)
            elif provider == "mautic":
                _connect_demo_mautic(sandbox, database_url)
        except (click.ClickException, RuntimeError, OSError, psycopg.Error) as exc:
            failed.append(f"{provider} ({exc.format_message() if isinstance(exc, click.ClickException) else exc})")
            continue
        created.append(provider)
    with psycopg.connect(database_url) as conn:
        demo = {provider: vault.get_connection(conn, connection.id) for provider, connection in demo.items()}
    listing = sandbox.control("GET", "/_sandbox/accounts")
    subscribed = []
    for provider, connection in demo.items():
        if hooks is None:  # the demo: no receiver runs
            break
        if get_provider(provider).webhooks is None or any(f.startswith(f"{provider} ") for f in failed):
            continue
        subscriptions = (listing.get(provider) or {}).get("webhooks", [])
        try:
            if _subscribe_demo_webhooks(sandbox, database_url, hooks, connection, subscriptions):
                subscribed.append(provider)
        except (click.ClickException, RuntimeError, OSError, psycopg.Error) as exc:
            failed.append(f"{provider} webhooks ({exc})")
    done = []
    if moved:
        done.append(f"pointed {', '.join(moved)} at {sandbox.url}")
    if created:
        done.append("created the demo " + ", ".join(created) + " account(s)")
    if kept:
        done.append("kept the restored " + ", ".join(kept) + " account(s)")
    if subscribed:
        done.append("subscribed the " + ", ".join(subscribed) + f" webhooks to {hooks}")
    if failed:
        done.append("could not set up " + "; ".join(failed))
    return done


def _table_counts(database_url: str, schema: str) -> list[tuple[str, int]]:
    counts = []
    with psycopg.connect(database_url) as conn:
        for provider in PROVIDERS.values():
            for entity in provider.entities:
                query = sql.SQL("SELECT count(*) FROM {}").format(db.table(entity.table.name, schema))
                counts.append((entity.table.name, conn.execute(query).fetchone()[0]))
    return counts


def _demo_progress(connection: Connection, runs: list[tuple[dg.ExecuteInProcessResult, list[str], bool]],
                   days: int) -> str:  # fmt: skip
    """One line for a connection's demo runs (one per sync job): what their assets' materializations counted,
    summed."""
    totals = dict.fromkeys(("records", "inserted", "updated", "unchanged", "failed"), 0)
    spans = []
    for result, names, daily in runs:
        for name in names:
            # Each day of the range is materialised with its own counts: the connection's line sums them.
            for materialization in result.asset_materializations_for_node(name):
                for counter in totals:
                    entry = materialization.metadata.get(counter)
                    totals[counter] += int(entry.value) if entry is not None else 0
        spans.append(f"{', '.join(names)}; {f'{days} day(s)' if daily else 'the whole list'}")
    return (
        f"synced {connection.id}: {totals['records']} records, {totals['inserted']} inserted, {totals['updated']} "
        f"updated, {totals['unchanged']} unchanged, {totals['failed']} failed ({'; '.join(spans)})"
    )


@main.command("demo")
@click.option("--days", default=DEMO_DAYS, show_default=True, help="How many recent days to materialise.")
def demo(days: int) -> None:
    """Embedded Postgres + sandbox + one demo account per provider (seven); sync recent days; print counts."""
    import dagster as dg

    from nextcrm_pipelines import environment

    _use_demo_start_date(create=True)  # before the definitions are built: their partitions start there

    from nextcrm_pipelines.assets import SINCE_TAG
    from nextcrm_pipelines.automation import sync_jobs
    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name, month_key

    created_key = ensure_local_key()
    if created_key:
        click.echo(f"generated a local encryption key at {created_key} (set NEXTCRM_SECRET_KEY in production)")
    env = environment.prepare()
    click.echo(f"database: {settings.redact_url(env.database_url)} (schema {env.schema})")
    with _sandbox(SANDBOX_PORT) as sandbox:
        listing = sandbox.control("GET", "/_sandbox/accounts")
        with psycopg.connect(env.database_url) as conn:
            present = {c.display_name: c for c in vault.list_connections(conn)}
        if listing.get("restored") and all(present.get(name) for name in DEMO_NAMES.values()):
            # The sandbox of an earlier demo or `make dev`, with every change made in it: keep it and its
            # accounts (their grants and tokens are the ones stored), creating only what it lacks.
            for line in _provision_dev(sandbox, env.database_url, hooks=None):
                click.echo(f"sandbox: {line}")
            with psycopg.connect(env.database_url) as conn:
                connections = [vault.get_connection(conn, present[name].id) for name in DEMO_NAMES.values()]
        else:
            _add_demo_stripe(sandbox)
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
            runs = []
            for job in sync_jobs(get_provider(connection.provider)):
                # The months holding the last `days` days, limited to those days (a month is the partition).
                selection = {
                    "tags": {
                        "dagster/asset_partition_range_start": f"{connection.id}|{month_key(first_day)}",
                        "dagster/asset_partition_range_end": f"{connection.id}|{month_key(today)}",
                        SINCE_TAG: first_day.isoformat(),
                    }
                } if job.daily else {"partition_key": connection.id}  # fmt: skip
                result = defs.resolve_job_def(job.name).execute_in_process(
                    instance=instance,
                    # Errors only (a failed partition or step says why); progress is the line printed below.
                    run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
                    raise_on_error=False,
                    **selection,
                )
                if not result.success:
                    _fail(f"the demo sync ({job.name}) of {connection.id} failed; see the log above")
                runs.append((result, [entity.name for entity in job.entities], job.daily))
            click.echo(_demo_progress(connection, runs, days))
    click.echo(f"materialised {days} day(s) for " + ", ".join(c.id for c in connections) + ":")
    for name, count in _table_counts(env.database_url, env.schema):
        click.echo(f"  {env.schema}.{name}: {count} rows")
    from nextcrm_pipelines.partitions import sync_start_date

    click.echo(f"partitions begin with the month of {sync_start_date()} (NEXTCRM_SYNC_START_DATE; see the README)")
    click.echo(f"DATABASE_URL={settings.redact_url(env.database_url)}")


# --- dev: the supervisor ----------------------------------------------------------------------

# Restart delays after a child's consecutive unexpected exits; one more exit stops everything.
RESTART_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
# A child up this long has recovered: its next exit starts the count again.
STABLE_SECONDS = 60.0
# SIGKILL for what is left this long after the stop signals.
STOP_SECONDS = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Routine lines (uvicorn's and Dagster's INFO, the sandbox's ready line) go to the child's log file only.
_ROUTINE = re.compile(r"^(INFO|DEBUG):|\s-\s(INFO|DEBUG)\s-\s|^" + re.escape(READY_PREFIX))
# The first line of one of Dagster's log records; the lines after it, up to the next, belong to it (a step
# failure's stack trace): the terminal gets the record's first line, the log file all of it.
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - ")


class _StopRequested(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) asked `dev` to stop."""


class _ChildFailed(Exception):
    """A child could not be started, or kept exiting: `dev` stops everything and says so."""


@dataclass
class _ChildSpec:
    """How to run one child of `dev`: its command, how to tell it serves, and how to stop it."""

    name: str  # in its output lines and its log file's name
    label: str  # in sentences
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool] | None = None
    stop_signal: int = signal.SIGTERM
    stop_first: bool = False  # stopped before the others (the Dagster processes, before their code server)
    before_start: Callable[[], None] | None = None
    after_restart: Callable[[], None] | None = None


@dataclass
class _Child:
    spec: _ChildSpec
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    stopped: bool = field(default=False)


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (zombies, which only wait to be reaped, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _parent_death_signal() -> Callable[[], None] | None:
    """What a child runs before its program: SIGTERM when `dev` dies however it dies (even SIGKILL), so no
    child outlives it (Linux's PR_SET_PDEATHSIG; elsewhere the signals `dev` sends on its way out suffice).
    The C function is looked up here, in `dev`, so the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def stop_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1

    return stop_with_parent


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class _Supervisor:
    """Runs `dev`'s children, each in its own process group with its output in a log file; restarts one
    that exits unexpectedly (with backoff) and stops them all in order."""

    def __init__(self, log_dir: Path, cwd: Path) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.children: list[_Child] = []
        self.stopping = False
        self._stop_requested: str | None = None
        self._spawning = False
        self._lock = threading.Lock()
        self._stop_with_parent = _parent_death_signal()
        log_dir.mkdir(parents=True, exist_ok=True)

    def say(self, message: str) -> None:
        """One line of the supervisor's own."""
        with self._lock:
            click.echo(f"dev: {message}")

    # --- signals ---

    def install_signal_handlers(self) -> None:
        """Ctrl-C, SIGTERM and SIGHUP stop everything; children, in groups of their own, get no terminal signal."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping or self._stop_requested:
            return
        self._stop_requested = name
        if not self._spawning:  # a child being started is recorded first, then the stop is raised
            raise _StopRequested(name)

    def _check_stop(self) -> None:
        if self._stop_requested and not self.stopping:
            raise _StopRequested(self._stop_requested)

    # --- children ---

    def start(self, spec: _ChildSpec, timeout: float = 120.0) -> _Child:
        """Start a child and wait until it serves (`spec.ready`); `_ChildFailed` if it exits or times out."""
        child = _Child(spec, self.log_dir / f"{spec.name}.log")
        child.log_path.write_bytes(b"")
        self.children.append(child)
        self._spawn(child)
        self._wait_ready(child, timeout)
        return child

    def _spawn(self, child: _Child) -> None:
        if child.spec.before_start is not None:
            child.spec.before_start()
        self._spawning = True
        try:
            child.proc = subprocess.Popen(
                child.spec.argv, cwd=self.cwd, env=child.spec.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self._stop_with_parent,
            )  # fmt: skip
            child.started = time.monotonic()
        finally:
            self._spawning = False
        threading.Thread(
            target=self._pump, args=(child, child.proc), name=f"dev-{child.spec.name}", daemon=True
        ).start()
        self._check_stop()

    def _pump(self, child: _Child, proc: subprocess.Popen[bytes]) -> None:
        """Copy a child's output to its log file, and all but routine lines to the terminal."""
        assert proc.stdout is not None
        in_record = False  # inside a Dagster log record, after its first line
        with child.log_path.open("ab") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                plain = _ANSI.sub("", line)
                if _RECORD.match(plain):
                    in_record = True
                elif in_record:
                    continue  # the rest of a record (its stack trace): in the log file only
                if line and not _ROUTINE.search(plain):
                    with self._lock:
                        click.echo(f"[{child.spec.name}] {line}")

    def _wait_ready(self, child: _Child, timeout: float) -> None:
        assert child.proc is not None
        deadline = time.monotonic() + timeout
        while child.spec.ready is not None:
            self._check_stop()
            code = child.proc.poll()
            if code is not None:
                raise _ChildFailed(f"{child.spec.label} exited while starting ({_exit_description(code)}); "
                                   f"its log: {child.log_path}")  # fmt: skip
            if child.spec.ready():
                return
            if time.monotonic() > deadline:
                raise _ChildFailed(
                    f"{child.spec.label} did not answer within {timeout:.0f} s; its log: {child.log_path}"
                )
            time.sleep(0.2)

    def watch(self) -> None:
        """Until a signal arrives: restart a child that exits (after RESTART_DELAYS), or give up when it keeps
        exiting (`_ChildFailed`)."""
        while True:
            self._check_stop()
            now = time.monotonic()
            for child in self.children:
                assert child.proc is not None
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child)
                    continue
                code = child.proc.poll()
                if code is None:
                    if child.failures and now - child.started > STABLE_SECONDS:
                        child.failures = 0
                    continue
                _signal_group(child.proc.pid, signal.SIGKILL)  # what the child left behind (its own children)
                child.failures += 1
                if child.failures > len(RESTART_DELAYS):
                    raise _ChildFailed(
                        f"{child.spec.label} keeps exiting ({child.failures} times in a row, the last with "
                        f"{_exit_description(code)}); stopping everything. Its log: {child.log_path}"
                    )
                delay = RESTART_DELAYS[child.failures - 1]
                self.say(
                    f"{child.spec.label} exited unexpectedly with {_exit_description(code)}; restarting it in "
                    f"{delay:g} s (restart {child.failures} of {len(RESTART_DELAYS)}); its log: {child.log_path}"
                )
                child.restart_at = now + delay
            time.sleep(0.2)

    def _restart(self, child: _Child) -> None:
        child.restart_at = None
        self._spawn(child)
        assert child.proc is not None
        if child.spec.after_restart is None:
            self.say(f"restarted {child.spec.label} (pid {child.proc.pid})")
            return
        try:
            self._wait_ready(child, 60.0)
            child.spec.after_restart()
        except _ChildFailed as exc:
            self.say(str(exc))  # the next round sees the exit and counts it
            return
        except Exception as exc:  # said; the child keeps running
            self.say(f"restarted {child.spec.label}, but setting it up again failed: {exc}")
            return
        self.say(f"restarted {child.spec.label} (pid {child.proc.pid})")

    def _alive(self, child: _Child) -> bool:
        assert child.proc is not None
        return child.proc.poll() is None or _group_alive(child.proc.pid)

    def stop_all(self) -> None:
        """Stop every child: the signal to its whole group (the Dagster processes first, then the rest),
        SIGKILL for what is left after STOP_SECONDS, one line per child."""
        self.stopping = True
        running = [c for c in self.children if c.proc is not None and c.restart_at is None and self._alive(c)]
        for child in self.children:
            if child.proc is not None and child not in running:
                _signal_group(child.proc.pid, signal.SIGKILL)  # between a crash and its restart
                child.stopped = True
        deadline = time.monotonic() + STOP_SECONDS
        first = [c for c in running if c.spec.stop_first]
        waves = [first, [c for c in running if c not in first]]
        for number, wave in enumerate(waves):
            for child in wave:
                assert child.proc is not None
                _signal_group(child.proc.pid, child.spec.stop_signal)
            until = min(deadline, time.monotonic() + STOP_SECONDS / 2) if number == 0 else deadline
            self._wait_stopped(wave, until)
        left = [c for c in running if not c.stopped]
        for child in left:
            assert child.proc is not None
            _signal_group(child.proc.pid, signal.SIGKILL)
        self._wait_stopped(left, time.monotonic() + 3.0, killed=True)

    def _wait_stopped(self, children: list[_Child], until: float, killed: bool = False) -> None:
        while True:
            for child in children:
                if not child.stopped and not self._alive(child):
                    child.stopped = True
                    assert child.proc is not None
                    code = child.proc.returncode
                    if killed:
                        how = f"killed after {STOP_SECONDS:g} s"
                    elif code == -child.spec.stop_signal:  # servers that end on the signal they were sent
                        how = f"on {signal.Signals(child.spec.stop_signal).name}"
                    else:
                        how = _exit_description(code)
                    self.say(f"stopped {child.spec.label} ({how})")
            if all(c.stopped for c in children) or time.monotonic() > until:
                return
            time.sleep(0.1)


def _port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` now (as the children do: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _check_ports(ports: dict[str, int]) -> None:
    """Fail with one line naming the variable to set when a port is taken or two are the same."""
    seen: dict[int, str] = {}
    for variable, port in ports.items():
        if port in seen:
            _fail(f"{variable} and {seen[port]} are both {port}: give each its own port")
        seen[port] = variable
    for variable, port in ports.items():
        if not _port_free(port):
            _fail(f"port {port} is in use (another `make dev`?): set {variable}=<a free port>, e.g. "
                  f"`make dev {variable}={_suggest_port(port, set(seen))}`")  # fmt: skip


def _suggest_port(taken: int, avoid: set[int]) -> int:
    for port in range(taken + 1, min(taken + 200, 65536)):
        if port not in avoid and _port_free(port):
            return port
    return taken + 1


def _http_ok(url: str) -> Callable[[], bool]:
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return ready


def _unix_socket_ok(path: Path) -> Callable[[], bool]:
    def ready() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(path))
            except OSError:
                return False
        return True

    return ready


class _SandboxClient:
    """The control API of the sandbox `dev` runs as a child, shaped like `SandboxServer` for the control clients."""

    def __init__(self, port: int) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(30.0, read=120.0))

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call `/_sandbox/...` and return the JSON answer; RuntimeError on a refusal."""
        response = self._client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"sandbox control {method} {path} failed: {response.status_code} {response.text}")
        return response.json()

    def close(self) -> None:
        self._client.close()


def _code_location() -> tuple[str, str]:
    """The module and location name of the project's workspace.yaml (one `python_module` entry)."""
    import yaml

    workspace = yaml.safe_load((settings.PROJECT_ROOT / "workspace.yaml").read_text())
    entries = [entry["python_module"] for entry in workspace.get("load_from", []) if "python_module" in entry]
    if len(entries) != 1:
        _fail("workspace.yaml must load exactly one python_module for `dev`")
    entry = entries[0]
    if isinstance(entry, str):
        return entry, entry
    return entry["module_name"], entry.get("location_name", entry["module_name"])


def _children(ui_port: int, sandbox_port: int, webhook_port: int, work: Path) -> list[_ChildSpec]:
    """The five children of `dev`, in start order.

    As `dagster dev` does, one code server (`dagster code-server start`, on a Unix socket) serves the code
    location to both the webserver and the daemon through a workspace file naming that socket, so the
    definitions are loaded once and "Reload" in the UI reloads them for both. Their log level is WARNING:
    the daemon's routine sensor and schedule ticks are not printed, errors are. All are stopped with SIGTERM:
    the Dagster processes handle it as they handle SIGINT once running, and a process still starting ends
    quietly on it instead of printing a KeyboardInterrupt traceback.
    """
    import yaml

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    dagster_env = {**env, "DAGSTER_IS_DEV_CLI": "1"}
    module, location = _code_location()
    code_socket = work / "code.sock"
    workspace = work / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": {"socket": str(code_socket),
                                                                        "location_name": location}}]}))  # fmt: skip
    state_dir = sandbox_state_dir()
    python = sys.executable
    quiet = ["--log-level", "warning"]
    sandbox = [python, "-m", "nextcrm_sandbox.server", "--host", "127.0.0.1", "--port", str(sandbox_port),
               "--state-dir", str(state_dir), "--announce"]  # fmt: skip
    receiver = [python, "-m", "nextcrm_pipelines.cli", "webhooks", "serve", "--port", str(webhook_port)]
    code_server = [python, "-m", "dagster", "code-server", "start", "-m", module, "--location-name", location,
                   "--socket", str(code_socket), *quiet]  # fmt: skip
    webserver = [python, "-m", "dagster_webserver", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(ui_port),
                 *quiet, "--dagster-log-level", "warning", "--code-server-log-level", "warning"]  # fmt: skip
    daemon = [python, "-m", "dagster._daemon", "run", "-w", str(workspace), *quiet,
              "--code-server-log-level", "warning"]  # fmt: skip
    return [
        _ChildSpec("sandbox", "the sandbox", sandbox, env,
                   ready=_http_ok(f"http://127.0.0.1:{sandbox_port}/_sandbox/clock")),
        _ChildSpec("receiver", "the webhook receiver", receiver, env,
                   ready=_http_ok(f"http://127.0.0.1:{webhook_port}/healthz")),
        _ChildSpec("code-server", "the Dagster code server", code_server, dagster_env,
                   ready=_unix_socket_ok(code_socket),
                   before_start=lambda: code_socket.unlink(missing_ok=True)),
        _ChildSpec("webserver", "the Dagster webserver", webserver, dagster_env,
                   ready=_http_ok(f"http://127.0.0.1:{ui_port}/server_info"),
                   stop_first=True),
        _ChildSpec("daemon", "the Dagster daemon", daemon, dagster_env, stop_first=True),
    ]  # fmt: skip


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@main.command("dev")
@click.option("--ui-port", "--port", "ui_port", envvar="UI_PORT", type=click.IntRange(1, 65535), default=UI_PORT,
              show_default=True, show_envvar=True, help="Port of the Dagster UI.")  # fmt: skip
@click.option("--sandbox-port", envvar="SANDBOX_PORT", type=click.IntRange(1, 65535), default=SANDBOX_PORT,
              show_default=True, show_envvar=True,
              help="Port of the sandbox; demo connections are pointed at it.")  # fmt: skip
@click.option("--webhook-port", envvar="WEBHOOK_PORT", type=click.IntRange(1, 65535), default=WEBHOOK_PORT,
              show_default=True, show_envvar=True,
              help="Port of the webhook receiver; demo webhooks go there.")  # fmt: skip
def dev(ui_port: int, sandbox_port: int, webhook_port: int) -> None:
    """Serve the Dagster UI, the sandbox and the webhook receiver on 127.0.0.1 until Ctrl-C.

    Each runs as a child process, restarted if it exits; the sandbox keeps its accounts in the data
    folder (`sandbox/`), so a change made in it survives a restart. Logs: the data folder's `logs/dev/`.
    """
    from nextcrm_pipelines import environment

    _check_ports({"UI_PORT": ui_port, "SANDBOX_PORT": sandbox_port, "WEBHOOK_PORT": webhook_port})
    _use_demo_start_date(create=False)  # the children build the partitions from it
    ensure_local_key()
    env = environment.prepare()
    # The demo company file's sign-in (the sandbox default), for the syncs the children run.
    os.environ.setdefault("MYOB_COMPANY_FILE_USERNAME", "Administrator")
    click.echo(f"database: {settings.redact_url(env.database_url)}; Dagster home: {env.dagster_home}")
    log_dir = settings.data_dir() / "logs" / "dev"
    supervisor = _Supervisor(log_dir, settings.PROJECT_ROOT)
    supervisor.install_signal_handlers()
    failed: str | None = None
    with tempfile.TemporaryDirectory(prefix="nextcrm-dev-") as work:
        sandbox = _SandboxClient(sandbox_port)
        hooks = f"http://127.0.0.1:{webhook_port}"

        def provision() -> None:
            for line in _provision_dev(sandbox, env.database_url, hooks):
                supervisor.say(line)

        try:
            specs = _children(ui_port, sandbox_port, webhook_port, Path(work))
            specs[0].after_restart = provision
            supervisor.start(specs[0])
            supervisor.start(specs[1])
            try:
                provision()
            except (click.ClickException, RuntimeError, OSError, psycopg.Error) as exc:
                message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
                supervisor.say(f"setting up the demo accounts in the sandbox failed: {message}")
            for spec in specs[2:]:
                supervisor.start(spec)
            state = _short(sandbox_state_dir())
            supervisor.say(f"Dagster UI  http://127.0.0.1:{ui_port}")
            supervisor.say(f"sandbox     {sandbox.url} (its state: {state})")
            supervisor.say(f"webhooks    {hooks}/webhooks/<provider>/<connection id>")
            supervisor.say(f"logs        {_short(log_dir)}/<child>.log; Ctrl-C stops everything")
            supervisor.watch()
        except _StopRequested as stop:
            supervisor.say(f"{stop} received: stopping")
        except _ChildFailed as exc:
            failed = str(exc)
            supervisor.say(failed)
        finally:
            supervisor.stop_all()
            sandbox.close()
    if failed is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
