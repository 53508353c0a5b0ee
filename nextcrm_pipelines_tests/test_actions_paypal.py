"""PayPal actions through the outbox, against the PayPal sandbox over real HTTP and a real Postgres.

Every action runs end to end through Dagster (the sensor's tick and the `paypal_apply_actions` run it asks for):
an order is created, approved by its payer and captured, captures are refunded, plans created, activated and
deactivated, subscriptions cancelled and suspended, each exactly once; what PayPal holds lands in
`paypal_payments`, `paypal_plans` and `paypal_subscriptions` in the same run, and a later sync changes nothing. A
worker killed after PayPal accepted leaves one object (PayPal answers the repeated `PayPal-Request-Id` with its
first result; a plan change, which takes no request id, is found and adopted, where a re-send is refused). Until
Transaction Search shows a capture (up to three hours) the mirror holds what the capture says, and the sync then
completes the row without changing what a CRM shows. Bad payloads fail naming the field before anything reaches
PayPal; PayPal's refusals fail with its own message. The emulator's idempotency, envelopes and errors are checked
over HTTP too.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import date
from decimal import Decimal
from typing import Any

import httpx
import pytest

from nextcrm_pipelines.core.runner import day_window, snapshot_window, sync_partitions
from nextcrm_pipelines.core.sync import SyncResult
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.paypal.client import request_id
from nextcrm_pipelines.providers.paypal.records import parse_time
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now
from nextcrm_pipelines_tests.outbox_helpers import applier, crash, requests_served, rows, submit, through_dagster

PAYPAL = get_provider("paypal")
apply = applier(PAYPAL)
PAYMENTS, PLANS, SUBSCRIPTIONS = "paypal_payments", "paypal_plans", "paypal_subscriptions"
# Transaction Search shows what happened at once (no three-hour lag), so a write can be read back as the sync reads it.
ACCOUNT = {"seed": 21, "transactions": 120, "subscriptions": 6, "plans": 4, "invoices": 0, "days": 2,
           "visibility_lag_seconds": 0}  # fmt: skip
PLAN = {"product_id": "PROD-6XB24663H4094933M", "name": "Gold monthly", "description": "Gold, billed monthly",
        "interval_unit": "MONTH", "price": "19.90", "currency": "EUR", "total_cycles": 12,
        "trial": {"interval_unit": "WEEK", "total_cycles": 2}, "setup_fee": "5.00", "tax_percentage": "20"}  # fmt: skip


def sync(database_url: str, schema: str, connection, entity: str, days: list[date] | None = None) -> list[SyncResult]:
    windows = [snapshot_window()] if entity == PLANS else [day_window(d) for d in days or []]
    results = sync_partitions(database_url=database_url, schema=schema, provider=PAYPAL, entity_name=entity,
                              connection_id=connection.id, windows=windows)  # fmt: skip
    assert [r.status for r in results] == ["success"] * len(windows), [r.error for r in results if r.error]
    return results


def changed(results: list[SyncResult]) -> int:
    return sum(r.counts.inserted + r.counts.updated for r in results)


def export(control, account: str, entity: str) -> list[dict]:
    return control.export(account, entity)["records"]


def by_id(control, account: str, entity: str, record_id: str) -> dict:
    return next(r for r in export(control, account, entity) if r["id"] == record_id)


def refunds_of(control, account: str, capture_id: str) -> list[dict]:
    """The refund rows (T1107) Transaction Search holds for a capture."""
    return [t for t in export(control, account, "transactions")
            if t["transaction_info"]["transaction_event_code"] == "T1107"
            and t["transaction_info"].get("paypal_reference_id") == capture_id]  # fmt: skip


def approve(control, account: str, order_id: str) -> dict:
    return control._call("POST", f"/accounts/{account}/orders/{order_id}/approve", json={})


@pytest.fixture
def shop(paypal, own_sandbox):
    """Factory: a merchant app on a sandbox of the test's own (its clock may move) and its connection."""

    def make(**spec: Any):
        control, account, connection = paypal(own_sandbox, **{**ACCOUNT, **spec})
        return control, account, connection

    return make


def refundable(database_url: str, schema: str, connection) -> dict:
    """A mirrored Checkout capture in a currency with cents, not refunded, worth more than 5."""
    return next(r for r in mirror(database_url, schema, PAYMENTS, connection.id).values()
                if r["event_code"] == "T0006" and r["status"] == "S" and r["amount"] > 5
                and r["currency"] in ("USD", "EUR", "GBP", "CAD", "AUD"))  # fmt: skip


# --- end to end ---------------------------------------------------------------------------------------------------


def test_every_action_through_dagster_is_done_once_mirrored_and_a_later_sync_changes_nothing(
    database_url, schema, own_sandbox, shop
):
    control, account, connection = shop()
    dormant = control.add_record(account, "plan", {"status": "INACTIVE"})["id"]  # no subscription takes these two
    spare = control.add_record(account, "plan", {"status": "ACTIVE"})["id"]
    basis = control.add_record(account, "plan", {"status": "ACTIVE"})["id"]
    now = int(own_sandbox.clock())
    active = [control.add_record(account, "subscription", {"plan_id": basis}, at=now - 3600)["id"] for _ in range(2)]
    for sid in active:  # a payment, through which the sync finds the subscription
        control.add_record(account, "transaction", {"subscription_id": sid}, at=now - 1800)
    days = days_back(sandbox_now(own_sandbox).date(), ACCOUNT["days"] + 1)
    for entity in (PAYMENTS, SUBSCRIPTIONS):
        sync(database_url, schema, connection, entity, days)
    sync(database_url, schema, connection, PLANS)
    assert set(active) <= set(mirror(database_url, schema, SUBSCRIPTIONS, connection.id))
    old_capture = refundable(database_url, schema, connection)
    first = {
        "create_order": {"amount": "25.00", "currency": "EUR", "invoice_id": "crm-order-1", "description": "Consulting",
                         "items": [{"name": "Consulting hour", "quantity": 2, "unit_amount": "12.50"}],
                         "return_url": "https://crm.example.com/paid"},
        "create_plan": PLAN,
        "activate_plan": {"plan_id": dormant},
        "deactivate_plan": {"plan_id": spare},
        "cancel_subscription": {"subscription_id": active[0], "reason": "Customer asked to stop"},
        "suspend_subscription": {"subscription_id": active[1], "reason": "Payment dispute"},
        "refund_capture": {"capture_id": old_capture["transaction_id"], "amount": "1.50",
                           "currency": old_capture["currency"]},
    }  # fmt: skip
    ids = {action: submit(database_url, schema, connection.id, action, payload).id for action, payload in first.items()}
    materialized = through_dagster("paypal")
    assert {m.asset_key.to_user_string() for m in materialized} == {PAYMENTS, PLANS, SUBSCRIPTIONS}
    done = rows(database_url, schema)
    assert {done[i]["status"] for i in ids.values()} == {"succeeded"}, [done[i]["error"] for i in ids.values()]
    assert all(done[i]["attempts"] == 1 for i in ids.values())

    # The order waits for its payer: one order at PayPal, with the approve link in the result.
    (order,) = export(control, account, "orders")
    assert done[ids["create_order"]]["result_id"] == order["id"] and order["status"] == "CREATED"
    unit = order["purchase_units"][0]
    assert (unit["amount"]["value"], unit["amount"]["currency_code"], unit["invoice_id"]) == (
        "25.00",
        "EUR",
        "crm-order-1",
    )
    assert unit["items"][0]["unit_amount"] == {"currency_code": "EUR", "value": "12.50"}
    assert any(link["rel"] == "approve" for link in done[ids["create_order"]]["result"]["links"])

    # The plan: at PayPal with its trial, regular cycle and fees, and in the mirror as the sync reads it.
    plan_id = done[ids["create_plan"]]["result_id"]
    plan = by_id(control, account, "plans", plan_id)
    assert [c["tenure_type"] for c in plan["billing_cycles"]] == ["TRIAL", "REGULAR"]
    assert plan["billing_cycles"][1]["pricing_scheme"]["fixed_price"] == {"currency_code": "EUR", "value": "19.90"}
    assert plan["payment_preferences"]["setup_fee"] == {"currency_code": "EUR", "value": "5.00"}
    plans = mirror(database_url, schema, PLANS, connection.id)
    assert (plans[plan_id]["price"], plans[plan_id]["currency"], plans[plan_id]["trial_cycles"]) == (
        Decimal("19.90"), "EUR", 2)  # fmt: skip
    assert (plans[dormant]["status"], plans[dormant]["deleted"]) == ("ACTIVE", False)
    assert (plans[spare]["status"], plans[spare]["deleted"]) == ("INACTIVE", True)
    assert by_id(control, account, "plans", dormant)["status"] == "ACTIVE"

    # The subscriptions, with the reason PayPal shows.
    subs = mirror(database_url, schema, SUBSCRIPTIONS, connection.id)
    cancelled, suspended = (by_id(control, account, "subscriptions", sid) for sid in active[:2])
    assert (cancelled["status"], cancelled["status_change_note"]) == ("CANCELLED", "Customer asked to stop")
    assert suspended["status"] == "SUSPENDED"
    assert (subs[active[0]]["status"], subs[active[0]]["deleted"]) == ("CANCELLED", True)
    assert (subs[active[1]]["status"], subs[active[1]]["deleted"]) == ("SUSPENDED", False)

    # The refund of an older capture: one refund row, the capture partly refunded.
    (refund,) = refunds_of(control, account, old_capture["transaction_id"])
    refund_id = refund["transaction_info"]["transaction_id"]
    assert done[ids["refund_capture"]]["result_id"] == refund_id
    payments = mirror(database_url, schema, PAYMENTS, connection.id)
    assert payments[f"{refund_id}:T1107"]["amount"] == Decimal("-1.50")
    assert payments[f"{old_capture['transaction_id']}:T0006"]["status"] == "F"

    # The payer approves; the capture, then its full refund, through two more runs.
    payer = approve(control, account, order["id"])["payer"]
    captured = submit(database_url, schema, connection.id, "capture_order", {"order_id": order["id"]}).id
    through_dagster("paypal")
    row = rows(database_url, schema)[captured]
    assert row["status"] == "succeeded" and row["result"]["status"] == "COMPLETED"
    capture_id = row["result_id"]
    stored = mirror(database_url, schema, PAYMENTS, connection.id)[f"{capture_id}:T0006"]
    assert (stored["amount"], stored["currency"], stored["status"], stored["invoice_id"]) == (
        Decimal("25.00"), "EUR", "S", "crm-order-1")  # fmt: skip
    assert (stored["payer_id"], stored["payer_email"]) == (payer["payer_id"], payer["email_address"])
    refunded = submit(database_url, schema, connection.id, "refund_capture", {"capture_id": capture_id}).id
    through_dagster("paypal")
    assert rows(database_url, schema)[refunded]["status"] == "succeeded"
    payments = mirror(database_url, schema, PAYMENTS, connection.id)
    assert payments[f"{capture_id}:T0006"]["status"] == "V"
    (full,) = refunds_of(control, account, capture_id)
    assert payments[f"{full['transaction_info']['transaction_id']}:T1107"]["amount"] == Decimal("-25.00")

    # A later sync of the same objects changes nothing: the mirror holds them as the sync reads them.
    before = {
        entity: mirror(database_url, schema, entity, connection.id) for entity in (PAYMENTS, SUBSCRIPTIONS, PLANS)
    }
    assert changed(sync(database_url, schema, connection, PAYMENTS, days)) == 0
    assert changed(sync(database_url, schema, connection, SUBSCRIPTIONS, days)) == 0
    assert changed(sync(database_url, schema, connection, PLANS)) == 0
    assert {entity: mirror(database_url, schema, entity, connection.id) for entity in before} == before


def test_until_paypal_shows_a_capture_the_mirror_holds_what_it_says_and_the_sync_then_completes_the_row(
    database_url, schema, own_sandbox, shop
):
    # PayPal's own lag: Transaction Search shows a transaction three hours after it happens.
    control, account, connection = shop(visibility_lag_seconds=10_800)
    created = submit(database_url, schema, connection.id, "create_order", {"amount": "40.00", "currency": "USD",
                                                                           "invoice_id": "crm-77"}).id  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    order_id = rows(database_url, schema)[created]["result_id"]
    payer = approve(control, account, order_id)["payer"]
    captured = submit(database_url, schema, connection.id, "capture_order", {"order_id": order_id}).id
    assert apply(database_url, schema).succeeded == 1
    capture_id = rows(database_url, schema)[captured]["result_id"]
    refunded = submit(database_url, schema, connection.id, "refund_capture",
                      {"capture_id": capture_id, "amount": "10.00", "currency": "USD"}).id  # fmt: skip
    assert apply(database_url, schema).succeeded == 1
    refund_id = rows(database_url, schema)[refunded]["result_id"]
    shown = ("transaction_id", "event_code", "status", "amount", "fee", "currency", "payer_id", "payer_email",
             "payer_name", "invoice_id", "reference_id", "created_at", "source_updated_at", "deleted")  # fmt: skip
    keys = (f"{capture_id}:T0006", f"{refund_id}:T1107")
    early = mirror(database_url, schema, PAYMENTS, connection.id)
    assert (early[keys[0]]["status"], early[keys[0]]["amount"], early[keys[1]]["amount"]) == (
        "F", Decimal("40.00"), Decimal("-10.00"))  # fmt: skip
    name = f"{payer['name']['given_name']} {payer['name']['surname']}"
    for key in keys:
        assert (early[key]["payer_email"], early[key]["payer_name"]) == (payer["email_address"], name)
        assert "cart_info" not in early[key]["raw"]  # what the capture and refund say, no more
    own_sandbox.advance_clock(10_800 + 60)
    results = sync(database_url, schema, connection, PAYMENTS, [early[keys[0]]["created_at"].date()])
    assert sum(r.counts.updated for r in results) == 2
    late = mirror(database_url, schema, PAYMENTS, connection.id)
    for key in keys:
        assert {c: late[key][c] for c in shown} == {c: early[key][c] for c in shown}, key
        assert "cart_info" in late[key]["raw"]


# --- exactly once -------------------------------------------------------------------------------------------------


def new_order(database_url: str, schema: str, connection, control, account: str, approved: bool) -> str:
    """An order made through the outbox (approved by its payer when `approved`)."""
    done = submit(database_url, schema, connection.id, "create_order", {"amount": "30.00", "currency": "GBP"}).id
    assert apply(database_url, schema).succeeded == 1
    order_id = rows(database_url, schema)[done]["result_id"]
    if approved:
        approve(control, account, order_id)
    return order_id


@pytest.mark.parametrize("action", ["create_order", "capture_order", "refund_capture", "create_plan"])
def test_a_worker_killed_after_paypal_accepted_leaves_one_object_and_the_next_run_records_it(
    database_url, schema, secret_key, own_sandbox, shop, action
):
    control, account, connection = shop(subscriptions=0, transactions=60)
    if action == "create_order":
        payload = {"amount": "12.00", "currency": "USD", "invoice_id": "crm-crash"}

        def count() -> int:
            return len(export(control, account, "orders"))
    elif action == "capture_order":
        order_id = new_order(database_url, schema, connection, control, account, approved=True)
        payload = {"order_id": order_id}

        def count() -> int:
            order = by_id(control, account, "orders", order_id)
            return sum(len((u.get("payments") or {}).get("captures", [])) for u in order["purchase_units"])
    elif action == "refund_capture":
        sync(database_url, schema, connection, PAYMENTS, days_back(sandbox_now(own_sandbox).date(), 3))
        capture = refundable(database_url, schema, connection)
        payload = {"capture_id": capture["transaction_id"], "amount": "2.00", "currency": capture["currency"]}

        def count() -> int:
            return len(refunds_of(control, account, capture["transaction_id"]))
    else:
        payload = PLAN

        def count() -> int:
            return len(export(control, account, "plans"))

    before = count()
    done = submit(database_url, schema, connection.id, action, payload).id
    crash(database_url, schema, "paypal")
    time.sleep(1.2)  # the dead worker's lease lapses
    assert count() == before + 1 and rows(database_url, schema)[done]["status"] == "sending"
    after = apply(database_url, schema)
    row = rows(database_url, schema)[done]
    assert after.succeeded == 1 and row["status"] == "succeeded" and row["attempts"] == 2, row["error"]
    # PayPal answered the repeated PayPal-Request-Id with its first result: still one object, the one recorded.
    assert count() == before + 1
    if action == "create_order":
        assert row["result_id"] == export(control, account, "orders")[-1]["id"]
    elif action == "create_plan":
        assert row["result_id"] == export(control, account, "plans")[-1]["id"]
        assert row["result_id"] in mirror(database_url, schema, PLANS, connection.id)


@pytest.mark.parametrize("lookup", [True, False], ids=["with the lookup", "without it"])
def test_a_plan_change_a_killed_worker_made_is_found_and_adopted_since_paypal_refuses_it_twice(
    database_url, schema, secret_key, own_sandbox, shop, monkeypatch, lookup
):
    control, account, connection = shop(subscriptions=0, transactions=20)
    plan_id = control.add_record(account, "plan", {"status": "ACTIVE"})["id"]
    if not lookup:
        spec = PAYPAL.actions["deactivate_plan"]
        monkeypatch.setitem(PAYPAL.actions, "deactivate_plan", dataclasses.replace(spec, find=None))
    done = submit(database_url, schema, connection.id, "deactivate_plan", {"plan_id": plan_id}).id
    crash(database_url, schema, "paypal")
    time.sleep(1.2)  # the dead worker's lease lapses
    assert by_id(control, account, "plans", plan_id)["status"] == "INACTIVE"
    after = apply(database_url, schema)
    row = rows(database_url, schema)[done]
    if lookup:
        assert after.adopted == 1 and row["status"] == "succeeded" and row["result_id"] == plan_id
        stored = mirror(database_url, schema, PLANS, connection.id)[plan_id]
        assert (stored["status"], stored["deleted"]) == ("INACTIVE", True)
    else:  # a re-send meets the change already made
        assert row["status"] == "failed" and "HTTP 422" in row["error"] and "PLAN_STATUS_INVALID" in row["error"]


def test_server_errors_are_retried_under_the_same_request_id(database_url, schema, own_sandbox, shop):
    control, account, connection = shop(subscriptions=0, transactions=20)
    done = submit(database_url, schema, connection.id, "create_plan", PLAN, key="crm-plan-7").id
    before = len(export(control, account, "plans"))
    control.set_faults(account=account, server_errors=50)
    try:
        first = apply(database_url, schema)
    finally:
        control.clear_faults(account=account)
    row = rows(database_url, schema)[done]
    # A 5xx may have been acted on: the outcome is unknown, and the retry goes under the same key.
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 500" in row["error"]
    assert "INTERNAL_SERVER_ERROR" in row["error"]  # PayPal's own words
    assert apply(database_url, schema).succeeded == 1
    assert rows(database_url, schema)[done]["status"] == "succeeded"
    assert len(export(control, account, "plans")) == before + 1


# --- refused ------------------------------------------------------------------------------------------------------

BAD = [
    ("create_order", {"currency": "USD"}, "amount: Field required"),
    ("create_order", {"amount": "10.00", "currency": "ZZZ"}, "currency: Invalid ISO 4217"),
    ("create_order", {"amount": "10.00", "currency": "KWD"}, "PayPal does not take KWD"),
    ("create_order", {"amount": "-5", "currency": "USD"}, "amount: Input should be greater than 0"),
    ("create_order", {"amount": "100.5", "currency": "JPY"}, "amount: JPY amounts have no decimals at PayPal"),
    ("create_order", {"amount": 10.5, "currency": "USD"}, "not as floating-point numbers"),
    ("create_order", {"amount": "10.00", "currency": "USD", "items": [{"name": "x", "quantity": 3,
                                                                       "unit_amount": "3.00"}]},
     "items: their unit amounts times quantities do not add up to amount"),
    ("refund_capture", {"capture_id": "25B16188FF732802U", "amount": "1.001", "currency": "USD"},
     "USD amounts have 2 decimal places at PayPal"),
    ("refund_capture", {"capture_id": "25B16188FF732802U", "amount": "1"}, "both amount and currency"),
    ("capture_order", {"order_id": "not an order"}, "order_id: String should match pattern"),
    ("create_plan", {k: v for k, v in PLAN.items() if k != "price"}, "price: Field required"),
    ("create_plan", {**PLAN, "interval_unit": "YEAR", "interval_count": 2}, "PayPal bills a YEAR interval at most"),
    ("cancel_subscription", {"subscription_id": "I-BW452GLLEP1G"}, "reason: Field required"),
    ("deactivate_plan", {"plan_id": "P-5ML4271244454362WXNWU5NQ", "why": "x"}, "why: Extra inputs are not permitted"),
    ("void_everything", {}, "paypal has no action 'void_everything'"),
]  # fmt: skip


def test_bad_payloads_fail_naming_the_field_and_nothing_reaches_paypal(database_url, schema, sandbox, paypal):
    control, account, connection = paypal(sandbox, **{**ACCOUNT, "subscriptions": 0, "transactions": 10})
    ids = [submit(database_url, schema, connection.id, action, payload).id for action, payload, _ in BAD]
    before = requests_served(control, account)
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
        assert stored[action_id]["sent_at"] is None
    assert requests_served(control, account) == before  # nothing reached PayPal, not even a token request


def test_paypal_refusals_fail_with_its_own_message_and_a_foreign_currency_refund_is_not_sent(
    database_url, schema, own_sandbox, shop
):
    control, account, connection = shop(subscriptions=0, transactions=60)
    order_id = new_order(database_url, schema, connection, control, account, approved=False)
    sync(database_url, schema, connection, PAYMENTS, days_back(sandbox_now(own_sandbox).date(), 3))
    capture = refundable(database_url, schema, connection)
    other = "JPY" if capture["currency"] != "JPY" else "USD"
    unapproved = submit(database_url, schema, connection.id, "capture_order", {"order_id": order_id}).id
    foreign = submit(database_url, schema, connection.id, "refund_capture",
                     {"capture_id": capture["transaction_id"], "amount": "100", "currency": other}).id  # fmt: skip
    too_much = submit(database_url, schema, connection.id, "refund_capture",
                      {"capture_id": capture["transaction_id"], "amount": "99999.00",
                       "currency": capture["currency"]}).id  # fmt: skip
    assert apply(database_url, schema).failed == 3
    stored = rows(database_url, schema)
    assert "HTTP 422" in stored[unapproved]["error"] and "ORDER_NOT_APPROVED" in stored[unapproved]["error"]
    assert stored[unapproved]["sent_at"] is not None
    assert f"{other} is not capture {capture['transaction_id']}'s currency" in stored[foreign]["error"]
    assert "HTTP 422" in stored[too_much]["error"] and "REFUND_AMOUNT_EXCEEDED" in stored[too_much]["error"]
    assert control.stats()["by_route"]["POST /v2/payments/captures/{id}/refund"] == 1  # only the one too large
    assert not refunds_of(control, account, capture["transaction_id"])


# --- the emulator ---------------------------------------------------------------------------------------------------


@pytest.fixture
def merchant(own_sandbox):
    """A sandbox merchant app and its API, with a bearer token."""
    from nextcrm_sandbox.paypal import PayPalControl

    control = PayPalControl(own_sandbox)
    account = control.add_account("pp-emulator", "pp-secret", **{**ACCOUNT, "subscriptions": 0})["id"]
    base = f"{own_sandbox.url}/paypal/api"
    token = httpx.post(f"{base}/v1/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=("pp-emulator", "pp-secret")).json()["access_token"]  # fmt: skip
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        yield control, account, client


ORDER = {"intent": "CAPTURE", "purchase_units": [{"amount": {"currency_code": "USD", "value": "10.00"}}]}
RAW_PLAN = {"product_id": "PROD-6XB24663H4094933M", "name": "Basic", "payment_preferences": {},
            "billing_cycles": [{"frequency": {"interval_unit": "MONTH"}, "tenure_type": "REGULAR", "sequence": 1,
                                "total_cycles": 0, "pricing_scheme": {"fixed_price": {"currency_code": "USD",
                                                                                      "value": "5.00"}}}]}  # fmt: skip


def test_the_emulator_answers_a_repeated_paypal_request_id_with_the_first_result(own_sandbox, merchant):
    control, account, client = merchant
    made = client.post("/v2/checkout/orders", json=ORDER, headers={"PayPal-Request-Id": "order-1"})
    again = client.post("/v2/checkout/orders", json={**ORDER, "intent": "AUTHORIZE"},
                        headers={"PayPal-Request-Id": "order-1"})  # fmt: skip
    assert (made.status_code, again.status_code) == (201, 200) and again.json() == made.json()
    assert set(made.json()) == {"id", "status", "links"}  # minimal without Prefer: return=representation
    other = client.post("/v2/checkout/orders", json=ORDER, headers={"PayPal-Request-Id": "order-2"})
    assert other.status_code == 201 and other.json()["id"] != made.json()["id"]
    assert len(export(control, account, "orders")) == 2
    order_id = made.json()["id"]
    approve_link = next(link["href"] for link in made.json()["links"] if link["rel"] == "approve")
    assert httpx.get(approve_link).status_code == 200  # the payer approves on the link
    assert client.get(f"/v2/checkout/orders/{order_id}").json()["status"] == "APPROVED"
    full = {"PayPal-Request-Id": "capture-1", "Prefer": "return=representation"}
    captured = client.post(f"/v2/checkout/orders/{order_id}/capture", json={}, headers=full)
    replayed = client.post(f"/v2/checkout/orders/{order_id}/capture", json={}, headers=full)
    assert (captured.status_code, replayed.status_code) == (201, 200) and replayed.json() == captured.json()
    capture = captured.json()["purchase_units"][0]["payments"]["captures"][0]
    assert capture["status"] == "COMPLETED"
    read = client.get(f"/v2/payments/captures/{capture['id']}").json()  # Payments v2 names the order it is in
    assert read["supplementary_data"]["related_ids"]["order_id"] == order_id
    assert read["amount"] == {"currency_code": "USD", "value": "10.00"}
    twice = client.post(f"/v2/checkout/orders/{order_id}/capture", json={}, headers={"PayPal-Request-Id": "c-2"})
    assert twice.status_code == 422 and twice.json()["details"][0]["issue"] == "ORDER_ALREADY_CAPTURED"
    plans = len(export(control, account, "plans"))
    plan = client.post("/v1/billing/plans", json=RAW_PLAN, headers={"PayPal-Request-Id": "plan-1"})
    same = client.post("/v1/billing/plans", json=RAW_PLAN, headers={"PayPal-Request-Id": "plan-1"})
    assert (plan.status_code, same.status_code) == (201, 200) and same.json()["id"] == plan.json()["id"]
    assert len(export(control, account, "plans")) == plans + 1
    own_sandbox.advance_clock(6 * 3600 + 1)  # PayPal keeps a request id six hours
    later = client.post("/v1/billing/plans", json=RAW_PLAN, headers={"PayPal-Request-Id": "plan-1"})
    assert later.status_code == 201 and later.json()["id"] != plan.json()["id"]


def test_the_emulator_refuses_bad_writes_with_paypal_error_bodies(merchant):
    control, account, client = merchant

    def refused(response: httpx.Response, status: int, name: str, issue: str) -> dict:
        body = response.json()
        assert response.status_code == status and body["name"] == name, body
        assert body["details"][0]["issue"] == issue and body["message"] and body["links"]
        assert response.headers["paypal-debug-id"] == body["debug_id"]
        return body

    unit = ORDER["purchase_units"][0]
    refused(
        client.post("/v2/checkout/orders", json={"purchase_units": ORDER["purchase_units"]}),
        400,
        "INVALID_REQUEST",
        "MISSING_REQUIRED_PARAMETER",
    )
    body = refused(
        client.post(
            "/v2/checkout/orders",
            json={**ORDER, "purchase_units": [{"amount": {"currency_code": "JPY", "value": "100.5"}}]},
        ),
        422,
        "UNPROCESSABLE_ENTITY",
        "DECIMAL_PRECISION",
    )
    assert body["details"][0]["field"] == "/purchase_units/@reference_id=='default'/amount/value"
    refused(
        client.post(
            "/v2/checkout/orders",
            json={**ORDER, "purchase_units": [{"amount": {"currency_code": "KWD", "value": "1.000"}}]},
        ),
        422,
        "UNPROCESSABLE_ENTITY",
        "INVALID_CURRENCY_CODE",
    )
    refused(
        client.post(
            "/v2/checkout/orders",
            json={
                **ORDER,
                "purchase_units": [
                    {
                        **unit,
                        "amount": {
                            **unit["amount"],
                            "breakdown": {"item_total": {"currency_code": "USD", "value": "9.00"}},
                        },
                        "items": [
                            {"name": "x", "quantity": "1", "unit_amount": {"currency_code": "USD", "value": "9.00"}}
                        ],
                    }
                ],
            },
        ),
        422,
        "UNPROCESSABLE_ENTITY",
        "AMOUNT_MISMATCH",
    )
    order_id = client.post("/v2/checkout/orders", json=ORDER).json()["id"]
    refused(
        client.post(f"/v2/checkout/orders/{order_id}/capture", json={}),
        422,
        "UNPROCESSABLE_ENTITY",
        "ORDER_NOT_APPROVED",
    )
    refused(client.get("/v2/checkout/orders/0000000000000000X"), 404, "RESOURCE_NOT_FOUND", "INVALID_RESOURCE_ID")
    refused(
        client.post("/v1/billing/plans", json={k: v for k, v in RAW_PLAN.items() if k != "product_id"}),
        400,
        "INVALID_REQUEST",
        "MISSING_REQUIRED_PARAMETER",
    )
    refused(
        client.post(
            "/v1/billing/plans",
            json={
                **RAW_PLAN,
                "billing_cycles": [
                    {**RAW_PLAN["billing_cycles"][0], "frequency": {"interval_unit": "MONTH", "interval_count": 13}}
                ],
            },
        ),
        400,
        "INVALID_REQUEST",
        "INVALID_INTEGER_MAX_VALUE",
    )
    assert not export(control, account, "orders")[0].get("payer")  # nothing was approved or captured


def test_the_emulator_announces_orders_captures_and_new_plans_to_webhooks(own_sandbox, merchant):
    control, account, client = merchant
    control.subscribe_webhooks(account, "http://127.0.0.1:9/hook", hold=True)  # kept, not delivered
    order_id = client.post("/v2/checkout/orders", json=ORDER).json()["id"]
    approve(control, account, order_id)
    client.post(f"/v2/checkout/orders/{order_id}/capture", json={}).raise_for_status()
    plan_id = client.post("/v1/billing/plans", json=RAW_PLAN).json()["id"]
    events = client.get("/v1/notifications/webhooks-events", params={"page_size": 10}).json()["events"]
    assert [e["event_type"] for e in reversed(events)] == ["CHECKOUT.ORDER.APPROVED", "PAYMENT.CAPTURE.COMPLETED",
                                                           "BILLING.PLAN.CREATED"]  # fmt: skip
    assert events[0]["resource"]["id"] == plan_id and events[2]["resource"]["id"] == order_id
    capture = events[1]["resource"]
    # The capture is a Transaction Search row (code T0006) from now on.
    (row,) = [t for t in export(control, account, "transactions")
              if t["transaction_info"]["transaction_id"] == capture["id"]]  # fmt: skip
    assert row["transaction_info"]["transaction_event_code"] == "T0006"
    assert parse_time(row["transaction_info"]["transaction_initiation_date"]) == parse_time(capture["create_time"])


def test_long_or_unprintable_outbox_keys_become_a_stable_paypal_request_id():
    assert request_id("crm-refund-8812") == "crm-refund-8812"
    long = "k" * 200
    assert request_id(long) == request_id(long) != long and len(request_id(long)) <= 108
    assert request_id("naïve key").startswith("nx-")


def test_the_emulator_writes_answer_in_the_shapes_of_paypal_openapi(merchant):
    from nextcrm_pipelines_tests.test_sandbox_paypal import _conforms, _load_spec

    orders, billing = _load_spec("paypal-checkout_orders_v2.json"), _load_spec("paypal-billing_subscriptions_v1.json")
    control, account, client = merchant
    full = {"Prefer": "return=representation"}
    made = client.post(
        "/v2/checkout/orders",
        headers=full,
        json={
            "intent": "CAPTURE",
            "purchase_units": [
                {
                    "reference_id": "crm-1",
                    "description": "Consulting",
                    "invoice_id": "crm-inv-1",
                    "custom_id": "c-1",
                    "amount": {
                        "currency_code": "EUR",
                        "value": "25.00",
                        "breakdown": {"item_total": {"currency_code": "EUR", "value": "25.00"}},
                    },
                    "items": [
                        {"name": "Hour", "quantity": "2", "unit_amount": {"currency_code": "EUR", "value": "12.50"}}
                    ],
                }
            ],
        },
    )
    assert made.status_code == 201, made.text  # fmt: skip
    assert _conforms(orders, orders["components"]["schemas"]["order"], made.json()) == []
    approve(control, account, made.json()["id"])
    captured = client.post(f"/v2/checkout/orders/{made.json()['id']}/capture", json={}, headers=full)
    assert _conforms(orders, orders["components"]["schemas"]["order"], captured.json()) == []
    refused = client.post(f"/v2/checkout/orders/{made.json()['id']}/capture", json={})
    assert _conforms(orders, orders["components"]["schemas"]["error_422"], refused.json()) == []
    plan = client.post("/v1/billing/plans", headers=full, json=RAW_PLAN)
    # usage_type is in PayPal's plan answers though not in the Feb 2024 schema
    problems = _conforms(billing, billing["components"]["schemas"]["plan"], plan.json())
    assert [p for p in problems if not p.endswith("unknown key usage_type")] == []
