"""QuickBooks `Customer` and `Payment` webhooks end to end: a change in the sandbox company → signed delivery →
receiver → inbox → sensor tick → apply run (re-read by id) → the `quickbooks_customers` / `quickbooks_payments` rows.

Both payload formats carry customer edits, deactivations (QuickBooks' delete of a customer), merges and
creates, and payment creates, voids and hard deletes into the tables; three copies of every delivery sent
newest first, applied one event at a time, end in the same tables as one in-order delivery.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
import pytest

from nextcrm_pipelines.providers.quickbooks.webhooks import WEBHOOKS
from nextcrm_pipelines.webhooks.inbox import apply_pending
from nextcrm_pipelines_tests.accounting import PROFILES, Account, assert_mirror_equals_export, connect_account, mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_webhooks_quickbooks import comparable, connect_again, flush, statuses
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply

TOKEN = "qbo-verifier-token-0123456789"
ENTITIES = ("quickbooks_invoices", "quickbooks_customers", "quickbooks_payments")
TENANT = {"invoices": 40, "customers": 10, "days": 3, "currencies": ["USD"], "deleted_invoices": 0,
          "deleted_payment_share": 0.0, "inactive_share": 0.0}  # fmt: skip


@pytest.fixture
def verifier_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("QUICKBOOKS_WEBHOOK_VERIFIER_TOKEN", TOKEN)
    return TOKEN


def sync_everything(database_url: str, schema: str, sandbox, connection_id: str) -> None:
    today = sandbox_now(sandbox).date()
    for entity in ENTITIES:
        results = sync_days(database_url, schema, connection_id, entity, days_back(today, TENANT["days"] + 1))
        assert all(r.status == "success" for r in results), [r.error for r in results]


def assert_all_equal_the_sandbox(account: Account, database_url: str, schema: str) -> dict[str, dict[str, Any]]:
    """Every table of the connection equals the sandbox's export; the rows by table and id."""
    return {entity: assert_mirror_equals_export(dataclasses.replace(account, profile=PROFILES[entity]), database_url,
                                                schema) for entity in ENTITIES}  # fmt: skip


def synced_account(sandbox, database_url: str, schema: str, box) -> Account:
    account = connect_account(sandbox, database_url, box, PROFILES["quickbooks_customers"], **TENANT)
    sync_everything(database_url, schema, sandbox, account.connection.id)
    assert_all_equal_the_sandbox(account, database_url, schema)
    return account


@contextmanager
def subscribed(account: Account, url: str, connection_id: str, **options: Any) -> Iterator[str]:
    target = f"{url}/webhooks/quickbooks/{connection_id}"
    sub = account.control.subscribe_webhooks(target, app=account.client_id, verifier_token=TOKEN, **options)
    try:
        yield sub["id"]
    finally:
        account.control.unsubscribe_webhooks(sub["id"])


def at(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC)


def open_invoices(account: Account, count: int) -> list[str]:
    owed = [str(r["Id"]) for r in account.export("invoice")["records"] if Decimal(str(r["Balance"])) > 0]
    assert len(owed) >= count
    return owed[:count]


def live(rows: dict[str, dict[str, Any]]) -> list[str]:
    return sorted((rid for rid, row in rows.items() if not row["deleted"]), key=int)


@pytest.mark.parametrize("shape", ["legacy", "cloudevents"])
def test_customer_and_payment_changes_reach_the_tables(shape, database_url, schema, box, sandbox, verifier_token):
    account = synced_account(sandbox, database_url, schema, box)
    customers = mirror(database_url, schema, "quickbooks_customers", account.connection.id)
    payments = mirror(database_url, schema, "quickbooks_payments", account.connection.id)
    edited, deactivated, source, into = live(customers)[:4]
    voided, deleted = live(payments)[:2]
    (owed,) = open_invoices(account, 1)
    control, tenant, now = account.control, account.tenant_id, sandbox.clock()
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance, \
            subscribed(account, url, account.connection.id, format=shape) as sub:  # fmt: skip
        control.update_record(tenant, edited, {"PrimaryPhone": {"FreeFormNumber": "(555) 555-0100"}},
                              updated_at=now + 1, entity="customer")  # fmt: skip
        control.update_record(tenant, deactivated, {"Active": False}, updated_at=now + 2, entity="customer")
        control.merge_customers(tenant, source, into, updated_at=now + 3)
        created = control.add_record(tenant, "customer", updated_at=now + 4)["Id"]
        paid = control.add_record(tenant, "payment", {"invoice": owed}, updated_at=now + 5)
        control.void_payment(tenant, voided, updated_at=now + 6)
        control.delete_payment(tenant, deleted, updated_at=now + 7)
        flush(account)
        assert statuses(account, sub) == [200] * 7  # one delivery per control call
        assert len(tick_and_apply(instance, "quickbooks")) == 1
        assert all(run.is_success for run in instance.get_runs())
    rows = assert_all_equal_the_sandbox(account, database_url, schema)
    people, money = rows["quickbooks_customers"], rows["quickbooks_payments"]
    # (A customer's row moves on again when a later payment changes its balance.)
    assert people[edited]["phone"] == "(555) 555-0100" and people[edited]["source_updated_at"] >= at(now + 1)
    assert (people[deactivated]["status"], people[deactivated]["deleted"]) == ("inactive", True)
    assert not customers[deactivated]["deleted"]
    # The merged-away customer keeps what we knew and says it is gone; its invoices now name the survivor.
    gone = people[source]
    assert (gone["status"], gone["deleted"], gone["source_updated_at"]) == ("deleted", True, at(now + 3))
    assert gone["display_name"] == customers[source]["display_name"]
    assert not any(row["customer_id"] == source for row in rows["quickbooks_invoices"].values() if not row["deleted"])
    assert people[created]["status"] == "active"
    assert money[paid["Id"]]["invoice_ids"] == [owed] and money[paid["Id"]]["status"] == "applied"
    assert rows["quickbooks_invoices"][owed]["balance"] == 0
    assert (money[voided]["status"], money[voided]["deleted"], money[voided]["total"]) == ("voided", True, 0)
    assert (money[deleted]["status"], money[deleted]["deleted"]) == ("deleted", True)
    assert money[deleted]["total"] == payments[deleted]["total"] > 0
    kinds = {kind for _, kind, _, _, _ in inbox_rows(database_url, schema, "quickbooks")}
    if shape == "legacy":
        assert {"Customer.Update", "Customer.Merge", "Customer.Create", "Payment.Create", "Payment.Void",
                "Payment.Delete"} <= kinds  # fmt: skip
    else:
        assert {"qbo.customer.updated.v1", "qbo.customer.merged.v1", "qbo.customer.created.v1",
                "qbo.payment.created.v1", "qbo.payment.voided.v1", "qbo.payment.deleted.v1"} <= kinds  # fmt: skip


@pytest.mark.parametrize("shape", ["legacy", "cloudevents"])
def test_three_copies_newest_first_end_like_one_in_order_delivery(shape, database_url, schema, box, sandbox,
                                                                  verifier_token):  # fmt: skip
    account = synced_account(sandbox, database_url, schema, box)
    other = connect_again(account, database_url, box, "QuickBooks shuffled")
    sync_everything(database_url, schema, sandbox, other.id)
    first, second = account.connection.id, other.id
    customers = live(mirror(database_url, schema, "quickbooks_customers", first))
    payments = live(mirror(database_url, schema, "quickbooks_payments", first))
    a, b, c = customers[:3]
    p, q = payments[:2]
    owed_one, owed_two = open_invoices(account, 2)
    control, tenant, now = account.control, account.tenant_id, sandbox.clock()
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance, \
            subscribed(account, url, first, format=shape) as in_order, \
            subscribed(account, url, second, format=shape, hold=True) as held:  # fmt: skip
        control.update_record(tenant, a, {"Notes": "a first"}, updated_at=now + 1, entity="customer")
        control.update_record(tenant, a, {"Notes": "a second"}, updated_at=now + 2, entity="customer")
        control.update_record(tenant, b, {"Notes": "b, then merged"}, updated_at=now + 3, entity="customer")
        control.merge_customers(tenant, b, c, updated_at=now + 4)
        control.update_record(tenant, a, {"Active": False}, updated_at=now + 5, entity="customer")
        control.update_record(tenant, p, {"PrivateNote": "p, then voided"}, updated_at=now + 6, entity="payment")
        control.void_payment(tenant, p, updated_at=now + 7)
        new = control.add_record(tenant, "payment", {"invoice": owed_one}, updated_at=now + 8)["Id"]
        control.update_record(tenant, new, {"PrivateNote": "new, then deleted"}, updated_at=now + 9, entity="payment")
        control.delete_payment(tenant, new, updated_at=now + 10)
        control.delete_payment(tenant, q, updated_at=now + 11)
        kept = control.add_record(tenant, "payment", {"invoice": owed_two}, updated_at=now + 12)["Id"]
        flush(account)
        deliveries = len(statuses(account, in_order))
        assert statuses(account, in_order) == [200] * deliveries and deliveries == 12
        assert len(tick_and_apply(instance, "quickbooks")) == 1
        assert all(run.is_success for run in instance.get_runs())

        assert control.release_webhooks(held, order="newest-first", copies=3) == deliveries
        flush(account)
        assert statuses(account, held) == [200] * deliveries * 3
        outcome = apply_pending(database_url=database_url, schema=schema, provider="quickbooks",
                                apply=WEBHOOKS.apply, batch=1)  # fmt: skip
        assert outcome.failed == 0 and outcome.processed > deliveries
        assert tick_and_apply(instance, "quickbooks") == []
    inbox = inbox_rows(database_url, schema, "quickbooks")
    assert {status for _, _, status, _, _ in inbox} == {"processed"}
    rows = assert_all_equal_the_sandbox(account, database_url, schema)
    for entity in ENTITIES:
        assert comparable(mirror(database_url, schema, entity, second)) == comparable(rows[entity]), entity
    people, money = rows["quickbooks_customers"], rows["quickbooks_payments"]
    assert people[a]["status"] == "inactive" and people[a]["source_updated_at"] >= at(now + 5)
    assert people[a]["raw"]["Notes"] == "a second"
    assert (people[b]["status"], people[b]["source_updated_at"]) == ("deleted", at(now + 4))
    assert (money[p]["status"], money[p]["source_updated_at"]) == ("voided", at(now + 7))
    assert (money[new]["status"], money[new]["source_updated_at"]) == ("deleted", at(now + 10))
    assert (money[q]["status"], money[kept]["invoice_ids"]) == ("deleted", [owed_two])
