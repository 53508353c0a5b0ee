"""Stripe API client: the official SDK for auth, versioning, encoding and retries; our pacing.

Stripe objects have no updated time (only `created`), so a day's sync lists the objects *created*
that day and, while the day is inside the 30-day retention of `/v1/events`, the objects *changed*
that day from the events feed (newest event per object wins). Canceled subscriptions are only
listed with `status=all`. Deleted customers and deleted draft invoices leave the lists: their
`*.deleted` event is the last word, and its object is marked `"deleted": true`, as Stripe marks a
deleted object it returns.

Requests go through `StripeClient.raw_request` (with `base_addresses` for a sandbox and
`max_network_retries` set, since a `StripeClient` retries nothing by default) over our own
`stripe.HTTPClient`, the SDK's documented extension point, which applies our client-side rate limit
and counts every attempt. The SDK does not retry 429 unless Stripe says `Stripe-Should-Retry: true`,
so 429s that reach us get our own backoff.

The transport keeps each successful body for the caller, who parses it with orjson, and hands the
SDK an empty object in its place: `raw_request` would otherwise parse every page with
`json.loads(object_pairs_hook=OrderedDict)` (about four times orjson on a list page) and format the
whole body, customers' details included, into a debug log line on every response. An error answer
reaches the SDK cut to the fields it raises its typed error from, so no response body is ever in its
logs. Only the SDK's public names are used (`StripeClient`, `raw_request`, `HTTPClient`, its errors):
a test scans for any other.
"""

from __future__ import annotations

import functools
import http.client
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import stripe

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import (
    DEFAULT_RETRY,
    AuthenticationFailed,
    Budget,
    BudgetExhausted,
    NoAnswer,
    ProviderError,
    ProviderUnreachable,
    RateLimiter,
    RequestStats,
    RetryPolicy,
    backoff_delay,
    retry_after_seconds,
    safe_url,
    transport_cause,
)
from nextcrm_pipelines.core.paging import PageCursors
from nextcrm_pipelines.core.sync import Changes, Record, SyncWindow
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.stripe.records import event_version

PROVIDER = "stripe"
PAGE_SIZE = 100
EVENTS_RETENTION = timedelta(days=30)
CUSTOMER_EVENTS = ("customer.created", "customer.updated", "customer.deleted")
# Published limits: 100 req/s live, 25 req/s in test mode (https://docs.stripe.com/rate-limits).
DEFAULT_RATE = {True: 100.0, False: 25.0}
_KEY_PATTERN = re.compile(r"\b([sr]k|whsec)_(test_|live_)?[A-Za-z0-9*]+")
# What the SDK is given for a successful answer; the real body waits in the transport for the caller.
_BODY_FOR_SDK = b"{}"
# The fields of Stripe's error envelope the SDK picks its typed error and message from.
_ERROR_FIELDS = ("type", "code", "message", "param")
# A reused keep-alive connection the server closed fails like this before any answer: safe to send a GET again.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _ConnectFailed(OSError):
    """No connection to Stripe could be opened (refused, name not resolved, connect timeout, TLS handshake):
    nothing was sent. Its cause is the socket or TLS error."""


class _Unreachable(stripe.APIConnectionError):
    """The SDK's connection error for a request that could not open a connection."""


def redact_keys(text: str) -> str:
    """Remove anything shaped like a Stripe key from a message (Stripe echoes a masked key on 401)."""
    return _KEY_PATTERN.sub(lambda m: f"{m.group(1)}_***", text)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verified TLS context per process: building one loads the CA bundle (~20 ms)."""
    return ssl.create_default_context(cafile=stripe.ca_bundle_path)


def _error_body_for_sdk(body: bytes, status: int) -> bytes:
    """Stripe's error answer cut to type, code, message and param (keys redacted), for the SDK to raise
    its typed error from; the rest (a card error carries its charge and customer) never reaches its log."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        kept = {name: redact_keys(error[name]) for name in _ERROR_FIELDS if isinstance(error.get(name), str)}
    else:
        kept = {"message": f"Stripe answered HTTP {status} without its JSON error"}
    return orjson.dumps({"error": kept})


def _dropped(sock: Any) -> bool:
    """Whether an idle keep-alive socket has something to read: the server closed it (or broke the protocol)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _PacedTransport(stripe.HTTPClient):
    """The SDK's HTTP transport: a keep-alive `http.client` connection per thread, our rate limiter and
    counters, and successful bodies kept from the SDK for the caller.

    `http.client` (which urllib3 and requests are built on) costs less than half the client CPU of
    a urllib3 pool per request (about 0.3 against 0.65 ms for a 100-charge page from the sandbox):
    urllib3 parses and percent-encodes every URL byte by byte in Python, and a backfill requests
    thousands of pages. No proxy, no redirect: the secret key goes to the configured address only.
    """

    name = "nextcrm-http.client"

    def __init__(self, limiter: RateLimiter, stats: RequestStats, timeout: float, connect_attempts: int = 3):
        super().__init__()
        self._limiter = limiter
        self._stats = stats
        self._connect_timeout = min(10.0, timeout)
        self._read_timeout = timeout
        # Attempts of one request that may fail to open a connection before the SDK is told not to retry.
        self._connect_attempts = connect_attempts
        # Seconds spent waiting for the limiter, so a request's time budget can leave pacing out.
        self.paced_seconds = 0.0
        self._per_thread = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._opened_lock = threading.Lock()

    def request(self, method, url, headers, post_data=None, *, _usage=None):  # type: ignore[override]
        waited = self._limiter.acquire()
        self.paced_seconds += waited
        self._stats.add(requests=1, throttle_seconds=waited)
        try:
            status, response_headers, body = self._exchange(method.upper(), url, headers, post_data)
        except _ConnectFailed as exc:
            # A host that refuses or cannot be found is tried `connect_attempts` times, not the SDK's six.
            failures = getattr(self._per_thread, "connect_failures", 0) + 1
            self._per_thread.connect_failures = failures
            cause = transport_cause(exc.__cause__ or exc, connect_timeout=self._connect_timeout, connecting=True)
            raise _Unreachable(f"could not reach Stripe at {safe_url(url)}: {cause}",
                               should_retry=failures < self._connect_attempts) from exc  # fmt: skip
        except (OSError, http.client.HTTPException) as exc:
            cause = transport_cause(exc, read_timeout=self._read_timeout, connecting=False)
            raise stripe.APIConnectionError(f"could not reach Stripe at {safe_url(url)}: {cause}",
                                            should_retry=True) from exc  # fmt: skip
        self._per_thread.connect_failures = 0
        if status == 429:
            self._stats.add(rate_limit_waits=1)
        if 200 <= status < 300:
            # The SDK retries on some answers, so the body kept is always the last one it was given.
            self._per_thread.body = body
            return _BODY_FOR_SDK, status, response_headers
        return _error_body_for_sdk(body, status), status, response_headers

    def begin_request(self) -> None:
        """Start counting this thread's failed connection attempts afresh: a new logical request begins."""
        self._per_thread.connect_failures = 0

    def take_body(self) -> bytes | None:
        """The body of this thread's last successful response, once; None when there is none to take."""
        body = getattr(self._per_thread, "body", None)
        self._per_thread.body = None
        return body

    def request_stream(self, method, url, headers, post_data=None, *, _usage=None):  # type: ignore[override]
        raise NotImplementedError("streaming responses are not used by the sync")

    def close(self) -> None:
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for connection in opened:
            connection.close()

    def _exchange(self, method: str, url: str, headers: Mapping[str, str], body: Any) -> tuple[int, Any, bytes]:
        """One request on this thread's connection to the URL's origin; a GET whose reused connection
        turns out closed by the server is sent once more on a new one."""
        scheme, _, rest = url.partition("://")
        origin, _, target = rest.partition("/")
        connection = self._connection(scheme, origin)
        reused = connection.sock is not None
        try:
            return self._send(connection, method, "/" + target, headers, body)
        except _STALE_CONNECTION:
            if not (reused and method == "GET"):
                raise
        return self._send(connection, method, "/" + target, headers, body)

    def _send(self, connection: http.client.HTTPConnection, method: str, target: str, headers: Mapping[str, str],
              body: Any) -> tuple[int, Any, bytes]:  # fmt: skip
        try:
            if connection.sock is not None and _dropped(connection.sock):
                connection.close()
            if connection.sock is None:
                try:
                    connection.connect()
                except OSError as exc:
                    raise _ConnectFailed(str(exc)) from exc
                connection.sock.settimeout(self._read_timeout)
                # As urllib3 does: a request in two segments must not wait for the server's delayed ACK.
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if isinstance(body, str):
                body = body.encode()  # http.client would encode it as Latin-1
            connection.request(method, target, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            connection.close()  # its state is unknown: the next request starts on a new socket
            raise
        return response.status, response.headers, data

    def _connection(self, scheme: str, origin: str) -> http.client.HTTPConnection:
        connections: dict[str, http.client.HTTPConnection] = getattr(self._per_thread, "connections", None) or {}
        connection = connections.get(origin)
        if connection is None:
            if scheme == "https":
                connection = http.client.HTTPSConnection(origin, timeout=self._connect_timeout, context=_tls_context())
            elif scheme == "http":
                connection = http.client.HTTPConnection(origin, timeout=self._connect_timeout)
            else:
                raise http.client.InvalidURL(f"unsupported scheme {scheme!r}")
            connections[origin] = connection
            self._per_thread.connections = connections
            with self._opened_lock:
                self._opened.append(connection)
        return connection


class StripeApi:
    """A Stripe account's read API for the sync: paged lists and the events feed."""

    def __init__(
        self,
        connection: Connection,
        secrets: Secrets,
        *,
        stats: RequestStats | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: float = 30.0,
        rate_share: float = 1.0,
    ):
        api_key = secrets.get("api_key")
        if not api_key:
            raise AuthenticationFailed(
                "no API key stored",
                provider=PROVIDER,
                connection_id=connection.id,
            )
        self.connection = connection
        # Stripe's `limit` is 1 to 100; a smaller page (the `page_size` setting) is for tests.
        self.page_size = max(1, min(PAGE_SIZE, int(connection.settings.get("page_size", PAGE_SIZE))))
        self.stats = stats or RequestStats()
        self.retry = retry
        livemode = api_key.startswith(("sk_live_", "rk_live_"))
        rate = float(connection.settings.get("requests_per_second", DEFAULT_RATE[livemode])) * rate_share
        self._transport = _PacedTransport(RateLimiter(rate), self.stats, timeout, retry.connect_attempts)
        options: dict[str, Any] = {}
        if connection.base_url:
            options["base_addresses"] = {"api": connection.base_url.rstrip("/")}
        if connection.external_tenant and connection.external_tenant.startswith("acct_"):
            options["stripe_account"] = connection.external_tenant
        self._client = stripe.StripeClient(
            api_key,
            max_network_retries=max(0, retry.max_attempts - 1),
            http_client=self._transport,
            **options,
        )

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> StripeApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: stripe.StripeError, path: str, method: str = "GET") -> ProviderError:
        message = redact_keys(getattr(exc, "user_message", None) or str(exc) or type(exc).__name__)
        cls = AuthenticationFailed if isinstance(exc, stripe.AuthenticationError) else ProviderError
        return cls(message, provider=PROVIDER, connection_id=self.connection.id, endpoint=f"{method} {path}",
                   status=getattr(exc, "http_status", None))  # fmt: skip

    def get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """GET `path`; 429s beyond the SDK's own retries are backed off here within the request's budget."""
        first = self.stats.requests
        try:
            return self._call("get", path, params)
        finally:
            self.stats.add(retries=max(0, self.stats.requests - first - 1))

    def post(self, path: str, params: Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        """POST `path` (form-encoded `params`) with `idempotency_key` on every attempt, the SDK's retries
        included: Stripe answers a repeated key with the first request's result, so a retry never acts twice."""
        first = self.stats.requests
        try:
            return self._call("post", path, params, idempotency_key=idempotency_key)
        finally:
            self.stats.add(retries=max(0, self.stats.requests - first - 1))

    def delete(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """DELETE `path` (`params` in the query string). Stripe takes no idempotency key on a DELETE: a repeat
        is a new request (a subscription canceled again answers 404), so callers check what a retry found."""
        first = self.stats.requests
        try:
            return self._call("delete", path, params)
        finally:
            self.stats.add(retries=max(0, self.stats.requests - first - 1))

    def _call(self, method: str, path: str, params: Mapping[str, Any], **options: str) -> dict[str, Any]:
        """One request through the SDK (its retries of 5xx and dropped connections included), with 429s
        backed off here within the request's budget; errors as `ProviderError`s with the HTTP status."""
        budget = Budget(self.retry.budget_seconds)
        paced, sent, began = self._transport.paced_seconds, self.stats.requests, time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                self._transport.begin_request()
                self._transport.take_body()  # nothing left over from a request that failed
                self._client.raw_request(method, path, usage=["nextcrm_sync"], **options, **params)
                return self._page(self._transport.take_body(), path)
            except stripe.RateLimitError as exc:
                hinted = retry_after_seconds(exc.headers) if exc.headers else None
                delay = hinted if hinted is not None else backoff_delay(attempt, self.retry)
                if attempt >= self.retry.max_attempts:
                    raise self._error(exc, path, method.upper()) from None
                budget.exclude(self._transport.paced_seconds - paced)
                paced = self._transport.paced_seconds
                if delay > budget.remaining():
                    raise BudgetExhausted(budget.exhausted(self.stats.requests - sent, delay), provider=PROVIDER,
                                          connection_id=self.connection.id, endpoint=f"{method.upper()} {path}",
                                          status=exc.http_status) from None  # fmt: skip
                time.sleep(delay)
            except stripe.APIConnectionError as exc:
                # No answer at all: say where, why, and how long it was tried.
                attempts = self.stats.requests - sent
                message = (f"{exc.user_message} ({attempts} attempt{'s' if attempts != 1 else ''} over "
                           f"{time.monotonic() - began:.1f} s)")  # fmt: skip
                cls = ProviderUnreachable if isinstance(exc, _Unreachable) else NoAnswer
                raise cls(message, provider=PROVIDER, connection_id=self.connection.id,
                          endpoint=f"{method.upper()} {path}") from None  # fmt: skip
            except stripe.StripeError as exc:
                raise self._error(exc, path, method.upper()) from None

    def _page(self, body: bytes | None, path: str) -> dict[str, Any]:
        """A successful answer's JSON object; anything else is a provider error that leaves the body out."""
        try:
            page = orjson.loads(body) if body is not None else None
        except orjson.JSONDecodeError:
            page = None
        if not isinstance(page, dict):
            raise ProviderError("Stripe answered with a body that is not a JSON object", provider=PROVIDER,
                                connection_id=self.connection.id, endpoint=f"GET {path}")  # fmt: skip
        return page

    def list_pages(self, path: str, params: Mapping[str, Any]) -> Iterator[tuple[list[dict[str, Any]], datetime]]:
        """Every page of a list endpoint, newest first, each with the time it was requested; a page
        that repeats an earlier one raises `ProviderError` instead of being read again.

        The time is cut to whole seconds, Stripe's event resolution: a change in the same second as a
        listing then ties with it, and the upsert (which replaces on a version not older) lets the event win.
        """
        query = {**params, "limit": self.page_size}
        cursors = PageCursors(PROVIDER, name="Stripe", connection_id=self.connection.id, endpoint=f"GET {path}")
        while True:
            requested_at = datetime.now(UTC).replace(microsecond=0)
            page = self.get(path, query)
            data = page.get("data") or []
            if not page.get("has_more"):
                yield data, requested_at
                return
            # A page Stripe already gave (or an empty one that says more follow) stops the listing.
            query["starting_after"] = cursors.advance(data[-1]["id"] if data else None)
            yield data, requested_at

    def created_in(
        self, path: str, window: SyncWindow, extra: Mapping[str, Any] | None = None, listed: set[str] | None = None
    ) -> Iterator[list[Record]]:
        """Objects created in the window, each stamped with the time its page was fetched.

        Their ids are added to `listed`, so the events pass can skip what this listing already saw.
        """
        params = {"created": {"gte": int(window.start.timestamp()), "lt": int(window.end.timestamp())}, **(extra or {})}
        for data, observed in self.list_pages(path, params):
            if listed is not None:
                listed.update(obj["id"] for obj in data)
            yield [(obj, observed) for obj in data]

    def changed_in(
        self,
        event_type: str | tuple[str, ...],
        object_type: str,
        window: SyncWindow,
        *,
        listed_at: datetime | None = None,
        listed: set[str] | None = None,
        now: datetime | None = None,
        mark_deleted: bool = False,
    ) -> Iterator[list[Record]]:
        """Objects changed in the window, from the events feed: the newest event per object wins.

        `event_type` is one type (wildcards allowed) or a tuple of exact types (`types[]`, up to 20).
        Only the part of the window inside Stripe's 30-day events retention is read; older days
        rely on their creation listing, which returns the objects' current state. An event older
        than `listed_at` about an object in `listed` is skipped: that listing saw a later state.
        With `mark_deleted`, the object of a `*.deleted` event gets `"deleted": true`.
        """
        now = now or datetime.now(UTC)
        oldest = now - EVENTS_RETENTION + timedelta(minutes=5)
        start = max(window.start, oldest)
        if start >= window.end:
            return
        seen: set[str] = set()
        listed = listed or set()
        cutoff = int(listed_at.timestamp()) if listed_at else 0
        created = {"gte": int(start.timestamp()), "lt": int(window.end.timestamp())}
        params = {"types": list(event_type), "created": created} if isinstance(event_type, tuple) else {
            "type": event_type, "created": created}  # fmt: skip
        for events, _ in self.list_pages("/v1/events", params):
            records: list[Record] = []
            for event in events:
                obj = (event.get("data") or {}).get("object") or {}
                object_id = obj.get("id")
                # An object without an id (`invoice.upcoming` previews one) is nothing stored.
                if obj.get("object") != object_type or not object_id or object_id in seen:
                    continue
                seen.add(object_id)
                if event["created"] < cutoff and object_id in listed:
                    continue
                if mark_deleted and str(event.get("type", "")).endswith(".deleted"):
                    obj = {**obj, "deleted": True}
                records.append((obj, event_version(datetime.fromtimestamp(event["created"], UTC), event.get("type"))))
            if records:
                yield Changes(records)

    def _created_then_changed(
        self,
        path: str,
        event_type: str | tuple[str, ...],
        object_type: str,
        window: SyncWindow,
        extra: Mapping[str, Any] | None = None,
        *,
        mark_deleted: bool = False,
    ) -> Iterator[list[Record]]:
        listed_at = datetime.now(UTC)
        listed: set[str] = set()
        yield from self.created_in(path, window, extra, listed)
        yield from self.changed_in(event_type, object_type, window, listed_at=listed_at, listed=listed,
                                   mark_deleted=mark_deleted)  # fmt: skip

    def charges(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Charges created in the window, then charges changed in it (refunds, captures, failures)."""
        return self._created_then_changed("/v1/charges", "charge.*", "charge", window)

    def subscriptions(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Subscriptions created in the window in every status, then those changed in it."""
        return self._created_then_changed(
            "/v1/subscriptions", "customer.subscription.*", "subscription", window, {"status": "all"}
        )

    def customers(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Customers created in the window, then those changed or deleted in it.

        `customer.*` would also match `customer.subscription.*`, `customer.source.*` and more, so the
        three customer events are named.
        """
        return self._created_then_changed("/v1/customers", CUSTOMER_EVENTS, "customer", window, mark_deleted=True)

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Invoices created in the window (every status), then those changed in it: finalized, paid,
        failed, voided, marked uncollectible or (drafts) deleted."""
        return self._created_then_changed("/v1/invoices", "invoice.*", "invoice", window, mark_deleted=True)
