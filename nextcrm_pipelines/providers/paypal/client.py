"""PayPal client: client-credentials token, Transaction Search windows, subscriptions by id.

Transaction Search caps a query at 31 days and 10,000 rows and shows rows up to three hours late.
A day's window is one query (`end_date` is inclusive, so it ends a second before midnight) with
`fields=all`, `balance_affecting_records_only=N` and `page_size=500`, read to its last page; a query
refused with `RESULTSET_TOO_LARGE` is split in halves until each half fits. The answer's
`last_refreshed_datetime` says how far the data goes: the window is logged as covered only up to
there (`Coverage`), and the hourly schedule reads it again until it is complete; a window that
starts after it ("Data for the given start date is not available") reads nothing yet. Subscriptions
are found through the window's transactions (`paypal_reference_id` of type SUB) and fetched by id
with their plan. Webhook events re-read a capture, a sale or a plan by id (`capture`, `sale`, `plan`), and
an event itself (`webhook_event`) to learn whether it is this app's.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from nextcrm_pipelines.core.http import HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Coverage, Record, SyncWindow
from nextcrm_pipelines.providers.paypal.records import parse_time, payment_version, subscription_of

PAGE_SIZE = 500
MAX_WINDOW = timedelta(days=31)
SECOND = timedelta(seconds=1)
# PayPal publishes no numbers; 50 calls a minute per client is the commonly observed ceiling.
DEFAULT_REQUESTS_PER_SECOND = 0.8

OAUTH = OAuthSpec(
    provider="paypal",
    hosts={"api": "https://api-m.paypal.com"},
    sandbox_hosts={"api": "https://api-m.sandbox.paypal.com"},
    authorize=None,
    token=("api", "/v1/oauth2/token"),
    scopes=(),
    env_prefix="PAYPAL",
    client_auth="client_secret_basic",
)


class _NotAvailable(Exception):
    """PayPal has no data for this start yet (it is after `last_refreshed_datetime`)."""


class _TooLarge(Exception):
    """The window matches more rows than one query may return."""


def _error_body(exc: ProviderError) -> dict[str, Any]:
    if exc.response is None:
        return {}
    try:
        body = orjson.loads(exc.response.content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def classify(response: httpx.Response) -> str | None:
    return "rate_limited" if response.status_code == 429 else None


class PayPalApi:
    """One merchant's transactions and subscriptions."""

    def __init__(self, ctx: ClientContext) -> None:
        if ctx.tokens is None:
            raise ValueError("the PayPal client needs the connection's token manager")
        connection = ctx.connection
        settings = connection.settings or {}
        self.http = HttpClient(
            provider="paypal",
            name="PayPal",
            connection_id=connection.id,
            base_url=OAUTH.url("api", "", connection.base_url, mode=settings.get("mode")),
            headers={"Accept": "application/json"},
            auth=BearerAuth(ctx.tokens),
            requests_per_second=float(settings.get("requests_per_second", DEFAULT_REQUESTS_PER_SECOND)),
            stats=ctx.stats,
            classify=classify,
        )
        self.page_size = int(settings.get("page_size", PAGE_SIZE))
        self._plans: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> PayPalApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _search(self, start: datetime, last_second: datetime, page: int, fields: str) -> dict[str, Any]:
        params = {
            "start_date": _stamp(start),
            "end_date": _stamp(last_second),
            "page": str(page),
            "page_size": str(self.page_size),
            "fields": fields,
            "balance_affecting_records_only": "N",
        }
        try:
            return self.http.get_json("/v1/reporting/transactions", params=params)
        except ProviderError as exc:
            body = _error_body(exc)
            if exc.status == 400 and body.get("name") == "RESULTSET_TOO_LARGE":
                raise _TooLarge from None
            text = " ".join(
                str(part) for part in [body.get("message"), *(d.get("issue") for d in body.get("details") or [])]
            )
            if exc.status == 400 and "not available" in text.lower():
                raise _NotAvailable from None
            raise

    def _read(self, start: datetime, end: datetime, fields: str) -> Generator[list[Record], None, datetime]:
        """Rows initiated in [start, end), page by page; returns how far PayPal's data reached."""
        try:
            first = self._search(start, end - SECOND, 1, fields)
        except _NotAvailable:
            return start
        except _TooLarge:
            if end - start <= SECOND:
                raise ProviderError(f"more rows in one second than PayPal returns at {start}", provider="paypal",
                                    connection_id=self.http.connection_id) from None  # fmt: skip
            middle = _second(start + (end - start) / 2)
            reached = yield from self._read(start, middle, fields)
            if reached < middle:
                return reached
            return (yield from self._read(middle, end, fields))
        refreshed = parse_time(first.get("last_refreshed_datetime"))
        reached = end if refreshed is None else min(end, max(start, refreshed + SECOND))
        body, page = first, 1
        while True:
            rows = []
            for raw in body.get("transaction_details") or []:
                started = parse_time((raw.get("transaction_info") or {}).get("transaction_initiation_date"))
                if started is not None and start <= started < end:
                    rows.append((raw, payment_version(raw)))
            if rows:
                yield rows
            if page >= int(body.get("total_pages") or 0):
                return reached
            page += 1
            body = self._search(start, end - SECOND, page, fields)

    def _windows(self, window: SyncWindow, fields: str) -> Generator[list[Record], None, datetime]:
        start = window.start
        while start < window.end:
            end = min(window.end, start + MAX_WINDOW)
            reached = yield from self._read(start, end, fields)
            if reached < end:
                return reached
            start = end
        return window.end

    def transactions(self, window: SyncWindow) -> Iterator[list[Record] | Coverage]:
        """Every Transaction Search row initiated in the window, as far as PayPal shows it yet."""
        reached = yield from self._windows(window, "all")
        if reached < window.end:
            yield Coverage(reached)

    def plan(self, plan_id: str) -> dict[str, Any]:
        """A billing plan by id (read once per client)."""
        if plan_id not in self._plans:
            self._plans[plan_id] = self.http.get_json(f"/v1/billing/plans/{quote(plan_id, safe='')}")
        return self._plans[plan_id]

    def capture(self, capture_id: str) -> dict[str, Any]:
        """A Checkout capture as it is now (`GET /v2/payments/captures/{id}`)."""
        return self.http.get_json(f"/v2/payments/captures/{quote(capture_id, safe='')}")

    def sale(self, sale_id: str) -> dict[str, Any]:
        """A v1 sale (subscription payments) as it is now (`GET /v1/payments/sale/{id}`)."""
        return self.http.get_json(f"/v1/payments/sale/{quote(sale_id, safe='')}")

    def webhook_event(self, event_id: str) -> dict[str, Any]:
        """A webhook event notification of this app (`GET /v1/notifications/webhooks-events/{id}`); events are
        scoped to the app, so another app's event is a `ProviderError` with status 404."""
        return self.http.get_json(f"/v1/notifications/webhooks-events/{quote(event_id, safe='')}")

    def subscriptions(self, window: SyncWindow) -> Iterator[list[Record] | Coverage]:
        """The subscriptions the window's transactions belong to, fetched now with their plan."""
        ids: set[str] = set()
        pages = self._windows(window, "transaction_info")
        while True:
            try:
                page = next(pages)
            except StopIteration as done:
                reached = done.value
                break
            ids.update(sid for raw, _ in page if (sid := subscription_of(raw)))
        batch: list[Record] = []
        for sid in sorted(ids):
            sub = self.http.get_json(f"/v1/billing/subscriptions/{sid}")
            if sub.get("plan_id"):
                sub = {**sub, "plan": self.plan(sub["plan_id"])}
            version = parse_time(sub.get("update_time")) or parse_time(sub.get("create_time"))
            batch.append((sub, version))
            if len(batch) >= 100:
                yield batch
                batch = []
        if batch:
            yield batch
        if reached < window.end:
            yield Coverage(reached)
