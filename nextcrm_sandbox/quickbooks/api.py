"""``QuickBooksSandbox``: realms with their throttles, faults and statistics, Intuit's OAuth flow and OpenID
discovery documents, the query, batch, read-one and CDC routes under ``/quickbooks/api``, Intuit's ``Fault`` for
every route it does not emulate, webhook delivery and the control API under ``/_sandbox/quickbooks``."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    clear_scoped_faults,
    control_endpoint,
    int_field,
    lookup,
    number_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.oauth import (
    AccessDenied,
    Grant,
    OAuthError,
    OAuthPolicy,
    OAuthServer,
    json_response,
    request_headers,
)
from nextcrm_sandbox.quickbooks.data import _CURRENCY_NAMES, DataChange, QuickBooksCompany, _Rng
from nextcrm_sandbox.quickbooks.model import (
    _DAY,
    _ENTITY_NAMES,
    _JSON_CT,
    _XML_CT,
    ACCESS_TTL,
    API_PREFIX,
    AUTHORIZE_PATH,
    BATCH_MAX_ITEMS,
    CDC_MAX_DAYS,
    CDC_MAX_OBJECTS,
    CONTROL_PREFIX,
    DISCOVERY_PATHS,
    HOSTS,
    JWKS_PATH,
    MIN_MINOR_VERSION,
    PREFIX,
    REFRESH_GRACE,
    REFRESH_HARD_TTL,
    REFRESH_ROTATE_AFTER,
    REFRESH_TTL,
    REVOKE_PATH,
    TOKEN_PATH,
    QueryError,
    _batch_too_large,
    _not_found,
    _parse_offset,
    _parse_when,
    _system_fault,
    _throttled,
    _unsupported_operation,
    discovery_document,
)
from nextcrm_sandbox.quickbooks.query import parse_query
from nextcrm_sandbox.quickbooks.render import to_xml
from nextcrm_sandbox.quickbooks.webhooks import (
    _SUBSCRIBE_FIELDS,
    WEBHOOK_FORMATS,
    WEBHOOK_RETRY_DELAYS,
    WEBHOOK_TIMEOUT_SECONDS,
    cloudevents_batches,
    intuit_signer,
    legacy_notification,
)
from nextcrm_sandbox.quickbooks.writes import REQUEST_ID_MAX, create_customer, create_invoice, invoice_operation
from nextcrm_sandbox.webhooks import Signer, WebhookOutbox, webhook_control_routes


class _Window:
    """A fixed window counter on ``time.monotonic``."""

    __slots__ = ("count", "start")

    def __init__(self) -> None:
        self.start = -math.inf
        self.count = 0

    def __reduce__(self) -> tuple[Any, ...]:
        # Saved with the sandbox's state (``sandbox.state``) closed: ``start`` is on this boot's monotonic clock.
        return _Window, ()

    def room(self, limit: int | None, length: float, now: float) -> bool:
        if not limit:
            return True
        if now - self.start >= length:
            self.start = now
            self.count = 0
        return self.count < limit

    def take(self, limit: int | None) -> None:
        if limit:
            self.count += 1


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    day_limit_exhausted: bool = False
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "day_limit_exhausted": self.day_limit_exhausted,
            "latency_ms": self.latency_ms,
        }


@dataclass
class _Runtime:
    company: QuickBooksCompany
    added: int
    minute: _Window = field(default_factory=_Window)
    second: _Window = field(default_factory=_Window)
    active: int = 0
    peak_concurrency: int = 0
    requests: int = 0
    throttled: int = 0
    # ``requestid`` -> the first answer to a write that carried it (replayed for a repeat), writes made, replays.
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: int = 0
    replayed: int = 0

    def __getstate__(self) -> dict[str, Any]:
        # A restored sandbox (``sandbox.state``) has no request in flight.
        return {**self.__dict__, "active": 0}


_TENANT_FIELDS = frozenset(
    {
        "client_id",
        "seed",
        "invoices",
        "customers",
        "contacts",
        "days",
        "name",
        "id",
        "environment",
        "utc_offset",
        "home_currency",
        "currencies",
        "deleted_invoices",
        "deleted_payment_share",
        "inactive_share",
        "requests_per_minute",
        "requests_per_second",
        "max_concurrent",
        "minute_seconds",
        "second_seconds",
        "cdc_max_days",
        "cdc_max_objects",
    }
)
_CHANGE_FIELDS = (
    "edits",
    "voids",
    "deletes",
    "creates",
    "archives",
    "customer_edits",
    "customer_creates",
    "customer_merges",
    "payment_voids",
    "payment_deletes",
)
_FAULT_FIELDS = frozenset(
    {"tenant", "server_errors", "server_error_status", "rate_limited", "day_limit_exhausted", "latency_ms"}
)


_int_field = partial(int_field, nullable=True)
_control = partial(control_endpoint, bad_request=(ValueError,))


def _entity_of(name: Any) -> str:
    key = str(name or "").lower().rstrip("s")
    if key == "invoice":
        return "Invoice"
    if key in ("customer", "contact"):
        return "Customer"
    if key == "payment":
        return "Payment"
    raise ControlError(400, "entity must be invoice, customer (contact) or payment")


def _wants_json(request: Request) -> bool:
    return "json" in request.headers.get("accept", "").lower()


def _tid() -> str:
    return secrets.token_hex(16)


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


class QuickBooksSandbox:
    """QuickBooks API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=ACCESS_TTL,
            code_ttl=300,
            refresh_idle_ttl=REFRESH_TTL,
            rotate=True,
            rotate_after=REFRESH_ROTATE_AFTER,
            grace=REFRESH_GRACE,
            client_auth=frozenset({"basic", "body"}),  # client_secret_basic and client_secret_post
            pkce=False,
            token_type="bearer",
            refresh_hard_ttl=REFRESH_HARD_TTL,
        )
        self.oauth = OAuthServer(clock, policy, extra_token_fields=self._token_extras)
        self.client_environments: dict[str, str] = {}
        self._runtime: dict[str, _Runtime] = {}
        self._added = 0
        self._lock = threading.Lock()
        self._faults: dict[str | None, _Faults] = {}
        self.stats: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.minor_versions: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.webhooks = WebhookOutbox("quickbooks", clock, retry_delays=WEBHOOK_RETRY_DELAYS,
                                      timeout=WEBHOOK_TIMEOUT_SECONDS)  # fmt: skip

    # --- companies ----------------------------------------------------------------------------------------

    def company(self, realm_id: str) -> QuickBooksCompany | None:
        """The company with this realm id, if any."""
        rt = self._runtime.get(realm_id)
        return rt.company if rt else None

    def normalise_spec(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a tenant spec and fill in the defaults."""
        unknown = set(body) - _TENANT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown tenant fields: {sorted(unknown)}")
        client_id = body.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ControlError(400, "client_id must be a non-empty string")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ControlError(400, "seed must be an integer")
        environment = body.get("environment", "sandbox")
        if environment not in ("sandbox", "production"):
            raise ControlError(400, "environment must be sandbox or production")
        invoices = _int_field(body, "invoices", 200)
        customers = _int_field(body, "customers", body.get("contacts", 50))
        assert invoices is not None and customers is not None
        if invoices and not customers:
            raise ControlError(400, "invoices need at least one customer")
        rng = _Rng(f"quickbooks-realm:{client_id}:{seed}")
        prefix = 9341450000000000 if environment == "sandbox" else 123145000000000
        realm = body.get("id") or str(prefix + rng.between(10**10))
        utc_offset = body.get("utc_offset", "-07:00")
        try:
            _parse_offset(str(utc_offset))
        except ValueError as err:
            raise ControlError(400, str(err)) from None
        home = str(body.get("home_currency", "USD"))
        currencies = body.get("currencies", ["USD", "EUR", "GBP", "CAD", "AUD"])
        if (
            not isinstance(currencies, list)
            or any(c not in _CURRENCY_NAMES for c in currencies)
            or home not in _CURRENCY_NAMES
        ):
            raise ControlError(400, f"currencies must be among {sorted(_CURRENCY_NAMES)}")
        days = number_field(body, "days", 90)
        if days <= 0:
            raise ControlError(400, "days must be > 0")
        return {
            "client_id": client_id,
            "seed": seed,
            "id": str(realm),
            "name": str(body.get("name") or f"Sandbox Company_US_{seed}"),
            "environment": environment,
            "invoices": invoices,
            "customers": customers,
            "days": days,
            "utc_offset": str(utc_offset),
            "home_currency": home,
            "currencies": [home, *[c for c in currencies if c != home]],
            "deleted_invoices": _int_field(body, "deleted_invoices", invoices // 50),
            "inactive_share": number_field(body, "inactive_share", 0.08),
            "deleted_payment_share": number_field(body, "deleted_payment_share", 0.02),
            "requests_per_minute": _int_field(body, "requests_per_minute", 500),
            "requests_per_second": _int_field(body, "requests_per_second", 10),
            "max_concurrent": _int_field(body, "max_concurrent", 10),
            "minute_seconds": number_field(body, "minute_seconds", 60.0, 0.001),
            "second_seconds": number_field(body, "second_seconds", 1.0, 0.001),
            "cdc_max_days": number_field(body, "cdc_max_days", CDC_MAX_DAYS),
            "cdc_max_objects": _int_field(body, "cdc_max_objects", CDC_MAX_OBJECTS, 1),
        }

    def add_tenant(self, body: Mapping[str, Any]) -> QuickBooksCompany:
        """Generate a company from a spec and install it (replacing one with the same realm id)."""
        spec = self.normalise_spec(body)
        company = QuickBooksCompany(spec, now=self.clock())
        self._install(company)
        return company

    def _install(self, company: QuickBooksCompany) -> None:
        company.on_change = self._notify
        with self._lock:
            self._added += 1
            self._runtime[company.realm_id] = _Runtime(company, self._added)

    # --- webhooks ---------------------------------------------------------------------------------------

    def _webhook_signer(self, body: Mapping[str, Any]) -> tuple[str, Signer]:
        """A subscription's key (app or realm, and payload format) and its ``intuit-signature`` signer.

        Like Intuit, one app's endpoint gets the events of every realm connected to the app (``app``);
        ``realm`` narrows a subscription to one company. ``format`` is ``legacy`` or ``cloudevents``.
        """
        reject_unknown_fields(body, _SUBSCRIBE_FIELDS, "webhook subscription")
        token = body.get("verifier_token")
        if not isinstance(token, str) or not token:
            raise ControlError(400, "verifier_token must be a non-empty string")
        shape = body.get("format", "legacy")
        if shape not in WEBHOOK_FORMATS:
            raise ControlError(400, f"format must be one of {list(WEBHOOK_FORMATS)}")
        app, realm = body.get("app"), body.get("realm")
        if (app is None) == (realm is None):
            raise ControlError(400, "name exactly one of app (a client_id) or realm")
        if realm is not None:
            scope = f"realm:{self._rt(str(realm)).company.realm_id}"
        elif str(app) in self.oauth.clients:
            scope = f"app:{app}"
        else:
            raise ControlError(404, f"no app {app!r}")
        return f"{scope}:{shape}", intuit_signer(token)

    def _notify(self, company: QuickBooksCompany, changes: list[DataChange]) -> None:
        """Queue one notification of ``changes`` for every subscription of the company's app or realm."""
        for shape in WEBHOOK_FORMATS:
            keys = [f"{scope}:{shape}" for scope in (f"app:{company.client_id}", f"realm:{company.realm_id}")]
            keys = [key for key in keys if self.webhooks.subscriptions(key)]
            if not keys:
                continue
            bodies = (
                [legacy_notification(company, changes)] if shape == "legacy" else cloudevents_batches(company, changes)
            )
            for key in keys:
                for body in bodies:
                    self.webhooks.emit(key, body)

    def _summary(self, company: QuickBooksCompany) -> dict[str, Any]:
        spec = company.spec
        return {
            "id": company.realm_id,
            "name": company.name,
            "client_id": company.client_id,
            "environment": company.environment,
            "utc_offset": company.offset,
            "home_currency": company.home_currency,
            "counts": company.counts(),
            "limits": {
                k: spec[k]
                for k in (
                    "requests_per_minute",
                    "requests_per_second",
                    "max_concurrent",
                    "minute_seconds",
                    "second_seconds",
                    "cdc_max_days",
                    "cdc_max_objects",
                )
            },
        }

    # --- OAuth ------------------------------------------------------------------------------------------

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> dict[str, Any]:
        extras: dict[str, Any] = {"x_refresh_token_expires_in": REFRESH_TTL}
        if request_headers().get("x-include-refresh-token-hard-expires-in", "").lower() == "true":
            extras["x_refresh_token_hard_expires_in"] = max(0, REFRESH_HARD_TTL - (self.clock() - grant.created_at))
        return extras

    def _subject_for(self, params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        client_id = params.get("client_id", "")
        if client_id not in self.oauth.clients:
            raise OAuthError("invalid_client", "unknown client_id", 400)
        wanted = params.get("sandbox_tenant")
        if wanted:
            rt = self._runtime.get(wanted)
            if rt is None or rt.company.client_id != client_id:
                raise OAuthError("invalid_request", f"no company {wanted!r} for this app", 400)
            company = rt.company
        else:
            company = self._latest_company(client_id)
            if company is None:
                raise OAuthError("invalid_request", "the app has no QuickBooks company to connect", 400)
        return {"realm_id": company.realm_id}, {"realmId": company.realm_id}

    def _latest_company(self, client_id: str) -> QuickBooksCompany | None:
        mine = [rt for rt in self._runtime.values() if rt.company.client_id == client_id]
        return max(mine, key=lambda rt: rt.added).company if mine else None

    def _grant_realm(self, grant: Grant) -> str | None:
        subject = grant.subject
        realm = subject.get("realm_id") or subject.get("realmId")
        if realm:
            return str(realm)
        company = self._latest_company(grant.client_id)
        return company.realm_id if company else None

    async def _revoke(self, request: Request) -> Response:
        """``POST`` JSON ``{"token": ...}`` with the app's Basic credentials; revokes the whole connection."""
        try:
            client_id = self.oauth.authenticate_client({}, request.headers.get("authorization")).client_id
        except OAuthError as err:
            return json_response(err.status, err.body())
        raw = await request.body()
        token = None
        try:
            body = orjson.loads(raw) if raw else {}
            token = body.get("token") if isinstance(body, dict) else None
        except orjson.JSONDecodeError:
            token = dict(parse_qsl(raw.decode("utf-8", "replace"))).get("token")
        if not token:
            return json_response(400, {"error": "invalid_request", "error_description": "token is required"})
        self.oauth.revoke(str(token), client_id)
        return Response(b"", status_code=200)

    # --- API --------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """OAuth, API and control routes under ``/quickbooks/...`` and ``/_sandbox/quickbooks/...``."""
        api = f"{API_PREFIX}/v3/company/{{realm}}"
        control = CONTROL_PREFIX
        invoices = f"{control}/tenants/{{tenant}}/invoices"
        payments = f"{control}/tenants/{{tenant}}/payments"
        return [
            Route(AUTHORIZE_PATH, self.oauth.authorize_endpoint(self._subject_for), methods=["GET"]),
            Route(TOKEN_PATH, self.oauth.token_endpoint, methods=["POST"]),
            Route(REVOKE_PATH, self._revoke, methods=["POST"]),
            *(Route(path, self._discovery(env), methods=["GET"]) for env, path in DISCOVERY_PATHS.items()),
            Route(JWKS_PATH, self._jwks, methods=["GET"]),
            Route(f"{api}/query", self._api("query"), methods=["GET", "POST"]),
            Route(f"{api}/batch", self._api("batch"), methods=["POST"]),
            Route(f"{api}/cdc", self._api("cdc"), methods=["GET"]),
            Route(f"{api}/invoice", self._api("write:Invoice"), methods=["POST"]),
            Route(f"{api}/customer", self._api("write:Customer"), methods=["POST"]),
            Route(f"{api}/invoice/{{oid}}", self._api("invoice"), methods=["GET"]),
            Route(f"{api}/customer/{{oid}}", self._api("customer"), methods=["GET"]),
            Route(f"{api}/payment/{{oid}}", self._api("payment"), methods=["GET"]),
            Route(f"{api}/account/{{oid}}", self._api("account"), methods=["GET"]),
            Route(f"{api}/companyinfo/{{oid}}", self._api("companyinfo"), methods=["GET"]),
            Route(f"{api}/{{rest:path}}", self._api(None), methods=_METHODS),
            Route(f"{PREFIX}/{{rest:path}}", self._not_found, methods=_METHODS),
            *self.oauth.control_routes(control),
            Route(f"{control}/clients", self._control_clients, methods=["POST"]),
            Route(f"{control}/tenants", self._control_tenants, methods=["GET", "POST"]),
            Route(f"{control}/tenants/{{tenant}}", self._control_tenant, methods=["GET"]),
            Route(f"{control}/tenants/{{tenant}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{control}/tenants/{{tenant}}/records", self._control_add_record, methods=["POST"]),
            Route(f"{control}/tenants/{{tenant}}/records/{{oid}}", self._control_update_record, methods=["PATCH"]),
            Route(f"{control}/tenants/{{tenant}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{invoices}/merge", self._control_merge, methods=["POST"]),
            Route(f"{invoices}/{{oid}}/{{action}}", self._control_invoice_action, methods=["POST"]),
            Route(f"{control}/tenants/{{tenant}}/customers/merge", self._control_merge_customers, methods=["POST"]),
            Route(f"{payments}/{{oid}}/{{action}}", self._control_payment_action, methods=["POST"]),
            *webhook_control_routes(control, self.webhooks, self._webhook_signer),
            Route(f"{control}/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route(f"{control}/stats", self._control_stats, methods=["GET"]),
        ]

    async def _not_found(self, request: Request) -> Response:
        """Any other path on Intuit's hosts: its ``Fault`` (405 on a path served for other methods, else 404)."""
        path = request.url.path
        status = 405 if path in self._fixed_paths() else 404
        prefix, _, rest = path[len(PREFIX) + 1 :].partition("/")
        relative = f"/{rest}"
        err = _unsupported_operation(relative, f"{HOSTS.get(prefix, HOSTS['api'])}{relative}")
        err.status = status
        stamp = dt.datetime.fromtimestamp(self._now_precise(), dt.UTC).isoformat(timespec="milliseconds")
        return self._render(request, status, {"Fault": err.fault(), "time": stamp}, f"{request.method} (unknown)")

    @staticmethod
    def _fixed_paths() -> set[str]:
        return {AUTHORIZE_PATH, TOKEN_PATH, REVOKE_PATH, JWKS_PATH, *DISCOVERY_PATHS.values()}

    def _discovery(self, environment: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            origin = str(request.base_url).rstrip("/")
            self._count(f"GET discovery ({environment})", 200)
            return json_response(200, discovery_document(origin, environment))

        endpoint.__name__ = f"quickbooks_discovery_{environment}"
        return endpoint

    async def _jwks(self, request: Request) -> Response:
        """Intuit's signing keys: the emulator issues no ID tokens, so none."""
        self._count("GET jwks", 200)
        return json_response(200, {"keys": []})

    def _count(self, route: str, status: int) -> None:
        self.stats["requests"] += 1
        self.by_route[route] += 1
        self.by_status[str(status)] += 1

    def _render(
        self, request: Request, status: int, payload: dict[str, Any], route: str, extra: Mapping[str, str] | None = None
    ) -> Response:
        self._count(route, status)
        headers = {"intuit_tid": _tid(), **(extra or {})}
        if _wants_json(request):
            self.formats["json"] += 1
            return Response(orjson.dumps(payload), status_code=status, headers={"content-type": _JSON_CT, **headers})
        self.formats["xml"] += 1
        return Response(to_xml(payload), status_code=status, headers={"content-type": _XML_CT, **headers})

    def _auth_fault(self, status: int, detail: str | None, route: str) -> Response:
        self._count(route, status)
        if status == 401:
            message, code, kind = (
                "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                "3200",
                "AUTHENTICATION",
            )
            extra = {"www-authenticate": 'Bearer realm="Intuit", error="invalid_token"'}
        else:
            message, code, kind = (
                "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                "3100",
                "SERVICE",
            )
            extra = {}
        body = {
            "warnings": None,
            "intuitObject": None,
            "fault": {"error": [{"message": message, "detail": detail, "code": code, "element": None}], "type": kind},
            "report": None,
            "queryResponse": None,
            "batchItemResponse": [],
            "attachableResponse": [],
            "syncErrorResponse": None,
            "requestId": None,
            "time": int(time.time() * 1000),
            "status": None,
            "cdcresponse": [],
        }
        return Response(
            orjson.dumps(body),
            status_code=status,
            headers={"content-type": "application/json", "intuit_tid": _tid(), **extra},
        )

    def _api(self, kind: str | None) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, kind)

        endpoint.__name__ = f"quickbooks_{(kind or 'unsupported').replace(':', '_')}"
        return endpoint

    def _fault_for(self, realm: str) -> _Faults | None:
        for key in (realm, None):
            f = self._faults.get(key)
            if f is not None and (f.server_errors or f.rate_limited or f.day_limit_exhausted or f.latency_ms):
                return f
        return None

    async def _serve(self, request: Request, kind: str | None) -> Response:
        realm = request.path_params["realm"]
        oid = request.path_params.get("oid")
        if kind is not None and kind.startswith("write:"):
            operation = request.query_params.get("operation")
            route = f"{request.method} /v3/company/{{realmId}}/{kind[6:].lower()}" + (
                f"?operation={operation.lower()}" if operation else ""
            )
        else:
            route = f"{request.method} /v3/company/{{realmId}}/" + (
                f"{kind}/{{id}}" if oid is not None else (kind or "{unsupported}")
            )
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied as denied:
            detail = {
                "missing": "Authorization header is missing or is not a Bearer token",
                "invalid": "Malformed bearer token: too short or too long",
                "expired": "Token expired: "
                + (request.headers.get("authorization", "")[7:][:50] if denied.reason == "expired" else ""),
                "revoked": "Token revoked",
            }.get(denied.reason, denied.reason)
            return self._auth_fault(401, detail, route)
        rt = self._runtime.get(realm)
        faults = self._fault_for(realm)
        if faults is not None:
            if faults.server_errors > 0:
                faults.server_errors -= 1
                return self._error(request, _system_fault(faults.server_error_status), route, rt)
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                return self._error(request, _throttled(), route, rt)
            if faults.day_limit_exhausted:
                return self._error(request, _throttled(), route, rt)
        if rt is None or self._grant_realm(grant) != realm or grant.client_id != rt.company.client_id:
            return self._auth_fault(403, None, route)
        env = self.client_environments.get(grant.client_id)
        if env is not None and env != rt.company.environment:
            return self._auth_fault(403, None, route)
        spec = rt.company.spec
        now = time.monotonic()
        if (
            (spec["max_concurrent"] and rt.active >= spec["max_concurrent"])
            or not rt.minute.room(spec["requests_per_minute"], spec["minute_seconds"], now)
            or not rt.second.room(spec["requests_per_second"], spec["second_seconds"], now)
        ):
            rt.throttled += 1
            return self._error(request, _throttled(), route, rt)
        rt.minute.take(spec["requests_per_minute"])
        rt.second.take(spec["requests_per_second"])
        rt.requests += 1
        rt.active += 1
        rt.peak_concurrency = max(rt.peak_concurrency, rt.active)
        try:
            if faults is not None and faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            self._minor_version(request)
            company = rt.company
            if kind is not None and kind.startswith("write:"):
                return await self._write(request, rt, kind[6:], route)
            payload = await self._dispatch(request, company, kind, oid)
            payload["time"] = company.response_time(self._now_precise())
            return self._render(request, 200, payload, route)
        except QueryError as err:
            return self._error(request, err, route, rt)
        finally:
            rt.active -= 1

    async def _write(self, request: Request, rt: _Runtime, entity: str, route: str) -> Response:
        """``POST /customer`` or ``POST /invoice[?operation=void|delete]`` (``writes``); a ``requestid`` already
        answered gets that first answer again, unchanged, and nothing is done twice."""
        request_id = request.query_params.get("requestid")
        if request_id is not None and len(request_id) > REQUEST_ID_MAX:
            raise QueryError("2010", "Request has invalid or unsupported property",
                             f"Property Name:requestid holds at most {REQUEST_ID_MAX} characters. Supplied length:"
                             f"{len(request_id)}", element="requestid")  # fmt: skip
        if request_id and request_id in rt.replies:
            rt.replayed += 1
            return self._render(request, 200, rt.replies[request_id], route)
        try:
            body = orjson.loads(await request.body() or b"null")
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            raise QueryError("2010", "Request has invalid or unsupported property",
                             f"Property Name:the request body is not a JSON {entity} specified is unsupported or "
                             "invalid")  # fmt: skip
        operation = (request.query_params.get("operation") or "create").lower()
        company, now = rt.company, float(self.clock())
        if operation == "create" and entity == "Customer":
            made = create_customer(company, body, now)
        elif operation == "create":
            made = create_invoice(company, body, now)
        elif entity == "Invoice" and operation in ("void", "delete"):
            made = invoice_operation(company, operation, body, now)
        else:
            path = request.url.path[len(API_PREFIX) :]
            raise _unsupported_operation(f"{path}?operation={operation}", f"https://quickbooks.api.intuit.com{path}")
        # A copy: the replay of a requestid is the answer as it was, whatever happened to the object since.
        payload = orjson.loads(orjson.dumps({entity: made, "time": company.response_time(self._now_precise())}))
        if request_id:
            rt.replies[request_id] = payload
        rt.writes += 1
        return self._render(request, 200, payload, route)

    def _now_precise(self) -> float:
        now = self.clock()
        return now + (time.time() % 1.0)

    def _error(self, request: Request, err: QueryError, route: str, rt: _Runtime | None) -> Response:
        tz_company = rt.company if rt else None
        stamp = (
            tz_company.response_time(self._now_precise())
            if tz_company
            else dt.datetime.fromtimestamp(self._now_precise(), dt.UTC).isoformat(timespec="milliseconds")
        )
        return self._render(request, err.status, {"Fault": err.fault(), "time": stamp}, route)

    def _minor_version(self, request: Request) -> int:
        raw = request.query_params.get("minorversion")
        try:
            asked = int(raw) if raw is not None else MIN_MINOR_VERSION
        except ValueError:
            asked = MIN_MINOR_VERSION
        served = max(MIN_MINOR_VERSION, asked)
        self.minor_versions[str(served)] += 1
        return served

    async def _dispatch(
        self, request: Request, company: QuickBooksCompany, kind: str | None, oid: str | None
    ) -> dict[str, Any]:
        if kind == "query":
            sql = request.query_params.get("query")
            if request.method == "POST":
                body = (await request.body()).decode("utf-8", "replace")
                sql = body if body.strip() else sql
            return {"QueryResponse": company.query(parse_query(sql or ""))}
        if kind == "cdc":
            return {"CDCResponse": [{"QueryResponse": self._cdc(request, company)}]}
        if kind == "batch":
            return {"BatchItemResponse": self._batch(company, await request.body())}
        if kind in ("invoice", "customer", "payment", "account") and oid is not None:
            entity = kind.capitalize()
            rec = company.table(entity).get(oid)
            if rec is None:
                raise _not_found()
            return {entity: rec}
        if kind == "companyinfo" and oid is not None:
            if oid != company.realm_id:
                raise _not_found()
            return {"CompanyInfo": company.company_info()}
        path = request.url.path[len(API_PREFIX) :]
        full = f"https://quickbooks.api.intuit.com{path}"
        raise _unsupported_operation(path, full)

    def _batch(self, company: QuickBooksCompany, raw: bytes) -> list[dict[str, Any]]:
        """``BatchItemRequest`` (at most 30 items): each ``Query`` answered as ``/query`` would, in its own
        ``Fault`` when it fails; writes are not emulated (an ``Unsupported Operation`` fault per item)."""
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            raise QueryError("2010", "Request has invalid or unsupported property", "Invalid JSON body") from None
        items = body.get("BatchItemRequest") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise QueryError("2010", "Request has invalid or unsupported property",
                             "Property Name:BatchItemRequest")  # fmt: skip
        if len(items) > BATCH_MAX_ITEMS:
            raise _batch_too_large(len(items))
        answers: list[dict[str, Any]] = []
        for item in items:
            answer: dict[str, Any] = {"bId": item.get("bId")}
            try:
                if not isinstance(item.get("Query"), str):
                    operation = item.get("operation") or "query"
                    raise _unsupported_operation(f"/batch ({operation})", "batch item")
                answer["QueryResponse"] = company.query(parse_query(item["Query"]))
            except QueryError as err:
                answer["Fault"] = err.fault()
            answers.append(answer)
        return answers

    def _cdc(self, request: Request, company: QuickBooksCompany) -> list[dict[str, Any]]:
        raw_entities = request.query_params.get("entities", "")
        since_raw = request.query_params.get("changedSince", "")
        if not raw_entities:
            raise QueryError("2010", "Request has invalid or unsupported property", "Property Name:entities")
        if not since_raw:
            raise QueryError("2010", "Request has invalid or unsupported property", "Property Name:changedSince")
        entities: list[str] = []
        for name in raw_entities.split(","):
            canonical = _ENTITY_NAMES.get(name.strip().lower())
            if canonical is None or canonical in ("CompanyInfo", "TaxCode", "TaxRate", "TimeActivity"):
                raise QueryError(
                    "2010", "Request has invalid or unsupported property", f"Property Name:{name.strip()} for cdc"
                )
            if canonical not in entities:
                entities.append(canonical)
        try:
            since = _parse_when(since_raw, company.tz)
        except ValueError:
            raise QueryError(
                "2010", "Request has invalid or unsupported property", f"Property Name:changedSince {since_raw}"
            ) from None
        spec = company.spec
        if self.clock() - since > spec["cdc_max_days"] * _DAY:
            raise QueryError(
                "2010",
                "Request has invalid or unsupported property",
                f"Property Name:Operation cdc with changedSince date {since_raw} which is older than fixed days "
                "is not supported.",
            )
        return company.cdc(entities, since, spec["cdc_max_objects"])

    # --- control API ------------------------------------------------------------------------------------

    def _rt(self, tenant: str) -> _Runtime:
        return lookup(self._runtime, tenant, "tenant")

    async def _control_clients(self, request: Request) -> Response:
        async def handle(request: Request) -> dict[str, Any]:
            body = await read_json_object(request)
            client_id, secret = body.get("client_id"), body.get("client_secret")
            if not isinstance(client_id, str) or not client_id or not isinstance(secret, str):
                raise ControlError(400, "client_id and client_secret are required strings")
            environment = body.get("environment")
            if environment not in (None, "sandbox", "production"):
                raise ControlError(400, "environment must be sandbox or production")
            client = self.oauth.register_client(client_id, secret, tuple(body.get("redirect_uris") or ()))
            if environment is None:
                self.client_environments.pop(client_id, None)
            else:
                self.client_environments[client_id] = environment
            return {
                "client_id": client.client_id,
                "redirect_uris": list(client.redirect_uris),
                "environment": environment,
            }

        return await _control(handle)(request)

    async def _control_tenants(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            if request.method == "GET":
                return [self._summary(rt.company) for rt in self._runtime.values()]
            spec = self.normalise_spec(await read_json_object(request))
            started = time.perf_counter()
            now = self.clock()
            company = await run_in_threadpool(lambda: QuickBooksCompany(spec, now=now))
            self._install(company)
            return {**self._summary(company), "generation_seconds": round(time.perf_counter() - started, 3)}

        return await _control(handle)(request)

    async def _control_tenant(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            return self._summary(self._rt(request.path_params["tenant"]).company)

        return await _control(handle)(request)

    async def _control_changes(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            reject_unknown_fields(body, _CHANGE_FIELDS, "change")
            changes = {k: _int_field(body, k, 0) or 0 for k in _CHANGE_FIELDS}
            return company.apply_changes(changes, self.clock())

        return await _control(handle)(request)

    def _updated_at(self, body: Mapping[str, Any]) -> float:
        value = body.get("updated_at")
        if value is None:
            return float(self.clock())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ControlError(400, "updated_at must be unix seconds")
        return float(value)

    async def _control_add_record(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            entity = _entity_of(body.get("entity"))
            fields = body.get("fields") or {}
            if not isinstance(fields, dict):
                raise ControlError(400, "fields must be an object")
            lines = fields.get("Line")
            if isinstance(lines, list) and len(lines) > 750:
                raise ControlError(400, "an invoice holds at most 750 lines")
            return company.add_record(entity, fields, self._updated_at(body))

        return await _control(handle)(request)

    async def _control_update_record(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            oid = request.path_params["oid"]
            if body.get("entity") is not None:
                entity = _entity_of(body["entity"])
            else:
                entity = company.entity_of(oid) or "Invoice"
            if oid not in company.table(entity):
                raise ControlError(404, f"no {entity.lower()} {oid}")
            fields = body.get("fields") or {}
            if not isinstance(fields, dict):
                raise ControlError(400, "fields must be an object")
            return company.update_record(entity, oid, fields, self._updated_at(body))

        return await _control(handle)(request)

    async def _control_invoice_action(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            oid, action = request.path_params["oid"], request.path_params["action"]
            if action not in ("void", "delete"):
                raise ControlError(404, f"no invoice action {action!r} (void or delete)")
            if oid not in company.invoices:
                raise ControlError(404, f"no invoice {oid}")
            at = self._updated_at(await read_json_object(request))
            if action == "void":
                company.void_invoice(oid, at)
                return company.invoices[oid]
            company.delete_invoice(oid, at)
            return {"deleted": oid}

        return await _control(handle)(request)

    async def _control_merge(self, request: Request) -> Response:
        return await self._merge_records(request, "invoice")

    async def _control_merge_customers(self, request: Request) -> Response:
        return await self._merge_records(request, "customer")

    async def _merge_records(self, request: Request, kind: str) -> Response:
        """Merge one invoice or customer (`from`) into another (`into`), as QuickBooks' merge does."""

        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            reject_unknown_fields(body, ("from", "into", "updated_at"), "merge")
            source, target = body.get("from"), body.get("into")
            if not isinstance(source, str) or not isinstance(target, str):
                raise ControlError(400, f"from and into must be {kind} ids")
            merge = company.merge_invoices if kind == "invoice" else company.merge_customers
            try:
                merged = merge(source, target, self._updated_at(body))
            except LookupError as err:
                raise ControlError(404, str(err)) from None
            return {"merged": merged, "deleted_id": source}

        return await _control(handle)(request)

    async def _control_payment_action(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            oid, action = request.path_params["oid"], request.path_params["action"]
            if action not in ("void", "delete"):
                raise ControlError(404, f"no payment action {action!r} (void or delete)")
            if oid not in company.payments:
                raise ControlError(404, f"no payment {oid}")
            at = self._updated_at(await read_json_object(request))
            if action == "void":
                return company.void_payment(oid, at)
            company.delete_payment(oid, at)
            return {"deleted": oid}

        return await _control(handle)(request)

    async def _control_export(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            return company.export(_entity_of(request.path_params["entity"]))

        return await _control(handle)(request)

    async def _control_faults(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            if request.method == "DELETE":
                return clear_scoped_faults(self._faults, request.query_params.get("tenant"))
            body = await read_json_object(request)
            reject_unknown_fields(body, _FAULT_FIELDS, "fault")
            tenant = body.get("tenant")
            if tenant is not None:
                self._rt(str(tenant))
                tenant = str(tenant)
            f = self._faults.setdefault(tenant, _Faults())
            if "server_errors" in body:
                f.server_errors = _int_field(body, "server_errors", 0) or 0
            if "server_error_status" in body:
                status = body["server_error_status"]
                if status not in (500, 502, 503, 504):
                    raise ControlError(400, "server_error_status must be 500, 502, 503 or 504")
                f.server_error_status = status
            if "rate_limited" in body:
                f.rate_limited = _int_field(body, "rate_limited", 0) or 0
            if "day_limit_exhausted" in body:
                f.day_limit_exhausted = bool(body["day_limit_exhausted"])
            if "latency_ms" in body:
                f.latency_ms = number_field(body, "latency_ms", 0.0)
            return {"tenant": tenant, **f.as_dict()}

        return await _control(handle)(request)

    async def _control_stats(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            return {
                "requests": self.stats["requests"],
                "by_route": dict(self.by_route),
                "by_status": dict(self.by_status),
                "minor_versions": dict(self.minor_versions),
                "formats": dict(self.formats),
                "tenants": {
                    realm: {
                        "requests": rt.requests,
                        "throttled": rt.throttled,
                        "writes": rt.writes,
                        "replayed": rt.replayed,
                        "peak_concurrency": rt.peak_concurrency,
                    }
                    for realm, rt in self._runtime.items()
                },
                "faults": {str(k): f.as_dict() for k, f in self._faults.items()},
                "oauth": self.oauth.control_state()["stats"],
            }

        return await _control(handle)(request)
