"""``MyobSandbox``: API keys and company files, the OAuth hooks on ``secure.myob.com``, the AccountRight API
(sale invoices, customer cards and customer payments; new customer cards and service invoices by POST) under
``/myob/api`` and the control API under ``/_sandbox/myob``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    bool_field,
    control_endpoint,
    number_field,
    optional_int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.myob.apps import _App, _Faults
from nextcrm_sandbox.myob.data import _CompanyFile, _Row, _TenantKnobs
from nextcrm_sandbox.myob.model import (
    _CHANGE_FIELDS,
    _CLIENT_FIELDS,
    _FAULT_FIELDS,
    _GENERIC_DROP,
    _JSON,
    _LAYOUT_BY_LOWER,
    _TENANT_FIELDS,
    _TYPED_DROP,
    _US,
    API_PREFIX,
    CONTROL_PREFIX,
    DEFAULT_SCOPES,
    KEY_MODES,
    LEGACY_SCOPE,
    SECURE_PREFIX,
    SME_SCOPES,
    MyobError,
    _bad_query,
    _not_found,
    _token_invalid,
)
from nextcrm_sandbox.myob.query import (
    Getter,
    _customer_getter,
    _FilterParser,
    _invoice_getter,
    _orderby_keys,
    _payment_getter,
    _sort_key,
)
from nextcrm_sandbox.myob.wire import (
    _control_json,
    _daily_limit,
    _entity,
    _json_ok,
    _method_not_allowed,
    _not_emulated,
    _origin,
    _path_pattern,
    _query_int,
    _query_string,
    _require_scope,
    _second_limit,
    _view,
)
from nextcrm_sandbox.myob.writes import create_customer, create_service_invoice, created, read_body
from nextcrm_sandbox.oauth import AccessDenied, Grant, OAuthError, OAuthPolicy, OAuthServer, json_response

_control = partial(control_endpoint, oauth_errors=True)


def _status_field(body: Mapping[str, Any], name: str, default: int, allowed: Iterable[int]) -> int:
    value = optional_int_field(body, name, default)
    if value not in set(allowed):
        raise ControlError(400, f"{name} must be one of {sorted(set(allowed))}")
    return int(value)


def _origin_field(body: Mapping[str, Any]) -> str | None:
    value = body.get("location_origin")
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+", value)):
        raise ControlError(400, "location_origin must be scheme://host[:port]")
    return value


class MyobSandbox:
    """All emulated MYOB company files and API keys of one sandbox server, plus their HTTP behaviour."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=1200,
            code_ttl=300,
            refresh_idle_ttl=None,
            rotate=True,
            rotate_after=0,
            grace=0,
            client_auth=frozenset({"body"}),
            pkce=False,
            expires_in_as_string=True,
        )
        self.oauth = OAuthServer(
            clock, policy, extra_token_fields=self._token_extras, scope_allowed=self._scope_allowed
        )
        self.apps: dict[str, _App] = {}
        self.tenants: dict[str, _CompanyFile] = {}
        self.faults: dict[str | None, _Faults] = {}
        self.stats: dict[str, Counter[str]] = {"total": Counter(), "by_path": Counter(), "by_status": Counter()}

    # --- apps and tenants -------------------------------------------------------------------------------

    def app(self, client_id: str) -> _App:
        """The settings of an API key, created with defaults on first use."""
        app = self.apps.get(client_id)
        if app is None:
            uid = str(uuid.UUID(bytes=hashlib.sha256(f"myob-user:{client_id}".encode()).digest()[:16], version=4))
            app = self.apps[client_id] = _App(client_id, uid=uid)
        return app

    def configure_app(self, client_id: str, body: Mapping[str, Any], *, user: bool = False) -> _App:
        """Apply key generation and limit knobs (and with ``user`` the my.MYOB user name) to an API key."""
        app = self.app(client_id)
        if "key_mode" in body:
            mode = body["key_mode"]
            if mode not in KEY_MODES:
                raise ControlError(400, f"key_mode must be one of {list(KEY_MODES)}")
            app.key_mode = mode
        if user and "username" in body:
            if not isinstance(body["username"], str) or not body["username"]:
                raise ControlError(400, "username must be a non-empty string")
            app.username = body["username"]
        if "requests_per_second" in body:
            app.requests_per_second = optional_int_field(body, "requests_per_second", 8)
        if "second_window_seconds" in body:
            app.second_window_seconds = number_field(body, "second_window_seconds", 1.0, 0.001)
        if "daily_limit" in body:
            app.daily_limit = optional_int_field(body, "daily_limit", 1_000_000)
        if "day_window_seconds" in body:
            app.day_window_seconds = number_field(body, "day_window_seconds", 86400.0, 0.001)
        if "per_second_status" in body:
            app.per_second_status = _status_field(body, "per_second_status", 403, (403, 429))
        return app

    def add_tenant(self, spec: Mapping[str, Any]) -> _CompanyFile:
        """Validate a tenant spec, generate the company file and install it (replacing one with the same id)."""
        tenant = self.build_tenant(spec)
        self.install_tenant(tenant, spec)
        return tenant

    def build_tenant(self, spec: Mapping[str, Any]) -> _CompanyFile:
        """Generate a company file from a control-API spec (no state change)."""
        unknown = set(spec) - _TENANT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown tenant fields: {sorted(unknown)}")
        client_id = spec.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ControlError(400, "client_id must be a non-empty string")
        seed = optional_int_field(spec, "seed", 0, minimum=None)
        invoices = optional_int_field(spec, "invoices", 100)
        customers = optional_int_field(spec, "customers", spec.get("contacts", max(1, min(invoices // 5, 2000))), 1)
        days = number_field(spec, "days", 30.0, 0.0001)
        knobs = _TenantKnobs(
            cftoken_required=bool_field(spec, "cftoken_required", True),
            username=str(spec.get("username", "Administrator")),
            password=str(spec.get("password", "")),
            generic_invoice_lines=bool_field(spec, "generic_invoice_lines", False),
            default_top=optional_int_field(spec, "default_top", 400, 1),
            max_top=optional_int_field(spec, "max_top", 1000, 1),
            utc_offset_minutes=optional_int_field(spec, "utc_offset_minutes", 0, minimum=-14 * 60),
            unknown_path_status=_status_field(spec, "unknown_path_status", 401, (401, 404)),
            location_origin=_origin_field(spec),
        )
        raw_id = spec.get("id")
        if raw_id is None:
            digest = hashlib.sha256(f"myob-cf:{client_id}:{seed}".encode()).digest()[:16]
            business_id = str(uuid.UUID(bytes=digest, version=4))
        elif isinstance(raw_id, str) and re.fullmatch(r"[A-Za-z0-9-]{1,64}", raw_id):
            business_id = raw_id.lower()
        else:
            raise ControlError(400, "id must be a GUID-like string of letters, digits and dashes")
        name = spec.get("name") or f"Sandbox Company {seed}"
        if not isinstance(name, str):
            raise ControlError(400, "name must be a string")
        return _CompanyFile(
            business_id,
            name,
            client_id,
            seed=seed,
            invoices=invoices,
            customers=customers,
            days=days,
            now=self.clock(),
            knobs=knobs,
        )

    def install_tenant(self, tenant: _CompanyFile, spec: Mapping[str, Any]) -> None:
        """Make a generated company file live and apply the app-level knobs of its spec."""
        previous = self.tenants.get(tenant.id)
        if previous is not None and tenant.id in self.app(previous.client_id).tenants:
            self.app(previous.client_id).tenants.remove(tenant.id)
        self.tenants[tenant.id] = tenant
        app = self.configure_app(tenant.client_id, spec)
        app.tenants.append(tenant.id)

    def tenant_summary(self, tenant: _CompanyFile, origin: str | None = None) -> dict[str, Any]:
        """What the control API says about a company file."""
        out = {
            "id": tenant.id,
            "name": tenant.name,
            "client_id": tenant.client_id,
            "seed": tenant.seed,
            "counts": tenant.counts(),
            "knobs": {**tenant.knobs.__dict__},
            "key_mode": self.app(tenant.client_id).key_mode,
        }
        if origin is not None:
            out["cf_uri"] = f"{origin}{API_PREFIX}/accountright/{tenant.id}"
        return out

    # --- OAuth hooks ------------------------------------------------------------------------------------

    def _scope_allowed(self, client_id: str, scope: str) -> bool:
        scopes = set(scope.split())
        if self.app(client_id).key_mode == "new":
            return LEGACY_SCOPE not in scopes and bool(scopes) and scopes <= SME_SCOPES
        return bool(scopes) and scopes <= SME_SCOPES | {LEGACY_SCOPE, "la.global"}

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> Mapping[str, Any]:
        user = grant.subject.get("user")
        if not isinstance(user, dict):
            app = self.app(grant.client_id)
            user = {"uid": app.uid, "username": app.username}
        return {"user": user}

    def subject_for(self, params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The company file an authorisation reaches, and the extras MYOB adds to the redirect."""
        client_id = params.get("client_id", "")
        if client_id not in self.oauth.clients:
            return {}, {}
        app = self.app(client_id)
        subject: dict[str, Any] = {"key_mode": app.key_mode, "user": {"uid": app.uid, "username": app.username}}
        tenant = self._chosen_tenant(app, params.get("sandbox_tenant"))
        if tenant is None:
            if app.key_mode == "new":
                raise OAuthError("access_denied", "the user has no company file to consent to", 400)
            return subject, {}
        subject["business_id"] = tenant.id
        subject["business_name"] = tenant.name
        extras: dict[str, str] = {}
        if app.key_mode == "new" and params.get("prompt") == "consent":
            extras = {"businessId": tenant.id, "businessName": tenant.name}
        return subject, extras

    def _chosen_tenant(self, app: _App, wanted: str | None) -> _CompanyFile | None:
        if wanted:
            tenant = self.tenants.get(wanted.lower())
            if tenant is None or tenant.client_id != app.client_id:
                raise OAuthError("invalid_request", f"sandbox_tenant {wanted!r} is not a file of this app", 400)
            return tenant
        return self.tenants[app.tenants[-1]] if app.tenants else None

    # --- routes -----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Secure (OAuth), API and ``/_sandbox/myob`` control routes."""
        authorize = self.oauth.authorize_endpoint(self.subject_for)
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        c = CONTROL_PREFIX
        return [
            Route(f"{SECURE_PREFIX}/oauth2/account/authorize", self._counted(authorize, "GET"), methods=["GET"]),
            Route(f"{SECURE_PREFIX}/oauth2/account/authorize/", self._counted(authorize, "GET"), methods=["GET"]),
            Route(
                f"{SECURE_PREFIX}/oauth2/v1/authorize",
                self._counted(self.oauth.token_endpoint, "POST"),
                methods=["POST"],
            ),
            Route(f"{API_PREFIX}/{{path:path}}", self._api, methods=methods),
            *self.oauth.control_routes(c),
            Route(f"{c}/clients", self._control_clients, methods=["POST"]),
            Route(f"{c}/grants", self._control_grants, methods=["POST"]),
            Route(f"{c}/settings", self._control_settings, methods=["GET", "POST"]),
            Route(f"{c}/tenants", self._control_tenants, methods=["GET", "POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/records", self._control_add_record, methods=["POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/records/{{record_id}}", self._control_update_record, methods=["PATCH"]),
            Route(f"{c}/tenants/{{tenant_id}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{c}/faults", self._control_faults, methods=["GET", "POST", "DELETE"]),
            Route(f"{c}/stats", self._control_stats, methods=["GET"]),
        ]

    def _counted(self, handler: Callable[[Request], Any], method: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            response = await handler(request)
            path = request.url.path[len("/myob") :].rstrip("/")
            self._count(f"{method} {path}", response.status_code)
            return response

        return endpoint

    def _count(self, pattern: str, status: int) -> None:
        self.stats["total"]["requests"] += 1
        self.stats["by_path"][pattern] += 1
        self.stats["by_status"][str(status)] += 1

    # --- the API ----------------------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        segments = [s for s in request.path_params["path"].split("/") if s]
        pattern = _path_pattern(segments)
        headers = {"x-myobapi-requestid": request_id}
        try:
            response = await self._serve(request, segments, headers)
        except MyobError as err:
            response = Response(
                err.body(), status_code=err.status, headers={"content-type": _JSON, **headers, **err.headers}
            )
        self._count(f"{request.method} {pattern}", response.status_code)
        return response

    async def _serve(self, request: Request, segments: list[str], headers: dict[str, str]) -> Response:
        key = request.headers.get("x-myobapi-key", "")
        if not key or key not in self.oauth.clients:
            raise MyobError(403, "DeveloperInactive", "API key is missing or inactive", details="Header: x-myobapi-key")
        app = self.app(key)
        tenant_key = segments[1].lower() if len(segments) > 1 and segments[0].lower() == "accountright" else None
        await self._apply_faults(app, tenant_key)
        refused = app.take()
        if refused == "day":
            raise _daily_limit()
        if refused == "second":
            raise _second_limit(app)
        if request.headers.get("x-myobapi-version", "").lower() != "v2":
            raise MyobError(
                400,
                "IncorrectVersion",
                "The x-myobapi-version header must be 'v2'",
                details="Header: x-myobapi-version",
            )
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied:
            raise _token_invalid() from None
        if grant.client_id != key:
            raise _token_invalid()
        if not segments or segments[0].lower() != "accountright":
            raise MyobError(404, "NotFound", "The requested resource was not found")
        scopes = set(grant.scope.split())
        if len(segments) == 1:
            return self._company_files(request, app, scopes, headers)
        tenant = self.tenants.get(segments[1].lower())
        if tenant is None or not self._reaches(grant, tenant):
            raise MyobError(403, "Forbidden", "Access to this company file has not been granted", details="businessId")
        rest = [s.lower() for s in segments[2:]]
        if not rest:
            _require_scope(scopes, "sme-company-file")
            if request.method != "GET":
                raise _method_not_allowed(request.method, "GET")
            return _json_ok(request, self._company_file_entry(tenant, _origin(request)), headers)
        self._check_cftoken(request, tenant)
        if request.method in ("POST", "PUT"):
            request.state.myob_body = await request.body()
        if rest[:2] == ["sale", "invoice"]:
            _require_scope(scopes, "sme-sales")
            return self._invoices(request, tenant, segments[4] if len(rest) > 2 else None, rest[3:], headers)
        if rest[:2] == ["contact", "customer"]:
            _require_scope(scopes, "sme-contacts-customer")
            return self._customers(request, tenant, rest[2:], headers)
        if rest[:2] == ["sale", "customerpayment"]:
            _require_scope(scopes, "sme-sales")
            return self._payments(request, tenant, rest[2:], headers)
        raise self._unknown_path(tenant)

    async def _apply_faults(self, app: _App, tenant_key: str | None) -> None:
        active = [f for f in (self.faults.get(tenant_key) if tenant_key else None, self.faults.get(None)) if f]
        latency = max((f.latency_ms for f in active), default=0.0)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        for faults in active:
            if faults.day_limit_exhausted:
                raise _daily_limit()
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                raise _second_limit(app)
            if faults.server_errors > 0:
                faults.server_errors -= 1
                status = faults.server_error_status
                name = "InternalServerError" if status == 500 else "ServiceUnavailable"
                raise MyobError(status, name, "An error has occurred on the server; please try again later")
            if faults.gateway_timeouts > 0:
                faults.gateway_timeouts -= 1
                raise MyobError(
                    504,
                    "GatewayTimeout",
                    "Connection to the API has timed out",
                    details="Maximum call time is 120 seconds",
                )

    def _reaches(self, grant: Grant, tenant: _CompanyFile) -> bool:
        if tenant.client_id != grant.client_id:
            return False
        if grant.subject.get("key_mode", self.app(grant.client_id).key_mode) == "legacy":
            return True
        return grant.subject.get("business_id") == tenant.id

    @staticmethod
    def _check_cftoken(request: Request, tenant: _CompanyFile) -> None:
        if not tenant.knobs.cftoken_required:
            return
        header = request.headers.get("x-myobapi-cftoken")
        try:
            decoded = base64.b64decode(header or "", validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = None
        if decoded != f"{tenant.knobs.username}:{tenant.knobs.password}":
            raise MyobError(401, "AccessDenied", "Access denied", details="Header: x-myobapi-cftoken")

    @staticmethod
    def _unknown_path(tenant: _CompanyFile) -> MyobError:
        if tenant.knobs.unknown_path_status == 404:
            return MyobError(404, "NotFound", "The requested resource was not found")
        return _token_invalid()

    def _company_file_entry(self, tenant: _CompanyFile, origin: str) -> dict[str, Any]:
        return {
            "Id": tenant.id,
            "Name": tenant.name,
            "LibraryPath": tenant.name,
            "ProductVersion": "2025.2",
            "ProductLevel": {"Code": 30, "Name": "Plus"},
            "CheckedOutDate": None,
            "CheckedOutBy": None,
            "Uri": f"{origin}{API_PREFIX}/accountright/{tenant.id}",
            "Country": "AU",
            "LauncherId": tenant.launcher_id,
            "SerialNumber": tenant.serial,
            "UIAccessFlags": 2,
        }

    def _company_files(self, request: Request, app: _App, scopes: set[str], headers: dict[str, str]) -> Response:
        if request.method != "GET":
            raise _method_not_allowed(request.method, "GET")
        if LEGACY_SCOPE not in scopes:
            _require_scope(scopes, "sme-company-file")
        files: list[dict[str, Any]] = []
        if app.key_mode == "legacy":
            origin = _origin(request)
            files = [self._company_file_entry(self.tenants[t], origin) for t in app.tenants if t in self.tenants]
        return _json_ok(request, files, headers)

    # --- invoices and customers -------------------------------------------------------------------------

    def _invoices(
        self,
        request: Request,
        tenant: _CompanyFile,
        layout_segment: str | None,
        rest: list[str],
        headers: dict[str, str],
    ) -> Response:
        method = request.method
        if layout_segment is None:
            if method != "GET":
                raise _method_not_allowed(method, "GET")
            rows = list(tenant.invoices.values())
            drop = frozenset() if tenant.knobs.generic_invoice_lines else _GENERIC_DROP
            return self._collection(request, tenant, rows, _invoice_getter(tenant), lambda r: _view(r, drop), headers)
        layout = _LAYOUT_BY_LOWER.get(layout_segment.lower())
        if layout is None or len(rest) > 1:
            raise self._unknown_path(tenant)
        if not rest:
            if method == "POST" and layout == "Service":
                body = read_body(request.state.myob_body)
                return created(request, tenant, create_service_invoice(tenant, body, self.clock() * _US), headers)
            if method != "GET":
                raise _not_emulated(method)
            rows = [row for row in tenant.invoices.values() if row.layout == layout]
            drop = _TYPED_DROP[layout]
            return self._collection(request, tenant, rows, _invoice_getter(tenant), lambda r: _view(r, drop), headers)
        row = tenant.invoices.get(rest[0])
        if row is None or row.layout != layout:
            raise _not_found(f"{layout} invoice")
        if method == "GET":
            return _json_ok(request, _view(row, _TYPED_DROP[layout]), headers)
        if method == "DELETE":
            del tenant.invoices[row.uid]
            tenant.deleted_invoice_ids.append(row.uid)
            return Response(b"", status_code=200, headers=headers)
        raise _not_emulated(method)

    def _customers(self, request: Request, tenant: _CompanyFile, rest: list[str], headers: dict[str, str]) -> Response:
        if len(rest) > 1:
            raise self._unknown_path(tenant)
        if request.method == "POST" and not rest:
            body = read_body(request.state.myob_body)
            return created(request, tenant, create_customer(tenant, body, self.clock() * _US), headers)
        if request.method != "GET":
            raise _not_emulated(request.method)
        if not rest:
            rows = list(tenant.customers.values())
            return self._collection(request, tenant, rows, _customer_getter(tenant), lambda r: r.rec, headers)
        row = tenant.customers.get(rest[0])
        if row is None:
            raise _not_found("customer")
        return _json_ok(request, row.rec, headers)

    def _payments(self, request: Request, tenant: _CompanyFile, rest: list[str], headers: dict[str, str]) -> Response:
        if len(rest) > 1:
            raise self._unknown_path(tenant)
        method = request.method
        if not rest:
            if method != "GET":
                raise _not_emulated(method)
            rows = list(tenant.payments.values())
            return self._collection(request, tenant, rows, _payment_getter(tenant), lambda r: r.rec, headers)
        row = tenant.payments.get(rest[0])
        if row is None:
            raise _not_found("customer payment")
        if method == "GET":
            return _json_ok(request, row.rec, headers)
        if method == "DELETE":
            tenant.delete_payment(row.uid, self.clock() * _US)
            return Response(b"", status_code=200, headers=headers)
        raise _not_emulated(method)

    def _collection(
        self,
        request: Request,
        tenant: _CompanyFile,
        rows: list[_Row],
        resolve: Callable[[str], Getter],
        render: Callable[[_Row], dict[str, Any]],
        headers: dict[str, str],
    ) -> Response:
        params = request.query_params
        top = _query_int(params.get("$top"), "$top", tenant.knobs.default_top)
        top = min(top, tenant.knobs.max_top)
        skip = _query_int(params.get("$skip"), "$skip", 0)
        text = params.get("$filter")
        if text is not None and text.strip():
            predicate = _FilterParser(text, resolve).parse()
            rows = [row for row in rows if predicate(row)]
        orderby = params.get("$orderby")
        if orderby:
            try:
                for name, descending in reversed(_orderby_keys(orderby)):
                    rows.sort(key=_sort_key(resolve(name)), reverse=descending)
            except TypeError:
                raise _bad_query(f"The $orderby '{orderby}' compares values of different types") from None
        count = len(rows)
        page = rows[skip : skip + top]
        next_link = None
        if skip + top < count and top > 0:
            kept = [(k, v) for k, v in params.multi_items() if k not in ("$top", "$skip")]
            query = _query_string([*kept, ("$top", str(top)), ("$skip", str(skip + top))])
            next_link = f"{_origin(request)}{request.url.path}?{query}"
        payload = {"Items": [render(row) for row in page], "NextPageLink": next_link, "Count": count}
        return _json_ok(request, payload, headers)

    # --- control API ------------------------------------------------------------------------------------

    def _tenant(self, request: Request) -> _CompanyFile:
        tenant = self.tenants.get(request.path_params["tenant_id"].lower())
        if tenant is None:
            raise ControlError(404, f"no company file {request.path_params['tenant_id']!r}")
        return tenant

    @staticmethod
    def _at_us(body: Mapping[str, Any], now: int) -> int:
        value = body.get("updated_at")
        if value is None:
            return now * _US
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ControlError(400, "updated_at must be unix seconds (a number)")
        return round(value * _US)

    @staticmethod
    def _fields(body: Mapping[str, Any]) -> dict[str, Any]:
        fields_ = body.get("fields") or {}
        if not isinstance(fields_, dict):
            raise ControlError(400, "fields must be a JSON object")
        return fields_

    async def _control_clients(self, request: Request) -> Response:
        async def action() -> Response:
            body = await read_json_object(request)
            unknown = set(body) - _CLIENT_FIELDS
            if unknown:
                raise ControlError(400, f"unknown client fields: {sorted(unknown)}")
            client_id, secret = body.get("client_id"), body.get("client_secret")
            if not isinstance(client_id, str) or not client_id or not isinstance(secret, str):
                raise ControlError(400, "client_id and client_secret must be strings")
            uris = body.get("redirect_uris") or ()
            if not isinstance(uris, (list, tuple)) or not all(isinstance(u, str) for u in uris):
                raise ControlError(400, "redirect_uris must be a list of strings")
            app = self.configure_app(client_id, body, user=True)
            self.oauth.register_client(client_id, secret, tuple(uris))
            return json_response(
                200,
                {
                    "client_id": client_id,
                    "redirect_uris": list(uris),
                    "key_mode": app.key_mode,
                    "user": {"uid": app.uid, "username": app.username},
                    **app.limits(),
                },
            )

        return await _control(action)()

    async def _control_grants(self, request: Request) -> Response:
        async def action() -> Response:
            body = await read_json_object(request)
            client_id = body.get("client_id")
            if not isinstance(client_id, str) or client_id not in self.oauth.clients:
                raise ControlError(404, f"unknown client_id {client_id!r}")
            app = self.app(client_id)
            scope = body.get("scope") or (DEFAULT_SCOPES if app.key_mode == "new" else LEGACY_SCOPE)
            if not isinstance(scope, str) or not self._scope_allowed(client_id, scope):
                raise OAuthError("invalid_scope", f"scope {scope!r} is not available to this API key", 400)
            subject, _ = self.subject_for({"client_id": client_id, "sandbox_tenant": body.get("tenant") or ""})
            grant, token = self.oauth.create_grant(client_id, scope, subject)
            return json_response(
                200,
                {
                    "grant_id": grant.id,
                    "token": token,
                    "businessId": subject.get("business_id"),
                    "businessName": subject.get("business_name"),
                },
            )

        return await _control(action)()

    async def _control_settings(self, request: Request) -> Response:
        async def action() -> Response:
            policy = self.oauth.policy
            if request.method == "POST":
                body = await read_json_object(request)
                known = {f.name: f for f in fields(policy)}
                unknown = set(body) - set(known)
                if unknown:
                    raise ControlError(400, f"unknown settings: {sorted(unknown)}")
                for name, value in body.items():
                    current = getattr(policy, name)
                    if name == "client_auth":
                        if not isinstance(value, list) or not set(value) <= {"basic", "body"} or not value:
                            raise ControlError(400, "client_auth must be a non-empty list of 'basic'/'body'")
                        value = frozenset(value)
                    elif isinstance(current, bool):
                        value = bool_field(body, name, current)
                    elif isinstance(current, str):
                        if not isinstance(value, str):
                            raise ControlError(400, f"{name} must be a string")
                    else:
                        value = optional_int_field(body, name, None)
                    setattr(policy, name, value)
            state = {f.name: getattr(policy, f.name) for f in fields(policy)}
            state["client_auth"] = sorted(state["client_auth"])
            return json_response(200, state)

        return await _control(action)()

    async def _control_tenants(self, request: Request) -> Response:
        async def action() -> Response:
            origin = _origin(request)
            if request.method == "GET":
                return json_response(200, [self.tenant_summary(t, origin) for t in self.tenants.values()])
            spec = await read_json_object(request)
            started = time.perf_counter()
            tenant = await run_in_threadpool(self.build_tenant, spec)
            self.install_tenant(tenant, spec)
            summary = self.tenant_summary(tenant, origin)
            summary["generation_seconds"] = round(time.perf_counter() - started, 3)
            return json_response(200, summary)

        return await _control(action)()

    async def _control_changes(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            reject_unknown_fields(body, _CHANGE_FIELDS, "change")
            counts = {name: optional_int_field(body, name, 0) for name in _CHANGE_FIELDS}
            return json_response(200, tenant.apply_changes(counts, self.clock() * _US))

        return await _control(action)()

    async def _control_add_record(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            entity = _entity(body.get("entity"))
            row = tenant.add_record(entity, self._fields(body), self._at_us(body, self.clock()))
            return _control_json(200, row.rec, _origin(request))

        return await _control(action)()

    async def _control_update_record(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            record_id = request.path_params["record_id"].lower()
            row = tenant.invoices.get(record_id) or tenant.customers.get(record_id) or tenant.payments.get(record_id)
            if row is None:
                raise ControlError(404, f"no invoice, customer or payment {record_id!r}")
            tenant.override(row, dict(self._fields(body)))
            tenant.touch(row, self._at_us(body, self.clock()))
            return _control_json(200, row.rec, _origin(request))

        return await _control(action)()

    async def _control_export(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            entity = _entity(request.path_params["entity"])
            if entity == "customer":
                payload = {
                    "records": [row.rec for row in tenant.customers.values()],
                    "deleted_ids": list(tenant.deleted_customer_ids),
                }
            elif entity == "payment":
                payload = {
                    "records": [row.rec for row in tenant.payments.values()],
                    "deleted_ids": list(tenant.deleted_payment_ids),
                }
            else:
                payload = {
                    "records": [row.rec for row in tenant.invoices.values()],
                    "deleted_ids": list(tenant.deleted_invoice_ids),
                }
            return _control_json(200, payload, _origin(request))

        return await _control(action)()

    async def _control_faults(self, request: Request) -> Response:
        async def action() -> Response:
            if request.method == "DELETE":
                tenant = request.query_params.get("tenant")
                if tenant:
                    self.faults.pop(tenant.lower(), None)
                else:
                    self.faults.clear()
                return json_response(200, self._faults_state())
            if request.method == "GET":
                return json_response(200, self._faults_state())
            body = await read_json_object(request)
            reject_unknown_fields(body, _FAULT_FIELDS, "fault")
            tenant = body.get("tenant")
            if tenant is not None and (not isinstance(tenant, str) or tenant.lower() not in self.tenants):
                raise ControlError(404, f"no company file {tenant!r}")
            faults = self.faults.setdefault(tenant.lower() if tenant else None, _Faults())
            for name in ("server_errors", "rate_limited", "gateway_timeouts"):
                if name in body:
                    setattr(faults, name, optional_int_field(body, name, 0))
            if "server_error_status" in body:
                faults.server_error_status = _status_field(body, "server_error_status", 500, (500, 503))
            if "day_limit_exhausted" in body:
                faults.day_limit_exhausted = bool_field(body, "day_limit_exhausted", False)
            if "latency_ms" in body:
                faults.latency_ms = number_field(body, "latency_ms", 0.0)
            return json_response(200, self._faults_state())

        return await _control(action)()

    def _faults_state(self) -> dict[str, Any]:
        return {(key or "*"): faults.as_dict() for key, faults in self.faults.items()}

    async def _control_stats(self, request: Request) -> Response:
        return json_response(
            200,
            {
                "total": self.stats["total"]["requests"],
                "by_path": dict(self.stats["by_path"]),
                "by_status": dict(self.stats["by_status"]),
                "oauth": dict(self.oauth.stats),
                "faults": self._faults_state(),
                "apps": {cid: {"day_count": a.day_count, "key_mode": a.key_mode} for cid, a in self.apps.items()},
            },
        )
