"""The Stripe emulator's invoice items, driven with the official stripe-python SDK (and form-encoded requests
where an older API version is pinned) over real loopback HTTP: pending items joining the customer's next
invoice, items added to and removed from a draft, amounts from `amount`, a price or a unit amount times a
quantity, list filters and paging, Stripe's error envelopes for bad parameters, and the mirror following an
invoice whose items changed after it was synced."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal

import httpx
import psycopg
import pytest
import stripe

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines_tests.helpers import sandbox_now, sync_days
from nextcrm_sandbox.server import SandboxServer


@pytest.fixture
def key(sandbox: SandboxServer) -> str:
    """A fresh account of the shared sandbox."""
    api_key = f"sk_test_{uuid.uuid4().hex}"
    sandbox.add_stripe_account(api_key=api_key, seed=12, charges=120, subscriptions=12, days=5, requests_per_second=0)
    return api_key


@pytest.fixture
def sdk(sandbox: SandboxServer, key: str) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": sandbox.url}, max_network_retries=0)


@pytest.fixture
def form(sandbox: SandboxServer, key: str) -> Iterator[httpx.Client]:
    """Plain form-encoded requests, as connectors that pin an older API version send them."""
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


def a_price(sdk: stripe.StripeClient) -> stripe.Price:
    """A price of the account's catalogue (a subscription's)."""
    return sdk.v1.subscriptions.list({"limit": 1, "status": "all"}).data[0]["items"].data[0].price


def item_ids_of(invoice: stripe.Invoice) -> list[str]:
    return [line.parent.invoice_item_details.invoice_item for line in invoice.lines.data]


def test_pending_items_join_the_next_invoice_that_includes_them(sdk):
    customer = sdk.v1.customers.create({"email": "items.buyer@example.com"})
    price = a_price(sdk)
    currency, other = price.currency, "gbp" if price.currency != "gbp" else "usd"
    fee = sdk.v1.invoice_items.create({"customer": customer.id, "amount": 1500, "currency": currency,
                                       "description": "Setup fee", "metadata": {"crm_ref": "Q-17"}})  # fmt: skip
    seats = sdk.v1.invoice_items.create({"customer": customer.id, "pricing": {"price": price.id}, "quantity": 3})
    hours = sdk.v1.invoice_items.create({"customer": customer.id, "unit_amount_decimal": "1250.5", "quantity": 2,
                                         "currency": currency, "description": "Consulting hours"})  # fmt: skip
    elsewhere = sdk.v1.invoice_items.create({"customer": customer.id, "amount": 900, "currency": other})
    assert (fee.object, fee.invoice, fee.amount) == ("invoiceitem", None, 1500)
    assert fee.metadata.to_dict() == {"crm_ref": "Q-17"}
    assert (seats.amount, seats.currency, seats.pricing.price_details.price) == (
        3 * price.unit_amount, currency, price.id)  # fmt: skip
    assert (hours.amount, hours.pricing.unit_amount_decimal) == (2501, Decimal("1250.5"))
    pending = sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data
    assert {i.id for i in pending} == {fee.id, seats.id, hours.id, elsewhere.id}

    # Since API version 2022-08-01 an invoice leaves pending items alone unless told to take them.
    bare = sdk.v1.invoices.create({"customer": customer.id, "currency": currency})
    assert (bare.total, bare.lines.data) == (0, [])
    sdk.v1.invoices.delete(bare.id)

    invoice = sdk.v1.invoices.create({"customer": customer.id, "currency": currency,
                                      "pending_invoice_items_behavior": "include"})  # fmt: skip
    assert sorted(item_ids_of(invoice)) == sorted([fee.id, seats.id, hours.id])  # not the one in another currency
    assert invoice.total == invoice.subtotal == invoice.amount_due == 1500 + 3 * price.unit_amount + 2501
    line = next(line for line in invoice.lines.data if line.parent.invoice_item_details.invoice_item == fee.id)
    assert (line.amount, line.description, line.metadata.to_dict()) == (1500, "Setup fee", {"crm_ref": "Q-17"})
    assert sdk.v1.invoice_items.retrieve(fee.id).invoice == invoice.id
    pending = sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data
    assert [i.id for i in pending] == [elsewhere.id]
    assert {i.id for i in sdk.v1.invoice_items.list({"invoice": invoice.id}).data} == {fee.id, seats.id, hours.id}

    opened = sdk.v1.invoices.finalize_invoice(invoice.id)
    assert (opened.status, opened.amount_due, opened.total) == ("open", invoice.total, invoice.total)
    assert item_ids_of(sdk.v1.invoices.retrieve(invoice.id)) == item_ids_of(invoice)


def test_an_item_added_to_a_draft_totals_it_again_and_leaves_with_its_deletion(sdk):
    customer = sdk.v1.customers.create({"email": "draft.items@example.com"})
    draft = sdk.v1.invoices.create({"customer": customer.id, "collection_method": "send_invoice",
                                    "days_until_due": 30})  # fmt: skip
    first = sdk.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 4000})
    period = {"start": draft.created - 86400, "end": draft.created}
    second = sdk.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 600,
                                          "period": period})  # fmt: skip
    assert (first.invoice, first.currency) == (draft.id, draft.currency)
    grown = sdk.v1.invoices.retrieve(draft.id)
    assert (grown.total, grown.amount_due, item_ids_of(grown)) == (4600, 4600, [first.id, second.id])
    assert grown.lines.data[1].period.start == draft.created - 86400
    updated = [e for e in sdk.v1.events.list({"type": "invoice.updated", "limit": 10}).data
               if e.data.object.id == draft.id]  # fmt: skip
    assert {e.data.previous_attributes.total for e in updated} == {0, 4000}

    assert sdk.v1.invoice_items.delete(second.id).deleted is True
    shrunk = sdk.v1.invoices.retrieve(draft.id)
    assert (shrunk.total, item_ids_of(shrunk)) == (4000, [first.id])
    with pytest.raises(stripe.InvalidRequestError) as gone:
        sdk.v1.invoice_items.retrieve(second.id)
    assert (gone.value.http_status, gone.value.code) == (404, "resource_missing")
    assert second.id not in {i.id for i in sdk.v1.invoice_items.list({"customer": customer.id}).data}
    types = [e.type for e in sdk.v1.events.list({"type": "invoiceitem.*", "limit": 10}).data
             if e.data.object.id in (first.id, second.id)]  # fmt: skip
    assert sorted(types) == ["invoiceitem.created", "invoiceitem.created", "invoiceitem.deleted"]

    sdk.v1.invoices.finalize_invoice(draft.id)
    with pytest.raises(stripe.InvalidRequestError) as closed:
        sdk.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 100})
    assert (closed.value.code, closed.value.param) == ("invoice_not_editable", "invoice")
    with pytest.raises(stripe.InvalidRequestError) as locked:
        sdk.v1.invoice_items.delete(first.id)
    assert locked.value.code == "invoice_not_editable"
    stranger = sdk.v1.customers.create({"email": "someone.else@example.com"})
    other = sdk.v1.invoices.create({"customer": stranger.id})
    with pytest.raises(stripe.InvalidRequestError) as foreign:
        sdk.v1.invoice_items.create({"customer": customer.id, "invoice": other.id, "amount": 100})
    assert foreign.value.param == "invoice"


@pytest.mark.parametrize(("params", "param", "code"), [
    ({"amount": 100}, "customer", "parameter_missing"),
    ({"customer": "cus_nobody", "amount": 100}, "customer", "resource_missing"),
    ({"customer": "{customer}"}, "amount", "parameter_missing"),
    ({"customer": "{customer}", "amount": 100, "quantity": 2}, "quantity", None),
    ({"customer": "{customer}", "amount": 100, "unit_amount_decimal": "5"}, "unit_amount_decimal", None),
    ({"customer": "{customer}", "pricing": {"price": "price_nothing"}}, "pricing[price]", "resource_missing"),
    ({"customer": "{customer}", "amount": 100, "currency": "dollars"}, "currency", None),
    ({"customer": "{customer}", "unit_amount_decimal": "1.5e3"}, "unit_amount_decimal", None),
    ({"customer": "{customer}", "amount": 100, "subscription": "sub_nothing"}, "subscription", "resource_missing"),
    ({"customer": "{customer}", "amount": 100, "invoice": "in_nothing"}, "invoice", "resource_missing"),
    ({"customer": "{customer}", "amount": 100, "shoe_size": "42"}, "shoe_size", "parameter_unknown"),
])  # fmt: skip
def test_bad_parameters_answer_stripes_error_envelope(sdk, form, params, param, code):
    customer = sdk.v1.customers.create({"email": "bad.params@example.com"}).id
    filled = {k: customer if v == "{customer}" else v for k, v in params.items()}
    with pytest.raises(stripe.InvalidRequestError) as refused:
        sdk.v1.invoice_items.create(filled)  # type: ignore[arg-type]
    assert (refused.value.http_status, refused.value.param, refused.value.code) == (400, param, code)
    # The same refusal, read off the wire: Stripe's envelope, and nothing created.
    body = {k: v for k, v in filled.items() if not isinstance(v, dict)} | {
        f"{k}[{sub}]": value for k, v in filled.items() if isinstance(v, dict) for sub, value in v.items()}  # fmt: skip
    answer = form.post("/v1/invoiceitems", data=body)
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert (error["type"], error["param"], error.get("code")) == ("invalid_request_error", param, code)
    assert sdk.v1.invoice_items.list({"customer": customer}).data == []


def test_an_older_api_version_takes_price_and_unit_amount_and_the_current_one_does_not(sdk, form):
    customer = sdk.v1.customers.create({"email": "old.version@example.com"}).id
    price = a_price(sdk)
    old = {"Stripe-Version": "2022-11-15"}
    by_price = form.post("/v1/invoiceitems", data={"customer": customer, "price": price.id, "quantity": "2"},
                         headers=old)  # fmt: skip
    assert by_price.status_code == 200, by_price.text
    assert (by_price.json()["amount"], by_price.json()["pricing"]["price_details"]["price"]) == (
        2 * price.unit_amount, price.id)  # fmt: skip
    by_unit = form.post("/v1/invoiceitems", data={"customer": customer, "unit_amount": "350", "quantity": "4",
                                                   "currency": "usd"}, headers=old)  # fmt: skip
    assert by_unit.status_code == 200 and by_unit.json()["amount"] == 1400
    assert form.post("/v1/invoiceitems", data={"customer": customer, "pricing[price]": price.id},
                     headers=old).json()["error"]["param"] == "pricing"  # fmt: skip
    with pytest.raises(stripe.InvalidRequestError) as current:
        sdk.raw_request("post", "/v1/invoiceitems", customer=customer, price=price.id)
    assert (current.value.code, current.value.param) == ("parameter_unknown", "price")


def test_items_list_newest_first_in_pages_and_the_generated_invoices_have_theirs(sdk, sandbox, key):
    customer = sdk.v1.customers.create({"email": "paged.items@example.com"})
    made = [sdk.v1.invoice_items.create({"customer": customer.id, "amount": 100 * (n + 1), "currency": "usd"}).id
            for n in range(5)]  # fmt: skip
    pages, after = [], None
    while True:
        page = sdk.v1.invoice_items.list({"customer": customer.id, "limit": 2,
                                          **({"starting_after": after} if after else {})})  # fmt: skip
        pages.append([i.id for i in page.data])
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [len(p) for p in pages] == [2, 2, 1] and sorted(i for p in pages for i in p) == sorted(made)
    assert sdk.v1.invoice_items.retrieve(made[0], {"expand": ["customer"]}).customer.email == customer.email
    # Every generated one-off invoice's lines are invoice items of its own.
    one_off = next(i for i in sdk.v1.invoices.list({"limit": 100}).auto_paging_iter() if i.parent is None)
    listed = sdk.v1.invoice_items.list({"invoice": one_off.id, "limit": 100}).data
    assert sorted(i.id for i in listed) == sorted(item_ids_of(one_off))
    assert sum(i.amount for i in listed) == one_off.total
    exported = {i["id"]: i for i in sandbox.stripe_export(key, "invoiceitems")}
    assert all(exported[i]["invoice"] is None and not exported[i]["deleted"] for i in made)


def test_an_item_added_to_a_synced_draft_reaches_the_mirrored_invoice(own_sandbox, database_url, schema, box):
    key = f"sk_test_{uuid.uuid4().hex}"
    own_sandbox.add_stripe_account(api_key=key, seed=12, charges=40, subscriptions=4, days=2, requests_per_second=0)
    sdk = stripe.StripeClient(key, base_addresses={"api": own_sandbox.url}, max_network_retries=0)
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name="Items", box=box,
                                          secrets={"api_key": key}, base_url=own_sandbox.url)  # fmt: skip
    customer = sdk.v1.customers.create({"email": "mirrored.items@example.com"})
    draft = sdk.v1.invoices.create({"customer": customer.id})
    today = [sandbox_now(own_sandbox).date()]
    assert [r.status for r in sync_days(database_url, schema, connection.id, "stripe_invoices", today)] == ["success"]
    own_sandbox.advance_clock(2)  # the item comes after the day's first read
    sdk.v1.invoice_items.create({"customer": customer.id, "invoice": draft.id, "amount": 12345, "currency": "usd"})
    (again,) = sync_days(database_url, schema, connection.id, "stripe_invoices", today)
    assert again.status == "success" and again.counts.updated == 1
    with psycopg.connect(database_url) as conn:
        total, raw = conn.execute(f'SELECT total, raw FROM "{schema}".stripe_invoices WHERE id = %s',
                                  (draft.id,)).fetchone()  # fmt: skip
    assert total == minor_to_major(12345, "usd")
    assert [line["parent"]["invoice_item_details"]["invoice_item"] for line in raw["lines"]["data"]] == [
        sdk.v1.invoice_items.list({"invoice": draft.id}).data[0].id]  # fmt: skip
