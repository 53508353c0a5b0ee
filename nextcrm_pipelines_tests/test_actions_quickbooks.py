"""QuickBooks actions through the outbox, over real HTTP against the emulator and a real Postgres: each action
runs through Dagster and lands at QuickBooks once and in the mirror at once (a later sync changes nothing); a
worker killed after QuickBooks acted leaves one object, because the retry's `requestid` gets QuickBooks' first
answer back; bad payloads fail naming the field before any request; QuickBooks' refusals (faults) fail with its
code and message and no personal data. The emulator's writes are tested as QuickBooks' API: `requestid` replay,
the 5010 Stale Object Error, validation faults, and the new objects in queries, Change Data Capture and webhooks.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.quickbooks import actions as qb_actions
from nextcrm_pipelines.providers.quickbooks.client import request_id
from nextcrm_pipelines.providers.quickbooks.records import updated_at
from nextcrm_pipelines_tests.accounting import PROFILES, Account, connect_account, mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.outbox_helpers import account_stats, applier, crash, outbox_row, submit, through_dagster

QUICKBOOKS = get_provider("quickbooks")
apply = applier(QUICKBOOKS)
ENTITIES = ("quickbooks_invoices", "quickbooks_customers", "quickbooks_payments")


def account_of(sandbox, database_url: str, box, **spec: Any) -> Account:
    """A small connected company: its seed data is static, so only our actions change it."""
    tenant = {"invoices": 24, "customers": 6, "days": 2, "deleted_invoices": 0, "inactive_share": 0.0,
              "requests_per_second": 0, **spec}  # fmt: skip
    return connect_account(sandbox, database_url, box, PROFILES["quickbooks_invoices"], **tenant)


def written_by_dagster() -> set[tuple[str, str | None]]:
    """One tick of the actions sensor and the run it asks for; the (asset, partition)s the run materialised."""
    return {(m.asset_key.path[-1], m.partition) for m in through_dagster("quickbooks")}


def realm_stats(account: Account) -> dict[str, int]:
    """The company's counters at the emulator: requests, writes, replayed..."""
    return account_stats(account.control, account.tenant_id)


def records(account: Account, entity: str) -> dict[str, dict[str, Any]]:
    return {r["Id"]: r for r in account.control.export(account.tenant_id, entity)["records"]}


def sync_all(database_url: str, schema: str, account: Account) -> dict[str, tuple[int, int]]:
    """Sync yesterday and today of every entity; (inserted, updated) per entity."""
    today = sandbox_now(account.sandbox).date()
    counts = {}
    for entity in ENTITIES:
        results = sync_days(database_url, schema, account.connection.id, entity, days_back(today, 1))
        assert all(r.status == "success" for r in results), [r.error for r in results]
        counts[entity] = (sum(r.counts.inserted for r in results), sum(r.counts.updated for r in results))
    return counts


def usd_customer(account: Account) -> dict[str, Any]:
    return next(c for c in records(account, "customer").values()
                if c["CurrencyRef"]["value"] == "USD" and c.get("Active", True))  # fmt: skip


def eur_customer(account: Account) -> dict[str, Any]:
    """A new customer billed in euros (the company's home currency is the dollar)."""
    return account.control.add_record(account.tenant_id, "customer", {"CurrencyRef": {"value": "EUR", "name": "Euro"}})


def test_each_action_through_dagster_is_sent_once_lands_in_the_mirror_and_a_later_sync_changes_nothing(
    database_url, schema, box, sandbox
):
    account = account_of(sandbox, database_url, box)
    connection = account.connection.id
    sync_all(database_url, schema, account)
    address = {"line1": "1 Main St", "city": "Tucson", "region": "AZ", "postal_code": "85719"}
    customer_payload = {"display_name": f"Acme Ltd {uuid.uuid4().hex[:6]}", "given_name": "Ada",
                        "family_name": "Lovelace", "email": "ada@example.com", "phone": "(555) 555-0100",
                        "address": address}  # fmt: skip
    made = submit(database_url, schema, connection, "create_customer", customer_payload, key="crm-customer-1")
    written = written_by_dagster()
    row = outbox_row(database_url, schema, made.id)
    assert row["status"] == "succeeded" and row["attempts"] == 1, row
    customer_id = row["result_id"]
    at_quickbooks = records(account, "customer")[customer_id]
    assert at_quickbooks["DisplayName"] == customer_payload["display_name"]
    assert at_quickbooks["PrimaryEmailAddr"] == {"Address": "ada@example.com"}
    assert at_quickbooks["BillAddr"]["City"] == "Tucson" and at_quickbooks["CurrencyRef"]["value"] == "USD"
    stored = mirror(database_url, schema, "quickbooks_customers", connection)[customer_id]
    assert (stored["display_name"], stored["email"], stored["status"], stored["deleted"]) == (
        customer_payload["display_name"], "ada@example.com", "active", False)  # fmt: skip
    # Mirrored at the version a sync gives it (its LastUpdatedTime), so a later sync finds nothing newer.
    assert stored["raw"] == at_quickbooks and stored["source_updated_at"] == updated_at(at_quickbooks)
    assert {asset for asset, _ in written} == {"quickbooks_customers"}
    assert {partition.split("|")[0] for _, partition in written} == {connection}

    invoice = submit(database_url, schema, connection, "create_invoice",
                     {"customer_id": customer_id, "currency": "usd", "memo": "Thanks",
                      "lines": [{"amount": "12.50", "item_id": "1", "description": "Design work"},
                                {"amount": "7.25", "item_id": "19"}]})  # fmt: skip
    written = written_by_dagster()
    row = outbox_row(database_url, schema, invoice.id)
    assert row["status"] == "succeeded", row
    invoice_id = row["result_id"]
    at_quickbooks = records(account, "invoice")[invoice_id]
    assert (at_quickbooks["TotalAmt"], at_quickbooks["Balance"], at_quickbooks["CustomerRef"]["value"]) == (
        19.75, 19.75, customer_id)  # fmt: skip
    invoices = mirror(database_url, schema, "quickbooks_invoices", connection)
    assert (invoices[invoice_id]["total"], invoices[invoice_id]["status"]) == (Decimal("19.75"), "open")
    assert invoices[invoice_id]["raw"] == at_quickbooks
    # The customer owes it at once: its row was re-read with the invoice.
    assert mirror(database_url, schema, "quickbooks_customers", connection)[customer_id]["balance"] == Decimal("19.75")
    assert {asset for asset, _ in written} == {"quickbooks_invoices", "quickbooks_customers"}

    void = submit(database_url, schema, connection, "void_invoice", {"invoice_id": invoice_id})
    through_dagster("quickbooks")
    row = outbox_row(database_url, schema, void.id)
    assert row["status"] == "succeeded" and row["result_id"] == invoice_id, row
    assert records(account, "invoice")[invoice_id]["PrivateNote"] == "Voided"
    voided = mirror(database_url, schema, "quickbooks_invoices", connection)[invoice_id]
    assert (voided["status"], voided["deleted"], voided["total"]) == ("voided", True, 0)
    assert mirror(database_url, schema, "quickbooks_customers", connection)[customer_id]["balance"] == 0

    before = {entity: mirror(database_url, schema, entity, connection) for entity in ENTITIES}
    assert sync_all(database_url, schema, account) == {entity: (0, 0) for entity in ENTITIES}
    after = {entity: mirror(database_url, schema, entity, connection) for entity in ENTITIES}
    assert after == before
    assert realm_stats(account)["writes"] == 3


def test_a_void_of_an_invoice_with_a_payment_mirrors_the_payment_it_left_unapplied(database_url, schema, box,
                                                                                     sandbox):  # fmt: skip
    account = account_of(sandbox, database_url, box, invoices=40)
    connection = account.connection.id
    sync_all(database_url, schema, account)
    paid = next(i for i in records(account, "invoice").values()
                if any(t["TxnType"] == "Payment" for t in i["LinkedTxn"])
                and i.get("PrivateNote") != "Voided")  # fmt: skip
    payment_id = next(t["TxnId"] for t in paid["LinkedTxn"] if t["TxnType"] == "Payment")
    done = submit(database_url, schema, connection, "void_invoice",
                  {"invoice_id": paid["Id"], "sync_token": paid["SyncToken"]})  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    assert outbox_row(database_url, schema, done.id)["status"] == "succeeded"
    payment = mirror(database_url, schema, "quickbooks_payments", connection)[payment_id]
    assert payment["raw"] == records(account, "payment")[payment_id] and paid["Id"] not in payment["invoice_ids"]
    assert sync_all(database_url, schema, account) == {entity: (0, 0) for entity in ENTITIES}


BAD = [
    ("create_customer", {}, "display_name: Field required"),
    ("create_customer", {"display_name": "Parent: Child"}, "display_name: String should match pattern"),
    ("create_customer", {"display_name": "Ok", "email": "not-an-email"}, "email: String should match pattern"),
    ("create_customer", {"display_name": "Ok", "currency": "ZZZ"}, "currency: Invalid ISO 4217"),
    ("create_invoice", {"customer_id": "1", "lines": [{"amount": "5", "item_id": "1"}]}, "currency: Field required"),
    ("create_invoice", {"customer_id": "1", "currency": "ZZZ", "lines": [{"amount": "5", "item_id": "1"}]},
     "currency: Invalid ISO 4217"),
    ("create_invoice", {"customer_id": "1", "currency": "USD", "lines": [{"amount": "-5", "item_id": "1"}]},
     "lines.0.amount: Input should be greater than 0"),
    ("create_invoice", {"customer_id": "1", "currency": "USD", "lines": [{"amount": 5.5, "item_id": "1"}]},
     "not as floating-point numbers"),
    ("create_invoice", {"customer_id": "1", "currency": "USD", "lines": [{"amount": "5.001", "item_id": "1"}]},
     "lines.0.amount: USD amounts have 2 decimal places"),
    ("create_invoice", {"customer_id": "1", "currency": "USD", "lines": []}, "lines: List should have at least 1"),
    ("create_invoice", {"customer_id": "1", "currency": "USD", "lines": [{"amount": "5"}]},
     "lines.0.item_id: Field required"),
    ("void_invoice", {"invoice_id": "INV-1"}, "invoice_id: String should match pattern"),
    ("void_invoice", {"invoice_id": "1", "why": "typo"}, "why: Extra inputs are not permitted"),
]  # fmt: skip


def test_bad_payloads_fail_naming_the_field_and_nothing_reaches_quickbooks(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box, invoices=4, customers=2)
    ids = [submit(database_url, schema, account.connection.id, action, payload).id for action, payload, _ in BAD]
    requests = realm_stats(account)["requests"]
    done = apply(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        row = outbox_row(database_url, schema, action_id)
        assert row["status"] == "failed" and message in row["error"] and row["sent_at"] is None, (message, row)
    assert realm_stats(account)["requests"] == requests  # nothing reached QuickBooks


def test_quickbooks_refusals_fail_with_its_fault_and_no_personal_data(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box)
    connection = account.connection.id
    taken = usd_customer(account)
    other = eur_customer(account)
    invoice = next(i for i in records(account, "invoice").values() if i.get("PrivateNote") != "Voided")
    account.control.update_record(account.tenant_id, invoice["Id"], {"PrivateNote": "Changed at QuickBooks"})
    cases = {
        # The name is used already: QuickBooks' 6240.
        "duplicate": ("create_customer", {"display_name": taken["DisplayName"]}, "6240 Duplicate Name Exists Error"),
        # The invoice changed since the CRM read its SyncToken: QuickBooks' 5010, and it is not voided.
        "stale": ("void_invoice", {"invoice_id": invoice["Id"], "sync_token": invoice["SyncToken"]},
                  "5010 Stale Object Error: the object changed since its SyncToken was read"),
        # An item QuickBooks does not have.
        "item": ("create_invoice", {"customer_id": taken["Id"], "currency": "USD",
                                    "lines": [{"amount": "10", "item_id": "999"}]}, "2500 Invalid Reference Id"),
        # Another currency than the customer's is refused before the invoice is sent.
        "currency": ("create_invoice", {"customer_id": other["Id"], "currency": "USD",
                                        "lines": [{"amount": "10", "item_id": "1"}]},
                     f"currency: USD is not customer {other['Id']}'s currency"),
        "missing": ("void_invoice", {"invoice_id": "99999"}, "invoice_id: no invoice 99999"),
    }  # fmt: skip
    ids = {name: submit(database_url, schema, connection, action, payload).id
           for name, (action, payload, _) in cases.items()}  # fmt: skip
    writes = realm_stats(account)["writes"]
    assert apply(database_url, schema).failed == len(cases)
    for name, (_, _, message) in cases.items():
        row = outbox_row(database_url, schema, ids[name])
        assert row["status"] == "failed" and message in row["error"], (name, row)
        assert taken["DisplayName"] not in row["error"] and "Sandbox Admin" not in row["error"]
    assert "HTTP 400" in outbox_row(database_url, schema, ids["duplicate"])["error"]
    assert records(account, "invoice")[invoice["Id"]].get("PrivateNote") == "Changed at QuickBooks"
    assert realm_stats(account)["writes"] == writes  # every refusal left QuickBooks unchanged


def test_server_errors_and_throttling_are_retried_under_the_same_requestid_and_make_one_invoice(
    database_url, schema, box, sandbox
):
    account = account_of(sandbox, database_url, box)
    customer = usd_customer(account)
    before = len(records(account, "invoice"))
    payload = {"customer_id": customer["Id"], "currency": "USD", "lines": [{"amount": "40", "item_id": "1"}]}
    done = submit(database_url, schema, account.connection.id, "create_invoice", payload)
    account.control.set_faults(account.tenant_id, server_errors=2, rate_limited=1)
    try:
        assert apply(database_url, schema).succeeded == 1
    finally:
        account.control.clear_faults(account.tenant_id)
    row = outbox_row(database_url, schema, done.id)
    assert row["status"] == "succeeded" and row["attempts"] == 1
    assert len(records(account, "invoice")) == before + 1 and realm_stats(account)["writes"] == 1


@pytest.mark.parametrize("action", ["create_customer", "create_invoice", "void_invoice"])
def test_a_worker_killed_after_quickbooks_acted_leaves_one_object_and_the_next_run_records_it(
    action, database_url, schema, box, sandbox, secret_key
):
    account = account_of(sandbox, database_url, box)
    customer = usd_customer(account)
    invoice = next(i for i in records(account, "invoice").values() if i.get("PrivateNote") != "Voided")
    payload = {
        "create_customer": {"display_name": f"Crash Test {uuid.uuid4().hex[:6]}"},
        "create_invoice": {"customer_id": customer["Id"], "currency": "USD",
                           "lines": [{"amount": "99.99", "item_id": "4"}]},
        # The token read before the crash: a resend without the requestid's replay would be a 5010.
        "void_invoice": {"invoice_id": invoice["Id"], "sync_token": invoice["SyncToken"]},
    }[action]  # fmt: skip
    entity = "customer" if action == "create_customer" else "invoice"
    before = records(account, entity)
    done = submit(database_url, schema, account.connection.id, action, payload)
    crash(database_url, schema, "quickbooks")
    made = records(account, entity)
    assert realm_stats(account)["writes"] == 1 and outbox_row(database_url, schema, done.id)["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses
    after = apply(database_url, schema)
    row = outbox_row(database_url, schema, done.id)
    assert after.succeeded == 1 and row["status"] == "succeeded", row
    stats = realm_stats(account)
    assert (stats["writes"], stats["replayed"]) == (1, 1)  # QuickBooks answered the repeat with its first answer
    assert records(account, entity) == made
    if action == "void_invoice":
        assert made[invoice["Id"]]["PrivateNote"] == "Voided" and row["result_id"] == invoice["Id"]
        assert int(made[invoice["Id"]]["SyncToken"]) == int(invoice["SyncToken"]) + 1  # voided once
    else:
        (new_id,) = set(made) - set(before)
        assert row["result_id"] == new_id


def test_without_the_requestid_replay_a_killed_worker_would_make_a_second_invoice(
    database_url, schema, box, sandbox, secret_key, monkeypatch
):
    account = account_of(sandbox, database_url, box)
    customer = usd_customer(account)
    before = len(records(account, "invoice"))
    submit(database_url, schema, account.connection.id, "create_invoice",
           {"customer_id": customer["Id"], "currency": "USD", "lines": [{"amount": "10", "item_id": "1"}]})  # fmt: skip
    crash(database_url, schema, "quickbooks")
    time.sleep(1.2)
    # The resend under a fresh requestid: QuickBooks has no way to know it is the same invoice.
    monkeypatch.setattr(qb_actions, "request_id", lambda key: uuid.uuid4().hex)
    assert apply(database_url, schema).succeeded == 1
    assert len(records(account, "invoice")) == before + 2


def test_request_ids_are_the_key_or_a_digest_of_it_within_quickbooks_limit():
    assert request_id("crm-invoice-8812") == "crm-invoice-8812"
    long_key = "crm:" + "x" * 80
    assert request_id(long_key) == request_id(long_key) != request_id(long_key + "y")
    assert len(request_id(long_key)) <= 50 and len(request_id("with space")) <= 50
    assert request_id("with space") != "with space"


# --- the emulator's writes, as QuickBooks' API ------------------------------------------------------------------


@contextmanager
def api_of(account: Account) -> Iterator[httpx.Client]:
    """A JSON client of the company's API root with a fresh access token."""
    token = account.control.grant(account.client_id, account.tenant_id)["token"]["access_token"]
    root = f"{account.sandbox.url}/quickbooks/api/v3/company/{account.tenant_id}"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(base_url=root, timeout=30, headers=headers) as client:
        yield client


def post(client: httpx.Client, path: str, body: Any, **params: str) -> httpx.Response:
    return client.post(path, params={"minorversion": "75", **params}, content=json.dumps(body),
                       headers={"Content-Type": "application/json"})  # fmt: skip


def fault(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = response.json()["Fault"]
    assert body["type"] == "ValidationFault"
    (error,) = body["Error"]
    assert set(error) >= {"Message", "Detail", "code"}
    return error


def test_emulator_replays_a_repeated_requestid_and_acts_again_without_one(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box, invoices=4, customers=2)
    customer = usd_customer(account)
    with api_of(account) as client:
        first = post(client, "/customer", {"DisplayName": "Replay One"}, requestid="req-1")
        again = post(client, "/customer", {"DisplayName": "Something Else"}, requestid="req-1")
        assert first.status_code == again.status_code == 200 and again.json() == first.json()
        assert [c["DisplayName"] for c in records(account, "customer").values()].count("Something Else") == 0
        detail = {"ItemRef": {"value": "1"}, "Qty": 2, "UnitPrice": 12.75}
        line = {"Amount": 25.5, "DetailType": "SalesItemLineDetail", "SalesItemLineDetail": detail}
        invoice = {"CustomerRef": {"value": customer["Id"]}, "Line": [line]}
        made = [post(client, "/invoice", invoice, requestid="req-2").json() for _ in range(3)]
        assert made[0] == made[1] == made[2] and made[0]["Invoice"]["TotalAmt"] == 25.5
        balance = records(account, "customer")[customer["Id"]]["Balance"]
        assert balance == pytest.approx(customer["Balance"] + 25.5)  # owed once
        # Without a requestid every request acts.
        ids = {post(client, "/invoice", invoice).json()["Invoice"]["Id"] for _ in range(2)}
        assert len(ids) == 2
        # Only answers are remembered: a refused request may be corrected and sent again under its requestid.
        assert fault(post(client, "/invoice", {"Line": invoice["Line"]}, requestid="req-3"))["code"] == "2020"
        assert post(client, "/invoice", invoice, requestid="req-3").status_code == 200
        assert fault(post(client, "/customer", {"DisplayName": "x"}, requestid="r" * 51))["element"] == "requestid"
    assert realm_stats(account)["replayed"] == 3


def test_emulator_void_takes_the_current_synctoken_and_answers_5010_to_a_stale_one(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box, invoices=8, customers=3)
    invoice = next(i for i in records(account, "invoice").values() if i.get("PrivateNote") != "Voided")
    with api_of(account) as client:
        stale = fault(post(client, "/invoice", {"Id": invoice["Id"], "SyncToken": str(int(invoice["SyncToken"]) + 7)},
                           operation="void"))  # fmt: skip
        assert (stale["code"], stale["Message"]) == ("5010", "Stale Object Error")
        assert records(account, "invoice")[invoice["Id"]] == invoice
        voided = post(client, "/invoice", {"Id": invoice["Id"], "SyncToken": invoice["SyncToken"]}, operation="void",
                      requestid="void-1")  # fmt: skip
        assert voided.status_code == 200
        body = voided.json()["Invoice"]
        assert (body["TotalAmt"], body["Balance"], body["PrivateNote"]) == (0.0, 0.0, "Voided")
        assert body["SyncToken"] == str(int(invoice["SyncToken"]) + 1)
        # The same request again: its token is stale now, but the requestid gets the first answer.
        replay = post(client, "/invoice", {"Id": invoice["Id"], "SyncToken": invoice["SyncToken"]},
                      operation="void", requestid="void-1")  # fmt: skip
        assert replay.json() == voided.json()
        assert fault(post(client, "/invoice", {"Id": "424242", "SyncToken": "0"}, operation="void"))["code"] == "610"
        assert fault(post(client, "/invoice", {"Id": invoice["Id"]}, operation="void"))["element"] == "SyncToken"
        read = client.get(f"/invoice/{invoice['Id']}", params={"minorversion": "75"}).json()["Invoice"]
        assert read == body
        deleted = post(client, "/invoice", {"Id": body["Id"], "SyncToken": body["SyncToken"]}, operation="delete")
        assert deleted.json()["Invoice"] == {"domain": "QBO", "status": "Deleted", "Id": invoice["Id"]}
    assert invoice["Id"] in account.control.export(account.tenant_id, "invoice")["deleted_ids"]


VALIDATION = [
    ("/customer", {}, "2020", "DisplayName"),
    ("/customer", {"DisplayName": "A", "Nickname": "B"}, "2010", "Nickname"),
    ("/customer", {"DisplayName": "x" * 501}, "2050", "DisplayName"),
    ("/customer", {"DisplayName": "A", "CurrencyRef": {"value": "JPY"}}, "2500", "CurrencyRef"),
    ("/invoice", {"Line": []}, "2020", "CustomerRef"),
    ("/invoice", {"CustomerRef": {"value": "{customer}"}}, "2020", "Line"),
    ("/invoice", {"CustomerRef": {"value": "{customer}"}, "Line": [{"Amount": 5}]}, "2020", "Line.DetailType"),
    ("/invoice", {"CustomerRef": {"value": "{customer}"}, "DocNumber": "D" * 22,
                  "Line": [{"Amount": 5, "DetailType": "SalesItemLineDetail"}]}, "2050", "DocNumber"),
    ("/invoice", {"CustomerRef": {"value": "{customer}"},
                  "Line": [{"Amount": 5, "DetailType": "SalesItemLineDetail"}]}, "2020",
     "Line.SalesItemLineDetail.ItemRef"),
    ("/invoice", {"CustomerRef": {"value": "424242"}, "Line": [{"Amount": 5, "DetailType": "SalesItemLineDetail",
                                                                 "SalesItemLineDetail": {"ItemRef": {"value": "1"}}}]},
     "2500", "CustomerRef"),
    ("/invoice", {"CustomerRef": {"value": "{customer}"},
                  "Line": [{"Amount": 5, "DetailType": "SalesItemLineDetail",
                            "SalesItemLineDetail": {"ItemRef": {"value": "1"}, "Qty": 2, "UnitPrice": 3}}]},
     "6070", "Line.Amount"),
]  # fmt: skip


def test_emulator_refuses_bad_writes_with_quickbooks_validation_faults(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box, invoices=4, customers=2)
    customer = usd_customer(account)
    with api_of(account) as client:
        for path, body, code, element in VALIDATION:
            body = json.loads(json.dumps(body).replace("{customer}", customer["Id"]))
            error = fault(post(client, path, body))
            assert (error["code"], error.get("element")) == (code, element), (path, body, error)
        duplicate = fault(post(client, "/customer", {"DisplayName": customer["DisplayName"].upper()}))
        assert duplicate["code"] == "6240" and customer["DisplayName"] not in duplicate["Detail"]
        foreign = eur_customer(account)
        line = {"Amount": 5, "DetailType": "SalesItemLineDetail", "SalesItemLineDetail": {"ItemRef": {"value": "1"}}}
        mismatch = fault(post(client, "/invoice", {"CustomerRef": {"value": foreign["Id"]},
                                                   "CurrencyRef": {"value": "USD"}, "Line": [line]}))  # fmt: skip
        assert mismatch["code"] == "6000"
        # An update (a body with an Id) is not served: QuickBooks' Unsupported Operation fault, nothing changed.
        assert fault(post(client, "/customer", {"Id": customer["Id"], "SyncToken": "0", "DisplayName": "N"}))[
            "code"] == "500"  # fmt: skip
    assert realm_stats(account)["writes"] == 0


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[Any] = []

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_emulator_writes_reach_queries_change_data_capture_and_webhooks(database_url, schema, box, sandbox):
    account = account_of(sandbox, database_url, box, invoices=4, customers=2)
    _Receiver.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    sub = account.control.subscribe_webhooks(url, "verifier", realm=account.tenant_id)
    try:
        with api_of(account) as client:
            since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(account.sandbox.clock() - 60))
            made = post(client, "/customer", {"DisplayName": "Webhook Co"}).json()["Customer"]
            invoice = post(client, "/invoice", {"CustomerRef": {"value": made["Id"]},
                                                "Line": [{"Amount": 3, "DetailType": "SalesItemLineDetail",
                                                          "SalesItemLineDetail": {"ItemRef": {"value": "1"}}}]}
                           ).json()["Invoice"]  # fmt: skip
            post(client, "/invoice", {"Id": invoice["Id"], "SyncToken": "0"}, operation="void")
            found = client.post("/query", params={"minorversion": "75"}, headers={"Content-Type": "application/text"},
                                content=f"SELECT * FROM Customer WHERE Id IN ('{made['Id']}')").json()  # fmt: skip
            assert found["QueryResponse"]["Customer"][0]["Balance"] == 0
            cdc = client.get("/cdc", params={"entities": "Invoice,Customer", "changedSince": since}).json()
            blocks = {key: [r["Id"] for r in rows] for block in cdc["CDCResponse"][0]["QueryResponse"]
                      for key, rows in block.items() if isinstance(rows, list)}  # fmt: skip
            assert invoice["Id"] in blocks["Invoice"] and made["Id"] in blocks["Customer"]
        assert account.control.flush_webhooks()
    finally:
        account.control.unsubscribe_webhooks(sub["id"])
        server.shutdown()
    seen = {(e["name"], e["id"], e["operation"]) for body in _Receiver.bodies
            for note in body["eventNotifications"] for e in note["dataChangeEvent"]["entities"]}  # fmt: skip
    assert {("Customer", made["Id"], "Create"), ("Invoice", invoice["Id"], "Create"),
            ("Invoice", invoice["Id"], "Void"), ("Customer", made["Id"], "Update")} <= seen  # fmt: skip
