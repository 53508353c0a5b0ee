"""Xero's webhooks from the sandbox: one subscription per app, intent-to-receive, thin signed events.

As in Xero (``docs/providers/xero.md``, Webhooks), a webhook belongs to an app and carries events of every
organisation connected to it; each delivery is ``{"events": [...], "firstEventSequence",
"lastEventSequence", "entropy"}`` signed ``x-xero-signature`` = base64 HMAC-SHA256(webhook key, body).
Events are thin (``resourceUrl``, ``resourceId``, ``eventDateUtc`` without ``Z``, ``eventType`` CREATE or
UPDATE, ``eventCategory``, ``tenantId``, ``tenantType``): voids, deletes and archives are UPDATEs.

Subscribing runs Xero's intent-to-receive check first: a few empty-events payloads, some correctly and
some incorrectly signed, each of which must be answered 200 or 401 respectively. Until it passes the
subscription stays disabled (no events are sent); ``POST …/{id}/intent-to-receive`` runs it again.
Failed deliveries are retried with decreasing frequency for about 24 hours (``XERO_RETRY_DELAYS``,
overridable per subscription and compressed by ``time_scale``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import string
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio.to_thread
import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import ControlError, control_endpoint, read_json_object
from nextcrm_sandbox.oauth import json_response
from nextcrm_sandbox.webhooks import Signer, Subscription, WebhookOutbox, webhook_control_routes

__all__ = ["XERO_RETRY_DELAYS", "Change", "XeroWebhooks", "xero_signature"]

# Retried "with decreasing frequency for up to 24 h": 1 min, 5 min, 15 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h
# (23.85 h in all), after which the delivery is given up.
XERO_RETRY_DELAYS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 28800)
# Xero wants an answer within 5 s.
RESPONSE_TIMEOUT = 5.0
# How many events one delivery carries at most [unverified: Xero does not publish its batch size].
EVENTS_PER_DELIVERY = 100
API_BASE = "https://api.xero.com/api.xro/2.0"
_RESOURCES = {"INVOICE": "Invoices", "CONTACT": "Contacts"}


@dataclass(frozen=True)
class Change:
    """One changed record of an organisation: what an event reports."""

    category: str  # INVOICE or CONTACT
    record_id: str
    event_type: str  # CREATE or UPDATE
    at_ms: int  # when it changed (unix milliseconds)


@dataclass
class IntentCheck:
    """One intent-to-receive delivery: how it was signed and what the receiver answered."""

    signed: str  # "correctly" or "incorrectly"
    expected: int
    status: int | None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == self.expected


@dataclass
class _Hook:
    """What Xero keeps of one subscription beyond delivery: its app and its intent-to-receive outcome."""

    app: str
    key: str = field(repr=False)
    status: str = "pending"
    checks: list[IntentCheck] = field(default_factory=list)


def xero_signature(key: str, body: bytes) -> str:
    """``x-xero-signature``: base64 of HMAC-SHA256 over the exact body bytes with the webhook key."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def _sign(key: str, body: bytes, unix_now: int) -> dict[str, str]:
    return {"x-xero-signature": xero_signature(key, body)}


def _signer(key: str) -> Signer:
    # A partial of a module function, not a closure: subscriptions are saved with the sandbox's state.
    return partial(_sign, key)


def _event_date(ms: int) -> str:
    """``2024-06-21T01:15:39.902``: UTC with milliseconds and no zone, as Xero writes it."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _entropy(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(20))


class XeroWebhooks:
    """The Xero emulator's webhook subscriptions (keyed by app), their checks and the events it sends."""

    def __init__(
        self,
        clock: Callable[[], int],
        app_of_tenant: Callable[[str], str | None],
        known_app: Callable[[str], bool],
        *,
        time_scale: float = 1.0,
    ) -> None:
        self.outbox = WebhookOutbox("xero", clock, retry_delays=XERO_RETRY_DELAYS, time_scale=time_scale,
                                    disable_when_given_up=True)  # fmt: skip
        self._app_of_tenant = app_of_tenant
        self._known_app = known_app
        self._hooks: dict[str, _Hook] = {}
        self._sequence: dict[str, int] = {}
        self._random = random.Random()
        self._lock = threading.Lock()

    # --- events -------------------------------------------------------------------------------------------

    def changed(self, tenant_id: str, changes: Iterable[Change]) -> int:
        """Send the app's subscribers the events of these changes; returns how many deliveries were queued."""
        app = self._app_of_tenant(tenant_id)
        events = [
            {
                "resourceUrl": f"{API_BASE}/{_RESOURCES[c.category]}/{c.record_id}",
                "resourceId": c.record_id,
                "eventDateUtc": _event_date(c.at_ms),
                "eventType": c.event_type,
                "eventCategory": c.category,
                "tenantId": tenant_id,
                "tenantType": "ORGANISATION",
            }
            for c in changes
        ]
        if app is None or not events or not self.outbox.subscriptions(app):
            return 0
        queued = 0
        for start in range(0, len(events), EVENTS_PER_DELIVERY):
            chunk = events[start : start + EVENTS_PER_DELIVERY]
            with self._lock:
                first = self._sequence.get(app, 0) + 1
                self._sequence[app] = first + len(chunk) - 1
                entropy = _entropy(self._random)
            body = {"events": chunk, "firstEventSequence": first, "lastEventSequence": first + len(chunk) - 1,
                    "entropy": entropy}  # fmt: skip
            queued += self.outbox.emit(app, orjson.dumps(body))
        return queued

    # --- subscriptions ------------------------------------------------------------------------------------

    def _signer_for(self, body: Mapping[str, Any]) -> tuple[str, Signer]:
        key = body.get("key")
        if not isinstance(key, str) or not key:
            raise ControlError(400, "key (the app's webhook key) must be a non-empty string")
        app = body.get("client_id")
        if app is None and body.get("tenant") is not None:
            app = self._app_of_tenant(str(body["tenant"]).lower())
            if app is None:
                raise ControlError(404, f"no tenant {body['tenant']!r}")
        if not isinstance(app, str) or not self._known_app(app):
            raise ControlError(400, "client_id must name a registered app (or tenant one of its organisations)")
        return app, _signer(key)

    def _subscription(self, sub_id: str) -> tuple[Subscription, _Hook]:
        sub = next((s for s in self.outbox.subscriptions() if s.id == sub_id), None)
        hook = self._hooks.get(sub_id)
        if sub is None or hook is None:
            raise ControlError(404, f"no webhook subscription {sub_id!r}")
        return sub, hook

    def intent_to_receive(self, sub_id: str) -> None:
        """Xero's check of a new or re-enabled subscription: the receiver must answer 200 to every correctly
        signed empty payload and 401 to every incorrectly signed one; only then are events sent."""
        sub, hook = self._subscription(sub_id)
        key, url = hook.key, sub.url
        rng = random.Random(f"xero-itr:{sub_id}:{len(hook.checks)}")
        pattern = [True, True, False, False, rng.random() < 0.5]
        rng.shuffle(pattern)
        checks = []
        with httpx.Client(timeout=RESPONSE_TIMEOUT) as client:
            for correct in pattern:
                body = orjson.dumps({"events": [], "lastEventSequence": 0, "firstEventSequence": 0,
                                     "entropy": _entropy(rng)})  # fmt: skip
                signing_key = key if correct else f"{key}-{_entropy(rng)}"
                headers = {"content-type": "application/json", "user-agent": "nextcrm-sandbox-xero/1.0",
                           "x-xero-signature": xero_signature(signing_key, body)}  # fmt: skip
                check = IntentCheck("correctly" if correct else "incorrectly", 200 if correct else 401, None)
                try:
                    check.status = client.post(url, content=body, headers=headers).status_code
                except httpx.HTTPError as exc:
                    check.error = type(exc).__name__
                checks.append(check)
        hook.checks = checks
        hook.status = "OK" if all(c.passed for c in checks) else "failed"
        sub.enabled = hook.status == "OK"

    def describe(self, sub_id: str) -> dict[str, Any]:
        """The subscription as the control API shows it (never its key)."""
        sub, hook = self._subscription(sub_id)
        return {
            "id": sub.id,
            "client_id": hook.app,
            "url": sub.url,
            "status": hook.status,
            "enabled": sub.enabled,
            "retry_delays": list(sub.retry_delays),
            "intent_to_receive": [
                {"signed": c.signed, "expected": c.expected, "status": c.status, "error": c.error, "passed": c.passed}
                for c in hook.checks
            ],
        }

    # --- control API --------------------------------------------------------------------------------------

    def routes(self, prefix: str) -> list[BaseRoute]:
        """The shared webhook control routes under ``{prefix}/webhooks``, subscribing through the intent check.

        ``POST {prefix}/webhooks`` takes ``{"url", "key", "client_id" | "tenant", "duplicate_rate"?, "hold"?,
        "retry_delays"?}`` and answers the subscription with its ``status`` (``OK`` or ``failed``);
        ``GET …/{id}`` shows it; ``POST …/{id}/intent-to-receive`` runs the check again.
        """
        base = f"{prefix}/webhooks"
        shared = webhook_control_routes(prefix, self.outbox, self._signer_for)
        subscribe_route = next(r for r in shared if isinstance(r, Route) and r.path == base)
        shared_subscribe = subscribe_route.endpoint

        async def subscribe(request: Request) -> Response:
            answer: Response = await shared_subscribe(request)
            if answer.status_code != 200:
                return answer
            created = orjson.loads(answer.body)
            sub = next(s for s in self.outbox.subscriptions() if s.id == created["id"])
            sub.enabled = False  # nothing is sent before the intent-to-receive check passes
            self._hooks[sub.id] = _Hook(app=created["account"], key=(await read_json_object(request))["key"])
            await anyio.to_thread.run_sync(self.intent_to_receive, sub.id)
            return json_response(200, self.describe(sub.id))

        async def show(request: Request) -> dict[str, Any]:
            return self.describe(request.path_params["sub_id"])

        async def recheck(request: Request) -> dict[str, Any]:
            sub, hook = self._subscription(request.path_params["sub_id"])
            body = await read_json_object(request)
            if "key" in body:  # the app's webhook key was reset
                key = body["key"]
                if not isinstance(key, str) or not key:
                    raise ControlError(400, "key (the app's webhook key) must be a non-empty string")
                hook.key, sub.sign = key, _signer(key)
            await anyio.to_thread.run_sync(self.intent_to_receive, sub.id)
            return self.describe(sub.id)

        return [
            Route(base, control_endpoint(subscribe), methods=["POST"]),
            *(r for r in shared if r is not subscribe_route),
            Route(f"{base}/{{sub_id}}", control_endpoint(show), methods=["GET"]),
            Route(f"{base}/{{sub_id}}/intent-to-receive", control_endpoint(recheck), methods=["POST"]),
        ]
