"""``StripeSandbox``: the accounts by API key with their runtime state (token bucket, faults, statistics,
idempotency records), the ``/v1`` routes and the control API under ``/_sandbox/stripe``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
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
    control_endpoint,
    optional_int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.stripe.account import StripeAccount, _RequestInfo
from nextcrm_sandbox.stripe.data import _Rng
from nextcrm_sandbox.stripe.model import (
    _DAY,
    API_VERSION,
    IDEMPOTENCY_TTL_SECONDS,
    RESOURCES,
    StripeError,
    mask_api_key,
)
from nextcrm_sandbox.stripe.params import _as_list, _check_params, parse_bracket_params
from nextcrm_sandbox.stripe.search import SEARCHABLE
from nextcrm_sandbox.stripe.webhooks import _WEBHOOK_FIELDS, WEBHOOK_RETRY_DELAYS, _signer
from nextcrm_sandbox.webhooks import Signer, WebhookOutbox, webhook_control_routes


class _TokenBucket:
    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def __reduce__(self) -> tuple[Any, ...]:
        # Saved with the sandbox's state (``sandbox.state``) as a full bucket: ``last`` is on this boot's
        # monotonic clock, which a restored process (perhaps after a reboot) does not share.
        return _TokenBucket, (self.rate,)

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        t = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class _Faults:
    rate_limit_burst: int = 0
    server_errors: int = 0
    latency_ms: float = 0.0
    fail_after_requests: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate_limit_burst": self.rate_limit_burst,
            "server_errors": self.server_errors,
            "latency_ms": self.latency_ms,
            "fail_after_requests": self.fail_after_requests,
        }


@dataclass(slots=True)
class _Idempotent:
    fingerprint: str
    status: int
    body: bytes
    stored_at: int
    request_id: str


@dataclass(slots=True)
class _Runtime:
    account: StripeAccount
    spec: dict[str, Any]
    bucket: _TokenBucket
    faults: _Faults = field(default_factory=_Faults)
    requests: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    stripe_version: str | None = None
    stripe_account: str | None = None
    idempotency: dict[str, _Idempotent] = field(default_factory=dict)


_REQ_RNG = _Rng()
_JSON = "application/json"
_RATE_LIMIT_BODY = orjson.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Request rate limit exceeded. You can learn more about rate limits here "
            "https://stripe.com/docs/rate-limits.",
        }
    }
)
_SERVER_ERROR_BODY = orjson.dumps(
    {
        "error": {
            "type": "api_error",
            "message": "An unknown error occurred (injected by the sandbox). Retrying may succeed.",
        }
    }
)
_ACCOUNT_FIELDS = frozenset(
    {"api_key", "seed", "charges", "subscriptions", "customers", "invoices", "days", "requests_per_second", "now"}
)
# Starlette routes a function endpoint for GET only unless told the methods: every API route takes them all.
_ALL_METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]
_RECORD_FIELDS = frozenset({"api_key", "kind", "at", "params", "lines"})
_EXPORTS = ("charges", "subscriptions", "customers", "invoices", "invoiceitems", "payment_intents", "refunds", "prices")
_FAULT_FIELDS = frozenset({"api_key", "rate_limit_burst", "server_errors", "latency_ms", "fail_after_requests"})


def _request_id() -> str:
    return "req_" + _REQ_RNG.text(14)


def _api_key_from(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


def _json_response(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers={"content-type": _JSON})


def _control_days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value * _DAY >= 1:
        raise ControlError(400, "days must be a number > 0 (fractions of a day are allowed)")
    return value


class StripeSandbox:
    """All emulated Stripe accounts of one sandbox server, keyed by API key, plus their HTTP behaviour.

    ``clock`` returns the sandbox's current unix time; mutations stamp events with it and the events
    feed keeps 30 days relative to it. ``webhooks`` delivers the events mutations create to the
    subscriptions of their account.
    """

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self.clock: Callable[[], int] = clock or (lambda: int(time.time()))
        self._runtime: dict[str, _Runtime] = {}
        self.webhooks = WebhookOutbox("stripe", self.clock, retry_delays=WEBHOOK_RETRY_DELAYS)
        # api key -> {outbox key: the event types it receives, None for all}
        self._webhook_keys: dict[str, dict[str, frozenset[str] | None]] = {}

    # --- accounts ---------------------------------------------------------------------------------------

    @staticmethod
    def normalise_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a control-API account body and fill the defaults (``now`` only when given)."""
        unknown = set(spec) - _ACCOUNT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
        key = spec.get("api_key")
        if not isinstance(key, str) or not key:
            raise ControlError(400, "api_key must be a non-empty string")
        charges = optional_int_field(spec, "charges", 1000)
        rps = spec.get("requests_per_second")
        if rps is None:
            rps = 100 if key.startswith("sk_live_") else 25
        if isinstance(rps, bool) or not isinstance(rps, (int, float)) or rps < 0:
            raise ControlError(400, "requests_per_second must be a number >= 0")
        out = {
            "api_key": key,
            "seed": optional_int_field(spec, "seed", 0, minimum=None),
            "charges": charges,
            "subscriptions": optional_int_field(spec, "subscriptions", 100),
            "customers": optional_int_field(spec, "customers", None, minimum=1),
            "invoices": optional_int_field(spec, "invoices", None),
            "days": _control_days(spec.get("days", 90)),
            "requests_per_second": rps,
        }
        if spec.get("now") is not None:
            out["now"] = optional_int_field(spec, "now", None, minimum=None)
        return out

    def add_account(self, spec: Mapping[str, Any]) -> tuple[StripeAccount, str]:
        """Create (or keep, when identical, or replace) an account; returns it and the outcome word."""
        norm = self.normalise_spec(spec)
        return self._install(norm, self._build(norm))

    def _build(self, norm: Mapping[str, Any]) -> StripeAccount | None:
        current = self._runtime.get(norm["api_key"])
        if current is not None and current.spec == norm:
            return None
        return StripeAccount(
            norm["api_key"],
            seed=norm["seed"],
            charges=norm["charges"],
            subscriptions=norm["subscriptions"],
            customers=norm["customers"],
            invoices=norm.get("invoices"),
            days=norm["days"],
            now=norm.get("now", self.clock()),
        )

    def _install(self, norm: dict[str, Any], account: StripeAccount | None) -> tuple[StripeAccount, str]:
        key = norm["api_key"]
        current = self._runtime.get(key)
        if account is None and current is not None:
            return current.account, "unchanged"
        assert account is not None
        if key in self._webhook_keys:
            account.on_event = partial(self._deliver, key)
        self._runtime[key] = _Runtime(account=account, spec=norm, bucket=_TokenBucket(norm["requests_per_second"]))
        return account, "created" if current is None else "replaced"

    def account(self, api_key: str) -> StripeAccount | None:
        """The account for a key, if any."""
        rt = self._runtime.get(api_key)
        return rt.account if rt else None

    def accounts(self) -> list[StripeAccount]:
        """All accounts."""
        return [rt.account for rt in self._runtime.values()]

    # --- API --------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The ``/v1`` API routes and the ``/_sandbox/stripe`` control routes (no catch-all)."""
        routes: list[BaseRoute] = []
        # Every method reaches the dispatcher, which answers what it does not emulate with Stripe's 404.
        for res in RESOURCES:
            routes.append(Route(f"/v1/{res}", self._endpoint(res, False), methods=_ALL_METHODS))
            routes.append(Route(f"/v1/{res}/{{oid}}", self._endpoint(res, True), methods=_ALL_METHODS))
        routes += [
            Route("/v1/invoices/{oid}/{action}", self._endpoint("invoices", True), methods=_ALL_METHODS),
            Route("/v1/payment_intents/{oid}/{action}", self._endpoint("payment_intents", True), methods=_ALL_METHODS),
            Route("/v1/account", self._endpoint("account", False), methods=_ALL_METHODS),
            Route("/v1/accounts/{oid}", self._endpoint("account", True), methods=_ALL_METHODS),
            Route("/_sandbox/stripe/accounts", self._control_accounts, methods=["GET", "POST"]),
            Route("/_sandbox/stripe/records", self._control_records, methods=["POST"]),
            Route("/_sandbox/stripe/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route("/_sandbox/stripe/export/{kind}", self._control_export, methods=["GET"]),
            Route("/_sandbox/stripe/stats", self._control_stats, methods=["GET"]),
            *webhook_control_routes("/_sandbox/stripe", self.webhooks, self._webhook_subscriber),
        ]
        return routes

    def close(self) -> None:
        """Stop the webhook delivery thread (undelivered events are dropped)."""
        self.webhooks.close()

    # --- webhooks ---------------------------------------------------------------------------------------

    def _webhook_subscriber(self, body: dict[str, Any]) -> tuple[str, Signer]:
        """Read a subscription's Stripe fields: the account's api key, the endpoint secret (or the old and
        new secrets during a roll), ``enabled_events`` (``["*"]`` by default) and ``timestamp_offset``."""
        reject_unknown_fields(body, _WEBHOOK_FIELDS, "webhook subscription")
        api_key = body.get("api_key")
        rt = self._runtime_for(api_key)
        secrets = body.get("secret")
        secrets = [secrets] if isinstance(secrets, str) else secrets
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) and s for s in secrets):
            raise ControlError(400, "secret must be the endpoint's signing secret (whsec_...) or a list of them")
        enabled = body.get("enabled_events", ["*"])
        if not isinstance(enabled, list) or not enabled or not all(isinstance(e, str) and e for e in enabled):
            raise ControlError(400, 'enabled_events must be a non-empty list of event types, or ["*"]')
        offset = optional_int_field(body, "timestamp_offset", 0, minimum=None)
        types = None if "*" in enabled else frozenset(enabled)
        key = api_key if types is None else f"{api_key}:{','.join(sorted(types))}"
        self._webhook_keys.setdefault(api_key, {})[key] = types
        rt.account.on_event = partial(self._deliver, api_key)
        return key, _signer(tuple(secrets), offset)

    def _deliver(self, api_key: str, event_type: str, body: bytes) -> None:
        for key, types in self._webhook_keys[api_key].items():
            if types is None or event_type in types:
                self.webhooks.emit(key, body)

    def fallback_routes(self) -> list[BaseRoute]:
        """Catch-alls under ``/v1`` and ``/v2`` answering Stripe's 404 ``Unrecognized request URL`` with its
        error envelope, whatever the method; mount last."""

        async def unknown(request: Request) -> Response:
            return await self._serve(request, None, None)

        return [
            Route(path, unknown, methods=_ALL_METHODS) for path in ("/v1", "/v1/{path:path}", "/v2", "/v2/{path:path}")
        ]

    def _endpoint(self, resource: str, with_id: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            oid = request.path_params["oid"] if with_id else None
            return await self._serve(request, resource, oid)

        endpoint.__name__ = f"stripe_{resource}{'_object' if with_id else ''}"
        return endpoint

    async def _serve(self, request: Request, resource: str | None, oid: str | None) -> Response:
        rid = _request_id()
        headers = {"content-type": _JSON, "request-id": rid}
        version = request.headers.get("stripe-version")
        headers["stripe-version"] = version or API_VERSION
        key = _api_key_from(request.headers.get("authorization"))
        if key is None:
            err = StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
            return Response(err.body(), status_code=401, headers=headers)
        rt = self._runtime.get(key)
        if rt is None:
            err = StripeError(401, f"Invalid API Key provided: {mask_api_key(key)}")
            return Response(err.body(), status_code=401, headers=headers)
        rt.requests += 1
        if version:
            rt.stripe_version = version
        acct_header = request.headers.get("stripe-account")
        if acct_header:
            rt.stripe_account = acct_header
        faults = rt.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000.0)
        if faults.rate_limit_burst > 0:
            faults.rate_limit_burst -= 1
            rt.rate_limited += 1
            return Response(_RATE_LIMIT_BODY, 429, headers={**headers, "stripe-should-retry": "true"})
        if faults.server_errors > 0 or (faults.fail_after_requests is not None and faults.fail_after_requests <= 0):
            if faults.server_errors > 0:
                faults.server_errors -= 1
            rt.server_errors += 1
            return Response(_SERVER_ERROR_BODY, 500, headers={**headers, "stripe-should-retry": "true"})
        if not rt.bucket.take():
            rt.rate_limited += 1
            return Response(_RATE_LIMIT_BODY, 429, headers={**headers, "stripe-should-retry": "true"})

        method = request.method
        path = request.scope["path"]
        pairs = parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if method != "GET":
            body = await request.body()
            if body:
                pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        now = self.clock()
        idem_key = request.headers.get("idempotency-key") if method == "POST" else None
        fingerprint = ""
        if idem_key is not None:
            if len(idem_key) > 255:
                err = StripeError(
                    400, "Idempotency-Key must be no longer than 255 characters.", param="Idempotency-Key"
                )
                return Response(err.body(), status_code=400, headers=headers)
            fingerprint = hashlib.sha256(orjson.dumps([method, path, sorted(pairs)])).hexdigest()
            stored = rt.idempotency.get(idem_key)
            if stored is not None and now - stored.stored_at < IDEMPOTENCY_TTL_SECONDS:
                if stored.fingerprint != fingerprint:
                    err = StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they were "
                        f"first used with. Try using a key other than '{idem_key}' if you meant to execute a "
                        "different request.",
                        type="idempotency_error",
                    )
                    return Response(err.body(), status_code=400, headers=headers)
                headers["idempotent-replayed"] = "true"
                headers["original-request"] = stored.request_id
                self._count_success(rt, stored.status)
                return Response(stored.body, status_code=stored.status, headers=headers)
        try:
            params = parse_bracket_params(pairs)
            info = _RequestInfo(rid, idem_key, version)
            action = request.path_params.get("action")
            if resource == "account":
                status, payload = 200, self._account_route(rt.account, method, path, oid or acct_header, params, key)
            else:
                status, payload = 200, self._dispatch(rt.account, method, path, resource, oid, params, now, info,
                                                      action)  # fmt: skip
        except StripeError as err:
            status, payload = err.status, err.body()
        except Exception as exc:  # an emulator bug must still answer with Stripe's envelope
            status = 500
            payload = StripeError(500, f"Internal sandbox error: {exc!r}", type="api_error").body()
        # Stripe keeps the answer of a request that ran, a declined card's 402 included (not a refused parameter).
        if idem_key is not None and (200 <= status < 300 or status == 402):
            rt.idempotency[idem_key] = _Idempotent(fingerprint, status, payload, now, rid)
            if len(rt.idempotency) > 10000:
                cutoff = now - IDEMPOTENCY_TTL_SECONDS
                rt.idempotency = {k: v for k, v in rt.idempotency.items() if v.stored_at >= cutoff}
        self._count_success(rt, status)
        if status == 429 or status >= 500:
            headers["stripe-should-retry"] = "true"
        return Response(payload, status_code=status, headers=headers)

    @staticmethod
    def _count_success(rt: _Runtime, status: int) -> None:
        f = rt.faults.fail_after_requests
        if f is not None and status < 400:
            rt.faults.fail_after_requests = f - 1

    def _dispatch(
        self,
        account: StripeAccount,
        method: str,
        path: str,
        resource: str | None,
        oid: str | None,
        params: dict[str, Any],
        now: int,
        info: _RequestInfo,
        action: str | None = None,
    ) -> bytes:
        if resource is not None and action is not None:
            if method == "POST" and resource == "invoices":
                return account.invoice_action(oid or "", action, params, now=now, request=info)
            if method == "POST" and resource == "payment_intents" and action == "confirm":
                return account.confirm_payment_intent(oid or "", params, now=now, request=info)
            if method == "POST" and resource == "payment_intents" and action == "cancel":
                return account.cancel_payment_intent(oid or "", params, now=now, request=info)
        elif resource is not None:
            if method == "GET":
                if oid is None:
                    return account.list_page(resource, params, now=now)
                if oid == "search" and resource in SEARCHABLE:
                    return account.search(resource, params)
                if oid != "search" and resource == "payment_intents":
                    return account.retrieve_payment_intent(oid, params)
                if oid != "search":
                    return account.retrieve(resource, oid, params, now=now)
            if resource == "payment_intents" and method == "POST" and oid is None:
                return account.create_payment_intent(params, now=now, request=info)
            if resource == "customers":
                if method == "POST":
                    if oid is None:
                        return account.create_customer(params, now=now, request=info)
                    return account.update_customer(oid, params, now=now, request=info)
                if method == "DELETE" and oid is not None:
                    return account.delete_customer(oid, now=now, request=info)
            if resource == "invoices":
                if method == "POST":
                    if oid is None:
                        return account.create_invoice(params, now=now, request=info)
                    return account.update_invoice(oid, params, now=now, request=info)
                if method == "DELETE" and oid is not None:
                    return account.delete_invoice(oid, now=now, request=info)
            if resource == "invoiceitems":
                if method == "POST" and oid is None:
                    return account.create_invoice_item(params, now=now, request=info)
                if method == "DELETE" and oid is not None:
                    return account.delete_invoice_item(oid, now=now, request=info)
            if method == "POST" and oid is None and resource == "charges":
                return account.create_charge(params, now=now, request=info)
            if method == "POST" and oid is None and resource == "refunds":
                return account.create_refund(params, now=now, request=info)
            if resource == "subscriptions" and method == "POST" and oid is None:
                return account.create_subscription(params, now=now, request=info)
            if resource == "subscriptions" and oid is not None:
                if method == "DELETE":
                    return account.cancel_subscription(oid, params, now=now, request=info)
                if method == "POST":
                    return account.update_subscription(oid, params, now=now, request=info)
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help "
            "at https://support.stripe.com/.",
        )

    @staticmethod
    def _account_route(
        account: StripeAccount, method: str, path: str, oid: str | None, params: dict[str, Any], key: str
    ) -> bytes:
        """``GET /v1/account`` and ``GET /v1/accounts/<id>`` (a key check and connectors start there); ``oid`` is the
        id asked for, or the ``Stripe-Account`` a Connect platform acts on (``GET /v1/account`` answers that one)."""
        if method == "GET":
            _check_params(params, frozenset({"expand"}))
            if params.get("expand"):
                raise StripeError(400, f"This property cannot be expanded ({_as_list(params['expand'], 'expand')[0]}).",
                                  param="expand")  # fmt: skip
            return account.account_json() if oid is None else account.retrieve_account(oid, mask_api_key(key))
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help "
            "at https://support.stripe.com/.",
        )

    # --- control API ------------------------------------------------------------------------------------

    @control_endpoint
    async def _control_records(self, request: Request) -> Response:
        """Create a customer or an invoice at a given sandbox time (``at``), through the same code as the API:
        ``{"api_key", "kind": "customer" | "invoice", "at", "params": {form fields}, "lines": [[description,
        unit amount, quantity], ...]}`` (lines for invoices only). Its ``*.created`` event has that time."""
        body = await read_json_object(request)
        reject_unknown_fields(body, _RECORD_FIELDS, "record")
        rt = self._runtime_for(body.get("api_key"))
        kind = body.get("kind")
        at = optional_int_field(body, "at", None, minimum=None)
        at = self.clock() if at is None else at
        params = body.get("params") or {}
        lines = body.get("lines") or []
        if not isinstance(params, dict) or not all(isinstance(v, (str, dict, list)) for v in params.values()):
            raise ControlError(400, "params must be an object of form fields (strings or nested hashes)")
        if not isinstance(lines, list) or not all(
            isinstance(ln, list) and len(ln) == 3 and isinstance(ln[0], str) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ln[1:]) for ln in lines
        ):  # fmt: skip
            raise ControlError(400, "lines must be [description, unit amount, quantity] triples")
        try:
            if kind == "customer":
                blob = rt.account.create_customer(params, now=at)
            elif kind == "invoice":
                blob = rt.account.create_invoice(params, now=at, lines=[tuple(ln) for ln in lines])
            else:
                raise ControlError(400, "kind must be customer or invoice")
        except StripeError as err:
            raise ControlError(400, err.message) from None
        return Response(blob, status_code=200, headers={"content-type": _JSON})

    def _runtime_for(self, api_key: Any) -> _Runtime:
        rt = self._runtime.get(api_key) if isinstance(api_key, str) else None
        if rt is None:
            raise ControlError(404, "unknown api_key")
        return rt

    @staticmethod
    def _account_summary(account: StripeAccount, rt: _Runtime, status: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "api_key": account.api_key,
            "livemode": account.livemode,
            "seed": account.seed,
            "now": account.now,
            "days": account.days,
            "requests_per_second": rt.spec["requests_per_second"],
            **account.counts(),
        }
        if status is not None:
            out["status"] = status
        return out

    @partial(control_endpoint, bad_request=(ValueError,))
    async def _control_accounts(self, request: Request) -> Response:
        if request.method == "GET":
            return _json_response(200, [self._account_summary(rt.account, rt) for rt in self._runtime.values()])
        norm = self.normalise_spec(await read_json_object(request))
        started = time.perf_counter()
        built = await run_in_threadpool(self._build, norm)
        account, status = self._install(norm, built)
        summary = self._account_summary(account, self._runtime[norm["api_key"]], status)
        summary["generation_seconds"] = round(time.perf_counter() - started, 3)
        return _json_response(200, summary)

    @control_endpoint
    async def _control_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            rt = self._runtime_for(request.query_params.get("api_key"))
            rt.faults = _Faults()
            return _json_response(200, rt.faults.as_dict())
        body = await read_json_object(request)
        reject_unknown_fields(body, _FAULT_FIELDS, "fault")
        rt = self._runtime_for(body.get("api_key"))
        f = rt.faults
        if "rate_limit_burst" in body:
            f.rate_limit_burst = optional_int_field(body, "rate_limit_burst", 0) or 0
        if "server_errors" in body:
            f.server_errors = optional_int_field(body, "server_errors", 0) or 0
        if "fail_after_requests" in body:
            f.fail_after_requests = optional_int_field(body, "fail_after_requests", None)
        if "latency_ms" in body:
            latency = body["latency_ms"]
            if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
                raise ControlError(400, "latency_ms must be a number >= 0")
            f.latency_ms = float(latency)
        return _json_response(200, f.as_dict())

    @control_endpoint
    async def _control_export(self, request: Request) -> Response:
        rt = self._runtime_for(request.query_params.get("api_key"))
        kind = request.path_params["kind"]
        if kind not in _EXPORTS:
            raise ControlError(404, f"export kind must be one of {', '.join(_EXPORTS)}")
        return _json_response(200, rt.account.export(kind))

    @control_endpoint
    async def _control_stats(self, request: Request) -> Response:
        rt = self._runtime_for(request.query_params.get("api_key"))
        return _json_response(
            200,
            {
                "requests": rt.requests,
                "rate_limited": rt.rate_limited,
                "server_errors": rt.server_errors,
                "stripe_version": rt.stripe_version,
                "stripe_account": rt.stripe_account,
                "faults": rt.faults.as_dict(),
            },
        )
