"""QuickBooks customers and payments changed upstream end up right in the mirror through a day's sync.

Customers deactivated (QuickBooks' delete of a customer) stay as rows flagged `inactive`; customers merged
into another, and payments hard-deleted, are known only from Change Data Capture's `Deleted` stubs and
keep their last data flagged `deleted`; voided payments are flagged; the payments link to the invoices
they pay and the customers they come from.
"""

from __future__ import annotations

import dataclasses

import psycopg
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines_tests.accounting import PROFILES, assert_mirror_equals_export, connect_account, mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days

ENTITIES = ("quickbooks_invoices", "quickbooks_customers", "quickbooks_payments")


def test_merges_deactivations_voids_and_hard_deletes_are_flagged(database_url, schema, box, sandbox):
    account = connect_account(sandbox, database_url, box, PROFILES["quickbooks_payments"], invoices=150,
                              customers=30, days=5, deleted_payment_share=0.0)  # fmt: skip
    connection = account.connection.id
    today = sandbox_now(sandbox).date()
    for entity in ENTITIES:
        assert all(r.status == "success" for r in sync_days(database_url, schema, connection, entity,
                                                            days_back(today, 6)))  # fmt: skip
    before = {entity: mirror(database_url, schema, entity, connection) for entity in ENTITIES}
    changed = account.control.changes(account.tenant_id, customer_merges=2, archives=2, payment_voids=2,
                                      payment_deletes=2)  # fmt: skip
    for entity in ENTITIES:
        results = sync_days(database_url, schema, connection, entity, [today])
        assert all(r.status == "success" for r in results), [r.error for r in results]
    rows = {entity: assert_mirror_equals_export(dataclasses.replace(account, profile=PROFILES[entity]), database_url,
                                                schema) for entity in ENTITIES}  # fmt: skip
    customers, payments = rows["quickbooks_customers"], rows["quickbooks_payments"]
    for cid in changed["archived"]:
        assert (customers[cid]["status"], customers[cid]["deleted"]) == ("inactive", True)
        assert not before["quickbooks_customers"][cid]["deleted"]
    for cid in changed["customers_merged"]:
        # Gone from every query: only Change Data Capture says so; the row keeps what we knew.
        row, known = customers[cid], before["quickbooks_customers"][cid]
        assert (row["status"], row["deleted"]) == ("deleted", True)
        assert (row["display_name"], row["email"]) == (known["display_name"], known["email"])
        assert row["source_updated_at"] > known["source_updated_at"]
    merged = set(changed["customers_merged"])
    assert not any(r["customer_id"] in merged for r in rows["quickbooks_invoices"].values() if not r["deleted"])
    for pid in changed["payments_voided"]:
        assert (payments[pid]["status"], payments[pid]["deleted"], payments[pid]["total"]) == ("voided", True, 0)
    for pid in changed["payments_deleted"]:
        row, known = payments[pid], before["quickbooks_payments"][pid]
        assert (row["status"], row["deleted"]) == ("deleted", True)
        assert (row["total"], row["invoice_ids"]) == (known["total"], known["invoice_ids"])
    # A payment names the invoices it pays and its customer, both mirrored.
    with psycopg.connect(database_url) as conn:
        unlinked = conn.execute(
            sql.SQL("SELECT p.id FROM {p} p CROSS JOIN unnest(p.invoice_ids) AS i(id) LEFT JOIN {i} v"
                    " ON v.connection_id = p.connection_id AND v.id = i.id WHERE p.connection_id = %s"
                    " AND NOT p.deleted AND v.id IS NULL").format(p=table("quickbooks_payments", schema),
                                                                  i=table("quickbooks_invoices", schema)),
            (connection,),
        ).fetchall()  # fmt: skip
    assert unlinked == []
    assert all(r["customer_id"] in customers for r in payments.values() if not r["deleted"])
    assert sum(1 for r in payments.values() if r["invoice_ids"]) > 20
