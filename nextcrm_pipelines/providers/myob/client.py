"""MYOB Business API (AccountRight Live, v2) client: company file per connection, OData windows.

Every call carries the MYOB headers: `x-myobapi-key` (the app's API key, i.e. its client id),
`x-myobapi-version: v2` and, when the company file has sign-in credentials, `x-myobapi-cftoken`
(base64 of user:password, stored encrypted). A day's window is read from `{cf_uri}/Sale/Invoice`
with `$filter=LastModified ge datetime'...' and LastModified lt datetime'...'`, `$orderby=LastModified`,
`$top=1000` and `$skip`, paging by updated time (`core.paging`). MYOB keeps no tombstones, so
`invoice_ids` lists every current invoice id for the deletion sweep. The limits are per API key
(8 calls a second, a daily cap answered with 403 `RateLimitError`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import orjson

from nextcrm_pipelines.core.connect import Tenant, TenantContext
from nextcrm_pipelines.core.http import HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow
from nextcrm_pipelines.providers.myob.records import updated_at

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


class MyobApi:
    """One company file's invoices, read window by window."""

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

    def __enter__(self) -> MyobApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def invoices(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Invoices of every layout created or changed in the window."""

        def fetch(cursor: datetime, page: int) -> list[dict[str, Any]]:
            params = {
                "$filter": f"LastModified ge {_literal(cursor)} and LastModified lt {_literal(window.end)}",
                "$orderby": "LastModified",
                "$top": str(self.page_size),
                "$skip": str(page * self.page_size),
            }
            return self.http.get_json("/Sale/Invoice", params=params).get("Items") or []

        yield from updated_keyset_pages(
            fetch, window, page_size=self.page_size, id_of=lambda raw: str(raw["UID"]), updated_of=updated_at
        )

    def invoice_ids(self) -> Iterator[list[str]]:
        """Every current invoice id, page by page (ordered by id so paging is stable)."""
        skip = 0
        while True:
            params = {"$orderby": "UID", "$top": str(self.page_size), "$skip": str(skip)}
            items = self.http.get_json("/Sale/Invoice", params=params).get("Items") or []
            if items:
                yield [str(item["UID"]) for item in items]
            if len(items) < self.page_size:
                return
            skip += len(items)

    def invoice_gone(self, uid: str, stored: dict[str, Any]) -> bool:
        """Whether MYOB answers 404 for the invoice (read through its layout's endpoint)."""
        layout = stored.get("InvoiceType") or "Item"
        try:
            self.http.send("GET", f"/Sale/Invoice/{layout}/{uid}")
        except ProviderError as exc:
            if exc.status == 404:
                return True
            raise
        return False
