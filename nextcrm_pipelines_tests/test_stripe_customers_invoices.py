"""`stripe_customers` and `stripe_invoices` against the sandbox over real HTTP and a real Postgres, beyond the
per-entity contract (`test_entity_contract.py`): what a deletion, a void, an uncollectible and a later payment
leave in a row (status times, the last data of a deleted customer, the `deleted` mark in `raw`), then each
customer and invoice webhook applied, duplicates and newest-first delivery ending like one in-order delivery."""

from __future__ import annotations

import uuid
from typing import Any

import dagster as dg
import orjson
import psycopg
import stripe

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET
from nextcrm_pipelines_tests.test_webhooks_stripe_e2e import (
    call,
    delivered_and_held,
    hook_url,
    hooked_account,
    hooks,  # noqa: F401 (a fixture)
    inbox_bodies,
    mirror_row,
    mirror_rows,
    stripe_api,
)
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply
from nextcrm_sandbox.server import SandboxServer

ENTITIES = {"stripe_customers": "customers", "stripe_invoices": "invoices"}


def sdk(server: SandboxServer, key: str) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": server.url}, max_network_retries=0)


def expected(server: SandboxServer, key: str, entity: str) -> dict[str, tuple]:
    """What the mirror must hold per id, from the sandbox's export: deleted customers and deleted drafts
    included (flagged), void and uncollectible invoices flagged."""
    truth = server.stripe_export(key, ENTITIES[entity])
    if entity == "stripe_customers":
        return {c["id"]: (c["deleted"], c["email"], c["currency"]) for c in truth}
    return {
        i["id"]: (
            i["deleted"] or i["status"] in ("void", "uncollectible"),
            i["status"],
            i["customer"],
            i["subscription"],
            minor_to_major(i["total"], i["currency"]),
            minor_to_major(i["amount_paid"], i["currency"]),
        )
        for i in truth
    }


def mirrored(database_url: str, schema: str, entity: str, connection_id: str) -> dict[str, tuple]:
    rows = mirror_rows(database_url, schema, entity, connection_id)
    if entity == "stripe_customers":
        return {i: (r["deleted"], r["email"], r["currency"]) for i, r in rows.items()}
    return {i: (r["deleted"], r["status"], r["customer_id"], r["subscription_id"], r["total"], r["amount_paid"])
            for i, r in rows.items()}  # fmt: skip


def connect(database_url: str, box, server: SandboxServer, key: str, **settings: Any):
    with psycopg.connect(database_url) as conn:
        return vault.add_connection(conn, provider="stripe", display_name=f"Billing {uuid.uuid4().hex[:6]}", box=box,
                                    secrets={"api_key": key}, base_url=server.url, settings=settings)  # fmt: skip


def new_account(server: SandboxServer, **spec: Any) -> str:
    key = f"sk_test_{uuid.uuid4().hex}"
    server.add_stripe_account(**{"api_key": key, "seed": 31, "charges": 400, "subscriptions": 40, "customers": 150,
                                 "days": 6, "requests_per_second": 0, **spec})  # fmt: skip
    return key


def test_deleted_customers_and_closed_or_deleted_invoices_are_flagged(database_url, schema, box, own_sandbox):
    key = new_account(own_sandbox, charges=200, subscriptions=20, days=3)
    connection = connect(database_url, box, own_sandbox, key)
    days = days_back(sandbox_now(own_sandbox).date(), 3)
    for entity in ENTITIES:
        sync_days(database_url, schema, connection.id, entity, days)
    invoices = own_sandbox.stripe_export(key, "invoices")
    opened = [i for i in invoices if i["status"] == "open" and i["total"] > 0]
    draft = next(i for i in invoices if i["status"] == "draft" and not i["deleted"])
    customer = next(c for c in own_sandbox.stripe_export(key, "customers") if not c["deleted"])
    client = sdk(own_sandbox, key)
    own_sandbox.advance_clock(5)
    client.v1.invoices.void_invoice(opened[0]["id"])
    client.v1.invoices.mark_uncollectible(opened[1]["id"])
    client.v1.invoices.pay(opened[2]["id"])
    client.v1.invoices.delete(draft["id"])
    client.v1.customers.delete(customer["id"])
    for entity in ENTITIES:
        assert all(r.status == "success" for r in sync_days(database_url, schema, connection.id, entity,
                                                            [sandbox_now(own_sandbox).date()]))  # fmt: skip
    rows = mirror_rows(database_url, schema, "stripe_invoices", connection.id)
    assert (rows[opened[0]["id"]]["status"], rows[opened[0]["id"]]["deleted"]) == ("void", True)
    assert rows[opened[0]["id"]]["voided_at"] is not None
    assert (rows[opened[1]["id"]]["status"], rows[opened[1]["id"]]["deleted"]) == ("uncollectible", True)
    paid = rows[opened[2]["id"]]
    assert (paid["status"], paid["deleted"], paid["amount_paid"], paid["amount_remaining"]) == (
        "paid", False, paid["total"], 0)  # fmt: skip
    gone = rows[draft["id"]]
    assert (gone["status"], gone["deleted"], gone["raw"]["deleted"]) == ("draft", True, True)
    customers = mirror_rows(database_url, schema, "stripe_customers", connection.id)
    assert customers[customer["id"]]["deleted"] is True
    assert customers[customer["id"]]["email"] == customer["email"]  # its last data kept
    for entity in ENTITIES:
        assert mirrored(database_url, schema, entity, connection.id) == expected(own_sandbox, key, entity)


def _billing_setup(server: SandboxServer, key: str) -> dict[str, str]:
    """A customer with four open invoices and a draft, made before the day is synced; returns their ids."""
    record = "/_sandbox/stripe/records"
    customer = server.control("POST", record, json={"api_key": key, "kind": "customer",
                                                    "params": {"email": "billing.test@example.com"}})  # fmt: skip
    ids = {"customer": customer["id"]}
    with stripe_api(server, key) as api:
        for name in ("paid", "failed", "void", "uncollectible", "draft"):
            invoice = server.control("POST", record, json={"api_key": key, "kind": "invoice",
                                                           "params": {"customer": customer["id"]},
                                                           "lines": [[f"{name} work", 4200, 3]]})  # fmt: skip
            if name != "draft":
                call(api, "POST", f"/v1/invoices/{invoice['id']}/finalize")
            ids[name] = invoice["id"]
    return ids


def _billing_changes(ids: dict[str, str]) -> list[tuple[str, str, dict[str, str]]]:
    """API calls that emit every customer and invoice event type on the invoices of `_billing_setup`."""
    return [
        ("POST", f"/v1/customers/{ids['customer']}", {"phone": "+15550001111", "metadata[tier]": "gold"}),
        ("POST", f"/v1/invoices/{ids['paid']}", {"metadata[step]": "one", "description": "Reviewed"}),
        ("POST", f"/v1/invoices/{ids['failed']}/pay", {"payment_method": "pm_card_chargeDeclined"}),
        ("POST", f"/v1/invoices/{ids['paid']}/pay", {}),
        ("POST", f"/v1/invoices/{ids['failed']}/pay", {}),
        ("POST", f"/v1/invoices/{ids['void']}/void", {}),
        ("POST", f"/v1/invoices/{ids['uncollectible']}/mark_uncollectible", {}),
        ("DELETE", f"/v1/invoices/{ids['draft']}", {}),
        ("DELETE", f"/v1/customers/{ids['customer']}", {}),
    ]


def _apply(api, method: str, path: str, form: dict[str, str]) -> None:
    response = api.request(method, path, data=form or None)
    declined = form.get("payment_method") == "pm_card_chargeDeclined"
    assert response.status_code == (402 if declined else 200), response.text


def test_customer_and_invoice_webhooks_reach_the_tables(database_url, schema, box, own_sandbox, hooks):  # noqa: F811
    key, (connection,) = hooked_account(own_sandbox, database_url, schema, box)
    ids = _billing_setup(own_sandbox, key)
    changes = _billing_changes(ids)
    days = days_back(sandbox_now(own_sandbox).date(), 1)
    for entity in ENTITIES:
        assert all(r.status == "success" for r in sync_days(database_url, schema, connection.id, entity, days))
    with (
        receiver(database_url, schema, box) as base,
        dg.instance_for_test() as instance,
        stripe_api(own_sandbox, key) as api,
    ):
        hooks.subscribe_webhooks(key, hook_url(base, connection), SECRET)
        own_sandbox.advance_clock(2)
        created = call(api, "POST", "/v1/customers", email="new.customer@example.com", name="New Customer")
        draft = call(api, "POST", "/v1/invoices", customer=created["id"], collection_method="send_invoice",
                     days_until_due="14")  # fmt: skip
        call(api, "POST", f"/v1/invoices/{draft['id']}/finalize")
        for method, path, form in changes:
            _apply(api, method, path, form)
        assert hooks.flush_webhooks()
        assert len(tick_and_apply(instance, "stripe")) == 1
        assert all(run.is_success for run in instance.get_runs())
        served = {name: orjson.loads(api.get(f"/v1/invoices/{ids[name]}").content)
                  for name in ("paid", "failed", "void", "uncollectible")}  # fmt: skip
    events = [orjson.loads(raw) for _, status, raw in inbox_bodies(database_url, schema, connection.id)]
    types = {e["type"] for e in events}
    assert {"customer.created", "customer.updated", "customer.deleted",
            "invoice.created", "invoice.finalized", "invoice.updated", "invoice.payment_failed",
            "invoice.payment_succeeded", "invoice.paid", "invoice.voided", "invoice.marked_uncollectible",
            "invoice.deleted"} <= types  # fmt: skip
    assert {status for _, status, _ in inbox_bodies(database_url, schema, connection.id)} == {"processed"}

    new = mirror_row(database_url, schema, "stripe_customers", connection.id, created["id"])
    assert (new["email"], new["deleted"]) == ("new.customer@example.com", False)
    # An invoice of nothing (no items) is paid the moment it is finalized, as Stripe does.
    empty = mirror_row(database_url, schema, "stripe_invoices", connection.id, draft["id"])
    assert (empty["status"], empty["customer_id"], empty["number"] is not None) == ("paid", created["id"], True)
    assert (empty["total"], empty["collection_method"], empty["due_date"] is not None) == (0, "send_invoice", True)
    gone = mirror_row(database_url, schema, "stripe_customers", connection.id, ids["customer"])
    assert (gone["deleted"], gone["phone"], gone["raw"]["metadata"]) == (True, "+15550001111", {"tier": "gold"})
    assert gone["email"] == "billing.test@example.com"  # its last data kept
    for name in ("paid", "failed", "void", "uncollectible"):
        row = mirror_row(database_url, schema, "stripe_invoices", connection.id, ids[name])
        assert row["raw"] == served[name]
        assert row["status"] == {"failed": "paid"}.get(name, name)
        assert row["deleted"] is (name in ("void", "uncollectible"))
    assert mirror_row(database_url, schema, "stripe_invoices", connection.id, ids["failed"])["attempt_count"] == 2
    paid = mirror_row(database_url, schema, "stripe_invoices", connection.id, ids["paid"])
    assert (paid["description"], paid["raw"]["metadata"], paid["amount_remaining"]) == ("Reviewed", {"step": "one"}, 0)
    deleted = mirror_row(database_url, schema, "stripe_invoices", connection.id, ids["draft"])
    assert (deleted["deleted"], deleted["status"]) == (True, "draft")


def test_duplicated_newest_first_billing_events_end_like_an_in_order_delivery(
    database_url,
    schema,
    box,
    own_sandbox,
    hooks,  # noqa: F811
):
    key, (in_order, reordered) = hooked_account(own_sandbox, database_url, schema, box, ("In order", "Reordered"))
    ids = _billing_setup(own_sandbox, key)
    changes = _billing_changes(ids)
    days = days_back(sandbox_now(own_sandbox).date(), 1)
    for connection in (in_order, reordered):
        for entity in ENTITIES:
            assert all(r.status == "success" for r in sync_days(database_url, schema, connection.id, entity, days))
    with (
        delivered_and_held(database_url, schema, box, hooks, key, in_order, reordered) as (instance, held),
        stripe_api(own_sandbox, key) as api,
    ):
        for method, path, form in changes:
            own_sandbox.advance_clock(2)  # each change strictly newer than the last
            _apply(api, method, path, form)
            assert hooks.flush_webhooks()
            assert len(tick_and_apply(instance, "stripe")) == 1
        sent = hooks.release_webhooks(held, order="newest-first", copies=3)
        assert hooks.flush_webhooks()
        assert len(tick_and_apply(instance, "stripe")) == 1
        assert all(run.is_success for run in instance.get_runs())
    assert sent == len(inbox_bodies(database_url, schema, in_order.id)) > len(changes)
    assert {s for _, s, _ in inbox_bodies(database_url, schema, reordered.id)} == {"processed"}
    for entity in ENTITIES:
        expected_rows = mirror_rows(database_url, schema, entity, in_order.id)
        got = mirror_rows(database_url, schema, entity, reordered.id)
        for changed in ids.values():
            if changed in expected_rows:
                assert got[changed] == expected_rows[changed]  # the whole row, event time and raw included
        # The rows no event touched differ only by when each connection's sync listed them.
        assert {i: {k: v for k, v in r.items() if k != "source_updated_at"} for i, r in got.items()} == {
            i: {k: v for k, v in r.items() if k != "source_updated_at"} for i, r in expected_rows.items()
        }
    final = mirror_rows(database_url, schema, "stripe_invoices", in_order.id)
    assert [final[ids[n]]["status"] for n in ("paid", "failed", "void", "uncollectible")] == [
        "paid", "paid", "void", "uncollectible"]  # fmt: skip
    assert final[ids["draft"]]["deleted"] and mirror_rows(database_url, schema, "stripe_customers",
                                                          in_order.id)[ids["customer"]]["deleted"]  # fmt: skip


def test_two_changes_in_one_second_end_as_stripe_holds_the_object_whatever_the_delivery_order(
    database_url,
    schema,
    box,
    own_sandbox,
    hooks,  # noqa: F811
):
    """Stripe stamps events in whole seconds: two `customer.updated` of one second have one version. Delivered
    newest first (with copies) or in order, the row ends as Stripe holds the customer, not as the event that
    happened to come last says."""
    key, (in_order, reordered) = hooked_account(own_sandbox, database_url, schema, box, ("In order", "Reordered"))
    ids = _billing_setup(own_sandbox, key)
    days = days_back(sandbox_now(own_sandbox).date(), 1)
    for connection in (in_order, reordered):
        assert all(r.status == "success" for r in sync_days(database_url, schema, connection.id, "stripe_customers",
                                                             days))  # fmt: skip
    with (
        delivered_and_held(database_url, schema, box, hooks, key, in_order, reordered) as (instance, held),
        stripe_api(own_sandbox, key) as api,
    ):
        own_sandbox.advance_clock(2)
        for step in ("first", "second", "third"):  # the sandbox's clock stands still: all in one second
            call(api, "POST", f"/v1/customers/{ids['customer']}", name=f"Name {step}", **{"metadata[step]": step})
        assert hooks.flush_webhooks()
        assert len(tick_and_apply(instance, "stripe")) == 1
        hooks.release_webhooks(held, order="newest-first", copies=2)
        assert hooks.flush_webhooks()
        assert len(tick_and_apply(instance, "stripe")) == 1
        assert all(run.is_success for run in instance.get_runs())
        served = orjson.loads(api.get(f"/v1/customers/{ids['customer']}").content)
    events = [orjson.loads(raw) for _, _, raw in inbox_bodies(database_url, schema, reordered.id)]
    seconds = {e["created"] for e in events if e["type"] == "customer.updated"}
    assert len(seconds) == 1 and len(events) == 3  # three changes in one second (the copies stored once)
    for connection in (in_order, reordered):
        row = mirror_row(database_url, schema, "stripe_customers", connection.id, ids["customer"])
        assert (row["name"], row["raw"]) == ("Name third", served)
