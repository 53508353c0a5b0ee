"""QuickBooks' entities in the contract suite: `quickbooks_customers` and `quickbooks_payments`.

A day is read by `MetaData.LastUpdatedTime` and its Change Data Capture: a deactivated customer comes back
inactive (QuickBooks' delete of a customer), a voided payment zeroed, and a merged customer or hard-deleted
payment only as a CDC stub, so the mirror may hold those (`gone`) only flagged deleted. Accounts are
connected through the real OAuth flow.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from nextcrm_pipelines_tests.accounting import PROFILES, connect_account, decimal_of
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth


def _open(entity: str, env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    connected = connect_account(env.server, env.database_url, env.box, PROFILES[entity],
                                settings={"page_size": page_size}, days=days, **spec)  # fmt: skip
    return Account(env, connected.connection, days, connected)


def _truth(account: Account, entity: str, render: Any) -> Truth:
    export = account.handle.export(entity)
    return Truth({str(raw["Id"]): render(raw) for raw in export["records"]},
                 frozenset(str(i) for i in export.get("deleted_ids", [])))  # fmt: skip


def _at_midnight(account: Account, entity: str, midnight: datetime) -> str:
    record = account.handle.control.add_record(account.handle.tenant_id, entity, updated_at=midnight.timestamp())
    return str(record.get("Id") or record.get("record", {}).get("Id"))


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    control, tenant = account.handle.control, account.handle.tenant_id
    control.set_faults(tenant=tenant, server_errors=server_errors, rate_limited=rate_limited)
    try:
        yield
    finally:
        control.clear_faults(tenant=tenant)


# --- customers ----------------------------------------------------------------------------------------------


def _open_customers(env: Env, records: int, days: int, page_size: int) -> Account:
    return _open("quickbooks_customers", env, {"customers": records, "invoices": 20}, days, page_size)


def _customer(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """An inactive customer (QuickBooks' delete) is flagged; email, balance and sync token as served."""
    active = raw.get("Active", True)
    email = (raw.get("PrimaryEmailAddr") or {}).get("Address")
    return (not active, "active" if active else "inactive", raw.get("DisplayName"), email,
            decimal_of(raw.get("Balance")), raw["SyncToken"])  # fmt: skip


def _customer_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["status"], row["display_name"], row["email"], row["balance"], row["sync_token"]


def _deactivate_and_merge(account: Account) -> list[str]:
    changed = account.handle.control.changes(account.handle.tenant_id, archives=1, customer_merges=1)
    return changed["archived"] + changed["customers_merged"]


# --- payments -----------------------------------------------------------------------------------------------


def _open_payments(env: Env, records: int, days: int, page_size: int) -> Account:
    # About two invoices in five are paid: enough invoices for `records` payments.
    return _open("quickbooks_payments", env, {"invoices": records * 5 // 2, "customers": 20}, days, page_size)


def _payment(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """A voided payment (zeroed, "Voided" in its note) is flagged; its customer, invoices and total as served."""
    voided = decimal_of(raw.get("TotalAmt")) == 0 and "voided" in str(raw.get("PrivateNote") or "").lower()
    invoices = [str(link["TxnId"]) for line in raw.get("Line") or [] for link in line.get("LinkedTxn") or []
                if link.get("TxnType") == "Invoice"]  # fmt: skip
    return (voided, (raw.get("CustomerRef") or {}).get("value"), list(dict.fromkeys(invoices)),
            decimal_of(raw.get("TotalAmt")), raw["SyncToken"])  # fmt: skip


def _payment_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["customer_id"], row["invoice_ids"], row["total"], row["sync_token"]


def _void_and_delete(account: Account) -> list[str]:
    changed = account.handle.control.changes(account.handle.tenant_id, payment_voids=1, payment_deletes=1)
    return changed["payments_voided"] + changed["payments_deleted"]


CASES = [
    EntityCase(provider="quickbooks", entity="quickbooks_customers", open=_open_customers,
               truth=lambda account: _truth(account, "customer", _customer), row=_customer_row,
               remove=_deactivate_and_merge, faults=_faults,
               at_midnight=lambda account, midnight: _at_midnight(account, "customer", midnight), records=60),
    EntityCase(provider="quickbooks", entity="quickbooks_payments", open=_open_payments,
               truth=lambda account: _truth(account, "payment", _payment), row=_payment_row,
               remove=_void_and_delete, faults=_faults,
               at_midnight=lambda account, midnight: _at_midnight(account, "payment", midnight), records=40),
]  # fmt: skip
