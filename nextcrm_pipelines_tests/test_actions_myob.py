"""MYOB actions through the outbox, against the MYOB emulator over real HTTP and a real Postgres.

A customer card and a service invoice are each created through Dagster (sensor, then the apply job), land in
the mirror in the same run, and a later sync of them changes nothing. MYOB takes no idempotency key: a worker
killed after MYOB accepted a POST leaves one record, because the next run finds it by its reference (without
`find`, MYOB makes a second). Bad payloads fail naming the field before any request; MYOB's refusals fail with
its own message; a 5xx on the POST leaves the outcome unknown and the retry looks first. The emulator answers a
create as MYOB does (201, `Location`, no body), refuses with its `Errors` list, and makes a second record for a
repeated POST.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
import httpx
import pytest

from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.myob.actions import DISPLAY_ID_LENGTH, NUMBER_LENGTH, reference
from nextcrm_pipelines.providers.myob.records import parse_time
from nextcrm_pipelines_tests.accounting import Account, Profile, connect_account, decimal_of, mirror
from nextcrm_pipelines_tests.outbox_helpers import (
    applier,
    crash,
    requests_served,
    route_count,
    rows,
    submit,
    through_dagster,
    without_find,
)
from nextcrm_sandbox.myob import MyobControl
from nextcrm_sandbox.server import SandboxServer

MYOB = get_provider("myob")
apply = applier(MYOB)
PROFILE = Profile("myob", "myob_customers", "customer", "UID", None,
                  {"invoices": 24, "customers": 6, "days": 3, "requests_per_second": 0})  # fmt: skip
CUSTOMER_POST = "POST /accountright/{cf}/Contact/Customer"
INVOICE_POST = "POST /accountright/{cf}/Sale/Invoice/{layout}"


@pytest.fixture
def account(database_url: str, schema: str, box, sandbox: SandboxServer) -> Account:
    return connect_account(sandbox, database_url, box, PROFILE)


def gst(account: Account) -> str:
    """The UID of the company file's GST tax code (every generated card sells with it)."""
    return account.export("customer")["records"][0]["SellingDetails"]["TaxCode"]["UID"]


def income_account(account: Account) -> str:
    invoices = account.export("invoice")["records"]
    return next(line["Account"]["UID"] for i in invoices if i["InvoiceType"] == "Service" for line in i["Lines"])


def local_customer(account: Account) -> dict[str, Any]:
    """An active card billed in the company file's own currency."""
    cards = account.export("customer")["records"]
    return next(c for c in cards if c["IsActive"] and not c["ForeignCurrency"])


def records(account: Account, entity: str) -> dict[str, dict[str, Any]]:
    return {r["UID"]: r for r in account.export(entity)["records"]}


def posts(account: Account, pattern: str) -> int:
    return route_count(account.control, pattern)


def sync_today(database_url: str, schema: str, account: Account, entity: str):
    """A sync of the sandbox's current day (where the records an action makes land)."""
    today = datetime.fromtimestamp(account.sandbox.clock(), UTC).date()
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=MYOB, entity_name=entity,
                                connection_id=account.connection.id, windows=[day_window(today)])  # fmt: skip
    assert result.status == "success", result.error
    return result


def resync(database_url: str, schema: str, account: Account, entity: str, raw: dict[str, Any]):
    """A sync of the day the record was last modified in."""
    day = parse_time(raw["LastModified"]).date()
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=MYOB, entity_name=entity,
                                connection_id=account.connection.id, windows=[day_window(day)])  # fmt: skip
    assert result.status == "success", result.error
    return result


def test_a_customer_card_through_dagster_is_created_once_mirrored_and_a_later_sync_changes_nothing(
    database_url, schema, account
):
    payload = {"company_name": "Harbour Joinery Pty Ltd", "email": "accounts@harbour.example.com",
               "phone": "02 9000 1234", "street": "1 George St", "city": "Sydney", "state": "NSW",
               "postcode": "2000", "country": "Australia", "notes": "From the CRM",
               "tax_code": gst(account)}  # fmt: skip
    sync_today(database_url, schema, account, "myob_customers")  # the day's other cards are mirrored already
    before, sent = records(account, "customer"), posts(account, CUSTOMER_POST)
    done = submit(database_url, schema, account, "create_customer", payload, key="crm-customer-17")
    (materialization,) = through_dagster("myob")
    row = rows(database_url, schema)[done.id]
    assert row["status"] == "succeeded" and row["attempts"] == 1 and row["error"] is None
    created = {uid: card for uid, card in records(account, "customer").items() if uid not in before}
    assert list(created) == [row["result_id"]] and posts(account, CUSTOMER_POST) == sent + 1
    card = created[row["result_id"]]
    assert card["DisplayID"] == reference("crm-customer-17", DISPLAY_ID_LENGTH) == row["result"]["DisplayID"]
    assert card["CompanyName"] == "Harbour Joinery Pty Ltd" and card["IsIndividual"] is False
    assert card["SellingDetails"]["TaxCode"]["UID"] == payload["tax_code"]
    # Read your writes: the card as MYOB serves it, in the mirror at once, its day materialised.
    stored = mirror(database_url, schema, "myob_customers", account.connection.id)[card["UID"]]
    assert stored["raw"] == card and stored["source_updated_at"] == parse_time(card["LastModified"])
    assert (stored["company_name"], stored["email"], stored["phone"], stored["city"], stored["postcode"]) == (
        "Harbour Joinery Pty Ltd", "accounts@harbour.example.com", "02 9000 1234", "Sydney", "2000")  # fmt: skip
    assert stored["status"] == "Active" and not stored["deleted"] and stored["display_id"] == card["DisplayID"]
    day = parse_time(card["LastModified"]).date()
    assert materialization.asset_key == dg.AssetKey("myob_customers")
    assert materialization.partition == f"{account.connection.id}|{day:%Y-%m}-01"  # its month
    again = resync(database_url, schema, account, "myob_customers", card)
    assert again.counts.inserted == again.counts.updated == 0 and again.counts.unchanged >= 1


def test_a_service_invoice_through_dagster_is_created_once_mirrored_and_a_later_sync_changes_nothing(
    database_url, schema, account
):
    customer, tax, income = local_customer(account), gst(account), income_account(account)
    payload = {"customer": customer["UID"], "currency": "AUD", "date": "2026-03-02", "purchase_order": "PO-77",
               "lines": [{"description": "Site inspection", "amount": "120.00", "account": income, "tax_code": tax},
                         {"description": "Written report", "amount": "45.5", "account": income}]}  # fmt: skip
    sync_today(database_url, schema, account, "myob_invoices")  # the day's other invoices are mirrored already
    before, sent = records(account, "invoice"), posts(account, INVOICE_POST)
    done = submit(database_url, schema, account, "create_service_invoice", payload, key="crm-invoice-9")
    (materialization,) = through_dagster("myob")
    row = rows(database_url, schema)[done.id]
    assert row["status"] == "succeeded" and row["attempts"] == 1
    created = {uid: inv for uid, inv in records(account, "invoice").items() if uid not in before}
    assert list(created) == [row["result_id"]] and posts(account, INVOICE_POST) == sent + 1
    invoice = created[row["result_id"]]
    assert invoice["InvoiceType"] == "Service" and invoice["Number"] == reference("crm-invoice-9", NUMBER_LENGTH)
    assert invoice["Customer"]["UID"] == customer["UID"] and invoice["Date"] == "2026-03-02T00:00:00"
    # 120.00 + 45.50 with GST (10 %) on both lines: the second takes the card's tax code.
    assert [decimal_of(line["Total"]) for line in invoice["Lines"]] == [Decimal("120"), Decimal("45.5")]
    assert decimal_of(invoice["TotalTax"]) == Decimal("16.55") and decimal_of(invoice["TotalAmount"]) == Decimal(
        "182.05"
    )
    stored = mirror(database_url, schema, "myob_invoices", account.connection.id)[invoice["UID"]]
    typed = {key: value for key, value in invoice.items() if key != "InvoiceType"}  # as /Sale/Invoice/Service serves it
    assert stored["raw"] == typed and stored["source_updated_at"] == parse_time(invoice["LastModified"])
    assert (stored["number"], stored["invoice_type"], stored["status"], stored["customer_id"]) == (
        invoice["Number"], "Service", "Open", customer["UID"])  # fmt: skip
    assert stored["total"] == stored["balance_due"] == Decimal("182.05") and stored["line_items"] == 2
    day = parse_time(invoice["LastModified"]).date()
    assert materialization.asset_key == dg.AssetKey("myob_invoices")
    assert materialization.partition == f"{account.connection.id}|{day:%Y-%m}-01"  # its month
    again = resync(database_url, schema, account, "myob_invoices", invoice)
    assert again.counts.inserted == again.counts.updated == 0 and again.counts.unchanged >= 1


@pytest.mark.parametrize(
    ("action", "entity", "looked_up"),
    [("create_customer", "customer", True), ("create_service_invoice", "invoice", True),
     ("create_customer", "customer", False)],
    ids=["customer", "invoice", "customer-without-find"],
)  # fmt: skip
def test_a_worker_killed_after_myob_accepted_leaves_one_record_found_by_its_reference(
    database_url, schema, account, action, entity, looked_up
):
    if action == "create_customer":
        payload: dict[str, Any] = {"last_name": "Nguyen", "first_name": "Mia", "tax_code": gst(account)}
    else:
        payload = {"customer": local_customer(account)["UID"], "currency": "AUD",
                   "lines": [{"description": "Monthly maintenance", "amount": "99.95",
                              "account": income_account(account)}]}  # fmt: skip
    before = records(account, entity)
    done = submit(database_url, schema, account, action, payload, key=f"crm-crash-{action}")
    crash(database_url, schema, "myob")
    accepted = [uid for uid in records(account, entity) if uid not in before]
    assert len(accepted) == 1 and rows(database_url, schema)[done.id]["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses
    after = apply(database_url, schema, MYOB if looked_up else without_find(MYOB))
    row = rows(database_url, schema)[done.id]
    now = [uid for uid in records(account, entity) if uid not in before]
    assert after.succeeded == 1 and row["status"] == "succeeded"
    if looked_up:
        # Found by its card ID or number and adopted: still one record, and it is the row's result.
        assert after.adopted == 1 and now == accepted == [row["result_id"]]
        table_name = "myob_customers" if entity == "customer" else "myob_invoices"
        assert row["result_id"] in mirror(database_url, schema, table_name, account.connection.id)
    else:
        # MYOB takes no idempotency key: sent again without the lookup, it makes a second card.
        assert after.adopted == 0 and len(now) == 2 and row["result_id"] in now and row["result_id"] not in accepted


def test_bad_actions_fail_naming_the_field_and_nothing_reaches_myob(database_url, schema, account):
    tax, customer = str(uuid.uuid4()), str(uuid.uuid4())
    line = {"description": "Repairs", "amount": "10"}
    bad = [
        ("create_customer", {"tax_code": tax}, "give company_name for a company, or last_name"),
        ("create_customer", {"company_name": "Acme"}, "tax_code: Field required"),
        ("create_customer", {"company_name": "A" * 51, "tax_code": tax}, "company_name: String should have at most 50"),
        ("create_customer", {"company_name": "Acme", "last_name": "Smith", "tax_code": tax}, "not both"),
        ("create_customer", {"company_name": "Acme", "tax_code": "GST"}, "tax_code: Input should be a valid UUID"),
        ("create_customer", {"company_name": "Acme", "tax_code": tax, "email": "nope"}, "email: String should match"),
        ("create_customer", {"company_name": "Acme", "tax_code": tax, "fax": "1"}, "fax: Extra inputs are not"),
        ("create_service_invoice", {"currency": "AUD", "lines": [line]}, "customer: Field required"),
        ("create_service_invoice", {"customer": customer, "currency": "ZZZ", "lines": [line]},
         "currency: Invalid ISO 4217"),
        ("create_service_invoice", {"customer": customer, "currency": "AUD", "lines": [{**line, "amount": "-5"}]},
         "lines.0.amount: Input should be greater than 0"),
        ("create_service_invoice", {"customer": customer, "currency": "AUD", "lines": [{**line, "amount": 5.5}]},
         "not as floating-point numbers"),
        ("create_service_invoice", {"customer": customer, "currency": "AUD", "lines": [{**line, "amount": "5.001"}]},
         "lines.0.amount: AUD amounts have 2 decimal places"),
        ("create_service_invoice", {"customer": customer, "currency": "AUD", "lines": []},
         "lines: List should have at least 1 item"),
        ("create_service_invoice", {"customer": customer, "currency": "AUD", "lines": [line], "number": "N" * 14},
         "number: String should have at most 13 characters"),
        ("create_credit_note", {}, "myob has no action 'create_credit_note'"),
    ]  # fmt: skip
    ids = [submit(database_url, schema, account, action, payload).id for action, payload, _ in bad]
    requests = requests_served(account.control)
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(bad) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, bad, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
    assert requests_served(account.control) == requests  # nothing reached MYOB


def test_myob_refusals_fail_with_its_own_message_and_write_nothing(database_url, schema, account):
    customer, income = local_customer(account), income_account(account)
    line = {"description": "Repairs", "amount": "10.00", "account": income}
    unknown = str(uuid.uuid4())
    cases = [
        ("create_customer", {"company_name": "Wattle Bakery", "tax_code": unknown},
         ["HTTP 400", "NotFound: The tax code was not found (SellingDetails.TaxCode.UID)"]),
        ("create_service_invoice", {"customer": unknown, "currency": "AUD", "lines": [line]},
         ["HTTP 404", "NotFound"]),
        ("create_service_invoice", {"customer": customer["UID"], "currency": "NZD", "lines": [line]},
         ["currency: NZD is not the company file's (AUD)", "nothing was sent"]),
        ("create_service_invoice", {"customer": customer["UID"], "currency": "AUD",
                                    "lines": [{**line, "account": unknown}]},
         ["HTTP 400", "NotFound: The account was not found (Lines[0].Account.UID)"]),
    ]  # fmt: skip
    ids = [submit(database_url, schema, account, action, payload).id for action, payload, _ in cases]
    cards, invoices = records(account, "customer"), records(account, "invoice")
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(cases)
    for action_id, (_, _, messages) in zip(ids, cases, strict=True):
        error = stored[action_id]["error"]
        assert stored[action_id]["status"] == "failed" and all(m in error for m in messages), error
        assert "Wattle" not in error  # names are personal data: MYOB's messages name fields only
    assert records(account, "customer") == cards and records(account, "invoice") == invoices


def test_a_server_error_on_the_post_leaves_the_outcome_unknown_and_the_retry_looks_first(database_url, schema, account):
    before, sent = records(account, "customer"), posts(account, CUSTOMER_POST)
    done = submit(database_url, schema, account, "create_customer",
                  {"company_name": "Granite Logistics", "tax_code": gst(account)}, key="crm-5xx")  # fmt: skip
    account.control.set_faults(account.tenant_id, server_errors=1)
    try:
        first = apply(database_url, schema)
    finally:
        account.control.clear_faults(account.tenant_id)
    row = rows(database_url, schema)[done.id]
    # Sent once: a 5xx on a write MYOB has no key for is not repeated within the run.
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 500" in row["error"]
    assert posts(account, CUSTOMER_POST) == sent + 1
    second = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    created = [uid for uid in records(account, "customer") if uid not in before]
    assert second.succeeded == 1 and second.adopted == 0 and row["attempts"] == 2
    assert created == [row["result_id"]] and posts(account, CUSTOMER_POST) == sent + 2


def test_a_rate_limited_post_is_sent_again_in_the_same_run_and_makes_one_record(database_url, schema, account):
    before, sent = records(account, "customer"), posts(account, CUSTOMER_POST)
    done = submit(database_url, schema, account, "create_customer",
                  {"last_name": "Walker", "tax_code": gst(account)}, key="crm-429")  # fmt: skip
    # MYOB's per-second RateLimitError turns a request away unread: even a POST is sent again.
    account.control.set_faults(account.tenant_id, rate_limited=1)
    try:
        assert apply(database_url, schema).succeeded == 1
    finally:
        account.control.clear_faults(account.tenant_id)
    row = rows(database_url, schema)[done.id]
    created = [uid for uid in records(account, "customer") if uid not in before]
    assert row["status"] == "succeeded" and row["attempts"] == 1 and created == [row["result_id"]]
    assert posts(account, CUSTOMER_POST) == sent + 2  # the refused one and the one MYOB took


def test_a_location_on_another_host_is_read_through_the_company_file_not_followed(database_url, schema, box, sandbox):
    # MYOB names new records on regional hosts (arl2.api.myob.com): the token goes to the company file's URI only.
    account = connect_account(sandbox, database_url, box, PROFILE, location_origin="http://arl2.api.myob.invalid")
    done = submit(database_url, schema, account, "create_customer",
                  {"company_name": "Kookaburra Cleaning", "tax_code": gst(account)})  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    row = rows(database_url, schema)[done.id]
    assert row["status"] == "succeeded" and row["result"]["URI"].startswith(
        account.connection.settings["company_file_uri"]
    )
    assert row["result_id"] in mirror(database_url, schema, "myob_customers", account.connection.id)


# --- the emulator's writes, as a MYOB client sees them ----------------------------------------------


@pytest.fixture
def company_file(sandbox: SandboxServer) -> Iterator[dict[str, Any]]:
    control = MyobControl(sandbox)
    key = f"key-{uuid.uuid4().hex[:10]}"
    control.add_client(key, "s3cret", requests_per_second=0)
    tenant = control.add_tenant(key, seed=21, invoices=12, customers=4, days=2)
    token = control.grant(key, tenant["id"])["token"]["access_token"]
    headers = {"Authorization": f"Bearer {token}", "x-myobapi-key": key, "x-myobapi-version": "v2",
               "x-myobapi-cftoken": base64.b64encode(b"Administrator:").decode()}  # fmt: skip
    customers = control.export(tenant["id"], "customer")["records"]
    invoices = control.export(tenant["id"], "invoice")["records"]
    with httpx.Client(base_url=tenant["cf_uri"], headers=headers, timeout=30) as http:
        yield {
            "http": http,
            "control": control,
            "tenant": tenant["id"],
            "cf": tenant["cf_uri"],
            "tax": customers[0]["SellingDetails"]["TaxCode"]["UID"],
            "card": next(c for c in customers if not c["ForeignCurrency"]),
            "account": next(line["Account"]["UID"] for i in invoices if i["InvoiceType"] == "Service"
                            for line in i["Lines"]),
        }  # fmt: skip


def errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    assert set(body) == {"Errors", "Information"}
    return body["Errors"]


def test_the_emulator_creates_a_second_card_for_a_repeated_post_and_answers_201_with_a_location(company_file):
    http, tax = company_file["http"], company_file["tax"]
    card = {"IsIndividual": False, "CompanyName": "Coastal Motors Pty Ltd", "DisplayID": "CRM-REPEAT",
            "Addresses": [{"Email": "hello@coastal.example.com", "Phone1": "03 9000 0000"}],
            "SellingDetails": {"TaxCode": {"UID": tax}, "FreightTaxCode": {"UID": tax}}}  # fmt: skip
    first, second = http.post("/Contact/Customer", json=card), http.post("/Contact/Customer", json=card)
    for answer in (first, second):
        assert answer.status_code == 201 and answer.content == b"", answer.text
        assert answer.headers["location"].startswith(f"{company_file['cf']}/Contact/Customer/")
    assert first.headers["location"] != second.headers["location"]
    read = http.get(first.headers["location"])
    assert read.status_code == 200 and read.json()["CompanyName"] == "Coastal Motors Pty Ltd"
    assert read.json()["Addresses"][0]["Email"] == "hello@coastal.example.com"
    listed = http.get("/Contact/Customer", params={"$filter": "DisplayID eq 'CRM-REPEAT'"}).json()
    assert listed["Count"] == 2  # MYOB takes no idempotency key
    exported = [c for c in company_file["control"].export(company_file["tenant"], "customer")["records"]
                if c["DisplayID"] == "CRM-REPEAT"]  # fmt: skip
    assert len(exported) == 2
    with_body = http.post("/Contact/Customer", params={"returnBody": "true"}, json=card)
    assert with_body.status_code == 201 and with_body.json()["URI"] == with_body.headers["location"]


def test_the_emulator_refuses_bad_cards_with_every_problem_in_its_errors(company_file):
    http, tax = company_file["http"], company_file["tax"]
    missing = http.post("/Contact/Customer", json={"IsIndividual": True})
    assert missing.status_code == 400
    assert {(e["Name"], e["AdditionalDetails"], e["ErrorCode"]) for e in errors_of(missing)} == {
        ("Required", "LastName", 100), ("Required", "SellingDetails.TaxCode.UID", 100),
        ("Required", "SellingDetails.FreightTaxCode.UID", 100)}  # fmt: skip
    selling = {"TaxCode": {"UID": "GST"}, "FreightTaxCode": {"UID": str(uuid.uuid4())}}
    wrong = http.post(
        "/Contact/Customer", json={"IsIndividual": False, "CompanyName": "X" * 51, "SellingDetails": selling}
    )
    assert wrong.status_code == 400
    assert {(e["Name"], e["AdditionalDetails"]) for e in errors_of(wrong)} == {
        ("ValidationError", "CompanyName:(Customer)"), ("SerializationError", "SellingDetails.TaxCode.UID"),
        ("NotFound", "SellingDetails.FreightTaxCode.UID")}  # fmt: skip
    assert all("X" * 51 not in e["Message"] for e in errors_of(wrong))  # values are never echoed
    garbled = http.post("/Contact/Customer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert garbled.status_code == 400 and errors_of(garbled)[0]["Name"] == "SerializationError"
    person = http.post("/Contact/Customer", json={"IsIndividual": True, "LastName": "Kelly", "FirstName": "Ruby",
                                                  "SellingDetails": {"TaxCode": {"UID": tax},
                                                                     "FreightTaxCode": {"UID": tax}}})  # fmt: skip
    card = http.get(person.headers["location"]).json()
    assert (card["IsIndividual"], card["CompanyName"], card["DisplayID"]) == (True, None, "*None")


def test_the_emulator_creates_service_invoices_with_their_totals_and_a_second_for_a_repeated_post(company_file):
    http, tax, account, card = company_file["http"], company_file["tax"], company_file["account"], company_file["card"]
    invoice = {"Number": "CRM000000042", "Date": "2026-03-04T00:00:00", "Customer": {"UID": card["UID"]},
               "IsTaxInclusive": False,
               "Lines": [{"Type": "Transaction", "Description": "Consulting", "Total": 200.1,
                          "Account": {"UID": account}, "TaxCode": {"UID": tax}}]}  # fmt: skip
    first, second = http.post("/Sale/Invoice/Service", json=invoice), http.post("/Sale/Invoice/Service", json=invoice)
    assert first.status_code == second.status_code == 201 and first.content == b""
    made = http.get(first.headers["location"]).json()
    assert made["Number"] == "CRM000000042" and made["Status"] == "Open" and "InvoiceType" not in made
    assert (made["Subtotal"], made["TotalTax"], made["TotalAmount"], made["BalanceDueAmount"]) == (
        200.1, 20.01, 220.11, 220.11)  # fmt: skip
    assert made["Customer"]["UID"] == card["UID"] and made["Lines"][0]["Account"]["UID"] == account
    by_number = http.get("/Sale/Invoice/Service", params={"$filter": f"Number eq 'CRM000000042' and Customer/UID eq "
                                                                      f"guid'{card['UID']}'"}).json()  # fmt: skip
    assert by_number["Count"] == 2  # MYOB takes no idempotency key
    generic = http.get("/Sale/Invoice", params={"$filter": f"UID eq guid'{made['UID']}'"}).json()["Items"]
    assert generic[0]["InvoiceType"] == "Service" and "Lines" not in generic[0]
    no_lines = http.post("/Sale/Invoice/Service", json={"Customer": {"UID": str(uuid.uuid4())}})
    assert {(e["Name"], e["AdditionalDetails"]) for e in errors_of(no_lines)} == {
        ("Required", "Date"), ("NotFound", "Customer.UID"), ("Required", "Lines")}  # fmt: skip
    assert http.post("/Sale/Invoice", json=invoice).status_code == 405  # the generic list is read-only
    assert http.post("/Sale/Invoice/Item", json=invoice).status_code == 501


def test_the_stamp_of_a_created_record_is_the_sandbox_clock(company_file, sandbox: SandboxServer):
    http, tax = company_file["http"], company_file["tax"]
    card = {"IsIndividual": False, "CompanyName": "Outback Design",
            "SellingDetails": {"TaxCode": {"UID": tax}, "FreightTaxCode": {"UID": tax}}}  # fmt: skip
    made = http.get(http.post("/Contact/Customer", json=card).headers["location"]).json()
    stamped = parse_time(made["LastModified"])
    assert stamped == parse_time(made["Created"])
    assert abs(stamped - datetime.fromtimestamp(sandbox.clock(), UTC)).total_seconds() <= 2
