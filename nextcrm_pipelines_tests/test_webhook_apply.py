"""Stripe webhooks end to end: signed event → receiver → inbox → sensor tick → apply run → table.

Duplicates and reordering leave the same final row as one in-order delivery (the upsert never
regresses by event time); an event that cannot be applied is kept `failed` with its error and a
backoff before it is due again, and the run that met it fails visibly.
"""

from __future__ import annotations

import time
from decimal import Decimal

import dagster as dg
import httpx
import orjson
import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines.webhooks.inbox import due_batch
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET, stripe_header
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply


def event(event_id: str, created: int, charge: dict) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": "charge.refunded", "created": created,
                         "data": {"object": charge}})  # fmt: skip


def inbox_statuses(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT event_id, status, attempts, last_error FROM {} ORDER BY id").format(
                table("webhook_events", schema)
            )
        ).fetchall()


def test_a_refund_event_reaches_the_table_through_sensor_and_run(database_url, schema, box, sandbox, stripe_account):
    key = stripe_account(charges=30, subscriptions=2, days=1)
    with psycopg.connect(database_url) as conn:
        secrets = {"api_key": key, "webhook_secret": SECRET}
        connection = vault.add_connection(conn, provider="stripe", display_name="Hooked", box=box,
                                          base_url=sandbox.url, secrets=secrets)  # fmt: skip
    sync_days(database_url, schema, connection.id, "stripe_payments", days_back(sandbox_now(sandbox).date(), 1))
    charge = next(c for c in sandbox.stripe_export(key, "charges") if c["status"] == "succeeded" and not c["refunded"])
    charge = {**charge, "object": "charge"}  # as an event's data.object carries it
    refunded = {**charge, "refunded": True, "amount_refunded": charge["amount"]}
    now = int(time.time())
    newer, older = event("evt_new", now + 5, refunded), event("evt_old", now - 5, charge)
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        target = f"{url}/webhooks/stripe/{connection.id}"

        def deliver(body: bytes) -> None:
            signed = {"Stripe-Signature": stripe_header(body)}
            assert httpx.post(target, content=body, headers=signed).status_code == 200

        # The newest event twice, applied; then an older one in a later run; then the newest again.
        deliver(newer)
        deliver(newer)
        requests = tick_and_apply(instance, "stripe")
        assert len(requests) == 1 and requests[0].run_key.startswith("stripe:")
        assert tick_and_apply(instance, "stripe") == []  # nothing due any more: the sensor requests nothing
        deliver(older)
        assert len(tick_and_apply(instance, "stripe")) == 1  # applied, but older than the stored state: no change
        deliver(newer)
        assert tick_and_apply(instance, "stripe") == []  # a redelivery is a no-op in the inbox
    assert [(e, s) for e, s, _, _ in inbox_statuses(database_url, schema)] == [("evt_new", "processed"),
                                                                             ("evt_old", "processed")]  # fmt: skip
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            sql.SQL("SELECT refunded, amount_refunded FROM {} WHERE id = %s").format(table("stripe_payments", schema)),
            (charge["id"],),
        ).fetchone()
    assert row == (True, minor_to_major(charge["amount"], charge["currency"]))
    assert isinstance(row[1], Decimal)


def test_an_event_that_cannot_be_applied_is_kept_failed_with_backoff(database_url, schema, box, sandbox):
    with psycopg.connect(database_url) as conn:
        secrets = {"api_key": "sk_test_x", "webhook_secret": SECRET}
        connection = vault.add_connection(conn, provider="stripe", display_name="Broken", box=box,
                                          base_url=sandbox.url, secrets=secrets)  # fmt: skip
    broken = event("evt_broken", int(time.time()), {"id": "ch_broken", "object": "charge", "currency": "usd"})
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        response = httpx.post(f"{url}/webhooks/stripe/{connection.id}", content=broken,
                              headers={"Stripe-Signature": stripe_header(broken)})  # fmt: skip
        assert response.status_code == 200  # stored: the apply step is where it fails
        assert len(tick_and_apply(instance, "stripe")) == 1
        runs = instance.get_runs()
        assert runs and not runs[0].is_success
    ((event_id, status, attempts, error),) = inbox_statuses(database_url, schema)
    assert (event_id, status, attempts) == ("evt_broken", "failed", 1) and "KeyError" in error
    with psycopg.connect(database_url) as conn:
        assert due_batch(conn, schema, "stripe", limit=1) is None  # not due again until its backoff has passed
