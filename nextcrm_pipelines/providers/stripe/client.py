"""Stripe API client: the official SDK for auth, versioning, encoding and retries; our pacing.

Stripe objects have no updated time (only `created`), so a day's sync lists the objects *created*
that day and, while the day is inside the 30-day retention of `/v1/events`, the objects *changed*
that day from the events feed (newest event per object wins). Canceled subscriptions are only
listed with `status=all`.

Requests go through `StripeClient` (with `base_addresses` for a sandbox and `max_network_retries`
set, since a `StripeClient` retries nothing by default) over a transport that applies our
client-side rate limit and counts every attempt. The SDK does not retry 429 unless Stripe says
`Stripe-Should-Retry: true`, so 429s that reach us get our own backoff.

Pages are requested one level below `StripeClient.raw_request` (same request building, auth,
versioning and retries) and parsed with orjson, because the public path costs more CPU than the
rest of a sync: `StripeResponse` parses every body with `json.loads(object_pairs_hook=OrderedDict)`
(about four times orjson on a list page), and `request_raw` formats the whole response body for a
debug log line on every response, whether logging is on or not (`stripe/_api_requestor.py`).
"""

from __future__ import annotations

import functools
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import stripe
import urllib3

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import (
    DEFAULT_RETRY,
    AuthenticationFailed,
    Budget,
    BudgetExhausted,
    ProviderError,
    RateLimiter,
    RequestStats,
    RetryPolicy,
    backoff_delay,
    retry_after_seconds,
)
from nextcrm_pipelines.core.paging import PageCursors
from nextcrm_pipelines.core.sync import Changes, Record, SyncWindow
from nextcrm_pipelines.core.vault import Secrets

PROVIDER = "stripe"
PAGE_SIZE = 100
EVENTS_RETENTION = timedelta(days=30)
# Published limits: 100 req/s live, 25 req/s in test mode (https://docs.stripe.com/rate-limits).
DEFAULT_RATE = {True: 100.0, False: 25.0}
_KEY_PATTERN = re.compile(r"\b([sr]k|whsec)_(test_|live_)?[A-Za-z0-9*]+")


def redact_keys(text: str) -> str:
    """Remove anything shaped like a Stripe key from a message (Stripe echoes a masked key on 401)."""
    return _KEY_PATTERN.sub(lambda m: f"{m.group(1)}_***", text)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verified TLS context per process: building one loads the CA bundle (~20 ms)."""
    return ssl.create_default_context(cafile=stripe.ca_bundle_path)


class _PacedTransport(stripe.HTTPClient):
    """The SDK's HTTP transport: a urllib3 pool with our rate limiter and counters.

    urllib3 (stripe-python's own default stack, via requests) reads a 100-object list page for
    about a third of the CPU httpx spends in its pure-Python HTTP parser, and a backfill reads
    thousands of them.
    """

    name = "nextcrm-urllib3"

    def __init__(self, limiter: RateLimiter, stats: RequestStats, timeout: float):
        super().__init__()
        self._limiter = limiter
        self._stats = stats
        # Seconds spent waiting for the limiter, so a request's time budget can leave pacing out.
        self.paced_seconds = 0.0
        self._pool = urllib3.PoolManager(
            num_pools=2,
            maxsize=4,
            ssl_context=_tls_context(),
            timeout=urllib3.Timeout(connect=min(10.0, timeout), read=timeout),
            retries=False,
        )

    def request(self, method, url, headers, post_data=None, *, _usage=None):  # type: ignore[override]
        waited = self._limiter.acquire()
        self.paced_seconds += waited
        self._stats.add(requests=1, throttle_seconds=waited)
        try:
            # A redirect is never followed: it would carry the secret key to wherever the answer points.
            response = self._pool.request(method.upper(), url, headers=dict(headers), body=post_data or None,
                                          redirect=False)  # fmt: skip
        except urllib3.exceptions.HTTPError as exc:
            raise stripe.APIConnectionError(f"could not reach Stripe: {type(exc).__name__}", should_retry=True) from exc
        if response.status == 429:
            self._stats.add(rate_limit_waits=1)
        return response.data, response.status, response.headers

    def request_stream(self, method, url, headers, post_data=None, *, _usage=None):  # type: ignore[override]
        raise NotImplementedError("streaming responses are not used by the sync")

    def close(self) -> None:
        self._pool.clear()


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
                "no API key stored; reconnect with `nextcrm-pipelines connections add stripe`",
                provider=PROVIDER,
                connection_id=connection.id,
            )
        self.connection = connection
        self.stats = stats or RequestStats()
        self.retry = retry
        livemode = api_key.startswith(("sk_live_", "rk_live_"))
        rate = float(connection.settings.get("requests_per_second", DEFAULT_RATE[livemode])) * rate_share
        self._transport = _PacedTransport(RateLimiter(rate), self.stats, timeout)
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

    def _error(self, exc: stripe.StripeError, path: str) -> ProviderError:
        message = redact_keys(getattr(exc, "user_message", None) or str(exc) or type(exc).__name__)
        cls = AuthenticationFailed if isinstance(exc, stripe.AuthenticationError) else ProviderError
        if cls is AuthenticationFailed:
            message = f"{message}; store a valid key with `nextcrm-pipelines connections add stripe`"
        return cls(message, provider=PROVIDER, connection_id=self.connection.id, endpoint=f"GET {path}",
                   status=getattr(exc, "http_status", None))  # fmt: skip

    def get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """GET `path`; 429s beyond the SDK's own retries are backed off here within the request's budget."""
        first = self.stats.requests
        try:
            return self._get(path, params)
        finally:
            self.stats.add(retries=max(0, self.stats.requests - first - 1))

    def _get(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        requestor = self._client._requestor
        budget = Budget(self.retry.budget_seconds)
        paced, sent = self._transport.paced_seconds, self.stats.requests
        attempt = 0
        while True:
            attempt += 1
            try:
                method, url, headers, post_data, max_retries, usage, _, _ = requestor._args_for_request_with_retries(
                    "get", path, dict(params), None, base_address="api", api_mode="V1", usage=["nextcrm_sync"]
                )
                body, status, headers = requestor._get_http_client().request_with_retries(
                    method, url, headers, post_data, max_network_retries=max_retries, _usage=usage
                )
                if not 200 <= status < 300:
                    requestor._interpret_response(body, status, headers, "V1")
                return orjson.loads(body)
            except stripe.RateLimitError as exc:
                hinted = retry_after_seconds(exc.headers) if exc.headers else None
                delay = hinted if hinted is not None else backoff_delay(attempt, self.retry)
                if attempt >= self.retry.max_attempts:
                    raise self._error(exc, path) from None
                budget.exclude(self._transport.paced_seconds - paced)
                paced = self._transport.paced_seconds
                if delay > budget.remaining():
                    raise BudgetExhausted(budget.exhausted(self.stats.requests - sent, delay), provider=PROVIDER,
                                          connection_id=self.connection.id, endpoint=f"GET {path}",
                                          status=exc.http_status) from None  # fmt: skip
                time.sleep(delay)
            except stripe.StripeError as exc:
                raise self._error(exc, path) from None

    def list_pages(self, path: str, params: Mapping[str, Any]) -> Iterator[tuple[list[dict[str, Any]], datetime]]:
        """Every page of a list endpoint, newest first, each with the time it was requested; a page
        that repeats an earlier one raises `ProviderError` instead of being read again.

        The time is cut to whole seconds, Stripe's event resolution: a change in the same second as a
        listing then ties with it, and the upsert (which replaces on a version not older) lets the event win.
        """
        query = {**params, "limit": PAGE_SIZE}
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
        event_type: str,
        object_type: str,
        window: SyncWindow,
        *,
        listed_at: datetime | None = None,
        listed: set[str] | None = None,
        now: datetime | None = None,
    ) -> Iterator[list[Record]]:
        """Objects changed in the window, from the events feed: the newest event per object wins.

        Only the part of the window inside Stripe's 30-day events retention is read; older days
        rely on their creation listing, which returns the objects' current state. An event older
        than `listed_at` about an object in `listed` is skipped: that listing saw a later state.
        """
        now = now or datetime.now(UTC)
        oldest = now - EVENTS_RETENTION + timedelta(minutes=5)
        start = max(window.start, oldest)
        if start >= window.end:
            return
        seen: set[str] = set()
        listed = listed or set()
        cutoff = int(listed_at.timestamp()) if listed_at else 0
        params = {"type": event_type, "created": {"gte": int(start.timestamp()), "lt": int(window.end.timestamp())}}
        for events, _ in self.list_pages("/v1/events", params):
            records: list[Record] = []
            for event in events:
                obj = (event.get("data") or {}).get("object") or {}
                object_id = obj.get("id")
                if obj.get("object") != object_type or object_id in seen:
                    continue
                seen.add(object_id)
                if event["created"] < cutoff and object_id in listed:
                    continue
                records.append((obj, datetime.fromtimestamp(event["created"], UTC)))
            if records:
                yield Changes(records)

    def _created_then_changed(
        self, path: str, event_type: str, object_type: str, window: SyncWindow, extra: Mapping[str, Any] | None = None
    ) -> Iterator[list[Record]]:
        listed_at = datetime.now(UTC)
        listed: set[str] = set()
        yield from self.created_in(path, window, extra, listed)
        yield from self.changed_in(event_type, object_type, window, listed_at=listed_at, listed=listed)

    def charges(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Charges created in the window, then charges changed in it (refunds, captures, failures)."""
        return self._created_then_changed("/v1/charges", "charge.*", "charge", window)

    def subscriptions(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Subscriptions created in the window in every status, then those changed in it."""
        return self._created_then_changed(
            "/v1/subscriptions", "customer.subscription.*", "subscription", window, {"status": "all"}
        )
