"""MYOB's entities in the per-entity contract suite: `myob_customers` and `myob_customer_payments`.

A day is read by `LastModified` (OData `$filter`, `$top`/`$skip`). A customer card made inactive (MYOB's archive)
is changed in its day, so the day's sync flags it; a hard-deleted payment leaves nothing to read, so the id
sweep flags it. (Cards MYOB deletes outright, possible only for cards no transaction uses, are swept too: see
`test_myob_customers_payments.py`.) Company files are connected through the real OAuth flow.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from nextcrm_pipelines_tests.accounting import Profile, connect_account, decimal_of
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth

TENANT = {"requests_per_second": 0}
CUSTOMERS = Profile("myob", "myob_customers", "customer", "UID", None, TENANT)
PAYMENTS = Profile("myob", "myob_customer_payments", "payment", "UID", None, TENANT)


def _open(profile: Profile, env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    connected = connect_account(env.server, env.database_url, env.box, profile, settings={"page_size": page_size},
                                days=days, **spec)  # fmt: skip
    return Account(env, connected.connection, days, connected)


def _truth(account: Account, render: Any) -> Truth:
    export = account.handle.export()
    return Truth({str(raw["UID"]): render(raw) for raw in export["records"]},
                 frozenset(str(i) for i in export.get("deleted_ids", [])))  # fmt: skip


def _at_midnight(account: Account, midnight: datetime) -> str:
    handle = account.handle
    return str(
        handle.control.add_record(handle.tenant_id, handle.profile.export, updated_at=midnight.timestamp())["UID"]
    )


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    """MYOB's 5xx come from the API (500) and from its gateway (504 GatewayTimeout): half of each kind."""
    control, tenant = account.handle.control, account.handle.tenant_id
    timeouts = server_errors // 2
    control.set_faults(tenant=tenant, server_errors=server_errors - timeouts, gateway_timeouts=timeouts,
                       rate_limited=rate_limited)  # fmt: skip
    try:
        yield
    finally:
        control.clear_faults(tenant=tenant)


# --- customers ----------------------------------------------------------------------------------------------


def _open_customers(env: Env, records: int, days: int, page_size: int) -> Account:
    return _open(CUSTOMERS, env, {"customers": records, "invoices": 20}, days, page_size)


def _customer(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """An inactive card is flagged; its names, first address's email and phone, and balance as served."""
    active = raw.get("IsActive", True) is not False
    address = (raw.get("Addresses") or [{}])[0]
    return (not active, "Active" if active else "Inactive", raw.get("DisplayID"), raw.get("CompanyName"),
            raw.get("LastName"), address.get("Email"), address.get("Phone1"), decimal_of(raw.get("CurrentBalance")),
            raw.get("RowVersion"))  # fmt: skip


def _customer_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["deleted"], row["status"], row["display_id"], row["company_name"], row["last_name"], row["email"],
            row["phone"], row["current_balance"], row["row_version"])  # fmt: skip


def _deactivate(account: Account) -> list[str]:
    """Make two active cards inactive now."""
    return account.handle.control.changes(account.handle.tenant_id, archives=2)["archived"]


# --- customer payments --------------------------------------------------------------------------------------


def _open_payments(env: Env, records: int, days: int, page_size: int) -> Account:
    # About one invoice in two is paid, some payments settling several: enough invoices for `records` payments.
    return _open(PAYMENTS, env, {"invoices": records * 3, "customers": 20}, days, page_size)


def _payment(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """Its customer, the invoices it pays, its amount (in the foreign currency when it has one) as served."""
    foreign = raw.get("ForeignCurrency")
    amount = raw["AmountReceivedForeign"] if foreign else raw["AmountReceived"]
    invoices = [str(line["UID"]) for line in raw.get("Invoices") or [] if line.get("Type", "Invoice") == "Invoice"]
    return (False, (raw.get("Customer") or {}).get("UID"), list(dict.fromkeys(invoices)), decimal_of(amount),
            (foreign or {}).get("Code"), raw.get("RowVersion"))  # fmt: skip


def _payment_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["customer_id"], row["invoice_ids"], row["amount"], row["currency"], row["row_version"]


def _delete_payments(account: Account) -> list[str]:
    """Delete two payments outright (their invoices owe the amounts again)."""
    return account.handle.control.changes(account.handle.tenant_id, payment_deletes=2)["payments_deleted"]


CASES = [
    EntityCase(provider="myob", entity="myob_customers", open=_open_customers,
               truth=lambda account: _truth(account, _customer), row=_customer_row, remove=_deactivate,
               faults=_faults, at_midnight=_at_midnight, fault_counts=(2, 1), records=60, days=3),
    EntityCase(provider="myob", entity="myob_customer_payments", open=_open_payments,
               truth=lambda account: _truth(account, _payment), row=_payment_row, remove=_delete_payments,
               faults=_faults, at_midnight=_at_midnight, deletions="sweep", fault_counts=(2, 1), records=40,
               days=3),
]  # fmt: skip
