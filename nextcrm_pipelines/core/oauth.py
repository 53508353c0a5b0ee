"""OAuth 2.0 for provider clients: endpoints per provider, token calls, and refresh under a row lock.

A provider with OAuth declares an `OAuthSpec` (its hosts, authorize and token paths, scopes, PKCE and
client-authentication style, the environment variables of its app). `TokenManager` hands the client
a valid access token for one connection and refreshes it the only safe way (invariant 4 of docs/architecture.md):
inside a transaction holding `SELECT ... FOR UPDATE` on the connection row (and on the rows of the
other tenants that share the same grant, as a Xero token reaching several organisations does), it
re-reads the stored token; if another process already refreshed it, that token is used; otherwise it
calls the token endpoint, commits the rotated refresh token, and only then returns the new access
token. Whatever could undo that commit (decrypting the siblings) is done before the call. `invalid_grant`
marks the connection `needs_reauth` with the command that fixes it.

Protocol details (authorisation URL, PKCE challenge, token request bodies, client authentication,
token expiry) come from authlib; the transport is httpx.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import psycopg
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749 import OAuth2Token
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from psycopg import sql

from nextcrm_pipelines.core.connections import (
    Connection,
    connect_command,
    fix_hint,
    lock_current_key,
    set_secret_command,
    set_status,
)
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import (
    DEFAULT_RETRY,
    AuthenticationFailed,
    ProviderError,
    ProviderUnreachable,
    backoff_delay,
    is_connect_failure,
    safe_url,
    transport_cause,
)
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.vault import SecretBox, Secrets, VaultError

log = logging.getLogger(__name__)

# Refresh this long before the provider's stated expiry, so a page request never carries a token
# that dies in flight.
REFRESH_MARGIN_SECONDS = 120
TOKEN_FIELDS = ("access_token", "refresh_token", "expires_at", "token_type", "scope")
# Errors from the token endpoint that no retry can fix: the user must connect again.
REAUTH_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


@dataclass(frozen=True)
class OAuthSpec:
    """How a provider does OAuth 2.0 (authorisation-code flow with refresh tokens).

    `hosts` maps a short key to the real origin (e.g. ``"identity": "https://identity.xero.com"``);
    a connection's base-URL override B replaces an origin with ``B/<key>`` (the sandbox layout).
    """

    provider: str
    hosts: Mapping[str, str]
    authorize: tuple[str, str] | None  # None: client credentials only (PayPal)
    token: tuple[str, str]
    scopes: tuple[str, ...]
    env_prefix: str
    pkce: bool = False
    client_auth: str = "client_secret_basic"  # or "client_secret_post"
    authorize_params: Mapping[str, str] = field(default_factory=dict)
    # Extra form fields the token endpoint wants on a code exchange (MYOB wants the scope again).
    exchange_params: Mapping[str, str] = field(default_factory=dict)
    default_redirect_uri: str = "http://localhost:8765/callback"
    # Hosts of the provider's own test environment, used by connections whose `mode` is "sandbox".
    sandbox_hosts: Mapping[str, str] = field(default_factory=dict)
    # Installed by each customer (Mautic): every URL hangs off the connection's base URL.
    self_hosted: bool = False

    def url(self, key: str, path: str, base_url: str | None = None, mode: str | None = None) -> str:
        """The absolute URL of `path` on host `key`: under `base_url` (the sandbox layout, or the
        installation of a self-hosted provider), else the provider's host for `mode`."""
        if self.self_hosted:
            if not base_url:
                raise OAuthConfigError(f"{self.provider} is self-hosted: give the base URL of the installation")
            return base_url.rstrip("/") + path
        if base_url:
            return f"{base_url.rstrip('/')}/{key}{path}"
        hosts = self.sandbox_hosts if str(mode).lower() == "sandbox" and key in self.sandbox_hosts else self.hosts
        return hosts[key] + path

    def authorize_url(self, base_url: str | None = None) -> str:
        if self.authorize is None:
            raise OAuthConfigError(f"{self.provider} has no authorisation-code flow")
        return self.url(*self.authorize, base_url=base_url)

    def token_url(self, base_url: str | None = None, mode: str | None = None) -> str:
        return self.url(*self.token, base_url=base_url, mode=mode)

    def app_from_environment(self) -> OAuthApp:
        """The app credentials from ``<PREFIX>_CLIENT_ID``, ``_CLIENT_SECRET``, ``_REDIRECT_URI``."""
        prefix = self.env_prefix
        client_id = os.environ.get(f"{prefix}_CLIENT_ID", "").strip()
        client_secret = os.environ.get(f"{prefix}_CLIENT_SECRET", "").strip()
        missing = [name for name, value in (("CLIENT_ID", client_id), ("CLIENT_SECRET", client_secret)) if not value]
        if missing:
            names = ", ".join(f"{prefix}_{m}" for m in missing)
            raise OAuthConfigError(f"set {names} to the credentials of your {self.provider} app")
        redirect = os.environ.get(f"{prefix}_REDIRECT_URI", "").strip() or self.default_redirect_uri
        return OAuthApp(client_id=client_id, client_secret=client_secret, redirect_uri=redirect)


class OAuthConfigError(RuntimeError):
    """The OAuth app is not configured (missing client id/secret or a bad redirect URI)."""


@dataclass(frozen=True)
class OAuthApp:
    """A registered OAuth app: its credentials and the redirect URI registered with the provider."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str

    def secrets(self) -> dict[str, str]:
        return {"client_id": self.client_id, "client_secret": self.client_secret}


def token_secrets(token: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """The fields of a token response worth storing (expiry as an absolute unix time)."""
    parsed = OAuth2Token(dict(token))
    if "expires_at" not in parsed and "expires_in" in token:
        parsed["expires_at"] = int((now or time.time()) + int(token["expires_in"]))
    return {name: parsed[name] for name in TOKEN_FIELDS if parsed.get(name) is not None}


def token_request(
    spec: OAuthSpec,
    *,
    client_id: str,
    client_secret: str,
    grant_type: str,
    base_url: str | None,
    http: httpx.Client,
    headers: Mapping[str, str] | None = None,
    mode: str | None = None,
    **params: str,
) -> dict[str, Any]:
    """POST one token request; returns the JSON token or raises `ProviderError`/`AuthenticationFailed`.

    Transport errors and 5xx are retried a few times (a lost answer to a refresh is safe to retry:
    the providers keep the previous refresh token valid for a grace period).
    """
    url = spec.token_url(base_url, mode)
    body = prepare_token_request(grant_type, **params)
    send_headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
                    **(headers or {})}  # fmt: skip
    auth = ClientAuth(client_id, client_secret, spec.client_auth)
    _, send_headers, body = auth.prepare("POST", url, send_headers, body)
    endpoint = f"POST {spec.token[1]}"
    attempts, began = 4, time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            response = http.post(url, content=body, headers=send_headers)
        except httpx.TransportError as exc:
            unreachable = is_connect_failure(exc)  # refused, not resolved: tried fewer times
            if attempt >= (min(attempts, DEFAULT_RETRY.connect_attempts) if unreachable else attempts):
                cause = transport_cause(exc, connect_timeout=http.timeout.connect, read_timeout=http.timeout.read)
                raise (ProviderUnreachable if unreachable else ProviderError)(
                    f"could not reach the token endpoint at {safe_url(url)}: {cause} "
                    f"({attempt} attempts over {time.monotonic() - began:.1f} s)",
                    provider=spec.provider, endpoint=endpoint,
                ) from exc  # fmt: skip
            time.sleep(backoff_delay(attempt, DEFAULT_RETRY))
            continue
        if response.status_code >= 500 and attempt < attempts:
            time.sleep(backoff_delay(attempt, DEFAULT_RETRY))
            continue
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        wrapped = payload.get("errors")
        if not payload.get("error") and isinstance(wrapped, list) and wrapped and isinstance(wrapped[0], dict):
            # Mautic wraps OAuth errors: {"errors": [{"type": "invalid_grant", "message": ...}]}.
            payload = {"error": wrapped[0].get("type") or "error", "error_description": wrapped[0].get("message")}
        error = payload.get("error")
        if response.status_code >= 400 or error:
            code = str(error or "error")
            described = f"{code}: {payload['error_description']}" if payload.get("error_description") else code
            cls = AuthenticationFailed if code in REAUTH_ERRORS or response.status_code == 401 else ProviderError
            raise cls(f"token endpoint refused the request ({described})", provider=spec.provider,
                      endpoint=endpoint, status=response.status_code)  # fmt: skip
        if "access_token" not in payload:
            raise ProviderError("token endpoint answered without an access_token", provider=spec.provider,
                                endpoint=endpoint, status=response.status_code)  # fmt: skip
        return payload
    raise AssertionError("unreachable")


def reconnect_hint(connection: Connection, by_credentials: bool = False) -> str:
    """The command that re-authorises this connection: new client credentials stored in its own row
    (`connections set-secret <id>`), or the OAuth flow, which updates the row of the tenant it reaches."""
    return set_secret_command(connection.id) if by_credentials else connect_command(connection)


class TokenManager:
    """Valid access tokens for one OAuth connection; refreshes under a row lock (see the module doc)."""

    def __init__(
        self,
        *,
        spec: OAuthSpec,
        connection: Connection,
        secrets: Secrets,
        box: SecretBox,
        database_url: str,
        clock: Any = time.time,
    ) -> None:
        self.spec = spec
        self.connection = connection
        self._box = box
        self._url = libpq_url(database_url)
        self._clock = clock
        self._lock = threading.Lock()
        self._secrets = dict(secrets.reveal())
        self._http = httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def secret(self, name: str) -> str | None:
        """A non-token secret of the connection (e.g. the MYOB company-file token)."""
        value = self._secrets.get(name)
        return None if value is None else str(value)

    @property
    def client_id(self) -> str:
        return str(self._secrets.get("client_id", ""))

    def _fresh(self, secrets: Mapping[str, Any]) -> bool:
        expires_at = secrets.get("expires_at")
        return bool(secrets.get("access_token")) and (
            expires_at is None or float(expires_at) - REFRESH_MARGIN_SECONDS > self._clock()
        )

    def access_token(self) -> str:
        """A token valid for at least the refresh margin, refreshing first if needed."""
        with self._lock:
            if self._fresh(self._secrets):
                return str(self._secrets["access_token"])
            return self._refresh(stale=str(self._secrets.get("access_token") or ""))

    def refresh_after_rejection(self, rejected: str) -> str:
        """The provider refused `rejected` (401): get a newer token, refreshing unless one exists."""
        with self._lock:
            if self._secrets.get("access_token") != rejected and self._fresh(self._secrets):
                return str(self._secrets["access_token"])
            return self._refresh(stale=rejected)

    def _refresh(self, stale: str) -> str:
        """Refresh under the group's row locks, deciding everything that could fail before the token call.

        The provider revokes the old refresh token once it has answered, so nothing may roll the
        transaction back after the call: every sibling of the token group is decrypted first. A sibling
        whose secrets cannot be decrypted (sealed under a dropped key, or corrupt) is left out of the
        update and marked `needs_reauth`: its own copy of the grant is unreadable already, and refusing
        the refresh instead would stop every other organisation of the grant for its sake. The tokens
        are sealed under the key the vault records as current (see `connections.lock_current_key`).
        """
        t = table("integration_connections")
        group = self.connection.settings.get("token_group")
        with psycopg.connect(self._url) as conn:
            # A process without the key recorded by the latest rotation stops here, before the token call.
            under = lock_current_key(conn, self._box)
            rows = conn.execute(
                sql.SQL(
                    "SELECT id, secrets_encrypted, display_name FROM {t} WHERE id = %s "
                    "OR (%s::text IS NOT NULL AND provider = %s AND settings->>'token_group' = %s) "
                    "ORDER BY id FOR UPDATE"
                ).format(t=t),
                (self.connection.id, group, self.connection.provider, group),
            ).fetchall()
            by_id = {row[0]: row for row in rows}
            if self.connection.id not in by_id:
                raise AuthenticationFailed("the connection was removed", provider=self.spec.provider,
                                           connection_id=self.connection.id)  # fmt: skip
            stored = dict(self._box.decrypt(self.connection.id, by_id[self.connection.id][1]).reveal())
            if stored.get("access_token") != stale and self._fresh(stored):
                # Another process refreshed while we waited for the lock: use its token.
                conn.commit()
                self._secrets = stored
                log.info("%s connection %s: using the token another process refreshed",
                         self.spec.provider, self.connection.id)  # fmt: skip
                return str(stored["access_token"])
            readable: dict[str, dict[str, Any]] = {self.connection.id: stored}
            unreadable: list[Connection] = []
            for cid, ciphertext, name in rows:
                if cid == self.connection.id:
                    continue
                try:
                    readable[cid] = dict(self._box.decrypt(cid, ciphertext).reveal()) if ciphertext else {}
                except VaultError:
                    unreadable.append(Connection(id=cid, provider=self.connection.provider, display_name=name))
            refresh_token = stored.get("refresh_token")
            # Client-credentials connections (PayPal, Mautic machine-to-machine) ask for a new token.
            by_credentials = stored.get("grant_type") == "client_credentials"
            if not refresh_token and not by_credentials:
                raise self._needs_reauth(conn, rows, "no refresh token is stored")
            grant = {"grant_type": "client_credentials"} if by_credentials else {
                "grant_type": "refresh_token", "refresh_token": str(refresh_token)}  # fmt: skip
            try:
                token = token_request(
                    self.spec,
                    client_id=str(stored.get("client_id", "")),
                    client_secret=str(stored.get("client_secret", "")),
                    base_url=self.connection.base_url,
                    http=self._http,
                    mode=self.connection.settings.get("mode"),
                    **grant,
                )
            except AuthenticationFailed as exc:
                reason = str(exc).split(": ", 1)[-1]
                raise self._needs_reauth(conn, rows, reason, by_credentials) from None
            fresh = token_secrets(token, now=self._clock())
            if refresh_token:
                fresh.setdefault("refresh_token", refresh_token)
            for cid, current in readable.items():
                conn.execute(
                    sql.SQL(
                        "UPDATE {t} SET secrets_encrypted = %s, token_version = token_version + 1, "
                        "token_expires_at = to_timestamp(%s), updated_at = now() WHERE id = %s"
                    ).format(t=t),
                    (self._box.encrypt(cid, {**current, **fresh}, under), fresh.get("expires_at"), cid),
                )
            for sibling in unreadable:
                message = (f"its secrets cannot be decrypted with the configured keys, so the refresh of its token "
                           f"group left it out; {fix_hint(reconnect_hint(sibling), by_browser=True)}")  # fmt: skip
                set_status(conn, sibling.id, "needs_reauth", message)
                log.warning("%s connection %s: left out of its token group's refresh (secrets cannot be decrypted)",
                            self.spec.provider, sibling.id)  # fmt: skip
            # The rotated refresh token is durable before the new access token is used anywhere.
            conn.commit()
        self._secrets = {**stored, **fresh}
        log.info("%s connection %s: access token refreshed", self.spec.provider, self.connection.id)
        return str(fresh["access_token"])

    def _needs_reauth(
        self, conn: psycopg.Connection, rows: list[tuple[Any, ...]], reason: str, by_credentials: bool = False
    ) -> AuthenticationFailed:
        """Mark the grant's connections `needs_reauth`, each with the command that fixes that connection."""
        cause = f"authorisation is no longer valid ({reason})"
        message = ""
        for cid, _, name in rows:
            row = Connection(id=cid, provider=self.connection.provider, display_name=name,
                             base_url=self.connection.base_url)  # fmt: skip
            stored = f"{cause}; {fix_hint(reconnect_hint(row, by_credentials), by_browser=not by_credentials)}"
            conn.execute(
                sql.SQL(
                    "UPDATE {t} SET status = 'needs_reauth', last_error = %s, updated_at = now() WHERE id = %s"
                ).format(t=table("integration_connections")),
                (stored, cid),
            )
            if cid == self.connection.id:
                message = stored
        conn.commit()
        return AuthenticationFailed(message, provider=self.spec.provider, connection_id=self.connection.id)


class BearerAuth(httpx.Auth):
    """httpx auth: a current bearer token on every request; one refresh and retry after a 401."""

    def __init__(self, tokens: TokenManager) -> None:
        self.tokens = tokens

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.tokens.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self.tokens.refresh_after_rejection(token)}"
            yield request
