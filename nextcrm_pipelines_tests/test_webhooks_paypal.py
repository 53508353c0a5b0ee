"""PayPal webhooks over real HTTP, a real Postgres and the PayPal sandbox: signed, verified, applied.

The sandbox signs its deliveries as PayPal does (SHA256withRSA over `id|time|webhook_id|crc32`, its
certificate served from its own `/v1/notifications/certs/`, chained to a CA of its own that the
connection trusts). End to end, a capture, a refund and a subscription change made in the sandbox reach
`paypal_payments` / `paypal_subscriptions` as the rows the sync writes; held deliveries released newest
first and twice over end in the same tables as an in-order delivery. Every forged or doubtful delivery
is refused with nothing stored: a wrong signature, another connection's webhook id, a certificate URL
on a foreign host (never contacted) or over http, a certificate that is expired, misnamed or not
chained to the trust root; a signed body that is not an event is kept `dead`. Property tests check
that no small mutation of a body or of the signed headers verifies; PayPal's online check is used
when the connection asks for it.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.providers.paypal.webhooks import (
    CertSource,
    cert_source,
    check_certificate,
    signed_message,
    verify_signature,
)
from nextcrm_pipelines.webhooks.app import receiver_url
from nextcrm_pipelines.webhooks.verify import InvalidSignature
from nextcrm_pipelines_tests.helpers import sync_days
from nextcrm_pipelines_tests.test_sandbox_paypal import _conforms, _load_spec
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply
from nextcrm_sandbox.paypal import WEBHOOK_RETRY_DELAYS, PayPalControl
from nextcrm_sandbox.server import SandboxServer

PAYMENT_COLUMNS = (
    *("transaction_id", "event_code", "status", "amount", "fee", "currency", "invoice_id", "reference_id"),
    *("reference_type", "subscription_id", "created_at", "source_updated_at", "deleted"),
)
ACCOUNT = {"seed": 5, "transactions": 40, "subscriptions": 4, "days": 3, "requests_per_minute": 0}


@dataclass
class Hooked:
    """A sandbox merchant app and one vault connection to it that receives its webhooks."""

    server: SandboxServer
    control: PayPalControl
    account_id: str
    client_id: str
    secret: str
    connection: Connection
    webhook_id: str

    def target(self, receiver_base: str) -> str:
        return receiver_url(receiver_base, "paypal", self.connection.id)

    def subscribe(self, receiver_base: str, **options: Any) -> dict[str, Any]:
        return self.control.subscribe_webhooks(self.account_id, self.target(receiver_base), self.webhook_id,
                                               retry_delays=options.pop("retry_delays", [0.2, 0.5, 1.0]),
                                               **options)  # fmt: skip

    def api(self) -> httpx.Client:
        """An httpx client for the merchant's PayPal API with a bearer token."""
        base = f"{self.server.url}/paypal/api"
        token = httpx.post(f"{base}/v1/oauth2/token", data={"grant_type": "client_credentials"},
                           auth=(self.client_id, self.secret)).json()["access_token"]  # fmt: skip
        return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture
def hooked(database_url, schema, box):
    """Factory: a sandbox merchant (or another connection to an existing one) with a webhook id and the
    sandbox CA as its trust root; `settings` entries set to None are left out."""

    def make(server: SandboxServer, *, settings: dict[str, Any] | None = None, webhook_id: str | None = None,
             same_account: Hooked | None = None, name: str | None = None, **spec: Any) -> Hooked:  # fmt: skip
        control = PayPalControl(server)
        if same_account is None:
            client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
            account = control.add_account(client_id, secret, **{**ACCOUNT, **spec})
            account_id = account["id"]
        else:
            account_id, client_id, secret = same_account.account_id, same_account.client_id, same_account.secret
        webhook_id = webhook_id or "WH" + uuid.uuid4().hex[:15].upper()
        merged = {"requests_per_second": 0, "mode": "sandbox", "webhook_ca_pem": control.webhook_ca()}
        merged.update(settings or {})
        with psycopg.connect(database_url) as conn:
            connection = vault.add_connection(
                conn, provider="paypal", display_name=name or f"PayPal {uuid.uuid4().hex[:8]}", box=box,
                secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials",
                         "webhook_id": webhook_id},
                base_url=f"{server.url}/paypal", settings={k: v for k, v in merged.items() if v is not None},
            )  # fmt: skip
        return Hooked(server, control, account_id, client_id, secret, connection, webhook_id)

    return make


def payments(database_url: str, schema: str, connection_id: str) -> dict[str, dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(
            sql.SQL("SELECT id, payer_email, raw, " + ", ".join(PAYMENT_COLUMNS) + " FROM {} WHERE connection_id = %s")
            .format(table("paypal_payments", schema)),
            (connection_id,),
        )  # fmt: skip
        names = [d.name for d in cur.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def table_rows(database_url: str, schema: str, name: str, connection_id: str) -> list[tuple]:
    """Every column of a connection's rows but the connection and the write time, by id."""
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(
            sql.SQL("SELECT * FROM {} WHERE connection_id = %s ORDER BY id").format(table(name, schema)),
            (connection_id,),
        )
        keep = [i for i, d in enumerate(cur.description) if d.name not in ("connection_id", "synced_at")]
        return [tuple(row[i] for i in keep) for row in cur.fetchall()]


def post(target: str, body: bytes, headers: dict[str, str]) -> int:
    return httpx.post(target, content=body, headers={"content-type": "application/json", **headers},
                      timeout=30).status_code  # fmt: skip


def webhook_event(resource_id: str = "0VF52814937998046", event_id: str | None = None) -> bytes:
    return orjson.dumps({
        "id": event_id or f"WH-{uuid.uuid4().hex[:17].upper()}-{uuid.uuid4().hex[:17].upper()}",
        "event_version": "1.0", "create_time": "2026-11-26T10:00:00Z", "resource_type": "checkout-order",
        "event_type": "CHECKOUT.ORDER.APPROVED", "summary": "An order has been approved by buyer",
        "resource": {"id": resource_id, "status": "APPROVED"},
    })  # fmt: skip


def cert_fetches(control: PayPalControl) -> int:
    return control.stats()["by_route"].get("GET /v1/notifications/certs/{name}", 0)


# --- end to end ----------------------------------------------------------------------------------------------


def test_sandbox_changes_reach_the_tables_through_signed_webhooks(database_url, schema, box, own_sandbox, hooked):
    shop = hooked(own_sandbox)
    api = shop.api()
    # The receiver keeps the sandbox's time, which the test moves: PayPal's transmission times follow it.
    with receiver(database_url, schema, box, clock=own_sandbox.clock) as base, dg.instance_for_test() as instance:
        shop.subscribe(base)
        capture = shop.control.add_record(shop.account_id, "transaction", {
            "transaction_event_code": "T0006", "transaction_status": "S",
            "transaction_amount": {"currency_code": "USD", "value": "120.00"}})["transaction_info"]  # fmt: skip
        txn = capture["transaction_id"]
        assert shop.control.flush_webhooks()
        assert len(tick_and_apply(instance, "paypal")) == 1
        row = payments(database_url, schema, shop.connection.id)[f"{txn}:T0006"]
        assert (row["status"], str(row["amount"]), row["currency"]) == ("S", "120.00", "USD")
        assert row["fee"] == Decimal(capture["fee_amount"]["value"]) < 0
        first_version = row["source_updated_at"]

        # A partial refund through PayPal's API, a minute later: the refund row and the capture's new status.
        own_sandbox.advance_clock(60)
        refund = api.post(f"/v2/payments/captures/{txn}/refund", json={"amount": {"value": "50.00",
                                                                                  "currency_code": "USD"}},
                          headers={"PayPal-Request-Id": uuid.uuid4().hex})  # fmt: skip
        assert refund.status_code == 201, refund.text
        refund_id = refund.json()["id"]
        # A subscription cancelled through the API.
        sid = next(s["id"] for s in shop.control.export(shop.account_id, "subscriptions")["records"]
                   if s["status"] in ("ACTIVE", "SUSPENDED"))  # fmt: skip
        assert api.post(f"/v1/billing/subscriptions/{sid}/cancel", json={"reason": "moved"}).status_code == 204
        assert shop.control.flush_webhooks()
        assert len(tick_and_apply(instance, "paypal")) == 1

    rows = payments(database_url, schema, shop.connection.id)
    assert rows[f"{txn}:T0006"]["status"] == "F"  # partially refunded, as Transaction Search shows it
    refunded_at = datetime.fromisoformat(refund.json()["update_time"])
    assert rows[f"{txn}:T0006"]["source_updated_at"] == refunded_at >= first_version + timedelta(seconds=60)
    back = rows[f"{refund_id}:T1107"]
    assert (back["status"], str(back["amount"]), back["reference_id"], back["reference_type"]) == ("S", "-50.00", txn,
                                                                                                   "TXN")  # fmt: skip
    with psycopg.connect(database_url) as conn:
        sub = conn.execute(
            sql.SQL("SELECT status, deleted, plan_name FROM {} WHERE connection_id = %s AND id = %s").format(
                table("paypal_subscriptions", schema)),
            (shop.connection.id, sid),
        ).fetchone()  # fmt: skip
    assert sub[0] == "CANCELLED" and sub[1] is True and sub[2]
    events = inbox_rows(database_url, schema, "paypal")
    assert [e[1] for e in events] == ["PAYMENT.CAPTURE.COMPLETED", "PAYMENT.CAPTURE.REFUNDED",
                                      "BILLING.SUBSCRIPTION.CANCELLED"]  # fmt: skip
    assert all(e[0].startswith("WH-") and e[2] == "processed" for e in events)
    assert {a["status"] for a in shop.control.webhook_attempts()} == {200}


def test_webhook_rows_are_the_rows_the_sync_writes(database_url, schema, box, own_sandbox, hooked):
    shop = hooked(own_sandbox)
    synced = hooked(own_sandbox, same_account=shop)  # the same merchant, mirrored by the sync only
    api = shop.api()
    fields = {"transaction_event_code": "T0006", "transaction_status": "S",
              "transaction_amount": {"currency_code": "USD", "value": "100.00"}}  # fmt: skip
    # The receiver keeps the sandbox's time, which the test moves: PayPal's transmission times follow it.
    with receiver(database_url, schema, box, clock=own_sandbox.clock) as base, dg.instance_for_test() as instance:
        shop.subscribe(base)
        txn = shop.control.add_record(shop.account_id, "transaction", fields)["transaction_info"]["transaction_id"]
        own_sandbox.advance_clock(120)
        part = {"amount": {"value": "40.00", "currency_code": "USD"}}
        api.post(f"/v2/payments/captures/{txn}/refund", json=part).raise_for_status()
        assert shop.control.changes(shop.account_id, refunds=1000)["refunds"]  # every other sale refunded too
        assert shop.control.flush_webhooks()
        tick_and_apply(instance, "paypal")
        hooked_rows = payments(database_url, schema, shop.connection.id)
        assert hooked_rows[f"{txn}:T0006"]["status"] == "F" and len(hooked_rows) >= 4

        # Transaction Search shows the rows three hours later; then the sync of the other connection reads them.
        own_sandbox.advance_clock(4 * 3600)
        days = sorted({r["created_at"].date() for r in hooked_rows.values()} | {datetime.now(UTC).date()})
        sync_days(database_url, schema, synced.connection.id, "paypal_payments", days)
        sync_rows = payments(database_url, schema, synced.connection.id)
        assert set(hooked_rows) <= set(sync_rows)  # same keys: transaction id and event code
        for key, row in hooked_rows.items():
            assert {c: row[c] for c in PAYMENT_COLUMNS} == {c: sync_rows[key][c] for c in PAYMENT_COLUMNS}, key

        # Syncing the hooked connection adds what only Transaction Search has (the payer) to the same rows...
        sync_days(database_url, schema, shop.connection.id, "paypal_payments", days)
        after = payments(database_url, schema, shop.connection.id)
        assert set(after) == set(sync_rows) and after[f"{txn}:T0006"]["payer_email"]
        # ...and a later event changes what it knows of the row, keeping the rest.
        own_sandbox.advance_clock(60)
        rest = api.post(f"/v2/payments/captures/{txn}/refund", json={})
        rest.raise_for_status()
        assert shop.control.flush_webhooks()
        tick_and_apply(instance, "paypal")
    final = payments(database_url, schema, shop.connection.id)[f"{txn}:T0006"]
    assert final["status"] == "V" and final["payer_email"] == after[f"{txn}:T0006"]["payer_email"]
    assert final["source_updated_at"] == datetime.fromisoformat(rest.json()["update_time"])
    assert final["raw"]["payer_info"] == after[f"{txn}:T0006"]["raw"]["payer_info"]


def test_duplicates_and_newest_first_delivery_end_like_one_in_order_delivery(database_url, schema, box, own_sandbox,
                                                                              hooked):  # fmt: skip
    in_order = hooked(own_sandbox)
    reordered = hooked(own_sandbox, same_account=in_order)
    api = in_order.api()
    # An active subscription of the test's own: whether the generated ones include one depends on the
    # clock (their histories draw on the same random stream). Made before either connection listens.
    sale_for = in_order.control.add_record(in_order.account_id, "subscription", {"status": "ACTIVE"})["id"]
    # The receiver keeps the sandbox's time, which the test moves: PayPal's transmission times follow it.
    with receiver(database_url, schema, box, clock=own_sandbox.clock) as base, dg.instance_for_test() as instance:
        in_order.subscribe(base)
        held = reordered.subscribe(base, hold=True)

        def step(change) -> None:
            own_sandbox.advance_clock(60)
            change()
            assert in_order.control.flush_webhooks()
            tick_and_apply(instance, "paypal")  # the in-order connection applies as events come

        txn = ""

        def capture() -> None:
            nonlocal txn
            fields = {"transaction_event_code": "T0006", "transaction_status": "S",
                      "transaction_amount": {"currency_code": "EUR", "value": "80.00"}}  # fmt: skip
            txn = in_order.control.add_record(in_order.account_id, "transaction", fields)["transaction_info"][
                "transaction_id"
            ]

        sale = {"subscription_id": sale_for, "transaction_status": "S"}
        part = {"amount": {"value": "30.00", "currency_code": "EUR"}}
        step(capture)
        step(lambda: in_order.control.add_record(in_order.account_id, "transaction", sale))
        step(lambda: api.post(f"/v2/payments/captures/{txn}/refund", json=part).raise_for_status())
        step(lambda: api.post(f"/v2/payments/captures/{txn}/refund", json={}).raise_for_status())  # the rest
        step(lambda: api.post(f"/v1/billing/subscriptions/{sale_for}/suspend", json={}).raise_for_status())
        step(lambda: api.post(f"/v1/billing/subscriptions/{sale_for}/activate", json={}).raise_for_status())
        step(lambda: in_order.control.changes(in_order.account_id, refunds=1000, cancels=1000))
        released = in_order.control.release_webhooks(held["id"], order="newest-first", copies=2)
        assert in_order.control.flush_webhooks()
        tick_and_apply(instance, "paypal")
    assert released >= 8
    attempts = [a for a in in_order.control.webhook_attempts(held["id"]) if a["status"] == 200]
    assert len(attempts) == 2 * released
    received = inbox_rows(database_url, schema, "paypal")
    assert {e[2] for e in received} == {"processed"} and len(received) == 2 * released  # each event once per connection
    for name in ("paypal_payments", "paypal_subscriptions"):
        expected = table_rows(database_url, schema, name, in_order.connection.id)
        assert expected and table_rows(database_url, schema, name, reordered.connection.id) == expected, name
    rows = payments(database_url, schema, reordered.connection.id)
    assert rows[f"{txn}:T0006"]["status"] == "V"  # refunded in full, not the older "S" delivered last


def test_a_refused_delivery_is_retried_until_the_receiver_takes_it(database_url, schema, box, own_sandbox, hooked):
    assert len(WEBHOOK_RETRY_DELAYS) == 25 and sum(WEBHOOK_RETRY_DELAYS) == pytest.approx(3 * 86_400)
    shop = hooked(own_sandbox)
    late_name, late_webhook = f"Late {uuid.uuid4().hex[:8]}", "WH" + uuid.uuid4().hex[:15].upper()
    late_id = vault.connection_id_for("paypal", late_name)
    with receiver(database_url, schema, box) as base:
        # Deliveries for a connection that does not exist yet are refused (as forged: 401) and retried.
        sub = shop.control.subscribe_webhooks(shop.account_id, receiver_url(base, "paypal", late_id), late_webhook,
                                              retry_delays=[0.5] * 20)  # fmt: skip
        # A completed capture ("S"): a generated status may be denied, which PayPal announces as another event.
        completed = {"transaction_event_code": "T0006", "transaction_status": "S"}
        txn = shop.control.add_record(shop.account_id, "transaction", completed)
        deadline = time.monotonic() + 20
        while len(shop.control.webhook_attempts(sub["id"])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        late = hooked(own_sandbox, same_account=shop, name=late_name, webhook_id=late_webhook)
        assert late.connection.id == late_id
        assert shop.control.flush_webhooks()
    tries = [(a["number"], a["status"]) for a in shop.control.webhook_attempts(sub["id"])]
    assert tries[:2] == [(1, 401), (2, 401)] and tries[-1][1] == 200
    ((event_id, kind, status, _, _),) = inbox_rows(database_url, schema, "paypal")
    assert (kind, status) == ("PAYMENT.CAPTURE.COMPLETED", "pending") and event_id.startswith("WH-")
    assert txn["transaction_info"]["transaction_event_code"] == "T0006"


# --- refusals ------------------------------------------------------------------------------------------------


class Listener:
    """A TCP listener standing in for a foreign certificate host: it counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            client.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            client.close()

    def close(self) -> None:
        self.sock.close()


def test_forged_and_foreign_deliveries_are_refused_and_store_nothing(database_url, schema, box, sandbox, hooked):
    shop = hooked(sandbox)
    other = hooked(sandbox, same_account=shop)
    untrusting = hooked(sandbox, same_account=shop, settings={"webhook_ca_pem": None})
    control = shop.control
    body = webhook_event()
    listener = Listener()
    try:
        with receiver(database_url, schema, box, max_body_bytes=8192) as base:
            target = shop.target(base)
            good = control.sign_webhook(body, shop.webhook_id)
            assert post(target, body, good) == 200

            # A forged signature, a tampered body, a signature for another connection's webhook id.
            sig = base64.b64decode(good["PAYPAL-TRANSMISSION-SIG"])
            forged = {**good, "PAYPAL-TRANSMISSION-SIG": base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()}
            assert post(target, body, forged) == 401
            assert post(target, body.replace(b"APPROVED", b"COMPLETED"), good) == 401
            for_other = control.sign_webhook(body, other.webhook_id)
            assert post(target, body, for_other) == 401
            assert post(other.target(base), body, for_other) == 200
            missing = {k: v for k, v in good.items() if k != "PAYPAL-CERT-URL"}
            assert post(target, body, missing) == 401

            # Certificate URLs that are not PayPal's nor the connection's API: refused before any request.
            fetched = cert_fetches(control)
            name = good["PAYPAL-CERT-URL"].rsplit("/", 1)[1]
            foreign = [
                f"http://127.0.0.1:{listener.port}/paypal/api/v1/notifications/certs/{name}",
                f"http://127.0.0.1:{listener.port}/v1/notifications/certs/{name}",
                f"https://127.0.0.1:{listener.port}/v1/notifications/certs/{name}",
                f"http://api.paypal.com@127.0.0.1:{listener.port}/v1/notifications/certs/{name}",
                f"{sandbox.url}/paypal/api/v1/notifications/certs/../certs/{name}",
                f"{sandbox.url}/paypal/api/v1/notifications/certs/{name}?x=1",
                f"{sandbox.url}/paypal/api/v1/other/{name}",
                f"http://api.paypal.com/v1/notifications/certs/{name}",  # PayPal's host, but over http
                f"https://api.paypal.com:8443/v1/notifications/certs/{name}",
                f"https://api.paypal.com.evil.example/v1/notifications/certs/{name}",
            ]
            for url in foreign:
                assert post(target, body, {**good, "PAYPAL-CERT-URL": url}) == 401, url
            assert listener.accepted == 0 and cert_fetches(control) == fetched
            # A certificate under the connection's base URL, but no trust root configured for it: not fetched.
            assert post(untrusting.target(base), body, control.sign_webhook(body, untrusting.webhook_id)) == 401
            assert cert_fetches(control) == fetched

            # Certificates from the allowed host that must not be trusted: expired, misnamed, or another CA's.
            for kind in ("expired", "wrong_cn", "untrusted"):
                cert = control.mint_webhook_cert(kind)["name"]
                assert post(target, body, control.sign_webhook(body, shop.webhook_id, cert=cert)) == 401, kind
            assert cert_fetches(control) == fetched + 3

            # A fresh genuine certificate is fetched once, then served from the cache.
            fresh = control.mint_webhook_cert("valid")["name"]
            for event_id in ("WH-CACHE-1", "WH-CACHE-2"):
                again = webhook_event(event_id=event_id)
                assert post(target, again, control.sign_webhook(again, shop.webhook_id, cert=fresh)) == 200
            assert cert_fetches(control) == fetched + 4

            big = webhook_event(resource_id="x" * 9000)
            assert post(target, big, control.sign_webhook(big, shop.webhook_id)) == 413
            broken = b'{"id": "WH-BROKEN", "event_type": '
            assert post(target, broken, control.sign_webhook(broken, shop.webhook_id)) == 400
    finally:
        listener.close()
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT connection_id, event_id, status FROM {} ORDER BY id").format(
                table("webhook_events", schema))
        ).fetchall()  # fmt: skip
    event_id = orjson.loads(body)["id"]
    assert stored[:2] == [(shop.connection.id, event_id, "pending"), (other.connection.id, event_id, "pending")]
    assert [s[1] for s in stored[2:4]] == ["WH-CACHE-1", "WH-CACHE-2"]
    assert len(stored) == 5 and stored[4][1].startswith("body:") and stored[4][2] == "dead"


def test_online_verification_asks_paypal(database_url, schema, box, sandbox, hooked):
    offline = hooked(sandbox)
    online = hooked(sandbox, same_account=offline, settings={"webhook_verification": "online",
                                                             "webhook_ca_pem": None})  # fmt: skip
    control = offline.control
    body = webhook_event()
    asked = control.stats()["by_route"].get("POST /v1/notifications/verify-webhook-signature", 0)
    with receiver(database_url, schema, box) as base:
        online.subscribe(base)  # the webhook id must be one of the app's webhooks for PayPal to vouch for it
        good = control.sign_webhook(body, online.webhook_id)
        assert post(online.target(base), body, good) == 200
        assert post(online.target(base), body.replace(b"APPROVED", b"DECLINED"), good) == 401
        sig = base64.b64decode(good["PAYPAL-TRANSMISSION-SIG"])
        forged = {**good, "PAYPAL-TRANSMISSION-SIG": base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1])).decode()}
        assert post(online.target(base), body, forged) == 401
        # PayPal checks its own serialisation of the event: bytes signed with other spacing fail online only.
        spaced = orjson.dumps(orjson.loads(webhook_event()), option=orjson.OPT_INDENT_2)
        offline.subscribe(base)
        assert post(offline.target(base), spaced, control.sign_webhook(spaced, offline.webhook_id)) == 200
        assert post(online.target(base), spaced, control.sign_webhook(spaced, online.webhook_id)) == 401
    assert control.stats()["by_route"]["POST /v1/notifications/verify-webhook-signature"] == asked + 4
    assert [r[1] for r in inbox_rows(database_url, schema, "paypal")] == ["CHECKOUT.ORDER.APPROVED"] * 2


def test_refused_credentials_during_online_verification_answer_503_and_name_the_fix(
    database_url, schema, box, sandbox, hooked, caplog
):
    online = hooked(sandbox, settings={"webhook_verification": "online", "webhook_ca_pem": None})
    with psycopg.connect(database_url) as conn:  # the app's secret changed at PayPal: ours is refused
        vault.update_secrets(conn, online.connection.id, {"client_secret": "not-the-secret"}, box)
    body = webhook_event()
    caplog.set_level(logging.WARNING, logger="nextcrm_pipelines.webhooks.app")
    with receiver(database_url, schema, box) as base:
        online.subscribe(base)
        assert post(online.target(base), body, online.control.sign_webhook(body, online.webhook_id)) == 503
    said = [r.getMessage() for r in caplog.records if r.name == "nextcrm_pipelines.webhooks.app"]
    assert any(f"`nextcrm-pipelines connections set-secret {online.connection.id}`" in m for m in said), said
    assert not any("not-the-secret" in m for m in said)
    assert inbox_rows(database_url, schema, "paypal") == []  # nothing stored: PayPal delivers it again


def test_sandbox_payment_resources_conform_to_paypal_openapi(sandbox, hooked):
    payments_spec = _load_spec("paypal-payments_payment_v2.json")
    notifications = _load_spec("paypal-notifications_webhooks_v1.json")
    shop = hooked(sandbox)
    api = shop.api()
    txn = shop.control.add_record(shop.account_id, "transaction", {"transaction_event_code": "T0006",
                                  "transaction_status": "S"})["transaction_info"]["transaction_id"]  # fmt: skip
    capture = api.get(f"/v2/payments/captures/{txn}").json()
    assert _conforms(payments_spec, payments_spec["components"]["schemas"]["capture-2"], capture) == []
    refund = api.post(f"/v2/payments/captures/{txn}/refund", json={}, headers={"PayPal-Request-Id": "r-1"})
    again = api.post(f"/v2/payments/captures/{txn}/refund", json={}, headers={"PayPal-Request-Id": "r-1"})
    assert (refund.status_code, again.status_code, again.json()) == (201, 200, refund.json())
    assert _conforms(payments_spec, payments_spec["components"]["schemas"]["refund"], refund.json()) == []
    assert api.post(f"/v2/payments/captures/{txn}/refund", json={}).status_code == 422  # nothing left to refund
    schemas = notifications["components"]["schemas"]
    hook = {"url": "http://127.0.0.1:9/paypal-hook", "event_types": [{"name": "PAYMENT.CAPTURE.COMPLETED"}]}
    created = api.post("/v1/notifications/webhooks", json=hook)
    assert created.status_code == 201 and _conforms(notifications, schemas["webhook"], created.json()) == []
    assert api.post("/v1/notifications/webhooks", json=hook).json()["name"] == "WEBHOOK_URL_ALREADY_EXISTS"
    verdict = api.post("/v1/notifications/verify-webhook-signature", json={"webhook_id": created.json()["id"]})
    assert verdict.status_code == 400 and verdict.json()["name"] == "VALIDATION_ERROR"
    # Events of the subscribed types are kept for the events API, which lists, shows and resends them.
    shop.control.add_record(shop.account_id, "transaction", {"transaction_event_code": "T0006",
                            "transaction_status": "S"})  # fmt: skip
    listed = api.get("/v1/notifications/webhooks-events").json()
    assert [e["event_type"] for e in listed["events"]] == ["PAYMENT.CAPTURE.COMPLETED"]
    assert _conforms(notifications, schemas["EventList"], listed) == []
    event_id = listed["events"][0]["id"]
    assert api.get(f"/v1/notifications/webhooks-events/{event_id}").json() == listed["events"][0]
    assert api.post(f"/v1/notifications/webhooks-events/{event_id}/resend", json={}).status_code == 202
    assert api.delete(f"/v1/notifications/webhooks/{created.json()['id']}").status_code == 204
    assert api.get("/v1/notifications/webhooks").json() == {"webhooks": []}


# --- the offline check, directly -----------------------------------------------------------------------------

WEBHOOK_ID = "1JE4291016473214C"
SANDBOX_CONNECTION = Connection(id="paypal-x", provider="paypal", display_name="x",
                                base_url="http://127.0.0.1:5000/paypal")  # fmt: skip


@cache
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed_headers(body: bytes, webhook_id: str = WEBHOOK_ID) -> dict[str, str]:
    tid, at = "69cd13f0-d67a-11e5-baa3-778b53f4ae55", "2026-11-26T10:00:00Z"
    signature = signing_key().sign(signed_message(tid, at, webhook_id, body), padding.PKCS1v15(), hashes.SHA256())
    return {
        "PAYPAL-TRANSMISSION-ID": tid,
        "PAYPAL-TRANSMISSION-TIME": at,
        "PAYPAL-AUTH-ALGO": "SHA256withRSA",
        "PAYPAL-TRANSMISSION-SIG": base64.b64encode(signature).decode(),
        "PAYPAL-CERT-URL": "https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-ad47cb8d",
    }


SIGNED_HEADERS = st.sampled_from(
    ["PAYPAL-TRANSMISSION-ID", "PAYPAL-TRANSMISSION-TIME", "PAYPAL-TRANSMISSION-SIG", "PAYPAL-AUTH-ALGO"]
)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(min_size=1, max_size=400),
    start=st.integers(min_value=0),
    burst=st.binary(min_size=1, max_size=4),
    header=SIGNED_HEADERS,
    position=st.integers(min_value=0),
    flip=st.integers(1, 255),
)
def test_no_mutation_of_a_signed_paypal_body_or_header_verifies(body, start, burst, header, position, flip):
    """A body changed anywhere within four bytes (a burst CRC-32 always detects), or any signed header
    changed in one byte, never verifies; neither does the genuine delivery for another webhook id."""
    key = signing_key().public_key()
    headers = signed_headers(body)
    verify_signature(headers, body, WEBHOOK_ID, key)
    with pytest.raises(InvalidSignature):
        verify_signature(headers, body, "2JE4291016473214C", key)
    assume(any(burst))
    burst = burst[: len(body)]
    at = start % (len(body) - len(burst) + 1)
    mutated = bytearray(body)
    for i, byte in enumerate(burst):
        mutated[at + i] ^= byte
    if bytes(mutated) != body:
        with pytest.raises(InvalidSignature):
            verify_signature(headers, bytes(mutated), WEBHOOK_ID, key)
    spoiled = bytearray(headers[header].encode())
    spoiled[position % len(spoiled)] ^= flip
    try:
        value = spoiled.decode()
    except UnicodeDecodeError:
        return
    with pytest.raises(InvalidSignature):
        verify_signature({**headers, header: value}, body, WEBHOOK_ID, key)


@pytest.mark.parametrize(
    ("url", "trust"),
    [
        ("https://api.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-ad47cb8d", "paypal"),
        ("https://api.sandbox.paypal.com/v1/notifications/certs/CERT-1", "paypal"),
        ("https://api-m.paypal.com/v1/notifications/certs/CERT-1", "paypal"),
        ("https://api-m.sandbox.paypal.com:443/v1/notifications/certs/CERT-1", "paypal"),
        ("http://127.0.0.1:5000/paypal/api/v1/notifications/certs/CERT-1", "connection"),
        ("http://api.paypal.com/v1/notifications/certs/CERT-1", None),
        ("https://API.PAYPAL.COM.example.com/v1/notifications/certs/CERT-1", None),
        ("https://www.paypal.com/v1/notifications/certs/CERT-1", None),
        ("https://api.paypal.com/v1/notifications/certs/", None),
        ("https://api.paypal.com/v1/notifications/certs/a/b", None),
        ("https://api.paypal.com/v1/notifications/certs/%2e%2e", None),
        ("https://api.paypal.com/v1/notifications/certs/x#frag", None),
        ("https://user:pw@api.paypal.com/v1/notifications/certs/CERT-1", None),
        ("https://api.paypal.com\\@evil.example/v1/notifications/certs/CERT-1", None),
        ("http://127.0.0.1:5001/paypal/api/v1/notifications/certs/CERT-1", None),
        ("https://127.0.0.1:5000/paypal/api/v1/notifications/certs/CERT-1", None),
        ("http://127.0.0.1:5000/v1/notifications/certs/CERT-1", None),
        ("http://localhost:5000/paypal/api/v1/notifications/certs/CERT-1", None),
        ("file:///etc/passwd", None),
    ],
)
def test_certificate_urls_are_allowed_by_host_scheme_and_path_only(url, trust):
    if trust is None:
        with pytest.raises(InvalidSignature):
            cert_source(url, SANDBOX_CONNECTION)
    else:
        assert cert_source(url, SANDBOX_CONNECTION) == CertSource(url, trust)
    live = Connection(id="paypal-live", provider="paypal", display_name="live")
    if trust == "connection":
        with pytest.raises(InvalidSignature):
            cert_source(url, live)  # a connection without a base URL trusts PayPal's hosts only


def test_certificate_checks_name_dates_and_chain():
    from cryptography.x509.verification import Store

    ca_key, leaf_key = signing_key(), rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)

    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root")])

    def cert(cn: str, signer: rsa.RSAPrivateKey, days: tuple[int, int], ca: bool = False) -> x509.Certificate:
        key = ca_key if ca else leaf_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(root_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=days[0]))
            .not_valid_after(now + timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        )
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        return builder.sign(signer, hashes.SHA256())

    root = cert("Test Root", ca_key, (-1, 30), ca=True)
    roots, name = Store([root]), "messageverificationcerts.paypal.com"
    good = cert(name, ca_key, (-1, 30))
    assert check_certificate([good], roots, now.timestamp()).public_numbers() == leaf_key.public_key().public_numbers()
    refused = {
        "expired": [cert(name, ca_key, (-30, -1))],
        "not yet valid": [cert(name, ca_key, (1, 30))],
        "another name": [cert("www.paypal.com", ca_key, (-1, 30))],
        "a look-alike name": [cert(f"{name}.evil.example", ca_key, (-1, 30))],
        "self-signed, served with the root": [cert(name, leaf_key, (-1, 30)), root],
    }
    for case, chain in refused.items():
        with pytest.raises(InvalidSignature):
            check_certificate(chain, roots, now.timestamp())
            pytest.fail(case)


def crc32_matching(prefix: bytes, suffix: bytes, target: int) -> bytes:
    """Four bytes x with crc32(prefix + x + suffix) == target (CRC-32 is affine over GF(2), so solve for x)."""

    def crc(x: int) -> int:
        return zlib.crc32(prefix + x.to_bytes(4, "little") + suffix) & 0xFFFFFFFF

    base = crc(0)
    rows = [(crc(1 << bit) ^ base, 1 << bit) for bit in range(32)]  # (image, input) pairs spanning GF(2)^32
    want, solution = target ^ base, 0
    for bit in range(31, -1, -1):  # Gaussian elimination on the images, highest bit first
        pivot = next((i for i, (image, _) in enumerate(rows) if image >> bit & 1), None)
        if pivot is None:
            continue
        image, source = rows.pop(pivot)
        rows = [(im ^ image, src ^ source) if im >> bit & 1 else (im, src) for im, src in rows]
        if want >> bit & 1:
            want, solution = want ^ image, solution ^ source
    assert want == 0 and crc(solution) == target
    return solution.to_bytes(4, "little")


def forge_same_crc(genuine: bytes, replacement: dict) -> bytes:
    """A different, valid JSON event whose raw bytes have the genuine body's CRC-32."""
    target = zlib.crc32(genuine) & 0xFFFFFFFF
    head = orjson.dumps(replacement)[:-1] + b',"pad":"'
    for attempt in range(100_000):
        prefix = head + str(attempt).encode()
        patch = crc32_matching(prefix, b'"}', target)
        if all(0x20 <= b < 0x7F and b not in b'"\\' for b in patch):
            return prefix + patch + b'"}'
    raise AssertionError("no printable CRC patch found")


def test_a_body_forged_to_a_genuine_deliverys_crc_is_refused(database_url, schema, box, sandbox, hooked):
    shop = hooked(sandbox)
    genuine = webhook_event(event_id="WH-GENUINE")
    headers = shop.control.sign_webhook(genuine, shop.webhook_id)
    forged = forge_same_crc(genuine, {**orjson.loads(genuine), "id": "WH-FORGED",
                                      "resource": {"id": "0VF52814937998046", "status": "VOIDED"}})  # fmt: skip
    assert forged != genuine and zlib.crc32(forged) == zlib.crc32(genuine) and orjson.loads(forged)["id"] == "WH-FORGED"
    with receiver(database_url, schema, box) as base:
        target = shop.target(base)
        assert post(target, genuine, headers) == 200
        assert post(target, forged, headers) == 401  # the same signed headers, another body: refused
        assert post(target, genuine, headers) == 200  # the genuine delivery again: a no-op
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT event_id, delivery_id FROM {}").format(table("webhook_events", schema))
        ).fetchall()
    assert stored == [("WH-GENUINE", headers["PAYPAL-TRANSMISSION-ID"])]
