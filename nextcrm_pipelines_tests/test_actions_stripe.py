"""Stripe write-back through the outbox, over real HTTP and a real Postgres: payment intents (created and confirmed,
or confirmed later), subscriptions (created, their price and quantity changed, canceled at the period's end or now)
and the lookups that keep customers, refunds, payment intents, subscriptions and cancellations from happening
twice once Stripe has forgotten an idempotency key (24 hours). Then the emulator itself, driven with the official
stripe-python SDK: PaymentIntents and test cards, subscriptions with prorations, prices and products, idempotent
replays, and the events and webhooks each write sends."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
import httpx
import orjson
import pytest
import stripe

from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.outbox_helpers import (
    applier,
    crash,
    outbox_row,
    stored_key,
    submit,
    through_dagster,
    without_find,
)
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET
from nextcrm_pipelines_tests.test_webhooks_stripe_e2e import (
    delivered_and_held,
    hook_url,
    hooked_account,
    hooks,  # noqa: F401 (a fixture)
    inbox_bodies,
    mirror_rows,
)
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply
from nextcrm_sandbox.server import SandboxServer

STRIPE = get_provider("stripe")
apply = applier(STRIPE)
DAY = 86400


# --- helpers ----------------------------------------------------------------------------------------------------


def sdk_for(server: SandboxServer, key: str) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": server.url}, max_network_retries=0)


def at_sandbox(server: SandboxServer, key: str, path: str) -> dict[str, Any]:
    """An object as the emulator's API answers it now."""
    response = httpx.get(server.url + path, auth=(key, ""))
    assert response.status_code == 200, response.text
    return response.json()


def day_of(created: int) -> date:
    return datetime.fromtimestamp(created, UTC).date()


def sync_changes(database_url: str, schema: str, connection_id: str, entity: str, day: date) -> tuple[int, int]:
    """(inserted, updated) by a sync of one day of one entity."""
    result = sync_partitions(database_url=database_url, schema=schema, provider=STRIPE, entity_name=entity,
                             connection_id=connection_id, windows=[day_window(day)])[0]  # fmt: skip
    assert result.status == "success", result
    return result.counts.inserted, result.counts.updated


def a_customer_with_a_card(sdk: stripe.StripeClient) -> stripe.Customer:
    return next(c for c in sdk.v1.customers.list({"limit": 100}).auto_paging_iter()
                if c.invoice_settings.default_payment_method)  # fmt: skip


def monthly_prices(sdk: stripe.StripeClient, currency: str = "usd") -> list[stripe.Price]:
    """The catalogue's monthly prices in a currency, cheapest first."""
    prices = sdk.v1.prices.list({"currency": currency, "recurring": {"interval": "month"}, "limit": 100}).data
    return sorted(prices, key=lambda p: p.unit_amount)


def tagged(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The exported objects whose metadata carries an outbox key."""
    return [r for r in rows if (r.get("metadata") or {}).get("nextcrm_key") == key]


# --- every action end to end through Dagster --------------------------------------------------------------------


def test_payment_intents_through_dagster_charge_once_and_the_charge_lands_in_the_mirror(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=30, subscriptions=0, days=1)
    connection = stripe_connection(key)
    sdk = sdk_for(sandbox, key)
    today = day_of(sandbox.clock())
    sync_changes(database_url, schema, connection.id, "stripe_payments", today)
    # Confirmed at once with Stripe's test Visa card.
    paid = submit(database_url, schema, connection.id, "create_payment_intent",
                  {"amount": "12.50", "currency": "EUR", "payment_method": "pm_card_visa", "confirm": True,
                   "description": "Order 1001", "metadata": {"crm_order": "1001"}})  # fmt: skip
    # Created for a customer now, confirmed by a second action.
    customer = a_customer_with_a_card(sdk)
    later = sdk.v1.payment_intents.create({"amount": 4200, "currency": "usd", "customer": customer.id,
                                           "payment_method_types": ["card"]})  # fmt: skip
    confirm = submit(database_url, schema, connection.id, "confirm_payment_intent",
                     {"payment_intent": later.id, "payment_method": "pm_card_mastercard"})  # fmt: skip
    assert {m.asset_key for m in through_dagster("stripe")} == {dg.AssetKey("stripe_payments")}

    first = outbox_row(database_url, schema, paid.id)
    assert (first["status"], first["attempts"]) == ("succeeded", 1) and first["result_id"].startswith("pi_")
    intent = sdk.v1.payment_intents.retrieve(first["result_id"])
    assert (intent.status, intent.amount, intent.currency) == ("succeeded", 1250, "eur")
    assert intent.metadata.to_dict() == {"crm_order": "1001", "nextcrm_key": stored_key(database_url, schema, paid.id)}
    (charge,) = sdk.v1.charges.list({"payment_intent": intent.id}).data
    assert (charge.id, charge.status, charge.payment_method_details.card.last4) == (intent.latest_charge, "succeeded",
                                                                                    "4242")  # fmt: skip
    second = outbox_row(database_url, schema, confirm.id)
    assert (second["status"], second["result_id"]) == ("succeeded", later.id)
    confirmed = sdk.v1.payment_intents.retrieve(later.id)
    assert confirmed.status == "succeeded" and confirmed.customer == customer.id

    rows = mirror(database_url, schema, "stripe_payments", connection.id)
    assert (rows[charge.id]["amount"], rows[charge.id]["currency"], rows[charge.id]["status"],
            rows[charge.id]["payment_intent_id"]) == (Decimal("12.50"), "eur", "succeeded", intent.id)  # fmt: skip
    other = rows[confirmed.latest_charge]
    assert (other["amount"], other["customer_id"], other["payment_intent_id"]) == (Decimal("42.00"), customer.id,
                                                                                   later.id)  # fmt: skip
    for charge_id in (charge.id, confirmed.latest_charge):
        assert rows[charge_id]["raw"] == at_sandbox(sandbox, key, f"/v1/charges/{charge_id}")
    # A sync of the day reads the same charges: nothing changes.
    assert sync_changes(database_url, schema, connection.id, "stripe_payments", today) == (0, 0)


def test_a_declined_card_fails_the_action_with_stripes_message_and_the_failed_charge_is_synced(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    done = submit(
        database_url,
        schema,
        connection.id,
        "create_payment_intent",
        {"amount": "30", "currency": "usd", "payment_method": "pm_card_chargeDeclined", "confirm": True},
    )
    outcome = apply(database_url, schema)
    row = outbox_row(database_url, schema, done.id)
    assert outcome.failed == 1 and row["status"] == "failed" and row["result_id"] is None
    assert "HTTP 402" in row["error"] and "Your card was declined." in row["error"]
    (intent,) = tagged(sandbox.stripe_export(key, "payment_intents"), stored_key(database_url, schema, done.id))
    assert intent["status"] == "requires_payment_method"
    failed = next(c for c in sandbox.stripe_export(key, "charges") if c["id"] == intent["latest_charge"])
    assert failed["status"] == "failed"
    sync_changes(database_url, schema, connection.id, "stripe_payments", day_of(failed["created"]))
    stored = mirror(database_url, schema, "stripe_payments", connection.id)[failed["id"]]
    assert (stored["status"], stored["failure_code"], stored["payment_intent_id"]) == ("failed", "card_declined",
                                                                                       intent["id"])  # fmt: skip


def test_subscriptions_through_dagster_created_changed_and_canceled_with_the_mirror_in_step(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=30, subscriptions=3, days=1)
    connection = stripe_connection(key)
    sdk = sdk_for(sandbox, key)
    today = day_of(sandbox.clock())
    sync_changes(database_url, schema, connection.id, "stripe_subscriptions", today)
    customer = a_customer_with_a_card(sdk)
    starter, team = monthly_prices(sdk)[:2]

    def step(action: str, payload: dict[str, Any]) -> tuple[dict[str, Any], stripe.Subscription, dict[str, Any]]:
        done = submit(database_url, schema, connection.id, action, payload)
        (materialization,) = through_dagster("stripe")
        assert materialization.asset_key == dg.AssetKey("stripe_subscriptions")
        row = outbox_row(database_url, schema, done.id)
        assert (row["status"], row["attempts"]) == ("succeeded", 1), row
        row["key"] = stored_key(database_url, schema, done.id)
        at_stripe = sdk.v1.subscriptions.retrieve(row["result_id"])
        stored = mirror(database_url, schema, "stripe_subscriptions", connection.id)[row["result_id"]]
        # The mirror holds what Stripe serves now (read your writes), and a sync of its day then changes nothing.
        assert stored["raw"] == row["result"] == at_sandbox(sandbox, key, f"/v1/subscriptions/{row['result_id']}")
        assert sync_changes(database_url, schema, connection.id, "stripe_subscriptions",
                            day_of(at_stripe.created)) == (0, 0)  # fmt: skip
        return row, at_stripe, stored

    row, created, stored = step("create_subscription", {"customer": customer.id, "price": starter.id, "quantity": 2,
                                                        "metadata": {"crm_deal": "D-7"}})  # fmt: skip
    assert (created.status, created.customer, created["items"].data[0].quantity) == ("active", customer.id, 2)
    assert created.metadata.to_dict() == {"crm_deal": "D-7", "nextcrm_key": row["key"]}
    invoice = sdk.v1.invoices.retrieve(created.latest_invoice)
    assert (invoice.status, invoice.amount_paid) == ("paid", 2 * starter.unit_amount)
    assert (stored["status"], stored["quantity"], stored["amount"], stored["deleted"]) == (
        "active", 2, Decimal(2 * starter.unit_amount) / 100, False)  # fmt: skip
    item = created["items"].data[0].id

    _, changed, stored = step("update_subscription", {"subscription": created.id, "price": team.id, "quantity": 3})
    assert (changed["items"].data[0].id, changed["items"].data[0].price.id, changed["items"].data[0].quantity) == (
        item, team.id, 3)  # fmt: skip
    prorations = sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data
    assert sorted(i.amount > 0 for i in prorations) == [False, True] and all(i.proration for i in prorations)
    assert (stored["amount"], stored["quantity"]) == (Decimal(3 * team.unit_amount) / 100, 3)

    _, scheduled, stored = step("cancel_subscription", {"subscription": created.id, "at_period_end": True,
                                                        "feedback": "too_expensive"})  # fmt: skip
    assert scheduled.cancel_at_period_end and scheduled.cancel_at == scheduled["items"].data[0].current_period_end
    assert (stored["status"], stored["cancel_at_period_end"], stored["deleted"]) == ("active", True, False)

    _, ended, stored = step("cancel_subscription", {"subscription": created.id, "prorate": True})
    assert (ended.status, ended.cancellation_details.feedback) == ("canceled", "too_expensive")
    assert (stored["status"], stored["deleted"], stored["ended_at"]) == (
        "canceled",
        True,
        datetime.fromtimestamp(ended.ended_at, UTC),
    )
    credits = [i for i in sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data if i.amount < 0]
    assert len(credits) == 2  # the update's credit and the cancellation's


# --- exactly once, after Stripe has forgotten the key ------------------------------------------------------------


def _customer_case(sdk: stripe.StripeClient, server: SandboxServer, key: str) -> dict[str, Any]:
    return {"description": "From the CRM", "metadata": {"crm_id": "C-9"}}


def _refund_case(sdk: stripe.StripeClient, server: SandboxServer, key: str) -> dict[str, Any]:
    charge = next(c for c in server.stripe_export(key, "charges")
                  if c["status"] == "succeeded" and not c["amount_refunded"] and c["currency"] == "usd")  # fmt: skip
    return {"charge": charge["id"], "amount": "0.50", "currency": "usd"}


def _intent_case(sdk: stripe.StripeClient, server: SandboxServer, key: str) -> dict[str, Any]:
    return {"amount": "19.99", "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}


def _subscription_case(sdk: stripe.StripeClient, server: SandboxServer, key: str) -> dict[str, Any]:
    return {"customer": a_customer_with_a_card(sdk).id, "price": monthly_prices(sdk)[0].id}


# action, payload maker, export kind counted
CASES: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {
    "create_customer": (_customer_case, "customers"),
    "refund_charge": (_refund_case, "refunds"),
    "create_payment_intent": (_intent_case, "payment_intents"),
    "create_subscription": (_subscription_case, "subscriptions"),
}


@pytest.mark.parametrize("action", sorted(CASES))
@pytest.mark.parametrize("lookup", [True, False], ids=["found", "no-lookup"])
def test_a_worker_killed_after_stripe_accepted_acts_once_even_after_the_key_expired(
    database_url, schema, secret_key, own_stripe, action, lookup
):
    server, key, connection = own_stripe(seed=31, charges=20, subscriptions=2, days=1)
    sdk = sdk_for(server, key)
    make, kind = CASES[action]
    done = submit(database_url, schema, connection.id, action, make(sdk, server, key), key=f"crm-{action}-1")
    crash(database_url, schema, "stripe")
    (first,) = tagged(server.stripe_export(key, kind), f"crm-{action}-1")  # Stripe acted once
    assert outbox_row(database_url, schema, done.id)["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses
    server.advance_clock(DAY + 3600)  # and Stripe no longer knows the idempotency key

    after = apply(database_url, schema, STRIPE if lookup else without_find(STRIPE, action))
    row = outbox_row(database_url, schema, done.id)
    made = tagged(server.stripe_export(key, kind), f"crm-{action}-1")
    assert row["status"] == "succeeded" and after.succeeded == 1
    if lookup:
        # Found by its `nextcrm_key` and adopted: still one, and the row names it.
        assert after.adopted == 1 and [m["id"] for m in made] == [first["id"]] and row["result_id"] == first["id"]
    else:
        # Without the lookup the resend is a new request to Stripe: a second object.
        assert len(made) == 2 and row["result_id"] != first["id"]


def test_a_decline_whose_outcome_was_lost_is_found_and_fails_the_action_once(database_url, schema, secret_key,
                                                                            own_stripe):  # fmt: skip
    server, key, connection = own_stripe(seed=33, charges=10, subscriptions=0, days=1)
    payload = {"amount": "45", "currency": "usd", "payment_method": "pm_card_chargeDeclined", "confirm": True}
    done = submit(database_url, schema, connection.id, "create_payment_intent", payload, key="crm-declined-1")
    # The worker dies after Stripe declined, before the failure is recorded.
    crash(database_url, schema, "stripe", "_record_failure")
    time.sleep(1.2)
    server.advance_clock(DAY + 3600)
    after = apply(database_url, schema)
    row = outbox_row(database_url, schema, done.id)
    assert after.failed == 1 and row["status"] == "failed" and "HTTP 402" in row["error"], row
    assert "Your card was declined." in row["error"] and "found after an earlier attempt" in row["error"]
    (intent,) = tagged(server.stripe_export(key, "payment_intents"), "crm-declined-1")  # not charged again
    assert len([c for c in server.stripe_export(key, "charges") if c["status"] == "failed"
                and c["id"] == intent["latest_charge"]]) == 1  # fmt: skip


@pytest.mark.parametrize("lookup", [True, False], ids=["found", "no-lookup"])
def test_a_cancellation_whose_answer_was_lost_is_found_canceled(database_url, schema, secret_key, own_stripe, lookup):
    server, key, connection = own_stripe(seed=32, charges=20, subscriptions=6, days=1)
    live = next(s for s in server.stripe_export(key, "subscriptions") if s["status"] == "active")
    done = submit(database_url, schema, connection.id, "cancel_subscription", {"subscription": live["id"]})
    crash(database_url, schema, "stripe")
    time.sleep(1.2)
    after = apply(database_url, schema, STRIPE if lookup else without_find(STRIPE, "cancel_subscription"))
    row = outbox_row(database_url, schema, done.id)
    if lookup:
        assert after.adopted == 1 and (row["status"], row["result_id"]) == ("succeeded", live["id"])
        stored = mirror(database_url, schema, "stripe_subscriptions", connection.id)[live["id"]]
        assert (stored["status"], stored["deleted"]) == ("canceled", True)
    else:
        # A DELETE takes no key: sent again, it meets a subscription that has already ended.
        assert row["status"] == "failed" and "has already ended (canceled)" in row["error"]


def test_a_timeout_on_delete_is_retried_and_the_404_of_the_retry_is_the_cancellation(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=10, subscriptions=8, days=1)
    connection = stripe_connection(key)
    live = next(s for s in sandbox.stripe_export(key, "subscriptions") if s["status"] == "active")
    done = submit(database_url, schema, connection.id, "cancel_subscription", {"subscription": live["id"]})
    account = sandbox.app.state.stripe.account(key)
    real = account.cancel_subscription

    def canceled_then_lost(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("the answer was lost")  # the sandbox answers 500: the SDK sends the DELETE again

    account.cancel_subscription = canceled_then_lost
    try:
        outcome = apply(database_url, schema)
    finally:
        del account.cancel_subscription
    row = outbox_row(database_url, schema, done.id)
    assert outcome.succeeded == 1 and (row["status"], row["result_id"]) == ("succeeded", live["id"])
    assert row["result"]["status"] == "canceled"


# --- refused before anything is sent ----------------------------------------------------------------------------


BAD = [
    ("create_payment_intent", {"currency": "usd"}, "amount: Field required"),
    ("create_payment_intent", {"amount": "10", "currency": "XYZ"}, "currency: Invalid ISO 4217"),
    ("create_payment_intent", {"amount": "-10", "currency": "usd"}, "amount: Input should be greater than 0"),
    ("create_payment_intent", {"amount": "10.005", "currency": "eur"}, "EUR amounts have 2 decimal places"),
    ("create_payment_intent", {"amount": "1000.5", "currency": "jpy"}, "JPY amounts have 0 decimal places"),
    ("create_payment_intent", {"amount": "10", "currency": "usd", "confirm": True}, "confirm needs a payment_method"),
    ("create_payment_intent", {"amount": "10", "currency": "usd", "metadata": {"nextcrm_key": "x"}},
     "metadata.nextcrm_key is set by NextCRM"),
    ("confirm_payment_intent", {}, "payment_intent: Field required"),
    ("confirm_payment_intent", {"payment_intent": "ch_123"}, "payment_intent: String should match pattern"),
    ("create_subscription", {"price": "price_1"}, "customer: Field required"),
    ("create_subscription", {"customer": "cus_1", "price": "price_1", "quantity": -2},
     "quantity: Input should be greater than or equal to 1"),
    ("create_subscription", {"customer": "cus_1", "price": "price_1", "quantity": "2"},
     "quantity: Input should be a valid integer"),
    ("update_subscription", {"subscription": "sub_1"}, "give the new price, the new quantity or both"),
    ("update_subscription", {"subscription": "sub_1", "quantity": 2, "proration_behavior": "sometimes"},
     "proration_behavior: Input should be"),
    ("cancel_subscription", {"subscription": "sub_1", "at_period_end": True, "prorate": True},
     "prorate and invoice_now are for a cancellation now"),
    ("cancel_subscription", {"subscription": "sub_1", "feedback": "meh"}, "feedback: Input should be"),
    ("refund_charge", {"charge": "ch_1", "metadata": {"nextcrm_key": "mine"}}, "metadata.nextcrm_key is set by"),
    ("create_customer", {"email": "not an address"}, "email: String should match pattern"),
]  # fmt: skip


def test_bad_payloads_fail_naming_the_field_and_nothing_reaches_stripe(database_url, schema, sandbox, stripe_account,
                                                                       stripe_connection):  # fmt: skip
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    ids = [submit(database_url, schema, connection.id, action, payload).id for action, payload, _ in BAD]
    before = sandbox.stripe_stats(key)["requests"]
    outcome = apply(database_url, schema)
    assert outcome.failed == len(BAD) and outcome.succeeded == 0
    for action_id, (action, _, message) in zip(ids, BAD, strict=True):
        row = outbox_row(database_url, schema, action_id)
        assert row["status"] == "failed" and message in row["error"] and action in row["error"], row
        assert row["sent_at"] is None
    assert sandbox.stripe_stats(key)["requests"] == before


@pytest.mark.parametrize(
    ("fault", "runs"),
    [({"server_errors": 2}, 1), ({"rate_limit_burst": 3}, 1), ({"server_errors": 50}, 2)],
    ids=["5xx", "429", "5xx-until-the-run-gives-up"],
)
def test_server_errors_and_rate_limits_are_survived_under_the_same_key(database_url, schema, sandbox, stripe_account,
                                                                       stripe_connection, fault, runs):  # fmt: skip
    key = stripe_account(charges=10, subscriptions=0, days=1)
    connection = stripe_connection(key)
    sdk = sdk_for(sandbox, key)
    done = submit(database_url, schema, connection.id, "create_subscription",
                  {"customer": a_customer_with_a_card(sdk).id, "price": monthly_prices(sdk)[0].id})  # fmt: skip
    sandbox.set_stripe_faults(key, **fault)
    try:
        first = apply(database_url, schema)
    finally:
        sandbox.clear_stripe_faults(key)
    stats = sandbox.stripe_stats(key)
    assert stats["server_errors"] + stats["rate_limited"] >= 2  # the faults were met, and answered again
    if runs == 2:
        # The run gave up: a 5xx may have been acted on, so the row is unknown, looked up, then sent again.
        assert first.retrying == 1 and outbox_row(database_url, schema, done.id)["status"] == "unknown"
        assert apply(database_url, schema).succeeded == 1
    row = outbox_row(database_url, schema, done.id)
    assert (row["status"], row["attempts"]) == ("succeeded", runs), row
    made = tagged(sandbox.stripe_export(key, "subscriptions"), stored_key(database_url, schema, done.id))
    assert [m["id"] for m in made] == [row["result_id"]]  # one subscription, however many requests it took
    assert mirror(database_url, schema, "stripe_subscriptions", connection.id)[row["result_id"]]["status"] == "active"


def test_stripe_refusing_an_action_fails_it_with_stripes_message(database_url, schema, sandbox, stripe_account,
                                                                 stripe_connection):  # fmt: skip
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    sdk = sdk_for(sandbox, key)
    bare = sdk.v1.customers.create({"description": "no card yet"})
    refused = [
        (submit(database_url, schema, connection.id, "create_subscription",
                {"customer": bare.id, "price": monthly_prices(sdk)[0].id}).id,
         "HTTP 400", "no attached payment source"),
        (submit(database_url, schema, connection.id, "update_subscription",
                {"subscription": "sub_doesnotexist", "quantity": 2}).id, "HTTP 404", "No such subscription"),
        (submit(database_url, schema, connection.id, "create_payment_intent",
                {"amount": "0.10", "currency": "usd"}).id, "HTTP 400", "Amount must be at least 0.50 usd"),
    ]  # fmt: skip
    apply(database_url, schema)
    for action_id, status, message in refused:
        row = outbox_row(database_url, schema, action_id)
        assert row["status"] == "failed" and status in row["error"] and message in row["error"], row
    # Nobody's personal data in the messages: the bare customer's description is not there.
    assert all("no card yet" not in outbox_row(database_url, schema, i)["error"] for i, _, _ in refused)
    # `default_incomplete` creates it, for the customer to pay later.
    later = submit(database_url, schema, connection.id, "create_subscription",
                   {"customer": bare.id, "price": monthly_prices(sdk)[0].id,
                    "payment_behavior": "default_incomplete"})  # fmt: skip
    apply(database_url, schema)
    row = outbox_row(database_url, schema, later.id)
    assert row["status"] == "succeeded" and row["result"]["status"] == "incomplete"
    assert mirror(database_url, schema, "stripe_subscriptions", connection.id)[row["result_id"]]["status"] == (
        "incomplete")  # fmt: skip


# --- webhooks from what the actions did ------------------------------------------------------------------------


def test_the_actions_webhooks_reach_the_tables_and_a_reordered_duplicated_delivery_ends_the_same(
    database_url,
    schema,
    box,
    own_sandbox,
    hooks,  # noqa: F811 (a fixture)
):
    key, (in_order, reordered) = hooked_account(own_sandbox, database_url, schema, box, ("In order", "Reordered"))
    sdk = sdk_for(own_sandbox, key)
    customer = a_customer_with_a_card(sdk)
    starter, team = monthly_prices(sdk)[:2]
    with receiver(database_url, schema, box) as base, dg.instance_for_test() as instance:
        first = hooks.subscribe_webhooks(key, hook_url(base, in_order), SECRET)["id"]
        held = hooks.subscribe_webhooks(key, hook_url(base, reordered), SECRET)["id"]
        hooks.hold_webhooks(held)
        results: dict[str, str] = {}

        def act(name: str, action: str, payload: dict[str, Any]) -> None:
            own_sandbox.advance_clock(2)  # each action's events in seconds of their own
            done = submit(database_url, schema, in_order.id, action, payload)
            apply(database_url, schema)
            row = outbox_row(database_url, schema, done.id)
            assert row["status"] == "succeeded", row
            results[name] = row["result_id"]

        act("subscription", "create_subscription", {"customer": customer.id, "price": starter.id})
        act("changed", "update_subscription", {"subscription": results["subscription"], "price": team.id,
                                               "proration_behavior": "none"})  # fmt: skip
        act("ended", "cancel_subscription", {"subscription": results["subscription"], "invoice_now": True})
        act("intent", "create_payment_intent", {"amount": "25", "currency": "usd", "customer": customer.id,
                                                "payment_method": "pm_card_visa", "confirm": True})  # fmt: skip
        charge = sdk.v1.payment_intents.retrieve(results["intent"]).latest_charge
        act("refund", "refund_charge", {"charge": charge})
        assert hooks.flush_webhooks()
        assert {a["status"] for a in hooks.webhook_attempts(first)} == {200}
        tick_and_apply(instance, "stripe")
        assert hooks.release_webhooks(held, order="newest-first", copies=3) > 0
        assert hooks.flush_webhooks()
        tick_and_apply(instance, "stripe")
        assert all(run.is_success for run in instance.get_runs())

    types = {orjson.loads(body)["type"] for _, _, body in inbox_bodies(database_url, schema, in_order.id)}
    assert {"customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted",
            "payment_intent.created", "payment_intent.succeeded", "charge.succeeded", "charge.refunded",
            "invoice.paid"} <= types  # fmt: skip
    assert {status for _, status, _ in inbox_bodies(database_url, schema, reordered.id)} == {"processed"}
    subscription, charge_id = results["subscription"], charge
    for name, object_id, path in (("stripe_subscriptions", subscription, f"/v1/subscriptions/{subscription}"),
                                  ("stripe_payments", charge_id, f"/v1/charges/{charge_id}")):  # fmt: skip
        now_at_stripe = at_sandbox(own_sandbox, key, path)
        ours = mirror_rows(database_url, schema, name, in_order.id)[object_id]
        theirs = mirror_rows(database_url, schema, name, reordered.id)[object_id]
        assert ours["raw"] == theirs["raw"] == now_at_stripe
        drop = ("source_updated_at",)  # the action stamped its own read; the events carry Stripe's times
        assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    ended = mirror_rows(database_url, schema, "stripe_subscriptions", reordered.id)[subscription]
    assert (ended["status"], ended["deleted"]) == ("canceled", True)


# --- the emulator ------------------------------------------------------------------------------------------------


@pytest.fixture
def sdk(sandbox: SandboxServer) -> stripe.StripeClient:
    """A fresh account of the shared sandbox, through the official SDK."""
    api_key = f"sk_test_{uuid.uuid4().hex}"
    sandbox.add_stripe_account(api_key=api_key, seed=14, charges=60, subscriptions=10, days=3, requests_per_second=0)
    return sdk_for(sandbox, api_key)


def event_types(sdk: stripe.StripeClient, limit: int) -> list[str]:
    """The newest events' types, oldest first."""
    return [e.type for e in sdk.v1.events.list({"limit": limit}).data][::-1]


def test_confirming_with_a_test_card_creates_a_succeeded_charge_and_its_events(sdk):
    intent = sdk.v1.payment_intents.create({"amount": 2000, "currency": "usd", "description": "Seats",
                                            "automatic_payment_methods": {"enabled": True,
                                                                          "allow_redirects": "never"}})  # fmt: skip
    assert (intent.status, intent.latest_charge, intent.client_secret.startswith(intent.id)) == (
        "requires_payment_method", None, True)  # fmt: skip
    paid = sdk.v1.payment_intents.confirm(intent.id, {"payment_method": "pm_card_visa"})
    assert (paid.status, paid.amount_received) == ("succeeded", 2000)
    assert paid.payment_method.startswith("pm_1") and paid.payment_method != "pm_card_visa"
    charge = sdk.v1.charges.retrieve(paid.latest_charge)
    assert (charge.status, charge.paid, charge.captured, charge.amount, charge.payment_intent) == (
        "succeeded", True, True, 2000, intent.id)  # fmt: skip
    assert (charge.payment_method_details.card.brand, charge.payment_method_details.card.last4) == ("visa", "4242")
    assert [c.id for c in sdk.v1.charges.list({"limit": 1}).data] == [charge.id]
    assert [c.id for c in sdk.v1.charges.list({"payment_intent": intent.id}).data] == [charge.id]
    assert event_types(sdk, 3) == ["payment_intent.created", "charge.succeeded", "payment_intent.succeeded"]
    expanded = sdk.v1.payment_intents.retrieve(intent.id, {"expand": ["latest_charge", "payment_method"]})
    assert expanded.latest_charge.id == charge.id and expanded.payment_method.card.last4 == "4242"
    with pytest.raises(stripe.InvalidRequestError) as again:
        sdk.v1.payment_intents.confirm(intent.id, {"payment_method": "pm_card_visa"})
    assert again.value.code == "payment_intent_unexpected_state"
    found = sdk.v1.payment_intents.search({"query": "status:'succeeded' AND amount:2000"}).data
    assert [p.id for p in found] == [intent.id]


def test_a_declined_card_is_a_402_card_error_and_leaves_a_failed_charge(sdk):
    with pytest.raises(stripe.CardError) as declined:
        sdk.v1.payment_intents.create({"amount": 1500, "currency": "eur", "payment_method": "pm_card_chargeDeclined",
                                       "confirm": True, "payment_method_types": ["card"]})  # fmt: skip
    error = declined.value
    assert (error.http_status, error.code, error.user_message) == (402, "card_declined", "Your card was declined.")
    body = error.json_body["error"]
    assert (body["type"], body["decline_code"], body["payment_intent"]["status"]) == (
        "card_error", "generic_decline", "requires_payment_method")  # fmt: skip
    intent = sdk.v1.payment_intents.retrieve(body["payment_intent"]["id"])
    assert (intent.last_payment_error.code, intent.last_payment_error.charge, intent.payment_method) == (
        "card_declined", body["charge"], None)  # fmt: skip
    failed = sdk.v1.charges.retrieve(body["charge"])
    assert (failed.status, failed.paid, failed.failure_code, failed.outcome.type) == (
        "failed", False, "card_declined", "issuer_declined")  # fmt: skip
    assert event_types(sdk, 3) == ["payment_intent.created", "charge.failed", "payment_intent.payment_failed"]
    # Another card on the same intent: a second charge, and the intent is paid.
    paid = sdk.v1.payment_intents.confirm(intent.id, {"payment_method": "pm_card_mastercard"})
    assert paid.status == "succeeded"
    assert [c.status for c in sdk.v1.charges.list({"payment_intent": intent.id}).data] == ["succeeded", "failed"]
    with pytest.raises(stripe.CardError) as funds:
        sdk.v1.payment_intents.confirm(
            sdk.v1.payment_intents.create({"amount": 900, "currency": "usd", "payment_method_types": ["card"]}).id,
            {"payment_method": "pm_card_chargeDeclinedInsufficientFunds"})  # fmt: skip
    assert funds.value.json_body["error"]["decline_code"] == "insufficient_funds"


def test_payment_intent_requests_stripe_refuses(sdk):
    cases = [
        ({"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}, "return_url",
         "A `return_url` must be specified"),
        ({"amount": 2000, "currency": "usd", "payment_method": "pm_nope", "confirm": True,
          "payment_method_types": ["card"]}, "payment_method", "No such PaymentMethod: 'pm_nope'"),
        ({"amount": 20, "currency": "usd"}, "amount", "Amount must be at least 0.50 usd"),
        ({"currency": "usd"}, "amount", "Missing required param: amount."),
        ({"amount": 2000, "currency": "usd", "capture_method": "manual"}, "capture_method", "manual capture"),
        ({"amount": 2000, "currency": "usd", "payment_method_types": ["card"], "automatic_payment_methods": {
            "enabled": True}}, "payment_method_types", "only specify one of"),
    ]  # fmt: skip
    before = len(sdk.v1.payment_intents.list({"limit": 100}).data)
    for params, param, message in cases:
        with pytest.raises(stripe.InvalidRequestError) as refused:
            sdk.v1.payment_intents.create(params)
        assert (refused.value.http_status, refused.value.param) == (400, param) and message in str(refused.value)
    assert len(sdk.v1.payment_intents.list({"limit": 100}).data) == before  # a refused request creates nothing
    with pytest.raises(stripe.InvalidRequestError) as missing:
        sdk.v1.payment_intents.retrieve("pi_3nothing")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


def test_the_payment_intent_of_a_generated_charge(sdk):
    charges = sdk.v1.charges.list({"limit": 100}).data
    for charge in (
        next(c for c in charges if c.status == "succeeded"),
        next(c for c in charges if c.status == "failed"),
    ):
        intent = sdk.v1.payment_intents.retrieve(charge.payment_intent)
        assert (intent.amount, intent.currency, intent.latest_charge) == (charge.amount, charge.currency, charge.id)
        expected = "succeeded" if charge.status == "succeeded" else "requires_payment_method"
        assert intent.status == expected
        refunds = sdk.v1.refunds.list({"payment_intent": charge.payment_intent}).data
        assert all(r.charge == charge.id for r in refunds)


def test_idempotent_replays_conflicts_and_a_replayed_decline(sdk):
    key = f"pi-{uuid.uuid4()}"
    params = {"amount": 3100, "currency": "gbp", "payment_method": "pm_card_visa", "confirm": True,
              "payment_method_types": ["card"]}  # fmt: skip
    first = sdk.v1.payment_intents.create(params, {"idempotency_key": key})
    again = sdk.v1.payment_intents.create(params, {"idempotency_key": key})
    assert again.id == first.id and again.last_response.headers.get("idempotent-replayed") == "true"
    assert len(sdk.v1.charges.list({"payment_intent": first.id}).data) == 1
    with pytest.raises(stripe.IdempotencyError):
        sdk.v1.payment_intents.create({**params, "amount": 3200}, {"idempotency_key": key})
    # A decline ran: its 402 is kept for the key like a success, and a repeat makes no second charge.
    declined = f"pi-{uuid.uuid4()}"
    params = {**params, "payment_method": "pm_card_chargeDeclined"}
    answers = []
    for _ in range(2):
        with pytest.raises(stripe.CardError) as error:
            sdk.v1.payment_intents.create(params, {"idempotency_key": declined})
        answers.append(error.value.json_body["error"]["charge"])
    assert answers[0] == answers[1]
    # A subscription is created once for a key, too.
    customer = a_customer_with_a_card(sdk)
    price = monthly_prices(sdk)[0]
    made = [sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": price.id}]},
                                        {"idempotency_key": f"sub-{key}"}) for _ in range(2)]  # fmt: skip
    assert made[0].id == made[1].id
    assert len([s for s in sdk.v1.subscriptions.list({"customer": customer.id, "limit": 100}).data
                if s.id == made[0].id]) == 1  # fmt: skip


def test_creating_a_subscription_bills_its_first_period(sdk):
    customer = a_customer_with_a_card(sdk)
    starter = monthly_prices(sdk)[0]
    sub = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": starter.id, "quantity": 3}],
                                       "expand": ["latest_invoice"]})  # fmt: skip
    item = sub["items"].data[0]
    assert (sub.status, sub.currency, item.price.id, item.quantity, sub.quantity) == ("active", "usd", starter.id, 3, 3)
    assert item.current_period_start == sub.start_date == sub.created
    assert datetime.fromtimestamp(item.current_period_end, UTC).month != datetime.fromtimestamp(sub.created, UTC).month
    invoice = sub.latest_invoice
    assert (invoice.status, invoice.billing_reason, invoice.amount_paid) == ("paid", "subscription_create",
                                                                             3 * starter.unit_amount)  # fmt: skip
    assert invoice.parent.subscription_details.subscription == sub.id
    assert invoice.lines.data[0].parent.subscription_item_details.subscription_item == item.id
    # Created incomplete, then made active once its invoice was paid: newest first in the feed.
    events = [(e.type, e.data.object.to_dict().get("status")) for e in sdk.v1.events.list({"limit": 12}).data]
    subscription_events = [(t, s) for t, s in events if t.startswith("customer.subscription.")]
    assert subscription_events[:2] == [("customer.subscription.updated", "active"),
                                       ("customer.subscription.created", "incomplete")]  # fmt: skip
    assert {"invoice.created", "invoice.finalized", "invoice.paid", "payment_intent.succeeded",
            "charge.succeeded"} <= {t for t, _ in events}  # fmt: skip
    paid_with = next(c for c in sdk.v1.charges.list({"customer": customer.id, "limit": 5}).data
                     if c.amount == 3 * starter.unit_amount)  # fmt: skip
    assert paid_with.payment_method == customer.invoice_settings.default_payment_method

    trial = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": monthly_prices(sdk)[1].id}],
                                         "trial_period_days": 14})  # fmt: skip
    assert (trial.status, trial.trial_end - trial.trial_start) == ("trialing", 14 * DAY)
    assert sdk.v1.invoices.retrieve(trial.latest_invoice).total == 0


def test_subscription_requests_stripe_refuses_or_leaves_incomplete(sdk):
    bare = sdk.v1.customers.create({"email": "new.customer@example.com"})
    starter, team = monthly_prices(sdk)[:2]
    yearly = sdk.v1.prices.list({"currency": "usd", "recurring": {"interval": "year"}}).data[0]
    euro = monthly_prices(sdk, "eur")[0]
    cases = [
        ({"customer": bare.id, "items": [{"price": starter.id}]}, None, "no attached payment source"),
        ({"customer": bare.id}, "items", "Missing required param: items."),
        ({"customer": "cus_missing", "items": [{"price": starter.id}]}, "customer", "No such customer"),
        ({"customer": bare.id, "items": [{"price": "price_missing"}]}, "items[0][price]", "No such price"),
        ({"customer": bare.id, "items": [{"price": starter.id}, {"price": euro.id}]}, "items", "must match"),
        ({"customer": bare.id, "items": [{"price": starter.id}, {"price": yearly.id}]}, "items", "must match"),
        ({"customer": bare.id, "items": [{"price": starter.id}, {"price": starter.id}]}, "items", "same price"),
        ({"customer": bare.id, "items": [{"price": starter.id}], "payment_behavior": "pending_if_incomplete"},
         "payment_behavior", "only available when updating"),
    ]  # fmt: skip
    for params, param, message in cases:
        with pytest.raises(stripe.InvalidRequestError) as refused:
            sdk.v1.subscriptions.create(params)
        assert refused.value.param == param and message in str(refused.value), (params, str(refused.value))
    assert sdk.v1.subscriptions.list({"customer": bare.id, "status": "all"}).data == []
    waiting = sdk.v1.subscriptions.create({"customer": bare.id, "items": [{"price": team.id}],
                                           "payment_behavior": "default_incomplete"})  # fmt: skip
    assert waiting.status == "incomplete"
    assert sdk.v1.invoices.retrieve(waiting.latest_invoice).status == "open"
    # A declined card: `error_if_incomplete` creates nothing, `allow_incomplete` leaves it incomplete.
    with pytest.raises(stripe.CardError):
        sdk.v1.subscriptions.create({"customer": bare.id, "items": [{"price": team.id}],
                                     "default_payment_method": "pm_card_chargeDeclined",
                                     "payment_behavior": "error_if_incomplete"})  # fmt: skip
    assert [s.id for s in sdk.v1.subscriptions.list({"customer": bare.id, "status": "all"}).data] == [waiting.id]
    tried = sdk.v1.subscriptions.create({"customer": bare.id, "items": [{"price": team.id}],
                                         "default_payment_method": "pm_card_chargeDeclined"})  # fmt: skip
    invoice = sdk.v1.invoices.retrieve(tried.latest_invoice)
    assert (tried.status, invoice.status, invoice.attempt_count) == ("incomplete", "open", 1)


def test_changing_price_and_quantity_prorates_as_proration_behavior_says(sdk):
    customer = a_customer_with_a_card(sdk)
    starter, team = monthly_prices(sdk)[:2]
    sub = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": starter.id, "quantity": 2}]})
    item = sub["items"].data[0]
    with pytest.raises(stripe.InvalidRequestError) as gone:
        sdk.v1.subscriptions.update(sub.id, {"items": [{"id": item.id, "quantity": 3}], "prorate": True})
    assert gone.value.code == "parameter_unknown"  # `prorate` left subscription updates for proration_behavior

    none = sdk.v1.subscriptions.update(sub.id, {"items": [{"id": item.id, "quantity": 3}],
                                                "proration_behavior": "none"})  # fmt: skip
    assert none["items"].data[0].quantity == 3 and none.quantity == 3
    assert sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data == []
    updated_event = sdk.v1.events.list({"type": "customer.subscription.updated", "limit": 1}).data[0]
    assert updated_event.data.previous_attributes["quantity"] == 2

    changed = sdk.v1.subscriptions.update(sub.id, {"items": [{"id": item.id, "price": team.id}]})
    assert (changed["items"].data[0].id, changed["items"].data[0].price.id, changed.plan.id) == (item.id, team.id,
                                                                                                team.id)  # fmt: skip
    pending = sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data
    credit, charge = sorted(pending, key=lambda i: i.amount)
    assert credit.proration and charge.proration
    assert credit.description.startswith("Unused time on 3 \u00d7 ") and charge.description.startswith(
        "Remaining time on 3 \u00d7 ")  # fmt: skip
    assert -credit.amount <= 3 * starter.unit_amount and charge.amount <= 3 * team.unit_amount
    assert credit.parent.subscription_details.subscription == sub.id

    at_once = sdk.v1.subscriptions.update(sub.id, {"items": [{"id": item.id, "quantity": 4}],
                                                   "proration_behavior": "always_invoice"})  # fmt: skip
    invoice = sdk.v1.invoices.retrieve(at_once.latest_invoice)
    assert (invoice.billing_reason, invoice.status) == ("subscription_update", "paid")
    assert len(invoice.lines.data) == 4  # the earlier pending prorations and this change's two
    assert sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data == []
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        sdk.v1.subscriptions.update(sub.id, {"items": [{"id": "si_nope", "quantity": 1}]})
    assert (unknown.value.code, unknown.value.param) == ("resource_missing", "items[0][id]")


def test_cancel_at_period_end_and_cancel_now_with_prorate_and_invoice_now(sdk):
    customer = a_customer_with_a_card(sdk)
    starter = monthly_prices(sdk)[0]
    sub = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": starter.id}]})
    later = sdk.v1.subscriptions.update(sub.id, {"cancel_at_period_end": True,
                                                 "cancellation_details": {"feedback": "unused"}})  # fmt: skip
    assert (later.status, later.cancel_at, later.cancellation_details.feedback) == (
        "active", sub["items"].data[0].current_period_end, "unused")  # fmt: skip
    assert later.canceled_at is not None  # Stripe stamps the request that scheduled it
    kept = sdk.v1.subscriptions.update(sub.id, {"cancel_at_period_end": False})
    assert (kept.cancel_at, kept.canceled_at) == (None, None)

    ended = sdk.v1.subscriptions.cancel(sub.id, {"prorate": True, "invoice_now": True})
    assert (ended.status, ended.cancellation_details.reason) == ("canceled", "cancellation_requested")
    final = sdk.v1.invoices.retrieve(ended.latest_invoice)
    assert final.total < 0 and final.amount_due == 0 and final.status == "paid"
    assert sdk.v1.customers.retrieve(customer.id).balance == customer.balance + final.total
    assert sdk.v1.events.list({"limit": 1}).data[0].type == "customer.subscription.deleted"
    with pytest.raises(stripe.InvalidRequestError) as twice:
        sdk.v1.subscriptions.cancel(sub.id)
    assert (twice.value.http_status, twice.value.code) == (404, "resource_missing")
    with pytest.raises(stripe.InvalidRequestError) as closed:
        sdk.v1.subscriptions.update(sub.id, {"cancel_at_period_end": True})
    assert "can only update its cancellation_details and metadata" in str(closed.value)

    # Canceled with neither, a subscription's pending prorations go with it.
    other = sdk.v1.subscriptions.create({"customer": customer.id, "items": [{"price": starter.id}]})
    sdk.v1.subscriptions.update(other.id, {"items": [{"id": other["items"].data[0].id, "quantity": 2}]})
    assert len(sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data) == 2
    sdk.v1.subscriptions.cancel(other.id)
    assert sdk.v1.invoice_items.list({"customer": customer.id, "pending": True}).data == []


def test_prices_and_products_list_page_filter_and_expand(sdk):
    prices = list(sdk.v1.prices.list({"limit": 3}).auto_paging_iter())
    assert len(prices) == 8 and len({p.id for p in prices}) == 8
    assert all(p.type == "recurring" and p.active for p in prices)
    assert {p.currency for p in sdk.v1.prices.list({"currency": "jpy"}).data} == {"jpy"}
    yearly = sdk.v1.prices.list({"recurring": {"interval": "year"}, "limit": 100}).data
    assert yearly and all(p.recurring.interval == "year" for p in yearly)
    assert sdk.v1.prices.list({"type": "one_time"}).data == []
    one = sdk.v1.prices.retrieve(prices[0].id, {"expand": ["product"]})
    assert one.product.id == prices[0].product and one.product.default_price == prices[0].id
    products = list(sdk.v1.products.list({"limit": 2}).auto_paging_iter())
    assert {p.id for p in products} == {p.product for p in prices}
    assert sdk.v1.products.list({"ids": [products[0].id]}).data[0].id == products[0].id
    with pytest.raises(stripe.InvalidRequestError) as bad:
        sdk.v1.prices.list({"type": "sometimes"})
    assert bad.value.param == "type"


def test_lookups_the_actions_use_refunds_of_a_charge_and_searches_by_metadata(sdk, sandbox):
    charge = next(c for c in sdk.v1.charges.list({"limit": 100}).auto_paging_iter()
                  if c.status == "succeeded" and not c.amount_refunded and c.amount > 300)  # fmt: skip
    refunds = [sdk.v1.refunds.create({"charge": charge.id, "amount": 100, "metadata": {"nextcrm_key": f"r{n}"}})
               for n in range(2)]  # fmt: skip
    listed = sdk.v1.refunds.list({"charge": charge.id}).data
    assert [r.id for r in listed] == [r.id for r in reversed(refunds)]
    customer = sdk.v1.customers.create({"metadata": {"nextcrm_key": "it's \\ tricky"}})
    found = sdk.v1.customers.search({"query": "metadata['nextcrm_key']:'it\\'s \\\\ tricky'"}).data
    assert [c.id for c in found] == [customer.id]
    intent = sdk.v1.payment_intents.create({"amount": 700, "currency": "usd", "metadata": {"nextcrm_key": "pk"}})
    assert [p.id for p in sdk.v1.payment_intents.search({"query": "metadata['nextcrm_key']:'pk'"}).data] == [intent.id]


def test_a_refund_expands_its_charge_and_a_replay_answers_the_same(sdk, sandbox):
    """`expand[]=charge` on a refund (which the action uses so the mirror needs no second read) gives the charge
    as it is after the refund; a repeated key replays that first answer; other paths are refused."""
    charge = next(c for c in sdk.v1.charges.list({"limit": 100}).auto_paging_iter()
                  if c.status == "succeeded" and not c.amount_refunded and c.amount > 300)  # fmt: skip
    params = {"charge": charge.id, "amount": 100, "expand": ["charge"]}
    refund = sdk.v1.refunds.create(params, {"idempotency_key": f"exp-{charge.id}"})
    assert (refund.charge.id, refund.charge.amount_refunded, refund.charge.object) == (charge.id, 100, "charge")
    again = sdk.v1.refunds.create(params, {"idempotency_key": f"exp-{charge.id}"})
    assert (again.id, again.charge.amount_refunded) == (refund.id, 100)
    assert sdk.v1.charges.retrieve(charge.id).amount_refunded == 100  # the replay refunded nothing
    assert sdk.v1.refunds.retrieve(refund.id, {"expand": ["charge"]}).charge.id == charge.id
    listed = sdk.v1.refunds.list({"charge": charge.id, "expand": ["data.charge"]}).data
    assert [r.charge.id for r in listed] == [charge.id]
    with pytest.raises(stripe.InvalidRequestError) as bad:
        sdk.v1.refunds.create({"charge": charge.id, "amount": 1, "expand": ["balance_transaction"]})
    assert bad.value.param == "expand"


def test_the_writes_events_are_delivered_as_webhooks(own_sandbox, hooks):  # noqa: F811 (a fixture)
    key = f"sk_test_{uuid.uuid4().hex}"
    own_sandbox.add_stripe_account(api_key=key, seed=15, charges=20, subscriptions=2, days=1, requests_per_second=0)
    sdk = sdk_for(own_sandbox, key)
    bodies: list[bytes] = []
    with collector(bodies) as url:
        hooks.subscribe_webhooks(key, url, SECRET, enabled_events=["payment_intent.succeeded", "charge.succeeded",
                                                                   "customer.subscription.created",
                                                                   "customer.subscription.updated",
                                                                   "customer.subscription.deleted"])  # fmt: skip
        sdk.v1.payment_intents.create({"amount": 900, "currency": "usd", "payment_method": "pm_card_visa",
                                       "confirm": True, "payment_method_types": ["card"]})  # fmt: skip
        sub = sdk.v1.subscriptions.create({"customer": a_customer_with_a_card(sdk).id,
                                           "items": [{"price": monthly_prices(sdk)[0].id}]})  # fmt: skip
        sdk.v1.subscriptions.cancel(sub.id)
        assert hooks.flush_webhooks()
    events = [orjson.loads(b) for b in bodies]
    # Only the enabled types, in the order the writes made them (the subscription's first invoice is paid between
    # its creation and its activation).
    assert [e["type"] for e in events] == [
        "charge.succeeded", "payment_intent.succeeded",
        "customer.subscription.created", "charge.succeeded", "payment_intent.succeeded",
        "customer.subscription.updated", "customer.subscription.deleted",
    ]  # fmt: skip
    assert events[-1]["data"]["object"]["id"] == sub.id
    for event in events:
        assert event == at_sandbox(own_sandbox, key, f"/v1/events/{event['id']}")


def collector(bodies: list[bytes]):
    """A loopback endpoint that answers 200 and keeps each delivery's body."""
    import contextlib
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def receive(request: Request) -> Response:
        bodies.append(await request.body())
        return Response(status_code=200)

    @contextlib.contextmanager
    def serving():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/hook", receive, methods=["POST"])]),
                                               log_level="warning"))  # fmt: skip
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()

    return serving()


def test_a_subscription_created_and_activated_in_one_second_ends_active_however_its_events_arrive(
    database_url,
    schema,
    box,
    own_sandbox,
    hooks,  # noqa: F811 (a fixture)
):
    # Stripe stamps events in whole seconds: `customer.subscription.created` (incomplete) and `.updated` (active)
    # of one creation share theirs. Delivered newest first, the created one must not roll the row back.
    key, (in_order, reordered) = hooked_account(own_sandbox, database_url, schema, box, ("In order", "Reordered"))
    sdk = sdk_for(own_sandbox, key)
    customer = a_customer_with_a_card(sdk)
    with delivered_and_held(database_url, schema, box, hooks, key, in_order, reordered) as (instance, held):
        subscription = sdk.v1.subscriptions.create({"customer": customer.id,
                                                    "items": [{"price": monthly_prices(sdk)[0].id}]})  # fmt: skip
        assert subscription.status == "active"
        assert hooks.release_webhooks(held, order="newest-first", copies=2) > 0
        assert hooks.flush_webhooks()
        tick_and_apply(instance, "stripe")
    created, updated = (at_sandbox(own_sandbox, key, f"/v1/events?type=customer.subscription.{kind}&limit=1")["data"][0]
                        for kind in ("created", "updated"))  # fmt: skip
    assert created["created"] == updated["created"]  # the tie this is about
    for connection in (in_order, reordered):
        row = mirror_rows(database_url, schema, "stripe_subscriptions", connection.id)[subscription.id]
        assert row["status"] == "active", (connection.display_name, row["status"])
