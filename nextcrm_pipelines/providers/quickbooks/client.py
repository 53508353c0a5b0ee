"""QuickBooks Online Accounting API v3 client: realm per connection, query language, CDC for deletes.

A day's window of invoices, customers or payments is read with `SELECT * FROM <Entity> WHERE
MetaData.LastUpdatedTime >= cursor AND < end ORDER BY MetaData.LastUpdatedTime` and
`STARTPOSITION`/`MAXRESULTS 1000`, paging by updated time (`core.paging`); customers are a name list,
which answers active rows only unless the query adds `Active IN (true, false)`, so it does. Hard
deletes (and customers merged into another) leave no row to query: for windows inside Change Data
Capture's 30 days, `/cdc?entities=<Entity>&changedSince=<start>` supplies `status: "Deleted"` stubs,
which become tombstones. Webhook re-fetches read many records per call (`SELECT * FROM <Entity> WHERE
Id IN (...)`, sent as a `POST /query` body) and ask Change Data Capture whether an id that is no longer
found was deleted. QuickBooks allows 500 calls a minute and 10 a second per realm and answers 429 (fault
3001) with no `Retry-After`, so the client paces itself and waits the documented minute on a 429.

Writes (`write`) carry a `requestid` query parameter: QuickBooks answers a repeated one with its first answer
instead of acting again, so they are retried like reads; a refusal raises `ProviderError` with the HTTP status
and QuickBooks' fault (code, message, detail, element).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson

from nextcrm_pipelines.core.connect import Tenant, TenantContext
from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow
from nextcrm_pipelines.providers.quickbooks.records import is_deleted_stub, updated_at

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
MINOR_VERSION = "75"
CDC_RETENTION = timedelta(days=30)
CDC_MAX_OBJECTS = 1000
DEFAULT_REQUESTS_PER_SECOND = 8.0  # 500/min and 10/s per realm
THROTTLE_WAIT_SECONDS = 60.0
SANDBOX_API = "https://sandbox-quickbooks.api.intuit.com"
# Name lists answer active rows only unless asked for both; an inactive customer is a deleted one.
NAME_LISTS = frozenset({"Customer"})
NAME_LIST_EVERY = " AND Active IN (true, false)"
# The longest `requestid` QuickBooks takes (outside a batch); longer keys are sent as a digest of themselves.
REQUEST_ID_MAX = 50
# Faults whose detail names a person (a Stale Object Error names the company user who changed the object).
_DETAIL_NAMES_A_PERSON = frozenset({"5010"})

OAUTH = OAuthSpec(
    provider="quickbooks",
    hosts={
        "appcenter": "https://appcenter.intuit.com",
        "oauth": "https://oauth.platform.intuit.com",
        "developer": "https://developer.api.intuit.com",
        "api": "https://quickbooks.api.intuit.com",
    },
    authorize=("appcenter", "/connect/oauth2"),
    token=("oauth", "/oauth2/v1/tokens/bearer"),
    scopes=("com.intuit.quickbooks.accounting",),
    env_prefix="QUICKBOOKS",
    pkce=False,
    client_auth="client_secret_basic",
)


def api_root(base_url: str | None, environment: str) -> str:
    """The v3 API origin: the sandbox layout under a base-URL override, else Intuit's host."""
    if base_url:
        return OAUTH.url("api", "", base_url)
    return OAUTH.hosts["api"] if environment == "production" else SANDBOX_API


def _fault_message(content: bytes) -> str | None:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    fault = body.get("Fault") or body.get("fault") if isinstance(body, dict) else None
    if not isinstance(fault, dict):
        return None
    errors = fault.get("Error") or fault.get("error") or []
    parts = []
    for e in errors:
        if not isinstance(e, dict):
            continue
        code, element = e.get("code"), e.get("element")
        detail = e.get("Detail") or e.get("detail")
        if str(code) in _DETAIL_NAMES_A_PERSON:
            detail = "the object changed since its SyncToken was read"
        parts.append(f"{code} {e.get('Message') or e.get('message')}: {detail}" + (f" ({element})" if element else ""))
    return "; ".join(parts) or str(fault.get("type"))


def request_id(key: str) -> str:
    """The `requestid` of an outbox key: the key itself when it is printable ASCII of at most 50 characters,
    else `nx-` and a digest of it (the same for every attempt)."""
    if 0 < len(key) <= REQUEST_ID_MAX and key.isascii() and key.isprintable() and " " not in key:
        return key
    return "nx-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def to_json(value: Any) -> bytes:
    """`value` as JSON, `Decimal` amounts written as numbers digit for digit (QuickBooks takes decimal numbers;
    they never pass through a float)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("amounts are finite numbers")
        return format(value, "f").encode()
    if isinstance(value, Mapping):
        return b"{" + b",".join(orjson.dumps(str(k)) + b":" + to_json(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(to_json(v) for v in value) + b"]"
    if isinstance(value, float):
        raise TypeError("amounts are Decimals, never floats")
    return orjson.dumps(value)


def classify(response: httpx.Response) -> str | None:
    if response.status_code == 429:
        return "rate_limited"
    return None


def discover_tenants(ctx: TenantContext) -> list[Tenant]:
    """One authorisation reaches one company: the `realmId` on the callback."""
    realm = ctx.callback.get("realmId")
    return [Tenant(external_id=realm, name=f"QuickBooks company {realm}")] if realm else []


class QuickBooksApi:
    """One company's (realm's) invoices, customers and payments, read window by window."""

    def __init__(self, ctx: ClientContext) -> None:
        if ctx.tokens is None:
            raise ValueError("the QuickBooks client needs the connection's token manager")
        connection = ctx.connection
        if not connection.external_tenant:
            raise AuthenticationFailed("the connection has no QuickBooks realm id",
                                       provider="quickbooks", connection_id=connection.id)  # fmt: skip
        settings = connection.settings or {}
        root = api_root(connection.base_url, str(settings.get("environment", "sandbox")))
        wait = float(settings.get("throttle_wait_seconds", THROTTLE_WAIT_SECONDS))
        self.http = HttpClient(
            provider="quickbooks",
            name="QuickBooks",
            connection_id=connection.id,
            base_url=f"{root}/v3/company/{connection.external_tenant}",
            headers={"Accept": "application/json"},
            auth=BearerAuth(ctx.tokens),
            requests_per_second=float(settings.get("requests_per_second", DEFAULT_REQUESTS_PER_SECOND)),
            stats=ctx.stats,
            classify=classify,
            retry_hint=lambda response: wait if response.status_code == 429 else None,
        )
        self.page_size = int(settings.get("page_size", PAGE_SIZE))

    def __enter__(self) -> QuickBooksApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _get(self, path: str, **params: str) -> dict[str, Any]:
        response = self.http.send("GET", path, params={**params, "minorversion": MINOR_VERSION})
        return self._body(response, f"GET {path}")

    def _body(self, response: httpx.Response, endpoint: str) -> dict[str, Any]:
        body = orjson.loads(response.content)
        if isinstance(body, dict) and ("Fault" in body or "fault" in body):
            raise ProviderError(_fault_message(response.content) or "fault", provider="quickbooks",
                                connection_id=self.http.connection_id, endpoint=endpoint,
                                status=response.status_code)  # fmt: skip
        return body

    def write(self, entity: str, body: Mapping[str, Any], *, request_id: str,
              operation: str | None = None) -> dict[str, Any]:  # fmt: skip
        """POST `body` to `/<entity>` (create; `operation` `void` or `delete` for those) with `request_id`, and
        return the `entity` object QuickBooks answers. Retried on 5xx, 429 and dropped connections under the
        same `request_id`, which QuickBooks answers with its first answer; a fault raises `ProviderError` with
        the HTTP status and QuickBooks' code and message."""
        if len(request_id) > REQUEST_ID_MAX:
            raise ValueError(f"a QuickBooks requestid holds at most {REQUEST_ID_MAX} characters")
        path = f"/{entity.lower()}"
        params = {"minorversion": MINOR_VERSION, "requestid": request_id}
        if operation:
            params["operation"] = operation
        endpoint = f"POST {path}" + (f"?operation={operation}" if operation else "")
        try:
            response = self.http.send("POST", path, params=params, content=to_json(body),
                                      headers={"Content-Type": "application/json"})  # fmt: skip
        except ProviderError as exc:
            fault = _fault_message(exc.response.content) if exc.response is not None else None
            if fault is None or type(exc) is not ProviderError:
                raise
            raise ProviderError(fault, provider="quickbooks", connection_id=self.http.connection_id,
                                endpoint=endpoint, status=exc.status) from None  # fmt: skip
        answer = self._body(response, endpoint).get(entity)
        if not isinstance(answer, dict):
            raise ProviderError(f"the answer holds no {entity}", provider="quickbooks",
                                connection_id=self.http.connection_id, endpoint=endpoint,
                                status=response.status_code)  # fmt: skip
        return answer

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Invoices changed in the window, then the window's hard deletes (inside CDC's 30 days)."""
        yield from self._changed("Invoice", window)
        yield from self._deleted("Invoice", window)

    def customers(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Customers changed in the window, inactive ones included, then those merged away in it (CDC)."""
        yield from self._changed("Customer", window)
        yield from self._deleted("Customer", window)

    def payments(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Payments changed in the window, then the window's hard deletes (inside CDC's 30 days)."""
        yield from self._changed("Payment", window)
        yield from self._deleted("Payment", window)

    def _changed(self, entity: str, window: SyncWindow) -> Iterator[list[Record]]:
        """`entity`'s records updated in the window, paged by updated time (name lists: inactive ones too)."""
        every = NAME_LIST_EVERY if entity in NAME_LISTS else ""

        def fetch(cursor: datetime, page: int) -> list[dict[str, Any]]:
            query = (
                f"SELECT * FROM {entity} WHERE MetaData.LastUpdatedTime >= '{_iso(cursor)}' "
                f"AND MetaData.LastUpdatedTime < '{_iso(window.end)}'{every} ORDER BY MetaData.LastUpdatedTime ASC "
                f"STARTPOSITION {page * self.page_size + 1} MAXRESULTS {self.page_size}"
            )
            return self._get("/query", query=query).get("QueryResponse", {}).get(entity) or []

        yield from updated_keyset_pages(
            fetch, window, page_size=self.page_size, id_of=lambda raw: str(raw["Id"]), updated_of=updated_at
        )

    def _changed_since(self, entity: str, since: datetime) -> list[dict[str, Any]]:
        """Change Data Capture's `entity` records (full records and `Deleted` stubs) changed since `since`."""
        body = self._get("/cdc", entities=entity, changedSince=_iso(since))
        objects: list[dict[str, Any]] = []
        for cdc in body.get("CDCResponse") or []:
            for response in cdc.get("QueryResponse") or []:
                objects.extend(response.get(entity) or [])
        if len(objects) >= CDC_MAX_OBJECTS:
            log.warning("quickbooks connection %s: change data capture of %s since %s hit its %d-object cap; "
                        "deletions older in that range may be missing", self.http.connection_id, entity, since,
                        CDC_MAX_OBJECTS)  # fmt: skip
        return objects

    def _deleted(self, entity: str, window: SyncWindow) -> Iterator[list[Record]]:
        if window.start < datetime.now(UTC) - CDC_RETENTION + timedelta(minutes=5):
            return
        objects = self._changed_since(entity, window.start)
        stubs = [(raw, updated_at(raw)) for raw in objects if is_deleted_stub(raw)]
        in_window = [(raw, at) for raw, at in stubs if window.start <= at < window.end]
        if in_window:
            yield in_window

    def records_by_id(self, entity: str, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The current state of these `entity` records, each id asked once and up to a page of ids per query.

        Query and read-one find nothing of a hard-deleted (or merged-away) record, so an id absent from
        the answer is gone or unknown; `deleted_records` says which. Name lists include inactive rows.
        """
        wanted = sorted({str(i) for i in ids}, key=lambda i: (len(i), i))
        bad = [i for i in wanted if not i.isdigit()]
        if bad:
            raise ValueError(f"QuickBooks ids are numeric strings, not {bad[:3]}")
        every = NAME_LIST_EVERY if entity in NAME_LISTS else ""
        found: list[dict[str, Any]] = []
        size = min(self.page_size, PAGE_SIZE)
        for start in range(0, len(wanted), size):
            chunk = wanted[start : start + size]
            listed = ", ".join(f"'{i}'" for i in chunk)
            query = f"SELECT * FROM {entity} WHERE Id IN ({listed}){every} STARTPOSITION 1 MAXRESULTS {len(chunk)}"
            response = self.http.send("POST", "/query", params={"minorversion": MINOR_VERSION}, content=query,
                                      headers={"Content-Type": "application/text"})  # fmt: skip
            found.extend(self._body(response, "POST /query").get("QueryResponse", {}).get(entity) or [])
        return found

    def deleted_records(self, entity: str, ids: Collection[str], since: datetime) -> list[dict[str, Any]]:
        """Change Data Capture's `status: "Deleted"` stubs of these `entity` ids deleted since `since`.

        The only way QuickBooks says a record is gone; `since` is moved inside CDC's 30-day look-back.
        """
        earliest = datetime.now(UTC) - CDC_RETENTION + timedelta(minutes=5)
        wanted = {str(i) for i in ids}
        objects = self._changed_since(entity, max(since, earliest))
        return [raw for raw in objects if is_deleted_stub(raw) and str(raw.get("Id")) in wanted]

    def invoices_by_id(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """The current state of these invoices (`records_by_id`)."""
        return self.records_by_id("Invoice", ids)

    def deleted_invoices(self, ids: Collection[str], since: datetime) -> list[dict[str, Any]]:
        """Change Data Capture's stubs of these invoices deleted since `since` (`deleted_records`)."""
        return self.deleted_records("Invoice", ids, since)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
