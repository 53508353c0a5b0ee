"""Stripe webhooks from the sandbox, end to end over real HTTP: a change made through `/v1` → the
emulator's signed delivery → the receiver → the inbox → one sensor tick and its apply run → the row.

Each test runs its own sandbox (the tests move its clock). Stripe event times are whole seconds
while a sync stamps what it listed with the sub-second time it fetched the page, so the clock is
moved on before each change: its event is then strictly newer than what the sync stored.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
import uvicorn
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines.webhooks.app import build_app
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply
from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.stripe import StripeControl

OTHER_SECRET = "whsec_test_" + "b" * 24


@pytest.fixture
def hooks(own_sandbox: SandboxServer) -> Iterator[StripeControl]:
    """The Stripe webhook control API of the test's own sandbox; its delivery thread stops afterwards."""
    yield StripeControl(own_sandbox)
    own_sandbox.app.state.stripe.close()


def hooked_account(server: SandboxServer, database_url: str, schema: str, box, names: tuple[str, ...] = ("Hooked",),
                   secret: str = SECRET) -> tuple[str, list[Connection]]:  # fmt: skip
    """A fresh sandbox account and one connection per name to it (the endpoint secret stored as
    `webhook_secret`), each synced for yesterday and today; returns the api key and the connections."""
    key = f"sk_test_hooks{time.time_ns()}"
    server.add_stripe_account(api_key=key, seed=23, charges=40, subscriptions=8, days=1, requests_per_second=0)
    connections = []
    with psycopg.connect(database_url) as conn:
        for name in names:
            connections.append(vault.add_connection(conn, provider="stripe", display_name=name, box=box,
                                                    base_url=server.url,
                                                    secrets={"api_key": key, "webhook_secret": secret}))  # fmt: skip
    days = days_back(sandbox_now(server).date(), 1)
    for connection in connections:
        for entity in ("stripe_payments", "stripe_subscriptions"):
            assert all(r.status == "success" for r in sync_days(database_url, schema, connection.id, entity, days))
    return key, connections


def stripe_api(server: SandboxServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})


def call(api: httpx.Client, method: str, path: str, **form: Any) -> dict[str, Any]:
    """One `/v1` call with a form body (Stripe's encoding); fails the test unless it answers 200."""
    response = api.request(method, path, data=form or None)
    assert response.status_code == 200, response.text
    return response.json()


def refundable_charge(server: SandboxServer, key: str) -> dict[str, Any]:
    return next(c for c in server.stripe_export(key, "charges")
                if c["status"] == "succeeded" and c["amount_refunded"] == 0 and c["amount"] >= 300)  # fmt: skip


def live_subscription(server: SandboxServer, key: str) -> dict[str, Any]:
    return next(s for s in server.stripe_export(key, "subscriptions") if s["status"] in ("active", "trialing"))


def hook_url(base: str, connection: Connection) -> str:
    return f"{base}/webhooks/stripe/{connection.id}"


@contextmanager
def delivered_and_held(database_url: str, schema: str, box, hooks: StripeControl, key: str, in_order: Connection,
                       reordered: Connection) -> Iterator[tuple[dg.DagsterInstance, str]]:  # fmt: skip
    """A receiver and a Dagster instance, the account's events delivered to `in_order` as they happen and held for
    `reordered`; yields (the instance, the held webhook's id, for `hooks.release_webhooks`)."""
    with receiver(database_url, schema, box) as base, dg.instance_for_test() as instance:
        hooks.subscribe_webhooks(key, hook_url(base, in_order), SECRET)
        held = hooks.subscribe_webhooks(key, hook_url(base, reordered), SECRET)["id"]
        hooks.hold_webhooks(held)
        yield instance, held


def mirror_row(database_url: str, schema: str, name: str, connection_id: str, object_id: str) -> dict[str, Any]:
    """A whole row of a mirror table, as a dict of its columns."""
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(
            sql.SQL("SELECT * FROM {} WHERE connection_id = %s AND id = %s").format(table(name, schema)),
            (connection_id, object_id),
        )
        row = cur.fetchone()
        assert row is not None, f"{name} has no row {object_id} for {connection_id}"
        return dict(zip([c.name for c in cur.description], row, strict=True))


def mirror_rows(database_url: str, schema: str, name: str, connection_id: str) -> dict[str, dict[str, Any]]:
    """Every row of one connection, by id, without the columns that name the copy (connection, sync time)."""
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {} WHERE connection_id = %s").format(table(name, schema)),
                           (connection_id,))  # fmt: skip
        columns = [c.name for c in cur.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    return {r["id"]: {k: v for k, v in r.items() if k not in ("connection_id", "synced_at")} for r in rows}


def inbox_bodies(database_url: str, schema: str, connection_id: str) -> list[tuple[str, str, str]]:
    """(event id, status, raw body) of a connection's inbox rows, in arrival order."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT event_id, status, raw_body FROM {} WHERE connection_id = %s ORDER BY id").format(
                table("webhook_events", schema)
            ),
            (connection_id,),
        ).fetchall()


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the sandbox"
        time.sleep(0.05)


@contextmanager
def receiver_on(sock: socket.socket, database_url: str, schema: str, box) -> Iterator[None]:
    """The receiver served on an already bound socket: until this starts, deliveries to its port are
    refused (bound, not listening), as when the receiver is down."""
    server = uvicorn.Server(uvicorn.Config(build_app(database_url=database_url, schema=schema, box=box),
                                           log_level="warning", lifespan="on"))  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_refund_and_a_cancellation_reach_the_tables(database_url, schema, box, own_sandbox, hooks):
    key, (connection,) = hooked_account(own_sandbox, database_url, schema, box)
    charge, subscription = refundable_charge(own_sandbox, key), live_subscription(own_sandbox, key)
    with (
        receiver(database_url, schema, box) as base,
        dg.instance_for_test() as instance,
        stripe_api(own_sandbox, key) as api,
    ):
        sub = hooks.subscribe_webhooks(key, hook_url(base, connection), SECRET)
        own_sandbox.advance_clock(2)
        call(api, "POST", "/v1/refunds", charge=charge["id"])
        call(api, "DELETE", f"/v1/subscriptions/{subscription['id']}")
        assert hooks.flush_webhooks()
        assert [(a["number"], a["status"]) for a in hooks.webhook_attempts(sub["id"])] == [(1, 200)] * 3
        before = mirror_row(database_url, schema, "stripe_payments", connection.id, charge["id"])
        assert (before["refunded"], before["amount_refunded"]) == (False, 0)  # stored, not yet applied

        assert len(tick_and_apply(instance, "stripe")) == 1
        assert all(run.is_success for run in instance.get_runs())

        stored = inbox_bodies(database_url, schema, connection.id)
        for event_id, _, raw_body in stored:  # what was delivered is the event the API serves
            assert raw_body.encode() == api.get(f"/v1/events/{event_id}").content
    events = [orjson.loads(raw) for _, _, raw in stored]
    assert [e["type"] for e in events] == ["charge.refunded", "refund.created", "customer.subscription.deleted"]
    assert [(e[0], e[2], e[3]) for e in inbox_rows(database_url, schema, "stripe")] == [
        (e["id"], "processed", 1) for e in events
    ]
    payment = mirror_row(database_url, schema, "stripe_payments", connection.id, charge["id"])
    assert (payment["refunded"], payment["amount_refunded"]) == (True, minor_to_major(charge["amount"],
                                                                                      charge["currency"]))  # fmt: skip
    assert int(payment["source_updated_at"].timestamp()) == events[0]["created"]
    cancelled = mirror_row(database_url, schema, "stripe_subscriptions", connection.id, subscription["id"])
    assert (cancelled["status"], cancelled["deleted"]) == ("canceled", True)
    assert int(cancelled["canceled_at"].timestamp()) == events[2]["created"]


def test_duplicates_and_reordering_leave_the_rows_of_an_in_order_delivery(database_url, schema, box, own_sandbox,
                                                                          hooks):  # fmt: skip
    key, (in_order, reordered) = hooked_account(own_sandbox, database_url, schema, box, ("In order", "Reordered"))
    charge, subscription = refundable_charge(own_sandbox, key), live_subscription(own_sandbox, key)
    third = charge["amount"] // 3
    changes = [
        ("POST", "/v1/refunds", {"charge": charge["id"], "amount": third}),
        ("POST", f"/v1/subscriptions/{subscription['id']}", {"metadata[step]": "one"}),
        ("POST", "/v1/refunds", {"charge": charge["id"], "amount": third}),
        ("POST", f"/v1/subscriptions/{subscription['id']}", {"cancel_at_period_end": "true"}),
        ("POST", "/v1/refunds", {"charge": charge["id"]}),
        ("DELETE", f"/v1/subscriptions/{subscription['id']}", {}),
    ]
    with (
        delivered_and_held(database_url, schema, box, hooks, key, in_order, reordered) as (instance, held),
        stripe_api(own_sandbox, key) as api,
    ):
        for method, path, form in changes:
            # In order: each change delivered once and applied by a run of its own; after each, the
            # mirror holds exactly what the API serves now.
            own_sandbox.advance_clock(2)
            call(api, method, path, **form)
            assert hooks.flush_webhooks()
            assert len(tick_and_apply(instance, "stripe")) == 1
            for name, object_path in (("stripe_payments", f"/v1/charges/{charge['id']}"),
                                      ("stripe_subscriptions", f"/v1/subscriptions/{subscription['id']}")):  # fmt: skip
                stored = mirror_row(database_url, schema, name, in_order.id, object_path.rsplit("/", 1)[1])
                assert stored["raw"] == orjson.loads(api.get(object_path).content)
        assert inbox_bodies(database_url, schema, reordered.id) == []  # all held so far
        # Reordered: every event three times, newest first, then one run.
        assert hooks.release_webhooks(held, order="newest-first", copies=3) == 9
        assert hooks.flush_webhooks()
        assert [a["status"] for a in hooks.webhook_attempts(held)] == [200] * 27
        assert len(tick_and_apply(instance, "stripe")) == 1
        assert all(run.is_success for run in instance.get_runs())
    assert [status for _, status, _ in inbox_bodies(database_url, schema, reordered.id)] == ["processed"] * 9

    final = mirror_row(database_url, schema, "stripe_payments", in_order.id, charge["id"])
    assert (final["refunded"], final["amount_refunded"]) == (True, final["amount"])
    ended = mirror_row(database_url, schema, "stripe_subscriptions", in_order.id, subscription["id"])
    assert (ended["status"], ended["cancel_at_period_end"], ended["raw"]["metadata"]) == ("canceled", False,
                                                                                          {"step": "one"})  # fmt: skip
    for name, changed in (("stripe_payments", charge["id"]), ("stripe_subscriptions", subscription["id"])):
        expected, got = mirror_rows(database_url, schema, name, in_order.id), mirror_rows(database_url, schema, name,
                                                                                           reordered.id)  # fmt: skip
        assert got[changed] == expected[changed]  # the whole row, event time and raw JSON included
        # The rows no event touched differ only by when each connection's sync listed them.
        assert {i: {k: v for k, v in r.items() if k != "source_updated_at"} for i, r in got.items()} == {
            i: {k: v for k, v in r.items() if k != "source_updated_at"} for i, r in expected.items()
        }


def test_an_event_the_receiver_missed_arrives_on_a_retry(database_url, schema, box, own_sandbox, hooks):
    key, (connection,) = hooked_account(own_sandbox, database_url, schema, box)
    subscription = live_subscription(own_sandbox, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        sub = hooks.subscribe_webhooks(key, hook_url(base, connection), SECRET, retry_delays=[0.2, 4.0, 60.0])["id"]
        own_sandbox.advance_clock(2)
        with stripe_api(own_sandbox, key) as api:
            call(api, "DELETE", f"/v1/subscriptions/{subscription['id']}")
        wait_for(lambda: len(hooks.webhook_attempts(sub)) == 2)  # the first try and one retry, both refused
        with receiver_on(sock, database_url, schema, box), dg.instance_for_test() as instance:
            assert hooks.flush_webhooks()
            assert len(tick_and_apply(instance, "stripe")) == 1
    finally:
        sock.close()
    attempts = hooks.webhook_attempts(sub)
    assert [(a["number"], a["status"]) for a in attempts] == [(1, None), (2, None), (3, 200)]
    assert all("ConnectError" in a["error"] for a in attempts[:2]) and attempts[2]["error"] is None
    assert attempts[2]["at"] - attempts[1]["at"] >= 3.9
    ((_, event_type, status, tries, error),) = inbox_rows(database_url, schema, "stripe")
    assert (event_type, status, tries, error) == ("customer.subscription.deleted", "processed", 1, None)
    row = mirror_row(database_url, schema, "stripe_subscriptions", connection.id, subscription["id"])
    assert (row["status"], row["deleted"]) == ("canceled", True)


def test_a_delivery_signed_with_another_secret_is_refused_and_nothing_is_stored(database_url, schema, box,
                                                                                own_sandbox, hooks):  # fmt: skip
    key, (connection,) = hooked_account(own_sandbox, database_url, schema, box)
    charge = refundable_charge(own_sandbox, key)
    before = mirror_row(database_url, schema, "stripe_payments", connection.id, charge["id"])
    with (
        receiver(database_url, schema, box) as base,
        dg.instance_for_test() as instance,
        stripe_api(own_sandbox, key) as api,
    ):
        sub = hooks.subscribe_webhooks(key, hook_url(base, connection), OTHER_SECRET, retry_delays=[0.1])["id"]
        own_sandbox.advance_clock(2)
        call(api, "POST", "/v1/refunds", charge=charge["id"])
        assert hooks.flush_webhooks()
        assert tick_and_apply(instance, "stripe") == []
    # Two events (charge.refunded, refund.created), each tried and retried once: every answer a 401.
    assert sorted((a["number"], a["status"]) for a in hooks.webhook_attempts(sub)) == [(1, 401), (1, 401),
                                                                                       (2, 401), (2, 401)]  # fmt: skip
    assert inbox_rows(database_url, schema) == []
    after = mirror_row(database_url, schema, "stripe_payments", connection.id, charge["id"])
    assert {k: v for k, v in after.items() if k != "synced_at"} == {k: v for k, v in before.items() if k != "synced_at"}


def test_rolled_secrets_event_filters_and_stale_signatures(database_url, schema, box, own_sandbox, hooks):
    key, (connection,) = hooked_account(own_sandbox, database_url, schema, box)
    charge, subscription = refundable_charge(own_sandbox, key), live_subscription(own_sandbox, key)
    with receiver(database_url, schema, box) as base, stripe_api(own_sandbox, key) as api:
        url = hook_url(base, connection)
        # Signed with the old and the new secret (a roll in progress), only subscription ends wanted.
        rolled = hooks.subscribe_webhooks(key, url, [OTHER_SECRET, SECRET],
                                          enabled_events=["customer.subscription.deleted"])["id"]  # fmt: skip
        # Signed ten minutes in the past: outside Stripe's 300 s tolerance, refused as a replay.
        stale = hooks.subscribe_webhooks(key, url, SECRET, timestamp_offset=-600, retry_delays=[])["id"]
        own_sandbox.advance_clock(2)
        call(api, "POST", "/v1/refunds", charge=charge["id"])
        call(api, "DELETE", f"/v1/subscriptions/{subscription['id']}")
        assert hooks.flush_webhooks()
    assert [a["status"] for a in hooks.webhook_attempts(rolled)] == [200]
    assert [a["status"] for a in hooks.webhook_attempts(stale)] == [401, 401, 401]
    assert [(e[1], e[2]) for e in inbox_rows(database_url, schema, "stripe")] == [
        ("customer.subscription.deleted", "pending")
    ]


def test_the_subscription_control_api_refuses_what_it_cannot_deliver(own_sandbox, hooks):
    key = f"sk_test_hooks{time.time_ns()}"
    own_sandbox.add_stripe_account(api_key=key, seed=1, charges=20, subscriptions=1, days=1, requests_per_second=0)
    url = "http://127.0.0.1:9/webhooks/stripe/x"  # nothing listens: any delivery would be a recorded attempt
    gone = hooks.subscribe_webhooks(key, url, SECRET, retry_delays=[])
    assert gone["account"] == key
    hooks.unsubscribe_webhooks(gone["id"])
    with stripe_api(own_sandbox, key) as api:
        call(api, "POST", "/v1/refunds", charge=refundable_charge(own_sandbox, key)["id"], amount=1)
    assert hooks.flush_webhooks()
    for body, message in (
        ({"api_key": "sk_test_nobody", "url": url, "secret": SECRET}, "unknown api_key"),
        ({"api_key": key, "url": url}, "secret must be"),
        ({"api_key": key, "url": url, "secret": SECRET, "enabled_events": []}, "enabled_events must be"),
        ({"api_key": key, "url": url, "secret": SECRET, "enabled_event": ["*"]}, "unknown webhook subscription"),
    ):
        response = httpx.post(f"{own_sandbox.url}/_sandbox/stripe/webhooks", json=body)
        assert response.status_code in (400, 404) and message in response.json()["error"]
    assert hooks.webhook_attempts() == []
