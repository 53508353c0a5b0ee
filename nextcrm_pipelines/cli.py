"""`nextcrm-pipelines`: database, connections, secrets, webhooks, actions and ad-hoc sync commands.

Secrets are read from the provider's environment variable or a hidden prompt, never from a
command-line argument (which would land in shell history and `ps`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import click
import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.vault import SecretBox, VaultError
from nextcrm_pipelines.providers import PROVIDERS, get_provider

if TYPE_CHECKING:
    from nextcrm_pipelines.core.provider import Provider

T = TypeVar("T")


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


def _read_secrets(spec: Provider) -> dict[str, str]:
    """The provider's secret fields from their environment variables, else a hidden prompt (optional ones
    only from the environment), with its fixed secrets."""
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
    return secrets


def _check_credentials(spec: Provider, secrets: dict[str, str], base_url: str | None, tenant: str | None) -> None:
    """Ask the provider whether it takes these secrets, where it can say so cheaply (Stripe: `GET /v1/account`);
    refused or unchecked, nothing is stored."""
    if spec.check_credentials is None:
        return
    from nextcrm_pipelines.core.http import AuthenticationFailed, ProviderError

    try:
        reached = spec.check_credentials(secrets, base_url=base_url, tenant=tenant)
    except AuthenticationFailed as exc:
        _fail(f"{exc}; nothing was stored")
    except ProviderError as exc:
        _fail(f"could not check the key, nothing was stored: {exc}")
    click.echo(f"{spec.name} accepted the key" + (f" (account {reached})" if reached else ""))


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
    secrets = _read_secrets(spec)
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
    _check_credentials(spec, secrets, base_url, external_tenant)
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
    """List connections, their sync state and, for one that cannot sync, the command that fixes it (never secrets)."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.runner import reauth_hint

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        rows = vault.list_connections(conn)
    if not rows:
        click.echo("no connections yet: add one with `nextcrm-pipelines connections add stripe --name ...` "
                   "or `nextcrm-pipelines connect xero`")  # fmt: skip
        return
    width = min(max(len(c.id) for c in rows), 40)
    named = min(max(len(c.display_name) for c in rows), 30)
    click.echo(f"{'id':{width}} {'name':{named}} {'provider':11} {'status':13} {'last sync':12} "
               f"{'last synced at':25} error / fix")  # fmt: skip
    for c in rows:
        synced = c.last_synced_at.isoformat(timespec="seconds") if c.last_synced_at else "-"
        # The stored error's cause, and the one command that fixes this connection now.
        fix = {"needs_reauth": reauth_hint(get_provider(c.provider), c),
               "disabled": f"enable it with `{vault.enable_command(c.id)}`"}.get(c.status)  # fmt: skip
        note = "; ".join(part for part in (vault.error_cause(c.last_error), fix) if part)
        name = c.display_name if len(c.display_name) <= named else c.display_name[: named - 1] + "~"
        click.echo(f"{c.id:{width}} {name:{named}} {c.provider:11} {c.status:13} {c.sync_status:12} {synced:25} "
                   f"{note}")  # fmt: skip


@connections_group.command("set-secret")
@click.argument("connection_id")
def connections_set_secret(connection_id: str) -> None:
    """Store new credentials in a connection (API key, login or client credentials) and make it active again.

    Reads the provider's secret fields like `connections add` does (environment variables, else a hidden
    prompt) and updates this connection's row: its id, name, settings and history stay.
    """
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.oauth import TOKEN_FIELDS
    from nextcrm_pipelines.core.runner import authorised_in_browser, reauth_command

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        try:
            connection = vault.get_connection(conn, connection_id)
        except vault.ConnectionNotFound as exc:
            _fail(str(exc))
            raise
    spec = get_provider(connection.provider)
    if not spec.secret_fields or authorised_in_browser(spec, connection):
        _fail(f"connection {connection_id} was authorised in a browser: re-authorise it with "
              f"`{reauth_command(spec, connection)}`")  # fmt: skip
    secrets, box = _read_secrets(spec), _box()
    _check_credentials(spec, secrets, connection.base_url, connection.external_tenant)
    with psycopg.connect(env.database_url) as conn:
        # A token the old credentials got is dropped: the next sync asks for one with the new ones.
        updated = vault.replace_credentials(conn, connection_id, secrets, box, drop=TOKEN_FIELDS)
    if updated.status == "active":
        click.echo(f"stored new credentials for {connection_id} ({updated.provider}, {updated.display_name!r}); "
                   "it is active, its error cleared, and the next sync uses them")  # fmt: skip
    else:
        click.echo(f"stored new credentials for {connection_id}; it stays {updated.status} "
                   f"(`{vault.enable_command(connection_id)}` resumes its syncs)")  # fmt: skip


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


WEBHOOK_PORT = 8787


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
@click.option("--provider", "provider_name", help="Only this provider's events.",
              type=click.Choice(sorted(name for name, p in PROVIDERS.items() if p.webhooks is not None)))  # fmt: skip
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


# --- actions (the outbox) ------------------------------------------------------------------------


@main.group("actions")
def actions_group() -> None:
    """NextCRM's actions on providers: submitted to the outbox, carried out by the <provider>_actions_sensor."""


@actions_group.command("submit")
@click.argument("connection_id")
@click.argument("action")
@click.option(
    "--json", "payload_json", required=True, help='The payload, a JSON object (e.g. \'{"charge": "ch_..."}\').'
)
@click.option("--key", "idempotency_key", help="Your idempotency key (default: generated). The same key again "
              "gives back the first action.")  # fmt: skip
@click.option("--requested-by", default=lambda: os.environ.get("USER") or None, help="Who asks (default: $USER).")
def actions_submit(connection_id: str, action: str, payload_json: str, idempotency_key: str | None,
                   requested_by: str | None) -> None:  # fmt: skip
    """Submit ACTION for CONNECTION_ID; checked now, so a bad payload is refused before anything is stored."""
    import json

    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core import outbox
    from nextcrm_pipelines.core.actions import ActionInvalid, validate_payload

    try:
        payload = json.loads(payload_json)
    except json.JSONDecodeError as exc:
        _fail(f"--json is not JSON: {exc.msg} at character {exc.pos}")
    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        try:
            connection = vault.get_connection(conn, connection_id)
        except vault.ConnectionNotFound as exc:
            _fail(str(exc))
        provider = get_provider(connection.provider)
        spec = provider.actions.get(action)
        if spec is None:
            known = ", ".join(sorted(provider.actions)) or "none yet"
            _fail(f"{provider.name} has no action {action!r} (its actions: {known})")
        try:
            validate_payload(spec, payload)
            done = outbox.submit(conn, env.schema, connection_id=connection_id, action=action, payload=payload,
                                 idempotency_key=idempotency_key, requested_by=requested_by)  # fmt: skip
        except ActionInvalid as exc:
            _fail(str(exc))
    if done.created:
        click.echo(f"action {done.id} submitted: {provider.name}_actions_sensor sends it within a minute "
                   f"(`nextcrm-pipelines actions show {done.id}`)")  # fmt: skip
    else:
        click.echo(f"action {done.id} was already submitted with this key: nothing new")


@actions_group.command("list")
@click.option("--status", type=click.Choice(["pending", "sending", "succeeded", "failed", "unknown", "dead",
                                             "cancelled"]), help="Only actions in this status.")  # fmt: skip
@click.option("--connection", "connection_id", help="Only this connection's actions.")
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
def actions_list(status: str | None, connection_id: str | None, limit: int) -> None:
    """The newest actions, with their status and result or error."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core import outbox

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        entries = outbox.list_actions(conn, env.schema, status=status, connection_id=connection_id, limit=limit)
    if not entries:
        click.echo("no actions")
        return
    for entry in entries:
        outcome = entry.result_id or (entry.error or "")[:100]
        click.echo(f"{entry.id}\t{entry.connection_id}\t{entry.action}\t{entry.status}\t{entry.attempts}\t{outcome}")


def _on_action(action_id: int, change: Callable[[psycopg.Connection, str, int], T]) -> T:
    """Run `change(session, schema, action_id)` on the outbox; an unknown or refused action is a clear error."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.actions import ActionInvalid

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        try:
            return change(conn, env.schema, action_id)
        except (ActionInvalid, KeyError) as exc:
            _fail(str(exc.args[0]))
            raise


@actions_group.command("show")
@click.argument("action_id", type=int)
def actions_show(action_id: int) -> None:
    """One action: its payload, status, attempts, result or error."""
    from nextcrm_pipelines.core import outbox

    click.echo(outbox.describe(_on_action(action_id, outbox.get_action)))


@actions_group.command("retry")
@click.argument("action_id", type=int)
def actions_retry(action_id: int) -> None:
    """Send a failed or dead action again (same key; one that may have reached the provider is looked up first)."""
    from nextcrm_pipelines.core import outbox

    status = _on_action(action_id, outbox.retry)
    click.echo(f"action {action_id} is {status} again: the actions sensor takes it on its next tick")


@actions_group.command("cancel")
@click.argument("action_id", type=int)
def actions_cancel(action_id: int) -> None:
    """Cancel an action that has not reached the provider."""
    from nextcrm_pipelines.core import outbox

    _on_action(action_id, outbox.cancel)
    click.echo(f"action {action_id} cancelled")


# --- ad-hoc sync --------------------------------------------------------------------------------


@main.command("sync")
@click.argument("connection_id")
@click.option("--entity", "entities", multiple=True, help="Entity to sync (default: all of the provider's).")
@click.option("--from", "start", type=click.DateTime(["%Y-%m-%d"]), required=True, help="First day (UTC).")
@click.option("--to", "end", type=click.DateTime(["%Y-%m-%d"]), help="Last day (UTC, inclusive; default: --from).")
def sync(connection_id: str, entities: tuple[str, ...], start: datetime, end: datetime | None) -> None:
    """Sync days of one connection outside Dagster (same engine, same sync logs)."""
    from nextcrm_pipelines import environment
    from nextcrm_pipelines.core.runner import day_window, snapshot_window, sweep_connection, sync_partitions
    from nextcrm_pipelines.core.sync import describe_result
    from nextcrm_pipelines.partitions import partition_key_of

    env = environment.prepare()
    with psycopg.connect(env.database_url) as conn:
        connection = vault.get_connection(conn, connection_id)
    provider = get_provider(connection.provider)
    first, last = start.date(), (end or start).date()
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    failed = 0
    for name in entities or [e.name for e in provider.entities]:
        daily = provider.entity(name).daily
        # A whole-list entity is read once, whatever the days (it has no time filter).
        windows = [day_window(d) for d in days] if daily else [snapshot_window()]
        results = sync_partitions(
            database_url=env.database_url, schema=env.schema, provider=provider, entity_name=name,
            connection_id=connection_id, windows=windows,
            partitions=[partition_key_of(True, connection_id, d) for d in days] if daily else [connection_id],
        )  # fmt: skip
        if not daily and name in provider.id_sweeps and results[0].status != "failed":
            swept = sweep_connection(database_url=env.database_url, schema=env.schema, provider=provider,
                                     entity_name=name, connection_id=connection_id)  # fmt: skip
            click.echo(f"{name}: {swept.counts.updated} flagged deleted upstream")
        for result in results:
            click.echo(describe_result(result))  # the line a Dagster run logs for the day
            failed += result.status == "failed"
    if failed:
        _fail(f"{failed} partition(s) failed; committed data stays, re-run to finish")


if __name__ == "__main__":
    main()
