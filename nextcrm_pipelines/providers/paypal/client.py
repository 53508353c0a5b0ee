"""PayPal client: client-credentials token, Transaction Search windows, subscriptions by id, plans, invoices.

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

Billing plans are read whole on every run (`GET /v1/billing/plans`, 20 a page, with `Prefer:
return=representation`: the list's minimal items carry neither billing cycles nor `update_time`). Invoices
are searched by day (`POST /v2/invoicing/search-invoices`, 100 a page, at most 1,000 pages: a range matching
more is split in halves): those *created* in the day (`creation_date_range`), then those *paid* in it
(`payment_date_range`) that were created before, as changes. Search results are summaries without
`last_update_time`, so a page's invoices are stamped with the time it was asked for (whole seconds,
PayPal's resolution): a webhook's invoice, stamped with its own newest time, replaces it only when newer,
and is replaced only by a later read. Deleted drafts leave no trace but their absence: `invoice_ids`
lists every id (`GET /v2/invoicing/invoices`) and `invoice_gone` confirms one is gone (404).
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from nextcrm_pipelines.core.http import HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Changes, Coverage, Record, SyncWindow
from nextcrm_pipelines.providers.paypal.records import parse_time, payment_version, plan_version, subscription_of

PAGE_SIZE = 500
PLANS_PAGE_SIZE = 20  # the Subscriptions API's maximum
INVOICES_PAGE_SIZE = 100  # the Invoicing API's maximum
INVOICES_MAX_PAGE = 1000  # the last page the Invoicing API serves
MAX_WINDOW = timedelta(days=31)
SECOND = timedelta(seconds=1)
REQUEST_ID_MAX = 108  # the longest PayPal-Request-Id PayPal takes
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


def _asked_at() -> datetime:
    """Now in whole seconds, PayPal's resolution: a read and a change of the same second tie."""
    return datetime.now(UTC).replace(microsecond=0)


def classify(response: httpx.Response) -> str | None:
    return "rate_limited" if response.status_code == 429 else None


def request_id(key: str) -> str:
    """The `PayPal-Request-Id` of an outbox key: the key itself when it is printable ASCII of at most 108
    characters, else `nx-` and a digest of it (the same for every attempt)."""
    if 0 < len(key) <= REQUEST_ID_MAX and key.isascii() and key.isprintable() and " " not in key:
        return key
    return "nx-" + hashlib.sha256(key.encode()).hexdigest()


@contextmanager
def paypal_errors() -> Iterator[None]:
    """Re-raise a refused request (a `ProviderError` with PayPal's error body) with PayPal's own name, message
    and issues in its text, keeping its status; other failures pass as they are."""
    try:
        yield
    except ProviderError as exc:
        message = paypal_message(_error_body(exc))
        if message is None or type(exc) is not ProviderError:
            raise
        raise ProviderError(message, provider="paypal", connection_id=exc.connection_id, endpoint=exc.endpoint,
                            status=exc.status) from None  # fmt: skip


def paypal_message(body: dict[str, Any]) -> str | None:
    """PayPal's error body as one line: `NAME: message` and each detail's field and issue (its description);
    the details' `value` is left out (it may be what a person typed)."""
    name, message = body.get("name"), body.get("message")
    if not name and not message:
        return None
    parts = [": ".join(str(p) for p in (name, message) if p)]
    for detail in body.get("details") or []:
        if isinstance(detail, dict):
            where = f"{detail['field']} " if detail.get("field") else ""
            issue = detail.get("issue") or ""
            description = f" ({detail['description']})" if detail.get("description") else ""
            parts.append(f"{where}{issue}{description}".strip())
    if body.get("debug_id"):
        parts.append(f"debug_id {body['debug_id']}")
    return "; ".join(part for part in parts if part)


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
        self.plans_page_size = int(settings.get("plans_page_size", PLANS_PAGE_SIZE))
        self.invoices_page_size = int(settings.get("invoices_page_size", INVOICES_PAGE_SIZE))
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

    def plan(self, plan_id: str, fresh: bool = False) -> dict[str, Any]:
        """A billing plan by id (read once per client, unless `fresh`)."""
        if fresh or plan_id not in self._plans:
            self._plans[plan_id] = self.http.get_json(f"/v1/billing/plans/{quote(plan_id, safe='')}")
        return self._plans[plan_id]

    def write(self, path: str, body: dict[str, Any] | None, *, key: str) -> dict[str, Any]:
        """POST `body` to `path` with the outbox key as `PayPal-Request-Id` on every attempt (PayPal answers a
        repeated one with its first result) and `Prefer: return=representation`; the answer (`{}` for a 204).
        Retried on 5xx, 429 and dropped connections; a 4xx raises `ProviderError` with its status and PayPal's
        name, message and issues."""
        headers = {"Content-Type": "application/json", "PayPal-Request-Id": request_id(key),
                   "Prefer": "return=representation"}  # fmt: skip
        with paypal_errors():
            response = self.http.send("POST", path, content=orjson.dumps(body or {}), headers=headers)
        if response.status_code == 204 or not response.content:
            return {}
        answer = orjson.loads(response.content)
        return answer if isinstance(answer, dict) else {}

    def transaction_rows(self, transaction_id: str, at: datetime) -> list[dict[str, Any]]:
        """The Transaction Search rows of a transaction initiated at `at` (read as the sync reads that second:
        every field, every row), or none while PayPal does not show them yet (up to three hours)."""
        start = _second(at)
        found = []
        for page in self._windows(SyncWindow(start, start + SECOND), "all"):
            found += [raw for raw, _ in page if (raw.get("transaction_info") or {}).get("transaction_id")
                      == transaction_id]  # fmt: skip
        return found

    def order(self, order_id: str) -> dict[str, Any]:
        """A checkout order as it is now (`GET /v2/checkout/orders/{id}`), with its payer and captures."""
        return self.http.get_json(f"/v2/checkout/orders/{quote(order_id, safe='')}")

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        """A subscription as the sync stores it: `GET /v1/billing/subscriptions/{id}` with its plan read now."""
        sub = self.http.get_json(f"/v1/billing/subscriptions/{quote(subscription_id, safe='')}")
        return {**sub, "plan": self.plan(sub["plan_id"], fresh=True)} if sub.get("plan_id") else sub

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

    def plans(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Every billing plan of the app as it is now (the whole list, whatever the window), each as of its
        `update_time`; a plan listed twice (the list moved while paged) is read once."""
        seen: set[str] = set()
        page = 1
        while True:
            params = {"page": str(page), "page_size": str(self.plans_page_size), "total_required": "true"}
            body = self.http.get_json("/v1/billing/plans", params=params,
                                      headers={"Prefer": "return=representation"})  # fmt: skip
            items = [p for p in body.get("plans") or [] if isinstance(p, dict) and p.get("id") not in seen]
            seen.update(p["id"] for p in items)
            if items:
                yield [(plan, plan_version(plan)) for plan in items]
            listed = len(body.get("plans") or [])
            last = body.get("total_pages")
            if listed < self.plans_page_size or (last is not None and page >= int(last)):
                return
            page += 1

    def _search_invoices(self, criteria: dict[str, Any], page: int) -> dict[str, Any]:
        params = {"page": str(page), "page_size": str(self.invoices_page_size), "total_required": "true"}
        headers = {"Content-Type": "application/json"}
        response = self.http.send("POST", "/v2/invoicing/search-invoices", params=params,
                                  content=orjson.dumps(criteria), headers=headers)  # fmt: skip
        body = orjson.loads(response.content)
        return body if isinstance(body, dict) else {}

    def _invoices_in(self, field: str, start: datetime, end: datetime) -> Iterator[tuple[list[dict[str, Any]],
                                                                                            datetime]]:  # fmt: skip
        """Pages of invoices whose `field` range (both ends included) holds [start, end], each with the time
        it was asked for; a range with more pages than PayPal serves is searched in halves."""
        criteria = {field: {"start": _stamp(start), "end": _stamp(end)}, "fields": ["payments"]}
        page = 1
        while True:
            asked_at = _asked_at()
            body = self._search_invoices(criteria, page)
            pages = int(body.get("total_pages") or 0)
            if page == 1 and pages > INVOICES_MAX_PAGE:
                if end - start <= SECOND:
                    raise ProviderError(f"more invoices in one second than PayPal pages through at {start}",
                                        provider="paypal", connection_id=self.http.connection_id)  # fmt: skip
                middle = _second(start + (end - start) / 2)
                yield from self._invoices_in(field, start, middle)
                yield from self._invoices_in(field, middle, end)
                return
            items = [i for i in body.get("items") or [] if isinstance(i, dict) and i.get("id")]
            if items:
                yield items, asked_at
            if page >= min(pages, INVOICES_MAX_PAGE) or not body.get("items"):
                return
            page += 1

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Invoices created in the window, then (as changes) invoices created before it and paid in it, each
        as of the time its page was asked for. An invoice created exactly at the window's end belongs to the
        next window."""
        listed: set[str] = set()
        for items, asked_at in self._invoices_in("creation_date_range", window.start, window.end):
            created = []
            for invoice in items:
                moment = parse_time((((invoice.get("detail") or {}).get("metadata")) or {}).get("create_time"))
                if moment is not None and window.start <= moment < window.end and invoice["id"] not in listed:
                    listed.add(invoice["id"])
                    created.append((invoice, asked_at))
            if created:
                yield created
        for items, asked_at in self._invoices_in("payment_date_range", window.start, window.end):
            paid = [(invoice, asked_at) for invoice in items if invoice["id"] not in listed]
            listed.update(invoice["id"] for invoice, _ in paid)
            if paid:
                yield Changes(paid)

    def invoice_ids(self) -> Iterator[list[str]]:
        """The id of every invoice of the app (`GET /v2/invoicing/invoices`), page by page."""
        page = 1
        while True:
            params = {"page": str(page), "page_size": str(self.invoices_page_size), "total_required": "true"}
            body = self.http.get_json("/v2/invoicing/invoices", params=params)
            items = body.get("items") or []
            yield [str(i["id"]) for i in items if isinstance(i, dict) and i.get("id")]
            if not items or page >= min(int(body.get("total_pages") or 0), INVOICES_MAX_PAGE):
                return
            page += 1

    def invoice_gone(self, invoice_id: str, stored: dict[str, Any]) -> bool:
        """Whether PayPal answers 404 for the invoice (a deleted draft or scheduled invoice)."""
        try:
            self.http.get_json(f"/v2/invoicing/invoices/{quote(invoice_id, safe='')}")
        except ProviderError as exc:
            if exc.status == 404:
                return True
            raise
        return False
