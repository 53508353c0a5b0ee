"""``PayPalSandbox``: accounts with their rate limits, faults and statistics, the OAuth token endpoint, the API
routes under ``/paypal/api`` (Transaction Search and balances, Subscriptions and Plans, Payments, Invoicing),
webhook delivery and verification, and the control API under ``/_sandbox/paypal``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import secrets
import threading
import time
import uuid
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
    lookup,
    number_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.oauth import AccessDenied, Grant, OAuthError, OAuthPolicy, OAuthServer, json_response
from nextcrm_sandbox.paypal.account import PayPalAccount
from nextcrm_sandbox.paypal.balances import balances
from nextcrm_sandbox.paypal.certs import AUTH_ALGO, MessageCerts, signed_message
from nextcrm_sandbox.paypal.errors import (
    PayPalError,
    _auth_failure,
    _debug_id,
    _not_authorized,
    _not_available,
    _rate_limited,
    _server_error,
)
from nextcrm_sandbox.paypal.invoicing import query_int
from nextcrm_sandbox.paypal.knobs import DEFAULT_KNOBS, _int_field, normalise_knobs, normalise_spec
from nextcrm_sandbox.paypal.model import (
    _JSON_CT,
    API_PREFIX,
    CONTROL_PREFIX,
    DEFAULT_SCOPES,
    PREFIX,
    SCOPE_BALANCES,
    SCOPE_INVOICING,
    SCOPE_PAYMENTS,
    SCOPE_REFUNDS,
    SCOPE_REPORTING,
    SCOPE_SUBSCRIPTIONS,
    SCOPE_VERIFY_WEBHOOKS,
    SCOPE_WEBHOOKS,
    TERMINATE_PATH,
    TOKEN_PATH,
    _random_id,
    parse_time,
    stamp,
)
from nextcrm_sandbox.paypal.params import _in_range, _schema_int, _time_param
from nextcrm_sandbox.paypal.plans import (
    PLAN_ACTIONS,
    _invalid,
    create_plan,
    patch_plan,
    plan_action,
    plan_summary,
    update_pricing,
)
from nextcrm_sandbox.paypal.webhooks import (
    _EVENT_SUMMARIES,
    _SUBSCRIPTION_ACTIONS,
    _WEBHOOK_FIELDS,
    EVENTS_KEPT,
    WEBHOOK_RETRY_DELAYS,
    _Hook,
    _verify_request,
)
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

    def take(self, limit: int, length: float, now: float) -> float | None:
        """Count one request; ``None`` if allowed, else seconds until the window resets."""
        if not limit:
            return None
        if now - self.start >= length:
            self.start = now
            self.count = 0
        if self.count >= limit:
            return self.start + length - now
        self.count += 1
        return None


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    retry_after: int = 1
    latency_ms: float = 0.0
    token_errors: int = 0
    data_unavailable: int = 0

    def active(self) -> bool:
        return bool(
            self.server_errors or self.rate_limited or self.latency_ms or self.token_errors or self.data_unavailable
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "retry_after": self.retry_after,
            "latency_ms": self.latency_ms,
            "token_errors": self.token_errors,
            "data_unavailable": self.data_unavailable,
        }


@dataclass
class _Runtime:
    account: PayPalAccount
    window: _Window = field(default_factory=_Window)
    requests: int = 0
    throttled: int = 0
    tokens: int = 0
    searches: int = 0


_CHANGE_FIELDS = ("transactions", "refunds", "subscription_updates", "cancels", "plan_updates", "invoices",
                  "invoice_payments", "invoice_cancels")  # fmt: skip


async def _paypal_json(request: Request) -> dict[str, Any]:
    """A request's JSON object body (``{}`` when empty); PayPal's 400 ``MALFORMED_REQUEST_JSON`` otherwise."""
    raw = await request.body()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise PayPalError(
            400,
            "MALFORMED_REQUEST_JSON",
            "The request JSON is not well formed.",
            [{"issue": "MALFORMED_REQUEST_JSON", "description": "The request JSON is not well formed."}],
        )
    return body


_FAULT_FIELDS = frozenset(
    {
        "account",
        "server_errors",
        "server_error_status",
        "rate_limited",
        "retry_after",
        "latency_ms",
        "token_errors",
        "data_unavailable",
    }
)
_control = partial(control_endpoint, bad_request=(ValueError, KeyError, TypeError))


def _render_error(err: PayPalError) -> Response:
    debug_id = _debug_id()
    return Response(
        orjson.dumps(err.body(debug_id)),
        status_code=err.status,
        headers={"content-type": _JSON_CT, "paypal-debug-id": debug_id, **err.headers},
    )


def _ok(payload: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status,
        headers={"content-type": _JSON_CT, "paypal-debug-id": _debug_id()},
    )


class PayPalSandbox:
    """PayPal API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=DEFAULT_KNOBS["token_ttl"],
            refresh_idle_ttl=None,
            rotate=False,
            client_auth=frozenset({"basic"}),
            pkce=False,
            token_type="Bearer",
        )
        self.oauth = OAuthServer(
            clock,
            policy,
            extra_token_fields=self._token_extras,
            client_credentials_subject=self._subject,
            access_token_factory=self._new_token,
            access_ttl_for=self._ttl_for,
        )
        self._runtime: dict[str, _Runtime] = {}
        self._by_client: dict[str, str] = {}
        self._token_clients: dict[str, str] = {}  # access token -> client id
        self._lock = threading.Lock()
        self._faults: dict[str | None, _Faults] = {}
        self.stats: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.certs = MessageCerts()
        self.webhooks = WebhookOutbox("paypal", clock, retry_delays=WEBHOOK_RETRY_DELAYS)
        self._hooks: dict[str, _Hook] = {}  # webhook id -> subscription
        self._events: dict[str, dict[str, bytes]] = {}  # account id -> event id -> the body as sent
        self._public: str | None = None  # this server's base URL, learnt from the requests it serves

    def __getstate__(self) -> dict[str, Any]:
        """The saved state (``sandbox.state``) without this server's base URL: a restarted server learns its own."""
        return {**self.__dict__, "_public": None}

    # --- accounts -----------------------------------------------------------------------------------------

    def account(self, account_id: str) -> PayPalAccount | None:
        """The account with this merchant id, if any."""
        rt = self._runtime.get(account_id)
        return rt.account if rt else None

    def add_account(self, body: Mapping[str, Any]) -> PayPalAccount:
        """Generate an account from a spec and install it (replacing one with the same id or client)."""
        account = PayPalAccount(normalise_spec(body), now=self.clock())
        self._install(account)
        return account

    def _install(self, account: PayPalAccount) -> None:
        with self._lock:
            old = self._by_client.get(account.client_id)
            if old is not None and old != account.id:
                self._runtime.pop(old, None)
            for client_id in [c for c, aid in self._by_client.items() if aid == account.id]:
                del self._by_client[client_id]
            self._runtime[account.id] = _Runtime(account)
            self._by_client[account.client_id] = account.id
        account.on_event = partial(self._emit, account.id)
        self.oauth.register_client(account.client_id, account.client_secret)

    def _summary(self, account: PayPalAccount) -> dict[str, Any]:
        return {
            "id": account.id,
            "account_number": account.id,
            "client_id": account.client_id,
            "app_id": account.app_id,
            "base_path": API_PREFIX,
            "token_path": TOKEN_PATH,
            "counts": account.counts(),
            "invoices": len(account.invoicing.invoices),
            "orders": len(account.checkout.orders),
            "knobs": account.knobs,
            "currencies": account.currencies,
        }

    def _account_of_client(self, client_id: str) -> PayPalAccount | None:
        aid = self._by_client.get(client_id)
        return self.account(aid) if aid else None

    # --- OAuth --------------------------------------------------------------------------------------------

    def _subject(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        aid = self._by_client.get(client_id)
        return {"account": aid} if aid else {}

    def _new_token(self, grant: Grant, expires_at: int) -> str:
        token = "A21AA" + secrets.token_urlsafe(69)
        self._token_clients[token] = grant.client_id
        return token

    def _ttl_for(self, grant: Grant) -> int:
        account = self._account_of_client(grant.client_id)
        return int(account.knobs["token_ttl"]) if account else DEFAULT_KNOBS["token_ttl"]

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> dict[str, Any]:
        account = self._account_of_client(grant.client_id)
        scopes = account.knobs["scopes"] if account else list(DEFAULT_SCOPES)
        nonce = stamp(self.clock()) + secrets.token_urlsafe(32)[:43]
        return {"scope": " ".join(scopes), "app_id": account.app_id if account else "", "nonce": nonce}

    @staticmethod
    def _basic_client(authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            return base64.b64decode(authorization[6:].strip()).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None

    async def _token(self, request: Request) -> Response:
        """``POST /v1/oauth2/token``: client credentials with HTTP Basic."""
        route = "POST /v1/oauth2/token"
        authorization = request.headers.get("authorization")
        client_id = self._basic_client(authorization)
        account = self._account_of_client(client_id) if client_id else None
        rt = self._runtime.get(account.id) if account else None
        if rt is not None:
            faults = self._fault_for(rt.account.id)
            if faults is not None:
                if faults.latency_ms:
                    await asyncio.sleep(faults.latency_ms / 1000)
                if faults.token_errors > 0:
                    faults.token_errors -= 1
                    return self._error(_server_error(500), route, rt)
            wait = rt.window.take(
                rt.account.knobs["requests_per_minute"], rt.account.knobs["minute_seconds"], time.monotonic()
            )
            if wait is not None:
                rt.throttled += 1
                return self._error(_rate_limited(math.ceil(wait)), route, rt)
            rt.requests += 1
        body = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        grant_type = form.get("grant_type")
        try:
            if grant_type is not None and grant_type != "client_credentials":
                self.oauth.authenticate_client(form, authorization)
                raise OAuthError("unsupported_grant_type", "Grant Type is not supported", 400)
            if grant_type is None:
                self.oauth.authenticate_client(form, authorization)
                raise OAuthError("unsupported_grant_type", "Grant Type is NULL", 400)
            payload = self.oauth.token(form, authorization)
        except OAuthError as err:
            description = "Client Authentication failed" if err.error == "invalid_client" else err.description
            self._count(route, err.status)
            return json_response(
                err.status,
                {"error": err.error, "error_description": description},
                {"paypal-debug-id": _debug_id()},
            )
        if rt is not None:
            rt.tokens += 1
        ordered = {k: payload[k] for k in ("scope", "access_token", "token_type", "app_id", "expires_in", "nonce")}
        self._count(route, 200)
        return json_response(200, ordered, {"paypal-debug-id": _debug_id(), "cache-control": "no-store"})

    async def _terminate(self, request: Request) -> Response:
        """``POST /v1/oauth2/token/terminate``: revoke an access token with the app's Basic credentials."""
        route = "POST /v1/oauth2/token/terminate"
        try:
            client = self.oauth.authenticate_client({}, request.headers.get("authorization"))
        except OAuthError as err:
            self._count(route, err.status)
            return json_response(err.status, {"error": err.error, "error_description": "Client Authentication failed"})
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        token = form.get("token", "")
        self.oauth.revoke(token, client.client_id)
        self._count(route, 200)
        return Response(b"", status_code=200)

    # --- API ----------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """API routes under ``/paypal/api`` and control routes under ``/_sandbox/paypal``."""
        return [self._remembering(route) for route in self._routes()]

    def _remembering(self, route: BaseRoute) -> BaseRoute:
        """The route, noting this server's base URL from its first request (webhook certificate URLs)."""
        if not isinstance(route, Route):
            return route
        endpoint = route.endpoint

        async def noted(request: Request) -> Response:
            if self._public is None:
                self._public = str(request.base_url).rstrip("/")
            return await endpoint(request)

        noted.__name__ = getattr(endpoint, "__name__", "endpoint")
        return Route(route.path, noted, methods=sorted((route.methods or {"GET"}) - {"HEAD"}), name=route.name)

    def _routes(self) -> list[BaseRoute]:
        api = f"{API_PREFIX}/v1"
        events = f"{api}/notifications/webhooks-events"
        control = CONTROL_PREFIX
        return [
            Route(TOKEN_PATH, self._token, methods=["POST"]),
            Route(TERMINATE_PATH, self._terminate, methods=["POST"]),
            Route(f"{api}/reporting/transactions", self._api("transactions"), methods=["GET"]),
            Route(f"{api}/reporting/balances", self._api("balances"), methods=["GET"]),
            Route(f"{api}/billing/subscriptions", self._api("subscriptions"), methods=["GET"]),
            Route(f"{api}/billing/subscriptions/{{sid}}", self._api("subscription"), methods=["GET"]),
            Route(
                f"{api}/billing/subscriptions/{{sid}}/transactions",
                self._api("subscription_transactions"),
                methods=["GET"],
            ),
            Route(f"{api}/billing/plans", self._api("plans"), methods=["GET"]),
            Route(f"{api}/billing/plans", self._plan_create, methods=["POST"]),
            Route(f"{api}/billing/plans/{{pid}}", self._api("plan"), methods=["GET"]),
            Route(f"{api}/billing/plans/{{pid}}", self._plan_change, methods=["PATCH"]),
            Route(f"{api}/billing/plans/{{pid}}/{{action}}", self._plan_change, methods=["POST"]),
            Route(f"{api}/billing/subscriptions/{{sid}}/{{action}}", self._subscription_action, methods=["POST"]),
            Route(f"{API_PREFIX}/v2/checkout/orders", self._orders_api, methods=["POST"]),
            Route(f"{API_PREFIX}/v2/checkout/orders/{{oid}}", self._orders_api, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/checkout/orders/{{oid}}/{{action}}", self._orders_api, methods=["POST"]),
            Route(f"{PREFIX}/checkoutnow", self._checkoutnow, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/payments/captures/{{capture_id}}", self._payments_api, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/payments/captures/{{capture_id}}/refund", self._payments_api, methods=["POST"]),
            Route(f"{api}/payments/sale/{{sale_id}}", self._payments_api, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/invoicing/search-invoices", self._invoicing_api, methods=["POST"]),
            Route(f"{API_PREFIX}/v2/invoicing/invoices", self._invoicing_api, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/invoicing/invoices/{{iid}}", self._invoicing_api, methods=["GET", "DELETE"]),
            Route(f"{API_PREFIX}/v2/invoicing/invoices/{{iid}}/{{action}}", self._invoicing_api, methods=["POST"]),
            Route(f"{api}/notifications/certs/{{name}}", self._cert, methods=["GET"]),
            Route(f"{api}/notifications/verify-webhook-signature", self._verify_signature, methods=["POST"]),
            Route(f"{api}/notifications/webhooks", self._webhooks_api, methods=["GET", "POST"]),
            Route(f"{api}/notifications/webhooks/{{webhook_id}}", self._webhooks_api, methods=["GET", "DELETE"]),
            Route(events, self._webhook_events_api, methods=["GET"]),
            Route(f"{events}/{{event_id}}", self._webhook_events_api, methods=["GET"]),
            Route(f"{events}/{{event_id}}/resend", self._webhook_events_api, methods=["POST"]),
            Route(f"{API_PREFIX}/{{rest:path}}", self._unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            *self.oauth.control_routes(control),
            Route(f"{control}/accounts", _control(self._c_accounts), methods=["GET", "POST"]),
            Route(f"{control}/accounts/{{aid}}", _control(self._c_account), methods=["GET"]),
            Route(f"{control}/accounts/{{aid}}/changes", _control(self._c_changes), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/records", _control(self._c_records), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/bulk", _control(self._c_bulk), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/orders/{{oid}}/approve", _control(self._c_approve), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/knobs", _control(self._c_knobs), methods=["PATCH"]),
            Route(f"{control}/accounts/{{aid}}/expire-tokens", _control(self._c_expire), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/export/{{entity}}", _control(self._c_export), methods=["GET"]),
            Route(f"{control}/faults", _control(self._c_faults), methods=["POST", "DELETE"]),
            Route(f"{control}/stats", _control(self._c_stats), methods=["GET"]),
            Route(f"{control}/webhook-ca", _control(self._c_webhook_ca), methods=["GET"]),
            Route(f"{control}/webhook-certs", _control(self._c_webhook_certs), methods=["POST"]),
            Route(f"{control}/webhook-signatures", _control(self._c_webhook_signature), methods=["POST"]),
            *webhook_control_routes(control, self.webhooks, self._webhook_subscriber),
        ]

    _ROUTES = {
        "transactions": ("GET /v1/reporting/transactions", SCOPE_REPORTING),
        "balances": ("GET /v1/reporting/balances", SCOPE_BALANCES),
        "subscriptions": ("GET /v1/billing/subscriptions", SCOPE_SUBSCRIPTIONS),
        "subscription": ("GET /v1/billing/subscriptions/{id}", SCOPE_SUBSCRIPTIONS),
        "subscription_transactions": ("GET /v1/billing/subscriptions/{id}/transactions", SCOPE_SUBSCRIPTIONS),
        "plans": ("GET /v1/billing/plans", SCOPE_SUBSCRIPTIONS),
        "plan": ("GET /v1/billing/plans/{id}", SCOPE_SUBSCRIPTIONS),
    }

    def _api(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, kind)

        endpoint.__name__ = f"paypal_{kind}"
        return endpoint

    async def _unknown(self, request: Request) -> Response:
        self._count(f"{request.method} (unknown)", 404)
        return _render_error(PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist."))

    def _count(self, route: str, status: int) -> None:
        self.stats["requests"] += 1
        self.by_route[route] += 1
        self.by_status[str(status)] += 1

    def _error(self, err: PayPalError, route: str, rt: _Runtime | None) -> Response:
        self._count(route, err.status)
        return _render_error(err)

    def _fault_for(self, account_id: str) -> _Faults | None:
        for key in (account_id, None):
            f = self._faults.get(key)
            if f is not None and f.active():
                return f
        return None

    def _authenticate(self, request: Request) -> _Runtime:
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied as denied:
            if denied.reason == "expired":
                token = request.headers.get("authorization", "")[7:].strip()
                account = self._account_of_client(self._token_clients.get(token, ""))
                style = account.knobs["expired_token_error"] if account else DEFAULT_KNOBS["expired_token_error"]
                if style == "invalid_token":
                    raise _InvalidToken() from None
            raise _auth_failure() from None
        account = self._account_of_client(grant.client_id)
        rt = self._runtime.get(account.id) if account else None
        if rt is None:
            raise _auth_failure()
        return rt

    async def _admit(self, request: Request, route: str, scope: str) -> _Runtime | Response:
        """Authenticate a call and apply the account's faults, rate limit and scopes; a ``Response`` refuses it."""
        try:
            rt = self._authenticate(request)
        except _InvalidToken:
            self._count(route, 401)
            return json_response(
                401,
                {"error": "invalid_token", "error_description": "Access Token not found in cache"},
                {"paypal-debug-id": _debug_id()},
            )
        except PayPalError as err:
            return self._error(err, route, None)
        account = rt.account
        faults = self._fault_for(account.id)
        if faults is not None:
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            if faults.server_errors > 0:
                faults.server_errors -= 1
                return self._error(_server_error(faults.server_error_status), route, rt)
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                rt.throttled += 1
                return self._error(_rate_limited(faults.retry_after), route, rt)
        wait = rt.window.take(account.knobs["requests_per_minute"], account.knobs["minute_seconds"], time.monotonic())
        if wait is not None:
            rt.throttled += 1
            return self._error(_rate_limited(math.ceil(wait)), route, rt)
        rt.requests += 1
        if scope not in account.knobs["scopes"]:
            return self._error(_not_authorized(), route, rt)
        return rt

    async def _serve(self, request: Request, kind: str) -> Response:
        route, scope = self._ROUTES[kind]
        admitted = await self._admit(request, route, scope)
        if isinstance(admitted, Response):
            return admitted
        rt = admitted
        account = rt.account
        faults = self._fault_for(account.id)
        base_url = str(request.base_url).rstrip("/") + API_PREFIX
        params = dict(request.query_params)
        try:
            if kind == "transactions":
                rt.searches += 1
                if faults is not None and faults.data_unavailable > 0:
                    faults.data_unavailable -= 1
                    raise _not_available()
                now = self.clock()
                payload = await run_in_threadpool(account.search, params, now, base_url)
            elif kind == "balances":
                with account.lock:
                    payload = balances(account, params, self.clock())
            elif kind == "subscription":
                with account.lock:
                    payload = account.subscription(request.path_params["sid"], base_url, params.get("fields"))
            elif kind == "subscription_transactions":
                with account.lock:
                    payload = account.subscription_transactions(request.path_params["sid"], params, base_url)
            elif kind == "subscriptions":
                if not account.knobs["list_subscriptions"]:
                    raise PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.")
                with account.lock:
                    payload = account.list_subscriptions(params, base_url)
            elif kind == "plans":
                with account.lock:
                    payload = account.list_plans(params, request.headers.get("prefer", "return=minimal"), base_url)
            else:
                with account.lock:
                    payload = account.plan(request.path_params["pid"], base_url)
        except PayPalError as err:
            return self._error(err, route, rt)
        self._count(route, 200)
        return _ok(payload)

    # --- payments and subscription actions --------------------------------------------------------------

    async def _payments_api(self, request: Request) -> Response:
        """``GET /v2/payments/captures/{id}``, ``POST …/{id}/refund``, ``GET /v1/payments/sale/{id}``."""
        path = request.url.path
        refund = request.method == "POST"
        if "/v1/payments/sale/" in path:
            route, scope = "GET /v1/payments/sale/{id}", SCOPE_PAYMENTS
        elif refund:
            route, scope = "POST /v2/payments/captures/{id}/refund", SCOPE_REFUNDS
        else:
            route, scope = "GET /v2/payments/captures/{id}", SCOPE_PAYMENTS
        admitted = await self._admit(request, route, scope)
        if isinstance(admitted, Response):
            return admitted
        account, base_url = admitted.account, self._base_url(request)
        status = 200
        try:
            with account.lock:
                if "/v1/payments/sale/" in path:
                    payload = account.sale(request.path_params["sale_id"], base_url)
                elif refund:
                    body = await _paypal_json(request)
                    status, payload = account.refund_capture(request.path_params["capture_id"], body,
                                                             request.headers.get("paypal-request-id"), self.clock(),
                                                             base_url)  # fmt: skip
                else:
                    payload = account.capture(request.path_params["capture_id"], base_url)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, status)
        return _ok(payload, status)

    async def _subscription_action(self, request: Request) -> Response:
        """``POST /v1/billing/subscriptions/{id}/suspend|activate|cancel`` with an optional ``reason``."""
        action = request.path_params["action"]
        route = f"POST /v1/billing/subscriptions/{{id}}/{action}"
        if action not in _SUBSCRIPTION_ACTIONS:
            return await self._unknown(request)
        admitted = await self._admit(request, route, SCOPE_SUBSCRIPTIONS)
        if isinstance(admitted, Response):
            return admitted
        try:
            body = await _paypal_json(request)
            reason = body.get("reason")
            if reason is not None and (not isinstance(reason, str) or len(reason) > 128):
                raise _invalid("/reason", "INVALID_STRING_MAX_LENGTH", "The value of a field is too long.")
            with admitted.account.lock:
                admitted.account.subscription_action(request.path_params["sid"], action,
                                                     str(reason) if reason else None, self.clock())  # fmt: skip
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 204)
        return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})

    @staticmethod
    def _representation(request: Request) -> bool:
        return "return=representation" in request.headers.get("prefer", "").replace(" ", "").lower()

    async def _plan_create(self, request: Request) -> Response:
        """``POST /v1/billing/plans``: 201 with the plan (minimal unless ``Prefer: return=representation``), or 200
        with the first answer for a repeated ``PayPal-Request-Id``."""
        route = "POST /v1/billing/plans"
        admitted = await self._admit(request, route, SCOPE_SUBSCRIPTIONS)
        if isinstance(admitted, Response):
            return admitted
        account, key, now = admitted.account, request.headers.get("paypal-request-id"), self.clock()
        try:
            body = await _paypal_json(request)
            with account.lock:
                replays = account.checkout.replays
                status, payload = 200, replays.get("plans.create", key, "", now, account.checkout.ttl)
                if payload is None:
                    pid = create_plan(account, body, now)
                    base_url = self._base_url(request)
                    view = account.plan if self._representation(request) else partial(plan_summary, account)
                    status, payload = 201, view(pid, base_url)
                    replays.keep("plans.create", key, "", now, payload)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, status)
        return _ok(payload, status)

    async def _orders_api(self, request: Request) -> Response:
        """Orders v2: ``POST /v2/checkout/orders``, ``GET …/{id}`` and ``POST …/{id}/capture``."""
        oid, action = request.path_params.get("oid"), request.path_params.get("action")
        route = "POST /v2/checkout/orders" if oid is None else "GET /v2/checkout/orders/{id}"
        if action is not None:
            if action != "capture":
                return await self._unknown(request)
            route = "POST /v2/checkout/orders/{id}/capture"
        admitted = await self._admit(request, route, SCOPE_PAYMENTS)
        if isinstance(admitted, Response):
            return admitted
        account, base_url, now = admitted.account, self._base_url(request), self.clock()
        key, full = request.headers.get("paypal-request-id"), self._representation(request)
        status = 200
        try:
            if oid is None or action is not None:
                body = await _paypal_json(request)
                with account.lock:
                    if oid is None:
                        status, payload = account.checkout.create(body, key, full, now, base_url)
                    else:
                        status, payload = account.checkout.capture(oid, key, full, now, base_url)
            else:
                with account.lock:
                    payload = account.checkout.view(account.checkout.get(oid), base_url)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, status)
        return _ok(payload, status)

    async def _checkoutnow(self, request: Request) -> Response:
        """``GET /paypal/checkoutnow?token=<order id>``: the approve link, where a payer of the account approves."""
        route = "GET /checkoutnow"
        order_id = request.query_params.get("token", "")
        for rt in self._runtime.values():
            if order_id in rt.account.checkout.orders:
                try:
                    with rt.account.lock:
                        rt.account.checkout.approve(order_id, None, self.clock(), self._base_url(request))
                except PayPalError as err:
                    return self._error(err, route, rt)
                self._count(route, 200)
                return Response(f"<p>Order {order_id} approved.</p>", headers={"content-type": "text/html"})
        self._count(route, 404)
        return Response("<p>This order cannot be found.</p>", status_code=404, headers={"content-type": "text/html"})

    async def _plan_change(self, request: Request) -> Response:
        """``POST /v1/billing/plans/{id}/activate|deactivate|update-pricing-schemes`` and ``PATCH …/{id}`` (204)."""
        action = request.path_params.get("action")
        route = "PATCH /v1/billing/plans/{id}" if action is None else f"POST /v1/billing/plans/{{id}}/{action}"
        if action is not None and action not in (*PLAN_ACTIONS, "update-pricing-schemes"):
            return await self._unknown(request)
        admitted = await self._admit(request, route, SCOPE_SUBSCRIPTIONS)
        if isinstance(admitted, Response):
            return admitted
        account, pid = admitted.account, request.path_params["pid"]
        try:
            if action is None:
                try:
                    operations = orjson.loads(await request.body())
                except orjson.JSONDecodeError:
                    operations = None
                with account.lock:
                    patch_plan(account, pid, operations, self.clock())
            else:
                body = await _paypal_json(request)
                with account.lock:
                    if action == "update-pricing-schemes":
                        update_pricing(account, pid, body, self.clock())
                    else:
                        plan_action(account, pid, action, self.clock())
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 204)
        return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})

    _INVOICE_ACTIONS = ("send", "remind", "cancel", "payments", "refunds")

    async def _invoicing_api(self, request: Request) -> Response:
        """Invoicing v2: ``POST /v2/invoicing/search-invoices``, ``GET /v2/invoicing/invoices``, ``GET``/``DELETE
        …/invoices/{id}`` and ``POST …/{id}/send|remind|cancel|payments|refunds``."""
        iid, action = request.path_params.get("iid"), request.path_params.get("action")
        if request.url.path.endswith("/search-invoices"):
            route = "POST /v2/invoicing/search-invoices"
        else:
            route = f"{request.method} /v2/invoicing/invoices" + ("/{id}" if iid else "") + (f"/{action}" if action
                                                                                             else "")  # fmt: skip
        if action is not None and action not in self._INVOICE_ACTIONS:
            return await self._unknown(request)
        admitted = await self._admit(request, route, SCOPE_INVOICING)
        if isinstance(admitted, Response):
            return admitted
        account, base_url, params = admitted.account, self._base_url(request), request.query_params
        status, payload = 200, None
        try:
            if route.endswith("search-invoices"):
                query_int(params, "page", 1, 1, 1000)
                query_int(params, "page_size", 20, 1, 100)
                criteria = await _paypal_json(request)
                with account.lock:
                    payload = account.invoicing.search(params, criteria, base_url)
            elif iid is None:
                with account.lock:
                    payload = account.invoicing.list(params, base_url)
            elif action is None and request.method == "GET":
                with account.lock:
                    payload = account.invoicing.full(account.invoicing.get(iid), base_url)
            elif action is None:
                with account.lock:
                    account.invoicing.delete(iid)
                status = 204
            else:
                body = await _paypal_json(request)
                with account.lock:
                    if action == "send":
                        sent = account.invoicing.full(account.invoicing.send(iid, self.clock()), base_url)
                        view = sent["detail"]["metadata"].get("recipient_view_url", "")
                        payload = {"href": view, "rel": "payer-view", "method": "GET"}
                    elif action in ("cancel", "remind"):
                        change = account.invoicing.cancel if action == "cancel" else account.invoicing.remind
                        change(iid, self.clock())
                        status = 204
                    elif action == "payments":
                        payload = account.invoicing.record_payment(iid, body, self.clock())
                    else:
                        payload = account.invoicing.record_refund(iid, body, self.clock())
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, status)
        if status == 204:
            return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})
        return _ok(payload, status)

    # --- webhooks -----------------------------------------------------------------------------------------

    def _api_base(self) -> str:
        return f"{self._public or 'http://127.0.0.1'}{API_PREFIX}"

    def _cert_url(self, name: str) -> str:
        return f"{self._api_base()}/v1/notifications/certs/{name}"

    def sign(self, body: bytes, webhook_id: str, now: int, cert: str | None = None) -> dict[str, str]:
        """The headers PayPal sends with ``body`` for ``webhook_id`` at ``now``: a fresh transmission id and
        time, their signature by the certificate's key, its URL here, and the algorithm."""
        name = cert or self.certs.default()
        transmission_id, at = str(uuid.uuid4()), stamp(now)
        signature = self.certs.sign(name, signed_message(transmission_id, at, webhook_id, body))
        return {"PAYPAL-TRANSMISSION-ID": transmission_id, "PAYPAL-TRANSMISSION-TIME": at,
                "PAYPAL-TRANSMISSION-SIG": signature, "PAYPAL-CERT-URL": self._cert_url(name),
                "PAYPAL-AUTH-ALGO": AUTH_ALGO}  # fmt: skip

    def _sign_hook(self, webhook_id: str, body: bytes, now: int) -> dict[str, str]:
        hook = self._hooks.get(webhook_id)
        return self.sign(body, webhook_id, now, hook.cert if hook else None)

    def _signer(self, webhook_id: str) -> Signer:
        # A partial of a method, not a closure: subscriptions are saved with the sandbox's state.
        return partial(self._sign_hook, webhook_id)

    def _new_hook(self, account_id: str, url: str, webhook_id: str | None, event_types: Any,
                  cert: str | None = None) -> _Hook:  # fmt: skip
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ControlError(400, "url must be an http(s) URL")
        if webhook_id is None:
            webhook_id = _random_id(17)
        if not isinstance(webhook_id, str) or not re.fullmatch(r"[A-Za-z0-9]{1,50}", webhook_id):
            raise ControlError(400, "webhook_id must be 1 to 50 letters and digits")
        if webhook_id in self._hooks:
            raise ControlError(400, f"webhook {webhook_id} exists already")
        types = event_types if event_types is not None else ["*"]
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types):
            raise ControlError(400, 'event_types must be a non-empty list of event types, or ["*"]')
        if cert is not None and cert not in self.certs.certs:
            raise ControlError(400, f"no certificate {cert!r} (mint one with POST {CONTROL_PREFIX}/webhook-certs)")
        hook = _Hook(webhook_id, account_id, url, None if "*" in types else frozenset(types), cert)
        self._hooks[webhook_id] = hook
        return hook

    def _webhook_subscriber(self, body: dict[str, Any]) -> tuple[str, Signer]:
        """Read a control subscription's PayPal fields: ``account``, ``webhook_id`` (assigned when absent),
        ``event_types`` (``["*"]`` by default) and ``cert`` (a minted certificate to sign with)."""
        reject_unknown_fields(body, _WEBHOOK_FIELDS, "webhook subscription")
        account_id = str(body.get("account", ""))
        self._rt(account_id)
        hook = self._new_hook(account_id, body.get("url"), body.get("webhook_id"), body.get("event_types"),
                              body.get("cert"))  # fmt: skip
        return hook.key, self._signer(hook.webhook_id)

    def _emit(self, account_id: str, event_type: str, resource_type: str,
              build: Callable[[str], dict[str, Any]]) -> None:  # fmt: skip
        """Send an event about a change to every webhook of the account that wants its type."""
        hooks = [h for h in self._hooks.values() if h.account == account_id and h.wants(event_type)]
        if not hooks:
            return
        base = self._api_base()
        event_id = f"WH-{_random_id(17)}-{_random_id(17)}"
        resource = build(base)
        event = {
            "id": event_id,
            "event_version": "1.0",
            "create_time": stamp(self.clock()),
            "resource_type": resource_type,
            "resource_version": "1.0" if event_type.startswith("PAYMENT.SALE.") else "2.0",
            "event_type": event_type,
            "summary": _EVENT_SUMMARIES.get(event_type, event_type.replace(".", " ").capitalize()),
            "resource": resource,
            "links": [
                {"href": f"{base}/v1/notifications/webhooks-events/{event_id}", "rel": "self", "method": "GET"},
                {"href": f"{base}/v1/notifications/webhooks-events/{event_id}/resend", "rel": "resend",
                 "method": "POST"},
            ],
        }  # fmt: skip
        body = orjson.dumps(event)
        kept = self._events.setdefault(account_id, {})
        kept[event_id] = body
        if len(kept) > EVENTS_KEPT:
            del kept[next(iter(kept))]
        for hook in hooks:
            self.webhooks.emit(hook.key, body)

    def close(self) -> None:
        """Stop the webhook delivery thread (undelivered events are dropped)."""
        self.webhooks.close()

    async def _cert(self, request: Request) -> Response:
        """``GET /v1/notifications/certs/{name}``: a signing certificate (PEM), public like PayPal's."""
        route = "GET /v1/notifications/certs/{name}"
        cert = self.certs.certs.get(request.path_params["name"])
        if cert is None:
            self._count(route, 404)
            return _render_error(PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist."))
        self._count(route, 200)
        return Response(cert.pem, headers={"content-type": "application/x-pem-file"})

    async def _verify_signature(self, request: Request) -> Response:
        """``POST /v1/notifications/verify-webhook-signature``: PayPal's own check, over ``webhook_event``
        serialised again (so an event whose bytes differ from what was signed fails, as at PayPal)."""
        route = "POST /v1/notifications/verify-webhook-signature"
        admitted = await self._admit(request, route, SCOPE_VERIFY_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        try:
            body = _verify_request(await _paypal_json(request))
        except PayPalError as err:
            return self._error(err, route, admitted)
        hook = self._hooks.get(body["webhook_id"])
        name = body["cert_url"].rsplit("/", 1)[-1]
        message = signed_message(body["transmission_id"], body["transmission_time"], body["webhook_id"],
                                 orjson.dumps(body["webhook_event"]))  # fmt: skip
        genuine = (
            hook is not None
            and hook.account == admitted.account.id
            and body["auth_algo"] == AUTH_ALGO
            and body["cert_url"] == self._cert_url(name)
            and self.certs.genuine(name, message, body["transmission_sig"])
        )
        self._count(route, 200)
        return _ok({"verification_status": "SUCCESS" if genuine else "FAILURE"})

    def _webhook_object(self, hook: _Hook) -> dict[str, Any]:
        href = f"{self._api_base()}/v1/notifications/webhooks/{hook.webhook_id}"
        types = ["*"] if hook.event_types is None else sorted(hook.event_types)
        return {
            "id": hook.webhook_id,
            "url": hook.url,
            "event_types": [{"name": t, "description": _EVENT_SUMMARIES.get(t, "ALL")} for t in types],
            "links": [
                {"href": href, "rel": "self", "method": "GET"},
                {"href": href, "rel": "update", "method": "PATCH"},
                {"href": href, "rel": "delete", "method": "DELETE"},
            ],
        }

    async def _webhooks_api(self, request: Request) -> Response:
        """``POST``/``GET /v1/notifications/webhooks`` and ``GET``/``DELETE …/{webhook_id}``: the app's webhooks."""
        wid = request.path_params.get("webhook_id")
        route = f"{request.method} /v1/notifications/webhooks" + ("/{id}" if wid else "")
        admitted = await self._admit(request, route, SCOPE_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        account = admitted.account
        mine = {w: h for w, h in self._hooks.items() if h.account == account.id}
        try:
            if wid is not None:
                hook = mine.get(wid)
                if hook is None:
                    raise PayPalError(404, "INVALID_RESOURCE_ID", "Resource id is invalid.")
                if request.method == "GET":
                    self._count(route, 200)
                    return _ok(self._webhook_object(hook))
                for sub in self.webhooks.subscriptions(hook.key):
                    self.webhooks.unsubscribe(sub.id)
                del self._hooks[wid]
                self._count(route, 204)
                return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})
            if request.method == "GET":
                self._count(route, 200)
                return _ok({"webhooks": [self._webhook_object(h) for h in mine.values()]})
            body = await _paypal_json(request)
            url, types = body.get("url"), body.get("event_types")
            if len(mine) >= 10:
                raise PayPalError(400, "WEBHOOK_NUMBER_LIMIT_EXCEEDED", "Maximum number of webhooks exceeded.")
            if any(h.url == url for h in mine.values()):
                raise PayPalError(400, "WEBHOOK_URL_ALREADY_EXISTS", "Webhook URL already exists.")
            names = [t.get("name") if isinstance(t, dict) else None for t in types] if isinstance(types, list) else []
            if not names or not all(isinstance(n, str) for n in names):
                issue = {"field": "event_types", "issue": "Event types must be a non-empty list of {name}."}
                raise PayPalError(400, "VALIDATION_ERROR", "Invalid data provided.", [issue])
            try:
                hook = self._new_hook(account.id, url, None, names)
            except ControlError as err:
                raise PayPalError(
                    400, "VALIDATION_ERROR", "Invalid data provided.", [{"field": "url", "issue": err.message}]
                ) from None
            self.webhooks.subscribe(hook.key, hook.url, self._signer(hook.webhook_id))
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 201)
        return _ok(self._webhook_object(hook), 201)

    async def _webhook_events_api(self, request: Request) -> Response:
        """``GET /v1/notifications/webhooks-events`` (newest first, ``page_size``, ``event_type``,
        ``start_time``/``end_time``), ``GET …/{id}`` and ``POST …/{id}/resend``."""
        eid = request.path_params.get("event_id")
        resend = request.url.path.endswith("/resend")
        suffix = ("/{id}" if eid else "") + ("/resend" if resend else "")
        route = f"{request.method} /v1/notifications/webhooks-events{suffix}"
        admitted = await self._admit(request, route, SCOPE_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        events = self._events.get(admitted.account.id, {})
        try:
            if eid is None:
                params = request.query_params
                size = _schema_int(params, "page_size", 10, 1, 300)
                start, end = _time_param(params, "start_time"), _time_param(params, "end_time")
                found = []
                for body in reversed(list(events.values())):
                    event = orjson.loads(body)
                    if params.get("event_type") and event["event_type"] != params["event_type"]:
                        continue
                    if not _in_range(parse_time(event["create_time"]), (start, end)):
                        continue
                    found.append(event)
                self._count(route, 200)
                return _ok({"events": found[:size], "count": min(size, len(found)), "links": []})
            body = events.get(eid)
            if body is None:
                raise PayPalError(404, "INVALID_RESOURCE_ID", "Resource id is invalid.")
            if not resend:
                self._count(route, 200)
                return Response(body, headers={"content-type": _JSON_CT, "paypal-debug-id": _debug_id()})
            event = orjson.loads(body)
            wanted = (await _paypal_json(request)).get("webhook_ids")
            for hook in list(self._hooks.values()):
                if hook.account == admitted.account.id and (not wanted or hook.webhook_id in wanted):
                    self.webhooks.emit(hook.key, body)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 202)
        return _ok(event, 202)

    # --- control API --------------------------------------------------------------------------------------

    def _rt(self, account_id: str) -> _Runtime:
        return lookup(self._runtime, account_id, "account")

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + API_PREFIX

    async def _c_accounts(self, request: Request) -> Any:
        if request.method == "GET":
            return [self._summary(rt.account) for rt in self._runtime.values()]
        spec = normalise_spec(await read_json_object(request))
        started = time.perf_counter()
        now = self.clock()
        account = await run_in_threadpool(lambda: PayPalAccount(spec, now=now))
        self._install(account)
        return {**self._summary(account), "generation_seconds": round(time.perf_counter() - started, 3)}

    async def _c_account(self, request: Request) -> Any:
        return self._summary(self._rt(request.path_params["aid"]).account)

    async def _c_changes(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        reject_unknown_fields(body, _CHANGE_FIELDS, "change")
        changes = {k: _int_field(body, k, 0) or 0 for k in _CHANGE_FIELDS}
        return account.apply_changes(changes, self.clock())

    async def _c_records(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        entity = str(body.get("entity", "")).lower().rstrip("s")
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        at = body.get("at")
        if at is None:
            at = self.clock()
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            raise ControlError(400, "at must be unix seconds")
        return account.add_record(entity, fields, int(at), self.clock(), self._base_url(request))

    async def _c_bulk(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        count = _int_field(body, "count", None, 0)
        if count is None or not isinstance(body.get("day"), str):
            raise ControlError(400, 'bulk needs {"day": "YYYY-MM-DD", "count": n}')
        started = time.perf_counter()
        result = await run_in_threadpool(account.bulk, body["day"], count)
        return {**result, "generation_seconds": round(time.perf_counter() - started, 3)}

    async def _c_approve(self, request: Request) -> Any:
        """The payer approves an order, as on its approve link: ``{"payer_id"}`` (a payer of the account) or any."""
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        reject_unknown_fields(body, {"payer_id"}, "approval")
        payer = body.get("payer_id")
        try:
            with account.lock:
                return account.checkout.approve(request.path_params["oid"], str(payer) if payer else None,
                                                self.clock(), self._base_url(request))  # fmt: skip
        except PayPalError as err:
            issue = err.details[0]["issue"] if err.details else err.message
            raise ControlError(err.status, f"{err.name}: {issue}") from None

    async def _c_knobs(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        if "date_style" in body:
            raise ControlError(400, "date_style is fixed when the account is created")
        account.knobs = normalise_knobs(body, account.knobs)
        return {"id": account.id, "knobs": account.knobs}

    async def _c_expire(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        expired = 0
        for grant in list(self.oauth.grants.values()):
            if grant.client_id == account.client_id:
                expired += self.oauth.expire_access_tokens(grant.id)
        return {"id": account.id, "expired": expired}

    async def _c_export(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        entity = request.path_params["entity"].lower()
        if not entity.endswith("s"):
            entity += "s"
        visible = request.query_params.get("visible", "").lower() in ("1", "true", "yes")
        return await run_in_threadpool(account.export, entity, self.clock(), self._base_url(request), visible)

    async def _c_faults(self, request: Request) -> Any:
        if request.method == "DELETE":
            return clear_scoped_faults(self._faults, request.query_params.get("account"))
        body = await read_json_object(request)
        reject_unknown_fields(body, _FAULT_FIELDS, "fault")
        target = body.get("account")
        if target is not None:
            self._rt(str(target))
            target = str(target)
        f = self._faults.setdefault(target, _Faults())
        for name in ("server_errors", "rate_limited", "token_errors", "data_unavailable"):
            if name in body:
                setattr(f, name, _int_field(body, name, 0) or 0)
        if "retry_after" in body:
            f.retry_after = _int_field(body, "retry_after", 1, 1) or 1
        if "server_error_status" in body:
            status = body["server_error_status"]
            if status not in (500, 502, 503, 504):
                raise ControlError(400, "server_error_status must be 500, 502, 503 or 504")
            f.server_error_status = status
        if "latency_ms" in body:
            f.latency_ms = number_field(body, "latency_ms", 0.0)
        return {"account": target, **f.as_dict()}

    async def _c_webhook_ca(self, request: Request) -> Any:
        """The CA a sandbox connection trusts for webhook certificates (its ``webhook_ca_pem`` setting)."""
        return {"pem": await run_in_threadpool(self.certs.ca_pem)}

    async def _c_webhook_certs(self, request: Request) -> Any:
        """Mint and publish a certificate: ``{"kind": "valid" | "expired" | "untrusted" | "wrong_cn"}``."""
        body = await read_json_object(request)
        reject_unknown_fields(body, {"kind"}, "certificate")
        cert = await run_in_threadpool(self.certs.mint, str(body.get("kind", "valid")))
        return {"name": cert.name, "kind": cert.kind, "cert_url": self._cert_url(cert.name)}

    async def _c_webhook_signature(self, request: Request) -> Any:
        """The headers a delivery of ``body`` (text, or ``body_base64``) to ``webhook_id`` would carry, signed
        at ``at`` (default now) by the genuine certificate or a minted ``cert``; for tests that forge."""
        body = await read_json_object(request)
        reject_unknown_fields(body, {"body", "body_base64", "webhook_id", "cert", "at"}, "signature")
        if isinstance(body.get("body_base64"), str):
            raw = base64.b64decode(body["body_base64"])
        elif isinstance(body.get("body"), str):
            raw = body["body"].encode()
        else:
            raise ControlError(400, "give the delivery's body as body (text) or body_base64")
        webhook_id, cert = body.get("webhook_id"), body.get("cert")
        if not isinstance(webhook_id, str) or not webhook_id:
            raise ControlError(400, "webhook_id is required")
        if cert is not None and cert not in self.certs.certs:
            raise ControlError(404, f"no certificate {cert!r}")
        at = _int_field(body, "at", None, 0)
        now = self.clock() if at is None else at
        return {"headers": await run_in_threadpool(self.sign, raw, webhook_id, now, cert)}

    async def _c_stats(self, request: Request) -> Any:
        return {
            "requests": self.stats["requests"],
            "by_route": dict(self.by_route),
            "by_status": dict(self.by_status),
            "accounts": {
                aid: {
                    "requests": rt.requests,
                    "throttled": rt.throttled,
                    "tokens": rt.tokens,
                    "searches": rt.searches,
                }
                for aid, rt in self._runtime.items()
            },
            "faults": {str(k): f.as_dict() for k, f in self._faults.items()},
            "oauth": self.oauth.control_state()["stats"],
        }


class _InvalidToken(Exception):
    """An expired token answered the ``invalid_token`` way."""
