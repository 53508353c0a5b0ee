"""Xero payments in `xero_payments`, beyond the per-entity contract (`test_entity_contract.py`): each one names the
invoice it pays, that invoice's contact and its bank account, as the sandbox has it; what an invoice's authorised
payments add up to is what the invoice says it was paid; a deleted payment keeps its last data and its invoice owes
the amount again, while new payments arrive with their day. Xero sends no payment webhooks, so the sync is the
only way in. A connection authorised before payments were read (its grant lacks their scope) fails that entity
alone, saying which scope and the command that grants it, and keeps syncing its invoices and contacts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from decimal import Decimal

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.assets import SINCE_TAG
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import NotGranted
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
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
from nextcrm_pipelines_tests.outbox_helpers import account_stats

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


# What connections made before payments were read hold: invoices and contacts, not payments.
OLDER_GRANT = "offline_access accounting.invoices accounting.contacts"


def _use_older_grant(account: Account, database_url: str, box, *, recorded: bool) -> None:
    """Give the connection a token of a grant without the payments scope; `recorded`: the scope is stored as
    Xero's token answer listed it (else, as for a grant stored without it, only Xero's 401 tells)."""
    token = account.control.grant(account.client_id, scope=OLDER_GRANT, tenants=[account.tenant_id])["token"]
    secrets = {"access_token": token["access_token"], "refresh_token": token["refresh_token"],
               "expires_at": int(time.time()) + 1500, "scope": OLDER_GRANT if recorded else ""}  # fmt: skip
    with psycopg.connect(database_url) as conn:
        vault.update_secrets(conn, account.connection.id, secrets, box)


def _status(database_url: str, account: Account) -> tuple[str, str | None]:
    with psycopg.connect(database_url) as conn:
        stored = vault.get_connection(conn, account.connection.id)
    return stored.status, stored.last_error


def test_a_grant_without_the_payments_scope_fails_payments_alone_and_says_how_to_grant_it(
    database_url, schema, box, sandbox
):
    account = connect_account(sandbox, database_url, box, PAYMENTS, invoices=30, days=1)
    today = sandbox_now(sandbox).date()
    _use_older_grant(account, database_url, box, recorded=True)
    requests = account_stats(account.control, account.tenant_id)["requests"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("xero"), [account.connection.id])
        result = defs.resolve_job_def("xero_sync").execute_in_process(
            instance=instance, tags={SINCE_TAG: today.isoformat()}, raise_on_error=False,
            partition_key=dg.MultiPartitionKey({"connection": account.connection.id, "month": month_key(today)}),
        )  # fmt: skip
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failures] == ["xero_payments"]
    description = failures[0].step_failure_data.user_failure_data.description
    assert "lacks the scope accounting.payments.read" in description and "connect xero" in description
    assert "attempt" not in description  # not retried: waiting does not grant a scope
    materialized = {e.asset_key.path[-1] for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert materialized == {"xero_invoices", "xero_contacts"}
    assert mirror(database_url, schema, "xero_invoices", account.connection.id)
    assert not mirror(database_url, schema, "xero_payments", account.connection.id)
    status, error = _status(database_url, account)
    assert status == "active" and (error is None or "connect xero" in error)  # it goes on syncing the rest
    # Only the invoices and contacts were asked for: the recorded scope said payments would be refused.
    with psycopg.connect(database_url) as conn:
        logged = dict(conn.execute(
            sql.SQL("SELECT asset, status FROM {} WHERE connection_id = %s").format(
                table("integration_sync_logs", schema)), (account.connection.id,)).fetchall())  # fmt: skip
    assert logged == {"xero_invoices": "success", "xero_contacts": "success", "xero_payments": "failed"}
    assert account_stats(account.control, account.tenant_id)["requests"] - requests == 2


def test_a_payments_refusal_for_a_scope_not_on_record_fails_the_entity_and_not_the_connection(
    database_url, schema, box, sandbox
):
    account = connect_account(sandbox, database_url, box, PAYMENTS, invoices=10, days=1)
    today = sandbox_now(sandbox).date()
    _use_older_grant(account, database_url, box, recorded=False)
    with pytest.raises(NotGranted) as refused:
        sync_partitions(database_url=database_url, schema=schema, provider=get_provider("xero"),
                        entity_name="xero_payments", connection_id=account.connection.id,
                        windows=[day_window(d) for d in days_back(today, 3)])  # fmt: skip
    assert "grant does not cover this" in str(refused.value) and "connect xero" in str(refused.value)
    assert _status(database_url, account) == ("active", str(refused.value))  # the error carries its fix
    sync(database_url, schema, account, "xero_invoices", [today])  # the same token still reads invoices
