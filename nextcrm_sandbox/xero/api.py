"""The Xero sandbox's HTTP side: OAuth hosts, ``/connections``, the Accounting API reads and the control API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    bool_field,
    control_endpoint,
    optional_int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.oauth import AccessDenied, Grant, OAuthError, OAuthPolicy, OAuthServer, json_response
from nextcrm_sandbox.xero.data import (
    _TAX,
    XeroTenant,
    _Contact,
    _Invoice,
    _iso_connection,
    _Payment,
    _Settings,
    format_msdate,
    parse_if_modified_since,
)
from nextcrm_sandbox.xero.query import (
    _getters,
    _parse_order,
    _QueryError,
    _Renderer,
    _sort,
    _View,
    currencies_of,
    parse_where,
    to_xml,
)
from nextcrm_sandbox.xero.webhooks import Change, XeroWebhooks
from nextcrm_sandbox.xero.writes import WRITABLE, BadBody, XeroWriter

LOGIN_PREFIX = "/xero/login"
IDENTITY_PREFIX = "/xero/identity"
API_PREFIX = "/xero/api"
ACCOUNTING_PREFIX = f"{API_PREFIX}/api.xro/2.0"
CONTROL_PREFIX = "/_sandbox/xero"
DEFAULT_SCOPE = (
    "openid profile email offline_access accounting.transactions.read accounting.contacts.read accounting.settings.read"
)

_EVERY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_JSON = "application/json; charset=utf-8"
_XML = "text/xml; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_NOT_FOUND = "The resource you're looking for cannot be found"
_SERVER_ERROR_DETAIL = (
    "An error occurred in Xero. Check the API Status page http://status.developer.xero.com for current service status."
)
_INVOICE_SCOPES = frozenset(
    {"accounting.transactions", "accounting.transactions.read", "accounting.invoices", "accounting.invoices.read"}
)
_CONTACT_SCOPES = frozenset({"accounting.contacts", "accounting.contacts.read"})
_PAYMENT_SCOPES = frozenset(
    {"accounting.transactions", "accounting.transactions.read", "accounting.payments", "accounting.payments.read"}
)
_SETTINGS_SCOPES = frozenset({"accounting.settings", "accounting.settings.read"})
# What a write needs: the broad scope or its granular successor, never a `.read` one.
_WRITE_SCOPES_OF = {
    "invoices": frozenset({"accounting.transactions", "accounting.invoices"}),
    "contacts": frozenset({"accounting.contacts"}),
}
# Xero's `Idempotency-Key`: at most 128 characters.
_IDEMPOTENCY_KEY_MAX = 128
# The scopes each emulated resource needs (one of them): broad legacy ones and their granular successors.
_SCOPES_OF = {
    "invoices": _INVOICE_SCOPES,
    "contacts": _CONTACT_SCOPES,
    "payments": _PAYMENT_SCOPES,
    "organisation": _SETTINGS_SCOPES,
    "currencies": _SETTINGS_SCOPES,
}
# What each emulated resource is called in its answers and its `where`; the case Xero spells its path in.
_RESOURCES = {
    "invoices": ("Invoices", "Invoice"),
    "contacts": ("Contacts", "Contact"),
    "payments": ("Payments", "Payment"),
    "organisation": ("Organisation", "Organisation"),
    "currencies": ("Currencies", "Currency"),
}


# ---------------------------------------------------------------------------------------------------------
# Runtime: rate-limit windows, faults, connections, control-API field checks
# ---------------------------------------------------------------------------------------------------------


class _Window:
    """A fixed window counter on real (monotonic) time: it opens at the first hit after the last one closed."""

    __slots__ = ("count", "length", "limit", "start")

    def __init__(self, limit: int, length: float) -> None:
        self.limit = limit
        self.length = length
        self.start: float | None = None
        self.count = 0

    def __reduce__(self) -> tuple[Any, ...]:
        # Saved with the sandbox's state (``sandbox.state``) closed: ``start`` is on this boot's monotonic clock.
        return _Window, (self.limit, self.length)

    def _roll(self, t: float) -> None:
        if self.start is None or t - self.start >= self.length:
            self.start = t
            self.count = 0

    def full(self, t: float) -> bool:
        self._roll(t)
        return self.count >= self.limit

    def hit(self, t: float) -> None:
        self._roll(t)
        self.count += 1

    def remaining(self, t: float) -> int:
        self._roll(t)
        return max(0, self.limit - self.count)

    def retry_after(self, t: float) -> int:
        self._roll(t)
        assert self.start is not None
        return max(1, math.ceil(self.start + self.length - t))


@dataclass(slots=True)
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    rate_limit_problem: str = "minute"
    day_limit_exhausted: bool = False
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass
class _TenantRuntime:
    tenant: XeroTenant
    settings: _Settings
    minute: _Window
    day: _Window
    inflight: int = 0
    faults: _Faults | None = None
    requests: int = 0
    rate_limited: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0
    # Writes answered from an `Idempotency-Key`'s first answer, and keys reused for another request.
    idempotent_replays: int = 0
    idempotency_conflicts: int = 0

    def __getstate__(self) -> dict[str, Any]:
        # A restored sandbox (``sandbox.state``) has no request in flight.
        return {**self.__dict__, "inflight": 0}


@dataclass(frozen=True)
class _Remembered:
    """A write's answer kept under its ``Idempotency-Key``: the request it answered (a hash) and until when."""

    fingerprint: str
    status: int
    content: bytes
    content_type: str
    expires: int  # sandbox unix seconds


@dataclass
class _Connection:
    id: str
    tenant_id: str
    auth_event_id: str
    created: int
    updated: int


def _problem(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"Type": None, "Title": title, "Status": status, "Detail": detail, "Instance": str(uuid.uuid4()),
            "Extensions": {}}  # fmt: skip


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_TENANT_FIELDS = frozenset(
    {
        "client_id", "seed", "invoices", "contacts", "customers", "days", "name", "id", "now", "base_currency",
        "tenant_type", "tier", *_Settings.__slots__,  # type: ignore[attr-defined]
    }
)  # fmt: skip
_FAULT_FIELDS = frozenset({"tenant", *_Faults.__slots__})  # type: ignore[attr-defined]
_CHANGE_FIELDS = (
    "edits", "voids", "deletes", "creates", "archives", "contact_edits", "contact_creates", "payments",
    "payment_deletes",
)  # fmt: skip


_control = partial(control_endpoint, oauth_errors=True)


def _number_field(body: Mapping[str, Any], name: str, default: float, minimum: float = 0.0) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise ControlError(400, f"{name} must be a number > {minimum:g}")
    return float(value)


# ---------------------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------------------


class XeroSandbox:
    """Xero API emulator state and routes, on the shared sandbox clock.

    ``clock`` gives sandbox unix seconds: token lifetimes, ``UpdatedDateUTC`` of changes and ``DateTimeUTC``
    follow it; rate-limit windows use real monotonic time because the sandbox clock jumps.
    """

    def __init__(self, clock: Callable[[], int], *, webhook_time_scale: float = 1.0) -> None:
        self.clock = clock
        self.oauth = OAuthServer(
            clock,
            OAuthPolicy(
                access_ttl=1800, refresh_idle_ttl=60 * 86400, grace=1800, refresh_requires_scope="offline_access"
            ),
            client_credentials_subject=self._client_credentials_subject,
            client_credentials_scope=self._client_credentials_scope,
            access_token_factory=self._access_token,
        )
        self.tenants: dict[str, _TenantRuntime] = {}
        self.app_minute: dict[str, _Window] = {}
        self.connections: dict[str, list[_Connection]] = {}
        self.global_faults = _Faults()
        self.stats: Counter[str] = Counter()
        self.stats_by_path: Counter[str] = Counter()
        self.stats_by_status: Counter[str] = Counter()
        # Writes' answers by (app, organisation, Idempotency-Key), while Xero would remember them.
        self.idempotency: dict[tuple[str, str, str], _Remembered] = {}
        self.webhooks = XeroWebhooks(
            clock,
            app_of_tenant=self._app_of_tenant,
            known_app=self._known_app,
            time_scale=webhook_time_scale,
        )

    # Methods, not lambdas: the webhooks keep them and are saved with the sandbox's state.
    def _app_of_tenant(self, tenant_id: str) -> str | None:
        rt = self.tenants.get(tenant_id.lower())
        return rt.tenant.client_id if rt else None

    def _known_app(self, client_id: str) -> bool:
        return client_id in self.oauth.clients

    # --- tenants ----------------------------------------------------------------------------------------

    @staticmethod
    def normalise_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a ``POST /_sandbox/xero/tenants`` body and fill in the defaults."""
        unknown = set(spec) - _TENANT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown tenant fields: {sorted(unknown)}")
        client_id = spec.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ControlError(400, "client_id must be a non-empty string")
        contacts = spec.get("contacts", spec.get("customers", 20))
        out: dict[str, Any] = {
            "client_id": client_id,
            "seed": optional_int_field(spec, "seed", 0, minimum=None),
            "invoices": optional_int_field(spec, "invoices", 100),
            "contacts": optional_int_field({"contacts": contacts}, "contacts", 20),
            "days": _number_field(spec, "days", 30),
            "name": spec.get("name"),
            "id": str(spec["id"]).lower() if spec.get("id") else None,
            "tenant_type": spec.get("tenant_type", "ORGANISATION"),
        }
        if out["tenant_type"] not in ("ORGANISATION", "PRACTICE"):
            raise ControlError(400, "tenant_type must be ORGANISATION or PRACTICE")
        if spec.get("base_currency") is not None:
            if spec["base_currency"] not in _TAX:
                raise ControlError(400, f"base_currency must be one of {sorted(_TAX)}")
            out["base_currency"] = spec["base_currency"]
        if spec.get("now") is not None:
            out["now"] = optional_int_field(spec, "now", None, minimum=None)
        if out["contacts"] == 0 and out["invoices"] > 0:
            raise ControlError(400, "invoices need at least one contact")
        return out

    @staticmethod
    def settings_from(spec: Mapping[str, Any], base: _Settings | None = None) -> _Settings:
        """The tenant knobs in ``spec`` applied over ``base`` (or the defaults)."""
        s = _Settings(**base.as_dict()) if base is not None else _Settings()
        tier = spec.get("tier")
        if tier is not None:
            if tier not in ("starter", "standard"):
                raise ControlError(400, "tier must be starter (1,000 calls a day) or standard (5,000)")
            s.day_limit = 1000 if tier == "starter" else 5000
        for name in ("minute_limit", "day_limit", "concurrent_limit", "app_minute_limit", "default_page_size",
                     "max_page_size", "max_ids"):  # fmt: skip
            if name in spec:
                setattr(s, name, optional_int_field(spec, name, None, minimum=1))
        if "unpaged_limit" in spec:
            s.unpaged_limit = optional_int_field(spec, "unpaged_limit", None, minimum=1)
        for name in ("minute_window_seconds", "day_window_seconds", "idempotency_window_seconds"):
            if name in spec:
                setattr(s, name, _number_field(spec, name, 1.0))
        for name in ("updated_date_utc_string", "contacts_updated_date_utc_string", "msdate_offset"):
            if name in spec:
                setattr(s, name, bool_field(spec, name, True))
        for name in ("provider_name", "concurrent_problem", "app_minute_problem", "custom_connection_scope"):
            if name in spec:
                setattr(s, name, str(spec[name]))
        return s

    def add_tenant(self, spec: Mapping[str, Any]) -> tuple[XeroTenant, str]:
        """Generate and install an organisation (replacing one with the same id); returns it and the outcome."""
        norm = self.normalise_spec(spec)
        settings = self.settings_from(spec)
        tenant = XeroTenant(norm, norm.get("now", self.clock()))
        return tenant, self._install(tenant, settings, spec)

    def _install(self, tenant: XeroTenant, settings: _Settings, knobs: Mapping[str, Any]) -> str:
        current = self.tenants.get(tenant.id)
        if current is not None and current.tenant.client_id != tenant.client_id:
            raise ControlError(409, f"tenant {tenant.id} belongs to another client")
        self.tenants[tenant.id] = _TenantRuntime(
            tenant=tenant,
            settings=settings,
            minute=_Window(settings.minute_limit, settings.minute_window_seconds),
            day=_Window(settings.day_limit, settings.day_window_seconds),
        )
        self._configure_app(tenant.client_id, settings, knobs)
        return "created" if current is None else "replaced"

    def _configure_app(self, client_id: str, settings: _Settings, knobs: Mapping[str, Any]) -> None:
        """The app-wide minute window: created with the first tenant, changed only by knobs a spec names."""
        app = self.app_minute.get(client_id)
        if app is None:
            self.app_minute[client_id] = _Window(settings.app_minute_limit, settings.minute_window_seconds)
            return
        if "app_minute_limit" in knobs:
            app.limit = settings.app_minute_limit
        if "minute_window_seconds" in knobs:
            app.length = settings.minute_window_seconds

    def tenants_of(self, client_id: str) -> list[XeroTenant]:
        """The organisations of an app, oldest first."""
        return [rt.tenant for rt in self.tenants.values() if rt.tenant.client_id == client_id]

    def _summary(self, rt: _TenantRuntime) -> dict[str, Any]:
        t = rt.tenant
        return {
            "id": t.id,
            "name": t.name,
            "client_id": t.client_id,
            "tenant_type": t.tenant_type,
            "base_currency": t.base_currency,
            "seed": t.seed,
            "counts": t.counts(),
            "settings": rt.settings.as_dict(),
        }

    # --- OAuth hooks ------------------------------------------------------------------------------------

    def _subject(self, client_id: str, only: Iterable[str] | None = None) -> dict[str, Any]:
        tenants = [t.id for t in self.tenants_of(client_id)]
        if only is not None:
            wanted = [str(w).strip().lower() for w in only if str(w).strip()]
            missing = [w for w in wanted if w not in tenants]
            if missing:
                raise OAuthError("invalid_request", f"unknown tenant(s) for this client: {missing}")
            tenants = wanted
        return {"tenants": tenants, "auth_event_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4())}

    def _authorize_subject(self, params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        only = params.get("sandbox_tenant")
        return self._subject(params.get("client_id", ""), only.split(",") if only else None), {}

    def _client_credentials_subject(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        tenants = self.tenants_of(client_id)
        subject = self._subject(client_id)
        subject["tenants"] = [tenants[-1].id] if tenants else []
        return subject

    def _client_credentials_scope(self, client_id: str, form: Mapping[str, str]) -> str:
        """A custom connection's token carries the scopes the connection was set up with (in the answer and the
        JWT's ``scope`` claim), or the part of them the request asks for; asking for more is ``invalid_scope``."""
        tenants = self.tenants_of(client_id)
        asked = form.get("scope", "").split()
        if not tenants:
            return " ".join(asked)
        granted = self.tenants[tenants[-1].id].settings.custom_connection_scope.split()
        if any(scope not in granted for scope in asked):
            raise OAuthError("invalid_scope")
        return " ".join(asked or granted)

    def _access_token(self, grant: Grant, expires_at: int) -> str:
        now = self.clock()
        claims = {
            "nbf": now,
            "exp": expires_at,
            "iss": "https://identity.xero.com",
            "aud": "https://identity.xero.com/resources",
            "client_id": grant.client_id,
            "sub": grant.subject.get("user_id", grant.id),
            "auth_time": grant.created_at,
            "xero_userid": grant.subject.get("user_id"),
            "global_session_id": grant.id,
            "jti": uuid.uuid4().hex,
            "authentication_event_id": grant.subject.get("auth_event_id"),
            "scope": grant.scope.split(),
        }
        header = {"alg": "RS256", "kid": "sandbox", "typ": "JWT"}
        return ".".join((_b64url(orjson.dumps(header)), _b64url(orjson.dumps(claims)), _b64url(uuid.uuid4().bytes)))

    def _connections_of(self, grant: Grant) -> list[_Connection]:
        conns = self.connections.get(grant.id)
        if conns is None:
            if "tenants" not in grant.subject:
                grant.subject.update(self._subject(grant.client_id))
            event = grant.subject.get("auth_event_id") or str(uuid.uuid4())
            conns = [
                _Connection(str(uuid.uuid4()), tid, event, grant.created_at, grant.created_at)
                for tid in grant.subject["tenants"]
            ]
            self.connections[grant.id] = conns
        if grant.revoked:
            conns.clear()
        return conns

    # --- routes -----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Xero's hosts under ``/xero/{login,identity,api}`` and the control API under ``/_sandbox/xero``."""
        authorize = self.oauth.authorize_endpoint(self._authorize_subject)
        c = CONTROL_PREFIX
        return [
            Route(f"{LOGIN_PREFIX}/identity/connect/authorize", self._counted(authorize, "authorize"), methods=["GET"]),
            Route(
                f"{IDENTITY_PREFIX}/connect/token", self._counted(self.oauth.token_endpoint, "token"), methods=["POST"]
            ),
            Route(f"{IDENTITY_PREFIX}/connect/revocation", self._revocation, methods=["POST"]),
            Route(f"{API_PREFIX}/connections", self._list_connections, methods=["GET"]),
            Route(f"{API_PREFIX}/Connections", self._list_connections, methods=["GET"]),
            Route(f"{API_PREFIX}/connections/{{cid}}", self._delete_connection, methods=["DELETE"]),
            Route(f"{API_PREFIX}/Connections/{{cid}}", self._delete_connection, methods=["DELETE"]),
            Route(f"{ACCOUNTING_PREFIX}/{{resource}}", self._accounting, methods=["GET", "PUT", "POST"]),
            Route(f"{ACCOUNTING_PREFIX}/{{resource}}/{{rid}}", self._accounting, methods=["GET", "POST"]),
            *self.oauth.control_routes(c),
            Route(f"{c}/grants", self._control_grant, methods=["POST"]),
            Route(f"{c}/tenants", self._control_tenants, methods=["GET", "POST"]),
            Route(f"{c}/tenants/{{tid}}", self._control_tenant, methods=["GET", "PATCH"]),
            Route(f"{c}/tenants/{{tid}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{c}/tenants/{{tid}}/records", self._control_add_record, methods=["POST"]),
            Route(f"{c}/tenants/{{tid}}/records/{{rid}}", self._control_update_record, methods=["PATCH"]),
            Route(f"{c}/tenants/{{tid}}/records/{{rid}}", self._control_purge_record, methods=["DELETE"]),
            Route(f"{c}/tenants/{{tid}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{c}/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route(f"{c}/stats", self._control_stats, methods=["GET"]),
            *self.webhooks.routes(c),
            # Last: any other path or method on Xero's hosts gets Xero's answer, not the router's.
            Route("/xero/{rest:path}", self._unknown, methods=_EVERY_METHOD),
        ]

    def _count(self, pattern: str, status: int) -> None:
        self.stats["total"] += 1
        self.stats_by_path[pattern] += 1
        self.stats_by_status[str(status)] += 1

    def _counted(self, handler: Callable[[Request], Any], name: str) -> Callable[[Request], Any]:
        async def counted(request: Request) -> Response:
            response: Response = await handler(request)
            self._count(f"{request.method} {request.url.path}", response.status_code)
            return response

        counted.__name__ = f"xero_{name}"
        return counted

    async def _unknown(self, request: Request) -> Response:
        """A path (or method) Xero does not serve: its plain-text 404, after the token check on the API host."""
        response: Response = Response(_NOT_FOUND, 404, headers={"content-type": _TEXT})
        if request.url.path.startswith(f"{API_PREFIX}/"):
            grant = self._bearer(request)
            if isinstance(grant, Response):
                response = grant
        self._count(f"{request.method} /xero/*", response.status_code)
        return response

    # --- identity ---------------------------------------------------------------------------------------

    async def _revocation(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        try:
            client = self.oauth.authenticate_client(form, request.headers.get("authorization"))
        except OAuthError as err:
            response = json_response(400, {"error": err.error})
        else:
            token = form.get("token", "")
            if not token:
                response = json_response(400, {"error": "invalid_request"})
            else:
                self.oauth.revoke(token, client.client_id)
                response = Response(status_code=200)
        self._count("POST /xero/identity/connect/revocation", response.status_code)
        return response

    def _bearer(self, request: Request) -> Grant | Response:
        try:
            return self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied as denied:
            if denied.reason == "expired" and denied.expired_at is not None:
                at = datetime.fromtimestamp(denied.expired_at, UTC).strftime("%m/%d/%Y %H:%M:%S")
                return json_response(401, _problem(401, "Unauthorized", f"TokenExpired: token expired at {at}"))
            if denied.reason == "revoked":
                return json_response(403, _problem(403, "Forbidden", "AuthenticationUnsuccessful"))
            return json_response(401, _problem(401, "Unauthorized", "AuthenticationUnsuccessful"))

    async def _list_connections(self, request: Request) -> Response:
        grant = self._bearer(request)
        if isinstance(grant, Response):
            if grant.status_code == 403:  # a revoked grant: its user has no connections left
                grant = json_response(200, [], {"content-type": _JSON})
            self._count("GET /xero/api/connections", grant.status_code)
            return grant
        event = request.query_params.get("authEventId")
        items = []
        for conn in self._connections_of(grant):
            rt = self.tenants.get(conn.tenant_id)
            if rt is None or (event and conn.auth_event_id.lower() != event.lower()):
                continue
            items.append(
                {
                    "id": conn.id,
                    "authEventId": conn.auth_event_id,
                    "tenantId": conn.tenant_id,
                    "tenantType": rt.tenant.tenant_type,
                    "tenantName": rt.tenant.name,
                    "createdDateUtc": _iso_connection(conn.created),
                    "updatedDateUtc": _iso_connection(conn.updated),
                }
            )
        self._count("GET /xero/api/connections", 200)
        return json_response(200, items, {"content-type": _JSON})

    async def _delete_connection(self, request: Request) -> Response:
        grant = self._bearer(request)
        if isinstance(grant, Response):
            self._count("DELETE /xero/api/connections/{id}", grant.status_code)
            return grant
        cid = request.path_params["cid"].lower()
        conns = self._connections_of(grant)
        for conn in conns:
            if conn.id == cid:
                conns.remove(conn)
                self._count("DELETE /xero/api/connections/{id}", 204)
                return Response(status_code=204)
        self._count("DELETE /xero/api/connections/{id}", 404)
        return Response(status_code=404)

    # --- accounting API ---------------------------------------------------------------------------------

    async def _accounting(self, request: Request) -> Response:
        resource = request.path_params["resource"]
        rid = request.path_params.get("rid")
        key = resource.lower()
        pattern = f"{request.method} /xero/api/api.xro/2.0/{_RESOURCES[key][0] if key in _RESOURCES else '*'}"
        if rid is not None:
            pattern += "/{id}"
        response = await self._serve(request, key, rid)
        self._count(pattern, response.status_code)
        return response

    async def _serve(self, request: Request, resource: str, rid: str | None) -> Response:
        wants_json = "json" in request.headers.get("accept", "").lower()
        grant = self._bearer(request)
        if isinstance(grant, Response):
            return grant
        tenant_id = (request.headers.get("xero-tenant-id") or "").strip().lower()
        connected = {c.tenant_id for c in self._connections_of(grant)}
        rt = self.tenants.get(tenant_id)
        if not tenant_id or tenant_id not in connected or rt is None:
            return json_response(403, _problem(403, "Forbidden", "AuthenticationUnsuccessful"))
        writing = request.method != "GET"
        if writing and (resource not in WRITABLE or (request.method == "PUT" and rid is not None)):
            return Response(_NOT_FOUND, 404, headers={"content-type": _TEXT})
        scopes = set(grant.scope.split())
        needed = _WRITE_SCOPES_OF.get(resource) if writing else _SCOPES_OF.get(resource)
        if scopes and needed is not None and not scopes & needed:
            return json_response(401, _problem(401, "Unauthorized", "AuthorizationUnsuccessful"))
        rt.inflight += 1
        try:
            return await self._limited(request, rt, grant, resource, rid, wants_json)
        finally:
            rt.inflight -= 1

    def _limit_headers(self, rt: _TenantRuntime, app: _Window, t: float) -> dict[str, str]:
        return {
            "X-DayLimit-Remaining": str(rt.day.remaining(t)),
            "X-MinLimit-Remaining": str(rt.minute.remaining(t)),
            "X-AppMinLimit-Remaining": str(app.remaining(t)),
        }

    def _too_many(self, rt: _TenantRuntime, headers: dict[str, str], problem: str, retry_after: int) -> Response:
        rt.rate_limited[problem] += 1
        self.stats["rate_limited"] += 1
        body = _problem(429, "Too Many Requests", f"You've exceeded the per {problem} rate limit")
        return json_response(
            429,
            body,
            {**headers, "X-Rate-Limit-Problem": problem, "Retry-After": str(retry_after), "content-type": _JSON},
        )

    async def _limited(
        self, request: Request, rt: _TenantRuntime, grant: Grant, resource: str, rid: str | None, wants_json: bool
    ) -> Response:
        s = rt.settings
        app = self.app_minute.setdefault(grant.client_id, _Window(s.app_minute_limit, s.minute_window_seconds))
        correlation = {"Xero-Correlation-Id": str(uuid.uuid4())}
        t = time.monotonic()
        if rt.inflight > s.concurrent_limit:
            headers = {**correlation, **self._limit_headers(rt, app, t)}
            return self._too_many(rt, headers, s.concurrent_problem, 1)
        faults = rt.faults if rt.faults is not None else self.global_faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
            t = time.monotonic()
        headers = {**correlation, **self._limit_headers(rt, app, t)}
        if faults.server_errors > 0:
            faults.server_errors -= 1
            rt.server_errors += 1
            self.stats["server_errors"] += 1
            status = faults.server_error_status
            if status == 503:
                body = _problem(503, "Service Unavailable", "The Xero API is temporarily unavailable.")
            else:
                body = {"Title": "An error occurred", "Detail": _SERVER_ERROR_DETAIL, "Status": status,
                        "Instance": str(uuid.uuid4())}  # fmt: skip
            return json_response(status, body, {**headers, "content-type": _JSON})
        if faults.day_limit_exhausted:
            return self._too_many(rt, {**headers, "X-DayLimit-Remaining": "0"}, "day", rt.day.retry_after(t))
        if faults.rate_limited > 0:
            faults.rate_limited -= 1
            problem = faults.rate_limit_problem
            window = rt.day if problem == "day" else app if problem == "appminute" else rt.minute
            fixed = {"day": "X-DayLimit-Remaining", "appminute": "X-AppMinLimit-Remaining"}.get(
                problem, "X-MinLimit-Remaining"
            )
            retry = 1 if problem == "concurrent" else window.retry_after(t)
            named = {"appminute": s.app_minute_problem, "concurrent": s.concurrent_problem}.get(problem, problem)
            return self._too_many(rt, {**headers, fixed: "0"}, named, retry)
        if rt.day.full(t):
            return self._too_many(rt, headers, "day", rt.day.retry_after(t))
        if app.full(t):
            return self._too_many(rt, headers, s.app_minute_problem, app.retry_after(t))
        if rt.minute.full(t):
            return self._too_many(rt, headers, "minute", rt.minute.retry_after(t))
        rt.day.hit(t)
        app.hit(t)
        rt.minute.hit(t)
        rt.requests += 1
        headers = {**correlation, **self._limit_headers(rt, app, t)}
        if request.method != "GET":
            return await self._write(request, rt, grant, resource, rid, wants_json, headers)
        try:
            payload = self._read(request, rt, resource, rid)
        except _NotFound:
            payload = None
        except _QueryError as err:
            body = {"ErrorNumber": 16, "Type": "QueryParseException", "Message": str(err)}
            return self._render(400, body, headers, wants_json, root="ApiException")
        except _ValidationError as err:
            body = {"ErrorNumber": 10, "Type": "ValidationException", "Message": str(err)}
            return self._render(400, body, headers, wants_json, root="ApiException")
        if payload is None:
            return Response(_NOT_FOUND, 404, headers={**headers, "content-type": _TEXT})
        return self._render(200, payload, headers, wants_json)

    @staticmethod
    def _render(
        status: int, payload: Mapping[str, Any], headers: Mapping[str, str], wants_json: bool, root: str = "Response"
    ) -> Response:
        if wants_json:
            return Response(orjson.dumps(payload), status, headers={**headers, "content-type": _JSON})
        return Response(to_xml(payload, root), status, headers={**headers, "content-type": _XML})

    async def _write(
        self,
        request: Request,
        rt: _TenantRuntime,
        grant: Grant,
        resource: str,
        rid: str | None,
        wants_json: bool,
        headers: dict[str, str],
    ) -> Response:
        """A write, under Xero's ``Idempotency-Key``: the key's first answer is replayed for the same request
        while the key is remembered (six minutes), and a different request under it is refused."""
        raw = await request.body()
        key = request.headers.get("idempotency-key")
        if key is None:
            return self._apply_write(request, rt, resource, rid, raw, wants_json, headers)
        if not key.strip() or len(key) > _IDEMPOTENCY_KEY_MAX:
            detail = f"The Idempotency-Key header must be 1 to {_IDEMPOTENCY_KEY_MAX} characters"
            return json_response(400, _problem(400, "Bad Request", detail), {**headers, "content-type": _JSON})
        now = self.clock()
        store = self._idempotency()
        for stale in [k for k, kept in store.items() if kept.expires <= now]:
            del store[stale]
        query = "&".join(sorted(f"{k.lower()}={v}" for k, v in request.query_params.multi_items()))
        fingerprint = hashlib.sha256(
            f"{request.method}\n{request.url.path.lower()}\n{query}\n".encode() + raw
        ).hexdigest()
        scope = (grant.client_id, rt.tenant.id, key)
        kept = store.get(scope)
        if kept is not None:
            if kept.fingerprint != fingerprint:
                rt.idempotency_conflicts += 1
                detail = "The Idempotency-Key has already been used for a different request"
                return json_response(400, _problem(400, "Bad Request", detail), {**headers, "content-type": _JSON})
            rt.idempotent_replays += 1
            return Response(kept.content, kept.status, headers={**headers, "content-type": kept.content_type})
        response = self._apply_write(request, rt, resource, rid, raw, wants_json, headers)
        store[scope] = _Remembered(fingerprint, response.status_code, bytes(response.body),
                                   response.headers.get("content-type", _JSON),
                                   now + math.ceil(rt.settings.idempotency_window_seconds))  # fmt: skip
        return response

    def _idempotency(self) -> dict[tuple[str, str, str], _Remembered]:
        """The remembered keys (a sandbox restored from an older saved state starts with none)."""
        store: dict[tuple[str, str, str], _Remembered] = self.__dict__.setdefault("idempotency", {})
        return store

    def _apply_write(
        self,
        request: Request,
        rt: _TenantRuntime,
        resource: str,
        rid: str | None,
        raw: bytes,
        wants_json: bool,
        headers: dict[str, str],
    ) -> Response:
        params = {k.lower(): v for k, v in request.query_params.items()}
        wrapper = WRITABLE[resource][0]
        now_ms = self.clock() * 1000 + int(time.time() * 1000) % 1000
        try:
            try:
                body = json.loads(raw.decode("utf-8"), parse_float=Decimal) if raw.strip() else None
            except (UnicodeDecodeError, ValueError):
                raise BadBody("Invalid Json data") from None
            written = XeroWriter(rt.tenant, rt.settings, now_ms).write(resource, request.method, rid, body, params)
        except BadBody as err:
            body = {"ErrorNumber": 14, "Type": "PostDataInvalidException", "Message": str(err)}
            return self._render(400, body, headers, wants_json, root="ApiException")
        if written.elements is None:
            return Response(_NOT_FOUND, 404, headers={**headers, "content-type": _TEXT})
        if written.status == 400:
            body = {"ErrorNumber": 10, "Type": "ValidationException", "Message": "A validation exception occurred",
                    "Elements": written.elements}  # fmt: skip
            return self._render(400, body, headers, wants_json, root="ApiException")
        self.webhooks.changed(rt.tenant.id, written.changes)
        return self._render(200, {**self._envelope(rt), wrapper: written.elements}, headers, wants_json)

    def _envelope(self, rt: _TenantRuntime) -> dict[str, Any]:
        return {
            "Id": str(uuid.uuid4()),
            "Status": "OK",
            "ProviderName": rt.settings.provider_name,
            "DateTimeUTC": format_msdate(self.clock() * 1000 + int(time.time() * 1000) % 1000, offset=False),
        }

    def _read(self, request: Request, rt: _TenantRuntime, resource: str, rid: str | None) -> dict[str, Any] | None:
        tenant = rt.tenant
        params = {k.lower(): v for k, v in request.query_params.items()}
        renderer = _Renderer(tenant, rt.settings)
        unitdp4 = params.get("unitdp") == "4"
        if resource not in _RESOURCES:
            return None
        wrapper, entity = _RESOURCES[resource]
        if resource in ("organisation", "currencies"):
            return None if rid is not None else self._settings_read(rt, renderer, resource, params)
        if resource == "payments" and rid is not None:
            payment = tenant.payments.get(rid.lower())
            return None if payment is None else {**self._envelope(rt), wrapper: [renderer.payment(payment)]}
        if rid is not None:
            found = tenant.find_invoice(rid) if resource == "invoices" else tenant.find_contact(rid)
            if found is None:
                return None
            roles = tenant.roles()
            if isinstance(found, _Invoice):
                record = renderer.invoice(found, _View(True, True, unitdp4=unitdp4, roles=roles))
            else:
                view = _View(True, True, balances=tenant.balances(self.clock() * 1000), roles=roles)
                record = renderer.contact(found, view)
            return {**self._envelope(rt), wrapper: [record]}
        items = self._select(request, rt, resource, entity, params)
        paged = "page" in params
        summary_only = params.get("summaryonly", "").lower() == "true"
        out = self._envelope(rt)
        if paged:
            try:
                page = max(1, int(params["page"]))
            except ValueError:
                raise _ValidationError(f"The value '{params['page']}' is not valid for page.") from None
            size = rt.settings.default_page_size
            if "pagesize" in params:
                try:
                    size = int(params["pagesize"])
                except ValueError:
                    raise _ValidationError(f"The value '{params['pagesize']}' is not valid for pageSize.") from None
                size = min(max(1, size), rt.settings.max_page_size)
            count = len(items)
            out["pagination"] = {"page": page, "pageSize": size, "pageCount": math.ceil(count / size),
                                 "itemCount": count}  # fmt: skip
            items = items[(page - 1) * size : page * size]
        elif rt.settings.unpaged_limit is not None and len(items) > rt.settings.unpaged_limit:
            raise _ValidationError(
                f"Your request is not filtering {wrapper} efficiently, given the extremely high volume for this "
                "organisation. Please apply a filter or use paging."
            )
        if resource == "payments":
            out[wrapper] = [renderer.payment(p) for p in items]
            return out
        roles = tenant.roles()
        if resource == "invoices":
            view = _View(paged and not summary_only, False, unitdp4=unitdp4, summary_only=summary_only, roles=roles)
            out[wrapper] = [renderer.invoice(inv, view) for inv in items]
        else:
            balances = tenant.balances(self.clock() * 1000) if paged and not summary_only else None
            view = _View(False, False, summary_only=summary_only, balances=balances, roles=roles)
            out[wrapper] = [renderer.contact(c, view) for c in items]
        return out

    def _settings_read(
        self, rt: _TenantRuntime, renderer: _Renderer, resource: str, params: Mapping[str, str]
    ) -> dict[str, Any]:
        """``GET /Organisation`` (the one organisation) or ``GET /Currencies`` (with ``where`` and ``order``)."""
        tenant = rt.tenant
        if resource == "organisation":
            created = (tenant.created_at - math.ceil(float(tenant.spec["days"]) + 1) * 86_400) * 1000
            return {**self._envelope(rt), "Organisations": [renderer.organisation(created)]}
        items: list[Any] = currencies_of(tenant)
        where = params.get("where", "").strip()
        if where:
            predicate = parse_where(where, "Currency", tenant)
            items = [c for c in items if predicate(c)]
        order = params.get("order", "").strip()
        items = _sort(items, _parse_order(order, _getters("Currency", tenant), "Currency") if order else [])
        return {**self._envelope(rt), "Currencies": [{"Code": c.code, "Description": c.description} for c in items]}

    def _select(
        self, request: Request, rt: _TenantRuntime, resource: str, entity: str, params: Mapping[str, str]
    ) -> list[Any]:
        tenant = rt.tenant
        pools = {"invoices": tenant.invoices, "contacts": tenant.contacts, "payments": tenant.payments}
        items: list[Any] = list(pools[resource].values())
        ims = request.headers.get("if-modified-since")
        if ims:
            since = parse_if_modified_since(ims)
            if since is not None:
                items = [obj for obj in items if obj.updated >= since]
        if params.get("createdbymyapp", "").lower() == "true":
            items = []
        if resource == "contacts" and params.get("includearchived", "").lower() != "true":
            items = [c for c in items if c.status != "ARCHIVED"]
        if params.get("ids"):
            ids = [x.strip().strip('"').lower() for x in params["ids"].split(",") if x.strip()]
            if len(ids) > rt.settings.max_ids:
                raise _NotFound
            wanted = set(ids)
            items = [obj for obj in items if obj.id in wanted]
        if resource == "invoices":
            if params.get("statuses"):
                statuses = {x.strip().strip('"').upper() for x in params["statuses"].split(",")}
                items = [inv for inv in items if inv.status in statuses]
            if params.get("invoicenumbers"):
                numbers = {x.strip().strip('"') for x in params["invoicenumbers"].split(",")}
                items = [inv for inv in items if inv.number in numbers]
            if params.get("contactids"):
                cids = {x.strip().strip('"').lower() for x in params["contactids"].split(",")}
                items = [inv for inv in items if inv.contact_id in cids]
        term = params.get("searchterm", "").strip().lower()
        if term and resource != "payments":
            if resource == "invoices":
                items = [i for i in items if term in i.number.lower() or term in i.reference.lower()]
            else:
                items = [
                    c
                    for c in items
                    if any(term in (v or "").lower() for v in (c.name, c.first_name, c.last_name, c.number, c.email))
                ]
        where = params.get("where", "").strip()
        if where:
            predicate = parse_where(where, entity, tenant)
            items = [obj for obj in items if predicate(obj)]
        order = params.get("order", "").strip()
        keys = _parse_order(order, _getters(entity, tenant), entity) if order else []
        return _sort(items, keys)

    # --- control API ------------------------------------------------------------------------------------

    def _runtime(self, tid: str) -> _TenantRuntime:
        rt = self.tenants.get(tid.lower())
        if rt is None:
            raise ControlError(404, f"no tenant {tid!r}")
        return rt

    @_control
    async def _control_tenants(self, request: Request) -> Response:
        if request.method == "GET":
            return json_response(200, [self._summary(rt) for rt in self.tenants.values()])
        spec = await read_json_object(request)
        norm = self.normalise_spec(spec)
        settings = self.settings_from(spec)
        started = time.perf_counter()
        tenant = await run_in_threadpool(XeroTenant, norm, norm.get("now", self.clock()))
        status = self._install(tenant, settings, spec)
        out = self._summary(self.tenants[tenant.id])
        out["status"] = status
        out["generation_seconds"] = round(time.perf_counter() - started, 3)
        return json_response(200, out)

    @_control
    async def _control_tenant(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        if request.method == "PATCH":
            body = await read_json_object(request)
            unknown = set(body) - {"tier", *_Settings.__slots__}  # type: ignore[attr-defined]
            if unknown:
                raise ControlError(400, f"unknown settings: {sorted(unknown)}")
            rt.settings = self.settings_from(body, rt.settings)
            rt.minute = _Window(rt.settings.minute_limit, rt.settings.minute_window_seconds)
            rt.day = _Window(rt.settings.day_limit, rt.settings.day_window_seconds)
            self._configure_app(rt.tenant.client_id, rt.settings, body)
        return json_response(200, self._summary(rt))

    @_control
    async def _control_grant(self, request: Request) -> Response:
        body = await read_json_object(request)
        client_id = body.get("client_id")
        if not isinstance(client_id, str):
            raise ControlError(400, "client_id must be a string")
        tenants = body.get("tenants")
        if tenants is not None and not isinstance(tenants, list):
            raise ControlError(400, "tenants must be a list of tenant ids")
        subject = self._subject(client_id, tenants)
        grant, token = self.oauth.create_grant(client_id, str(body.get("scope", DEFAULT_SCOPE)), subject)
        return json_response(
            200,
            {
                "grant_id": grant.id,
                "token": token,
                "tenants": subject["tenants"],
                "auth_event_id": subject["auth_event_id"],
            },
        )

    @_control
    async def _control_changes(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        body = await read_json_object(request)
        reject_unknown_fields(body, _CHANGE_FIELDS, "change")
        counts = {name: optional_int_field(body, name, 0) for name in _CHANGE_FIELDS}
        changed = rt.tenant.apply_changes(counts, self.clock())
        tenant, events = rt.tenant, []
        for kind, (category, event_type) in _CHANGE_EVENTS.items():
            records: Mapping[str, _Invoice | _Contact] = tenant.invoices if category == "INVOICE" else tenant.contacts
            events.extend(Change(category, rid, event_type, records[rid].updated) for rid in changed.get(kind, []))
        # Xero has no payment events: a payment made or deleted is an update of the invoice it pays.
        for pid in (*changed.get("payments_created", []), *changed.get("payments_deleted", [])):
            events.append(_change_of(tenant.invoices[tenant.payments[pid].invoice_id], "UPDATE"))
        self.webhooks.changed(tenant.id, events)
        return json_response(200, changed)

    def _record_api(self, rt: _TenantRuntime, record: _Invoice | _Contact | _Payment) -> dict[str, Any]:
        renderer = _Renderer(rt.tenant, rt.settings)
        if isinstance(record, _Payment):
            return renderer.payment(record)
        roles = rt.tenant.roles()
        if isinstance(record, _Invoice):
            return renderer.invoice(record, _View(True, False, roles=roles))
        return renderer.contact(
            record, _View(True, False, balances=rt.tenant.balances(self.clock() * 1000), roles=roles)
        )

    def _updated_ms(self, body: Mapping[str, Any]) -> int:
        value = body.get("updated_at")
        if value is None:
            return self.clock() * 1000
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ControlError(400, "updated_at must be unix seconds (a number)")
        return round(value * 1000)

    @_control
    async def _control_add_record(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        body = await read_json_object(request)
        entity = body.get("entity")
        if entity not in ("invoice", "contact", "customer", "payment"):
            raise ControlError(400, "entity must be invoice, contact or payment")
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        record = rt.tenant.add_record("contact" if entity == "customer" else entity, fields, self._updated_ms(body))
        self.webhooks.changed(rt.tenant.id, [self._change_for(rt, record, "CREATE")])
        return json_response(200, self._record_api(rt, record))

    @staticmethod
    def _change_for(rt: _TenantRuntime, record: _Invoice | _Contact | _Payment, event_type: str) -> Change:
        """The event a change makes: a payment's is an UPDATE of its invoice (Xero has no payment events)."""
        if isinstance(record, _Payment):
            return _change_of(rt.tenant.invoices[record.invoice_id], "UPDATE")
        return _change_of(record, event_type)

    @_control
    async def _control_update_record(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        body = await read_json_object(request)
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        record = rt.tenant.update_record(request.path_params["rid"], fields, self._updated_ms(body))
        self.webhooks.changed(rt.tenant.id, [self._change_for(rt, record, "UPDATE")])
        return json_response(200, self._record_api(rt, record))

    @_control
    async def _control_purge_record(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        record = rt.tenant.purge_record(request.path_params["rid"])
        self.webhooks.changed(rt.tenant.id, [_change_of(record, "UPDATE", self.clock() * 1000)])
        return json_response(200, {"purged": record.id})

    @_control
    async def _control_export(self, request: Request) -> Response:
        rt = self._runtime(request.path_params["tid"])
        entity = request.path_params["entity"].lower().rstrip("s")
        if entity == "customer":
            entity = "contact"
        if entity not in ("invoice", "contact", "payment"):
            raise ControlError(404, "export entity must be invoices, contacts or payments")
        tenant = rt.tenant
        pools: dict[str, tuple[Iterable[_Invoice | _Contact | _Payment], set[str]]] = {
            "invoice": (tenant.invoices.values(), tenant.purged_invoices),
            "contact": (tenant.contacts.values(), tenant.purged_contacts),
            "payment": (tenant.payments.values(), tenant.purged_payments),
        }
        records, purged = pools[entity]
        return json_response(
            200, {"records": [self._record_api(rt, r) for r in records], "deleted_ids": sorted(purged)}
        )

    @_control
    async def _control_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            tid = request.query_params.get("tenant")
            if tid:
                self._runtime(tid).faults = None
            else:
                self.global_faults = _Faults()
                for rt in self.tenants.values():
                    rt.faults = None
            return json_response(200, {"global": self.global_faults.as_dict()})
        body = await read_json_object(request)
        reject_unknown_fields(body, _FAULT_FIELDS, "fault")
        if body.get("tenant"):
            rt = self._runtime(str(body["tenant"]))
            if rt.faults is None:
                rt.faults = _Faults()
            faults = rt.faults
        else:
            faults = self.global_faults
        if "server_errors" in body:
            faults.server_errors = optional_int_field(body, "server_errors", 0)
        if "server_error_status" in body:
            if body["server_error_status"] not in (500, 503):
                raise ControlError(400, "server_error_status must be 500 or 503")
            faults.server_error_status = body["server_error_status"]
        if "rate_limited" in body:
            faults.rate_limited = optional_int_field(body, "rate_limited", 0)
        if "rate_limit_problem" in body:
            if body["rate_limit_problem"] not in ("minute", "day", "appminute", "concurrent"):
                raise ControlError(400, "rate_limit_problem must be minute, day, appminute or concurrent")
            faults.rate_limit_problem = body["rate_limit_problem"]
        if "day_limit_exhausted" in body:
            faults.day_limit_exhausted = bool_field(body, "day_limit_exhausted", False)
        if "latency_ms" in body:
            latency = body["latency_ms"]
            if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
                raise ControlError(400, "latency_ms must be a number >= 0")
            faults.latency_ms = float(latency)
        return json_response(200, faults.as_dict())

    @_control
    async def _control_stats(self, request: Request) -> Response:
        return json_response(
            200,
            {
                "total": self.stats["total"],
                "rate_limited": self.stats["rate_limited"],
                "server_errors": self.stats["server_errors"],
                "by_path": dict(self.stats_by_path),
                "by_status": dict(self.stats_by_status),
                "tenants": {
                    tid: {
                        "requests": rt.requests,
                        "rate_limited": dict(rt.rate_limited),
                        "server_errors": rt.server_errors,
                        "inflight": rt.inflight,
                        "idempotent_replays": rt.idempotent_replays,
                        "idempotency_conflicts": rt.idempotency_conflicts,
                    }
                    for tid, rt in self.tenants.items()
                },
                "oauth": dict(self.oauth.stats),
            },
        )


_CHANGE_EVENTS = {  # apply_changes' answer key -> (eventCategory, eventType); voids, deletes and archives are updates
    "created": ("INVOICE", "CREATE"), "edited": ("INVOICE", "UPDATE"), "voided": ("INVOICE", "UPDATE"),
    "deleted": ("INVOICE", "UPDATE"), "archived": ("CONTACT", "UPDATE"), "contacts_edited": ("CONTACT", "UPDATE"),
    "contacts_created": ("CONTACT", "CREATE"),
}  # fmt: skip


def _change_of(record: _Invoice | _Contact, event_type: str, at_ms: int | None = None) -> Change:
    category = "INVOICE" if isinstance(record, _Invoice) else "CONTACT"
    return Change(category, record.id, event_type, record.updated if at_ms is None else at_ms)


class _ValidationError(Exception):
    """A 400 ``ValidationException`` (ErrorNumber 10)."""


class _NotFound(Exception):
    """The 404 Xero's gateway gives for over-long ``IDs`` lists."""
