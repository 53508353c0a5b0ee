"""Xero Accounting API 2.0 client: OAuth tokens, tenant header, rate limits, windowed reads.

Invoices, contacts and payments are read the same way; payments (`GET /Payments`) include DELETED ones,
which Xero keeps readable with a new `UpdatedDateUTC`.

Every call carries `xero-tenant-id` (one connection per organisation) and `Accept: application/json`.
A day's window is read with `If-Modified-Since` (the cursor, a second early since Xero's precision is
a second) and `where=UpdatedDateUTC<DateTime(...)` (the window's end), `order=UpdatedDateUTC ASC`,
`page` + `pageSize=1000` (with `page`, invoices carry their line items), paging by updated time so
that edits during the read neither skip nor repeat records (`core.paging`). Webhook re-fetches read
many records per call with `IDs` (paged, so they match what a sync reads). Xero allows 60 calls per
minute per organisation: the client paces itself just under that, waits out a minute 429 for the
`Retry-After` Xero sends, and fails at once with the reset time when the day limit is spent.

Writes (`write`, for the outbox's actions) send JSON with exact decimal numbers and the action's key as
`Idempotency-Key` on every attempt: Xero answers a repeated key with its first answer for six minutes, so
the client's own retries of a 5xx or a dropped answer never act twice. Xero's refusals (`ValidationException`
and its `Elements[].ValidationErrors`, its plain 404) become `ProviderError`s with the HTTP status and Xero's
messages, the request's personal data (names, emails, phones) taken out of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson

from nextcrm_pipelines.core.connect import Tenant, TenantContext
from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, NotGranted, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow
from nextcrm_pipelines.providers.xero.records import updated_at

PAGE_SIZE = 1000
# Xero's gateway refuses an `IDs` list longer than about 52 GUIDs (the URL gets too long: 404).
IDS_PER_REQUEST = 50
# 60 calls per minute per organisation, in fixed windows: stay a little under one per second.
DEFAULT_REQUESTS_PER_SECOND = 0.95

OAUTH = OAuthSpec(
    provider="xero",
    hosts={"login": "https://login.xero.com", "identity": "https://identity.xero.com", "api": "https://api.xero.com"},
    authorize=("login", "/identity/connect/authorize"),
    token=("identity", "/connect/token"),
    # Granular scopes: apps created since March 2026 may not ask for accounting.transactions. The write scopes
    # (invoices, contacts) include reading them; payments are only read.
    scopes=("offline_access", "accounting.invoices", "accounting.contacts", "accounting.payments.read"),
    env_prefix="XERO",
    pkce=True,
    client_auth="client_secret_basic",
)


# What reading payments takes: the granular scope, or the broad one older grants hold.
PAYMENT_READ_SCOPES = ("accounting.payments.read", "accounting.payments", "accounting.transactions",
                       "accounting.transactions.read")  # fmt: skip


def classify(response: httpx.Response) -> str | None:
    """Xero names the limit it enforced: the day limit is final until its reset, the others pass. A 401 whose
    detail is `AuthorizationUnsuccessful` (not `TokenExpired` or `AuthenticationUnsuccessful`) is a token that
    works but lacks the scope of what it asked for."""
    if response.status_code == 429:
        return "daily_limit" if response.headers.get("x-rate-limit-problem", "").lower() == "day" else "rate_limited"
    if response.status_code == 401:
        try:
            detail = orjson.loads(response.content).get("Detail")
        except (orjson.JSONDecodeError, AttributeError):
            detail = None
        if detail == "AuthorizationUnsuccessful":
            return "not_granted"
    return None


def _datetime_literal(moment: datetime) -> str:
    return moment.strftime("DateTime(%Y,%m,%d,%H,%M,%S)")


def discover_tenants(ctx: TenantContext) -> list[Tenant]:
    """The organisations the new grant reaches (`GET /connections`), one connection each."""
    url = OAUTH.url("api", "/connections", ctx.base_url)
    response = ctx.http.get(url, headers={"Authorization": f"Bearer {ctx.token['access_token']}",
                                          "Accept": "application/json"})  # fmt: skip
    if response.status_code != 200:
        raise ProviderError("listing the authorised organisations failed", provider="xero",
                            endpoint="GET /connections", status=response.status_code)  # fmt: skip
    return [
        Tenant(
            external_id=item["tenantId"],
            name=item.get("tenantName") or item["tenantId"],
            settings={"tenant_type": item.get("tenantType"), "xero_connection_id": item.get("id")},
        )
        for item in orjson.loads(response.content)
        if item.get("tenantType", "ORGANISATION") == "ORGANISATION"
    ]


class XeroApi:
    """One organisation's invoices, contacts and payments, read window by window."""

    def __init__(self, ctx: ClientContext) -> None:
        if ctx.tokens is None:
            raise ValueError("the Xero client needs the connection's token manager")
        connection = ctx.connection
        if not connection.external_tenant:
            raise AuthenticationFailed("the connection has no Xero tenant id", provider="xero",
                                       connection_id=connection.id)  # fmt: skip
        settings = connection.settings or {}
        self.http = HttpClient(
            provider="xero",
            name="Xero",
            connection_id=connection.id,
            base_url=OAUTH.url("api", "/api.xro/2.0", connection.base_url),
            headers={"Accept": "application/json", "xero-tenant-id": connection.external_tenant},
            auth=BearerAuth(ctx.tokens),
            requests_per_second=float(settings.get("requests_per_second", DEFAULT_REQUESTS_PER_SECOND)),
            stats=ctx.stats,
            classify=classify,
        )
        self.page_size = int(settings.get("page_size", PAGE_SIZE))
        self._tokens = ctx.tokens

    def __enter__(self) -> XeroApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _changed(self, resource: str, id_field: str, window: SyncWindow, **params: str) -> Iterator[list[Record]]:
        def fetch(cursor: datetime, page: int) -> list[dict[str, Any]]:
            since = (cursor - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
            query = {
                **params,
                "page": str(page + 1),
                "pageSize": str(self.page_size),
                "order": "UpdatedDateUTC ASC",
                "where": f"UpdatedDateUTC<{_datetime_literal(window.end)}",
            }
            data = self.http.get_json(f"/{resource}", params=query, headers={"If-Modified-Since": since})
            return data.get(resource) or []

        yield from updated_keyset_pages(
            fetch, window, page_size=self.page_size, id_of=lambda raw: raw[id_field], updated_of=updated_at
        )

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Sales invoices and bills created or changed in the window, voided and deleted included."""
        return self._changed("Invoices", "InvoiceID", window)

    def contacts(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Contacts created or changed in the window, archived ones included."""
        return self._changed("Contacts", "ContactID", window, includeArchived="true")

    def payments(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Payments made or changed in the window, deleted ones included. A grant made before NextCRM read
        payments lacks their scope: that is said without asking Xero, and the connection's other entities go on."""
        if self.lacks_scope(PAYMENT_READ_SCOPES):
            raise NotGranted(f"the connection's Xero grant lacks the scope {PAYMENT_READ_SCOPES[0]} (it was authorised "
                             "before NextCRM read payments)", provider="xero", connection_id=self.http.connection_id,
                             endpoint="GET /Payments")  # fmt: skip
        return self._changed("Payments", "PaymentID", window)

    def _by_id(self, resource: str, ids: Sequence[str], **params: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), IDS_PER_REQUEST):
            chunk = ids[start : start + IDS_PER_REQUEST]
            query = {**params, "IDs": ",".join(chunk), "page": "1", "pageSize": str(IDS_PER_REQUEST)}
            found.extend(self.http.get_json(f"/{resource}", params=query).get(resource) or [])
        return found

    def _one(self, resource: str, record_id: str) -> dict[str, Any] | None:
        try:
            data = self.http.get_json(f"/{resource}/{record_id}")
        except ProviderError as exc:
            if exc.status == 404:
                return None
            raise
        records = data.get(resource) or []
        return records[0] if records else None

    def invoices_by_id(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The current state of these invoices (any type or status), many per call; unknown ids are absent."""
        return self._by_id("Invoices", ids)

    def contacts_by_id(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The current state of these contacts, archived ones included, many per call; unknown ids are absent."""
        return self._by_id("Contacts", ids, includeArchived="true")

    def invoice(self, invoice_id: str) -> dict[str, Any] | None:
        """One invoice by id (`GET /Invoices/{id}`), or None when Xero answers 404."""
        return self._one("Invoices", invoice_id)

    def contact(self, contact_id: str) -> dict[str, Any] | None:
        """One contact by id (`GET /Contacts/{id}`), or None when Xero answers 404."""
        return self._one("Contacts", contact_id)

    def granted_scopes(self) -> frozenset[str] | None:
        """The scopes the connection's grant holds, as Xero's token answer listed them (None: not recorded)."""
        scope = self._tokens.secret("scope") if self._tokens is not None else None
        return frozenset(scope.split()) if scope else None

    def lacks_scope(self, any_of: Iterable[str]) -> bool:
        """Whether the grant's recorded scopes hold none of `any_of` (False when no scopes are on record)."""
        granted = self.granted_scopes()
        return granted is not None and not granted & set(any_of)

    def write(self, method: str, resource: str, elements: list[dict[str, Any]], idempotency_key: str, *,
              record_id: str | None = None, params: Mapping[str, str] | None = None,
              personal: Iterable[str] = ()) -> dict[str, Any]:  # fmt: skip
        """`PUT`/`POST /{resource}[/{record_id}]` with `{resource: elements}`, `idempotency_key` on every attempt;
        returns the first element Xero answers. `personal` are the request's strings to keep out of errors."""
        path = f"/{resource}" + (f"/{record_id}" if record_id else "")
        headers = {"Content-Type": "application/json", "Idempotency-Key": xero_idempotency_key(idempotency_key)}
        body = exact_json({resource: elements}).encode()
        try:
            response = self.http.send(method, path, params=dict(params or {}), content=body, headers=headers)
        except ProviderError as exc:
            status = exc.status
            if exc.response is None or status is None or not 400 <= status < 500 or status in (408, 429):
                raise
            raise ProviderError(refusal(exc.response, resource, record_id, personal), provider="xero",
                                connection_id=exc.connection_id, endpoint=exc.endpoint,
                                status=status) from None  # fmt: skip
        answered = orjson.loads(response.content).get(resource) or []
        if not answered:
            raise ProviderError(f"Xero answered no {resource}", provider="xero",
                                connection_id=self.http.connection_id, endpoint=f"{method} {path}",
                                status=response.status_code)  # fmt: skip
        return dict(answered[0])

    def contacts_where(self, where: str) -> list[dict[str, Any]]:
        """Contacts (archived ones included) matching a `where`, as a sync reads them (first page of 100)."""
        query = {"where": where, "includeArchived": "true", "page": "1"}
        return list(self.http.get_json("/Contacts", params=query).get("Contacts") or [])

    def invoices_numbered(self, number: str) -> list[dict[str, Any]]:
        """Invoices and bills with this number, as a sync reads them."""
        query = {"InvoiceNumbers": number, "page": "1"}
        return list(self.http.get_json("/Invoices", params=query).get("Invoices") or [])


# Xero takes an `Idempotency-Key` of at most 128 characters.
IDEMPOTENCY_KEY_MAX = 128


def xero_idempotency_key(key: str) -> str:
    """The outbox key as Xero takes it: itself when it fits (128 printable ASCII characters), else a digest of it
    (the same on every attempt)."""
    if 0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable():
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()


def exact_json(value: Any) -> str:
    """JSON with `Decimal`s as exact JSON numbers (never through a float)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("amounts must be finite")
        return format(value, "f")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{orjson.dumps(str(k)).decode()}:{exact_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(exact_json(v) for v in value) + "]"
    return orjson.dumps(value).decode()


def _messages(node: Any, found: list[str]) -> list[str]:
    """Every `ValidationErrors[].Message` in an error body, nested line items included, each once."""
    if isinstance(node, Mapping):
        for error in node.get("ValidationErrors") or []:
            message = error.get("Message") if isinstance(error, Mapping) else None
            if message and message not in found:
                found.append(str(message))
        for key, value in node.items():
            if key != "ValidationErrors":
                _messages(value, found)
    elif isinstance(node, list):
        for item in node:
            _messages(item, found)
    return found


def refusal(response: httpx.Response, resource: str, record_id: str | None, personal: Iterable[str] = ()) -> str:
    """Xero's reason for refusing a write, in its own words, without the request's personal data."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, Mapping) and (body.get("Type") or body.get("Message")):
        messages = _messages(body.get("Elements") or [], [])
        text = f"{body.get('Type') or 'Error'}: " + ("; ".join(messages) or str(body.get("Message") or ""))
    elif isinstance(body, Mapping) and (body.get("Title") or body.get("Detail")):
        text = f"{body.get('Title') or 'Error'}: {body.get('Detail') or ''}"
    elif response.status_code == 404:
        what = resource.rstrip("s").lower()
        text = f"Xero knows no such {what}" + (f" ({record_id})" if record_id else "") + " or a record it names"
    else:
        text = response.text[:300] or f"HTTP {response.status_code}"
    for value in sorted({p for p in personal if p and len(p) >= 2}, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text[:1500]
