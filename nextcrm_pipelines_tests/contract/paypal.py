"""PayPal's entities in the contract suite: `paypal_plans` (billing plans) and `paypal_invoices` (Invoicing v2).

Plans have no time filter, so they are read whole on every run; PayPal never deletes a plan, and deactivating
one (`INACTIVE`) is its archive, seen by the next whole-list read. Invoices are read by the day they were
created in (plus older ones paid in it); a cancelled invoice (void) is seen by its day's read, so the cases
cancel invoices created today. Merchant apps are reached with the client credentials grant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth
from nextcrm_sandbox.paypal import PayPalControl

WHOLE_LIST = ("PayPal's plan list takes no time filter (GET /v1/billing/plans pages by number only): plans are "
              "read whole on every run")  # fmt: skip
# The statuses PayPal lets a merchant cancel an invoice from.
CANCELLABLE = frozenset({"SENT", "UNPAID", "PARTIALLY_PAID", "SCHEDULED"})


def _open(env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    control = PayPalControl(env.server)
    client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    account = control.add_account(client_id, secret, **{"seed": 17, "transactions": 40, "subscriptions": 2, "plans": 4,
                                                        "invoices": 5, "days": days, "requests_per_minute": 0,
                                                        **spec})  # fmt: skip
    settings = {"requests_per_second": 0, "mode": "sandbox", "page_size": page_size, "plans_page_size": page_size,
                "invoices_page_size": page_size}  # fmt: skip
    with psycopg.connect(env.database_url) as conn:
        connection = vault.add_connection(
            conn, provider="paypal", display_name=f"PayPal {account['id']}", box=env.box,
            base_url=f"{env.server.url}/paypal", settings=settings,
            secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"},
        )  # fmt: skip
    return Account(env, connection, days, (control, account["id"], client_id, secret))


def _export(account: Account, entity: str) -> dict[str, Any]:
    control, account_id, _, _ = account.handle
    return control.export(account_id, entity)


@contextmanager
def _api(account: Account) -> Iterator[httpx.Client]:
    """The merchant's PayPal API with a bearer token of its app."""
    base = f"{account.env.server.url}/paypal/api"
    _, _, client_id, secret = account.handle
    token = httpx.post(f"{base}/v1/oauth2/token", data={"grant_type": "client_credentials"},
                       auth=(client_id, secret)).raise_for_status().json()["access_token"]  # fmt: skip
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        yield client


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    control, account_id, _, _ = account.handle
    control.set_faults(account=account_id, server_errors=server_errors, rate_limited=rate_limited)
    try:
        yield
    finally:
        control.clear_faults(account=account_id)


def _money(value: Mapping[str, Any] | None) -> Decimal | None:
    return Decimal(str(value["value"])) if value else None


# --- plans --------------------------------------------------------------------------------------------------


def _plans_truth(account: Account) -> Truth:
    """Every plan with its regular cycle's interval and price; INACTIVE ones (archived) flagged."""
    rows = {}
    for plan in _export(account, "plans")["records"]:
        regular = next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")
        price = regular["pricing_scheme"]["fixed_price"]
        rows[plan["id"]] = (plan["status"] == "INACTIVE", plan["status"], plan["name"], plan["product_id"],
                            regular["frequency"]["interval_unit"], Decimal(price["value"]), price["currency_code"],
                            datetime.fromisoformat(plan["update_time"]))  # fmt: skip
    return Truth(rows)


def _plan_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["deleted"], row["status"], row["name"], row["product_id"], row["interval_unit"], row["price"],
            row["currency"], row["source_updated_at"])  # fmt: skip


def _deactivate_plans(account: Account) -> list[str]:
    """Deactivate two active plans as a merchant does, through the API."""
    active = [p["id"] for p in _export(account, "plans")["records"] if p["status"] == "ACTIVE"][:2]
    assert len(active) == 2, "the seed must give two active plans"
    account.env.server.advance_clock(5)  # the deactivations are newer than what the first read stored
    with _api(account) as api:
        for plan_id in active:
            assert api.post(f"/v1/billing/plans/{plan_id}/deactivate").status_code == 204
    return active


# --- invoices -----------------------------------------------------------------------------------------------


def _open_invoices(env: Env, records: int, days: int, page_size: int) -> Account:
    """An app with `records` invoices over the days, and three sent ones created now (today: to cancel)."""
    account = _open(env, {"invoices": records, "plans": 3}, days, page_size)
    control, account_id, _, _ = account.handle
    for _ in range(3):
        control.add_record(account_id, "invoice", {"status": "SENT"})
    return account


def _invoices_truth(account: Account) -> Truth:
    """Every invoice in its current status with its first recipient, amounts, dates and the PayPal
    transactions paying it; cancelled ones (void) flagged, deleted drafts gone."""
    export = _export(account, "invoices")
    rows = {}
    for inv in export["records"]:
        detail, billing = inv["detail"], inv["primary_recipients"][0]["billing_info"]
        payments = inv.get("payments") or {}
        paid_by = [t["payment_id"] for t in payments.get("transactions", [])] or None
        rows[inv["id"]] = (
            inv["status"] == "CANCELLED", inv["status"], detail["invoice_number"], billing["email_address"],
            _money(inv["amount"]), _money(inv["due_amount"]), _money(payments.get("paid_amount")),
            _money((inv.get("refunds") or {}).get("refund_amount")), detail["currency_code"],
            date.fromisoformat(detail["invoice_date"]), paid_by,
            datetime.fromisoformat(detail["metadata"]["create_time"]),
        )  # fmt: skip
    return Truth(rows, frozenset(export["deleted_ids"]))


def _invoice_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["deleted"], row["status"], row["invoice_number"], row["recipient_email"], row["amount"],
            row["due_amount"], row["paid_amount"], row["refunded_amount"], row["currency"], row["invoice_date"],
            row["payment_ids"], row["created_at"])  # fmt: skip


def _invoice_at_midnight(account: Account, midnight: datetime) -> str:
    control, account_id, _, _ = account.handle
    return control.add_record(account_id, "invoice", {"status": "SENT"}, at=int(midnight.timestamp()))["id"]


def _cancel_invoices(account: Account) -> list[str]:
    """Cancel two invoices created today (the day the deletion test reads again), as a merchant does."""
    today = datetime.fromtimestamp(account.env.server.clock(), UTC).date()
    found = [
        inv["id"] for inv in _export(account, "invoices")["records"]
        if inv["status"] in CANCELLABLE
        and datetime.fromisoformat(inv["detail"]["metadata"]["create_time"]).date() >= today
    ][:2]  # fmt: skip
    assert len(found) == 2, "the app must hold two cancellable invoices created today"
    account.env.server.advance_clock(5)
    with _api(account) as api:
        for invoice_id in found:
            assert api.post(f"/v2/invoicing/invoices/{invoice_id}/cancel", json={}).status_code == 204
    return found


CASES = [
    EntityCase(provider="paypal", entity="paypal_plans",
               open=lambda env, n, days, page_size: _open(env, {"plans": n, "invoices": 5}, days, page_size),
               truth=_plans_truth, row=_plan_row, remove=_deactivate_plans, faults=_faults,
               whole_list_reason=WHOLE_LIST, deletions="whole-list", records=30),
    EntityCase(provider="paypal", entity="paypal_invoices", open=_open_invoices, truth=_invoices_truth,
               row=_invoice_row, remove=_cancel_invoices, faults=_faults, at_midnight=_invoice_at_midnight,
               records=60, days=3),
]  # fmt: skip
