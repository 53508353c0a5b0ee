"""The Xero emulator as other clients use it, over real loopback HTTP: `GET /Payments` (envelope, paging,
filters, deleted payments, the invoices they pay, limits), `GET /Organisation` and `GET /Currencies` (what
connectors read to test a connection), Xero's 404 on any path it does not serve, and client-credentials
tokens that carry the custom connection's scopes the way xero-python's `get_client_credentials_token()`
needs them (it passes the token response to `OAuth2Token.update_token`, whose `scope` is required).
"""

from __future__ import annotations

import base64
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.xero import XeroControl

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
API = "/xero/api/api.xro/2.0"
TOKEN = "/xero/identity/connect/token"
NOT_FOUND = "The resource you're looking for cannot be found"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def xero(server: SandboxServer) -> XeroControl:
    return XeroControl(server)


@pytest.fixture(scope="module")
def org(xero: XeroControl) -> dict[str, Any]:
    """An app with one organisation of 150 invoices and a broad read token (read-only tests share it)."""
    xero.add_client("payments-app", "payments-secret")
    tenant = xero.add_tenant("payments-app", seed=11, invoices=150, contacts=25, days=20, minute_limit=100_000)
    return {"tenant": tenant["id"], "token": xero.grant("payments-app")["token"]["access_token"]}


def client(server: SandboxServer, token: str | None, tenant: str | None) -> httpx.Client:
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if tenant is not None:
        headers["xero-tenant-id"] = tenant
    return httpx.Client(base_url=server.url + API, headers=headers)


@pytest.fixture(scope="module")
def http(server: SandboxServer, org: dict[str, Any]) -> Iterator[httpx.Client]:
    with client(server, org["token"], org["tenant"]) as api:
        yield api


def ms_of(value: str) -> int:
    match = re.fullmatch(r"/Date\((\d+)\+0000\)/", value)
    assert match, value
    return int(match.group(1))


def all_pages(http: httpx.Client, size: int, **params: Any) -> list[dict[str, Any]]:
    out, page = [], 1
    while True:
        body = http.get("/Payments", params={**params, "page": page, "pageSize": size}).json()
        out += body["Payments"]
        if page >= body["pagination"]["pageCount"]:
            return out
        page += 1


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --- payments ------------------------------------------------------------------------------------------


def test_payments_envelope_fields_and_pagination(http: httpx.Client, xero: XeroControl, org: dict[str, Any]) -> None:
    export = xero.export(org["tenant"], "payments")["records"]
    body = http.get("/Payments", params={"page": 1, "pageSize": 7}).json()
    assert list(body)[:6] == ["Id", "Status", "ProviderName", "DateTimeUTC", "pagination", "Payments"]
    uuid.UUID(body["Id"])
    assert body["Status"] == "OK" and re.fullmatch(r"/Date\(\d{13}\)/", body["DateTimeUTC"])
    assert body["pagination"] == {"page": 1, "pageSize": 7, "pageCount": -(-len(export) // 7), "itemCount": len(export)}
    payment = body["Payments"][0]
    assert {"PaymentID", "Date", "BankAmount", "Amount", "Reference", "CurrencyRate", "PaymentType", "Status",
            "UpdatedDateUTC", "HasAccount", "IsReconciled", "Account", "Invoice"} <= set(payment)  # fmt: skip
    assert set(payment["Account"]) == {"AccountID", "Code"}
    invoice = payment["Invoice"]
    assert {"Type", "InvoiceID", "InvoiceNumber", "Contact", "CurrencyCode"} <= set(invoice)
    assert invoice["Payments"] == [] and invoice["LineItems"] == [] and "Name" in invoice["Contact"]
    ms_of(payment["Date"]), ms_of(payment["UpdatedDateUTC"])
    # Every page in updated order is exactly the export, deleted payments included.
    listed = all_pages(http, 9, order="UpdatedDateUTC ASC")
    assert sorted(listed, key=lambda p: p["PaymentID"]) == sorted(export, key=lambda p: p["PaymentID"])
    stamps = [ms_of(p["UpdatedDateUTC"]) for p in listed]
    assert stamps == sorted(stamps)
    assert {p["Status"] for p in listed} == {"AUTHORISED", "DELETED"}
    unpaged = http.get("/Payments").json()
    assert "pagination" not in unpaged and len(unpaged["Payments"]) == len(export)


def test_payments_add_up_to_what_their_invoices_were_paid(http: httpx.Client, xero: XeroControl, org) -> None:
    payments = xero.export(org["tenant"], "payments")["records"]
    invoices = {i["InvoiceID"]: i for i in xero.export(org["tenant"], "invoices")["records"]}
    paid: dict[str, Decimal] = defaultdict(Decimal)
    listed: dict[str, set[str]] = defaultdict(set)
    for p in payments:
        inv = invoices[p["Invoice"]["InvoiceID"]]
        assert p["PaymentType"] == {"ACCREC": "ACCRECPAYMENT", "ACCPAY": "ACCPAYPAYMENT"}[inv["Type"]]
        assert p["Invoice"]["CurrencyCode"] == inv["CurrencyCode"] and p["CurrencyRate"] == inv["CurrencyRate"]
        assert p["Invoice"]["Contact"]["ContactID"] == inv["Contact"]["ContactID"]
        if p["CurrencyRate"] == 1:
            assert p["BankAmount"] == p["Amount"]
        if p["Status"] == "AUTHORISED":
            paid[inv["InvoiceID"]] += Decimal(repr(p["Amount"]))
            listed[inv["InvoiceID"]].add(p["PaymentID"])
    assert len(paid) > 30
    for iid, inv in invoices.items():
        assert Decimal(repr(inv["AmountPaid"])) == paid.get(iid, 0)
        # An invoice lists its authorised payments only, in Xero's short form.
        assert {p["PaymentID"] for p in inv["Payments"]} == listed.get(iid, set())
        for entry in inv["Payments"]:
            assert set(entry) == {"PaymentID", "Date", "Amount", "Reference", "CurrencyRate", "HasAccount",
                                  "HasValidationErrors"}  # fmt: skip


def test_payments_where_order_if_modified_since_and_single_reads(http: httpx.Client, xero, org) -> None:
    export = xero.export(org["tenant"], "payments")["records"]
    deleted = http.get("/Payments", params={"where": 'Status=="DELETED"'}).json()["Payments"]
    assert deleted and {p["PaymentID"] for p in deleted} == {p["PaymentID"] for p in export if p["Status"] == "DELETED"}
    target = export[0]
    by_invoice = http.get("/Payments", params={"where": f'Invoice.InvoiceID==Guid("{target["Invoice"]["InvoiceID"]}")'})
    assert target in by_invoice.json()["Payments"]
    received = http.get("/Payments", params={"where": 'PaymentType=="ACCRECPAYMENT" AND Amount>=100'}).json()
    assert received["Payments"] and all(p["Amount"] >= 100 for p in received["Payments"])
    by_amount = http.get("/Payments", params={"order": "Amount DESC"}).json()["Payments"]
    assert [p["Amount"] for p in by_amount] == sorted((p["Amount"] for p in export), reverse=True)
    # If-Modified-Since: updated at or after that second (its milliseconds ignored), ISO 8601 in UTC.
    second = sorted(ms_of(p["UpdatedDateUTC"]) for p in export)[len(export) // 2] // 1000
    header = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    newer = http.get("/Payments", headers={"If-Modified-Since": header}).json()["Payments"]
    expected = {p["PaymentID"] for p in export if ms_of(p["UpdatedDateUTC"]) // 1000 >= second}
    assert {p["PaymentID"] for p in newer} == expected and 0 < len(expected) < len(export)
    one = http.get(f"/Payments/{target['PaymentID'].upper()}").json()
    assert one["Payments"] == [target] and one["Status"] == "OK"
    missing = http.get(f"/Payments/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.text == NOT_FOUND
    bad = http.get("/Payments", params={"where": "Nope==1"})
    assert bad.status_code == 400 and bad.json()["Type"] == "QueryParseException"


def test_deleting_a_payment_keeps_it_readable_and_reopens_its_invoice() -> None:
    with SandboxServer(now=NOW) as server:
        deleting_keeps_the_payment_and_reopens_the_invoice(server, XeroControl(server))


def deleting_keeps_the_payment_and_reopens_the_invoice(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("delete-app", "delete-secret")
    tenant = xero.add_tenant("delete-app", seed=12, invoices=60, contacts=10, days=5)["id"]
    server.advance_clock(3600)
    token = xero.grant("delete-app")["token"]["access_token"]
    changed = xero.changes(tenant, payment_deletes=2, payments=2)
    with client(server, token, tenant) as api:
        for pid in changed["payments_deleted"]:
            (payment,) = api.get(f"/Payments/{pid}").json()["Payments"]
            assert payment["Status"] == "DELETED" and ms_of(payment["UpdatedDateUTC"]) // 1000 >= NOW + 3600
            (invoice,) = api.get(f"/Invoices/{payment['Invoice']['InvoiceID']}").json()["Invoices"]
            assert invoice["Status"] == "AUTHORISED" and invoice["AmountDue"] > 0
            assert pid not in {p["PaymentID"] for p in invoice["Payments"]}
            assert ms_of(invoice["UpdatedDateUTC"]) == ms_of(payment["UpdatedDateUTC"])
        for pid in changed["payments_created"]:
            (payment,) = api.get(f"/Payments/{pid}").json()["Payments"]
            (invoice,) = api.get(f"/Invoices/{payment['Invoice']['InvoiceID']}").json()["Invoices"]
            assert pid in {p["PaymentID"] for p in invoice["Payments"]}
        changed_since = api.get("/Payments", headers={"If-Modified-Since": "2026-01-01T01:00:00"}).json()["Payments"]
        assert {p["PaymentID"] for p in changed_since} == {*changed["payments_deleted"], *changed["payments_created"]}
    # The control API deletes one too, and a deleted payment stays deleted.
    pid = changed["payments_created"][0]
    assert xero.update_record(tenant, pid, {"Status": "DELETED"})["Status"] == "DELETED"
    with pytest.raises(Exception, match="409"):
        xero.update_record(tenant, pid, {"Status": "AUTHORISED"})


def test_payments_need_a_payments_or_transactions_scope(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("pay-scope-app", "pay-scope-secret")
    tenant = xero.add_tenant("pay-scope-app", seed=13, invoices=10, contacts=3, days=2)["id"]
    for scope, status in (("offline_access accounting.invoices.read accounting.contacts.read", 401),
                          ("offline_access accounting.payments.read", 200),
                          ("offline_access accounting.transactions.read", 200)):  # fmt: skip
        token = xero.grant("pay-scope-app", scope=scope)["token"]["access_token"]
        with client(server, token, tenant) as api:
            response = api.get("/Payments")
        assert response.status_code == status, scope
        if status == 401:
            assert response.json()["Detail"] == "AuthorizationUnsuccessful"


def test_payments_are_rate_limited_with_xeros_headers(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("pay-limit-app", "pay-limit-secret")
    tenant = xero.add_tenant("pay-limit-app", seed=14, invoices=10, contacts=3, days=2, minute_limit=3)["id"]
    token = xero.grant("pay-limit-app")["token"]["access_token"]
    with client(server, token, tenant) as api:
        answers = [api.get("/Payments") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[2].headers["X-MinLimit-Remaining"] == "0"
    limited = answers[3]
    assert limited.headers["X-Rate-Limit-Problem"] == "minute" and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["Status"] == 429


# --- organisation, currencies, unknown routes ----------------------------------------------------------


def test_organisation_and_currencies_answer_with_xeros_envelopes(http: httpx.Client, xero, org) -> None:
    summary = xero.tenant(org["tenant"])
    body = http.get("/Organisation").json()
    assert list(body) == ["Id", "Status", "ProviderName", "DateTimeUTC", "Organisations"]
    (organisation,) = body["Organisations"]
    assert organisation["OrganisationID"] == org["tenant"] and organisation["Name"] == summary["name"]
    assert organisation["BaseCurrency"] == summary["base_currency"] and organisation["OrganisationStatus"] == "ACTIVE"
    assert re.fullmatch(r"/Date\(\d+\)/", organisation["CreatedDateUTC"]) and organisation["ShortCode"].startswith("!")
    currencies = http.get("/Currencies").json()
    assert list(currencies) == ["Id", "Status", "ProviderName", "DateTimeUTC", "Currencies"]
    codes = [c["Code"] for c in currencies["Currencies"]]
    assert codes[0] == summary["base_currency"] and all(
        set(c) == {"Code", "Description"} for c in currencies["Currencies"]
    )
    used = {i["CurrencyCode"] for i in xero.export(org["tenant"], "invoices")["records"]}
    assert used <= set(codes)
    only = http.get("/Currencies", params={"where": f'Code=="{codes[-1]}"'}).json()["Currencies"]
    assert [c["Code"] for c in only] == [codes[-1]]
    ordered = http.get("/Currencies", params={"order": "Code DESC"}).json()["Currencies"]
    assert [c["Code"] for c in ordered] == sorted(codes, reverse=True)
    xml = http.get("/Organisation", headers={"Accept": "application/xml"})
    assert xml.headers["content-type"].startswith("text/xml") and b"<Organisations><Organisation>" in xml.content


def test_organisation_needs_a_settings_scope(server: SandboxServer, xero: XeroControl, org) -> None:
    token = xero.grant("payments-app", scope="offline_access accounting.invoices.read")["token"]["access_token"]
    with client(server, token, org["tenant"]) as api:
        for path in ("/Organisation", "/Currencies"):
            refused = api.get(path)
            assert refused.status_code == 401 and refused.json()["Detail"] == "AuthorizationUnsuccessful"


def test_paths_and_methods_xero_does_not_serve_get_xeros_404(server: SandboxServer, org) -> None:
    with client(server, org["token"], org["tenant"]) as api:
        for response in (api.get("/Invoices/x/History/y"), api.get("/NoSuchThing"), api.delete("/Payments"),
                         api.post("/Organisation", json={})):  # fmt: skip
            assert response.status_code == 404 and response.text == NOT_FOUND
    with client(server, None, org["tenant"]) as anonymous:
        unauthorised = anonymous.get("/Invoices/x/History/y")
        assert unauthorised.status_code == 401 and unauthorised.json()["Title"] == "Unauthorized"
    elsewhere = httpx.get(server.url + "/xero/identity/nothing-here")
    assert elsewhere.status_code == 404 and elsewhere.text == NOT_FOUND


# --- client credentials (custom connections) -----------------------------------------------------------


def update_token(access_token: str, scope: list[str], expires_in: int, token_type: str, expires_at: float | None = None,
                 refresh_token: str | None = None, id_token: str | None = None) -> None:  # fmt: skip
    """The signature of xero-python's `OAuth2Token.update_token`, which takes the token response as keywords."""


def test_client_credentials_tokens_carry_the_custom_connections_scopes(server: SandboxServer, xero) -> None:
    xero.add_client("custom-app", "custom-secret")
    tenant = xero.add_tenant("custom-app", seed=15, invoices=6, contacts=2, days=2)
    granted = "accounting.transactions accounting.contacts accounting.settings"
    # What xero-python sends: the client credentials in the form body, JSON asked for, no scope.
    form = {"client_id": "custom-app", "client_secret": "custom-secret", "grant_type": "client_credentials"}
    response = httpx.post(server.url + TOKEN, data=form, headers={"Accept": "application/json"})
    assert response.status_code == 200
    token = response.json()
    assert token["scope"] == granted and "refresh_token" not in token
    update_token(**{**token, "scope": token["scope"].split()})
    assert jwt_claims(token["access_token"])["scope"] == granted.split()
    with client(server, token["access_token"], tenant["id"]) as api:
        assert api.get("/Organisation").json()["Organisations"][0]["OrganisationID"] == tenant["id"]
        assert api.get("/Payments").status_code == 200
    # A narrower request gets what it asks for; more than the connection has is refused.
    narrow = httpx.post(server.url + TOKEN, data={**form, "scope": "accounting.contacts"}).json()
    assert narrow["scope"] == "accounting.contacts" and jwt_claims(narrow["access_token"])["scope"] == [
        "accounting.contacts"]  # fmt: skip
    with client(server, narrow["access_token"], tenant["id"]) as api:
        assert api.get("/Payments").status_code == 401
    beyond = httpx.post(server.url + TOKEN, data={**form, "scope": "accounting.payroll.read"})
    assert beyond.status_code == 400 and beyond.json()["error"] == "invalid_scope"
    # The connection's scopes are a knob of the organisation.
    xero.configure(tenant["id"], custom_connection_scope="accounting.settings.read")
    assert httpx.post(server.url + TOKEN, data=form).json()["scope"] == "accounting.settings.read"
