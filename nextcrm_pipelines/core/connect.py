"""The OAuth connect flow: authorise in a browser, catch the callback locally, store one connection per tenant.

`nextcrm-pipelines connect <provider>` builds the authorisation URL (random `state`, PKCE S256 where the
provider supports it), prints it (and opens a browser when asked), serves the registered redirect URI on
loopback until the provider redirects back, checks `state`, exchanges the code, asks the provider which
tenants the grant reaches (Xero organisations, the QuickBooks realm, the MYOB company file), and stores a
connection per tenant with the tokens encrypted. Tenants reached by one grant share a `token_group`, so
their rotating refresh token is refreshed in one place (see `TokenManager`).
"""

from __future__ import annotations

import html
import queue
import secrets
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import psycopg
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.oauth import OAuthApp, OAuthConfigError, OAuthSpec, token_request, token_secrets
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.vault import SecretBox

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class ConnectError(RuntimeError):
    """The connect flow could not finish (denied, wrong state, timeout, no tenant)."""


@dataclass(frozen=True)
class Tenant:
    """One account a grant reaches: it becomes one connection."""

    external_id: str
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class TenantContext:
    """What tenant discovery may use: the fresh token, the callback's parameters, an HTTP client."""

    spec: OAuthSpec
    app: OAuthApp
    token: Mapping[str, Any] = field(repr=False)
    callback: Mapping[str, str]
    base_url: str | None
    http: httpx.Client


Discover = Callable[[TenantContext], list[Tenant]]


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str
    state: str
    code_verifier: str | None = field(default=None, repr=False)


def authorization_request(
    spec: OAuthSpec, app: OAuthApp, base_url: str | None = None, extra: Mapping[str, str] | None = None
) -> AuthorizationRequest:
    """The URL to send the user to, with a fresh `state` and (where supported) a PKCE challenge."""
    state = secrets.token_urlsafe(24)
    params: dict[str, str] = {**spec.authorize_params, **(extra or {})}
    verifier = None
    if spec.pkce:
        verifier = secrets.token_urlsafe(48)
        params.update(code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256")
    url = prepare_grant_uri(
        spec.authorize_url(base_url), app.client_id, "code", redirect_uri=app.redirect_uri,
        scope=" ".join(spec.scopes) or None, state=state, **params,
    )  # fmt: skip
    return AuthorizationRequest(url=url, state=state, code_verifier=verifier)


def _printable(text: str, limit: int = 200) -> str:
    """Provider text made safe for a terminal: printable characters only, at most `limit` of them."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class CallbackServer:
    """Serves the redirect URI on loopback and hands over the query of the first callback carrying `state`.

    Any page the user visits can send the browser to this port, so `state` is checked before anything
    else: a request without this flow's `state` (an error, a guessed or missing state) gets a 400, its
    text is neither shown nor kept, and the server keeps waiting for the genuine callback.
    """

    def __init__(self, redirect_uri: str, state: str) -> None:
        parts = urlsplit(redirect_uri)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or not parts.port:
            raise OAuthConfigError(
                f"the redirect URI {redirect_uri!r} must be http://localhost:<port>/<path> (or 127.0.0.1) "
                "so this command can receive the callback; register that URI with the provider's app"
            )
        self.path = parts.path or "/"
        self.state = state.encode()
        self.received: queue.Queue[dict[str, str]] = queue.Queue(maxsize=1)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target = urlsplit(self.path)
                if target.path != server.path:
                    self.send_error(404)
                    return
                params = dict(parse_qsl(target.query, keep_blank_values=True))
                status = 200
                if not secrets.compare_digest(params.get("state", "").encode(), server.state):
                    status, text = 400, "This is not the callback of the authorisation the terminal is waiting for."
                else:
                    try:
                        server.received.put_nowait(params)
                        text = "Authorisation received. You can close this window and return to the terminal."
                    except queue.Full:
                        text = "This authorisation was already received."
                    if "error" in params:
                        text = f"The provider answered {html.escape(_printable(params['error']))}. See the terminal."
                body = f"<!doctype html><title>NextCRM</title><p>{text}</p>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the query holds the code: never log it
                return

        host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
        try:
            self._httpd = ThreadingHTTPServer((host, parts.port), Handler)
        except OSError as exc:
            raise ConnectError(f"cannot listen on {host}:{parts.port} for the callback ({exc})") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oauth-callback", daemon=True)

    def __enter__(self) -> CallbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait(self, timeout: float) -> dict[str, str]:
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            raise ConnectError(f"no callback within {timeout:.0f}s; run the command again") from None


def connect(
    *,
    spec: OAuthSpec,
    discover: Discover,
    app: OAuthApp,
    database_url: str,
    box: SecretBox,
    base_url: str | None = None,
    name: str | None = None,
    on_url: Callable[[str], None] = print,
    timeout: float = 300.0,
    extra_authorize_params: Mapping[str, str] | None = None,
    connection_settings: Mapping[str, Any] | None = None,
) -> list[Connection]:
    """Run the whole flow and return the stored connections (one per tenant the grant reaches)."""
    request = authorization_request(spec, app, base_url, extra_authorize_params)
    with CallbackServer(app.redirect_uri, request.state) as callback:
        on_url(request.url)
        params = callback.wait(timeout)
    if "error" in params:
        detail = params.get("error_description") or params["error"]
        raise ConnectError(f"{spec.provider} refused the authorisation: {_printable(detail)}")
    if not secrets.compare_digest(params.get("state", ""), request.state):
        raise ConnectError("the callback's state does not match this request (a stale or forged callback); try again")
    code = params.get("code")
    if not code:
        raise ConnectError("the callback carried no authorisation code")
    exchange: dict[str, str] = {"code": code, "redirect_uri": app.redirect_uri, **spec.exchange_params}
    if request.code_verifier:
        exchange["code_verifier"] = request.code_verifier
    with httpx.Client(timeout=httpx.Timeout(30.0, connect=10.0)) as http:
        token = token_request(spec, client_id=app.client_id, client_secret=app.client_secret,
                              grant_type="authorization_code", base_url=base_url, http=http, **exchange)  # fmt: skip
        tenants = discover(TenantContext(spec, app, token, params, base_url, http))
    if not tenants:
        raise ConnectError(f"the {spec.provider} authorisation reaches no tenant (organisation/company)")
    stored = token_secrets(token)
    expires = stored.get("expires_at")
    group = f"{spec.provider}:{uuid.uuid4()}"
    connections = []
    with psycopg.connect(libpq_url(database_url)) as conn:
        for tenant in tenants:
            # Re-authorising an account updates its connections (matched by tenant and API address), keeping
            # their ids (the partition keys), names and settings; a new account gets a connection of its own.
            # A name given (the hints give the connection's own) picks that one; another name is a new connection.
            held = vault.connections_of_tenant(conn, spec.provider, tenant.external_id, base_url)
            if name and len(tenants) == 1:
                held = [c for c in held if c.display_name == name]
            targets = [(c.id, c.display_name, c.settings) for c in held]
            if not held:
                display = tenant.name if not name else name if len(tenants) == 1 else f"{name} - {tenant.name}"
                try:
                    named = vault.get_connection(conn, vault.connection_id_for(spec.provider, display))
                except vault.ConnectionNotFound:
                    named = None
                if named is not None and named.external_tenant not in (None, tenant.external_id):
                    raise ConnectError(
                        f"connection {named.id!r} already belongs to another {spec.provider} tenant "
                        f"({named.external_tenant}); choose another name with --name"
                    )
                targets = [(None, display, named.settings if named is not None else {})]
            for connection_id, display, kept in targets:
                connections.append(
                    vault.add_connection(
                        conn,
                        provider=spec.provider,
                        display_name=display,
                        secrets={**app.secrets(), **stored, **tenant.secrets},
                        box=box,
                        external_tenant=tenant.external_id,
                        base_url=base_url,
                        settings={**kept, **(connection_settings or {}), **tenant.settings, "token_group": group},
                        connection_id=connection_id,
                        token_expires_at=datetime.fromtimestamp(expires, UTC) if expires else None,
                    )
                )
    return connections
