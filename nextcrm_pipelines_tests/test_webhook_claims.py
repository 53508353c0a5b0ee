"""The inbox claim: one run per event, replays and stranded batches run again, connection status, accounts.

- Two apply runs started together over the same 1,000 events apply each exactly once: the sandbox
  receives one request per event, and none is left `applying`.
- An apply run does not wait for a sync's lock: the busy connection's events are given back unspent.
- An event that went dead and is replayed runs at the next sensor tick, and so does a batch whose
  run died holding it (its lease lapsed): the run key names the work, not just the ids.
- A disabled connection's events are held; a `needs_reauth` connection's wait without spending
  attempts; both are applied once the connection is active.
- A Stripe event reaches only its own account: a Connect event of another connected account, or an
  event posted to another connection's URL under the app-wide secret, changes nothing.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import httpx
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.types.json import Jsonb

from nextcrm_pipelines.cli import main
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.runner import connection_lock
from nextcrm_pipelines.providers.stripe.webhooks import apply as stripe_apply
from nextcrm_pipelines.webhooks.inbox import _claim, apply_pending, due_batch
from nextcrm_pipelines_tests.test_webhook_inbox import charge, insert_event, payments, stripe_event
from nextcrm_pipelines_tests.test_webhook_receiver import SECRET, stripe_header
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply


def _connection(database_url: str, box, key: str, url: str | None = None, tenant: str | None = None,
                webhook_secret: str | None = None) -> str:  # fmt: skip
    """A Stripe connection; unpaced (the sandbox does not limit), so reading events back is quick."""
    secrets = {"api_key": key, **({"webhook_secret": webhook_secret} if webhook_secret else {})}
    with psycopg.connect(database_url) as conn:
        return vault.add_connection(conn, provider="stripe", display_name=f"Claims {key[-6:]}", box=box,
                                    secrets=secrets, base_url=url, external_tenant=tenant,
                                    settings={"requests_per_second": 0}).id  # fmt: skip


def _sandbox_events(sandbox, key: str, count: int) -> list[dict]:
    """The newest `count` events of a sandbox account, read through its API."""
    found: list[dict] = []
    params: dict[str, str | int] = {"limit": 100}
    with httpx.Client(base_url=sandbox.url, headers={"Authorization": f"Bearer {key}"}) as client:
        while len(found) < count:
            page = client.get("/v1/events", params=params).json()
            found.extend(page["data"])
            if not page["has_more"]:
                break
            params["starting_after"] = page["data"][-1]["id"]
    return found[:count]


def _store(database_url: str, schema: str, connection_id: str, events: list[dict]) -> None:
    with psycopg.connect(database_url) as conn:
        for event in events:
            insert_event(conn, schema, connection_id, event)
        conn.commit()


def test_two_apply_runs_started_together_apply_each_of_1000_events_once(database_url, schema, box, sandbox,
                                                                         stripe_account):  # fmt: skip
    key = stripe_account(charges=1100, subscriptions=0, days=20)
    # No webhook secret of its own: each event is read back from Stripe once before it is applied,
    # so the sandbox's request count is the number of times events were applied.
    connection_id = _connection(database_url, box, key, sandbox.url)
    events = _sandbox_events(sandbox, key, 1000)
    assert len(events) == 1000
    _store(database_url, schema, connection_id, events)
    before = sandbox.stripe_stats(key)["requests"]
    start = threading.Barrier(2)
    outcomes = []

    def run() -> None:
        start.wait()
        outcomes.append(apply_pending(database_url=database_url, schema=schema, provider="stripe", apply=stripe_apply,
                                      batch=100, box=box))  # fmt: skip

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 2
    # A run that met the connection in the other's hands gave those events back for a little while:
    # bring them due now and apply what is left, as the next sensor tick would.
    while True:
        with psycopg.connect(database_url) as conn:
            conn.execute(sql.SQL("UPDATE {} SET next_attempt_at = now() WHERE status = 'pending'").format(
                table("webhook_events", schema)))  # fmt: skip
            conn.commit()
        outcomes.append(apply_pending(database_url=database_url, schema=schema, provider="stripe",
                                      apply=stripe_apply, box=box))  # fmt: skip
        if not outcomes[-1].processed:
            break
    counts = [(o.processed, o.failed, getattr(o, "held", 0)) for o in outcomes]
    assert sandbox.stripe_stats(key)["requests"] - before == 1000, counts
    assert sum(o.processed for o in outcomes) == 1000 and not any(o.failed for o in outcomes), counts
    rows = inbox_rows(database_url, schema)
    assert {(status, attempts) for _, _, status, attempts, _ in rows} == {("processed", 1)}
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL("SELECT sum(total_records) FROM {} WHERE asset = 'stripe_webhooks'").format(
                table("integration_sync_logs", schema))
        ).fetchone()[0]  # fmt: skip
    assert logged == 1000


def test_an_apply_run_gives_back_the_events_of_a_connection_being_synced_instead_of_waiting(
    database_url, schema, box, sandbox, stripe_account
):
    key = stripe_account(charges=40, subscriptions=0, days=2)
    connection_id = _connection(database_url, box, key, sandbox.url)
    _store(database_url, schema, connection_id, _sandbox_events(sandbox, key, 5))
    with psycopg.connect(database_url) as sync, connection_lock(sync, connection_id):
        started = time.monotonic()
        outcome = apply_pending(database_url=database_url, schema=schema, provider="stripe", apply=stripe_apply,
                                box=box)  # fmt: skip
        assert time.monotonic() - started < 10
    assert (outcome.processed, outcome.failed, outcome.held) == (0, 0, 5)
    assert {(status, attempts) for _, _, status, attempts, _ in inbox_rows(database_url, schema)} == {("pending", 0)}
    with psycopg.connect(database_url) as conn:
        assert due_batch(conn, schema, "stripe", 10) is None  # deferred for a little while
        conn.execute(sql.SQL("UPDATE {} SET next_attempt_at = now()").format(table("webhook_events", schema)))
        conn.commit()
    outcome = apply_pending(database_url=database_url, schema=schema, provider="stripe", apply=stripe_apply, box=box)
    assert outcome.processed == 5


def test_a_dead_event_replayed_with_no_other_traffic_runs_at_the_next_tick(database_url, schema, box):
    connection_id = _connection(database_url, box, "sk_test_replay", webhook_secret=SECRET)
    broken = {"id": "ch_fixed_later", "object": "charge", "currency": "usd"}  # no amount: cannot be mapped
    with psycopg.connect(database_url) as conn:
        insert_event(conn, schema, connection_id, stripe_event("evt_dead", broken))
        conn.commit()
    with dg.instance_for_test() as instance:
        for _ in range(5):  # every attempt fails until the event is dead
            assert len(tick_and_apply(instance, "stripe")) == 1
            with psycopg.connect(database_url) as conn:
                conn.execute(sql.SQL("UPDATE {} SET next_attempt_at = now()").format(table("webhook_events", schema)))
                conn.commit()
        assert [r[2:4] for r in inbox_rows(database_url, schema)] == [("dead", 5)]
        assert tick_and_apply(instance, "stripe") == []
        with psycopg.connect(database_url) as conn:  # the cause is fixed, then the event is replayed
            conn.execute(sql.SQL("UPDATE {} SET payload = %s").format(table("webhook_events", schema)),
                         (Jsonb(stripe_event("evt_dead", charge("ch_fixed_later", 1234))),))  # fmt: skip
            conn.commit()
        _replay(["webhooks", "replay", "--provider", "stripe"])
        assert len(tick_and_apply(instance, "stripe")) == 1  # a new run key: the daemon starts it
    assert [r[2] for r in inbox_rows(database_url, schema)] == ["processed"]
    assert "ch_fixed_later" in payments(database_url, schema)


def _replay(args: list[str]) -> None:
    outcome = CliRunner().invoke(main, args, catch_exceptions=False)
    assert outcome.exit_code == 0, outcome.output


def test_a_batch_whose_run_died_holding_it_runs_at_the_next_tick_once_its_lease_lapses(database_url, schema, box):
    connection_id = _connection(database_url, box, "sk_test_stranded", webhook_secret=SECRET)
    _store(database_url, schema, connection_id, [stripe_event(f"evt_s{n}", charge(f"ch_s{n}", 100 + n))
                                                 for n in range(3)])  # fmt: skip
    with dg.instance_for_test() as instance:
        sensor = dg.build_sensor_context(instance=instance, resources={"mirror": _mirror()})
        from nextcrm_pipelines.definitions import defs

        (first,) = defs.resolve_sensor_def("stripe_webhooks_sensor").evaluate_tick(sensor).run_requests
        # The run the daemon started for it claims the events and dies before applying any.
        with psycopg.connect(database_url) as conn:
            _, claimed = _claim(conn, schema, "stripe", 100, lease=0.2)
        assert len(claimed) == 3
        assert [r[2] for r in inbox_rows(database_url, schema)] == ["applying"] * 3
        assert tick_and_apply(instance, "stripe") == []  # held by the claim while its lease runs
        time.sleep(0.3)
        (request,) = tick_and_apply(instance, "stripe")
        assert request.run_key != first.run_key
    assert set(payments(database_url, schema)) == {"ch_s0", "ch_s1", "ch_s2"}
    rows = inbox_rows(database_url, schema)
    assert {(status, attempts) for _, _, status, attempts, _ in rows} == {("processed", 2)}  # the lapse counted


def _mirror():
    from nextcrm_pipelines.definitions import defs

    return defs.resources["mirror"]


@pytest.mark.parametrize("status", ["disabled", "needs_reauth"])
def test_events_of_an_inactive_connection_wait_unspent_and_apply_once_it_is_active(database_url, schema, box, status):
    connection_id = _connection(database_url, box, f"sk_test_{status}", webhook_secret=SECRET)
    with psycopg.connect(database_url) as conn:
        vault.set_status(conn, connection_id, status, "set by the test")
        conn.commit()
    _store(database_url, schema, connection_id, [stripe_event("evt_h1", charge("ch_h1", 500))])
    with dg.instance_for_test() as instance:
        for _ in range(2):
            assert tick_and_apply(instance, "stripe") == []
            outcome = apply_pending(database_url=database_url, schema=schema, provider="stripe", apply=stripe_apply,
                                    box=box)  # fmt: skip
            assert outcome.processed == outcome.failed == 0
        assert [r[2:4] for r in inbox_rows(database_url, schema)] == [("pending", 0)]
        assert payments(database_url, schema) == {}
        with psycopg.connect(database_url) as conn:
            vault.set_status(conn, connection_id, "active", None)
            conn.commit()
        assert len(tick_and_apply(instance, "stripe")) == 1
    assert [r[2:4] for r in inbox_rows(database_url, schema)] == [("processed", 1)]
    assert set(payments(database_url, schema)) == {"ch_h1"}


def test_a_connect_event_applies_only_to_the_connection_of_its_account(database_url, schema, box):
    mine = _connection(database_url, box, "sk_test_platform_a", tenant="acct_mine", webhook_secret=SECRET)
    theirs = stripe_event("evt_theirs", charge("ch_theirs", 700))
    ours = stripe_event("evt_ours", charge("ch_ours", 800))
    _store(database_url, schema, mine, [{**theirs, "account": "acct_other"}, {**ours, "account": "acct_mine"}])
    outcome = apply_pending(database_url=database_url, schema=schema, provider="stripe", apply=stripe_apply, box=box)
    assert outcome.processed == 2 and outcome.skipped == 1
    assert set(payments(database_url, schema)) == {"ch_ours"}


def test_a_delivery_posted_to_another_connections_url_under_the_app_secret_changes_nothing(
    database_url, schema, box, sandbox, stripe_account, monkeypatch
):
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    owner_key, other_key = stripe_account(charges=30, subscriptions=0, days=2), stripe_account(charges=5, days=2)
    owner = _connection(database_url, box, owner_key, sandbox.url)
    other = _connection(database_url, box, other_key, sandbox.url)
    event = next(e for e in _sandbox_events(sandbox, owner_key, 50) if e["data"]["object"].get("object") == "charge")
    body = httpx.Response(200, json=event).content
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        for target in (other, owner):
            answer = httpx.post(f"{url}/webhooks/stripe/{target}", content=body,
                                headers={"Stripe-Signature": stripe_header(body)})  # fmt: skip
            assert answer.status_code == 200
        assert len(tick_and_apply(instance, "stripe")) == 1
    charge_id = event["data"]["object"]["id"]
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT connection_id FROM {} WHERE id = %s").format(table("stripe_payments", schema)),
            (charge_id,),
        ).fetchall()
    assert stored == [(owner,)]
    assert {status for _, _, status, _, _ in inbox_rows(database_url, schema)} == {"processed"}
