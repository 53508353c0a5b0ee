"""Xero payments in `xero_payments`, beyond the per-entity contract (`test_entity_contract.py`): each one names the
invoice it pays, that invoice's contact and its bank account, as the sandbox has it; what an invoice's authorised
payments add up to is what the invoice says it was paid; a deleted payment keeps its last data and its invoice owes
the amount again, while new payments arrive with their day. Xero sends no payment webhooks, so the sync is the
only way in.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal

from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    Account,
    assert_mirror_equals_export,
    connect_account,
    decimal_of,
    mirror,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

PAYMENTS = PROFILES["xero_payments"]


def sync(database_url: str, schema: str, account: Account, entity: str, days: list) -> list:
    results = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("xero"),
                              entity_name=entity, connection_id=account.connection.id,
                              windows=[day_window(d) for d in days])  # fmt: skip
    assert all(r.status == "success" for r in results), [r.error for r in results if r.error]
    return results


def test_payments_name_their_invoices_and_add_up_to_what_each_invoice_was_paid(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PAYMENTS)
    history = days_back(sandbox_now(sandbox).date(), PAYMENTS.tenant["days"] + 1)
    sync(database_url, schema, account, "xero_payments", history)
    rows = assert_mirror_equals_export(account, database_url, schema)
    records = {r["PaymentID"]: r for r in account.export()["records"]}
    assert len(rows) == len(records) > 40
    for pid, raw in records.items():
        row, paid = rows[pid], raw["Invoice"]
        assert (row["amount"], row["currency"], row["invoice_id"]) == (
            decimal_of(raw["Amount"]), paid["CurrencyCode"], paid["InvoiceID"])  # fmt: skip
        assert (row["status"], row["deleted"]) == (raw["Status"], raw["Status"] == "DELETED")
        assert row["contact_id"] == paid["Contact"]["ContactID"] and row["account_id"] == raw["Account"]["AccountID"]
        assert row["payment_type"] == {"ACCREC": "ACCRECPAYMENT", "ACCPAY": "ACCPAYPAYMENT"}[paid["Type"]]
    assert any(r["deleted"] for r in rows.values()) and any(r["currency_rate"] != 1 for r in rows.values())

    # Every authorised payment pays a mirrored invoice, and they add up to what each invoice was paid.
    sync(database_url, schema, account, "xero_invoices", history)
    invoices = mirror(database_url, schema, "xero_invoices", account.connection.id)
    paid: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows.values():
        if not row["deleted"]:
            paid[row["invoice_id"]] += row["amount"]
    assert paid and all(invoices[iid]["amount_paid"] == total for iid, total in paid.items())
    assert all(row["amount_paid"] == 0 for iid, row in invoices.items() if iid not in paid)


def test_a_deleted_payment_keeps_its_last_data_its_invoice_owes_again_and_new_ones_arrive_with_their_day(
    database_url, schema, box, sandbox
):
    account = connect_account(sandbox, database_url, box, PAYMENTS, invoices=120, days=3)
    today = sandbox_now(sandbox).date()
    for entity in ("xero_payments", "xero_invoices"):
        sync(database_url, schema, account, entity, days_back(today, 4))
    before = mirror(database_url, schema, "xero_payments", account.connection.id)
    changed = account.control.changes(account.tenant_id, payments=3, payment_deletes=3)
    assert len(changed["payments_created"]) == len(changed["payments_deleted"]) == 3
    for entity in ("xero_payments", "xero_invoices"):
        sync(database_url, schema, account, entity, [today])
    rows = assert_mirror_equals_export(account, database_url, schema)
    invoices = mirror(database_url, schema, "xero_invoices", account.connection.id)
    for pid in changed["payments_deleted"]:
        row, known = rows[pid], before[pid]
        assert (row["status"], row["deleted"], row["amount"]) == ("DELETED", True, known["amount"])
        assert not known["deleted"] and row["source_updated_at"] > known["source_updated_at"]
        # Its invoice owes that amount again.
        assert invoices[row["invoice_id"]]["status"] == "AUTHORISED" and invoices[row["invoice_id"]]["amount_due"] > 0
    for pid in changed["payments_created"]:
        assert pid not in before and rows[pid]["status"] == "AUTHORISED" and not rows[pid]["deleted"]
        assert rows[pid]["source_updated_at"].date() == today
