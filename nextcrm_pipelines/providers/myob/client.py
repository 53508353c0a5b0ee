"""MYOB Business API (AccountRight Live, v2) client: company file per connection, OData windows.

Every call carries the MYOB headers: `x-myobapi-key` (the app's API key, i.e. its client id),
`x-myobapi-version: v2` and, when the company file has sign-in credentials, `x-myobapi-cftoken`
(base64 of user:password, stored encrypted). A day's window of a collection is read with
`$filter=LastModified ge datetime'...' and LastModified lt datetime'...'`, `$orderby=LastModified`,
`$top=1000` and `$skip`, paging by updated time (`core.paging`). Invoices are read layout by layout
(`/Sale/Invoice/Item`, `/Service`, `/Professional`, `/TimeBilling`, `/Miscellaneous`): the generic
`/Sale/Invoice` lists every layout but without the invoices' `Lines`. Customers come from
`/Contact/Customer` (inactive cards included), payments received from `/Sale/CustomerPayment`.
MYOB keeps no tombstones, so `invoice_ids`, `customer_ids` and `payment_ids` list every current id
for the deletion sweep. The limits are per API key (8 calls a second, a daily cap answered with 403
`RateLimitError`).

Writes (the outbox's actions, `providers/myob/actions.py`): MYOB takes no idempotency key, so `create`
POSTs once (never repeated when MYOB may have acted) and reads the new record back from the `Location`
of MYOB's bodiless `201 Created`; `matching` looks records up by an OData `$filter`. A refusal (4xx)
is raised with MYOB's own `Errors` messages.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson

from nextcrm_pipelines.core.connect import Tenant, TenantContext
from nextcrm_pipelines.core.http import HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow
from nextcrm_pipelines.providers.myob.records import LAYOUTS, invoice_layout, updated_at

PAGE_SIZE = 1000
DEFAULT_REQUESTS_PER_SECOND = 7.0  # 8 per second per API key
SCOPES = ("sme-company-file", "sme-sales", "sme-contacts-customer")

OAUTH = OAuthSpec(
    provider="myob",
    hosts={"secure": "https://secure.myob.com", "api": "https://api.myob.com"},
    authorize=("secure", "/oauth2/account/authorize"),
    token=("secure", "/oauth2/v1/authorize"),
    scopes=SCOPES,
    env_prefix="MYOB",
    pkce=False,
    client_auth="client_secret_post",
    # Keys issued since March 2025 get the company file's id on the redirect only with prompt=consent.
    authorize_params={"prompt": "consent"},
    exchange_params={"scope": " ".join(SCOPES)},
)


def classify(response: httpx.Response) -> str | None:
    """MYOB's `RateLimitError` (in its `Errors` list): the daily cap is final until it resets, the
    per-second one passes."""
    if response.status_code not in (403, 429):
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    errors = body.get("Errors") if isinstance(body, dict) else None
    for error in errors if isinstance(errors, list) else [body]:
        if isinstance(error, dict) and error.get("Name") == "RateLimitError":
            return "daily_limit" if "daily" in str(error.get("Message", "")).lower() else "rate_limited"
    return None


def _headers(client_id: str, cftoken: str | None) -> dict[str, str]:
    headers = {"x-myobapi-key": client_id, "x-myobapi-version": "v2", "Accept": "application/json"}
    if cftoken:
        headers["x-myobapi-cftoken"] = cftoken
    return headers


def company_file_token() -> dict[str, str]:
    """The company file's sign-in as `x-myobapi-cftoken`, from MYOB_COMPANY_FILE_USERNAME/_PASSWORD."""
    user = os.environ.get("MYOB_COMPANY_FILE_USERNAME", "")
    if not user:
        return {}
    password = os.environ.get("MYOB_COMPANY_FILE_PASSWORD", "")
    return {"cftoken": base64.b64encode(f"{user}:{password}".encode()).decode()}


def discover_tenants(ctx: TenantContext) -> list[Tenant]:
    """The company file of the consent (`businessId` on the redirect), or the files listed for legacy keys."""
    api = OAUTH.url("api", "/accountright", ctx.base_url)
    secrets = company_file_token()
    business = ctx.callback.get("businessId")
    if business:
        name = ctx.callback.get("businessName") or business
        return [Tenant(business, name, {"company_file_uri": f"{api}/{business}"}, secrets)]
    headers = {"Authorization": f"Bearer {ctx.token['access_token']}", **_headers(ctx.app.client_id, None)}
    response = ctx.http.get(f"{api}/", headers=headers)
    if response.status_code != 200:
        raise ProviderError("listing company files failed", provider="myob", endpoint="GET /accountright/",
                            status=response.status_code)  # fmt: skip
    files = orjson.loads(response.content)
    return [Tenant(str(f["Id"]), f.get("Name") or str(f["Id"]), {"company_file_uri": f["Uri"]}, secrets) for f in files]


def _literal(moment: datetime) -> str:
    return moment.strftime("datetime'%Y-%m-%dT%H:%M:%S'")


def json_body(value: Any) -> bytes:
    """`value` as JSON, each `Decimal` written as the exact number it is (money never goes through a float)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("an amount must be a finite number")
        return format(value, "f").encode()
    if isinstance(value, dict):
        return b"{" + b",".join(orjson.dumps(str(k)) + b":" + json_body(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(json_body(v) for v in value) + b"]"
    return orjson.dumps(value)


def _is_uid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# The currency of a company file by its country (AccountRight files are Australian or New Zealand ones).
FILE_CURRENCIES = {"AU": "AUD", "NZ": "NZD"}
# ... or by its serial number's region prefix, for an answer without `Country`.
SERIAL_CURRENCIES = {"61": "AUD", "64": "NZD"}


def refusal(exc: ProviderError) -> ProviderError:
    """A 4xx from MYOB as a `ProviderError` whose message is MYOB's own (`Errors[].Name`, `Message` and
    `AdditionalDetails`, which name fields, not values); anything else as it was."""
    response = exc.response
    if type(exc) is not ProviderError or response is None or not 400 <= response.status_code < 500:
        return exc
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return exc
    errors = body.get("Errors") if isinstance(body, dict) else None
    found = []
    for error in errors if isinstance(errors, list) else [body]:
        if isinstance(error, dict) and (error.get("Name") or error.get("Message")):
            detail = f" ({error['AdditionalDetails']})" if error.get("AdditionalDetails") else ""
            found.append(f"{error.get('Name') or 'Error'}: {error.get('Message') or ''}{detail}")
    if not found:
        return exc
    refused = ProviderError(f"MYOB refused it: {'; '.join(found)[:1000]}", provider=exc.provider,
                            connection_id=exc.connection_id, endpoint=exc.endpoint, status=exc.status)  # fmt: skip
    refused.response = response
    return refused


class MyobApi:
    """One company file's invoices, customers and customer payments, read window by window."""

    def __init__(self, ctx: ClientContext) -> None:
        if ctx.tokens is None:
            raise ValueError("the MYOB client needs the connection's token manager")
        connection = ctx.connection
        settings = connection.settings or {}
        uri = settings.get("company_file_uri") or OAUTH.url(
            "api", f"/accountright/{connection.external_tenant}", connection.base_url
        )
        self.http = HttpClient(
            provider="myob",
            name="MYOB",
            connection_id=connection.id,
            base_url=str(uri),
            headers=_headers(ctx.tokens.client_id, ctx.tokens.secret("cftoken")),
            auth=BearerAuth(ctx.tokens),
            requests_per_second=float(settings.get("requests_per_second", DEFAULT_REQUESTS_PER_SECOND)),
            stats=ctx.stats,
            classify=classify,
        )
        self.page_size = int(settings.get("page_size", PAGE_SIZE))
        self.company_file_uri = str(uri).rstrip("/")
        self._file_currency: str | None = None

    def __enter__(self) -> MyobApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _changed(self, path: str, window: SyncWindow) -> Iterator[list[Record]]:
        """The records of collection `path` created or changed in the window, paged by updated time."""

        def fetch(cursor: datetime, page: int) -> list[dict[str, Any]]:
            params = {
                "$filter": f"LastModified ge {_literal(cursor)} and LastModified lt {_literal(window.end)}",
                "$orderby": "LastModified",
                "$top": str(self.page_size),
                "$skip": str(page * self.page_size),
            }
            return self.http.get_json(path, params=params).get("Items") or []

        yield from updated_keyset_pages(fetch, window, page_size=self.page_size, id_of=lambda raw: str(raw["UID"]),
                                        updated_of=updated_at, provider="myob")  # fmt: skip

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Invoices created or changed in the window, with their lines: each layout from its own endpoint."""
        for layout in LAYOUTS:
            yield from self._changed(f"/Sale/Invoice/{layout}", window)

    def customers(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Customer cards created or changed in the window, inactive ones included."""
        yield from self._changed("/Contact/Customer", window)

    def customer_payments(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Payments received from customers, recorded or changed in the window."""
        yield from self._changed("/Sale/CustomerPayment", window)

    def _ids(self, path: str) -> Iterator[list[str]]:
        """Every current id of collection `path`, page by page (ordered by id so paging is stable)."""
        skip = 0
        while True:
            params = {"$orderby": "UID", "$top": str(self.page_size), "$skip": str(skip)}
            items = self.http.get_json(path, params=params).get("Items") or []
            if items:
                yield [str(item["UID"]) for item in items]
            if len(items) < self.page_size:
                return
            skip += len(items)

    def invoice_ids(self) -> Iterator[list[str]]:
        """Every current invoice id, every layout (`/Sale/Invoice`: one listing, no lines)."""
        return self._ids("/Sale/Invoice")

    def customer_ids(self) -> Iterator[list[str]]:
        """Every current customer card id."""
        return self._ids("/Contact/Customer")

    def payment_ids(self) -> Iterator[list[str]]:
        """Every current customer payment id."""
        return self._ids("/Sale/CustomerPayment")

    def _gone(self, path: str) -> bool:
        try:
            self.http.send("GET", path)
        except ProviderError as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def invoice_gone(self, uid: str, stored: dict[str, Any]) -> bool:
        """Whether MYOB answers 404 for the invoice, read through its layout's endpoint."""
        layout = invoice_layout(stored)
        if layout is None:
            quoted = uid.replace("'", "''")
            listed = self.http.get_json("/Sale/Invoice", params={"$filter": f"UID eq guid'{quoted}'"})
            return not listed.get("Items")
        return self._gone(f"/Sale/Invoice/{layout}/{uid}")

    def customer_gone(self, uid: str, stored: dict[str, Any]) -> bool:
        """Whether MYOB answers 404 for the customer card."""
        return self._gone(f"/Contact/Customer/{uid}")

    def payment_gone(self, uid: str, stored: dict[str, Any]) -> bool:
        """Whether MYOB answers 404 for the customer payment."""
        return self._gone(f"/Sale/CustomerPayment/{uid}")

    # --- writes (the outbox's actions) --------------------------------------------------------------

    def record(self, path: str) -> dict[str, Any]:
        """One record (`/Contact/Customer/{uid}`...); a 4xx raised with MYOB's message."""
        try:
            return self.http.get_json(path)
        except ProviderError as exc:
            raise refusal(exc) from None

    def matching(self, path: str, odata_filter: str) -> list[dict[str, Any]]:
        """The records of collection `path` that an OData `$filter` selects (a reference is one or two)."""
        try:
            return self.http.get_json(path, params={"$filter": odata_filter, "$top": "10"}).get("Items") or []
        except ProviderError as exc:
            raise refusal(exc) from None

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a new record to collection `path` and return it as MYOB then serves it.

        The POST is sent once: MYOB takes no idempotency key, so a timeout, a dropped connection or a 5xx is
        raised at once (the outbox looks the record up by its reference before anything is sent again); only a
        request MYOB surely turned away unread (429, its per-second `RateLimitError`) is repeated. MYOB answers
        `201 Created` with the new record's URI as `Location` and no body; it is read from there, so the mirror
        gets exactly what the sync reads. Only the company file's own URI is followed (the request carries the
        connection's token): a `Location` on another host is read as `{path}/{UID}` of this company file."""
        try:
            response = self.http.send("POST", path, once=True, content=json_body(body),
                                      headers={"Content-Type": "application/json"})  # fmt: skip
        except ProviderError as exc:
            raise refusal(exc) from None
        location = (response.headers.get("Location") or "").rstrip("/")
        base, uid = self.company_file_uri, location.rsplit("/", 1)[-1]
        if location.lower().startswith(base.lower() + "/"):
            return self.record(location[len(base) :])
        if location.lower().endswith(f"{path}/{uid}".lower()) and _is_uid(uid):
            return self.record(f"{path}/{uid}")
        raise ProviderError("MYOB accepted the record but its Location names no record of the company file",
                            provider="myob", connection_id=self.http.connection_id, endpoint=f"POST {path}",
                            status=response.status_code)  # fmt: skip

    def file_currency(self) -> str | None:
        """The company file's own currency (AUD or NZD, by the file's country), read once; None if MYOB does
        not say."""
        if self._file_currency is None:
            info = self.record("/")
            country = str(info.get("Country") or "").upper()
            serial = str(info.get("SerialNumber") or "")
            self._file_currency = FILE_CURRENCIES.get(country) or SERIAL_CURRENCIES.get(serial[:2]) or ""
        return self._file_currency or None
