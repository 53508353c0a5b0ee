"""The MYOB emulator's customer payments (``/Sale/CustomerPayment``) and what they change, over real loopback HTTP.

A client of the real MYOB Business API reads payments the way it reads invoices: ``{Items, NextPageLink,
Count}`` pages, OData ``$filter``/``$orderby``/``$top``/``$skip``, single records by UID, MYOB's error
bodies, the ``sme-sales`` scope and the per-key limits. The payments agree with the invoices they pay:
every amount paid on an invoice is a payment's applied amount, and deleting a payment makes it owing
again. The control API records new payments (an edit that pays, an explicit payment) and deletes cards
only while no transaction uses them.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from nextcrm_pipelines_tests.test_sandbox_myob import NOW, api_headers, error_of, get, new_app, walk
from nextcrm_sandbox.myob import MyobControl, format_myob_datetime, parse_myob_datetime
from nextcrm_sandbox.server import SandboxServer

# The fields of MYOB's CustomerPayment and of its Invoices lines (the AccountRight API .NET SDK's contracts).
PAYMENT_FIELDS = {
    "UID", "URI", "RowVersion", "Created", "LastModified", "DepositTo", "Account", "Customer", "TransactionUID",
    "ReceiptNumber", "Date", "AmountReceived", "AmountReceivedForeign", "ForeignCurrency", "CurrencyExchangeRate",
    "PaymentMethod", "Memo", "Invoices",
}  # fmt: skip
PAYMENT_LINE_FIELDS = {"RowID", "Number", "UID", "AmountApplied", "AmountAppliedForeign", "GainOrLoss", "Type", "URI"}


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
    """An unthrottled key with one 800-invoice company file and a token for it (read-only tests)."""
    key = "key-payments-reader"
    control.add_client(key, "s3cret", requests_per_second=0)
    tenant = control.add_tenant(key, seed=31, invoices=800, customers=25, days=40)
    grant = control.grant(key, tenant["id"])
    return {"key": key, "tenant": tenant, "cf": tenant["cf_uri"], "token": grant["token"]["access_token"]}


def fresh(control: MyobControl, **spec: Any) -> dict[str, Any]:
    """A company file of a new key, for a test that changes it."""
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, **{"seed": 32, "invoices": 60, "customers": 8, **spec})
    return {"key": key, "tenant": tenant, "cf": tenant["cf_uri"], "token": control.grant(key)["token"]["access_token"]}


def cents(value: float | None) -> int:
    return round((value or 0) * 100)


def test_payments_page_like_every_myob_collection(http: httpx.Client, reader: dict[str, Any], control: MyobControl):
    first = get(http, reader, "/Sale/CustomerPayment", **{"$top": 100})
    page = first.json()
    assert first.status_code == 200 and list(page) == ["Items", "NextPageLink", "Count"]
    exported = control.export(reader["tenant"]["id"], "payment")["records"]
    assert page["Count"] == len(exported) > 400 and len(page["Items"]) == 100
    assert urlsplit(page["NextPageLink"]).path.endswith("/Sale/CustomerPayment")
    assert parse_qs(urlsplit(page["NextPageLink"]).query) == {"$top": ["100"], "$skip": ["100"]}
    walked = walk(http, reader, "/Sale/CustomerPayment", **{"$top": 70, "$orderby": "ReceiptNumber desc"})
    assert [p["UID"] for p in walked] == [p["UID"] for p in sorted(exported, key=lambda p: p["ReceiptNumber"])][::-1]
    default = get(http, reader, "/Sale/CustomerPayment").json()  # 400 a page unless asked
    assert len(default["Items"]) == 400 and parse_qs(urlsplit(default["NextPageLink"]).query)["$skip"] == ["400"]

    payment = walked[5]
    assert set(payment) == PAYMENT_FIELDS
    assert all(set(line) == PAYMENT_LINE_FIELDS and line["Type"] == "Invoice" for line in payment["Invoices"])
    assert set(payment["Customer"]) == {"UID", "Name", "DisplayID", "URI"}
    assert payment["URI"] == f"{reader['cf']}/Sale/CustomerPayment/{payment['UID']}"
    assert payment["DepositTo"] in ("Account", "UndepositedFunds")
    assert (payment["Account"] is None) == (payment["DepositTo"] == "UndepositedFunds")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T00:00:00", payment["Date"])
    assert get(http, reader, f"/Sale/CustomerPayment/{payment['UID']}").json() == payment
    missing = get(http, reader, f"/Sale/CustomerPayment/{uuid.uuid4()}")
    assert missing.status_code == 404 and error_of(missing)["Name"] == "NotFound"


def test_payments_filter_on_last_modified_customer_and_uid(http: httpx.Client, reader: dict[str, Any], control):
    exported = control.export(reader["tenant"]["id"], "payment")["records"]
    by_modified = sorted(exported, key=lambda p: parse_myob_datetime(p["LastModified"]))
    start, end = by_modified[40]["LastModified"], by_modified[90]["LastModified"]
    window = f"LastModified ge datetime'{start}' and LastModified lt datetime'{end}'"
    found = walk(http, reader, "/Sale/CustomerPayment", **{"$filter": window, "$orderby": "LastModified", "$top": 7})
    assert [p["UID"] for p in found] == [p["UID"] for p in by_modified[40:90]]
    customer = exported[3]["Customer"]["UID"]
    theirs = walk(http, reader, "/Sale/CustomerPayment", **{"$filter": f"Customer/UID eq guid'{customer}'"})
    assert {p["UID"] for p in theirs} == {p["UID"] for p in exported if p["Customer"]["UID"] == customer}
    one = get(http, reader, "/Sale/CustomerPayment", **{"$filter": f"UID eq guid'{exported[9]['UID']}'"}).json()
    assert one["Count"] == 1 and one["Items"][0]["UID"] == exported[9]["UID"]
    bad = get(http, reader, "/Sale/CustomerPayment", **{"$filter": "Nope eq 1"})
    assert bad.status_code == 400 and error_of(bad)["Name"] == "InvalidQuery"


def test_every_amount_paid_on_an_invoice_is_applied_by_a_payment(reader: dict[str, Any], control: MyobControl):
    invoices = {r["UID"]: r for r in control.export(reader["tenant"]["id"], "invoice")["records"]}
    payments = control.export(reader["tenant"]["id"], "payment")["records"]
    applied: Counter[str] = Counter()
    for payment in payments:
        lines = payment["Invoices"]
        assert cents(payment["AmountReceived"]) == sum(cents(line["AmountApplied"]) for line in lines) > 0
        invoice = invoices[lines[0]["UID"]]
        assert payment["Customer"] == invoice["Customer"]
        assert payment["ForeignCurrency"] == invoice["ForeignCurrency"]
        if payment["ForeignCurrency"]:
            assert cents(payment["AmountReceivedForeign"]) == sum(cents(line["AmountAppliedForeign"]) for line in lines)
        for line in lines:
            applied[line["UID"]] += cents(line["AmountApplied"])
            assert line["Number"] == invoices[line["UID"]]["Number"]
            # The payment is recorded once the invoice exists, and changing the invoice is what paying it does.
            assert parse_myob_datetime(payment["LastModified"]) >= parse_myob_datetime(invoices[line["UID"]]["Created"])
    for uid, invoice in invoices.items():
        assert applied[uid] == cents(invoice["TotalAmount"]) - cents(invoice["BalanceDueAmount"]) or (
            invoice["Status"] == "Credit" and not applied[uid]
        )
    assert any(len(p["Invoices"]) > 1 for p in payments) and any(p["ForeignCurrency"] for p in payments)
    assert {p["DepositTo"] for p in payments} == {"Account", "UndepositedFunds"}


def test_deleting_a_payment_makes_its_amounts_owing_again(server: SandboxServer, http: httpx.Client, control):
    ctx = fresh(control)
    tenant = ctx["tenant"]["id"]
    payment = max(control.export(tenant, "payment")["records"], key=lambda p: len(p["Invoices"]))
    before = {r["UID"]: r for r in control.export(tenant, "invoice")["records"]}
    headers = api_headers(ctx["key"], ctx["token"])
    deleted = http.delete(f"{ctx['cf']}/Sale/CustomerPayment/{payment['UID']}", headers=headers)
    assert deleted.status_code == 200 and deleted.content == b""
    assert get(http, ctx, f"/Sale/CustomerPayment/{payment['UID']}").status_code == 404
    assert control.export(tenant, "payment")["deleted_ids"] == [payment["UID"]]
    after = {r["UID"]: r for r in control.export(tenant, "invoice")["records"]}
    stamp = format_myob_datetime(server.clock() * 1_000_000)
    for line in payment["Invoices"]:
        was, now = before[line["UID"]], after[line["UID"]]
        assert cents(now["BalanceDueAmount"]) == cents(was["BalanceDueAmount"]) + cents(line["AmountApplied"])
        assert now["Status"] == "Open" and now["LastModified"] == stamp and now["RowVersion"] != was["RowVersion"]
    again = http.delete(f"{ctx['cf']}/Sale/CustomerPayment/{payment['UID']}", headers=headers)
    assert again.status_code == 404
    post = http.post(f"{ctx['cf']}/Sale/CustomerPayment", json={}, headers=headers)
    assert post.status_code == 501 and error_of(post)["Name"] == "NotImplemented"


def test_payments_need_the_sales_scope_and_count_against_the_key(http: httpx.Client, control: MyobControl):
    key = new_app(control, requests_per_second=0)
    tenant = control.add_tenant(key, seed=33, invoices=10, customers=2, daily_limit=3)
    contacts_only = control.grant(key, tenant["id"], scope="sme-company-file sme-contacts-customer")
    ctx = {"key": key, "cf": tenant["cf_uri"], "token": contacts_only["token"]["access_token"]}
    refused = get(http, ctx, "/Sale/CustomerPayment")
    assert refused.status_code == 401 and error_of(refused)["Name"] == "OAuthTokenIsInvalid"
    assert get(http, ctx, "/Contact/Customer").status_code == 200
    sales = {**ctx, "token": control.grant(key, tenant["id"])["token"]["access_token"]}
    assert get(http, sales, "/Sale/CustomerPayment").status_code == 200
    capped = get(http, sales, "/Sale/CustomerPayment")  # the key's fourth call of the day: over its cap of three
    assert capped.status_code == 403 and error_of(capped)["Name"] == "RateLimitError"
    assert control.stats()["by_path"]["GET /accountright/{cf}/Sale/CustomerPayment"] >= 3


def test_control_records_payments_for_paid_invoices_and_deletes_only_unused_cards(server: SandboxServer, control):
    ctx = fresh(control, seed=34, invoices=80, customers=6)
    tenant = ctx["tenant"]["id"]
    server.advance_clock(60)
    stamp = format_myob_datetime(server.clock() * 1_000_000)
    out = control.changes(tenant, edits=30, customer_creates=2)
    payments = {p["UID"]: p for p in control.export(tenant, "payment")["records"]}
    invoices = {r["UID"]: r for r in control.export(tenant, "invoice")["records"]}
    assert out["payments_created"]
    for uid in out["payments_created"]:
        assert payments[uid]["LastModified"] == stamp
        assert {line["UID"] for line in payments[uid]["Invoices"]} <= set(out["edited"])
        assert all(invoices[line["UID"]]["LastPaymentDate"] for line in payments[uid]["Invoices"])

    with pytest.raises(RuntimeError, match="without transactions"):
        control.changes(tenant, customer_deletes=3)
    removed = control.changes(tenant, customer_deletes=2)["customers_deleted"]
    assert sorted(removed) == sorted(out["customers_created"])
    assert control.export(tenant, "customer")["deleted_ids"] == removed

    target = next(r for r in invoices.values() if r["BalanceDueAmount"] > 0)
    paid = control.add_record(tenant, "payment", {"Invoice": {"UID": target["UID"]}, "Memo": "Cheque 123"})
    assert paid["Memo"] == "Cheque 123" and paid["Invoices"][0]["UID"] == target["UID"]
    assert paid["AmountReceived"] == target["BalanceDueAmount"]
    closed = next(r for r in control.export(tenant, "invoice")["records"] if r["UID"] == target["UID"])
    assert (closed["Status"], closed["BalanceDueAmount"]) == ("Closed", 0)
    edited = control.update_record(tenant, paid["UID"], {"Memo": "Cheque 124"}, updated_at=server.clock() + 1)
    assert edited["Memo"] == "Cheque 124" and edited["RowVersion"] != paid["RowVersion"]


def test_same_seed_gives_same_payments(control: MyobControl):
    key = new_app(control)
    one = control.add_tenant(key, seed=35, invoices=50, customers=5, id=str(uuid.uuid4()))
    two = control.add_tenant(key, seed=35, invoices=50, customers=5, id=str(uuid.uuid4()))

    def strip(records: list[dict[str, Any]]) -> list[str]:
        return [re.sub(r"accountright/[0-9a-f-]+/", "", repr(r)) for r in records]

    first, second = (control.export(t["id"], "payment")["records"] for t in (one, two))
    assert first and strip(first) == strip(second)
