"""Stripe's entities in the contract suite: `stripe_customers` and `stripe_invoices`.

Days are the objects created in them plus the objects changed in them (the events feed), so a deletion, a
void or an uncollectible invoice reaches the mirror with the day's sync; deleted customers and deleted drafts
stay in the mirror flagged, as the sandbox's export lists them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
import stripe

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth

RECORDS = "/_sandbox/stripe/records"


def _open(env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    key = f"sk_test_{uuid.uuid4().hex}"
    body = {"api_key": key, "seed": 31, "charges": 60, "subscriptions": 8, "days": days, "requests_per_second": 0}
    env.server.control("POST", "/_sandbox/stripe/accounts", json={**body, **spec})
    with psycopg.connect(env.database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name=f"Contract {key[-6:]}", box=env.box,
                                          secrets={"api_key": key}, base_url=env.server.url,
                                          settings={"page_size": page_size})  # fmt: skip
    return Account(env, connection, days, key)


def _sdk(account: Account) -> stripe.StripeClient:
    return stripe.StripeClient(account.handle, base_addresses={"api": account.env.server.url}, max_network_retries=0)


def _record(account: Account, kind: str, at: datetime | int, params: Mapping[str, Any], **extra: Any) -> str:
    """A customer or invoice created at a given sandbox time through the emulator's own code; its id."""
    moment = at if isinstance(at, int) else int(at.timestamp())
    body = {"api_key": account.handle, "kind": kind, "at": moment, "params": dict(params), **extra}
    return account.env.server.control("POST", RECORDS, json=body)["id"]


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    account.env.server.set_stripe_faults(api_key=account.handle, server_errors=server_errors,
                                         rate_limit_burst=rate_limited)  # fmt: skip
    try:
        yield
    finally:
        account.env.server.clear_stripe_faults(api_key=account.handle)


# --- customers ----------------------------------------------------------------------------------------------


def _open_customers(env: Env, records: int, days: int, page_size: int) -> Account:
    return _open(env, {"customers": records, "invoices": 5}, days, page_size)


def _customers_truth(account: Account) -> Truth:
    """Every customer, deleted ones included (their `customer.deleted` event keeps their last data)."""
    export = account.env.server.stripe_export(account.handle, "customers")
    return Truth({c["id"]: (c["deleted"], c["email"], c["currency"]) for c in export})


def _customer_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["email"], row["currency"]


def _customer_at_midnight(account: Account, midnight: datetime) -> str:
    return _record(account, "customer", midnight, {"email": "midnight@example.com", "name": "Night Owl"})


def _delete_customers(account: Account) -> list[str]:
    live = [c["id"] for c in account.env.server.stripe_export(account.handle, "customers") if not c["deleted"]]
    account.env.server.advance_clock(5)  # the deletions are newer than anything the first sync read
    client = _sdk(account)
    for cid in live[:2]:
        client.v1.customers.delete(cid)
    return live[:2]


# --- invoices -----------------------------------------------------------------------------------------------


def _open_invoices(env: Env, records: int, days: int, page_size: int) -> Account:
    return _open(env, {"customers": 20, "invoices": records}, days, page_size)


def _invoices_truth(account: Account) -> Truth:
    """Every invoice in its current status, deleted drafts included; void, uncollectible and deleted ones
    flagged."""
    export = account.env.server.stripe_export(account.handle, "invoices")
    return Truth({
        i["id"]: (i["deleted"] or i["status"] in ("void", "uncollectible"), i["status"], i["customer"],
                  i["subscription"], minor_to_major(i["total"], i["currency"]),
                  minor_to_major(i["amount_paid"], i["currency"]))
        for i in export
    })  # fmt: skip


def _invoice_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["deleted"], row["status"], row["customer_id"], row["subscription_id"], row["total"],
            row["amount_paid"])  # fmt: skip


def _invoice_at_midnight(account: Account, midnight: datetime) -> str:
    customer = _record(account, "customer", int(midnight.timestamp()) - 3600, {"email": "midnight.bill@example.com"})
    return _record(account, "invoice", midnight, {"customer": customer}, lines=[["Midnight service", 1250, 2]])


def _close_invoices(account: Account) -> list[str]:
    """Void one open invoice, mark another uncollectible and delete a draft; a third open one is paid, which
    must leave it unflagged."""
    invoices = account.env.server.stripe_export(account.handle, "invoices")
    opened = [i["id"] for i in invoices if i["status"] == "open" and i["total"] > 0]
    drafts = [i["id"] for i in invoices if i["status"] == "draft" and not i["deleted"]]
    assert len(opened) >= 3 and drafts, "the seed must give three open invoices and a draft"
    account.env.server.advance_clock(5)
    client = _sdk(account)
    client.v1.invoices.void_invoice(opened[0])
    client.v1.invoices.mark_uncollectible(opened[1])
    client.v1.invoices.pay(opened[2])
    client.v1.invoices.delete(drafts[0])
    return [opened[0], opened[1], drafts[0]]


CASES = [
    EntityCase(provider="stripe", entity="stripe_customers", open=_open_customers, truth=_customers_truth,
               row=_customer_row, remove=_delete_customers, faults=_faults, at_midnight=_customer_at_midnight,
               records=70, days=3, fault_counts=(1, 2)),
    EntityCase(provider="stripe", entity="stripe_invoices", open=_open_invoices, truth=_invoices_truth,
               row=_invoice_row, remove=_close_invoices, faults=_faults, at_midnight=_invoice_at_midnight,
               records=60, days=3, fault_counts=(1, 2)),
]  # fmt: skip
