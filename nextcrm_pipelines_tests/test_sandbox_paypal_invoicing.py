"""Tests of the PayPal emulator's Invoicing v2, plan changes and balances (``nextcrm_sandbox.paypal``), over
real loopback HTTP with a bearer token, as any PayPal client calls them.

Invoices: search (``POST /v2/invoicing/search-invoices``: every criterion, inclusive ranges, paging with
``total_items``/``total_pages`` and HATEOAS links, summaries without audit times), list, read, send, cancel,
record payment, delete, and PayPal's validation, not-found and business-rule errors. Invoices paid through
PayPal are Checkout captures Transaction Search shows under the invoice's number, and refunding the capture
refunds the invoice. Plans: activate, deactivate, new prices, patches, each announced as ``BILLING.PLAN.*``.
Balances: per currency, as of a time, from the rows Transaction Search shows. Answers are checked against
PayPal's OpenAPI files where a folder holds them (``NEXTCRM_SPECS_DIR``; the invoicing file is
``paypal-invoicing_v2.json``), and skip otherwise.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from nextcrm_pipelines_tests.test_paypal_webhook_accounts import Recorder
from nextcrm_pipelines_tests.test_sandbox_paypal import LAG, NOW, SECRET, Api, _conforms, _load_spec, iso
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer

SPEC = {"seed": 21, "transactions": 600, "subscriptions": 6, "plans": 5, "invoices": 60, "days": 12,
        "requests_per_minute": 0}  # fmt: skip
DAY = 86_400
# Fields PayPal's invoice answers carry that its Feb 2024 invoicing schema does not list.
LATER_FIELDS = {"viewed_by_recipient", "group_draft", "archived", "caller_type", "transaction_type"}


@dataclass
class Shop:
    """A sandbox of its own, one merchant app in it, and a client for the app's API."""

    server: SandboxServer
    control: PayPalControl
    account_id: str
    api: Api


@pytest.fixture
def shop() -> Iterator[Shop]:
    server = SandboxServer(now=NOW).start()
    try:
        control = PayPalControl(server)
        account = control.add_account("inv-app", SECRET, **SPEC)
        api = Api(server, "inv-app", SECRET)
        yield Shop(server, control, account["id"], api)
        api.close()
    finally:
        server.stop()


def search(api: Api, criteria: dict[str, Any], **params: Any):
    headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
    return api.http.post(f"{api.base}/v2/invoicing/search-invoices", params=params, content=orjson.dumps(criteria),
                         headers=headers)  # fmt: skip


def call(api: Api, method: str, path: str, body: Any = None):
    headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
    return api.http.request(method, f"{api.base}{path}", headers=headers,
                            content=orjson.dumps(body) if body is not None else None)  # fmt: skip


def everything(api: Api, criteria: dict[str, Any], page_size: int = 7) -> list[dict[str, Any]]:
    """Every invoice a search finds, following its pages to the last."""
    found, page = [], 1
    while True:
        body = search(api, criteria, page=page, page_size=page_size, total_required="true").json()
        found += body["items"]
        if page >= body["total_pages"]:
            return found
        page += 1


def export(control: PayPalControl, account_id: str) -> dict[str, dict[str, Any]]:
    return {inv["id"]: inv for inv in control.export(account_id, "invoices")["records"]}


def created(inv: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(inv["detail"]["metadata"]["create_time"]).timestamp()


def near(text: str, moment: float) -> bool:
    """Whether an RFC 3339 time is `moment` give or take the seconds the sandbox clock ticks during a test."""
    return abs(dt.datetime.fromisoformat(text).timestamp() - moment) <= 3


def paid_on(inv: dict[str, Any]) -> list[str]:
    return [p["payment_date"] for p in (inv.get("payments") or {}).get("transactions", [])]


# --- invoices ----------------------------------------------------------------------------------------------


def test_invoice_answers_conform_to_paypal_openapi(shop) -> None:
    api = shop.api
    spec = _load_spec("paypal-invoicing_v2.json")
    schema = spec["components"]["schemas"]["invoices"]

    def problems(value: Any, part: dict[str, Any]) -> list[str]:
        return [p for p in _conforms(spec, part, value) if p.split("unknown key ")[-1] not in LATER_FIELDS]

    body = search(api, {"fields": ["items", "payments", "refunds"]}, page_size=100, total_required="true").json()
    assert body["total_items"] == 60 and problems(body, schema) == []
    listed = api.get("/v2/invoicing/invoices", page_size=100, total_required="true", fields="all").json()
    assert problems(listed, schema) == []
    for inv in body["items"][:20]:
        full = api.get(f"/v2/invoicing/invoices/{inv['id']}").json()
        assert problems(full, spec["components"]["schemas"]["invoice"]) == []
    missing = api.get("/v2/invoicing/invoices/INV2-AAAA-BBBB-CCCC-DDDD")
    assert missing.status_code == 404 and problems(missing.json(), spec["components"]["schemas"]["error_404"]) == []


def test_search_summaries_carry_no_audit_times_and_collections_only_when_asked(shop) -> None:
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    truth = export(control, account_id)
    plain = search(api, {}, page_size=100).json()
    assert "total_items" not in plain and len(plain["items"]) == 60
    for inv in plain["items"]:
        assert set(inv["detail"]["metadata"]) == {"create_time"} and "items" not in inv
        assert "transactions" not in (inv.get("payments") or {})
        assert inv["amount"]["value"] == truth[inv["id"]]["amount"]["value"]
        assert inv["due_amount"] == truth[inv["id"]]["due_amount"] and inv["status"] == truth[inv["id"]]["status"]
    asked = search(api, {"fields": ["payments"]}, page_size=100).json()["items"]
    paid = [inv for inv in asked if inv.get("payments")]
    assert paid and all(inv["payments"]["transactions"] == truth[inv["id"]]["payments"]["transactions"] for inv in paid)


def test_search_criteria_ranges_and_paging(shop) -> None:
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    truth = export(control, account_id)
    newest = sorted(truth.values(), key=created)[-1]
    at = newest["detail"]["metadata"]["create_time"]
    # Both ends of a range are included.
    got = everything(api, {"creation_date_range": {"start": at, "end": at}})
    assert [i["id"] for i in got] == [newest["id"]]
    later = iso(created(newest) + 1)
    assert everything(api, {"creation_date_range": {"start": later, "end": iso(NOW + DAY)}}) == []
    # Newest first, every page read once, the links pointing at the next page.
    whole = everything(api, {}, page_size=7)
    assert len(whole) == len({i["id"] for i in whole}) == 60
    assert [created(i) for i in whole] == sorted((created(i) for i in whole), reverse=True)
    first = search(api, {}, page=1, page_size=7, total_required="true").json()
    assert (first["total_items"], first["total_pages"]) == (60, 9)
    assert {link["rel"] for link in first["links"]} >= {"self", "next", "last"}
    assert all(link["method"] == "POST" for link in first["links"])
    assert search(api, {}, page=10, page_size=7).json()["items"] == []
    # Each criterion alone finds exactly what the invoices say.
    one = next(i for i in truth.values() if i.get("payments"))
    email = one["primary_recipients"][0]["billing_info"]["email_address"]
    amount = one["amount"]
    cases = [
        ({"status": ["PAID", "MARKED_AS_PAID"]}, lambda i: i["status"] in ("PAID", "MARKED_AS_PAID")),
        ({"recipient_email": email[:8].upper()},
         lambda i: i["primary_recipients"][0]["billing_info"]["email_address"].startswith(email[:8])),
        ({"invoice_number": one["detail"]["invoice_number"]}, lambda i: i["id"] == one["id"]),
        ({"currency_code": "EUR"}, lambda i: i["detail"]["currency_code"] == "EUR"),
        ({"total_amount_range": {"lower_amount": amount, "upper_amount": amount}},
         lambda i: i["amount"]["currency_code"] == amount["currency_code"] and i["amount"]["value"] == amount["value"]),
        ({"invoice_date_range": {"start": one["detail"]["invoice_date"], "end": one["detail"]["invoice_date"]}},
         lambda i: i["detail"]["invoice_date"] == one["detail"]["invoice_date"]),
    ]  # fmt: skip
    for criteria, wanted in cases:
        expected = {i["id"] for i in truth.values() if wanted(i)}
        assert expected and {i["id"] for i in everything(api, criteria)} == expected, criteria
    # Payments are dated by day: an invoice paid within the days strictly inside the range is found, and every
    # invoice found was paid on a day the range touches.
    first_day, last_day = (dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat() for t in (NOW - 3 * DAY, NOW))
    found = {i["id"] for i in everything(api, {"payment_date_range": {"start": iso(NOW - 3 * DAY), "end": iso(NOW)}})}
    inside = {i["id"] for i in truth.values() if any(first_day < d < last_day for d in paid_on(i))}
    touching = {i["id"] for i in truth.values() if any(first_day <= d <= last_day for d in paid_on(i))}
    assert inside and inside <= found <= touching


def test_search_and_read_errors_are_paypals(shop) -> None:
    api = shop.api
    checks = [
        (search(api, {}, page_size=101), "page_size", "INVALID_INTEGER_MAX_VALUE"),
        (search(api, {}, page=0), "page", "INVALID_INTEGER_MIN_VALUE"),
        (search(api, {}, page=1001), "page", "INVALID_INTEGER_MAX_VALUE"),
        (search(api, {}, page="x"), "page", "INVALID_PARAMETER_SYNTAX"),
        (search(api, {"creation_date_range": {"start": iso(NOW)}}), "/creation_date_range/end",
         "MISSING_REQUIRED_PARAMETER"),
        (search(api, {"payment_date_range": {"start": "2026-01-01", "end": iso(NOW)}}), "/payment_date_range/start",
         "INVALID_PARAMETER_SYNTAX"),
        (search(api, {"invoice_date_range": {"start": iso(NOW), "end": "2026-01-02"}}), "/invoice_date_range/start",
         "INVALID_PARAMETER_SYNTAX"),
        (search(api, {"status": ["OVERDUE"]}), "/status", "INVALID_PARAMETER_VALUE"),
        (search(api, {"status": ["DRAFT", "SENT", "PAID", "UNPAID", "REFUNDED", "CANCELLED"]}), "/status",
         "INVALID_ARRAY_MAX_ITEMS"),
    ]  # fmt: skip
    for response, field, issue in checks:
        body = response.json()
        assert response.status_code == 400 and body["name"] == "INVALID_REQUEST", body
        assert [(d["field"], d["issue"]) for d in body["details"]] == [(field, issue)]
        assert body["debug_id"] == response.headers["paypal-debug-id"] and body["links"][0]["rel"] == "information_link"
    bad_json = api.http.post(f"{api.base}/v2/invoicing/search-invoices", content=b"{not json",
                             headers={"Authorization": f"Bearer {api.token}"})  # fmt: skip
    assert bad_json.status_code == 400 and bad_json.json()["name"] == "MALFORMED_REQUEST_JSON"
    missing = call(api, "GET", "/v2/invoicing/invoices/INV2-NOPE-NOPE-NOPE-NOPE").json()
    assert missing["name"] == "RESOURCE_NOT_FOUND" and missing["details"][0]["issue"] == "INVALID_RESOURCE_ID"
    unauthorised = api.http.post(f"{api.base}/v2/invoicing/search-invoices", json={})
    assert unauthorised.status_code == 401 and unauthorised.json()["name"] == "AUTHENTICATION_FAILURE"
    assert call(api, "POST", "/v2/invoicing/invoices/X/remind-later", {}).status_code == 404


def test_an_invoice_is_sent_paid_in_part_cancelled_and_a_draft_deleted(shop) -> None:
    server = shop.server
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    draft = control.add_record(account_id, "invoice", {"status": "DRAFT", "amount": "100.00", "currency": "USD"})
    invoice_id = draft["id"]
    assert draft["status"] == "DRAFT" and "first_sent_time" not in draft["detail"]["metadata"]
    at = server.advance_clock(60)
    sent = call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/send", {})
    assert sent.status_code == 200 and sent.json()["rel"] == "payer-view"
    shown = api.get(f"/v2/invoicing/invoices/{invoice_id}").json()
    assert shown["status"] == "SENT" and near(shown["detail"]["metadata"]["first_sent_time"], at)
    server.advance_clock(60)
    over = call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/payments",
                {"method": "CASH", "amount": {"currency_code": "USD", "value": "100.01"}})  # fmt: skip
    assert over.status_code == 422 and over.json()["name"] == "UNPROCESSABLE_ENTITY"
    assert call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/payments", {}).json()["details"][0]["issue"] == (
        "MISSING_REQUIRED_PARAMETER")  # fmt: skip
    cheque = {"method": "CHECK", "amount": {"currency_code": "USD", "value": "40.00"}, "note": "cheque 118"}
    part = call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/payments", cheque)
    assert part.status_code == 200 and part.json()["payment_id"].startswith("EXTR-")
    shown = api.get(f"/v2/invoicing/invoices/{invoice_id}").json()
    assert (shown["status"], shown["due_amount"]["value"], shown["payments"]["paid_amount"]["value"]) == (
        "PARTIALLY_PAID", "60.00", "40.00")  # fmt: skip
    assert call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/remind", {}).status_code == 204
    updated = api.get(f"/v2/invoicing/invoices/{invoice_id}").json()["detail"]["metadata"]["last_update_time"]
    at = server.advance_clock(60)
    assert call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/cancel", {}).status_code == 204
    shown = api.get(f"/v2/invoicing/invoices/{invoice_id}").json()
    metadata = shown["detail"]["metadata"]
    assert shown["status"] == "CANCELLED" and near(metadata["cancel_time"], at)
    assert metadata["last_update_time"] == updated  # cancelling sets cancel_time only, as PayPal does
    assert call(api, "POST", f"/v2/invoicing/invoices/{invoice_id}/cancel", {}).status_code == 422
    assert call(api, "DELETE", f"/v2/invoicing/invoices/{invoice_id}").status_code == 422  # sent: cancel instead
    other = control.add_record(account_id, "invoice", {"status": "DRAFT"})["id"]
    assert call(api, "DELETE", f"/v2/invoicing/invoices/{other}").status_code == 204
    assert api.get(f"/v2/invoicing/invoices/{other}").status_code == 404
    assert other not in {i["id"] for i in everything(api, {})}
    assert control.export(account_id, "invoices")["deleted_ids"] == [other]
    # Paid outside PayPal, then refunded outside it.
    cash = control.add_record(account_id, "invoice", {"amount": "30.00", "currency": "USD"})["id"]
    assert call(api, "POST", f"/v2/invoicing/invoices/{cash}/payments", {"method": "CASH"}).status_code == 200
    assert api.get(f"/v2/invoicing/invoices/{cash}").json()["status"] == "MARKED_AS_PAID"
    back = call(api, "POST", f"/v2/invoicing/invoices/{cash}/refunds", {"method": "CASH"})
    assert back.status_code == 200 and back.json()["refund_id"].startswith("EXTR-")
    refunded = api.get(f"/v2/invoicing/invoices/{cash}").json()
    assert (refunded["status"], refunded["refunds"]["refund_amount"]["value"]) == ("MARKED_AS_REFUNDED", "30.00")
    assert call(api, "POST", f"/v2/invoicing/invoices/{cash}/refunds", {"method": "CASH"}).status_code == 422
    # A draft dated later is scheduled, not sent.
    later = dt.datetime.fromtimestamp(server.clock() + 4 * DAY, dt.UTC).date().isoformat()
    dated = control.add_record(account_id, "invoice", {"status": "DRAFT", "invoice_date": later})["id"]
    assert call(api, "POST", f"/v2/invoicing/invoices/{dated}/send", {}).status_code == 200
    assert api.get(f"/v2/invoicing/invoices/{dated}").json()["status"] == "SCHEDULED"


def test_invoices_paid_through_paypal_are_captures_transaction_search_shows(shop) -> None:
    server = shop.server
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    truth = export(control, account_id)
    rows = {r["transaction_info"]["transaction_id"]: r["transaction_info"]
            for r in control.export(account_id, "transactions")["records"]
            if r["transaction_info"]["transaction_event_code"] == "T0006"}  # fmt: skip
    paid = [i for i in truth.values() if any(p["type"] == "PAYPAL" for p in (i.get("payments") or {}).get(
        "transactions", []))]  # fmt: skip
    assert len(paid) > 10
    for inv in paid:
        (payment,) = inv["payments"]["transactions"]
        capture = rows[payment["payment_id"]]
        assert capture["transaction_event_code"] == "T0006" and capture["invoice_id"] == inv["detail"]["invoice_number"]
        assert (
            capture["transaction_amount"]
            == payment["amount"]
            == {k: inv["amount"][k] for k in ("currency_code", "value")}
        )
        assert capture["transaction_initiation_date"][:10] == payment["payment_date"]
        assert created(inv) < dt.datetime.fromisoformat(capture["transaction_initiation_date"]).timestamp()
    refunded = [i for i in paid if i["status"] in ("REFUNDED", "PARTIALLY_REFUNDED")]
    assert all(rows[i["payments"]["transactions"][0]["payment_id"]]["transaction_status"] in ("V", "F")
               for i in refunded)  # fmt: skip
    # Paying an open invoice makes a capture; refunding the capture refunds the invoice.
    opened = control.add_record(account_id, "invoice", {"amount": "25.00", "currency": "GBP"})["id"]
    server.advance_clock(60)
    assert control.changes(account_id, invoice_payments=100)["invoices_paid"].count(opened) == 1
    capture_id = api.get(f"/v2/invoicing/invoices/{opened}").json()["payments"]["transactions"][0]["payment_id"]
    capture = api.get(f"/v2/payments/captures/{capture_id}").json()
    number = api.get(f"/v2/invoicing/invoices/{opened}").json()["detail"]["invoice_number"]
    assert (capture["status"], capture["amount"]["value"], capture["invoice_id"]) == ("COMPLETED", "25.00", number)
    server.advance_clock(LAG + 60)
    shown = api.search(server.clock() - LAG - 3600, server.clock() - LAG, transaction_id=capture_id).json()
    assert [d["transaction_info"]["invoice_id"] for d in shown["transaction_details"]] == [capture["invoice_id"]]
    back = call(api, "POST", f"/v2/payments/captures/{capture_id}/refund",
                {"amount": {"currency_code": "GBP", "value": "5.00"}})  # fmt: skip
    assert back.status_code == 201
    after = api.get(f"/v2/invoicing/invoices/{opened}").json()
    assert after["status"] == "PARTIALLY_REFUNDED" and after["refunds"]["refund_amount"]["value"] == "5.00"
    assert after["refunds"]["transactions"][0]["refund_id"] == back.json()["id"]


def test_invoices_are_deterministic_and_leave_the_rest_of_the_account_as_it_was(shop) -> None:
    control, account_id = shop.control, shop.account_id

    def invoices() -> list[tuple]:
        return [(i["id"], i["detail"]["invoice_number"], i["status"], i["amount"]["value"])
                for i in control.export(account_id, "invoices")["records"]]  # fmt: skip

    def transactions() -> list[dict[str, Any]]:
        return [r["transaction_info"] for r in control.export(account_id, "transactions")["records"]]

    first, rows = invoices(), transactions()
    again = control.add_account("inv-app", SECRET, **SPEC)  # the same app made again: the same account
    assert again["id"] == account_id and again["invoices"] == 60 and invoices() == first
    without = control.add_account("inv-app", SECRET, **{**SPEC, "invoices": 0})
    assert without["invoices"] == 0 and without["counts"] == again["counts"]
    assert transactions() == rows  # invoices draw on a random stream of their own


def test_invoice_changes_are_announced_with_the_whole_invoice(shop) -> None:
    server = shop.server
    control = shop.control
    account_id = shop.account_id
    with closing(Recorder()) as recorder:
        control.subscribe_webhooks(
            account_id,
            recorder.url,
            event_types=["INVOICING.INVOICE.CREATED", "INVOICING.INVOICE.PAID", "INVOICING.INVOICE.CANCELLED"],
        )
        made = control.changes(account_id, invoices=2)["invoices_created"]
        server.advance_clock(60)
        control.changes(account_id, invoice_cancels=1)
        assert control.flush_webhooks()
        events = [orjson.loads(body) for body, _ in recorder.deliveries]
    kinds = [e["event_type"] for e in events]
    assert kinds[:2] == ["INVOICING.INVOICE.CREATED"] * 2 and kinds[2:] == ["INVOICING.INVOICE.CANCELLED"]
    assert {e["resource"]["invoice"]["id"] for e in events[:2]} == set(made)
    for event in events:
        invoice = event["resource"]["invoice"]
        assert (event["resource_type"], event["resource_version"]) == ("invoices", "2.0")
        assert event["summary"] and invoice["detail"]["metadata"]["create_time"] and "items" in invoice
    cancelled = events[-1]["resource"]["invoice"]
    assert cancelled["status"] == "CANCELLED" and cancelled["detail"]["metadata"]["cancel_time"]


# --- plans ---------------------------------------------------------------------------------------------------


def test_plan_changes_follow_paypals_rules_and_are_announced(shop) -> None:
    server = shop.server
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    plans = control.export(account_id, "plans")["records"]
    plan = next(p for p in plans if p["status"] == "ACTIVE")
    pid = plan["id"]
    with closing(Recorder()) as recorder:
        control.subscribe_webhooks(
            account_id,
            recorder.url,
            event_types=[
                "BILLING.PLAN.UPDATED",
                "BILLING.PLAN.DEACTIVATED",
                "BILLING.PLAN.ACTIVATED",
                "BILLING.PLAN.PRICING-CHANGE.ACTIVATED",
            ],
        )
        again = call(api, "POST", f"/v1/billing/plans/{pid}/activate", {})
        assert again.status_code == 422 and again.json()["details"][0]["issue"] == "PLAN_STATUS_INVALID"
        regular = next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")
        currency = regular["pricing_scheme"]["fixed_price"]["currency_code"]
        server.advance_clock(60)
        priced = call(api, "POST", f"/v1/billing/plans/{pid}/update-pricing-schemes", {"pricing_schemes": [
            {"billing_cycle_sequence": regular["sequence"],
             "pricing_scheme": {"fixed_price": {"currency_code": currency, "value": "42"}}}]})  # fmt: skip
        assert priced.status_code == 204
        wrong = call(api, "POST", f"/v1/billing/plans/{pid}/update-pricing-schemes", {"pricing_schemes": [
            {"billing_cycle_sequence": 99, "pricing_scheme": {"fixed_price": {"currency_code": currency,
                                                                               "value": "1"}}}]})  # fmt: skip
        assert wrong.status_code == 422
        server.advance_clock(60)
        patched = call(api, "PATCH", f"/v1/billing/plans/{pid}", [{"op": "replace", "path": "/description",
                                                                    "value": "Now with support"}])  # fmt: skip
        assert patched.status_code == 204
        assert (
            call(
                api, "PATCH", f"/v1/billing/plans/{pid}", [{"op": "replace", "path": "/product_id", "value": "PROD-X"}]
            ).status_code
            == 422
        )
        at = server.advance_clock(60)
        assert call(api, "POST", f"/v1/billing/plans/{pid}/deactivate", {}).status_code == 204
        assert call(api, "POST", "/v1/billing/plans/P-NOSUCHPLAN000000000000000/deactivate", {}).status_code == 404
        assert control.flush_webhooks()
        events = [orjson.loads(body) for body, _ in recorder.deliveries]
    shown = api.get(f"/v1/billing/plans/{pid}").json()
    cycle = next(c for c in shown["billing_cycles"] if c["tenure_type"] == "REGULAR")
    assert cycle["pricing_scheme"]["version"] == regular["pricing_scheme"]["version"] + 1
    assert float(cycle["pricing_scheme"]["fixed_price"]["value"]) == 42
    assert (shown["status"], shown["description"]) == ("INACTIVE", "Now with support")
    assert near(shown["update_time"], at)
    assert [e["event_type"] for e in events] == ["BILLING.PLAN.PRICING-CHANGE.ACTIVATED", "BILLING.PLAN.UPDATED",
                                                 "BILLING.PLAN.DEACTIVATED"]  # fmt: skip
    assert all(e["resource_type"] == "plan" and e["resource"]["id"] == pid for e in events)
    assert events[-1]["resource"] == shown
    billing = _load_spec("paypal-billing_subscriptions_v1.json")
    assert [p for p in _conforms(billing, billing["components"]["schemas"]["plan"], shown)
            if "usage_type" not in p] == []  # fmt: skip


# --- balances ------------------------------------------------------------------------------------------------


def test_balances_are_the_ending_balances_transaction_search_shows(shop) -> None:
    server = shop.server
    control = shop.control
    account_id = shop.account_id
    api = shop.api
    body = api.get("/v1/reporting/balances").json()
    refreshed = server.clock() - LAG
    assert body["account_id"] == account_id and body["as_of_time"] == body["last_refresh_time"]
    assert near(body["as_of_time"], refreshed)
    reporting = _load_spec("paypal-reporting_transactions_v1.json")
    assert _conforms(reporting, reporting["components"]["schemas"]["balances_response"], body) == []

    def ending(until: float) -> dict[str, str]:
        last: dict[str, str] = {}
        start = until - 30 * DAY
        for row in api.rows(start, until):
            info = row["transaction_info"]
            if "ending_balance" in info:
                last[info["ending_balance"]["currency_code"]] = info["ending_balance"]["value"]
        return last

    assert {b["currency"]: b["total_balance"]["value"] for b in body["balances"]} == ending(
        dt.datetime.fromisoformat(body["as_of_time"]).timestamp()
    )
    assert body["balances"][0]["primary"] and not any(b["primary"] for b in body["balances"][1:])
    for b in body["balances"]:
        total, available = float(b["total_balance"]["value"]), float(b["available_balance"]["value"])
        assert round(total - available, 2) == float(b["withheld_balance"]["value"]) >= 0
    earlier = NOW - LAG - 5 * DAY
    then = api.get("/v1/reporting/balances", as_of_time=iso(earlier)).json()
    assert then["as_of_time"] == iso(earlier)
    assert {b["currency"]: b["total_balance"]["value"] for b in then["balances"]} == ending(earlier)
    euro = api.get("/v1/reporting/balances", currency_code="EUR").json()["balances"]
    assert [b["currency"] for b in euro] == ["EUR"]
    assert api.get("/v1/reporting/balances", currency_code="euro").status_code == 400
    assert api.get("/v1/reporting/balances", as_of_time="yesterday").status_code == 400
    assert api.get("/v1/reporting/balances", as_of_time=iso(NOW - 4 * 365 * DAY)).status_code == 400
    control.set_knobs(account_id, scopes=["https://uri.paypal.com/services/reporting/search/read"])
    limited = Api(server, "inv-app", SECRET)
    refused = limited.get("/v1/reporting/balances")
    limited.close()
    assert refused.status_code == 403 and refused.json()["name"] == "NOT_AUTHORIZED"
