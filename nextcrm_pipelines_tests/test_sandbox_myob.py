"""Tests of the MYOB emulator in ``nextcrm_sandbox.myob``, driven over real loopback HTTP.

Each test plays a client of the real MYOB Business API (httpx, authlib's OAuth2Client) against the
sandbox: the consent redirect of new and legacy API keys, the token endpoint's quirks, the required
headers, OData paging and filters over sale invoices and customer cards, ETags, hard deletes, the
per-key limits and injected faults, and the control API the sync tests build on.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client

from nextcrm_sandbox.myob import (
    LAYOUTS,
    MyobControl,
    format_myob_datetime,
    parse_myob_datetime,
)
from nextcrm_sandbox.server import SandboxServer

NOW = 1_770_000_000  # 2026-02-02T02:40:00Z
REDIRECT = "http://127.0.0.1:8765/callback"
CF_TOKEN = base64.b64encode(b"Administrator:").decode()
STAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?$")


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def control(server: SandboxServer) -> MyobControl:
    return MyobControl(server)


@pytest.fixture(scope="module")
def http(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def reader(control: MyobControl) -> dict[str, Any]:
    """An unthrottled new-generation key with one 600-invoice company file and a token for it."""
    key = "key-reader"
    control.add_client(key, "secret-reader", requests_per_second=0)
    tenant = control.add_tenant(key, seed=7, invoices=600, customers=40, days=60)
    grant = control.grant(key, tenant["id"])
    return {"key": key, "tenant": tenant, "cf": tenant["cf_uri"], "token": grant["token"]["access_token"]}


def api_headers(key: str, token: str, cftoken: str | None = CF_TOKEN) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "x-myobapi-key": key, "x-myobapi-version": "v2"}
    if cftoken is not None:
        headers["x-myobapi-cftoken"] = cftoken
    return headers


def get(http: httpx.Client, ctx: dict[str, Any], path: str, **params: Any) -> httpx.Response:
    url = path if path.startswith("http") else f"{ctx['cf']}{path}"
    return http.get(url, params=params or None, headers=api_headers(ctx["key"], ctx["token"]))


def new_app(control: MyobControl, **knobs: Any) -> str:
    key = f"key-{uuid.uuid4().hex[:10]}"
    control.add_client(key, "s3cret", **knobs)
    return key


def authorize(http: httpx.Client, key: str, **params: str) -> httpx.Response:
    query = {"client_id": key, "redirect_uri": REDIRECT, "response_type": "code", "scope": "sme-company-file sme-sales"}
    return http.get("/myob/secure/oauth2/account/authorize", params={**query, **params})


def redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}


def exchange(http: httpx.Client, key: str, code: str, secret: str = "s3cret") -> httpx.Response:
    form = {"client_id": key, "client_secret": secret, "grant_type": "authorization_code", "code": code,
            "redirect_uri": REDIRECT, "scope": "sme-company-file sme-sales"}  # fmt: skip
    return http.post("/myob/secure/oauth2/v1/authorize", data=form)


def refresh(http: httpx.Client, key: str, refresh_token: str) -> httpx.Response:
    form = {"client_id": key, "client_secret": "s3cret", "grant_type": "refresh_token", "refresh_token": refresh_token}
    return http.post("/myob/secure/oauth2/v1/authorize", data=form)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"Errors", "Information"}
    return body["Errors"][0]


def walk(http: httpx.Client, ctx: dict[str, Any], path: str, **params: Any) -> list[dict[str, Any]]:
    """Follow NextPageLink from the first page to the end, as a MYOB client does."""
    response = get(http, ctx, path, **params)
    items: list[dict[str, Any]] = []
    while True:
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["Items"]
        if not page["NextPageLink"]:
            return items
        response = get(http, ctx, page["NextPageLink"])


# --- OAuth: authorize, token, refresh ---------------------------------------------------------------------


def test_new_key_redirect_carries_business_id_only_with_prompt_consent(control: MyobControl, http: httpx.Client):
    key = new_app(control)
    first = control.add_tenant(key, seed=1, invoices=5, customers=2, name="First Pty Ltd")
    second = control.add_tenant(key, seed=2, invoices=5, customers=2, name="Second Pty Ltd")

    with_consent = redirect_params(authorize(http, key, state="xyz", prompt="consent"))
    assert with_consent["state"] == "xyz"
    assert with_consent["code"]
    assert with_consent["businessId"] == second["id"]  # the most recently added file
    assert with_consent["businessName"] == "Second Pty Ltd"

    chosen = redirect_params(authorize(http, key, prompt="consent", sandbox_tenant=first["id"]))
    assert chosen["businessId"] == first["id"]

    silent = redirect_params(authorize(http, key, state="abc"))
    assert silent["code"] and silent["state"] == "abc"
    assert "businessId" not in silent and "businessName" not in silent


def test_new_key_refuses_company_file_scope_and_legacy_key_accepts_it(control: MyobControl, http: httpx.Client):
    new_key = new_app(control)
    control.add_tenant(new_key, seed=3, invoices=2, customers=1)
    refused = redirect_params(authorize(http, new_key, scope="CompanyFile", state="s1"))
    assert refused == {"error": "invalid_scope", "state": "s1"}

    legacy_key = new_app(control, key_mode="legacy")
    control.add_tenant(legacy_key, seed=3, invoices=2, customers=1)
    accepted = redirect_params(authorize(http, legacy_key, scope="CompanyFile", prompt="consent"))
    assert accepted["code"]
    assert "businessId" not in accepted  # legacy keys find their files at GET /accountright/


def test_company_file_list_is_empty_for_new_keys_and_lists_files_for_legacy_keys(
    control: MyobControl, http: httpx.Client, server: SandboxServer
):
    legacy = new_app(control, key_mode="legacy", requests_per_second=0)
    files = [control.add_tenant(legacy, seed=s, invoices=3, customers=1, name=f"Legacy {s}") for s in (4, 5)]
    token = control.grant(legacy)["token"]["access_token"]
    listed = http.get("/myob/api/accountright/", headers=api_headers(legacy, token, None))
    assert listed.status_code == 200
    assert [f["Id"] for f in listed.json()] == [f["id"] for f in files]
    assert listed.json()[0]["Name"] == "Legacy 4"
    assert listed.json()[0]["Uri"] == f"{server.url}/myob/api/accountright/{files[0]['id']}"
    invoices = http.get(f"{listed.json()[1]['Uri']}/Sale/Invoice", headers=api_headers(legacy, token))
    assert invoices.status_code == 200 and invoices.json()["Count"] == 3

    new_key = new_app(control, requests_per_second=0)
    control.add_tenant(new_key, seed=4, invoices=3, customers=1)
    token = control.grant(new_key)["token"]["access_token"]
    listed = http.get("/myob/api/accountright/", headers=api_headers(new_key, token, None))
    assert listed.status_code == 200 and listed.json() == []


def test_token_endpoint_takes_form_body_credentials_and_answers_myob_shape(control: MyobControl, http: httpx.Client):
    key = new_app(control, username="owner@example.com")
    control.add_tenant(key, seed=6, invoices=2, customers=1)
    code = redirect_params(authorize(http, key))["code"]

    basic = http.post(
        "/myob/secure/oauth2/v1/authorize",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        auth=(key, "s3cret"),
    )
    assert basic.status_code == 401 and basic.json()["error"] == "invalid_client"
    assert exchange(http, key, code, secret="wrong").json()["error"] == "invalid_client"

    token = exchange(http, key, code)
    assert token.status_code == 200
    body = token.json()
    assert body["expires_in"] == "1200"  # a string, as MYOB sends it
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "sme-company-file sme-sales"
    assert body["user"]["username"] == "owner@example.com"
    assert uuid.UUID(body["user"]["uid"])
    assert body["access_token"] and body["refresh_token"]
    assert exchange(http, key, code).json()["error"] == "invalid_grant"  # codes are single-use


def test_authorization_code_expires_after_five_minutes():
    with SandboxServer(now=NOW) as own, httpx.Client(base_url=own.url) as own_http:
        own_control = MyobControl(own)
        own_control.add_client("key-ttl", "s3cret")
        own_control.add_tenant("key-ttl", seed=1, invoices=1, customers=1)
        code = redirect_params(authorize(own_http, "key-ttl"))["code"]
        own.advance_clock(301)
        assert exchange(own_http, "key-ttl", code).json() == {
            "error": "invalid_grant",
            "error_description": "authorization code expired",
        }


def test_refresh_rotates_the_refresh_token_and_access_expires_after_1200_seconds():
    with SandboxServer(now=NOW) as own, httpx.Client(base_url=own.url) as own_http:
        own_control = MyobControl(own)
        own_control.add_client("key-rot", "s3cret", requests_per_second=0)
        tenant = own_control.add_tenant("key-rot", seed=1, invoices=3, customers=1, cftoken_required=False)
        first = exchange(own_http, "key-rot", redirect_params(authorize(own_http, "key-rot"))["code"]).json()
        invoices = f"{tenant['cf_uri']}/Sale/Invoice"
        assert own_http.get(invoices, headers=api_headers("key-rot", first["access_token"])).status_code == 200

        own.advance_clock(1200)
        expired = own_http.get(invoices, headers=api_headers("key-rot", first["access_token"]))
        assert expired.status_code == 401
        assert error_of(expired)["Name"] == "OAuthTokenIsInvalid"
        assert error_of(expired)["ErrorCode"] == 31001

        second = refresh(own_http, "key-rot", first["refresh_token"]).json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["user"] == first["user"]
        assert own_http.get(invoices, headers=api_headers("key-rot", second["access_token"])).status_code == 200
        assert refresh(own_http, "key-rot", first["refresh_token"]).json()["error"] == "invalid_grant"

        own_control.settings(rotate=False, access_ttl=600, expires_in_as_string=False, refresh_idle_ttl=86400)
        third = refresh(own_http, "key-rot", second["refresh_token"]).json()
        assert third["refresh_token"] == second["refresh_token"]
        assert third["expires_in"] == 600
        assert own_control.stats()["oauth"]["refresh_token"] == 3
        own.advance_clock(86400)
        assert refresh(own_http, "key-rot", third["refresh_token"]).json()["error"] == "invalid_grant"


def test_authlib_client_completes_the_flow_and_reads_invoices(control: MyobControl, server: SandboxServer):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=8, invoices=4, customers=2)
    client = OAuth2Client(key, "s3cret", token_endpoint_auth_method="client_secret_post", redirect_uri=REDIRECT,
                          scope="sme-company-file sme-sales sme-contacts-customer")  # fmt: skip
    with client:
        url, state = client.create_authorization_url(f"{server.url}/myob/secure/oauth2/account/authorize",
                                                     prompt="consent")  # fmt: skip
        location = httpx.get(url).headers["location"]
        assert parse_qs(urlsplit(location).query)["businessId"] == [tenant["id"]]
        token = client.fetch_token(f"{server.url}/myob/secure/oauth2/v1/authorize", authorization_response=location)
        assert token["expires_at"] - time.time() > 1100
        response = client.get(
            f"{tenant['cf_uri']}/Contact/Customer",
            headers={"x-myobapi-key": key, "x-myobapi-version": "v2", "x-myobapi-cftoken": CF_TOKEN},
        )
    assert state
    assert response.status_code == 200 and response.json()["Count"] == 2


# --- headers and access ---------------------------------------------------------------------------------------


def test_required_headers_are_enforced_with_myob_error_bodies(http: httpx.Client, reader: dict[str, Any]):
    url = f"{reader['cf']}/Sale/Invoice"
    good = api_headers(reader["key"], reader["token"])

    missing_key = http.get(url, headers={k: v for k, v in good.items() if k != "x-myobapi-key"})
    assert missing_key.status_code == 403
    assert error_of(missing_key)["Name"] == "DeveloperInactive"
    assert uuid.UUID(missing_key.headers["x-myobapi-requestid"])

    wrong_version = http.get(url, headers={**good, "x-myobapi-version": "v1"})
    assert wrong_version.status_code == 400

    no_bearer = http.get(url, headers={k: v for k, v in good.items() if k != "Authorization"})
    assert no_bearer.status_code == 401 and error_of(no_bearer)["Name"] == "OAuthTokenIsInvalid"

    for cftoken in (None, base64.b64encode(b"Administrator:wrong").decode(), "not base64!"):
        denied = http.get(url, headers=api_headers(reader["key"], reader["token"], cftoken))
        assert denied.status_code == 401
        assert error_of(denied)["AdditionalDetails"] == "Header: x-myobapi-cftoken"

    assert http.get(url, headers=good).status_code == 200


def test_cftoken_is_checked_per_company_file(control: MyobControl, http: httpx.Client):
    key = new_app(control, key_mode="legacy", requests_per_second=0)
    open_file = control.add_tenant(key, seed=9, invoices=2, customers=1, cftoken_required=False)
    locked = control.add_tenant(key, seed=10, invoices=2, customers=1, username="Clerk", password="pa55")
    token = control.grant(key)["token"]["access_token"]
    assert http.get(f"{open_file['cf_uri']}/Sale/Invoice", headers=api_headers(key, token, None)).status_code == 200
    assert http.get(f"{locked['cf_uri']}/Sale/Invoice", headers=api_headers(key, token, None)).status_code == 401
    clerk = base64.b64encode(b"Clerk:pa55").decode()
    assert http.get(f"{locked['cf_uri']}/Sale/Invoice", headers=api_headers(key, token, clerk)).status_code == 200


def test_new_key_token_reaches_only_its_consented_file_and_scopes(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    consented = control.add_tenant(key, seed=11, invoices=2, customers=1)
    other = control.add_tenant(key, seed=12, invoices=2, customers=1)
    token = control.grant(key, consented["id"], scope="sme-company-file sme-sales")["token"]["access_token"]
    headers = api_headers(key, token)
    assert http.get(f"{consented['cf_uri']}/Sale/Invoice", headers=headers).status_code == 200
    assert http.get(f"{other['cf_uri']}/Sale/Invoice", headers=headers).status_code == 403
    no_scope = http.get(f"{consented['cf_uri']}/Contact/Customer", headers=headers)
    assert no_scope.status_code == 401 and error_of(no_scope)["Name"] == "OAuthTokenIsInvalid"
    root = http.get(consented["cf_uri"], headers=api_headers(key, token, None))
    assert root.status_code == 200 and root.json()["Id"] == consented["id"]


def test_revoked_grant_and_foreign_key_are_refused(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=13, invoices=2, customers=1)
    grant = control.grant(key)
    url = f"{tenant['cf_uri']}/Sale/Invoice"
    other_key = new_app(control, requests_per_second=0)
    assert http.get(url, headers=api_headers(other_key, grant["token"]["access_token"])).status_code == 401
    control.revoke(grant["grant_id"])
    assert http.get(url, headers=api_headers(key, grant["token"]["access_token"])).status_code == 401
    assert refresh(http, key, grant["token"]["refresh_token"]).json()["error"] == "invalid_grant"


# --- collections, paging, filters ---------------------------------------------------------------------------


def test_invoice_pages_default_to_400_and_next_page_links_reach_every_invoice(
    http: httpx.Client, reader: dict[str, Any], control: MyobControl, server: SandboxServer
):
    first = get(http, reader, "/Sale/Invoice")
    page = first.json()
    assert list(page) == ["Items", "NextPageLink", "Count"]
    assert page["Count"] == 600 and len(page["Items"]) == 400
    assert page["NextPageLink"].startswith(f"{server.url}/myob/api/accountright/{reader['tenant']['id']}/Sale/Invoice?")
    assert parse_qs(urlsplit(page["NextPageLink"]).query) == {"$top": ["400"], "$skip": ["400"]}

    walked = walk(http, reader, "/Sale/Invoice", **{"$top": 250, "$orderby": "Number desc"})
    exported = sorted(control.export(reader["tenant"]["id"], "invoice")["records"], key=lambda r: r["Number"])
    assert [i["UID"] for i in walked] == [r["UID"] for r in reversed(exported)]
    assert len({i["UID"] for i in walked}) == 600


def test_top_is_capped_at_max_top(control: MyobControl, http: httpx.Client):
    key = new_app(control, key_mode="legacy", requests_per_second=0)
    tenant = control.add_tenant(key, seed=14, invoices=25, customers=3, max_top=10, cftoken_required=False)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    page = get(http, ctx, "/Sale/Invoice", **{"$top": 1000}).json()
    assert len(page["Items"]) == 10 and page["Count"] == 25
    assert parse_qs(urlsplit(page["NextPageLink"]).query)["$top"] == ["10"]
    assert get(http, ctx, "/Sale/Invoice", **{"$top": -1}).status_code == 400


def test_generic_and_typed_invoice_shapes(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    generic = get(http, reader, "/Sale/Invoice", **{"$top": 1000}).json()["Items"]
    assert {i["InvoiceType"] for i in generic} == set(LAYOUTS)
    assert all("Lines" not in i for i in generic)
    exported = {r["UID"]: r for r in control.export(reader["tenant"]["id"], "invoice")["records"]}
    for layout in LAYOUTS:
        typed = walk(http, reader, f"/Sale/Invoice/{layout}")
        assert typed and {i["UID"] for i in typed} == {i["UID"] for i in generic if i["InvoiceType"] == layout}
        sample = typed[0]
        assert "InvoiceType" not in sample and sample["Lines"]
        assert sample["Lines"] == exported[sample["UID"]]["Lines"]
        assert sample["URI"].endswith(f"/Sale/Invoice/{layout}/{sample['UID']}")
        assert ("ShipToAddress" in sample) == (layout not in ("Professional", "Miscellaneous"))
        single = get(http, reader, f"/Sale/Invoice/{layout}/{sample['UID']}")
        assert single.status_code == 200 and single.json() == sample
    wrong_layout = next(i for i in generic if i["InvoiceType"] == "Item")
    missing = get(http, reader, f"/Sale/Invoice/Service/{wrong_layout['UID']}")
    assert missing.status_code == 404 and error_of(missing)["Name"] == "NotFound"


def test_invoice_fields_and_money_are_consistent(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    records = control.export(reader["tenant"]["id"], "invoice")["records"]
    assert {r["Status"] for r in records} == {"Open", "Closed", "Credit"}
    assert {r["ForeignCurrency"]["Code"] for r in records if r["ForeignCurrency"]} >= {"USD", "NZD"}
    for r in records:
        cents = [round(line["Total"] * 100) for line in r["Lines"]]
        assert round(r["Subtotal"] * 100) == sum(cents)
        tax_part = 0 if r["IsTaxInclusive"] else round(r["TotalTax"] * 100)
        assert round(r["TotalAmount"] * 100) == sum(cents) + round(r["Freight"] * 100) + tax_part
        assert all(
            len(repr(v).partition(".")[2]) <= 2 for v in (r["TotalAmount"], r["BalanceDueAmount"], r["Subtotal"])
        )
        assert (r["Status"] == "Credit") == (r["TotalAmount"] < 0)
        if r["Status"] == "Closed":
            assert r["BalanceDueAmount"] == 0
        assert STAMP_RE.match(r["LastModified"]) and STAMP_RE.match(r["Date"])
        assert r["Date"].endswith("T00:00:00")
        assert set(r["Customer"]) == {"UID", "Name", "DisplayID", "URI"}
        assert r["ForeignCurrency"] is None or r["TotalAmountForeign"] is not None
    assert any("." in r["LastModified"] for r in records)


def test_orderby_and_filters(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    records = control.export(reader["tenant"]["id"], "invoice")["records"]
    by_modified = sorted(records, key=lambda r: parse_myob_datetime(r["LastModified"]))
    newest = walk(http, reader, "/Sale/Invoice", **{"$orderby": "LastModified desc", "$top": 1000})
    assert [i["UID"] for i in newest] == [r["UID"] for r in reversed(by_modified)]

    pivot = by_modified[300]["LastModified"]
    later = walk(http, reader, "/Sale/Invoice", **{"$filter": f"LastModified gt datetime'{pivot}'", "$top": 70})
    assert {i["UID"] for i in later} == {r["UID"] for r in by_modified if r["LastModified"] > pivot}
    from_pivot = walk(http, reader, "/Sale/Invoice", **{"$filter": f"LastModified ge datetime'{pivot}'"})
    assert len(from_pivot) == len(later) + 1
    before = get(http, reader, "/Sale/Invoice", **{"$filter": f"LastModified lt datetime'{pivot}'"}).json()
    upto = get(http, reader, "/Sale/Invoice", **{"$filter": f"LastModified le datetime'{pivot}'"}).json()
    assert before["Count"] == 300 and upto["Count"] == 301

    target = records[17]
    by_uid = get(http, reader, "/Sale/Invoice", **{"$filter": f"UID eq guid'{target['UID']}'"}).json()
    assert by_uid["Count"] == 1 and by_uid["Items"][0]["Number"] == target["Number"]
    ends = get(http, reader, "/Sale/Invoice", **{"$filter": f"endswith(Number, '{target['Number'][-3:]}')"}).json()
    assert target["UID"] in {i["UID"] for i in ends["Items"]}
    combined = f"startswith(Number,'0000') eq true and LastModified gt datetime'{pivot}' and Status eq 'Open'"
    matched = walk(http, reader, "/Sale/Invoice", **{"$filter": combined})
    assert {i["UID"] for i in matched} == {
        r["UID"] for r in records if r["LastModified"] > pivot and r["Status"] == "Open"
    }
    nested = get(http, reader, "/Sale/Invoice", **{"$filter": f"Customer/UID eq guid'{target['Customer']['UID']}'"})
    assert nested.json()["Count"] == sum(r["Customer"]["UID"] == target["Customer"]["UID"] for r in records)

    bad = get(http, reader, "/Sale/Invoice", **{"$filter": "LastModified gt"})
    assert bad.status_code == 400 and error_of(bad)
    unknown = get(http, reader, "/Sale/Invoice", **{"$filter": "Nope eq 1"})
    assert unknown.status_code == 400


def test_customers_list_filter_and_single(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    customers = walk(http, reader, "/Contact/Customer", **{"$orderby": "DisplayID desc"})
    assert len(customers) == 40
    assert [c["DisplayID"] for c in customers] == sorted((c["DisplayID"] for c in customers), reverse=True)
    one = customers[3]
    assert get(http, reader, f"/Contact/Customer/{one['UID']}").json() == one
    inactive = get(http, reader, "/Contact/Customer", **{"$filter": "IsActive eq false"}).json()
    assert inactive["Count"] == sum(not c["IsActive"] for c in customers)
    assert get(http, reader, f"/Contact/Customer/{uuid.uuid4()}").status_code == 404


def test_etag_and_if_none_match_answer_304(http: httpx.Client, reader: dict[str, Any]):
    first = get(http, reader, "/Contact/Customer", **{"$top": 5})
    etag = first.headers["etag"]
    headers = {**api_headers(reader["key"], reader["token"]), "If-None-Match": etag}
    again = http.get(f"{reader['cf']}/Contact/Customer", params={"$top": 5}, headers=headers)
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    other = http.get(f"{reader['cf']}/Contact/Customer", params={"$top": 6}, headers=headers)
    assert other.status_code == 200


def test_large_pages_are_gzipped_when_asked(http: httpx.Client, reader: dict[str, Any]):
    response = get(http, reader, "/Sale/Invoice", **{"$top": 50})
    assert response.headers["content-encoding"] == "gzip"
    assert len(response.json()["Items"]) == 50


def test_writes_are_refused_where_myob_refuses_them(http: httpx.Client, control: MyobControl):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=15, invoices=6, customers=2)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    headers = api_headers(key, ctx["token"])
    post = http.post(f"{ctx['cf']}/Sale/Invoice", json={}, headers=headers)
    assert post.status_code == 405 and error_of(post)["Name"] == "MethodNotAllowed"

    victim = get(http, ctx, "/Sale/Invoice").json()["Items"][0]
    deleted = http.delete(f"{ctx['cf']}/Sale/Invoice/{victim['InvoiceType']}/{victim['UID']}", headers=headers)
    assert deleted.status_code == 200
    assert get(http, ctx, "/Sale/Invoice").json()["Count"] == 5
    assert get(http, ctx, f"/Sale/Invoice/{victim['InvoiceType']}/{victim['UID']}").status_code == 404
    assert control.export(tenant["id"], "invoice")["deleted_ids"] == [victim["UID"]]


def test_unknown_resource_answers_like_myob(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    unknown = get(http, reader, "/Sale/Nope")
    assert unknown.status_code == 401 and error_of(unknown)["Name"] == "OAuthTokenIsInvalid"
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=23, invoices=2, customers=1, unknown_path_status=404)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    assert get(http, ctx, "/Sale/Nope").status_code == 404


def test_generic_invoice_lines_knob_adds_lines_to_sale_invoice(http: httpx.Client, control: MyobControl):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=24, invoices=3, customers=1, generic_invoice_lines=True)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    items = get(http, ctx, "/Sale/Invoice").json()["Items"]
    assert all(i["Lines"] and i["InvoiceType"] in LAYOUTS for i in items)


# --- limits and faults --------------------------------------------------------------------------------------


def test_per_second_limit_is_per_key_across_files(control: MyobControl, http: httpx.Client):
    key = new_app(control, key_mode="legacy", requests_per_second=3, second_window_seconds=2.0)
    a = control.add_tenant(key, seed=16, invoices=1, customers=1, cftoken_required=False)
    b = control.add_tenant(key, seed=17, invoices=1, customers=1, cftoken_required=False)
    headers = api_headers(key, control.grant(key)["token"]["access_token"])
    statuses = [http.get(f"{t['cf_uri']}/Sale/Invoice", headers=headers).status_code for t in (a, b, a, b)]
    assert statuses == [200, 200, 200, 403]
    refused = http.get(f"{b['cf_uri']}/Sale/Invoice", headers=headers)
    assert error_of(refused)["Name"] == "RateLimitError"
    assert refused.headers["x-myobapi-requestid"]
    time.sleep(2.05)
    assert http.get(f"{a['cf_uri']}/Sale/Invoice", headers=headers).status_code == 200

    control.add_client(key, "s3cret", key_mode="legacy", per_second_status=429, requests_per_second=1)
    time.sleep(2.05)
    assert [http.get(f"{a['cf_uri']}/Sale/Invoice", headers=headers).status_code for _ in range(2)] == [200, 429]


def test_daily_cap_set_in_the_tenant_spec_answers_403_rate_limit_error(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=18, invoices=1, customers=1, cftoken_required=False, daily_limit=2)
    headers = api_headers(key, control.grant(key)["token"]["access_token"])
    responses = [http.get(f"{tenant['cf_uri']}/Sale/Invoice", headers=headers) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 403]
    assert error_of(responses[2]) == {
        "Name": "RateLimitError",
        "Message": "API key has exceeded the daily rate limit",
        "AdditionalDetails": "Header: x-myobapi-key",
        "ErrorCode": None,
        "Severity": "Error",
        "LearnMore": None,
    }


def test_injected_faults(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=19, invoices=2, customers=1, cftoken_required=False)
    url = f"{tenant['cf_uri']}/Sale/Invoice"
    headers = api_headers(key, control.grant(key)["token"]["access_token"])

    def status() -> int:
        return http.get(url, headers=headers).status_code

    control.set_faults(tenant["id"], server_errors=2, server_error_status=503)
    assert [status(), status(), status()] == [503, 503, 200]
    control.set_faults(tenant["id"], gateway_timeouts=1)
    timeout = http.get(url, headers=headers)
    assert timeout.status_code == 504 and error_of(timeout)["Name"] == "GatewayTimeout"
    control.set_faults(tenant["id"], rate_limited=1)
    limited = http.get(url, headers=headers)
    assert limited.status_code == 403 and error_of(limited)["Name"] == "RateLimitError"
    control.set_faults(day_limit_exhausted=True)
    exhausted = http.get(url, headers=headers)
    assert exhausted.status_code == 403 and error_of(exhausted)["Message"].endswith("daily rate limit")
    control.clear_faults()
    control.set_faults(latency_ms=300)
    started = time.monotonic()
    assert status() == 200
    assert time.monotonic() - started >= 0.3
    assert control.clear_faults() == {}
    assert status() == 200


# --- control API --------------------------------------------------------------------------------------------


def test_changes_edit_reverse_delete_create_and_archive():
    with SandboxServer(now=NOW) as own, httpx.Client(base_url=own.url) as own_http:
        own_control = MyobControl(own)
        own_control.add_client("key-chg", "s3cret", requests_per_second=0)
        tenant = own_control.add_tenant("key-chg", seed=20, invoices=50, customers=10, cftoken_required=False)
        before = {r["UID"]: r for r in own_control.export(tenant["id"], "invoice")["records"]}
        own.advance_clock(3600)
        ctx = {"key": "key-chg", "cf": tenant["cf_uri"], "token": own_control.grant("key-chg")["token"]["access_token"]}
        now = own.clock()
        out = own_control.changes(tenant["id"], edits=3, voids=2, deletes=2, creates=4, archives=1)
        assert [len(out[k]) for k in ("edited", "voided", "deleted", "created", "archived")] == [3, 2, 2, 4, 1]
        after = {r["UID"]: r for r in own_control.export(tenant["id"], "invoice")["records"]}
        stamp = format_myob_datetime(now * 1_000_000)
        for uid in out["edited"] + out["voided"]:
            assert after[uid]["LastModified"] == stamp
            assert after[uid]["RowVersion"] != before[uid]["RowVersion"]
        for uid, reversal in zip(out["voided"], out["reversals"], strict=True):
            assert after[uid]["Status"] == "Closed" and after[uid]["BalanceDueAmount"] == 0
            assert after[reversal]["TotalAmount"] == -before[uid]["TotalAmount"]
            assert after[reversal]["JournalMemo"].startswith("Reversal; ")
        assert not set(out["deleted"]) & set(after)
        assert own_control.export(tenant["id"], "invoice")["deleted_ids"] == out["deleted"]
        assert len(after) == 50 - 2 + 4 + 2
        changed = walk(own_http, ctx, "/Sale/Invoice", **{"$filter": f"LastModified ge datetime'{stamp}'"})
        assert {i["UID"] for i in changed} == set(out["edited"] + out["voided"] + out["reversals"] + out["created"])
        customer = own_control.export(tenant["id"], "customer")["records"]
        archived = next(c for c in customer if c["UID"] == out["archived"][0])
        assert archived["IsActive"] is False and archived["LastModified"] == stamp


def test_records_at_midnight_sit_on_the_window_boundary(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=21, invoices=5, customers=2, cftoken_required=False)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    midnight = NOW - NOW % 86400
    created = control.add_record(tenant["id"], "invoice", {"InvoiceType": "Item", "Comment": "edge"},
                                 updated_at=midnight)  # fmt: skip
    assert created["LastModified"] == format_myob_datetime(midnight * 1_000_000) == "2026-02-02T00:00:00"
    assert created["URI"].startswith(f"{tenant['cf_uri']}/Sale/Invoice/Item/")
    window = "LastModified ge datetime'2026-02-02T00:00:00' and LastModified lt datetime'2026-02-03T00:00:00'"
    assert created["UID"] in {i["UID"] for i in walk(http, ctx, "/Sale/Invoice", **{"$filter": window})}
    earlier = "LastModified lt datetime'2026-02-02T00:00:00'"
    assert created["UID"] not in {i["UID"] for i in walk(http, ctx, "/Sale/Invoice", **{"$filter": earlier})}

    updated = control.update_record(tenant["id"], created["UID"], {"Comment": "moved"}, updated_at=midnight + 0.25)
    assert updated["LastModified"] == "2026-02-02T00:00:00.25" and updated["Comment"] == "moved"
    assert updated["RowVersion"] != created["RowVersion"]
    single = get(http, ctx, f"/Sale/Invoice/Item/{created['UID']}").json()
    assert single["Comment"] == "moved" and single["LastModified"] == "2026-02-02T00:00:00.25"

    customer = control.add_record(tenant["id"], "customer", {"CompanyName": "Edge Case Pty Ltd"}, updated_at=midnight)
    renamed = control.update_record(tenant["id"], customer["UID"], {"CompanyName": "Renamed Pty Ltd"})
    assert renamed["CompanyName"] == "Renamed Pty Ltd"
    linked = control.add_record(tenant["id"], "invoice", {"Customer": {"UID": customer["UID"]}})
    assert linked["Customer"]["Name"] == "Renamed Pty Ltd"


def test_utc_offset_knob_shifts_zone_less_stamps(control: MyobControl, http: httpx.Client):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=22, invoices=2, customers=1, utc_offset_minutes=600, cftoken_required=False)
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}
    record = control.add_record(tenant["id"], "invoice", updated_at=NOW)
    assert record["LastModified"] == "2026-02-02T12:40:00"  # AEST-style local time, no zone marker
    hit = get(http, ctx, "/Sale/Invoice", **{"$filter": "LastModified ge datetime'2026-02-02T12:40:00'"}).json()
    assert [i["UID"] for i in hit["Items"]] == [record["UID"]]


def test_same_seed_gives_same_records(control: MyobControl):
    key = new_app(control)
    one = control.add_tenant(key, seed=99, invoices=40, customers=6, id=str(uuid.uuid4()))
    two = control.add_tenant(key, seed=99, invoices=40, customers=6, id=one["id"].replace(one["id"][:8], "0" * 8))
    first = control.export(one["id"], "invoice")["records"]
    second = control.export(two["id"], "invoice")["records"]

    def strip(r: dict[str, Any]) -> str:
        return re.sub(r"accountright/[0-9a-f-]+/", "", repr(r))

    assert [strip(r) for r in first] == [strip(r) for r in second]
    third = control.add_tenant(key, seed=100, invoices=40, customers=6)
    assert {r["UID"] for r in control.export(third["id"], "invoice")["records"]}.isdisjoint(r["UID"] for r in first)


def test_twenty_thousand_invoices_generate_in_a_few_seconds(control: MyobControl):
    key = new_app(control)
    started = time.monotonic()
    tenant = control.add_tenant(key, seed=5, invoices=20_000, customers=1_000, days=365)
    assert tenant["counts"]["invoices"] == 20_000 and tenant["counts"]["customers"] == 1_000
    assert time.monotonic() - started < 15


def test_stats_count_requests_by_path_and_status():
    with SandboxServer(now=NOW) as own, httpx.Client(base_url=own.url) as own_http:
        own_control = MyobControl(own)
        own_control.add_client("key-st", "s3cret", requests_per_second=0)
        tenant = own_control.add_tenant("key-st", seed=1, invoices=3, customers=1, cftoken_required=False)
        ctx = {"key": "key-st", "cf": tenant["cf_uri"], "token": own_control.grant("key-st")["token"]["access_token"]}
        get(own_http, ctx, "/Sale/Invoice")
        get(own_http, ctx, "/Sale/Invoice/Service")
        get(own_http, ctx, f"/Contact/Customer/{uuid.uuid4()}")
        stats = own_control.stats()
        assert stats["total"] == 3
        assert stats["by_path"] == {
            "GET /accountright/{cf}/Sale/Invoice": 1,
            "GET /accountright/{cf}/Sale/Invoice/{layout}": 1,
            "GET /accountright/{cf}/Contact/Customer/{uid}": 1,
        }
        assert stats["by_status"] == {"200": 2, "404": 1}
