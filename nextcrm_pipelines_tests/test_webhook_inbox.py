"""The inbox machinery every provider shares: sensor batches, late commits, bad events, replay, UI.

- An inbox id that commits after a higher one (ids are taken at insert, rows appear at commit) is
  still applied: the sensor reads due rows by status, not past an id high-water mark.
- One event that cannot be applied fails alone: the rest of its batch is applied and processed.
- Event types no table uses are processed, counted as skipped, and kept.
- `nextcrm-pipelines webhooks replay` re-queues dead events, which the next tick applies; refused
  bodies (no readable event) are left as they are.
- An apply run shows as a materialization of each asset it changed, and writes a sync log row.
"""

from __future__ import annotations

import time
from datetime import date
from decimal import Decimal

import dagster as dg
import orjson
import psycopg
from click.testing import CliRunner
from psycopg import sql
from psycopg.types.json import Jsonb

from nextcrm_pipelines.cli import main
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.partitions import month_key
from nextcrm_pipelines.webhooks.inbox import due_batch
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, tick_and_apply


def charge(charge_id: str, amount: int, refunded: int = 0) -> dict:
    return {"id": charge_id, "object": "charge", "amount": amount, "amount_refunded": refunded, "currency": "usd",
            "status": "succeeded", "paid": True, "refunded": refunded == amount, "created": 1_780_000_000,
            "customer": "cus_1", "description": None, "metadata": {}}  # fmt: skip


def stripe_event(event_id: str, obj: dict, kind: str = "charge.updated", created: int | None = None) -> dict:
    return {"id": event_id, "object": "event", "type": kind, "created": created or int(time.time()),
            "data": {"object": obj}}  # fmt: skip


def insert_event(conn: psycopg.Connection, schema: str, connection_id: str, event: dict, **columns) -> int:
    """Store an event as the receiver would (without committing: the caller decides when)."""
    values = {"status": "pending", "attempts": 0, "last_error": None, "payload": Jsonb(event), **columns}
    return conn.execute(
        sql.SQL(
            "INSERT INTO {} (provider, connection_id, event_id, event_type, occurred_at, payload, raw_body, status, "
            "attempts, last_error) VALUES ('stripe', %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s) RETURNING id"
        ).format(table("webhook_events", schema)),
        (connection_id, event["id"], event["type"], event["created"], values["payload"],
         orjson.dumps(event).decode(), values["status"], values["attempts"], values["last_error"]),
    ).fetchone()[0]  # fmt: skip


def stripe_connection(database_url: str, box) -> str:
    """A Stripe connection with a webhook secret of its own (its deliveries need no read-back to apply)."""
    with psycopg.connect(database_url) as conn:
        secrets = {"api_key": "sk_test_inbox", "webhook_secret": "whsec_inbox"}
        return vault.add_connection(conn, provider="stripe", display_name="Inbox", box=box, secrets=secrets).id


def payments(database_url: str, schema: str) -> dict[str, tuple]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, amount, amount_refunded FROM {}").format(table("stripe_payments", schema))
        ).fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_an_id_that_commits_after_a_higher_one_is_still_applied(database_url, schema, box):
    connection_id = stripe_connection(database_url, box)
    with psycopg.connect(database_url) as slow, psycopg.connect(database_url) as fast, dg.instance_for_test() as inst:
        low = insert_event(slow, schema, connection_id, stripe_event("evt_slow", charge("ch_slow", 1000)))
        high = insert_event(fast, schema, connection_id, stripe_event("evt_fast", charge("ch_fast", 2000)))
        fast.commit()
        assert low < high
        first = tick_and_apply(inst, "stripe")
        assert len(first) == 1 and payments(database_url, schema) == {"ch_fast": (Decimal("20.00"), Decimal("0.00"))}
        slow.commit()  # the lower id appears only now
        second = tick_and_apply(inst, "stripe")
        assert len(second) == 1 and second[0].run_key != first[0].run_key
    assert set(payments(database_url, schema)) == {"ch_slow", "ch_fast"}
    assert [r[2] for r in inbox_rows(database_url, schema)] == ["processed", "processed"]


def test_the_sensor_keys_bounded_batches_and_requests_nothing_for_the_same_due_set(database_url, schema, box):
    connection_id = stripe_connection(database_url, box)
    with psycopg.connect(database_url) as conn:
        ids = [insert_event(conn, schema, connection_id, stripe_event(f"evt_{n}", charge(f"ch_{n}", 100 + n)))
               for n in range(5)]  # fmt: skip
        conn.commit()
        batch = due_batch(conn, schema, "stripe", limit=2)
        assert (batch.count, batch.first_id, batch.last_id) == (2, ids[0], ids[1])
    with dg.instance_for_test() as instance:
        sensor = dg.build_sensor_context(instance=instance, resources={"mirror": _mirror()})
        from nextcrm_pipelines.definitions import defs

        evaluate = defs.resolve_sensor_def("stripe_webhooks_sensor").evaluate_tick
        (request,) = evaluate(sensor).run_requests
        (again,) = evaluate(sensor).run_requests
        assert request.run_key == again.run_key  # the same due set: the daemon would skip it by its key
        assert request.run_config["ops"]["stripe_apply_inbox"]["config"]["max_events"] >= 1
    with psycopg.connect(database_url) as conn:
        assert due_batch(conn, schema, "stripe", limit=10).count == 5  # the sensor itself wrote nothing


def created_days(database_url: str, schema: str, ids: list[str]) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM {} WHERE id = ANY(%s)").format(
                table("stripe_payments", schema)
            ),
            (ids,),
        ).fetchall()
    return {row[0].isoformat() for row in rows}


def _mirror():
    from nextcrm_pipelines.definitions import defs

    return defs.resources["mirror"]


def test_one_bad_event_fails_alone_and_unused_types_are_processed_and_counted(database_url, schema, box):
    connection_id = stripe_connection(database_url, box)
    broken = {"id": "ch_broken", "object": "charge", "currency": "usd"}  # no amount: cannot be mapped
    events = [stripe_event("evt_good_1", charge("ch_good_1", 500)), stripe_event("evt_broken", broken),
              stripe_event("evt_product", {"id": "prod_9", "object": "product"}, kind="product.created"),
              stripe_event("evt_good_2", charge("ch_good_2", 700))]  # fmt: skip
    with psycopg.connect(database_url) as conn:
        for event in events:
            insert_event(conn, schema, connection_id, event)
        conn.commit()
    with dg.instance_for_test() as instance:
        assert len(tick_and_apply(instance, "stripe")) == 1
        (run,) = instance.get_runs()
        assert not run.is_success  # the failure is visible in the UI
        materialized = instance.fetch_materializations(dg.AssetKey("stripe_payments"), limit=10).records
        # One materialization per partition the good events' rows fall in, each with its own count.
        days = created_days(database_url, schema, ["ch_good_1", "ch_good_2"])
        assert {r.partition_key for r in materialized} == {f"{connection_id}|{month_key(date.fromisoformat(d))}"
                                                             for d in days}  # fmt: skip
        assert {r.asset_materialization.metadata["source"].value for r in materialized} == {"webhooks"}
        assert sum(r.asset_materialization.metadata["rows_changed"].value for r in materialized) == 2
        # The partition page's row count is the month's rows in the table, not what this run changed.
        with psycopg.connect(database_url) as conn:
            by_month = dict(conn.execute(
                sql.SQL("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-01'), count(*) FROM {} "
                        "WHERE connection_id = %s GROUP BY 1").format(table("stripe_payments", schema)),
                (connection_id,),
            ).fetchall())  # fmt: skip
        assert {r.partition_key: r.asset_materialization.metadata["dagster/row_count"].value for r in materialized} == {
            f"{connection_id}|{month}": count for month, count in by_month.items()
        }
    assert set(payments(database_url, schema)) == {"ch_good_1", "ch_good_2"}
    statuses = {event_id: (status, error) for event_id, _, status, _, error in inbox_rows(database_url, schema)}
    assert statuses["evt_good_1"] == ("processed", None) and statuses["evt_good_2"] == ("processed", None)
    assert statuses["evt_product"] == ("processed", None)  # kept, counted as skipped, not an error
    assert statuses["evt_broken"][0] == "failed" and "KeyError" in statuses["evt_broken"][1]
    with psycopg.connect(database_url) as conn:
        log = conn.execute(
            sql.SQL("SELECT status, total_records, inserted_records, failed_records, partition FROM {} "
                    "WHERE asset = 'stripe_webhooks'").format(table("integration_sync_logs", schema))
        ).fetchall()  # fmt: skip
    assert log == [("partial", 4, 2, 0, "webhooks")]


def test_replay_requeues_dead_events_and_the_next_tick_applies_them(database_url, schema, box):
    connection_id = stripe_connection(database_url, box)
    with psycopg.connect(database_url) as conn:
        insert_event(conn, schema, connection_id, stripe_event("evt_dead", charge("ch_dead", 900)), status="dead",
                     attempts=5, last_error="ConnectTimeout: earlier outage")  # fmt: skip
        conn.execute(
            sql.SQL("INSERT INTO {} (provider, connection_id, event_id, raw_body, status, last_error) "
                    "VALUES ('stripe', %s, 'body:x', 'not json', 'dead', 'unreadable event')").format(
                table("webhook_events", schema)),
            (connection_id,),
        )  # fmt: skip
        conn.commit()
    with dg.instance_for_test() as instance:
        assert tick_and_apply(instance, "stripe") == []  # dead events are not due
        outcome = CliRunner().invoke(main, ["webhooks", "replay", "--provider", "stripe"], catch_exceptions=False)
        assert outcome.exit_code == 0, outcome.output
        assert "re-queued 1 event(s)" in outcome.output and "left 1 refused" in outcome.output
        assert len(tick_and_apply(instance, "stripe")) == 1
    assert payments(database_url, schema) == {"ch_dead": (Decimal("9.00"), Decimal("0.00"))}
    statuses = {event_id: status for event_id, _, status, _, _ in inbox_rows(database_url, schema)}
    assert statuses == {"evt_dead": "processed", "body:x": "dead"}


def test_an_oauth_connection_without_a_tenant_names_the_command_that_reconnects_it(database_url, schema, box):
    import pytest

    from nextcrm_pipelines.webhooks.inbox import ApplyContext

    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(
            conn,
            provider="quickbooks",
            display_name="Books Without Realm",
            box=box,
            secrets={"refresh_token": "r"},
            base_url="http://127.0.0.1:9/quickbooks",
        )
        context = ApplyContext(conn=conn, schema=schema, connection_id=connection.id, database_url=database_url,
                               provider="quickbooks", box=box)  # fmt: skip
        with pytest.raises(ValueError, match="has no tenant id") as raised:
            context.tenant()
    assert "reconnect with `nextcrm-pipelines connect quickbooks --name 'Books Without Realm'" in str(raised.value)
