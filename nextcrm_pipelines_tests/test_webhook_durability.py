"""Nothing lost: a receiver killed mid-stream loses no acknowledged webhook and stores none twice.

The receiver runs as `nextcrm-pipelines webhooks serve` in a child process. Sender threads deliver
signed Stripe events the way Stripe does, each retried (re-signed) until it gets a 2xx, while the
receiver is killed with SIGKILL twice and restarted on the same port. Just before each kill one
more event is sent whose answer is never read, as when a connection drops after the commit: the
provider has no 2xx for it and delivers it again after the restart. Afterwards every acknowledged
event is in the inbox exactly once, and the sensor ticks and apply runs bring each one to
`processed` with its charge in `stripe_payments`, amounts exactly as the event carried them.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines_tests.accounting import free_port
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET, stripe_header
from nextcrm_pipelines_tests.webhook_helpers import tick_and_apply
from nextcrm_sandbox.stripe import StripeAccount

EVENTS = 450
SENDERS = 4
KILLS = 2


class ReceiverProcess:
    """`nextcrm-pipelines webhooks serve` on one loopback port, as a child process that can be killed."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port, self.env, self.log_path = port, env, log_path
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the receiver and wait until it answers on its port."""
        command = [
            sys.executable,
            "-m",
            "nextcrm_pipelines.cli",
            "webhooks",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the receiver exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the receiver did not answer within 60 s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, requests in flight get no answer."""
        assert self.process is not None and self.process.poll() is None, "the receiver is not running"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Terminate the receiver if it runs (SIGKILL when it does not exit in 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self) -> str:
        """The end of the receiver's output, for failure messages."""
        return self.log_path.read_text(errors="replace")[-3000:]

    def __enter__(self) -> ReceiverProcess:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class Provider:
    """Delivers events like Stripe: each one retried, freshly signed, until the receiver answers 2xx."""

    def __init__(self, url: str, events: list[tuple[str, bytes]], deadline: float) -> None:
        self.url, self.deadline = url, deadline
        self.todo: queue.Queue[tuple[str, bytes]] = queue.Queue()
        for item in events:
            self.todo.put(item)
        self.acknowledged: dict[str, int] = {}  # event id -> attempts it took
        self.failures: Counter[str] = Counter()  # what the attempts that got no 2xx met
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def acked(self) -> int:
        """How many events got their 2xx so far."""
        with self.lock:
            return len(self.acknowledged)

    def run(self) -> None:
        """A sender thread: deliver queued events until none is left."""
        try:
            with httpx.Client(timeout=5) as client:
                while True:
                    try:
                        event_id, body = self.todo.get_nowait()
                    except queue.Empty:
                        return
                    self.deliver(client, event_id, body)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def deliver(self, client: httpx.Client, event_id: str, body: bytes) -> None:
        """Deliver one event, retrying until a 2xx or the deadline."""
        attempts = 0
        while time.monotonic() < self.deadline:
            attempts += 1
            try:
                response = client.post(
                    self.url,
                    content=body,
                    headers={"Stripe-Signature": stripe_header(body), "Content-Type": "application/json"},
                )
                if 200 <= response.status_code < 300:
                    with self.lock:
                        self.acknowledged[event_id] = attempts
                    return
                outcome = str(response.status_code)
            except httpx.TransportError as exc:
                outcome = type(exc).__name__
            with self.lock:
                self.failures[outcome] += 1
            time.sleep(0.02)


def charge_events(count: int) -> tuple[list[tuple[str, bytes]], dict[str, dict]]:
    """`count` Stripe events, each carrying a distinct charge (every fifth one refunded in full).

    Returns the (event id, body) pairs and the charges by event id.
    """
    account = StripeAccount("sk_test_durability", seed=31, charges=count, subscriptions=0, days=3)
    events, carried = [], {}
    now = int(time.time())
    for n in range(count):
        charge = orjson.loads(account.charges.blob(n))
        kind = "charge.succeeded"
        if n % 5 == 0:
            kind = "charge.refunded"
            charge = {**charge, "refunded": True, "amount_refunded": charge["amount"]}
        event_id = f"evt_durable_{n:05d}"
        body = orjson.dumps(
            {"id": event_id, "object": "event", "type": kind, "created": now, "data": {"object": charge}}
        )
        events.append((event_id, body))
        carried[event_id] = charge
    return events, carried


def send_unanswered(port: int, path: str, body: bytes) -> socket.socket:
    """POST `body` over a raw socket and leave the answer unread; the caller closes the socket."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Stripe-Signature: {stripe_header(body)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def stored(database_url: str, schema: str, event_id: str) -> int:
    """How many inbox rows hold `event_id`."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE event_id = %s").format(table("webhook_events", schema)), (event_id,)
        ).fetchone()[0]


def wait_until(condition: Callable[[], bool], timeout: float, message: str) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


@pytest.mark.timeout(180)
def test_a_receiver_killed_mid_stream_loses_no_acknowledged_event(database_url, schema, box, tmp_path):
    with psycopg.connect(database_url) as conn:
        connection_id = vault.add_connection(
            conn,
            provider="stripe",
            display_name="Durable",
            box=box,
            secrets={"api_key": "sk_test_durable", "webhook_secret": SECRET},
        ).id
    events, carried = charge_events(EVENTS + KILLS)
    streamed, unanswered = events[:EVENTS], events[EVENTS:]
    port = free_port()
    path = f"/webhooks/stripe/{connection_id}"
    # The fixtures put DATABASE_URL, NEXTCRM_DB_SCHEMA and NEXTCRM_SECRET_KEY in the environment.
    env = {**os.environ, "NEXTCRM_DATA_DIR": str(tmp_path / "data")}
    provider = Provider(f"http://127.0.0.1:{port}{path}", streamed, time.monotonic() + 120)
    with ReceiverProcess(port, env, tmp_path / "receiver.log") as receiver, httpx.Client(timeout=5) as client:
        senders = [threading.Thread(target=provider.run, daemon=True) for _ in range(SENDERS)]
        for sender in senders:
            sender.start()
        for k, (event_id, body) in enumerate(unanswered, start=1):
            mark = k * EVENTS // (KILLS + 1)
            wait_until(lambda mark=mark: provider.acked() >= mark, 60, f"fewer than {mark} events acknowledged")
            with send_unanswered(port, path, body):
                wait_until(
                    lambda event_id=event_id: stored(database_url, schema, event_id) == 1,
                    30,
                    f"{event_id} was not stored",
                )
                receiver.kill()
            assert provider.acked() < EVENTS, "the stream ended before the receiver was killed"
            receiver.start()
            provider.deliver(client, event_id, body)  # no 2xx was seen for it: delivered again
        for sender in senders:
            sender.join(timeout=120)
        assert not any(sender.is_alive() for sender in senders)
    assert provider.errors == []
    assert receiver.starts == KILLS + 1
    # Every event was delivered in the end, and the kills did interrupt the stream.
    assert sorted(provider.acknowledged) == sorted(carried)
    assert sum(provider.failures.values()) > 0 and max(provider.acknowledged.values()) > 1

    inbox = table("webhook_events", schema)
    with psycopg.connect(database_url) as conn:
        copies = conn.execute(
            sql.SQL("SELECT event_id, count(*) FROM {} WHERE connection_id = %s GROUP BY event_id").format(inbox),
            (connection_id,),
        ).fetchall()
    assert dict(copies) == {event_id: 1 for event_id in provider.acknowledged}

    with dg.instance_for_test() as instance:
        for _ in range(10):
            if not tick_and_apply(instance, "stripe"):
                break
        assert all(run.is_success for run in instance.get_runs())

    with psycopg.connect(database_url) as conn:
        statuses = dict(
            conn.execute(
                sql.SQL("SELECT event_id, status FROM {} WHERE connection_id = %s").format(inbox), (connection_id,)
            ).fetchall()
        )
        rows = conn.execute(
            sql.SQL(
                "SELECT id, amount, amount_captured, amount_refunded, currency, refunded, status FROM {} "
                "WHERE connection_id = %s"
            ).format(table("stripe_payments", schema)),
            (connection_id,),
        ).fetchall()
    assert statuses == {event_id: "processed" for event_id in provider.acknowledged}
    expected = {
        charge["id"]: (
            minor_to_major(charge["amount"], charge["currency"]),
            minor_to_major(charge["amount_captured"], charge["currency"]),
            minor_to_major(charge["amount_refunded"], charge["currency"]),
            charge["currency"],
            bool(charge["refunded"]),
            charge["status"],
        )
        for charge in carried.values()
    }
    assert {row[0]: tuple(row[1:]) for row in rows} == expected
