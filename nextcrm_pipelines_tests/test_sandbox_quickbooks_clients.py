"""The QuickBooks emulator as other clients use it: payments and accounts, the batch endpoint, Intuit's OpenID
discovery documents at their real paths (what intuit-oauth's `AuthClient` reads first), and QuickBooks'
`Fault` envelope on every route it does not emulate (no plain-text 404 or 405)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from nextcrm_pipelines_tests.helpers import last_midday
from nextcrm_sandbox.quickbooks import QuickBooksControl
from nextcrm_sandbox.server import SandboxServer

CLIENT_ID, CLIENT_SECRET = "qb-clients-app", "qb-clients-secret"
REDIRECT = "http://127.0.0.1:8765/callback"


@pytest.fixture
def qbo() -> Iterator[tuple[SandboxServer, QuickBooksControl]]:
    server = SandboxServer(now=last_midday()).start()
    control = QuickBooksControl(server)
    control.add_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT])
    try:
        yield server, control
    finally:
        server.stop()


def company(server: SandboxServer, control: QuickBooksControl, **spec: Any) -> tuple[str, httpx.Client]:
    """A new company and a JSON client of its API root (`/v3/company/{realm}`)."""
    base = {"seed": 9, "invoices": 80, "customers": 12, "days": 10, "requests_per_second": 0}
    realm = control.add_tenant(CLIENT_ID, **{**base, **spec})["id"]
    token = control.grant(CLIENT_ID, realm)["token"]["access_token"]
    client = httpx.Client(base_url=f"{server.url}/quickbooks/api/v3/company/{realm}", timeout=30,
                          headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})  # fmt: skip
    return realm, client


def query(client: httpx.Client, sql: str) -> dict[str, Any]:
    response = client.get("/query", params={"query": sql, "minorversion": "75"})
    assert response.status_code == 200, response.text
    return response.json()["QueryResponse"]


def test_payments_pay_the_invoices_they_name(qbo) -> None:
    server, control = qbo
    realm, client = company(server, control)
    with client:
        payments = query(client, "SELECT * FROM Payment ORDER BY Id STARTPOSITION 1 MAXRESULTS 1000")["Payment"]
        invoices = {r["Id"]: r for r in control.export(realm, "invoice")["records"]}
        assert payments == control.export(realm, "payment")["records"]
        applied = Decimal(0)
        for payment in payments:
            if not payment["Line"]:  # its invoice was deleted: the payment is a credit now
                assert payment["UnappliedAmt"] == payment["TotalAmt"] > 0
                continue
            (line,) = payment["Line"]
            (link,) = line["LinkedTxn"]
            assert link["TxnType"] == "Invoice" and line["Amount"] == payment["TotalAmt"] > 0
            invoice = invoices.get(link["TxnId"])
            if invoice is not None:  # a payment's invoice may have been deleted since
                assert {"TxnId": payment["Id"], "TxnType": "Payment"} in invoice["LinkedTxn"]
                assert payment["CustomerRef"]["value"] == invoice["CustomerRef"]["value"]
                assert payment["CurrencyRef"] == invoice["CurrencyRef"]
                applied += Decimal(str(payment["TotalAmt"]))
        # What the invoices still owe is what they total less what their payments paid.
        paid = [i for i in invoices.values() if any(t["TxnType"] == "Payment" for t in i["LinkedTxn"])]
        assert applied == sum(Decimal(str(i["TotalAmt"])) - Decimal(str(i["Balance"])) for i in paid)
        one = client.get(f"/payment/{payments[0]['Id']}", params={"minorversion": "75"}).json()
        assert one["Payment"] == payments[0] and "time" in one
        assert query(client, "SELECT COUNT(*) FROM Payment") == {"totalCount": len(payments)}


def test_voided_and_deleted_payments_reopen_their_invoices_and_cdc_reports_the_delete(qbo) -> None:
    server, control = qbo
    realm, client = company(server, control, deleted_payment_share=0.0)
    with client:
        first, second = control.export(realm, "payment")["records"][:2]
        now = server.clock()
        voided = control.void_payment(realm, first["Id"], updated_at=now)
        assert (voided["TotalAmt"], voided["PrivateNote"], voided["SyncToken"]) == (0.0, "Voided", "1")
        control.delete_payment(realm, second["Id"], updated_at=now)
        invoices = {r["Id"]: r for r in control.export(realm, "invoice")["records"]}
        for payment in (first, second):
            invoice = invoices[payment["Line"][0]["LinkedTxn"][0]["TxnId"]]
            assert payment["Id"] not in {t["TxnId"] for t in invoice["LinkedTxn"]}
            assert invoice["Balance"] >= payment["TotalAmt"]
        assert query(client, f"SELECT * FROM Payment WHERE Id = '{second['Id']}'") == {}
        cdc = client.get("/cdc", params={"entities": "Payment", "changedSince": "2020-01-01"})
        assert cdc.status_code == 400  # older than 30 days
        since = server.clock() - 60
        cdc = client.get("/cdc", params={"entities": "Payment,Invoice", "changedSince": _iso(since)}).json()
        blocks = cdc["CDCResponse"][0]["QueryResponse"]
        payments = {r["Id"]: r for block in blocks for r in block.get("Payment", [])}
        assert payments[second["Id"]]["status"] == "Deleted" and payments[first["Id"]]["PrivateNote"] == "Voided"
        assert control.export(realm, "payment")["deleted_ids"] == [second["Id"]]


def test_a_merged_customer_leaves_queries_and_cdc_reports_it_deleted(qbo) -> None:
    server, control = qbo
    realm, client = company(server, control, inactive_share=0.0)
    with client:
        customers = control.export(realm, "customer")["records"]
        source, into = customers[0]["Id"], customers[1]["Id"]
        control.merge_customers(realm, source, into, updated_at=server.clock())
        every = " AND Active IN (true, false)"
        assert query(client, f"SELECT * FROM Customer WHERE Id = '{source}'{every}") == {}
        assert not any(i["CustomerRef"]["value"] == source for i in control.export(realm, "invoice")["records"])
        since = _iso(server.clock() - 60)
        cdc = client.get("/cdc", params={"entities": "Customer", "changedSince": since}).json()
        (block,) = cdc["CDCResponse"][0]["QueryResponse"]
        assert {r["Id"]: r.get("status") for r in block["Customer"]} == {into: None, source: "Deleted"}


def test_a_company_has_a_chart_of_accounts(qbo) -> None:
    server, control = qbo
    _realm, client = company(server, control)
    with client:
        accounts = query(client, "SELECT * FROM Account MAXRESULTS 1000")["Account"]
        kinds = {a["AccountType"] for a in accounts}
        assert {"Bank", "Accounts Receivable", "Income", "Expense", "Equity"} <= kinds
        assert all(a["Active"] and a["Id"].isdigit() and a["CurrencyRef"]["value"] == "USD" for a in accounts)
        banks = query(client, "SELECT * FROM Account WHERE AccountType = 'Bank'")["Account"]
        assert {a["Name"] for a in banks} == {"Checking", "Savings"}
        assert client.get("/account/35").json()["Account"]["Name"] == "Checking"


def test_batch_answers_each_query_in_order_with_its_own_fault(qbo) -> None:
    server, control = qbo
    _realm, client = company(server, control)
    with client:
        items = [{"bId": "invoices", "Query": "SELECT * FROM Invoice STARTPOSITION 1 MAXRESULTS 5"},
                 {"bId": "count", "Query": "SELECT COUNT(*) FROM Customer"},
                 {"bId": "bad", "Query": "SELECT * FROM Nothing"},
                 {"bId": "write", "operation": "create", "Invoice": {"Line": []}}]  # fmt: skip
        response = client.post("/batch", json={"BatchItemRequest": items}, params={"minorversion": "75"})
        assert response.status_code == 200, response.text
        answers = response.json()["BatchItemResponse"]
        assert [a["bId"] for a in answers] == ["invoices", "count", "bad", "write"]
        assert answers[0]["QueryResponse"] == query(client, items[0]["Query"])
        assert answers[1]["QueryResponse"] == query(client, items[1]["Query"])
        assert answers[2]["Fault"]["Error"][0]["code"] == "4001"
        assert answers[3]["Fault"]["Error"][0]["Message"] == "Unsupported Operation"
        too_many = client.post("/batch", json={"BatchItemRequest": [items[1]] * 31})
        assert too_many.status_code == 400 and too_many.json()["Fault"]["type"] == "ValidationFault"


@pytest.mark.parametrize("environment, path", [("sandbox", "openid_sandbox_configuration"),
                                               ("production", "openid_configuration")])  # fmt: skip
def test_the_discovery_documents_lead_through_the_oauth_flow(qbo, environment, path) -> None:
    server, control = qbo
    realm = control.add_tenant(CLIENT_ID, seed=3, invoices=5, customers=2, days=1)["id"]
    found = httpx.get(f"{server.url}/quickbooks/devsite/.well-known/{path}/")
    assert found.status_code == 200
    doc = found.json()
    assert {"client_secret_basic", "client_secret_post"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert doc["issuer"] == "https://oauth.platform.intuit.com/op/v1"
    assert httpx.get(doc["jwks_uri"]).json() == {"keys": []}
    # What AuthClient does with it: authorise at authorization_endpoint, exchange at token_endpoint.
    params = {"client_id": CLIENT_ID, "response_type": "code", "scope": "com.intuit.quickbooks.accounting",
              "redirect_uri": REDIRECT, "state": "s1"}  # fmt: skip
    redirect = httpx.get(doc["authorization_endpoint"], params=params)
    assert redirect.status_code == 302
    back = parse_qs(urlsplit(redirect.headers["location"]).query)
    assert back["realmId"] == [realm]
    token = httpx.post(
        doc["token_endpoint"],
        data={"grant_type": "authorization_code", "code": back["code"][0], "redirect_uri": REDIRECT},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )
    assert token.status_code == 200 and token.json()["token_type"] == "bearer"
    revoked = httpx.post(doc["revocation_endpoint"], json={"token": token.json()["refresh_token"]},
                         auth=(CLIENT_ID, CLIENT_SECRET))  # fmt: skip
    assert revoked.status_code == 200


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/quickbooks/oauth/oauth2/v1/tokens/bearer", 405),
    ("DELETE", "/quickbooks/developer/v2/oauth2/tokens/revoke", 405),
    ("GET", "/quickbooks/oauth/oauth2/v1/nothing", 404),
    ("POST", "/quickbooks/appcenter/app/connect", 404),
    ("GET", "/quickbooks/api/v2/company/1/query", 404),
    ("PUT", "/quickbooks/api/anything", 404),
])  # fmt: skip
def test_routes_not_emulated_answer_with_quickbooks_fault(qbo, method, path, status) -> None:
    server, _control = qbo
    response = httpx.request(method, f"{server.url}{path}", headers={"Accept": "application/json"})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    (error,) = response.json()["Fault"]["Error"]
    assert error["Message"] == "Unsupported Operation" and "intuit.com" in error["Detail"]
    xml = httpx.request(method, f"{server.url}{path}")  # QuickBooks answers XML unless asked for JSON
    assert xml.status_code == status and xml.text.lstrip().startswith("<?xml") and "<Fault" in xml.text


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")
