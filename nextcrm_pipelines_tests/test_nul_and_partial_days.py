"""Provider strings holding NUL land with it removed, and the hourly schedule re-reads days left partial."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import stripe
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.sync import SyncWindow, sync_entity
from nextcrm_pipelines.providers.stripe import PAYMENTS
from nextcrm_pipelines_tests.helpers import mirror_rows, sandbox_now, sync_days


def _sync_log(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT status, failed_records, error FROM {} ORDER BY id").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()


def test_a_charge_whose_description_holds_nul_lands_without_it(database_url, schema, sandbox, stripe_account,
                                                               stripe_connection):  # fmt: skip
    key = stripe_account(charges=40, subscriptions=2, days=1)
    connection = stripe_connection(key)
    client = stripe.StripeClient(key, base_addresses={"api": sandbox.url}, max_network_retries=0)
    charge = client.v1.charges.create({"amount": 1250, "currency": "usd", "description": "Gift\x00card \x00#7"})
    assert charge.description == "Gift\x00card \x00#7"  # the emulator keeps the NUL, as Stripe would

    (result,) = sync_days(database_url, schema, connection.id, "stripe_payments", [sandbox_now(sandbox).date()])

    assert result.status == "success" and result.counts.failed == 0
    stored = dict(mirror_rows(database_url, schema, "stripe_payments", "id, description"))
    assert stored[charge.id] == "Giftcard #7"
    with psycopg.connect(database_url) as conn:
        raw_description, raw_text = conn.execute(
            sql.SQL("SELECT raw->>'description', raw::text FROM {} WHERE id = %s").format(
                table("stripe_payments", schema)
            ),
            (charge.id,),
        ).fetchone()
    assert raw_description == "Giftcard #7" and "\\u0000" not in raw_text
    assert _sync_log(database_url, schema) == [("success", 0, None)]

    # The stored copy is what the provider's record becomes every time: a re-read leaves it alone.
    (again,) = sync_days(database_url, schema, connection.id, "stripe_payments", [sandbox_now(sandbox).date()])
    assert again.status == "success" and again.counts.updated == 0 and again.counts.inserted == 0


def test_nul_is_removed_from_keys_and_nested_strings_and_an_escaped_backslash_is_kept(database_url, schema,
                                                                                      stripe_connection):  # fmt: skip
    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    good = [{"id": f"ch_{i}", "object": "charge", "amount": 100 + i, "currency": "eur", "status": "succeeded",
             "created": int(t0.timestamp()) + i, "description": f"order {i}"} for i in range(30)]  # fmt: skip
    nul = {**good[0], "id": "ch_nul", "description": "a\x00b", "customer": "cus_\x001",
           "metadata": {"no\x00te": ["x\x00", {"deep": "\x00\x00y"}], "path": "C:\\u0000"}}  # fmt: skip
    with psycopg.connect(database_url) as conn:
        result = sync_entity(conn=conn, schema=schema, provider="stripe", entity=PAYMENTS,
                             connection_id=connection.id, window=SyncWindow(t0, t0 + timedelta(days=1)),
                             pages=[[(r, t0) for r in [*good[:15], nul, *good[15:]]]],
                             stats=RequestStats())  # fmt: skip
        raw, description, customer = conn.execute(
            sql.SQL("SELECT raw, description, customer_id FROM {} WHERE id = 'ch_nul'").format(
                table("stripe_payments", schema)
            )
        ).fetchone()
    assert result.status == "success" and result.counts.inserted == 31 and result.counts.failed == 0
    assert (description, customer) == ("ab", "cus_1")
    # The literal text backslash-u0000 is no NUL: it is kept as it came.
    assert raw["metadata"] == {"note": ["x", {"deep": "y"}], "path": "C:\\u0000"}
    assert len(mirror_rows(database_url, schema, "stripe_payments", "id")) == 31
