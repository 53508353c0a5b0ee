"""Xero's entities in the per-entity contract suite: `xero_payments`.

A day is read by `If-Modified-Since` and the same day's `UpdatedDateUTC` bound. Xero keeps a deleted payment
readable with status DELETED and a newer `UpdatedDateUTC`, so a deletion reaches the mirror with the day's sync
and the row stays, flagged. Organisations are connected through the real OAuth flow.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from nextcrm_pipelines_tests.accounting import PROFILES, connect_account, decimal_of
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth

PAYMENTS = PROFILES["xero_payments"]


def _open_payments(env: Env, records: int, days: int, page_size: int) -> Account:
    # About one invoice in two is paid (some in parts): enough invoices for `records` payments.
    connected = connect_account(env.server, env.database_url, env.box, PAYMENTS, settings={"page_size": page_size},
                                invoices=records * 5 // 2, contacts=20, days=days)  # fmt: skip
    return Account(env, connected.connection, days, connected)


def _payment(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """A DELETED payment is flagged; its status, amount, currency and the invoice and contact it pays as served."""
    paid = raw.get("Invoice") or raw.get("CreditNote") or {}
    return (raw["Status"] == "DELETED", raw["Status"], decimal_of(raw.get("Amount")), paid.get("CurrencyCode"),
            paid.get("InvoiceID") or paid.get("CreditNoteID"), (paid.get("Contact") or {}).get("ContactID"),
            (raw.get("Account") or {}).get("AccountID"))  # fmt: skip


def _payment_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["deleted"], row["status"], row["amount"], row["currency"], row["invoice_id"], row["contact_id"],
            row["account_id"])  # fmt: skip


def _payments_truth(account: Account) -> Truth:
    export = account.handle.export("payments")
    return Truth({raw["PaymentID"]: _payment(raw) for raw in export["records"]},
                 frozenset(str(i) for i in export.get("deleted_ids", [])))  # fmt: skip


def _payment_at_midnight(account: Account, midnight: datetime) -> str:
    record = account.handle.control.add_record(account.handle.tenant_id, "payment", updated_at=midnight.timestamp())
    return record["PaymentID"]


def _delete_payments(account: Account) -> list[str]:
    """Delete two authorised payments (their invoices owe the amounts again)."""
    return account.handle.control.changes(account.handle.tenant_id, payment_deletes=2)["payments_deleted"]


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    control, tenant = account.handle.control, account.handle.tenant_id
    control.set_faults(tenant=tenant, server_errors=server_errors, rate_limited=rate_limited)
    try:
        yield
    finally:
        control.clear_faults(tenant=tenant)


CASES = [
    EntityCase(provider="xero", entity="xero_payments", open=_open_payments, truth=_payments_truth,
               row=_payment_row, remove=_delete_payments, faults=_faults, at_midnight=_payment_at_midnight,
               records=50, days=3),
]  # fmt: skip
