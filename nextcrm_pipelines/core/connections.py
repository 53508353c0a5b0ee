"""The connection vault: one row per connected provider account, secrets encrypted at rest.

`Connection` carries no secret material; `load_secrets` decrypts on demand and returns a
`Secrets` whose repr is redacted, so neither can leak into logs or Dagster metadata by accident.

Every write of secrets first takes `lock_current_key` (a shared lock on the `vault_keys` row, which
`rotate_secrets` takes exclusively) and seals them under the key recorded there, so no row is left
encrypted under a key that a finished rotation lets the operator drop.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.vault import SecretBox, Secrets, StaleKey, stale_key_message

STATUSES = ("active", "needs_reauth", "disabled")
_COLUMNS = (
    "id, provider, display_name, external_tenant, base_url, status, sync_status, last_error, "
    "last_synced_at, settings, token_version, token_expires_at, created_at"
)


class ConnectionNotFound(LookupError):
    """No connection with that id; the message says how to list them."""


@dataclass(frozen=True)
class Connection:
    """A connected account as stored, without its secrets."""

    id: str
    provider: str
    display_name: str
    external_tenant: str | None = None
    base_url: str | None = None
    status: str = "active"
    sync_status: str = "never_synced"
    last_error: str | None = None
    last_synced_at: datetime | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    token_version: int = 0
    token_expires_at: datetime | None = None
    created_at: datetime | None = None


# Every command that fixes a connection starts so; a stored error holds at most one of them (see `error_cause`).
COMMAND = "nextcrm-pipelines"
_FIX_MARK = f"`{COMMAND} "


def set_secret_command(connection_id: str) -> str:
    """The command that stores new credentials (API key, login, client credentials) in this connection's row."""
    return f"{COMMAND} connections set-secret {shlex.quote(connection_id)}"


def enable_command(connection_id: str) -> str:
    """The command that resumes syncing a disabled connection."""
    return f"{COMMAND} connections enable {shlex.quote(connection_id)}"


def connect_command(connection: Connection) -> str:
    """The OAuth flow that re-authorises this connection: `connect` updates the row of the tenant the grant
    reaches (see `core.connect`), keeping its id; the name and base URL keep it on the same account."""
    command = f"{COMMAND} connect {connection.provider} --name {shlex.quote(connection.display_name)}"
    return command + (f" --base-url {shlex.quote(connection.base_url)}" if connection.base_url else "")


def fix_hint(command: str, by_browser: bool) -> str:
    """The one hint a stored error of a refused connection ends with."""
    return f"reconnect with `{command}`" if by_browser else f"store working credentials with `{command}`"


def error_cause(message: str | None) -> str | None:
    """A stored error without the hints it carries (`cause; store ... with `command``): the cause alone, so a
    caller can add the one hint that fixes the connection now (rows written before may hold several)."""
    if not message:
        return message
    parts = [part for part in message.split("; ") if _FIX_MARK not in part]
    return "; ".join(parts) or None


def has_fix(message: str | None) -> bool:
    """Whether a stored error already names the command that fixes its connection."""
    return bool(message) and _FIX_MARK in message


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "account"


def connection_id_for(provider: str, display_name: str) -> str:
    """A stable, readable id (also the Dagster partition key): `<provider>-<name-slug>`."""
    return f"{provider}-{slugify(display_name)}"[:120]


def lock_current_key(conn: psycopg.Connection, box: SecretBox) -> str | None:
    """Lock the vault's current-key record (shared) until the transaction ends; the fingerprint of the key
    secrets must be sealed under, or None before the first rotation (then the box's current key is used).

    Take it before locking any connection row (the order `rotate_secrets` uses). Raises `StaleKey`
    when `box` lacks the recorded key: a process started before the latest rotation must not write.
    """
    row = conn.execute(sql.SQL("SELECT fingerprint FROM {t} FOR SHARE").format(t=table("vault_keys"))).fetchone()
    current = row[0] if row else None
    if current is not None and not box.holds(current):
        raise StaleKey(stale_key_message(current))
    return current


def add_connection(
    conn: psycopg.Connection,
    *,
    provider: str,
    display_name: str,
    secrets: dict[str, str],
    box: SecretBox,
    external_tenant: str | None = None,
    base_url: str | None = None,
    settings: dict[str, Any] | None = None,
    connection_id: str | None = None,
    token_expires_at: datetime | None = None,
) -> Connection:
    """Insert a connection, or update the one with the same id (re-connecting the same account)."""
    cid = connection_id or connection_id_for(provider, display_name)
    under = lock_current_key(conn, box)
    conn.execute(
        sql.SQL(
            """
            INSERT INTO {t} (id, provider, display_name, external_tenant, base_url, settings,
                             secrets_encrypted, status, token_version, token_expires_at)
            VALUES (%(id)s, %(provider)s, %(name)s, %(tenant)s, %(base_url)s, %(settings)s, %(secret)s, 'active', 1,
                    %(expires)s)
            ON CONFLICT (id) DO UPDATE SET
                display_name = EXCLUDED.display_name, external_tenant = EXCLUDED.external_tenant,
                base_url = EXCLUDED.base_url, settings = EXCLUDED.settings,
                secrets_encrypted = EXCLUDED.secrets_encrypted, status = 'active', last_error = NULL,
                token_expires_at = EXCLUDED.token_expires_at,
                token_version = {t}.token_version + 1, updated_at = now()
            WHERE {t}.provider = EXCLUDED.provider
            """
        ).format(t=table("integration_connections")),
        {
            "id": cid,
            "provider": provider,
            "name": display_name,
            "tenant": external_tenant,
            "base_url": base_url,
            "settings": Jsonb(settings or {}),
            "secret": box.encrypt(cid, secrets, under),
            "expires": token_expires_at,
        },
    )
    return get_connection(conn, cid)


def get_connection(conn: psycopg.Connection, connection_id: str) -> Connection:
    row = conn.execute(
        sql.SQL("SELECT {cols} FROM {t} WHERE id = %s").format(
            cols=sql.SQL(_COLUMNS), t=table("integration_connections")
        ),
        (connection_id,),
    ).fetchone()
    if row is None:
        raise ConnectionNotFound(
            f"no connection {connection_id!r}: list them with `nextcrm-pipelines connections list`"
        )
    return Connection(*row)


def list_connections(
    conn: psycopg.Connection, *, provider: str | None = None, status: str | None = None
) -> list[Connection]:
    clauses, params = [], []
    if provider:
        clauses.append("provider = %s")
        params.append(provider)
    if status:
        clauses.append("status = %s")
        params.append(status)
    where = sql.SQL(" WHERE " + " AND ".join(clauses)) if clauses else sql.SQL("")
    rows = conn.execute(
        sql.SQL("SELECT {cols} FROM {t}{where} ORDER BY id").format(
            cols=sql.SQL(_COLUMNS), t=table("integration_connections"), where=where
        ),
        params,
    ).fetchall()
    return [Connection(*row) for row in rows]


def load_secrets(conn: psycopg.Connection, connection_id: str, box: SecretBox) -> Secrets:
    row = conn.execute(
        sql.SQL("SELECT secrets_encrypted FROM {t} WHERE id = %s").format(t=table("integration_connections")),
        (connection_id,),
    ).fetchone()
    if row is None:
        raise ConnectionNotFound(f"no connection {connection_id!r}")
    if row[0] is None:
        return Secrets({})
    return box.decrypt(connection_id, row[0])


def update_secrets(conn: psycopg.Connection, connection_id: str, updates: dict[str, str], box: SecretBox) -> None:
    """Merge `updates` into a connection's stored secrets under the row lock token refreshes take,
    so a refresh running at the same time is neither lost nor overwritten; commits."""
    _write_secrets(conn, connection_id, updates, box)


def replace_credentials(
    conn: psycopg.Connection, connection_id: str, updates: dict[str, str], box: SecretBox, drop: Collection[str] = ()
) -> Connection:
    """Store new credentials in a connection's own row (`connections set-secret`): merge `updates` into its
    secrets, forget `drop` (a cached token of the old credentials), clear its last error and make a
    `needs_reauth` connection active again (a disabled one stays disabled); commits. Returns it as stored."""
    _write_secrets(conn, connection_id, updates, box, drop=drop, reactivate=True)
    return get_connection(conn, connection_id)


def _write_secrets(
    conn: psycopg.Connection,
    connection_id: str,
    updates: dict[str, str],
    box: SecretBox,
    drop: Collection[str] = (),
    reactivate: bool = False,
) -> None:
    t = table("integration_connections")
    under = lock_current_key(conn, box)
    row = conn.execute(sql.SQL("SELECT secrets_encrypted FROM {t} WHERE id = %s FOR UPDATE").format(t=t),
                       (connection_id,)).fetchone()  # fmt: skip
    if row is None:
        conn.rollback()
        raise ConnectionNotFound(f"no connection {connection_id!r}")
    current = dict(box.decrypt(connection_id, row[0]).reveal()) if row[0] else {}
    merged = {name: value for name, value in {**current, **updates}.items() if name not in drop or name in updates}
    sealed = box.encrypt(connection_id, merged, under)
    if reactivate:
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET secrets_encrypted = %s, last_error = NULL, token_version = token_version + 1, "
                "status = CASE WHEN status = 'needs_reauth' THEN 'active' ELSE status END, updated_at = now() "
                "WHERE id = %s"
            ).format(t=t),
            (sealed, connection_id),
        )
    else:
        conn.execute(sql.SQL("UPDATE {t} SET secrets_encrypted = %s, updated_at = now() WHERE id = %s").format(t=t),
                     (sealed, connection_id))  # fmt: skip
    conn.commit()


def connections_of_tenant(
    conn: psycopg.Connection, provider: str, external_tenant: str, base_url: str | None
) -> list[Connection]:
    """The connections of one provider account (tenant) at one API address: what re-authorising it updates."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {cols} FROM {t} WHERE provider = %s AND external_tenant = %s "
            "AND base_url IS NOT DISTINCT FROM %s ORDER BY created_at, id"
        ).format(cols=sql.SQL(_COLUMNS), t=table("integration_connections")),
        (provider, external_tenant, base_url),
    ).fetchall()
    return [Connection(*row) for row in rows]


def merge_settings(conn: psycopg.Connection, connection_id: str, updates: dict[str, Any]) -> None:
    """Merge `updates` into a connection's (non-secret) settings; commits."""
    done = conn.execute(
        sql.SQL("UPDATE {t} SET settings = settings || %s, updated_at = now() WHERE id = %s").format(
            t=table("integration_connections")),
        (Jsonb(updates), connection_id),
    ).rowcount  # fmt: skip
    conn.commit()
    if not done:
        raise ConnectionNotFound(f"no connection {connection_id!r}")


def set_base_url(
    conn: psycopg.Connection, connection_id: str, base_url: str, external_tenant: str | None = None
) -> None:
    """Point a connection at another address of the same account (a sandbox served on another port), and its
    tenant too when that is the account's address (a Mautic installation's URL); commits."""
    done = conn.execute(
        sql.SQL("UPDATE {t} SET base_url = %s, external_tenant = coalesce(%s, external_tenant), updated_at = now() "
                "WHERE id = %s").format(t=table("integration_connections")),
        (base_url, external_tenant, connection_id),
    ).rowcount  # fmt: skip
    conn.commit()
    if not done:
        raise ConnectionNotFound(f"no connection {connection_id!r}")


def set_status(conn: psycopg.Connection, connection_id: str, status: str, error: str | None = None) -> None:
    """Set the connection's status (`active`, `needs_reauth`, `disabled`) and its last error."""
    if status not in STATUSES:
        raise ValueError(f"unknown connection status {status!r}; expected one of {STATUSES}")
    conn.execute(
        sql.SQL("UPDATE {t} SET status = %s, last_error = %s, updated_at = now() WHERE id = %s").format(
            t=table("integration_connections")
        ),
        (status, error, connection_id),
    )


def record_sync_outcome(conn: psycopg.Connection, connection_id: str, sync_status: str, error: str | None) -> None:
    """Remember how the connection's latest sync ended (shown by `connections list`)."""
    conn.execute(
        sql.SQL(
            "UPDATE {t} SET sync_status = %s, last_error = %s, updated_at = now(), "
            "last_synced_at = CASE WHEN %s = 'success' THEN now() ELSE last_synced_at END WHERE id = %s"
        ).format(t=table("integration_connections")),
        (sync_status, error, sync_status, connection_id),
    )


def rotate_secrets(conn: psycopg.Connection, box: SecretBox) -> tuple[int, int]:
    """Re-encrypt every stored secret under the box's current key and record that key as the vault's
    current one; returns (rotated, already current). The caller commits.

    The `vault_keys` row is locked exclusively first: writes of secrets in flight (which hold it
    shared) finish before, so their rows are re-encrypted here, and writes after the commit find the
    new fingerprint, which a process started with the old key lacks, so it refuses to write.
    """
    t = table("integration_connections")
    keys = table("vault_keys")
    conn.execute(sql.SQL("SELECT fingerprint FROM {k} FOR UPDATE").format(k=keys))
    rotated = current = 0
    rows = conn.execute(
        sql.SQL("SELECT id, secrets_encrypted FROM {t} WHERE secrets_encrypted IS NOT NULL FOR NO KEY UPDATE").format(
            t=t
        )
    ).fetchall()
    for cid, ciphertext in rows:
        if box.is_current(ciphertext):
            current += 1
            continue
        conn.execute(sql.SQL("UPDATE {t} SET secrets_encrypted = %s, updated_at = now() WHERE id = %s").format(t=t),
                     (box.rotate(ciphertext), cid))  # fmt: skip
        rotated += 1
    conn.execute(sql.SQL("UPDATE {k} SET fingerprint = %s, rotated_at = now()").format(k=keys), (box.fingerprint,))
    return rotated, current
