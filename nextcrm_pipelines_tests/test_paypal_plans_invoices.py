"""`paypal_plans` and `paypal_invoices` against the PayPal sandbox over real HTTP and a real Postgres, beyond the
per-entity contract (`test_entity_contract.py`, `contract/paypal.py`: paging, the mirror equal to the sandbox, re-runs,
midnight, 5xx and 429, deactivated plans and cancelled invoices flagged).

A day with more pages of invoices than PayPal serves is searched in halves; a deactivated plan is unflagged once
active again; a deleted draft leaves no trace in the search and is flagged by the id sweep; an older invoice paid in
a day is read with that day. Plans are read whole, in a job of their own beside the daily entities. The
`BILLING.PLAN.*` and `INVOICING.INVOICE.*` webhooks reach the tables, and duplicated, newest-first deliveries end
like one in-order delivery. Recipients (personal data) reach neither logs nor errors.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
import httpx
import psycopg

from nextcrm_pipelines.automation import daily_sweeps
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.runner import day_window, snapshot_window, sweep_connection, sync_partitions
from nextcrm_pipelines.core.sync import SyncResult
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.paypal import client as paypal_client
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now
from nextcrm_pipelines_tests.test_webhooks_paypal import hooked, table_rows  # noqa: F401 (a fixture)
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer

ACCOUNT = {"seed": 9, "transactions": 300, "subscriptions": 6, "plans": 23, "invoices": 70, "days": 4,
           "requests_per_minute": 0}  # fmt: skip
PROVIDER = get_provider("paypal")
PLANS, INVOICES = "paypal_plans", "paypal_invoices"


@dataclass
class Shop:
    """A sandbox merchant app and the vault connection that mirrors it."""

    server: SandboxServer
    control: PayPalControl
    account_id: str
    client_id: str
    secret: str
    connection: Connection

    @contextmanager
    def api(self) -> Iterator[httpx.Client]:
        """An httpx client for the merchant's PayPal API with a bearer token."""
        base = f"{self.server.url}/paypal/api"
        token = httpx.post(f"{base}/v1/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=(self.client_id, self.secret)).json()["access_token"]  # fmt: skip
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            yield client


def open_shop(database_url: str, box, server: SandboxServer, settings: dict[str, Any] | None = None,
              **spec: Any) -> Shop:  # fmt: skip
    """A new merchant app with `spec` over `ACCOUNT`, connected with `settings` (page sizes)."""
    control = PayPalControl(server)
    client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    account = control.add_account(client_id, secret, **{**ACCOUNT, **spec})
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(
            conn, provider="paypal", display_name=f"PayPal {account['id']}", box=box, base_url=f"{server.url}/paypal",
            secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"},
            settings={"requests_per_second": 0, "mode": "sandbox", **(settings or {})},
        )  # fmt: skip
    return Shop(server, control, account["id"], client_id, secret, connection)


def sync(database_url: str, schema: str, shop: Shop, entity: str, days: list[date] | None = None,
         expect: str = "success") -> list[SyncResult]:  # fmt: skip
    """Sync the days of `paypal_invoices`, or the whole list of `paypal_plans` (whatever the days)."""
    windows = [snapshot_window()] if entity == PLANS else [day_window(d) for d in days or []]
    results = sync_partitions(database_url=database_url, schema=schema, provider=PROVIDER, entity_name=entity,
                              connection_id=shop.connection.id, windows=windows)  # fmt: skip
    if expect:
        assert [r.status for r in results] == [expect] * len(windows), [r.error for r in results if r.error]
    return results


def recent_days(shop: Shop, extra: int = 1) -> list[date]:
    return days_back(sandbox_now(shop.server).date(), ACCOUNT["days"] + extra)


def money(value: dict[str, str] | None) -> Decimal | None:
    return Decimal(value["value"]) if value else None


def plan_truth(shop: Shop) -> dict[str, tuple]:
    """The sandbox's plans as the mirror must hold them: (deleted, status, name, product, interval, price,
    currency, updated)."""
    truth = {}
    for plan in shop.control.export(shop.account_id, "plans")["records"]:
        regular = next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")
        price = regular["pricing_scheme"]["fixed_price"]
        truth[plan["id"]] = (plan["status"] == "INACTIVE", plan["status"], plan["name"], plan["product_id"],
                             regular["frequency"]["interval_unit"], Decimal(price["value"]), price["currency_code"],
                             datetime.fromisoformat(plan["update_time"]))  # fmt: skip
    return truth


def plan_rows(database_url: str, schema: str, shop: Shop) -> dict[str, tuple]:
    rows = mirror(database_url, schema, PLANS, shop.connection.id)
    return {pid: (r["deleted"], r["status"], r["name"], r["product_id"], r["interval_unit"], r["price"], r["currency"],
                  r["source_updated_at"]) for pid, r in rows.items()}  # fmt: skip


def invoice_truth(shop: Shop) -> dict[str, tuple]:
    """The sandbox's invoices as the mirror must hold them: (deleted, status, number, recipient email, amount,
    due, paid, refunded, currency, invoice date, payment ids, created)."""
    truth = {}
    for inv in shop.control.export(shop.account_id, "invoices")["records"]:
        detail, billing = inv["detail"], inv["primary_recipients"][0]["billing_info"]
        payments = inv.get("payments") or {}
        paid_by_ids = [t["payment_id"] for t in payments.get("transactions", [])] or None
        truth[inv["id"]] = (
            inv["status"] == "CANCELLED", inv["status"], detail["invoice_number"], billing["email_address"],
            money(inv["amount"]), money(inv["due_amount"]), money(payments.get("paid_amount")),
            money((inv.get("refunds") or {}).get("refund_amount")), detail["currency_code"],
            date.fromisoformat(detail["invoice_date"]), paid_by_ids,
            datetime.fromisoformat(detail["metadata"]["create_time"]),
        )  # fmt: skip
    return truth


def invoice_rows(database_url: str, schema: str, shop: Shop) -> dict[str, tuple]:
    rows = mirror(database_url, schema, INVOICES, shop.connection.id)
    return {i: (r["deleted"], r["status"], r["invoice_number"], r["recipient_email"], r["amount"], r["due_amount"],
                r["paid_amount"], r["refunded_amount"], r["currency"], r["invoice_date"], r["payment_ids"],
                r["created_at"]) for i, r in rows.items()}  # fmt: skip


# --- sync --------------------------------------------------------------------------------------------------


def test_a_day_with_more_pages_than_paypal_serves_is_searched_in_halves(database_url, schema, box, sandbox,
                                                                        monkeypatch):  # fmt: skip
    # PayPal serves 1,000 pages at most; the same limit at 4 pages of 3 makes 40 invoices a day too many.
    monkeypatch.setattr(paypal_client, "INVOICES_MAX_PAGE", 4)
    shop = open_shop(database_url, box, sandbox, settings={"invoices_page_size": 3}, invoices=90, days=2)
    results = sync(database_url, schema, shop, INVOICES, recent_days(shop))
    assert max(r.total for r in results) > 4 * 3
    assert invoice_rows(database_url, schema, shop) == invoice_truth(shop)
    searches = shop.control.stats()["by_route"]["POST /v2/invoicing/search-invoices"]
    assert searches > sum(r.total for r in results) // 3  # the halves each paged


def test_a_deactivated_plan_keeps_its_row_flagged_until_it_is_active_again(database_url, schema, box, own_sandbox):
    shop = open_shop(database_url, box, own_sandbox, plans=6, invoices=5)
    sync(database_url, schema, shop, PLANS)
    plan_id = next(p["id"] for p in shop.control.export(shop.account_id, "plans")["records"] if p["status"] == "ACTIVE")
    before = mirror(database_url, schema, PLANS, shop.connection.id)[plan_id]
    with shop.api() as api:
        own_sandbox.advance_clock(60)
        assert api.post(f"/v1/billing/plans/{plan_id}/deactivate").status_code == 204
        (result,) = sync(database_url, schema, shop, PLANS)
        row = mirror(database_url, schema, PLANS, shop.connection.id)[plan_id]
        assert (row["status"], row["deleted"], result.counts.updated) == ("INACTIVE", True, 1)
        assert (row["name"], row["price"], row["created_at"]) == (before["name"], before["price"], before["created_at"])
        own_sandbox.advance_clock(60)
        assert api.post(f"/v1/billing/plans/{plan_id}/activate").status_code == 204
    sync(database_url, schema, shop, PLANS)
    row = mirror(database_url, schema, PLANS, shop.connection.id)[plan_id]
    assert (row["status"], row["deleted"]) == ("ACTIVE", False)
    assert plan_rows(database_url, schema, shop) == plan_truth(shop)


def test_cancelled_invoices_are_flagged_by_the_day_and_deleted_drafts_by_the_sweep(database_url, schema, box,
                                                                                    own_sandbox):  # fmt: skip
    shop = open_shop(database_url, box, own_sandbox, invoices=20, days=2)
    now = int(own_sandbox.clock())
    sent = shop.control.add_record(shop.account_id, "invoice", {"status": "SENT"}, at=now - 600)["id"]
    draft = shop.control.add_record(shop.account_id, "invoice", {"status": "DRAFT"}, at=now - 500)["id"]
    days = recent_days(shop)
    sync(database_url, schema, shop, INVOICES, days)
    with shop.api() as api:
        assert api.post(f"/v2/invoicing/invoices/{sent}/cancel", json={}).status_code == 204
        assert api.delete(f"/v2/invoicing/invoices/{draft}").status_code == 204
    sync(database_url, schema, shop, INVOICES, days[-1:])  # today's window sees the cancellation
    rows = mirror(database_url, schema, INVOICES, shop.connection.id)
    assert (rows[sent]["status"], rows[sent]["deleted"]) == ("CANCELLED", True)
    assert not rows[draft]["deleted"]  # a deleted draft leaves no trace in the search: the sweep finds it
    swept = sweep_connection(database_url=database_url, schema=schema, provider=PROVIDER, entity_name=INVOICES,
                             connection_id=shop.connection.id)  # fmt: skip
    assert swept.status == "success" and swept.counts.updated == 1
    rows = mirror(database_url, schema, INVOICES, shop.connection.id)
    assert (rows[draft]["status"], rows[draft]["deleted"]) == ("DRAFT", True)  # its last status kept
    assert sorted(rid for rid, row in rows.items() if row["deleted"]) == sorted(
        [draft, *(i for i, row in invoice_truth(shop).items() if row[0])])  # fmt: skip
    assert shop.control.export(shop.account_id, "invoices")["deleted_ids"] == [draft]
    assert daily_sweeps(PROVIDER) == [INVOICES]  # the daily sweep job runs it


def test_an_older_invoice_paid_in_a_day_is_read_with_that_day(database_url, schema, box, own_sandbox):
    shop = open_shop(database_url, box, own_sandbox, invoices=10, days=4)
    created = int(own_sandbox.clock()) - 3 * 86_400
    invoice_id = shop.control.add_record(shop.account_id, "invoice", {"status": "SENT", "amount": "80.00",
                                                                      "currency": "EUR"}, at=created)["id"]  # fmt: skip
    sync(database_url, schema, shop, INVOICES, recent_days(shop))
    assert mirror(database_url, schema, INVOICES, shop.connection.id)[invoice_id]["status"] == "SENT"
    with shop.api() as api:
        paid = api.post(f"/v2/invoicing/invoices/{invoice_id}/payments",
                        json={"method": "CASH", "amount": {"currency_code": "EUR", "value": "30.00"}})  # fmt: skip
        assert paid.status_code == 200, paid.text
    (today,) = sync(database_url, schema, shop, INVOICES, recent_days(shop)[-1:])
    row = mirror(database_url, schema, INVOICES, shop.connection.id)[invoice_id]
    assert (row["status"], row["paid_amount"], row["due_amount"]) == ("PARTIALLY_PAID", Decimal("30.00"),
                                                                      Decimal("50.00"))  # fmt: skip
    assert row["payment_ids"] == [paid.json()["payment_id"]] and today.counts.updated >= 1
    assert row["created_at"] == datetime.fromtimestamp(created, UTC)  # it stays in its own day's partition


def test_plans_sync_whole_in_their_own_job_beside_the_daily_entities(database_url, schema, box, sandbox):
    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name

    shop = open_shop(database_url, box, sandbox, plans=7, invoices=5, days=1)
    daily, lists = defs.resolve_job_def("paypal_sync"), defs.resolve_job_def("paypal_lists_sync")
    synced = {job.name: {key.to_user_string() for key in job.asset_layer.executable_asset_keys}
              for job in (daily, lists)}  # fmt: skip
    assert synced == {"paypal_sync": {"paypal_payments", "paypal_subscriptions", INVOICES},
                      "paypal_lists_sync": {PLANS}}  # fmt: skip
    assert defs.resolve_schedule_def("paypal_lists_hourly").job_name == "paypal_lists_sync"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("paypal"), [shop.connection.id])
        result = lists.execute_in_process(instance=instance, partition_key=shop.connection.id,
                                          tags={"nextcrm/scope": "recent"})  # fmt: skip
        assert result.success
        (materialization,) = result.asset_materializations_for_node(PLANS)
    assert materialization.partition == shop.connection.id
    assert materialization.metadata["dagster/row_count"].value == 7
    assert plan_rows(database_url, schema, shop) == plan_truth(shop)


def test_recipients_never_reach_logs_or_errors(database_url, schema, box, sandbox, caplog):
    caplog.set_level(logging.DEBUG)
    shop = open_shop(database_url, box, sandbox, invoices=30, days=1)
    broken = shop.control.add_record(shop.account_id, "invoice", {"invoice_date": "2026-02-31"},
                                     at=int(sandbox.clock()) - 60)["id"]  # fmt: skip
    results = sync(database_url, schema, shop, INVOICES, recent_days(shop), expect="")
    assert any(r.status == "partial" and broken in str(r.error) for r in results), [r.error for r in results]
    with psycopg.connect(database_url) as conn:  # pages PayPal refuses (at most 100 invoices a page): a failed day
        vault.merge_settings(conn, shop.connection.id, {"invoices_page_size": 500})
    failed = sync(database_url, schema, shop, INVOICES, recent_days(shop)[-1:], expect="failed")
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(f'SELECT coalesce(string_agg(error, \' \'), \'\') FROM "{schema}".integration_sync_logs'
                              ).fetchone()[0]  # fmt: skip
    text = " ".join([caplog.text, logged, *(str(r.error) for r in [*results, *failed])])
    people = set()
    for inv in shop.control.export(shop.account_id, "invoices")["records"]:
        billing = inv["primary_recipients"][0]["billing_info"]
        people |= {billing["email_address"], billing["name"]["full_name"], billing["name"]["surname"]}
    assert "HTTP 400" in text and not sorted(p for p in people if p in text)


# --- webhooks ----------------------------------------------------------------------------------------------

WEBHOOK_ACCOUNT = {"plans": 4, "invoices": 0}  # the invoices the tests make are the only ones open


def test_plan_and_invoice_webhooks_reach_the_tables(database_url, schema, box, own_sandbox, hooked):  # noqa: F811
    shop = hooked(own_sandbox, **WEBHOOK_ACCOUNT)
    api = shop.api()
    plans_before = {p["id"] for p in shop.control.export(shop.account_id, "plans")["records"]}

    def step(change) -> Any:
        own_sandbox.advance_clock(60)
        return change()

    with receiver(database_url, schema, box, clock=own_sandbox.clock) as base, dg.instance_for_test() as instance:
        shop.subscribe(base)
        gold = {"name": "Gold monthly", "status": "ACTIVE"}  # pricing changes need an active plan
        plan_id = step(lambda: shop.control.add_record(shop.account_id, "plan", gold))["id"]
        described = [{"op": "replace", "path": "/description", "value": "Gold, billed monthly"}]
        step(lambda: api.patch(f"/v1/billing/plans/{plan_id}", json=described).raise_for_status())
        step(lambda: api.post(f"/v1/billing/plans/{plan_id}/update-pricing-schemes", json={"pricing_schemes": [
            {"billing_cycle_sequence": regular_sequence(shop, plan_id),
             "pricing_scheme": {"fixed_price": {"value": "99.00", "currency_code": plan_currency(shop, plan_id)}}}]}
        ).raise_for_status())  # fmt: skip
        step(lambda: api.post(f"/v1/billing/plans/{plan_id}/deactivate").raise_for_status())
        paid = step(lambda: shop.control.add_record(shop.account_id, "invoice", {"status": "DRAFT"}))["id"]
        step(lambda: api.post(f"/v2/invoicing/invoices/{paid}/send", json={}).raise_for_status())
        capture = step(lambda: shop.control.changes(shop.account_id, invoice_payments=1))  # the one open: `paid`
        step(lambda: api.post(f"/v2/payments/captures/{paid_by(shop, paid)}/refund", json={}).raise_for_status())
        later = (sandbox_now(own_sandbox) + timedelta(days=5)).date().isoformat()
        dated = {"status": "DRAFT", "invoice_date": later}
        scheduled = step(lambda: shop.control.add_record(shop.account_id, "invoice", dated))["id"]
        step(lambda: api.post(f"/v2/invoicing/invoices/{scheduled}/send", json={}).raise_for_status())
        step(lambda: api.post(f"/v2/invoicing/invoices/{scheduled}/cancel", json={}).raise_for_status())
        assert shop.control.flush_webhooks()
        assert len(tick_and_apply(instance, "paypal")) == 1
    assert capture["invoices_paid"] == [paid]
    kinds = [e[1] for e in inbox_rows(database_url, schema, "paypal")]
    assert kinds == ["BILLING.PLAN.CREATED", "BILLING.PLAN.UPDATED", "BILLING.PLAN.PRICING-CHANGE.ACTIVATED",
                     "BILLING.PLAN.DEACTIVATED", "INVOICING.INVOICE.CREATED", "INVOICING.INVOICE.UPDATED",
                     "PAYMENT.CAPTURE.COMPLETED", "INVOICING.INVOICE.PAID", "PAYMENT.CAPTURE.REFUNDED",
                     "INVOICING.INVOICE.REFUNDED", "INVOICING.INVOICE.CREATED", "INVOICING.INVOICE.SCHEDULED",
                     "INVOICING.INVOICE.CANCELLED"]  # fmt: skip
    assert {e[2] for e in inbox_rows(database_url, schema, "paypal")} == {"processed"}
    plan = mirror(database_url, schema, PLANS, shop.connection.id)
    assert set(plan) == {plan_id} and plan_id not in plans_before  # only what the events carried
    row = plan[plan_id]
    assert (row["name"], row["description"], row["price"], row["status"], row["deleted"]) == (
        "Gold monthly", "Gold, billed monthly", Decimal("99.00"), "INACTIVE", True)  # fmt: skip
    assert row["source_updated_at"] == datetime.fromisoformat(shop.control.export(shop.account_id, "plans")["records"][
        -1]["update_time"])  # fmt: skip
    invoices = mirror(database_url, schema, INVOICES, shop.connection.id)
    assert set(invoices) == {paid, scheduled}
    assert (invoices[paid]["status"], invoices[paid]["refunded_amount"], invoices[paid]["deleted"]) == (
        "REFUNDED", invoices[paid]["amount"], False)  # fmt: skip
    assert invoices[paid]["payment_ids"] == [paid_by(shop, paid)] and invoices[paid]["term_type"]
    assert (invoices[scheduled]["status"], invoices[scheduled]["deleted"]) == ("CANCELLED", True)
    truth = invoice_truth(shop)
    assert invoice_rows(database_url, schema, shop) == {i: truth[i] for i in (paid, scheduled)}


def test_duplicated_newest_first_plan_and_invoice_events_end_like_an_in_order_delivery(database_url, schema, box,
                                                                                       own_sandbox, hooked):  # noqa: F811  # fmt: skip
    in_order = hooked(own_sandbox, **WEBHOOK_ACCOUNT)
    reordered = hooked(own_sandbox, same_account=in_order)
    api = in_order.api()
    with receiver(database_url, schema, box, clock=own_sandbox.clock) as base, dg.instance_for_test() as instance:
        in_order.subscribe(base)
        held = reordered.subscribe(base, hold=True)

        def step(change) -> Any:
            own_sandbox.advance_clock(60)
            done = change()
            assert in_order.control.flush_webhooks()
            tick_and_apply(instance, "paypal")  # the in-order connection applies as events come
            return done

        account = in_order.account_id
        plan_id = step(lambda: in_order.control.add_record(account, "plan", {"status": "ACTIVE"}))["id"]
        step(lambda: api.post(f"/v1/billing/plans/{plan_id}/deactivate").raise_for_status())
        step(lambda: api.post(f"/v1/billing/plans/{plan_id}/activate").raise_for_status())
        step(lambda: in_order.control.changes(account, plan_updates=10))
        invoice = step(lambda: in_order.control.add_record(account, "invoice", {"status": "DRAFT"}))["id"]
        step(lambda: api.post(f"/v2/invoicing/invoices/{invoice}/send", json={}).raise_for_status())
        step(lambda: api.post(f"/v2/invoicing/invoices/{invoice}/payments", json={
            "method": "CHECK", "amount": {"value": "1.00", "currency_code": currency_of(in_order, invoice)}}
        ).raise_for_status())  # fmt: skip
        step(lambda: api.post(f"/v2/invoicing/invoices/{invoice}/cancel", json={}).raise_for_status())
        step(lambda: in_order.control.changes(account, invoices=3))
        step(lambda: in_order.control.changes(account, invoice_payments=1, invoice_cancels=1))
        released = in_order.control.release_webhooks(held["id"], order="newest-first", copies=2)
        assert in_order.control.flush_webhooks()
        tick_and_apply(instance, "paypal")
    assert released >= 14
    received = inbox_rows(database_url, schema, "paypal")
    assert {e[2] for e in received} == {"processed"} and len(received) == 2 * released
    for name in (PLANS, INVOICES):
        expected = table_rows(database_url, schema, name, in_order.connection.id)
        assert expected and table_rows(database_url, schema, name, reordered.connection.id) == expected, name
    rows = mirror(database_url, schema, INVOICES, reordered.connection.id)
    assert (rows[invoice]["status"], rows[invoice]["deleted"]) == ("CANCELLED", True)  # not the older SENT


def regular_sequence(shop, plan_id: str) -> int:
    plan = next(p for p in shop.control.export(shop.account_id, "plans")["records"] if p["id"] == plan_id)
    return next(c["sequence"] for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")


def plan_currency(shop, plan_id: str) -> str:
    plan = next(p for p in shop.control.export(shop.account_id, "plans")["records"] if p["id"] == plan_id)
    return next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")["pricing_scheme"]["fixed_price"][
        "currency_code"
    ]


def paid_by(shop, invoice_id: str) -> str:
    """The PayPal capture that paid an invoice."""
    inv = next(i for i in shop.control.export(shop.account_id, "invoices")["records"] if i["id"] == invoice_id)
    return inv["payments"]["transactions"][0]["payment_id"]


def currency_of(shop, invoice_id: str) -> str:
    inv = next(i for i in shop.control.export(shop.account_id, "invoices")["records"] if i["id"] == invoice_id)
    return inv["detail"]["currency_code"]
