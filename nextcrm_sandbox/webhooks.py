"""Webhook delivery from the emulators: signed POSTs to subscribed receivers, as the providers send them.

An emulator owns one ``WebhookOutbox``. It subscribes receiver URLs per account (``subscribe``), and
when its data changes it ``emit``s a body for that account. A daemon thread delivers each body to
every subscription: signed at each attempt (a fresh Stripe timestamp per retry), retried on failure
with the provider's schedule (``retry_delays``, scaled by ``time_scale`` so hours become seconds in
tests), and given up after the last attempt (which disables the subscription where the provider
does so). Like the providers, delivery is at least once and in no
promised order: a subscription may send random duplicates (``duplicate_rate``) and hold deliveries to
release them shuffled, newest first, or several times over (``hold`` / ``release``). ``attempts``
records every try, for the tests.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import httpx
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlClient,
    ControlError,
    bool_field,
    control_endpoint,
    int_field,
    number_field,
    read_json_object,
)

__all__ = ["Attempt", "Signer", "WebhookControl", "WebhookOutbox", "webhook_control_routes"]

log = logging.getLogger(__name__)

# sign(body, unix time of the attempt) -> the headers that carry the signature
Signer = Callable[[bytes, int], Mapping[str, str]]
ORDERS = ("as-sent", "newest-first", "shuffled")


@dataclass
class Subscription:
    """One receiver URL for one account, with its signer and delivery knobs."""

    id: str
    key: str
    url: str
    sign: Signer
    retry_delays: tuple[float, ...]
    retry_on_status: bool = True
    duplicate_rate: float = 0.0
    held: list[bytes] | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Attempt:
    """One try at delivering one body: what the receiver answered (or the transport error)."""

    subscription: str
    number: int
    status: int | None
    error: str | None
    at: float


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    subscription: Subscription = field(compare=False)
    body: bytes = field(compare=False)
    number: int = field(default=1, compare=False)


class WebhookOutbox:
    """Background, signed, retried webhook delivery for one emulator."""

    def __init__(
        self,
        provider: str,
        now: Callable[[], int],
        *,
        retry_delays: tuple[float, ...],
        retry_on_status: bool = True,
        time_scale: float = 1.0,
        timeout: float = 10.0,
        seed: int = 0,
        disable_when_given_up: bool = False,
    ) -> None:
        self.provider = provider
        self.disable_when_given_up = disable_when_given_up
        self.now = now
        self.retry_delays = retry_delays
        self.retry_on_status = retry_on_status
        self.time_scale = time_scale
        self.timeout = timeout
        self._random = random.Random(seed)
        self._subscriptions: dict[str, Subscription] = {}
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._in_flight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.attempts: list[Attempt] = []

    # --- subscriptions ---------------------------------------------------------------------------------

    def subscribe(self, key: str, url: str, sign: Signer, *, duplicate_rate: float = 0.0,
                  retry_delays: tuple[float, ...] | None = None) -> str:  # fmt: skip
        """Deliver `key`'s events to `url`, signed by `sign`; returns the subscription id."""
        if not url.startswith(("http://", "https://")):
            raise ValueError("the receiver url must be http(s)")
        sub_id = f"{self.provider}_wh_{next(self._ids)}"
        with self._cond:
            self._subscriptions[sub_id] = Subscription(
                sub_id, key, url, sign, self.retry_delays if retry_delays is None else retry_delays,
                self.retry_on_status, duplicate_rate,
            )  # fmt: skip
        return sub_id

    def unsubscribe(self, sub_id: str) -> None:
        with self._cond:
            if self._subscriptions.pop(sub_id, None) is None:
                raise KeyError(sub_id)

    def subscriptions(self, key: str | None = None) -> list[Subscription]:
        with self._cond:
            return [s for s in self._subscriptions.values() if key is None or s.key == key]

    # --- sending ---------------------------------------------------------------------------------------

    def emit(self, key: str, body: bytes) -> int:
        """Queue `body` for every enabled subscription of `key`; returns how many will receive it."""
        sent = 0
        with self._cond:
            for sub in self._subscriptions.values():
                if sub.key != key or not sub.enabled:
                    continue
                sent += 1
                if sub.held is not None:
                    sub.held.append(body)
                    continue
                copies = 2 if sub.duplicate_rate and self._random.random() < sub.duplicate_rate else 1
                for _ in range(copies):
                    self._push(sub, body, time.monotonic())
            if sent:
                self._start()
        return sent

    def hold(self, sub_id: str) -> None:
        """Keep the subscription's new bodies back until `release` (to reorder or repeat them)."""
        with self._cond:
            sub = self._subscription(sub_id)
            if sub.held is None:
                sub.held = []

    def release(self, sub_id: str, *, order: str = "as-sent", copies: int = 1) -> int:
        """Send the held bodies in `order`, each `copies` times; returns how many bodies were held."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}")
        if copies < 1:
            raise ValueError("copies must be >= 1")
        with self._cond:
            sub = self._subscription(sub_id)
            held, sub.held = sub.held or [], None
            bodies = list(held)
            if order == "newest-first":
                bodies.reverse()
            elif order == "shuffled":
                self._random.shuffle(bodies)
            start = time.monotonic()
            for body in bodies:
                for _ in range(copies):
                    self._push(sub, body, start)
            self._start()
        return len(held)

    def pending(self) -> int:
        """Deliveries queued or being sent (held bodies not counted)."""
        with self._cond:
            return len(self._queue) + self._in_flight

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is queued or being sent (retries included); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)

    # --- saved state (``sandbox.state``) ---------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Subscriptions, queued deliveries (due times relative to now) and attempts, taken under the lock so the
        delivery thread cannot change them meanwhile; a delivery being sent at that moment is not kept."""
        with self._cond:
            state = {k: v for k, v in self.__dict__.items() if k not in ("_cond", "_thread", "_in_flight")}
            now = time.monotonic()
            state["_queue"] = [(d.due - now, d.seq, d.subscription, d.body, d.number) for d in self._queue]
            state["_subscriptions"] = dict(self._subscriptions)
            state["attempts"] = list(self.attempts)
            state["_closed"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        now = time.monotonic()
        queue = [_Delivery(now + max(0.0, left), seq, sub, body, number) for left, seq, sub, body, number in
                 state.pop("_queue")]  # fmt: skip
        self.__dict__.update(state)
        heapq.heapify(queue)
        self._queue = queue
        self._cond = threading.Condition()
        self._thread = None
        self._in_flight = 0

    def resume(self) -> None:
        """Start sending the deliveries a restored outbox holds (once the whole sandbox is back)."""
        with self._cond:
            if self._queue and not self._closed:
                self._start()

    # --- internals -------------------------------------------------------------------------------------

    def _subscription(self, sub_id: str) -> Subscription:
        sub = self._subscriptions.get(sub_id)
        if sub is None:
            raise KeyError(sub_id)
        return sub

    def _push(self, sub: Subscription, body: bytes, due: float, number: int = 1) -> None:
        heapq.heappush(self._queue, _Delivery(due, next(self._seq), sub, body, number))
        self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"{self.provider}-webhooks", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                with self._cond:
                    while not self._closed and (not self._queue or self._queue[0].due > time.monotonic()):
                        wait = self._queue[0].due - time.monotonic() if self._queue else None
                        self._cond.wait(wait if wait is None else max(wait, 0.001))
                    if self._closed:
                        return
                    delivery = heapq.heappop(self._queue)
                    self._in_flight += 1
                try:
                    self._send(client, delivery)
                finally:
                    with self._cond:
                        self._in_flight -= 1
                        self._cond.notify_all()

    def _send(self, client: httpx.Client, delivery: _Delivery) -> None:
        sub = delivery.subscription
        headers = {"content-type": "application/json", "user-agent": f"nextcrm-sandbox-{self.provider}/1.0"}
        headers.update(sub.sign(delivery.body, self.now()))
        status, error = None, None
        try:
            status = client.post(sub.url, content=delivery.body, headers=headers).status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self.attempts.append(Attempt(sub.id, delivery.number, status, error, time.time()))
        delivered = status is not None and 200 <= status < 300
        retryable = error is not None or (status is not None and sub.retry_on_status)
        if delivered or not retryable or delivery.number > len(sub.retry_delays):
            if not delivered:
                log.info("%s webhook to %s given up after %d attempt(s)", self.provider, sub.url, delivery.number)
                if self.disable_when_given_up and retryable:
                    sub.enabled = False  # e.g. Xero disables a subscription whose retries ran out
            return
        delay = sub.retry_delays[delivery.number - 1] * self.time_scale
        with self._cond:
            self._push(sub, delivery.body, time.monotonic() + delay, delivery.number + 1)


def webhook_control_routes(
    prefix: str, outbox: WebhookOutbox, signer_for: Callable[[dict[str, Any]], tuple[str, Signer]]
) -> list[BaseRoute]:
    """The control API of an emulator's webhooks under ``{prefix}/webhooks``.

    ``POST {prefix}/webhooks`` subscribes ``{"url", "duplicate_rate"?, "hold"?, "retry_delays"?, ...}``; the emulator's
    ``signer_for(body)`` reads its own fields (account, secret) and returns (account key, signer).
    ``POST …/{id}/hold`` and ``POST …/{id}/release`` (``{"order", "copies"}``) reorder and repeat;
    ``POST {prefix}/webhooks/flush`` waits until the queue is empty; ``GET {prefix}/webhooks/attempts``
    lists every try; ``DELETE …/{id}`` unsubscribes.
    """

    async def subscribe(request: Request) -> dict[str, Any]:
        body = await read_json_object(request)
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ControlError(400, "url must be an http(s) URL")
        rate = number_field(body, "duplicate_rate", 0.0)
        if rate > 1:
            raise ControlError(400, "duplicate_rate must be between 0 and 1")
        delays = body.get("retry_delays")
        if delays is not None and (
            not isinstance(delays, list)
            or not all(isinstance(d, int | float) and not isinstance(d, bool) and d >= 0 for d in delays)
        ):
            raise ControlError(400, "retry_delays must be a list of seconds >= 0")
        key, sign = signer_for(body)
        sub_id = outbox.subscribe(key, url, sign, duplicate_rate=rate,
                                  retry_delays=None if delays is None else tuple(float(d) for d in delays))  # fmt: skip
        if bool_field(body, "hold", False):
            outbox.hold(sub_id)
        return {"id": sub_id, "account": key, "url": url}

    def _sub_id(request: Request) -> str:
        sub_id = request.path_params["sub_id"]
        if not any(s.id == sub_id for s in outbox.subscriptions()):
            raise ControlError(404, f"no webhook subscription {sub_id!r}")
        return sub_id

    async def hold(request: Request) -> dict[str, Any]:
        outbox.hold(_sub_id(request))
        return {"held": True}

    async def release(request: Request) -> dict[str, Any]:
        sub_id = _sub_id(request)
        body = await read_json_object(request)
        order = body.get("order", "as-sent")
        if order not in ORDERS:
            raise ControlError(400, f"order must be one of {list(ORDERS)}")
        return {"released": outbox.release(sub_id, order=order, copies=int_field(body, "copies", 1, 1))}

    async def flush(request: Request) -> dict[str, Any]:
        body = await read_json_object(request)
        timeout = number_field(body, "timeout", 30.0)
        done = await anyio.to_thread.run_sync(outbox.flush, timeout)
        return {"flushed": done, "pending": outbox.pending()}

    async def attempts(request: Request) -> dict[str, Any]:
        return {"data": [a.__dict__ for a in list(outbox.attempts)]}

    async def remove(request: Request) -> dict[str, Any]:
        outbox.unsubscribe(_sub_id(request))
        return {"deleted": True}

    base = f"{prefix}/webhooks"
    return [
        Route(base, control_endpoint(subscribe), methods=["POST"]),
        Route(f"{base}/flush", control_endpoint(flush), methods=["POST"]),
        Route(f"{base}/attempts", control_endpoint(attempts), methods=["GET"]),
        Route(f"{base}/{{sub_id}}/hold", control_endpoint(hold), methods=["POST"]),
        Route(f"{base}/{{sub_id}}/release", control_endpoint(release), methods=["POST"]),
        Route(f"{base}/{{sub_id}}", control_endpoint(remove), methods=["DELETE"]),
    ]


class WebhookControl(ControlClient):
    """The typed calls of ``webhook_control_routes`` that every emulator's control client shares."""

    def hold_webhooks(self, sub_id: str) -> None:
        """Keep the subscription's new deliveries back until ``release_webhooks``."""
        self._call("POST", f"/webhooks/{sub_id}/hold")

    def release_webhooks(self, sub_id: str, order: str = "as-sent", copies: int = 1) -> int:
        """Send the held deliveries in ``order`` (as-sent, newest-first, shuffled), each ``copies`` times;
        returns how many were held."""
        return int(
            self._call("POST", f"/webhooks/{sub_id}/release", json={"order": order, "copies": copies})["released"]
        )

    def flush_webhooks(self, timeout: float = 30.0) -> bool:
        """Wait until every queued delivery (retries included) is done; False on timeout."""
        return bool(self._call("POST", "/webhooks/flush", json={"timeout": timeout})["flushed"])

    def webhook_attempts(self, sub_id: str | None = None) -> list[dict[str, Any]]:
        """Every delivery attempt so far (of one subscription, or all): number, status or error, time."""
        attempts = self._call("GET", "/webhooks/attempts")["data"]
        return [a for a in attempts if sub_id is None or a["subscription"] == sub_id]

    def unsubscribe_webhooks(self, sub_id: str) -> None:
        """Stop delivering to the subscription."""
        self._call("DELETE", f"/webhooks/{sub_id}")
