"""Xero webhooks end to end: sandbox change → signed thin event → receiver → inbox → sensor tick →
apply run (re-read by id) → table.

A connection made through the sandbox's OAuth flow and synced is then kept current by webhooks alone:
payments, voids, new invoices and archived contacts land as a sync would write them, an invoice Xero
no longer knows is flagged deleted, duplicated and newest-first deliveries end in the same row as one
in-order delivery, and an event of another organisation of the same app changes nothing. Subscribing
runs Xero's intent-to-receive check against the real receiver, which a wrong webhook key fails.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.webhooks.app import receiver_url
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    Account,
    assert_mirror_equals_export,
    connect_account,
    mirror,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply
from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.xero.webhooks import XERO_RETRY_DELAYS

KEY = "xero-webhook-key-" + "k" * 40
TENANT = {"seed": 21, "invoices": 40, "contacts": 10, "days": 3, "minute_window_seconds": 2}
QUICK_RETRIES = [0.1, 0.2]


@dataclass
class Hooked:
    """A connected sandbox organisation whose app's webhook can be pointed at our running receiver."""

    account: Account
    receiver: str
    instance: dg.DagsterInstance
    database_url: str
    schema: str

    @property
    def control(self) -> Any:
        return self.account.control

    @property
    def tenant_id(self) -> str:
        return self.account.tenant_id

    @property
    def connection_id(self) -> str:
        return self.account.connection.id

    def subscribe(self, key: str = KEY, **knobs: Any) -> dict[str, Any]:
        url = receiver_url(self.receiver, "xero", self.connection_id)
        return self.control.subscribe_webhooks(self.account.client_id, url, key, retry_delays=QUICK_RETRIES, **knobs)

    def sync(self, sandbox: SandboxServer, entity: str = "xero_invoices") -> dict[str, dict[str, Any]]:
        today = sandbox_now(sandbox).date()
        results = sync_days(self.database_url, self.schema, self.connection_id, entity, days_back(today, 4))
        assert all(r.status == "success" for r in results)
        return self.rows(entity)

    def rows(self, entity: str = "xero_invoices") -> dict[str, dict[str, Any]]:
        return mirror(self.database_url, self.schema, entity, self.connection_id)

    def requests(self) -> int:
        """Accounting API calls the sandbox answered for this organisation so far."""
        return self.control.stats()["tenants"][self.tenant_id]["requests"]

    def inbox(self) -> list[tuple[str, str, str]]:
        """(event type, status, resource id) of this connection's inbox rows, in arrival order."""
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(
                sql.SQL("SELECT event_type, status, payload->>'resourceId' FROM {} WHERE connection_id = %s "
                        "ORDER BY id").format(table("webhook_events", self.schema)),
                (self.connection_id,),
            ).fetchall()  # fmt: skip


def deliver_and_apply(hook: Hooked) -> list[dg.RunRequest]:
    """Wait for every queued delivery, then one sensor tick and the runs it requests."""
    assert hook.control.flush_webhooks()
    requests = tick_and_apply(hook.instance, "xero")
    runs = hook.instance.get_runs()
    assert runs and all(run.is_success for run in runs)
    return requests


def store_webhook_key(database_url: str, schema: str, box: SecretBox, connection_id: str, key: str) -> None:
    """Add the app's webhook key to the connection's encrypted secrets (what the receiver verifies with)."""
    with psycopg.connect(database_url) as conn:
        secrets = dict(vault.load_secrets(conn, connection_id, box).reveal())
        conn.execute(
            sql.SQL("UPDATE {} SET secrets_encrypted = %s WHERE id = %s").format(
                table("integration_connections", schema)
            ),
            (box.encrypt(connection_id, {**secrets, "webhook_key": key}), connection_id),
        )


@pytest.fixture
def hooked(database_url: str, schema: str, box: SecretBox, sandbox: SandboxServer) -> Iterator[Any]:
    """Factory: a new app and organisation connected through OAuth, its webhook key stored, our receiver
    serving and a Dagster instance to run the sensor and apply job in."""
    with ExitStack() as stack:
        url = stack.enter_context(receiver(database_url, schema, box))
        instance = stack.enter_context(dg.instance_for_test())

        def make(**tenant: Any) -> Hooked:
            account = connect_account(sandbox, database_url, box, PROFILES["xero_invoices"], **{**TENANT, **tenant})
            store_webhook_key(database_url, schema, box, account.connection.id, KEY)
            return Hooked(account, url, instance, database_url, schema)

        yield make


def unpaid_invoices(hook: Hooked) -> list[dict[str, Any]]:
    return [i for i in hook.account.export()["records"] if i["Status"] == "AUTHORISED" and i["AmountPaid"] == 0]


def test_payments_voids_creates_and_archives_reach_the_tables_as_a_sync_would_write_them(hooked, sandbox):
    hook = hooked()
    before = hook.sync(sandbox)
    subscription = hook.subscribe()
    assert (subscription["status"], subscription["enabled"]) == ("OK", True)

    paid = unpaid_invoices(hook)[0]["InvoiceID"]
    hook.control.update_record(hook.tenant_id, paid, {"Status": "PAID"})
    (voided,) = hook.control.changes(hook.tenant_id, voids=1)["voided"]
    created = hook.control.add_record(hook.tenant_id, "invoice", {"Status": "AUTHORISED", "Reference": "hooked"})
    (archived,) = hook.control.changes(hook.tenant_id, archives=1)["archived"]
    assert len(deliver_and_apply(hook)) == 1

    rows = hook.rows()
    assert before[paid]["status"] == "AUTHORISED" and before[paid]["amount_paid"] == 0
    assert rows[paid]["status"] == "PAID" and rows[paid]["amount_due"] == 0
    assert rows[paid]["amount_paid"] == rows[paid]["total"] > 0
    assert not before[voided]["deleted"] and rows[voided]["status"] == "VOIDED" and rows[voided]["deleted"]
    assert created["InvoiceID"] not in before and rows[created["InvoiceID"]]["reference"] == "hooked"
    # Every invoice row, raw JSON included, is what the provider now holds: the webhooks left nothing behind.
    assert_mirror_equals_export(hook.account, hook.database_url, hook.schema)
    contact = hook.rows("xero_contacts")[archived]
    assert contact["status"] == "ARCHIVED" and contact["deleted"]
    assert sorted(hook.inbox()) == sorted(
        [("INVOICE.UPDATE", "processed", paid), ("INVOICE.UPDATE", "processed", voided),
         ("INVOICE.CREATE", "processed", created["InvoiceID"]), ("CONTACT.UPDATE", "processed", archived)]
    )  # fmt: skip
    assert tick_and_apply(hook.instance, "xero") == []  # nothing left due


def test_an_invoice_xero_no_longer_knows_is_flagged_deleted(hooked, sandbox):
    hook = hooked()
    before = hook.sync(sandbox)
    hook.subscribe()
    gone = unpaid_invoices(hook)[0]["InvoiceID"]
    hook.control.purge_record(hook.tenant_id, gone)
    calls = hook.requests()
    deliver_and_apply(hook)

    rows = hook.rows()
    assert not before[gone]["deleted"] and rows[gone]["deleted"]
    assert rows[gone]["status"] == before[gone]["status"]  # its last known data is kept
    assert rows[gone]["source_updated_at"] > before[gone]["source_updated_at"]
    assert hook.requests() - calls == 2  # the IDs read that lacked it, then the 404 of GET /Invoices/{id}
    assert_mirror_equals_export(hook.account, hook.database_url, hook.schema)


def test_intent_to_receive_passes_against_our_receiver_and_a_wrong_key_fails_it(hooked, caplog):
    hook = hooked()
    caplog.set_level(logging.INFO, logger="nextcrm_pipelines.webhooks.app")
    good = hook.subscribe()
    checks = good["intent_to_receive"]
    assert good["status"] == "OK" and all(c["passed"] for c in checks)
    assert {c["signed"] for c in checks} == {"correctly", "incorrectly"}  # a series mixing both
    assert {(c["signed"], c["status"]) for c in checks} == {("correctly", 200), ("incorrectly", 401)}
    assert sum(XERO_RETRY_DELAYS) / 3600 == pytest.approx(24, abs=0.5)
    assert hook.inbox() == []  # the empty-events payloads are answered, not stored
    # The check is logged as what it is: Xero's deliberately mis-signed deliveries are not an attack.
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "nextcrm_pipelines.webhooks.app"]
    assert said and all(level == logging.INFO and "intent-to-receive" in text for level, text in said), said
    assert any("answered 401 as Xero expects" in text for _, text in said)
    assert any("answered 200" in text for _, text in said)

    wrong = hook.subscribe(key="not-the-key-our-receiver-holds")
    assert (wrong["status"], wrong["enabled"]) == ("failed", False)
    assert {c["status"] for c in wrong["intent_to_receive"] if c["signed"] == "correctly"} == {401}
    assert hook.control.webhook(wrong["id"])["status"] == "failed"

    hook.control.changes(hook.tenant_id, edits=1)
    assert hook.control.flush_webhooks()
    attempts = hook.control.webhook_attempts()
    assert [a["status"] for a in attempts if a["subscription"] == good["id"]] == [200]
    assert [a for a in attempts if a["subscription"] == wrong["id"]] == []  # a failed subscription gets nothing

    fixed = hook.control.intent_to_receive(wrong["id"], key=KEY)  # the key reset to the right one
    assert (fixed["status"], fixed["enabled"]) == ("OK", True)


def test_duplicated_and_newest_first_deliveries_leave_the_row_of_one_in_order_delivery(hooked, sandbox):
    now = int(sandbox.clock())
    shuffled, in_order = hooked(now=now), hooked(now=now)  # two organisations with the same generated data
    invoice = unpaid_invoices(shuffled)[0]
    rid = invoice["InvoiceID"]
    assert rid in {i["InvoiceID"] for i in unpaid_invoices(in_order)}
    steps = [({"Reference": "first change"}, now + 10), ({"AmountPaid": invoice["Total"] / 2}, now + 20),
             ({"Status": "PAID", "Reference": "paid in full"}, now + 30)]  # fmt: skip

    held = shuffled.subscribe(hold=True)
    in_order.subscribe()
    for hook in (shuffled, in_order):
        for fields, at in steps:
            hook.control.update_record(hook.tenant_id, rid, fields, updated_at=at)
    assert shuffled.control.release_webhooks(held["id"], order="newest-first", copies=3) == 3
    calls = {hook.tenant_id: hook.requests() for hook in (shuffled, in_order)}
    deliver_and_apply(shuffled)

    delivered = [a["status"] for a in shuffled.control.webhook_attempts() if a["subscription"] == held["id"]]
    assert delivered == [200] * 9
    assert shuffled.inbox() == [("INVOICE.UPDATE", "processed", rid)] * 3  # redeliveries are no-ops in the inbox
    for hook in (shuffled, in_order):
        assert hook.requests() - calls[hook.tenant_id] == 1  # three events of one invoice: one read
    final = {hook.tenant_id: hook.rows()[rid] for hook in (shuffled, in_order)}
    for row in final.values():
        assert row["status"] == "PAID" and row["reference"] == "paid in full" and row["amount_due"] == 0
        del row["connection_id"], row["synced_at"]
    assert final[shuffled.tenant_id] == final[in_order.tenant_id]


def test_an_event_of_another_organisation_of_the_app_changes_nothing(hooked, sandbox):
    now = int(sandbox.clock())
    hook = hooked(now=now)
    before = hook.sync(sandbox)
    # A second organisation connected to the same app, with the same generated invoice ids.
    other = hook.control.add_tenant(hook.account.client_id, **{**TENANT, "now": now, "id": str(uuid.uuid4())})
    rid = next(r for r, row in before.items() if row["status"] == "AUTHORISED" and row["amount_paid"] == 0)
    hook.subscribe()
    hook.control.update_record(other["id"], rid, {"Status": "VOIDED"})
    calls = hook.requests()
    deliver_and_apply(hook)

    voided_there = {i["InvoiceID"]: i["Status"] for i in hook.control.export(other["id"], "invoices")["records"]}
    assert voided_there[rid] == "VOIDED"
    assert hook.rows() == before  # not a column changed, not even synced_at
    assert hook.requests() == calls  # and nothing was read for it
    assert hook.inbox() == [("INVOICE.UPDATE", "processed", rid)]
    with psycopg.connect(hook.database_url) as conn:
        logged = conn.execute(
            sql.SQL("SELECT status, total_records, synced_records, unchanged_records FROM {} "
                    "WHERE connection_id = %s AND partition = 'webhooks'").format(
                table("integration_sync_logs", hook.schema)),
            (hook.connection_id,),
        ).fetchall()  # fmt: skip
    assert logged == [("success", 1, 0, 1)]
