"""Mautic's webhooks from the sandbox: contact events, signed over PHP's JSON bytes, sent the way Mautic sends them.

As in Mautic (``docs/providers/mautic.md``, Webhooks), a webhook belongs to one installation, names the event types it
wants and has a secret. A body is ``{"<event type>": [{...payload..., "timestamp": "<ISO-8601>"}, ...]}`` encoded as
PHP's ``json_encode`` writes it (compact, ``/`` as ``\\/``, non-ASCII as ``\\uXXXX``), and each request carries
``Webhook-Signature`` = base64(HMAC-SHA256(secret, those bytes)) and ``X-Origin-Base-URL``. Delivery modes:

- ``immediate`` (Mautic's default): one event per request, sent as the change happens; any answer other than 2xx,
  or a transport error, drops it (no retry);
- ``queue`` (``queue_mode`` = command): events wait for the cron run ``mautic:webhooks:process``
  (``POST …/webhooks/process``), which sends them in bodies of up to ``webhook_limit`` (default 10) in
  ``order`` (``ASC`` by default); a body that got any HTTP answer is done, one that met a transport error is
  sent again at the next runs (``QUEUE_RETRY_DELAYS``, or the subscription's ``retry_delays``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    control_endpoint,
    int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.mautic.model import php_json
from nextcrm_sandbox.oauth import json_response
from nextcrm_sandbox.webhooks import Signer, WebhookOutbox, webhook_control_routes

__all__ = ["EVENT_TYPES", "QUEUE_RETRY_DELAYS", "MauticWebhooks", "mautic_signature"]

# Every webhook trigger Mautic 5 offers (LeadBundle, EmailBundle, FormBundle, PageBundle, SmsBundle subscribers).
EVENT_TYPES: tuple[str, ...] = (
    "mautic.lead_post_save_new",
    "mautic.lead_post_save_update",
    "mautic.lead_post_delete",
    "mautic.lead_points_change",
    "mautic.lead_channel_subscription_changed",
    "mautic.lead_company_change",
    "mautic.company_post_save",
    "mautic.company_post_delete",
    "mautic.email_on_send",
    "mautic.email_on_open",
    "mautic.form_on_submit",
    "mautic.page_on_hit",
    "mautic.sms_on_send",
)
# Queue mode resends a body that met a transport error at each later cron run (every minute here) until the
# webhook has failed `webhook_disable_limit` (100) times.
QUEUE_RETRY_DELAYS: tuple[float, ...] = (60.0,) * 99
WEBHOOK_LIMIT = 10
WEBHOOK_TIMEOUT = 15.0  # `webhook_timeout`
MODES = ("immediate", "queue")
_FIELDS = frozenset(
    {"url", "duplicate_rate", "hold", "retry_delays", "account", "secret", "events", "mode", "webhook_limit",
     "order", "site_url"}
)  # fmt: skip


def mautic_signature(secret: str, body: bytes) -> str:
    """``Webhook-Signature``: base64 of HMAC-SHA256 over the exact body bytes with the webhook's secret."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def _sign(secret: str, site_url: str, body: bytes, unix_now: int) -> dict[str, str]:
    return {"Webhook-Signature": mautic_signature(secret, body), "X-Origin-Base-URL": site_url}


def _signer(secret: str, site_url: str) -> Signer:
    # A partial of a module function, not a closure: subscriptions are saved with the sandbox's state.
    return partial(_sign, secret, site_url)


@dataclass
class _Hook:
    """What Mautic keeps of one webhook beyond delivery: its installation, triggers, mode and queue."""

    account: str
    events: frozenset[str]
    mode: str
    limit: int
    order: str
    site_url: str
    queue: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class MauticWebhooks:
    """The Mautic emulator's webhooks: subscriptions per installation, the events its changes send, the cron run."""

    def __init__(self, clock: Callable[[], int], known_account: Callable[[str], bool], *,
                 time_scale: float = 1.0) -> None:  # fmt: skip
        self.outbox = WebhookOutbox("mautic", clock, retry_delays=(), retry_on_status=False, time_scale=time_scale,
                                    timeout=WEBHOOK_TIMEOUT)  # fmt: skip
        self._known_account = known_account
        self._hooks: dict[str, _Hook] = {}  # outbox key -> hook
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._origin = "http://localhost"

    # --- events -------------------------------------------------------------------------------------------

    def contact_event(self, account: str, kind: str, item: dict[str, Any]) -> int:
        """An installation's change: sent now to its immediate webhooks wanting ``kind``, queued for the others.

        Returns how many deliveries were queued in the outbox.
        """
        with self._lock:
            hooks = [(k, h) for k, h in self._hooks.items() if h.account == account and kind in h.events]
            for _, hook in hooks:
                if hook.mode == "queue":
                    hook.queue.append((kind, item))
        immediate = [key for key, hook in hooks if hook.mode == "immediate"]
        if not immediate:
            return 0
        body = php_json({kind: [item]})
        return sum(self.outbox.emit(key, body) for key in immediate)

    def process(self, account: str | None = None) -> int:
        """``mautic:webhooks:process``: send the queued events of queue-mode webhooks in bodies of ``webhook_limit``
        (of one installation, or all); returns how many bodies went out."""
        sent = 0
        with self._lock:
            batches = []
            for key, hook in self._hooks.items():
                if hook.mode != "queue" or (account is not None and hook.account != account):
                    continue
                queued, hook.queue = hook.queue, []
                if hook.order == "DESC":
                    queued.reverse()
                batches.extend((key, queued[i : i + hook.limit]) for i in range(0, len(queued), hook.limit))
        for key, batch in batches:
            payload: dict[str, list[dict[str, Any]]] = {}
            for kind, item in batch:  # WebhookModel::getWebhookPayload groups a batch by event type
                payload.setdefault(kind, []).append(item)
            self.outbox.emit(key, php_json(payload))
            sent += 1
        return sent

    # --- subscriptions ------------------------------------------------------------------------------------

    def _signer_for(self, body: Mapping[str, Any]) -> tuple[str, Signer]:
        """Read a webhook's Mautic fields: ``account`` (the installation), ``secret``, ``events`` (every type by
        default), ``mode``, ``webhook_limit``, ``order`` and ``site_url`` (the ``X-Origin-Base-URL``)."""
        reject_unknown_fields(body, _FIELDS, "webhook")
        account = body.get("account")
        if not isinstance(account, str) or not self._known_account(account):
            raise ControlError(404 if isinstance(account, str) else 400, f"no Mautic installation {account!r}")
        secret = body.get("secret")
        if not isinstance(secret, str) or not secret:
            raise ControlError(400, "secret (the webhook's secret) must be a non-empty string")
        events = body.get("events", list(EVENT_TYPES))
        if not isinstance(events, list) or not events or any(e not in EVENT_TYPES for e in events):
            raise ControlError(400, f"events must be a non-empty list drawn from {list(EVENT_TYPES)}")
        mode = body.get("mode", "immediate")
        if mode not in MODES:
            raise ControlError(400, f"mode must be one of {list(MODES)}")
        if mode == "immediate" and body.get("retry_delays"):
            raise ControlError(400, "immediate mode never resends; retry_delays apply to queue mode")
        order = str(body.get("order", "ASC")).upper()
        if order not in ("ASC", "DESC"):
            raise ControlError(400, "order must be ASC or DESC")
        site_url = body.get("site_url", f"{self._origin}/mautic/{account}")
        if not isinstance(site_url, str) or not site_url.startswith(("http://", "https://")):
            raise ControlError(400, "site_url must be an http(s) URL")
        hook = _Hook(account, frozenset(events), mode, int_field(body, "webhook_limit", WEBHOOK_LIMIT, 1), order,
                     site_url)  # fmt: skip
        key = f"{account}#{next(self._keys)}"
        with self._lock:
            self._hooks[key] = hook
        return key, _signer(secret, site_url)

    def describe(self, sub_id: str) -> dict[str, Any]:
        """The webhook as the control API shows it (never its secret)."""
        sub = next((s for s in self.outbox.subscriptions() if s.id == sub_id), None)
        hook = self._hooks.get(sub.key) if sub is not None else None
        if sub is None or hook is None:
            raise ControlError(404, f"no webhook subscription {sub_id!r}")
        return {"id": sub.id, "account": hook.account, "url": sub.url, "events": sorted(hook.events),
                "mode": hook.mode, "webhook_limit": hook.limit, "order": hook.order, "site_url": hook.site_url,
                "retry_delays": list(sub.retry_delays), "queued": len(hook.queue)}  # fmt: skip

    # --- control API --------------------------------------------------------------------------------------

    def routes(self, prefix: str) -> list[BaseRoute]:
        """The shared webhook control routes under ``{prefix}/webhooks`` with Mautic's fields, plus the cron run.

        ``POST {prefix}/webhooks`` takes ``{"url", "account", "secret", "events"?, "mode"?, "webhook_limit"?,
        "order"?, "site_url"?, "duplicate_rate"?, "hold"?, "retry_delays"?}``; ``POST …/webhooks/process``
        (``{"account"?}``) runs ``mautic:webhooks:process``; ``GET …/webhooks/{id}`` shows one webhook.
        """
        base = f"{prefix}/webhooks"
        shared = webhook_control_routes(prefix, self.outbox, self._signer_for)
        subscribe_route = next(r for r in shared if isinstance(r, Route) and r.path == base)
        shared_subscribe = subscribe_route.endpoint

        async def subscribe(request: Request) -> Response:
            self._origin = str(request.base_url).rstrip("/")
            answer: Response = await shared_subscribe(request)
            if answer.status_code != 200:
                return answer
            created = orjson.loads(answer.body)
            body = await read_json_object(request)
            sub = next(s for s in self.outbox.subscriptions() if s.id == created["id"])
            if self._hooks[sub.key].mode == "queue" and body.get("retry_delays") is None:
                sub.retry_delays = QUEUE_RETRY_DELAYS
            return json_response(200, self.describe(sub.id))

        async def process(request: Request) -> dict[str, Any]:
            body = await read_json_object(request)
            account = body.get("account")
            if account is not None and (not isinstance(account, str) or not self._known_account(account)):
                raise ControlError(404, f"no Mautic installation {account!r}")
            return {"sent": self.process(account)}

        async def show(request: Request) -> dict[str, Any]:
            return self.describe(request.path_params["sub_id"])

        return [
            Route(base, control_endpoint(subscribe), methods=["POST"]),
            Route(f"{base}/process", control_endpoint(process), methods=["POST"]),
            *(r for r in shared if r is not subscribe_route),
            Route(f"{base}/{{sub_id}}", control_endpoint(show), methods=["GET"]),
        ]

    def close(self) -> None:
        """Stop the delivery thread (undelivered bodies are dropped)."""
        self.outbox.close()
