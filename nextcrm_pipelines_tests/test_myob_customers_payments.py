"""MYOB customers, customer payments and invoice lines, synced from the emulator over real HTTP into Postgres, beyond
the per-entity contract (`test_entity_contract.py`): invoices carry their lines, read from their layout's endpoint;
payments name the invoices they pay and the customer they come from, and add up to what each invoice was paid;
inactive cards are flagged by the day's sync while the cards and payments MYOB deletes without a trace are flagged
by the id sweep, with their last data, and a deleted payment's invoices owe again; no name, email or phone reaches
a log. Revision 0017 rebuilds `myob_invoices` with its new column in place and keeps its rows.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import db
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.runner import day_window, sweep_connection, sync_partitions
from nextcrm_pipelines.core.sync import SyncResult
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    Account,
    Profile,
    assert_mirror_equals_export,
    connect_account,
    mirror,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

TENANT = {"invoices": 120, "customers": 40, "days": 6, "requests_per_second": 0}
CUSTOMERS = Profile("myob", "myob_customers", "customer", "UID", None, {**TENANT, "invoices": 30, "customers": 120})
PAYMENTS = Profile("myob", "myob_customer_payments", "payment", "UID", None, {**TENANT, "invoices": 220})
INVOICES = PROFILES["myob_invoices"]
ENTITIES = ("myob_invoices", "myob_customers", "myob_customer_payments")


def sync(database_url: str, schema: str, account: Account, days: list, entity: str | None = None) -> list[SyncResult]:
    results = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("myob"),
                              entity_name=entity or account.profile.entity, connection_id=account.connection.id,
                              windows=[day_window(d) for d in days])  # fmt: skip
    assert all(r.status == "success" for r in results), [r.error for r in results if r.error]
    return results


def history(sandbox, account: Account) -> list:
    return days_back(sandbox_now(sandbox).date(), account.profile.tenant["days"] + 1)


def test_invoices_carry_their_lines_read_from_each_layouts_endpoint(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, INVOICES, invoices=60, customers=10, days=2)
    paths_before = dict(account.control.stats()["by_path"])
    sync(database_url, schema, account, days_back(sandbox_now(sandbox).date(), 3))
    paths = {path: n - paths_before.get(path, 0) for path, n in account.control.stats()["by_path"].items()}
    rows = assert_mirror_equals_export(account, database_url, schema)
    truth = {r["UID"]: r for r in account.export()["records"]}
    assert len(rows) == 60
    for uid, raw in truth.items():
        row = rows[uid]
        assert row["raw"]["Lines"] == raw["Lines"] and row["line_items"] == len(raw["Lines"]) >= 1
        assert row["invoice_type"] == raw["InvoiceType"] and "InvoiceType" not in row["raw"]
    assert {row["invoice_type"] for row in rows.values()} >= {"Service", "Item", "Professional"}
    # Read layout by layout (4 days x 5 layouts); the generic listing, which omits lines, was not asked.
    assert paths.get("GET /accountright/{cf}/Sale/Invoice/{layout}") == 20
    assert not paths.get("GET /accountright/{cf}/Sale/Invoice")


def test_payments_link_the_invoices_they_pay_and_their_customer(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PAYMENTS, invoices=300, customers=15)
    for entity in ENTITIES:
        sync(database_url, schema, account, history(sandbox, account), entity)
    payments = assert_mirror_equals_export(account, database_url, schema)
    truth = {r["UID"]: r for r in account.export()["records"]}
    for uid, raw in truth.items():
        row = payments[uid]
        assert row["invoice_ids"] == [line["UID"] for line in raw["Invoices"]]
        assert (row["customer_id"], row["receipt_number"]) == (raw["Customer"]["UID"], raw["ReceiptNumber"])
        assert row["payment_date"] == datetime.fromisoformat(raw["Date"]).date()
        assert row["currency"] == (raw["ForeignCurrency"] or {}).get("Code")
    assert any(len(row["invoice_ids"]) > 1 for row in payments.values())
    assert any(row["currency"] for row in payments.values()) and any(not row["currency"] for row in payments.values())
    with psycopg.connect(database_url) as conn:
        unlinked = conn.execute(
            sql.SQL("SELECT p.id FROM {p} p CROSS JOIN unnest(p.invoice_ids) AS i(id) LEFT JOIN {i} v"
                    " ON v.connection_id = p.connection_id AND v.id = i.id WHERE p.connection_id = %s"
                    " AND v.id IS NULL").format(p=table("myob_customer_payments", schema),
                                                i=table("myob_invoices", schema)),
            (account.connection.id,),
        ).fetchall()  # fmt: skip
        # An invoice's payments add up to what has been paid on it.
        unpaid = conn.execute(
            sql.SQL("SELECT v.id FROM {i} v JOIN LATERAL (SELECT sum((l->>'AmountApplied')::numeric) AS paid"
                    " FROM {p} p, jsonb_array_elements(p.raw->'Invoices') l WHERE p.connection_id = v.connection_id"
                    " AND p.invoice_ids @> ARRAY[v.id] AND l->>'UID' = v.id) s ON true WHERE v.connection_id = %s"
                    " AND v.status <> 'Credit' AND (v.raw->>'TotalAmount')::numeric"
                    " - (v.raw->>'BalanceDueAmount')::numeric <> coalesce(s.paid, 0)").format(
                        p=table("myob_customer_payments", schema), i=table("myob_invoices", schema)),
            (account.connection.id,),
        ).fetchall()  # fmt: skip
    assert unlinked == [] and unpaid == []
    customers = mirror(database_url, schema, "myob_customers", account.connection.id)
    assert all(row["customer_id"] in customers for row in payments.values())


def test_inactive_cards_are_flagged_by_the_sync_and_hard_deletes_by_the_id_sweep(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PAYMENTS, invoices=150, customers=20, days=3)
    connection = account.connection.id
    days = history(sandbox, account)
    for entity in ENTITIES:
        sync(database_url, schema, account, days, entity)
    account.control.changes(account.tenant_id, customer_creates=3)
    sync(database_url, schema, account, days[-1:], "myob_customers")
    before = {entity: mirror(database_url, schema, entity, connection) for entity in ENTITIES}
    changed = account.control.changes(account.tenant_id, archives=2, customer_deletes=2, payment_deletes=3)
    today = days[-1:]
    for entity in ENTITIES:
        sync(database_url, schema, account, today, entity)
    customers = mirror(database_url, schema, "myob_customers", connection)
    for uid in changed["archived"]:
        assert (customers[uid]["status"], customers[uid]["deleted"]) == ("Inactive", True)
        assert not before["myob_customers"][uid]["deleted"]
    # Hard deletes leave nothing to sync: the rows stand until the sweep confirms each one is gone.
    gone = {"myob_customers": changed["customers_deleted"], "myob_customer_payments": changed["payments_deleted"]}
    for entity, ids in gone.items():
        assert ids and not any(mirror(database_url, schema, entity, connection)[i]["deleted"] for i in ids)
        swept = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("myob"),
                                 entity_name=entity, connection_id=connection)  # fmt: skip
        assert swept.counts.updated == len(ids)
        rows = assert_mirror_equals_export(dataclasses.replace(account, profile=dataclasses.replace(
            account.profile, entity=entity, export={"myob_customers": "customer"}.get(entity, "payment"))),
            database_url, schema)  # fmt: skip
        for uid in ids:
            assert rows[uid]["deleted"] and rows[uid]["raw"] == before[entity][uid]["raw"]
    assert {
        customers_row["status"]
        for uid, customers_row in mirror(database_url, schema, "myob_customers", connection).items()
        if uid in gone["myob_customers"]
    } == {"Deleted"}
    # A deleted payment's amounts are owing again: its invoices changed today and say so.
    invoices = mirror(database_url, schema, "myob_invoices", connection)
    reopened = {i for uid in changed["payments_deleted"] for i in before["myob_customer_payments"][uid]["invoice_ids"]}
    for uid in reopened:
        assert invoices[uid]["balance_due"] > before["myob_invoices"][uid]["balance_due"]
        assert invoices[uid]["source_updated_at"] > before["myob_invoices"][uid]["source_updated_at"]
    again = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("myob"),
                             entity_name="myob_customer_payments", connection_id=connection)  # fmt: skip
    assert again.counts.updated == 0


def test_names_emails_and_phones_never_reach_logs_or_sync_logs(database_url, schema, box, sandbox, caplog):
    account = connect_account(sandbox, database_url, box, CUSTOMERS, invoices=20, customers=40, days=2)
    caplog.set_level(logging.DEBUG)
    try:
        account.control.set_faults(tenant=account.tenant_id, server_errors=1)  # one retried 5xx
        sync(database_url, schema, account, history(sandbox, account), "myob_customers")
        sync(database_url, schema, account, history(sandbox, account), "myob_customer_payments")
        # One the client gives up on: its error is logged and stored in the sync log.
        account.control.set_faults(tenant=account.tenant_id, server_errors=100)
        (failed,) = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("myob"),
                                    entity_name="myob_customers", connection_id=account.connection.id,
                                    windows=[day_window(history(sandbox, account)[-1])])  # fmt: skip
        assert failed.status == "failed"
    finally:
        account.control.clear_faults(tenant=account.tenant_id)
    cards = account.export()["records"]
    personal = {value for card in cards for address in card["Addresses"]
                for value in (address["Email"], address["Phone1"], address["Street"])} | {
        value for card in cards for value in (card["CompanyName"], card["LastName"]) if value}  # fmt: skip
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(sql.SQL("SELECT coalesce(string_agg(error, ' '), '') FROM {}").format(
            table("integration_sync_logs", schema))).fetchone()[0]  # fmt: skip
    said = caplog.text + logged
    assert len(personal) > 40 and "myob" in said
    assert not [value for value in personal if value in said]


def test_revision_0017_rebuilds_myob_invoices_with_line_items_and_keeps_their_rows(database_url, schema, box):
    # A schema left at revision 0016 with two stored invoices, one read with its lines.
    name = f"{schema}_old"
    db.upgrade(database_url, name, revision="0016")
    try:
        with psycopg.connect(database_url) as conn:
            conn.execute(sql.SQL("INSERT INTO {} (id, provider, display_name) VALUES ('myob-a', 'myob', 'A')").format(
                table("integration_connections", name)))  # fmt: skip
            for uid, raw in (("u1", '{"UID": "u1", "Lines": [{"RowID": 1}, {"RowID": 2}]}'), ("u2", '{"UID": "u2"}')):
                conn.execute(
                    sql.SQL("INSERT INTO {} (connection_id, id, status, source_updated_at, raw, raw_hash, synced_at)"
                            " VALUES ('myob-a', %s, 'Open', '2026-01-02T03:04:05Z', %s, '\\x00', "
                            "'2026-01-03T00:00:00Z')").format(table("myob_invoices", name)),
                    (uid, raw),
                )  # fmt: skip
        db.upgrade(database_url, name)
        assert db.schema_differences(database_url, name) == []
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(sql.SQL("SELECT id, line_items, status, synced_at FROM {} ORDER BY id").format(
                table("myob_invoices", name))).fetchall()  # fmt: skip
            assert rows == [("u1", 2, "Open", datetime(2026, 1, 3, tzinfo=UTC)),
                            ("u2", None, "Open", datetime(2026, 1, 3, tzinfo=UTC))]  # fmt: skip
            # The rebuilt table is checked like every entity table: a row needs its connection.
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute(
                    sql.SQL("INSERT INTO {} (connection_id, id, status, source_updated_at, raw, raw_hash) VALUES"
                            " ('nobody', 'u3', 'Open', now(), '{{}}', '\\x00')").format(table("myob_invoices", name))
                )  # fmt: skip
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
