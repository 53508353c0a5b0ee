"""Xero actions through the outbox, over real HTTP against the Xero emulator and a real Postgres.

Each action (create and update a contact; create, update and void an invoice) goes through Dagster (sensor tick,
apply run), lands at Xero as asked (exact decimals included) and in the mirror at once, and a later sync of the
same records changes nothing. A worker killed after Xero accepted leaves one object: within Xero's six minutes
its `Idempotency-Key` answers the retry with the first answer; later, the lookup by the reference the action set
adopts it (without the lookup the retry would fail a contact and make a second bill). Bad payloads and a grant
without Xero's write scope fail before anything is sent; Xero's refusals fail with its message and no personal
data; 5xx and 429 are survived under the same key; and the emulator's webhooks for the objects the actions
wrote, duplicated and newest first, leave the rows as the actions wrote them. The emulator's own write rules
(idempotency, validation errors, scopes, 404s) are tested over plain HTTP.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.xero.actions import reference_of
from nextcrm_pipelines.webhooks.app import receiver_url
from nextcrm_pipelines_tests.accounting import PROFILES, Account, connect_account, mirror
from nextcrm_pipelines_tests.helpers import sandbox_now
from nextcrm_pipelines_tests.outbox_helpers import (
    account_stats,
    applier,
    crash,
    rows,
    submit,
    through_dagster,
    without_find,
)
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply
from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.xero import XeroControl

XERO = get_provider("xero")
apply = applier(XERO)
TENANT = {"invoices": 30, "contacts": 8, "days": 2}
API = "/xero/api/api.xro/2.0"
WEBHOOK_KEY = "xero-actions-webhook-key-" + "a" * 32


@pytest.fixture
def account(database_url: str, schema: str, box, sandbox: SandboxServer) -> Account:
    """A new app and organisation connected through the OAuth flow (our scopes), today already synced."""
    connected = connect_account(sandbox, database_url, box, PROFILES["xero_invoices"], **TENANT)
    for entity in ("xero_contacts", "xero_invoices"):
        sync(database_url, schema, connected, entity, sandbox)
    return connected


def sync(database_url: str, schema: str, account: Account, entity: str, sandbox: SandboxServer) -> Any:
    """Today's partition of `entity` (what the actions wrote is in it)."""
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=XERO, entity_name=entity,
                                connection_id=account.connection.id,
                                windows=[day_window(sandbox_now(sandbox).date())])  # fmt: skip
    assert result.status == "success", result.error
    return result


def exported(account: Account, entity: str) -> dict[str, dict]:
    id_field = {"contacts": "ContactID", "invoices": "InvoiceID"}[entity]
    return {r[id_field]: r for r in account.export(entity)["records"]}


def tenant_stats(account: Account) -> dict[str, Any]:
    """The organisation's counters at the emulator: requests, idempotent replays, faults met..."""
    return account_stats(account.control, account.tenant_id)


def assert_mirrored(database_url: str, schema: str, account: Account, entity: str, record_id: str) -> dict:
    """The mirror row of `record_id` holds exactly what Xero holds (raw JSON and version)."""
    row = mirror(database_url, schema, f"xero_{entity}", account.connection.id)[record_id]
    assert row["raw"] == exported(account, entity)[record_id]
    return row


def test_every_action_through_dagster_reaches_xero_and_the_mirror_and_a_later_sync_changes_nothing(
    database_url, schema, sandbox, account
):
    today = sandbox_now(sandbox).date()
    currency = account.control.tenant(account.tenant_id)["base_currency"]
    with dg.instance_for_test() as instance:
        contact_key = f"crm-contact-{uuid.uuid4().hex[:8]}"
        made = submit(database_url, schema, account, "create_contact", {
            "name": "Harbour Kiln Workshop", "first_name": "Ana", "last_name": "Kiln",
            "email": "accounts@kiln.example.com",
            "phones": [{"type": "MOBILE", "number": "555-0101", "area_code": "21"}],
            "addresses": [{"type": "POBOX", "line1": "1 Quay Street", "city": "Auckland", "postal_code": "1010"}],
        }, contact_key)  # fmt: skip
        (materialization,) = through_dagster("xero", instance)
        row = rows(database_url, schema)[made.id]
        assert (row["status"], row["attempts"]) == ("succeeded", 1)
        contact_id = row["result_id"]
        held = exported(account, "contacts")[contact_id]
        assert held["Name"] == "Harbour Kiln Workshop" and held["EmailAddress"] == "accounts@kiln.example.com"
        assert held["ContactNumber"] == reference_of(contact_key)  # the reference a later lookup finds it by
        assert {p["PhoneType"]: p["PhoneNumber"] for p in held["Phones"]}["MOBILE"] == "555-0101"
        assert {a["AddressType"]: a.get("City") for a in held["Addresses"]}["POBOX"] == "Auckland"
        stored = assert_mirrored(database_url, schema, account, "contacts", contact_id)
        assert (stored["name"], stored["email"], stored["status"]) == (
            "Harbour Kiln Workshop", "accounts@kiln.example.com", "ACTIVE")  # fmt: skip
        assert materialization.asset_key == dg.AssetKey("xero_contacts")
        assert materialization.partition == f"{account.connection.id}|{today:%Y-%m}-01"  # its month
        again = sync(database_url, schema, account, "xero_contacts", sandbox)
        assert again.counts.inserted == again.counts.updated == 0

        # Amounts as exact decimals: 2.5 x 19.9999 and 1 x 1234567.89, no tax.
        made = submit(database_url, schema, account, "create_invoice", {
            "contact_id": contact_id, "currency": currency, "line_amount_types": "NoTax", "reference": "CRM-77",
            "date": today.isoformat(), "due_date": (today + timedelta(days=14)).isoformat(),
            "line_items": [{"description": "Kiln hire", "quantity": "2.5", "unit_amount": "19.9999",
                            "account_code": "200"},
                           {"description": "Kiln", "unit_amount": "1234567.89"}],
        })  # fmt: skip
        through_dagster("xero", instance)
        row = rows(database_url, schema)[made.id]
        invoice_id = row["result_id"]
        assert row["status"] == "succeeded"
        lines = row["result"]["LineItems"]  # Xero's answer, with four-decimal unit amounts (unitdp=4)
        assert [(line["Quantity"], line["UnitAmount"]) for line in lines] == [(2.5, 19.9999), (1.0, 1234567.89)]
        stored = assert_mirrored(database_url, schema, account, "invoices", invoice_id)
        assert (stored["status"], stored["type"], stored["contact_id"], stored["currency"]) == (
            "DRAFT", "ACCREC", contact_id, currency)  # fmt: skip
        assert stored["total"] == Decimal("1234617.89") and stored["line_items"] == 2
        assert stored["issue_date"] == today and stored["reference"] == "CRM-77"
        again = sync(database_url, schema, account, "xero_invoices", sandbox)
        assert again.counts.inserted == again.counts.updated == 0

        made = submit(database_url, schema, account, "update_invoice",
                      {"invoice_id": invoice_id, "status": "AUTHORISED", "reference": "CRM-77 approved"})  # fmt: skip
        through_dagster("xero", instance)
        assert rows(database_url, schema)[made.id]["status"] == "succeeded"
        stored = assert_mirrored(database_url, schema, account, "invoices", invoice_id)
        assert (stored["status"], stored["reference"], stored["amount_due"]) == (
            "AUTHORISED", "CRM-77 approved", Decimal("1234617.89"))  # fmt: skip
        again = sync(database_url, schema, account, "xero_invoices", sandbox)
        assert again.counts.inserted == again.counts.updated == 0

        change = {"contact_id": contact_id, "email": "billing@kiln.example.com", "account_number": "AC-77"}
        made = submit(database_url, schema, account, "update_contact", change)
        through_dagster("xero", instance)
        assert rows(database_url, schema)[made.id]["status"] == "succeeded"
        stored = assert_mirrored(database_url, schema, account, "contacts", contact_id)
        assert (stored["email"], stored["account_number"], stored["is_customer"]) == (
            "billing@kiln.example.com", "AC-77", True)  # fmt: skip
        again = sync(database_url, schema, account, "xero_contacts", sandbox)
        assert again.counts.inserted == again.counts.updated == 0

        made = submit(database_url, schema, account, "void_invoice", {"invoice_id": invoice_id})
        through_dagster("xero", instance)
        assert rows(database_url, schema)[made.id]["status"] == "succeeded"
        stored = assert_mirrored(database_url, schema, account, "invoices", invoice_id)
        assert (stored["status"], stored["deleted"], stored["amount_due"]) == ("VOIDED", True, 0)
        again = sync(database_url, schema, account, "xero_invoices", sandbox)
        assert again.counts.inserted == again.counts.updated == 0


def test_a_worker_killed_after_xero_accepted_leaves_one_invoice_and_the_retry_gets_xeros_first_answer(
    database_url, schema, sandbox, account, secret_key
):
    contact_id = next(iter(exported(account, "contacts")))
    line = {"description": "Setup", "unit_amount": "150"}
    done = submit(database_url, schema, account, "create_invoice", {"contact_id": contact_id, "line_items": [line]})
    before = set(exported(account, "invoices"))
    crash(database_url, schema, "xero")
    made = set(exported(account, "invoices")) - before
    assert len(made) == 1 and rows(database_url, schema)[done.id]["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses; Xero still remembers the key (six minutes)
    after = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert after.succeeded == 1 and after.adopted == 0 and row["status"] == "succeeded"
    assert {row["result_id"]} == made == set(exported(account, "invoices")) - before  # still the one invoice
    assert tenant_stats(account)["idempotent_replays"] == 1  # the retry was answered with the first answer
    assert_mirrored(database_url, schema, account, "invoices", row["result_id"])


def created_contact(account: Account) -> tuple[dict, str]:
    return {"name": f"Kiln Co {uuid.uuid4().hex[:6]}"}, "contacts"


def created_bill(account: Account) -> tuple[dict, str]:
    supplier = next(iter(exported(account, "contacts")))
    return {"type": "ACCPAY", "contact_id": supplier, "invoice_number": f"SUP-{uuid.uuid4().hex[:6]}",
            "line_items": [{"description": "Clay", "quantity": "3", "unit_amount": "12.05",
                            "account_code": "400"}]}, "invoices"  # fmt: skip


@pytest.mark.parametrize("lookup", [True, False], ids=["with-lookup", "without-lookup"])
@pytest.mark.parametrize(("action", "make"), [("create_contact", created_contact), ("create_invoice", created_bill)],
                         ids=["contact", "bill"])  # fmt: skip
def test_after_xeros_key_expired_the_lookup_adopts_what_the_killed_worker_made(
    database_url, schema, sandbox, account, secret_key, lookup, action, make
):
    account.control.configure(account.tenant_id, idempotency_window_seconds=1)
    payload, entity = make(account)
    done = submit(database_url, schema, account, action, payload)
    before = set(exported(account, entity))
    crash(database_url, schema, "xero")
    time.sleep(2.2)  # the lease lapses and Xero has forgotten the key: a re-send would be a new request
    made = set(exported(account, entity)) - before
    assert len(made) == 1
    after = apply(database_url, schema, XERO if lookup else without_find(XERO, action))
    row = rows(database_url, schema)[done.id]
    if lookup:
        assert after.succeeded == after.adopted == 1 and row["status"] == "succeeded"
        assert {row["result_id"]} == made == set(exported(account, entity)) - before
        assert_mirrored(database_url, schema, account, entity, row["result_id"])
    elif action == "create_contact":
        # Sent again as new: Xero refuses the name of the contact the first attempt made, so the action fails.
        assert row["status"] == "failed" and "is already assigned to another contact" in row["error"]
        assert set(exported(account, entity)) - before == made
    else:
        # A bill's number need not be unique: Xero makes a second bill.
        assert row["status"] == "succeeded" and len(set(exported(account, entity)) - before) == 2


def test_an_archive_repeated_after_xeros_key_expired_is_found_done(database_url, schema, sandbox, account,
                                                                   secret_key):  # fmt: skip
    account.control.configure(account.tenant_id, idempotency_window_seconds=1)
    contact_id = next(cid for cid, c in exported(account, "contacts").items() if c["ContactStatus"] == "ACTIVE")
    done = submit(database_url, schema, account, "update_contact", {"contact_id": contact_id, "status": "ARCHIVED"})
    crash(database_url, schema, "xero")
    assert exported(account, "contacts")[contact_id]["ContactStatus"] == "ARCHIVED"
    time.sleep(2.2)
    # Sent again, Xero refuses to edit an archived contact; the contact is read and found archived: done.
    assert apply(database_url, schema).succeeded == 1
    row = rows(database_url, schema)[done.id]
    assert (row["status"], row["result_id"]) == ("succeeded", contact_id)
    stored = assert_mirrored(database_url, schema, account, "contacts", contact_id)
    assert (stored["status"], stored["deleted"]) == ("ARCHIVED", True)


BAD = [
    ("create_contact", {}, "name: Field required"),
    ("create_contact", {"name": "A", "email": "not-an-email"}, "email: String should match pattern"),
    ("create_contact", {"name": "A", "default_currency": "ZZZ"}, "default_currency: Invalid ISO 4217"),
    ("update_contact", {"contact_id": "not-a-guid", "name": "A"}, "contact_id: String should match pattern"),
    ("update_contact", {"contact_id": str(uuid.uuid4())}, "give at least one field to change"),
    ("create_invoice", {"contact_id": str(uuid.uuid4())}, "line_items: Field required"),
    ("create_invoice", {"contact_id": str(uuid.uuid4()), "currency": "ZZZ",
                        "line_items": [{"description": "x", "unit_amount": "5"}]}, "currency: Invalid ISO 4217"),
    ("create_invoice", {"contact_id": str(uuid.uuid4()), "line_items": [{"description": "x", "unit_amount": "-5"}]},
     "line_items.0.unit_amount: Input should be greater than 0"),
    ("create_invoice", {"contact_id": str(uuid.uuid4()), "line_items": [{"description": "x", "unit_amount": 5.5}]},
     "not as floating-point numbers"),
    ("create_invoice", {"contact_id": str(uuid.uuid4()),
                        "line_items": [{"description": "x", "unit_amount": "5.00001"}]}, "no more than 4 decimal"),
    ("create_invoice", {"contact_id": str(uuid.uuid4()), "status": "PAID",
                        "line_items": [{"description": "x", "unit_amount": "5"}]}, "status: Input should be"),
    ("void_invoice", {"invoice_id": str(uuid.uuid4()), "reason": "x"}, "reason: Extra inputs are not permitted"),
    ("delete_everything", {}, "xero has no action 'delete_everything'"),
]  # fmt: skip


def test_bad_payloads_and_a_grant_without_write_scopes_fail_before_anything_is_sent(database_url, schema, box,
                                                                                    sandbox, account):  # fmt: skip
    ids = [submit(database_url, schema, account, action, payload).id for action, payload, _ in BAD]
    requests = tenant_stats(account)["requests"]
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
        assert stored[action_id]["sent_at"] is None
    assert tenant_stats(account)["requests"] == requests  # nothing reached Xero

    # A connection whose grant predates NextCRM's writes (its token lists only read scopes).
    with psycopg.connect(database_url) as conn:
        read_only = "offline_access accounting.invoices.read accounting.contacts.read"
        vault.update_secrets(conn, account.connection.id, {"scope": read_only}, box)
    contact = submit(database_url, schema, account, "create_contact", {"name": "Scope Test Ltd"}).id
    void = submit(database_url, schema, account, "void_invoice", {"invoice_id": str(uuid.uuid4())}).id
    apply(database_url, schema)
    stored = rows(database_url, schema)
    assert "lacks the scope accounting.contacts" in stored[contact]["error"]
    assert "lacks the scope accounting.invoices or accounting.transactions" in stored[void]["error"]
    assert all(stored[i]["status"] == "failed" and "connect xero" in stored[i]["error"] for i in (contact, void))
    assert tenant_stats(account)["requests"] == requests


def test_xeros_refusals_fail_the_action_with_its_message_and_no_personal_data(database_url, schema, sandbox,
                                                                               account):  # fmt: skip
    contacts = exported(account, "contacts")
    taken = next(c for c in contacts.values() if c["ContactStatus"] == "ACTIVE")
    invoices = exported(account, "invoices")
    paid = next(i for i in invoices.values() if i["Status"] == "PAID")
    draft_contact = submit(database_url, schema, account, "create_contact",
                           {"name": taken["Name"].upper(), "email": "someone@example.com"}).id  # fmt: skip
    void_paid = submit(database_url, schema, account, "void_invoice", {"invoice_id": paid["InvoiceID"]}).id
    unknown = str(uuid.uuid4())
    update_unknown = submit(database_url, schema, account, "update_invoice", {"invoice_id": unknown,
                                                                              "reference": "x"}).id  # fmt: skip
    void_unknown = submit(database_url, schema, account, "void_invoice", {"invoice_id": unknown}).id
    wrong_contact = submit(database_url, schema, account, "create_invoice", {
        "contact_id": unknown, "line_items": [{"description": "x", "unit_amount": "1"}]}).id  # fmt: skip
    bad_account = submit(database_url, schema, account, "create_invoice", {
        "contact_id": taken["ContactID"],
        "line_items": [{"description": "x", "unit_amount": "1", "account_code": "999"}]}).id  # fmt: skip
    invoices_before = len(invoices)
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == 6 and done.succeeded == 0
    assert all(stored[i]["attempts"] == 1 for i in stored)
    error = stored[draft_contact]["error"]
    assert "HTTP 400: ValidationException: The contact name [redacted] is already assigned" in error
    assert taken["Name"].upper() not in error and taken["Name"] not in error and "someone@" not in error
    assert "HTTP 400: ValidationException: Invoice not of valid status for modification" in stored[void_paid]["error"]
    assert f"HTTP 404: Xero knows no such invoice ({unknown})" in stored[update_unknown]["error"]
    assert f"HTTP 404: Xero knows no invoice {unknown}" in stored[void_unknown]["error"]
    assert "HTTP 404: Xero knows no such invoice" in stored[wrong_contact]["error"]
    assert "Account code '999' is not a valid code for this document." in stored[bad_account]["error"]
    assert len(exported(account, "invoices")) == invoices_before and set(exported(account, "contacts")) == set(contacts)


def test_5xx_and_429_are_survived_under_the_same_key_and_each_object_is_made_once(database_url, schema, sandbox,
                                                                                  account):  # fmt: skip
    # A key longer than Xero's 128 characters goes as its digest (Xero would refuse it).
    contact = submit(database_url, schema, account, "create_contact", {"name": "Retry Kiln Ltd"}, "crm-" + "k" * 200)
    before = set(exported(account, "contacts"))
    account.control.set_faults(tenant=account.tenant_id, server_errors=2, rate_limited=1)
    try:
        done = apply(database_url, schema)
    finally:
        account.control.clear_faults(tenant=account.tenant_id)
    row = rows(database_url, schema)[contact.id]
    assert done.succeeded == 1 and (row["status"], row["attempts"]) == ("succeeded", 1)
    assert set(exported(account, "contacts")) - before == {row["result_id"]}
    stats = tenant_stats(account)
    assert stats["server_errors"] >= 2 and sum(stats["rate_limited"].values()) >= 1
    assert_mirrored(database_url, schema, account, "contacts", row["result_id"])


@pytest.fixture
def hooked_receiver(database_url: str, schema: str, box) -> Iterator[tuple[str, dg.DagsterInstance]]:
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        yield url, instance


def test_webhooks_for_what_the_actions_wrote_duplicated_and_newest_first_leave_the_rows_as_written(
    database_url, schema, box, sandbox, account, hooked_receiver
):
    url, instance = hooked_receiver
    with psycopg.connect(database_url) as conn:
        vault.update_secrets(conn, account.connection.id, {"webhook_key": WEBHOOK_KEY}, box)
    held = account.control.subscribe_webhooks(account.client_id, receiver_url(url, "xero", account.connection.id),
                                              WEBHOOK_KEY, retry_delays=[0.1, 0.2], hold=True)  # fmt: skip
    assert held["status"] == "OK"
    submit(database_url, schema, account, "create_contact", {"name": "Hooked Kiln Ltd"})
    assert apply(database_url, schema).succeeded == 1
    (contact_id,) = [r["result_id"] for r in rows(database_url, schema).values()]
    submit(database_url, schema, account, "create_invoice",
           {"contact_id": contact_id, "line_items": [{"description": "Glaze", "unit_amount": "42.50"}]})  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    invoice_id = [r["result_id"] for r in rows(database_url, schema).values()][-1]
    submit(database_url, schema, account, "update_invoice", {"invoice_id": invoice_id, "status": "AUTHORISED"})
    assert apply(database_url, schema).succeeded == 1
    written = {name: {k: v for k, v in mirror(database_url, schema, name, account.connection.id)[rid].items()
                      if k != "synced_at"} for name, rid in (("xero_contacts", contact_id),
                                                             ("xero_invoices", invoice_id))}  # fmt: skip

    assert account.control.release_webhooks(held["id"], order="newest-first", copies=2) >= 1
    assert account.control.flush_webhooks()
    tick_and_apply(instance, "xero")
    with psycopg.connect(database_url) as conn:
        inbox = conn.execute(
            sql.SQL("SELECT event_type, status, payload->>'resourceId' FROM {} WHERE connection_id = %s").format(
                table("webhook_events", schema)
            ),
            (account.connection.id,),
        ).fetchall()
    assert {(kind, rid) for kind, _, rid in inbox} >= {("CONTACT.CREATE", contact_id), ("INVOICE.CREATE", invoice_id),
                                                       ("INVOICE.UPDATE", invoice_id)}  # fmt: skip
    assert {status for _, status, _ in inbox} == {"processed"}
    # The events re-read what the actions wrote: the invoice row is as its last action left it, and the contact
    # is at the version its creation gave it, now with what its invoice changed (a customer, with a balance).
    invoice = {k: v for k, v in mirror(database_url, schema, "xero_invoices", account.connection.id)[invoice_id].items()
               if k != "synced_at"}  # fmt: skip
    assert invoice == written["xero_invoices"]
    contact = assert_mirrored(database_url, schema, account, "contacts", contact_id)
    assert contact["source_updated_at"] == written["xero_contacts"]["source_updated_at"] and contact["is_customer"]
    assert_mirrored(database_url, schema, account, "invoices", invoice_id)


# --- the emulator's writes, over plain HTTP ------------------------------------------------------------


@pytest.fixture(scope="module")
def xero_http(sandbox: SandboxServer) -> Iterator[tuple[XeroControl, dict[str, Any]]]:
    """An app and organisation with a write token (broad scopes) and a read-only one."""
    control = XeroControl(sandbox)
    client_id = f"writes-{uuid.uuid4().hex[:8]}"
    control.add_client(client_id, "secret")
    org = control.add_tenant(client_id, seed=7, invoices=20, contacts=6, days=2, minute_limit=100_000)
    write = control.grant(client_id, scope="offline_access accounting.transactions accounting.contacts")
    granular = control.grant(client_id, scope="offline_access accounting.invoices accounting.contacts")
    read = control.grant(client_id, scope="offline_access accounting.invoices.read accounting.contacts.read")
    yield control, {"tenant": org["id"], "client_id": client_id, "write": write["token"]["access_token"],
                    "granular": granular["token"]["access_token"], "read": read["token"]["access_token"],
                    "currency": org["base_currency"]}  # fmt: skip


def call(sandbox: SandboxServer, org: dict, method: str, path: str, body: Any = None, *, token: str = "write",
         key: str | None = None, params: dict | None = None, raw: bytes | None = None) -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {org[token]}", "xero-tenant-id": org["tenant"], "Accept": "application/json",
               "Content-Type": "application/json"}  # fmt: skip
    if key is not None:
        headers["Idempotency-Key"] = key
    content = raw if raw is not None else orjson.dumps(body) if body is not None else None
    return httpx.request(method, sandbox.url + API + path, headers=headers, content=content, params=params,
                         timeout=30)  # fmt: skip


def count(control: XeroControl, org: dict, entity: str) -> int:
    return int(control.tenant(org["tenant"])["counts"][entity])


def test_emulator_replays_a_repeated_idempotency_key_refuses_it_for_another_request_and_forgets_it_in_time(
    sandbox, xero_http
):
    control, org = xero_http
    body = {"Contacts": [{"Name": f"Idem {uuid.uuid4().hex[:6]}"}]}
    key = f"idem-{uuid.uuid4().hex}"
    contacts = count(control, org, "contacts")
    first = call(sandbox, org, "PUT", "/Contacts", body, key=key)
    again = call(sandbox, org, "PUT", "/Contacts", body, key=key)
    assert first.status_code == again.status_code == 200 and first.content == again.content  # the first answer
    assert count(control, org, "contacts") == contacts + 1
    other = call(sandbox, org, "PUT", "/Contacts", {"Contacts": [{"Name": "Someone Else"}]}, key=key)
    assert other.status_code == 400 and "already been used for a different request" in other.json()["Detail"]
    assert call(sandbox, org, "PUT", "/Contacts", body, key="k" * 129).status_code == 400
    assert count(control, org, "contacts") == contacts + 1
    # A refusal is remembered too: the same request under the same key gets the same 400.
    refused = call(sandbox, org, "PUT", "/Contacts", body, key=key + "-2")
    assert refused.status_code == 400 and call(sandbox, org, "PUT", "/Contacts", body, key=key + "-2").content == \
        refused.content  # fmt: skip
    stats = control.stats()["tenants"][org["tenant"]]
    assert stats["idempotent_replays"] >= 2 and stats["idempotency_conflicts"] >= 1

    control.configure(org["tenant"], idempotency_window_seconds=1)
    try:
        supplier = {"ContactID": first.json()["Contacts"][0]["ContactID"]}
        bill = {"Invoices": [{"Type": "ACCPAY", "Contact": supplier, "InvoiceNumber": "B-1",
                              "LineItems": [{"Description": "x", "UnitAmount": 5}]}]}  # fmt: skip
        invoices = count(control, org, "invoices")
        one = call(sandbox, org, "PUT", "/Invoices", bill, key=key + "-bill").json()["Invoices"][0]["InvoiceID"]
        time.sleep(2.2)  # Xero keeps a key six minutes; this organisation one second
        two = call(sandbox, org, "PUT", "/Invoices", bill, key=key + "-bill").json()["Invoices"][0]["InvoiceID"]
        assert one != two and count(control, org, "invoices") == invoices + 2
    finally:
        control.configure(org["tenant"], idempotency_window_seconds=360)


def test_emulator_writes_as_xero_answers_them(sandbox, xero_http):
    _, org = xero_http
    name = f"Writer {uuid.uuid4().hex[:6]}"
    made = call(sandbox, org, "PUT", "/Contacts", {"contacts": [{"Name": name, "EmailAddress": "w@example.com",
                                                                 "ContactNumber": "W-1"}]})  # fmt: skip
    assert made.status_code == 200 and made.json()["Status"] == "OK"
    contact = made.json()["Contacts"][0]
    cid = contact["ContactID"]
    assert (contact["Name"], contact["ContactStatus"], contact["ContactNumber"]) == (name, "ACTIVE", "W-1")
    assert {p["PhoneType"] for p in contact["Phones"]} == {"DEFAULT", "DDI", "FAX", "MOBILE"}
    # Read back as any client would: by id, and in the list filtered by its number.
    assert call(sandbox, org, "GET", f"/Contacts/{cid}").json()["Contacts"][0]["Name"] == name
    listed = call(sandbox, org, "GET", "/Contacts", params={"where": 'ContactNumber=="W-1"'}).json()["Contacts"]
    assert [c["ContactID"] for c in listed] == [cid]

    # A validation failure: one 400 ValidationException with the elements, the refused one under the zero id.
    dup = call(sandbox, org, "PUT", "/Contacts", {"Contacts": [{"Name": name.lower()}]})
    assert dup.status_code == 400
    error = dup.json()
    assert (error["ErrorNumber"], error["Type"], error["Message"]) == (10, "ValidationException",
                                                                        "A validation exception occurred")  # fmt: skip
    (element,) = error["Elements"]
    assert element["ContactID"] == "00000000-0000-0000-0000-000000000000" and element["HasValidationErrors"]
    assert "is already assigned to another contact" in element["ValidationErrors"][0]["Message"]
    # With summarizeErrors=false: 200, the written and the refused side by side.
    mixed = call(sandbox, org, "POST", "/Contacts", {"Contacts": [{"Name": name}, {"Name": name + " B"}]},
                 params={"summarizeErrors": "false"}).json()["Contacts"]  # fmt: skip
    assert [c["StatusAttributeString"] for c in mixed] == ["ERROR", "OK"]

    # Exact decimals: four-decimal unit amounts with unitdp=4, two without; totals from them.
    invoice = {"Type": "ACCREC", "Contact": {"ContactID": cid}, "LineAmountTypes": "NoTax", "Status": "AUTHORISED",
               "CurrencyCode": org["currency"], "Date": "2026-01-05", "DueDate": "2026-01-19",
               "LineItems": [{"Description": "a", "Quantity": 3, "UnitAmount": 0.1},
                             {"Description": "b", "Quantity": 2.5, "UnitAmount": 19.9999,
                              "AccountCode": "200"}]}  # fmt: skip
    four = call(sandbox, org, "PUT", "/Invoices", {"Invoices": [invoice]}, params={"unitdp": "4"}).json()
    (inv,) = four["Invoices"]
    assert [line["UnitAmount"] for line in inv["LineItems"]] == [0.1, 19.9999]
    assert (inv["Total"], inv["AmountDue"], inv["Status"], inv["InvoiceNumber"][:4]) == (50.3, 50.3, "AUTHORISED",
                                                                                         "INV-")  # fmt: skip
    assert inv["Date"] == "/Date(1767571200000+0000)/" and inv["Contact"]["ContactID"] == cid
    two = call(sandbox, org, "PUT", "/Invoices", {"Invoices": [{**invoice, "InvoiceNumber": "X-2"}]}).json()
    assert [line["UnitAmount"] for line in two["Invoices"][0]["LineItems"]] == [0.1, 20.0]
    again = call(sandbox, org, "PUT", "/Invoices", {"Invoices": [{**invoice, "InvoiceNumber": "X-2"}]})
    assert again.json()["Elements"][0]["ValidationErrors"] == [{"Message": "Invoice # must be unique."}]

    iid = inv["InvoiceID"]
    deleted = call(sandbox, org, "POST", f"/Invoices/{iid}", {"Invoices": [{"Status": "DELETED"}]})
    assert deleted.json()["Elements"][0]["ValidationErrors"] == [{"Message": "Invoice not of valid status for "
                                                                             "modification"}]  # fmt: skip
    voided = call(sandbox, org, "POST", f"/Invoices/{iid}", {"Invoices": [{"InvoiceID": iid, "Status": "VOIDED"}]})
    assert (voided.json()["Invoices"][0]["Status"], voided.json()["Invoices"][0]["AmountDue"]) == ("VOIDED", 0.0)
    assert call(sandbox, org, "GET", f"/Invoices/{iid}").json()["Invoices"][0]["Status"] == "VOIDED"
    edit = call(sandbox, org, "POST", f"/Invoices/{iid}", {"Invoices": [{"Reference": "late"}]})
    assert edit.status_code == 400

    # Unknown ids anywhere in the request: Xero's plain 404 for the whole of it.
    ghost = str(uuid.uuid4())
    for method, path, body in (
        ("POST", f"/Invoices/{ghost}", {"Invoices": [{"Reference": "x"}]}),
        ("POST", "/Contacts", {"Contacts": [{"ContactID": ghost, "Name": "x"}]}),
        ("PUT", "/Invoices", {"Invoices": [{**invoice, "Contact": {"ContactID": ghost}}]}),
    ):
        answer = call(sandbox, org, method, path, body)
        assert (answer.status_code, answer.text) == (404, "The resource you're looking for cannot be found")
    bad = call(sandbox, org, "POST", "/Contacts", raw=b"<Contacts/>")
    assert bad.status_code == 400 and bad.json()["Type"] == "PostDataInvalidException"
    # Archived contacts are not edited through the API.
    call(sandbox, org, "POST", f"/Contacts/{cid}", {"Contacts": [{"ContactStatus": "ARCHIVED"}]})
    archived = call(sandbox, org, "POST", f"/Contacts/{cid}", {"Contacts": [{"Name": "Back"}]})
    assert "Archived contacts cannot currently be edited" in archived.json()["Elements"][0]["ValidationErrors"][0][
        "Message"]  # fmt: skip


def test_emulator_writes_need_a_write_scope(sandbox, xero_http):
    _, org = xero_http
    body = {"Contacts": [{"Name": f"Scoped {uuid.uuid4().hex[:6]}"}]}
    refused = call(sandbox, org, "PUT", "/Contacts", body, token="read")
    assert refused.status_code == 401 and refused.json()["Detail"] == "AuthorizationUnsuccessful"
    made = call(sandbox, org, "PUT", "/Contacts", body, token="granular")  # the granular write scopes do
    assert made.status_code == 200
    invoice = {"Type": "ACCREC", "Contact": {"ContactID": made.json()["Contacts"][0]["ContactID"]},
               "LineItems": [{"Description": "a", "UnitAmount": 1}]}  # fmt: skip
    assert call(sandbox, org, "PUT", "/Invoices", {"Invoices": [invoice]}, token="granular").status_code == 200
    assert call(sandbox, org, "PUT", "/Invoices", {"Invoices": [invoice]}, token="read").status_code == 401
    # Paths and methods Xero does not serve: its plain 404.
    for method, path in (("PUT", "/Organisation"), ("PUT", f"/Invoices/{uuid.uuid4()}"), ("POST", "/Currencies")):
        assert call(sandbox, org, method, path, {}).status_code == 404
