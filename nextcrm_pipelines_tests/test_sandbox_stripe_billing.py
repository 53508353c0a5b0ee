"""The Stripe emulator's customers, invoices, search, account and expansions, driven with stripe-python over
real loopback HTTP: the read paths the official SDK and the Airbyte and Singer connectors take, the invoice
lifecycle and its events, and Stripe's error envelope for every route the emulator does not serve."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
import stripe

from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.stripe import StripeAccount

READ_KEY = "sk_test_billingread0000000000001"
WRITE_KEY = "sk_test_billingwrite000000000001"
NOW = 1_770_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    accounts = [
        {"api_key": READ_KEY, "seed": 7, "charges": 600, "subscriptions": 60, "customers": 80,
         "requests_per_second": 0, "now": NOW},
        {"api_key": WRITE_KEY, "seed": 8, "charges": 300, "subscriptions": 30, "requests_per_second": 0},
    ]  # fmt: skip
    with SandboxServer(accounts, now=NOW) as srv:
        yield srv


def client(server: SandboxServer, key: str = READ_KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": server.url}, max_network_retries=0)


@pytest.fixture(scope="module")
def http(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}) as c:
        yield c


def test_customer_and_charge_search_answer_search_results_not_a_retrieve_of_search(server):
    sdk = client(server)
    customers = server.stripe_export(READ_KEY, "customers")
    wanted = next(c for c in customers if not c["deleted"])
    found = sdk.v1.customers.search({"query": f"email:'{wanted['email'].upper()}'"})
    assert [c.id for c in found.data] == [wanted["id"]]  # exact match, case-insensitive
    usd = [c for c in server.stripe_export(READ_KEY, "charges") if c["currency"] == "usd" and c["amount"] > 5000]
    pages, page = [], None
    while True:
        params = {"query": "currency:'usd' AND amount>5000", "limit": 40}
        result = sdk.v1.charges.search({**params, "page": page} if page else params)
        pages.append([c.id for c in result.data])
        if not result.has_more:
            break
        page = result.next_page
    assert len(pages) > 1 and [i for p in pages for i in p] == [c["id"] for c in usd]  # newest first, paged
    assert sdk.v1.invoices.search({"query": "status:'paid'", "limit": 100}).data
    assert {s.status for s in sdk.v1.subscriptions.search({"query": "-status:'active'", "limit": 100}).data} <= {
        "trialing", "past_due", "unpaid", "paused", "incomplete", "canceled", "incomplete_expired"}  # fmt: skip
    with pytest.raises(stripe.InvalidRequestError) as bad:
        sdk.v1.customers.search({"query": "shoe_size:'42'"})
    assert bad.value.param == "query" and "unsupported search field" in bad.value.user_message
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.customers.search({"query": "email:'a' AND name:'b' OR phone:'c'"})


def test_the_account_is_served_to_a_key_check_and_another_account_is_refused(server, http):
    sdk = client(server)
    account = sdk.v1.accounts.retrieve_current()
    assert account.object == "account" and account.id.startswith("acct_") and account.charges_enabled
    assert sdk.v1.accounts.retrieve(account.id).id == account.id
    with pytest.raises(stripe.PermissionError):
        sdk.v1.accounts.retrieve("acct_1NotThisOne0000")
    other = http.get("/v1/account", headers={"Authorization": f"Bearer {WRITE_KEY}"}).json()
    assert other["id"] != account.id


def test_customers_expand_sources_and_subscriptions_expand_plan_tiers(server):
    sdk = client(server)
    customers = sdk.v1.customers.list({"limit": 3, "expand": ["data.sources"]})
    assert all(c.sources.object == "list" and c.sources.data == [] for c in customers.data)
    subscriptions = sdk.v1.subscriptions.list({"limit": 3, "expand": ["data.plan.tiers", "data.customer"]})
    assert all("tiers" in s.plan and s.plan.tiers is None and s.customer.object == "customer" for s in subscriptions)
    one = sdk.v1.subscriptions.retrieve(subscriptions.data[0].id, {"expand": ["latest_invoice"]})
    assert (
        one.latest_invoice.object == "invoice" and one.latest_invoice.parent.subscription_details.subscription == one.id
    )
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.customers.list({"expand": ["data.shoe_size"]})


def test_subscriptions_carry_the_fields_of_the_reported_api_version(server, http):
    response = http.get("/v1/subscriptions", params={"limit": 5, "status": "all"})
    assert response.headers["stripe-version"] == stripe.api_version
    for sub in response.json()["data"]:
        assert sub["billing_schedules"] == [] and "managed_payments" in sub
    typed = client(server).v1.subscriptions.list({"limit": 1}).data[0]
    assert typed.billing_schedules == [] and typed.managed_payments is None


def test_a_charge_paid_with_a_card_token_has_no_invented_billing_details(server):
    charge = client(server, WRITE_KEY).v1.charges.create({"amount": 1500, "currency": "usd", "source": "tok_visa"})
    details = charge.billing_details
    assert (details.name, details.email, details.phone) == (None, None, None)
    assert all(value is None for value in details.address.to_dict().values())
    card = charge.payment_method_details.card
    assert (card.brand, card.last4, card.country) == ("visa", "4242", "US")
    with pytest.raises(stripe.InvalidRequestError):
        client(server, WRITE_KEY).v1.charges.create({"amount": 1500, "currency": "usd", "source": "tok_nothing"})


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/v1/charges"), ("PATCH", "/v1/customers"), ("OPTIONS", "/v1/invoices"), ("DELETE", "/v1/charges"),
    ("POST", "/v1/charges/ch_x/capture"), ("GET", "/v1"), ("GET", "/v2/core/events"), ("GET", "/v1/refunds/search"),
    ("POST", "/v1/account"), ("GET", "/v1/invoices/in_x/nothing"),
])  # fmt: skip
def test_unemulated_routes_answer_with_stripes_error_envelope(http, method, path):
    response = http.request(method, path)
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("Unrecognized request URL")


def test_the_sdk_reads_an_unemulated_write_as_an_invalid_request(server):
    with pytest.raises(stripe.InvalidRequestError) as raised:
        client(server).raw_request("post", "/v1/payment_intents/pi_x/capture")
    assert raised.value.http_status == 404


def test_invoice_lifecycle_follows_stripes_rules_and_emits_its_events(server):
    sdk = client(server, WRITE_KEY)
    customer = sdk.v1.customers.create({"email": "lifecycle@example.com", "name": "Life Cycle"})
    server.control("POST", "/_sandbox/stripe/records", json={"api_key": WRITE_KEY, "kind": "invoice",
                                                             "params": {"customer": customer.id},
                                                             "lines": [["Work", 1000, 2]]})  # fmt: skip
    draft = sdk.v1.invoices.list({"customer": customer.id, "status": "draft"}).data[0]
    assert (draft.total, draft.amount_due, draft.number) == (2000, 2000, None)
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.invoices.void_invoice(draft.id)  # a draft is deleted, not voided
    opened = sdk.v1.invoices.finalize_invoice(draft.id)
    assert opened.status == "open" and opened.number and opened.hosted_invoice_url
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.invoices.finalize_invoice(draft.id)
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.invoices.delete(draft.id)  # only drafts can be deleted
    with pytest.raises(stripe.CardError) as declined:
        sdk.v1.invoices.pay(draft.id, {"payment_method": "pm_card_chargeDeclined"})
    assert declined.value.code == "card_declined"
    failed = sdk.v1.invoices.retrieve(draft.id)
    assert (failed.status, failed.attempt_count, failed.attempted) == ("open", 1, True)
    paid = sdk.v1.invoices.pay(draft.id)
    assert (paid.status, paid.amount_paid, paid.amount_remaining, paid.attempt_count) == ("paid", 2000, 0, 2)
    events = sdk.v1.events.list({"type": "invoice.*", "limit": 100}).data
    mine = [e.type for e in events if e.data.object.id == draft.id]
    # All in one second of the sandbox clock: Stripe does not order events within a second.
    assert sorted(mine) == sorted(["invoice.created", "invoice.finalized", "invoice.payment_failed",
                                   "invoice.payment_succeeded", "invoice.paid"])  # fmt: skip

    other = sdk.v1.invoices.create({"customer": customer.id, "collection_method": "send_invoice",
                                    "days_until_due": 10})  # fmt: skip
    assert other.due_date == other.created + 10 * 86400
    sdk.v1.invoices.delete(other.id)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sdk.v1.invoices.retrieve(other.id)
    assert missing.value.code == "resource_missing"
    assert other.id not in {i.id for i in sdk.v1.invoices.list({"customer": customer.id}).data}


def test_a_deleted_customer_leaves_the_list_and_retrieves_as_deleted(server):
    sdk = client(server, WRITE_KEY)
    customer = sdk.v1.customers.create({"email": "leaving@example.com"})
    updated = sdk.v1.customers.update(customer.id, {"name": "Leaving Soon", "metadata": {"k": "v"}})
    assert (updated.name, updated.metadata.to_dict()) == ("Leaving Soon", {"k": "v"})
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        sdk.v1.customers.update(customer.id, {"address": {"line1": "1 Main St", "planet": "Mars"}})
    assert (unknown.value.http_status, unknown.value.param) == (400, "address[planet]")
    deleted = sdk.v1.customers.delete(customer.id)
    assert deleted.deleted is True
    assert sdk.v1.customers.retrieve(customer.id).deleted is True
    assert customer.id not in {c.id for c in sdk.v1.customers.list({"email": "leaving@example.com"}).data}
    event = sdk.v1.events.list({"type": "customer.deleted", "limit": 1}).data[0]
    assert (event.data.object.id, event.data.object.name) == (customer.id, "Leaving Soon")  # its last state
    with pytest.raises(stripe.InvalidRequestError):
        sdk.v1.invoices.create({"customer": customer.id})


def test_invoices_are_generated_from_their_own_seed_and_change_no_other_object():
    plain = StripeAccount("sk_test_seedcheck0000000000000001", seed=3, charges=200, subscriptions=20, invoices=0,
                          now=NOW)  # fmt: skip
    billed = StripeAccount("sk_test_seedcheck0000000000000001", seed=3, charges=200, subscriptions=20, invoices=50,
                           now=NOW)  # fmt: skip
    assert plain.export("charges") == billed.export("charges")
    assert plain.export("subscriptions") == billed.export("subscriptions")
    again = StripeAccount("sk_test_seedcheck0000000000000001", seed=3, charges=200, subscriptions=20, invoices=50,
                          now=NOW)  # fmt: skip
    assert again.export("invoices") == billed.export("invoices")
    assert len(billed.export("invoices")) == 20 + 50
    # Every subscription's latest invoice is the invoice generated for it.
    for raw in billed.subscriptions.blobs:
        sub = orjson.loads(raw)
        invoice = orjson.loads(billed.invoices.blob(billed.invoices.pos[sub["latest_invoice"]]))
        assert invoice["parent"]["subscription_details"]["subscription"] == sub["id"]
        assert invoice["customer"] == sub["customer"]
