"""PayPal deliveries checked against the app-wide `PAYPAL_WEBHOOK_ID` reach only their own merchant's connection.

A connection without a `webhook_id` of its own accepts any delivery signed for the environment's webhook
id, so a genuine delivery of one merchant's event can be posted to another connection's URL. End to end
against the sandbox (a real signed delivery, the receiver, the sensor and the apply run): the event is
applied only to the connection of the merchant it belongs to, found by reading it back from PayPal's
webhook events API with the connection's own app, or from the capture's payee when the connection names
its merchant; elsewhere it is processed and skipped. A connection with its own webhook id asks nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.providers.paypal.webhooks import _merchant_named
from nextcrm_pipelines.webhooks.app import receiver_url
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer

SPEC = {"seed": 7, "transactions": 4, "subscriptions": 0, "days": 1, "requests_per_minute": 0}
EVENT_READS = "GET /v1/notifications/webhooks-events/{id}"


class Recorder:
    """A loopback HTTP endpoint that keeps each delivery it is sent (body and headers) and answers 200."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, dict[str, str]]] = []
        self.arrived = threading.Event()
        kept, arrived = self.deliveries, self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                kept.append((body, {k: v for k, v in self.headers.items() if k.lower().startswith("paypal-")}))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    found = Recorder()
    yield found
    found.close()


@pytest.fixture
def merchant(database_url, schema, box):
    """Factory: a sandbox merchant app and a vault connection to it, trusting the sandbox's webhook CA, with no
    webhook id of its own unless given; `named` sets the connection's external tenant to the merchant id."""

    def make(server: SandboxServer, *, named: bool = False, webhook_id: str | None = None) -> tuple[str, Connection]:
        control = PayPalControl(server)
        client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
        account_id = control.add_account(client_id, secret, **SPEC)["id"]
        secrets = {"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"}
        if webhook_id:
            secrets["webhook_id"] = webhook_id
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(
                conn, provider="paypal", display_name=f"PayPal {uuid.uuid4().hex[:8]}", box=box, secrets=secrets,
                external_tenant=account_id if named else None, base_url=f"{server.url}/paypal",
                settings={"requests_per_second": 0, "mode": "sandbox", "webhook_ca_pem": control.webhook_ca()},
            )  # fmt: skip
        return account_id, connection

    return make


def _capture_delivery(server: SandboxServer, account_id: str, recorder: Recorder, webhook_id: str) -> tuple:
    """A capture made in the merchant's account, delivered by the sandbox signed for `webhook_id`:
    (transaction id, body, PAYPAL-* headers)."""
    control = PayPalControl(server)
    control.subscribe_webhooks(account_id, recorder.url, webhook_id, event_types=["PAYMENT.CAPTURE.COMPLETED"])
    fields = {"transaction_event_code": "T0006", "transaction_status": "S",
              "transaction_amount": {"currency_code": "USD", "value": "42.00"}}  # fmt: skip
    txn = control.add_record(account_id, "transaction", fields)["transaction_info"]["transaction_id"]
    assert recorder.arrived.wait(10)  # not flush_webhooks: the shared sandbox may hold other tests' deliveries
    assert len(recorder.deliveries) == 1
    body, headers = recorder.deliveries[0]
    return txn, body, headers


def _payment_ids(database_url: str, schema: str, connection_id: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT id FROM {} WHERE connection_id = %s").format(table("paypal_payments", schema)),
                (connection_id,),
            )
        }


def _statuses(database_url: str, schema: str) -> dict[str, list[str]]:
    """Inbox statuses per connection."""
    with psycopg.connect(database_url) as conn:
        found: dict[str, list[str]] = {}
        for connection_id, status in conn.execute(
            sql.SQL("SELECT connection_id, status FROM {} WHERE provider = 'paypal' ORDER BY id").format(
                table("webhook_events", schema)
            )
        ):
            found.setdefault(connection_id, []).append(status)
        return found


def _event_reads(server: SandboxServer) -> tuple[int, int]:
    """(reads of a webhook event, 404 answers) the sandbox has served so far."""
    stats = PayPalControl(server).stats()
    return stats["by_route"].get(EVENT_READS, 0), stats["by_status"].get("404", 0)


def _post_to(base: str, connection: Connection, body: bytes, headers: dict[str, str]) -> int:
    target = receiver_url(base, "paypal", connection.id)
    return httpx.post(target, content=body, headers={"content-type": "application/json", **headers},
                      timeout=30).status_code  # fmt: skip


def test_a_delivery_posted_to_another_merchants_url_is_skipped_there(
    database_url, schema, box, sandbox, merchant, recorder, monkeypatch, caplog
):
    webhook_id = "WH" + uuid.uuid4().hex[:15].upper()
    monkeypatch.setenv("PAYPAL_WEBHOOK_ID", webhook_id)
    owner_account, owner = merchant(sandbox)
    _, other = merchant(sandbox)
    txn, body, headers = _capture_delivery(sandbox, owner_account, recorder, webhook_id)
    reads = _event_reads(sandbox)
    with receiver(database_url, schema, box) as base, dg.instance_for_test() as instance:
        assert _post_to(base, other, body, headers) == 200  # the app-wide webhook id verifies it anywhere
        assert _post_to(base, owner, body, headers) == 200
        with caplog.at_level(logging.WARNING, logger="nextcrm_pipelines.providers.paypal.webhooks"):
            assert len(tick_and_apply(instance, "paypal")) == 1
    assert _payment_ids(database_url, schema, owner.id) == {f"{txn}:T0006"}
    assert _payment_ids(database_url, schema, other.id) == set()
    assert _statuses(database_url, schema) == {other.id: ["processed"], owner.id: ["processed"]}
    # Each connection asked PayPal with its own app: the owner's found the event, the other's did not.
    assert _event_reads(sandbox) == (reads[0] + 2, reads[1] + 1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(other.id in m and "1 event" in m for m in warned), warned
    event_id = orjson.loads(body)["id"]
    assert not any(owner.id in m or owner_account in m or txn in m or event_id in m for m in warned), warned


def test_the_payee_decides_without_asking_paypal_when_the_connection_names_its_merchant(
    database_url, schema, box, sandbox, merchant, recorder, monkeypatch
):
    webhook_id = "WH" + uuid.uuid4().hex[:15].upper()
    monkeypatch.setenv("PAYPAL_WEBHOOK_ID", webhook_id)
    owner_account, owner = merchant(sandbox, named=True)
    _, other = merchant(sandbox, named=True)
    txn, body, headers = _capture_delivery(sandbox, owner_account, recorder, webhook_id)
    reads = _event_reads(sandbox)
    with receiver(database_url, schema, box) as base, dg.instance_for_test() as instance:
        assert _post_to(base, other, body, headers) == 200
        assert _post_to(base, owner, body, headers) == 200
        assert len(tick_and_apply(instance, "paypal")) == 1
    assert _payment_ids(database_url, schema, owner.id) == {f"{txn}:T0006"}
    assert _payment_ids(database_url, schema, other.id) == set()
    assert _statuses(database_url, schema) == {other.id: ["processed"], owner.id: ["processed"]}
    assert _event_reads(sandbox) == reads


def test_a_connection_with_its_own_webhook_id_applies_without_asking_paypal(
    database_url, schema, box, sandbox, merchant, recorder, monkeypatch
):
    monkeypatch.setenv("PAYPAL_WEBHOOK_ID", "WH" + uuid.uuid4().hex[:15].upper())
    own = "WH" + uuid.uuid4().hex[:15].upper()
    account_id, connection = merchant(sandbox, webhook_id=own)
    txn, body, headers = _capture_delivery(sandbox, account_id, recorder, own)
    reads = _event_reads(sandbox)
    with receiver(database_url, schema, box) as base, dg.instance_for_test() as instance:
        assert _post_to(base, connection, body, headers) == 200
        assert len(tick_and_apply(instance, "paypal")) == 1
    assert _payment_ids(database_url, schema, connection.id) == {f"{txn}:T0006"}
    assert _event_reads(sandbox) == reads


@pytest.mark.parametrize(
    ("event", "merchant"),
    [
        ({"event_type": "PAYMENT.CAPTURE.COMPLETED", "resource_type": "capture",
          "resource": {"id": "C1", "payee": {"merchant_id": "M1"}}}, "M1"),
        ({"event_type": "PAYMENT.CAPTURE.REFUNDED", "resource_type": "refund",
          "resource": {"id": "R1", "payer": {"merchant_id": "M2"}, "payee": {"merchant_id": "M9"}}}, "M2"),
        ({"event_type": "PAYMENT.CAPTURE.COMPLETED", "resource": {"id": "C2", "payee": {"email_address": "x"}}}, None),
        ({"event_type": "PAYMENT.SALE.COMPLETED", "resource": {"id": "S1", "payee": {"merchant_id": "M1"}}}, None),
        ({"event_type": "BILLING.SUBSCRIPTION.UPDATED", "resource": {"id": "I-1"}}, None),
    ],
)  # fmt: skip
def test_the_merchant_a_capture_or_its_refund_names(event: dict[str, Any], merchant: str | None) -> None:
    assert _merchant_named(event) == merchant
