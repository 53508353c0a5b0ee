"""A small OAuth 2.0 authorisation server shared by the sandbox emulators (Xero, QuickBooks, MYOB, ...).

Each emulator owns one ``OAuthServer`` with its provider's ``OAuthPolicy`` (token lifetimes, when a
refresh rotates the refresh token, how long a superseded refresh token keeps working, how the client
authenticates) and mounts the endpoint handlers this module builds under its own paths. It issues
authorisation codes (with ``state`` passed back and PKCE checked when a challenge was sent), access
and refresh tokens on the sandbox clock, and answers ``invalid_grant`` exactly where the real
providers do: an expired or reused code, a refresh token past its grace period or idle lifetime, a
revoked grant. ``stats`` counts token calls per grant, so tests can prove a client refreshed once.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hashlib
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

__all__ = [
    "AccessDenied",
    "Grant",
    "OAuthError",
    "OAuthPolicy",
    "OAuthServer",
]


class OAuthError(Exception):
    """An RFC 6749 error answer: ``{"error": ..., "error_description": ...}`` with its HTTP status."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        out = {"error": self.error}
        if self.description:
            out["error_description"] = self.description
        return out


class AccessDenied(Exception):
    """A bearer token the API must refuse; ``reason`` is ``missing``, ``invalid``, ``expired`` or ``revoked``."""

    def __init__(self, reason: str, expired_at: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired_at = expired_at


@dataclass
class OAuthPolicy:
    """How one provider's authorisation server behaves (all durations in seconds)."""

    access_ttl: int = 1800
    code_ttl: int = 300
    # A refresh token not used for this long is dead (Xero: 60 days unused; QuickBooks: 100 days rolling).
    refresh_idle_ttl: int | None = 60 * 86400
    # False: a refresh returns the same refresh token (MYOB when rotation is off).
    rotate: bool = True
    # A refresh rotates only a refresh token at least this old (QuickBooks: about a day); 0 = every refresh.
    rotate_after: int = 0
    # A superseded refresh token keeps working this long (Xero 30 min, QuickBooks 24 h).
    grace: int = 1800
    client_auth: frozenset[str] = frozenset({"basic", "body"})
    pkce: bool = True
    expires_in_as_string: bool = False
    token_type: str = "Bearer"
    # A grant's refresh tokens stop working this long after the first consent, used or not (QuickBooks 5 years).
    refresh_hard_ttl: int | None = None
    # A refresh token is issued only when the grant's scope holds this one (Xero ``offline_access``); None = always.
    refresh_requires_scope: str | None = None
    # False: an authorisation request may leave ``scope`` out (Mautic); True: ``invalid_scope`` without one.
    scope_required: bool = True
    # A registered redirect URI also admits any URI that starts with it, case-insensitively (oauth2-php, Mautic).
    redirect_prefix_match: bool = False


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...] = ()


@dataclass
class Grant:
    """One consent: a client's access to one user's data (``subject`` holds provider facts such as tenants)."""

    id: str
    client_id: str
    scope: str
    subject: dict[str, Any]
    created_at: int
    revoked: bool = False
    head: str | None = None  # the newest refresh token of this grant


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scope: str
    subject: dict[str, Any]
    expires_at: int
    challenge: str | None
    method: str | None
    used: bool = False


@dataclass
class _Refresh:
    grant_id: str
    issued_at: int
    last_used_at: int
    superseded_at: int | None = None


@dataclass
class _Access:
    grant_id: str
    expires_at: int


def _token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(24)}"


def _pkce_ok(verifier: str | None, challenge: str, method: str | None) -> bool:
    if not verifier:
        return False
    if (method or "plain").upper() == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return secrets.compare_digest(computed, challenge)
    return secrets.compare_digest(verifier, challenge)


_REQUEST_HEADERS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("oauth_request_headers")


def request_headers() -> Mapping[str, str]:
    """Headers of the token request being answered (empty outside one), for header-dependent extra fields."""
    return _REQUEST_HEADERS.get({})


def with_query(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` appended to its query string."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status,
        headers={"content-type": "application/json", **(headers or {})},
    )


@dataclass
class OAuthServer:
    """Codes, tokens and grants of one provider's sandbox, on the sandbox clock."""

    clock: Callable[[], int]
    policy: OAuthPolicy = field(default_factory=OAuthPolicy)
    # Extra fields for a token response (QuickBooks ``x_refresh_token_expires_in``, MYOB ``user``...).
    extra_token_fields: Callable[[Grant, dict[str, Any]], Mapping[str, Any]] | None = None
    # Whether a client may ask for a scope string (MYOB refuses ``CompanyFile`` for new API keys); None = any.
    scope_allowed: Callable[[str, str], bool] | None = None
    # The subject of a ``client_credentials`` grant from (client_id, form) (Xero: its one organisation); None = {}.
    client_credentials_subject: Callable[[str, Mapping[str, str]], dict[str, Any]] | None = None
    # The scope a ``client_credentials`` grant gets from (client_id, form), raising ``OAuthError`` for a scope the
    # client may not have (Xero: its custom connection's scopes); None = the form's ``scope`` as asked.
    client_credentials_scope: Callable[[str, Mapping[str, str]], str] | None = None
    # Builds an access token from (grant, expires_at) (Xero: JWT-shaped with claims); None = opaque ``at_...``.
    access_token_factory: Callable[[Grant, int], str] | None = None
    # The access-token lifetime for a grant (PayPal: per app); None = ``policy.access_ttl`` for every grant.
    access_ttl_for: Callable[[Grant], int] | None = None

    def __post_init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.grants: dict[str, Grant] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._access: dict[str, _Access] = {}
        self._lock = threading.RLock()
        # Keys: "<grant_type>" overall and "<grant_type>:<grant id>" per grant; "invalid_grant" refusals.
        self.stats: Counter[str] = Counter()

    # --- set-up (control API and tests) -----------------------------------------------------------------

    def register_client(self, client_id: str, client_secret: str, redirect_uris: tuple[str, ...] = ()) -> Client:
        """Register (or replace) an app; with no redirect URIs any loopback ``http`` URI is accepted."""
        client = Client(client_id, client_secret, tuple(redirect_uris))
        with self._lock:
            self.clients[client_id] = client
        return client

    def create_grant(self, client_id: str, scope: str, subject: dict[str, Any]) -> tuple[Grant, dict[str, Any]]:
        """Consent without the browser dance: a new grant and its first token set (for fixtures)."""
        with self._lock:
            if client_id not in self.clients:
                raise OAuthError("invalid_client", f"unknown client_id {client_id!r}", 401)
            grant = Grant(_token("grant"), client_id, scope, dict(subject), self.clock())
            self.grants[grant.id] = grant
            return grant, self._issue(grant, new_refresh=True)

    def revoke_grant(self, grant_id: str) -> None:
        """The user disconnected the app: every token of the grant stops working (``invalid_grant``)."""
        with self._lock:
            self.grants[grant_id].revoked = True

    def expire_access_tokens(self, grant_id: str) -> int:
        """Make the grant's access tokens expire now (as if 30 minutes had passed for them only)."""
        now = self.clock()
        with self._lock:
            hit = [a for a in self._access.values() if a.grant_id == grant_id and a.expires_at > now]
            for access in hit:
                access.expires_at = now
        return len(hit)

    def grant_of_refresh_token(self, token: str) -> Grant | None:
        with self._lock:
            ref = self._refresh.get(token)
            return self.grants.get(ref.grant_id) if ref else None

    # --- the protocol -----------------------------------------------------------------------------------

    def authorize(self, params: Mapping[str, str], subject: dict[str, Any]) -> str:
        """Validate an authorisation request and return where to redirect the browser (code or error).

        Problems with ``client_id`` or ``redirect_uri`` raise ``OAuthError`` (never redirect to an
        unverified URI); other problems go back to the client as ``?error=...&state=...``.
        """
        client = self.clients.get(params.get("client_id", ""))
        if client is None:
            raise OAuthError("invalid_client", "unknown client_id", 400)
        redirect_uri = params.get("redirect_uri", "")
        if not self._redirect_allowed(client, redirect_uri, self.policy.redirect_prefix_match):
            raise OAuthError("invalid_request", "redirect_uri is not registered for this client", 400)
        state = {"state": params["state"]} if "state" in params else {}
        if params.get("response_type") != "code":
            return with_query(redirect_uri, {"error": "unsupported_response_type", **state})
        if self.policy.scope_required and not params.get("scope"):
            return with_query(redirect_uri, {"error": "invalid_scope", **state})
        if self.scope_allowed is not None and not self.scope_allowed(client.client_id, params.get("scope", "")):
            return with_query(redirect_uri, {"error": "invalid_scope", **state})
        challenge = params.get("code_challenge") if self.policy.pkce else None
        method = params.get("code_challenge_method")
        if challenge and (method or "plain").upper() not in ("S256", "PLAIN"):
            return with_query(redirect_uri, {"error": "invalid_request", **state})
        code = _token("code")
        with self._lock:
            self._codes[code] = _Code(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                scope=params.get("scope", ""),
                subject=dict(subject),
                expires_at=self.clock() + self.policy.code_ttl,
                challenge=challenge,
                method=method,
            )
        return with_query(redirect_uri, {"code": code, **state})

    def token(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        """Answer a token request; raises ``OAuthError`` with the status the provider would use."""
        client = self._authenticate(form, authorization)
        grant_type = form.get("grant_type", "")
        with self._lock:
            self.stats[grant_type] += 1
            if grant_type == "authorization_code":
                return self._exchange_code(client, form)
            if grant_type == "refresh_token":
                return self._refresh_grant(client, form.get("refresh_token", ""))
            if grant_type == "client_credentials":
                make_subject = self.client_credentials_subject
                subject = make_subject(client.client_id, form) if make_subject else {}
                scope_of = self.client_credentials_scope
                scope = scope_of(client.client_id, form) if scope_of else form.get("scope", "")
                grant = Grant(_token("grant"), client.client_id, scope, subject, self.clock())
                self.grants[grant.id] = grant
                return self._issue(grant, new_refresh=False)
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")

    def revoke(self, token: str, client_id: str | None = None) -> bool:
        """Revoke the grant a refresh or access token belongs to; returns whether it was known."""
        with self._lock:
            ref = self._refresh.get(token)
            acc = self._access.get(token)
            grant_id = ref.grant_id if ref else acc.grant_id if acc else None
            if grant_id is None:
                return False
            grant = self.grants[grant_id]
            if client_id is not None and grant.client_id != client_id:
                return False
            grant.revoked = True
            return True

    def check_access(self, authorization: str | None) -> Grant:
        """The grant behind ``Authorization: Bearer <token>``, or ``AccessDenied`` saying why not."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AccessDenied("missing")
        token = authorization[7:].strip()
        with self._lock:
            access = self._access.get(token)
            if access is None:
                raise AccessDenied("invalid")
            grant = self.grants[access.grant_id]
            if grant.revoked:
                raise AccessDenied("revoked")
            if self.clock() >= access.expires_at:
                raise AccessDenied("expired", access.expires_at)
            return grant

    # --- internals --------------------------------------------------------------------------------------

    @staticmethod
    def _redirect_allowed(client: Client, uri: str, prefix_match: bool = False) -> bool:
        if client.redirect_uris:
            if prefix_match:
                return any(uri.lower().startswith(r.lower()) for r in client.redirect_uris)
            return uri in client.redirect_uris
        parts = urlsplit(uri)
        return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")

    def authenticate_client(self, form: Mapping[str, str], authorization: str | None) -> Client:
        """The client behind token-endpoint style credentials (Basic or body), e.g. for a revocation endpoint."""
        return self._authenticate(form, authorization)

    def _authenticate(self, form: Mapping[str, str], authorization: str | None) -> Client:
        client_id = secret = None
        if authorization and authorization.lower().startswith("basic "):
            if "basic" not in self.policy.client_auth:
                raise OAuthError("invalid_client", "HTTP Basic client authentication is not accepted", 401)
            try:
                client_id, _, secret = base64.b64decode(authorization[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        elif "client_id" in form:
            if "body" not in self.policy.client_auth:
                raise OAuthError("invalid_client", "client credentials must be sent with HTTP Basic", 401)
            client_id, secret = form.get("client_id"), form.get("client_secret")
        client = self.clients.get(client_id or "")
        if client is None or not secrets.compare_digest((secret or "").encode(), client.client_secret.encode()):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client

    def _exchange_code(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        code = self._codes.get(form.get("code", ""))
        if code is None or code.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown authorization code")
        if code.used:
            raise OAuthError("invalid_grant", "authorization code already used")
        if self.clock() >= code.expires_at:
            raise OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri", "") != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        if code.challenge and not _pkce_ok(form.get("code_verifier"), code.challenge, code.method):
            raise OAuthError("invalid_grant", "PKCE verification failed")
        code.used = True
        grant = Grant(_token("grant"), client.client_id, code.scope, code.subject, self.clock())
        self.grants[grant.id] = grant
        self.stats[f"authorization_code:{grant.id}"] += 1
        return self._issue(grant, new_refresh=True)

    def _refresh_grant(self, client: Client, token: str) -> dict[str, Any]:
        now = self.clock()
        ref = self._refresh.get(token)
        grant = self.grants.get(ref.grant_id) if ref else None
        if ref is None or grant is None or grant.client_id != client.client_id:
            self.stats["invalid_grant"] += 1
            raise OAuthError("invalid_grant")
        self.stats[f"refresh_token:{grant.id}"] += 1
        policy = self.policy
        dead = (
            grant.revoked
            or (policy.refresh_idle_ttl is not None and now - ref.last_used_at >= policy.refresh_idle_ttl)
            or (ref.superseded_at is not None and now - ref.superseded_at >= policy.grace)
            or (policy.refresh_hard_ttl is not None and now - grant.created_at >= policy.refresh_hard_ttl)
        )
        if dead:
            self.stats["invalid_grant"] += 1
            raise OAuthError("invalid_grant")
        ref.last_used_at = now
        if ref.superseded_at is not None:
            # A retry with the previous token inside its grace period: hand back the current head.
            return self._issue(grant, new_refresh=False, refresh_token=grant.head)
        rotate = policy.rotate and now - ref.issued_at >= policy.rotate_after
        if rotate:
            ref.superseded_at = now
            return self._issue(grant, new_refresh=True)
        return self._issue(grant, new_refresh=False, refresh_token=token)

    def _issue(self, grant: Grant, *, new_refresh: bool, refresh_token: str | None = None) -> dict[str, Any]:
        now = self.clock()
        access_ttl = self.access_ttl_for(grant) if self.access_ttl_for is not None else self.policy.access_ttl
        expires_at = now + access_ttl
        access = self.access_token_factory(grant, expires_at) if self.access_token_factory else _token("at")
        self._access[access] = _Access(grant.id, expires_at)
        needed = self.policy.refresh_requires_scope
        if new_refresh and (needed is None or needed in grant.scope.split()):
            refresh_token = _token("rt")
            self._refresh[refresh_token] = _Refresh(grant.id, issued_at=now, last_used_at=now)
            grant.head = refresh_token
        ttl: int | str = str(access_ttl) if self.policy.expires_in_as_string else access_ttl
        body: dict[str, Any] = {"access_token": access, "token_type": self.policy.token_type, "expires_in": ttl}
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        if grant.scope:
            body["scope"] = grant.scope
        if self.extra_token_fields is not None:
            body.update(self.extra_token_fields(grant, body))
        return body

    # --- Starlette handlers -----------------------------------------------------------------------------

    async def token_endpoint(self, request: Request) -> Response:
        """``POST`` form-encoded token endpoint (RFC 6749 section 3.2)."""
        body = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        headers_token = _REQUEST_HEADERS.set(request.headers)
        try:
            payload = self.token(form, request.headers.get("authorization"))
        except OAuthError as err:
            return json_response(err.status, err.body(), {"cache-control": "no-store"})
        finally:
            _REQUEST_HEADERS.reset(headers_token)
        return json_response(200, payload, {"cache-control": "no-store", "pragma": "no-cache"})

    def authorize_endpoint(
        self, subject_for: Callable[[Mapping[str, str]], tuple[dict[str, Any], dict[str, str]]]
    ) -> Callable[[Request], Any]:
        """A ``GET`` authorisation endpoint that consents at once and redirects back with the code.

        ``subject_for(params)`` returns the grant's subject (tenants, realm, company file...) and any
        extra parameters the provider adds to the redirect (QuickBooks ``realmId``, MYOB ``businessId``).
        """

        async def handler(request: Request) -> Response:
            params = dict(request.query_params)
            try:
                subject, extra = subject_for(params)
                location = self.authorize(params, subject)
            except OAuthError as err:
                return json_response(err.status, err.body())
            if extra and "code=" in location:
                location = with_query(location, extra)
            return Response(status_code=302, headers={"location": location})

        return handler

    def control_state(self) -> dict[str, Any]:
        """Counts for ``GET /_sandbox/<provider>/oauth``: token calls per grant type and grant."""
        with self._lock:
            return {
                "stats": dict(self.stats),
                "grants": [
                    {"id": g.id, "client_id": g.client_id, "scope": g.scope, "revoked": g.revoked, "subject": g.subject}
                    for g in self.grants.values()
                ],
            }

    def control_routes(self, prefix: str) -> list[BaseRoute]:
        """Unauthenticated test controls under ``prefix`` (e.g. ``/_sandbox/xero``) + ``/oauth/...``.

        ``POST /oauth/clients`` {client_id, client_secret, redirect_uris?}; ``POST /oauth/grants``
        {client_id, scope, subject?} → {grant_id, token}; ``POST /oauth/grants/{id}/revoke``;
        ``POST /oauth/grants/{id}/expire-access``; ``GET /oauth`` → stats and grants.
        """

        async def body_of(request: Request) -> dict[str, Any]:
            try:
                body = orjson.loads(await request.body() or b"{}")
            except orjson.JSONDecodeError:
                raise OAuthError("invalid_request", "body must be JSON") from None
            if not isinstance(body, dict):
                raise OAuthError("invalid_request", "body must be a JSON object")
            return body

        async def clients(request: Request) -> Response:
            try:
                body = await body_of(request)
                client = self.register_client(
                    str(body["client_id"]), str(body["client_secret"]), tuple(body.get("redirect_uris") or ())
                )
            except KeyError as err:
                return json_response(400, {"error": f"missing {err.args[0]}"})
            except OAuthError as err:
                return json_response(err.status, err.body())
            return json_response(200, {"client_id": client.client_id, "redirect_uris": list(client.redirect_uris)})

        async def grants(request: Request) -> Response:
            try:
                body = await body_of(request)
                grant, token = self.create_grant(
                    str(body["client_id"]), str(body.get("scope", "")), dict(body.get("subject") or {})
                )
            except KeyError as err:
                return json_response(400, {"error": f"missing {err.args[0]}"})
            except OAuthError as err:
                return json_response(err.status, err.body())
            return json_response(200, {"grant_id": grant.id, "token": token})

        def on_grant(action: Callable[[str], Any]) -> Callable[[Request], Any]:
            async def handler(request: Request) -> Response:
                grant_id = request.path_params["grant_id"]
                if grant_id not in self.grants:
                    return json_response(404, {"error": f"no grant {grant_id!r}"})
                return json_response(200, {"grant_id": grant_id, "result": action(grant_id)})

            return handler

        async def state(request: Request) -> Response:
            return json_response(200, self.control_state())

        return [
            Route(f"{prefix}/oauth", state, methods=["GET"]),
            Route(f"{prefix}/oauth/clients", clients, methods=["POST"]),
            Route(f"{prefix}/oauth/grants", grants, methods=["POST"]),
            Route(f"{prefix}/oauth/grants/{{grant_id}}/revoke", on_grant(self.revoke_grant), methods=["POST"]),
            Route(
                f"{prefix}/oauth/grants/{{grant_id}}/expire-access",
                on_grant(self.expire_access_tokens),
                methods=["POST"],
            ),
        ]
