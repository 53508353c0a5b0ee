"""The outbox against the Stripe sandbox, over real HTTP and a real Postgres: an action is sent exactly once
(retries under the same key, a worker killed after Stripe accepted, two runs over the same rows), what Stripe
answers lands in the mirror in the same run and a later sync changes nothing, and a bad action fails with a
message naming the field before anything is sent."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from nextcrm_pipelines.cli import main
from nextcrm_pipelines.core import outbox
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.money import currency_exponent
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.outbox_helpers import applier, crash, rows, submit, through_dagster

STRIPE = get_provider("stripe")
apply = applier(STRIPE)


def refundable(sandbox, key: str) -> dict:
    """A succeeded charge in a currency with cents and nothing refunded yet, as the sandbox holds it."""
    charges = sandbox.stripe_export(key, "charges")
    return next(c for c in charges if c["status"] == "succeeded" and not c["amount_refunded"]
                and currency_exponent(c["currency"]) == 2 and c["amount"] > 500)  # fmt: skip


def charge_now(sandbox, key: str, charge_id: str) -> dict:
    return next(c for c in sandbox.stripe_export(key, "charges") if c["id"] == charge_id)


def test_a_refund_through_dagster_is_sent_once_lands_in_the_mirror_and_a_later_sync_changes_nothing(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=40, subscriptions=0, days=2)
    connection = stripe_connection(key)
    charge = refundable(sandbox, key)
    day = datetime.fromtimestamp(charge["created"], UTC).date()
    assert sync_partitions(database_url=database_url, schema=schema, provider=STRIPE, entity_name="stripe_payments",
                           connection_id=connection.id, windows=[day_window(day)])[0].status == "success"  # fmt: skip
    done = submit(database_url, schema, connection.id, "refund_charge",
                  {"charge": charge["id"], "amount": "1.25", "currency": charge["currency"]})  # fmt: skip
    # One run, after which nothing is due any more: the next tick asks for no run.
    (materialization,) = through_dagster("stripe")
    assert materialization.asset_key == dg.AssetKey("stripe_payments")
    row = rows(database_url, schema)[done.id]
    assert row["status"] == "succeeded" and row["attempts"] == 1 and row["result_id"].startswith("re_")
    assert row["result"]["amount"] == 125 and row["result"]["charge"] == charge["id"]
    assert charge_now(sandbox, key, charge["id"])["amount_refunded"] == 125
    # Read your writes: the charge row carries the refund at once, and its month partition is materialised.
    stored = mirror(database_url, schema, "stripe_payments", connection.id)[charge["id"]]
    assert stored["amount_refunded"] == Decimal("1.25")
    assert materialization.partition == f"{connection.id}|{day:%Y-%m}-01"
    again = sync_partitions(database_url=database_url, schema=schema, provider=STRIPE, entity_name="stripe_payments",
                            connection_id=connection.id, windows=[day_window(day)])[0]  # fmt: skip
    assert again.status == "success" and again.counts.inserted == again.counts.updated == 0


BAD = [
    ("refund_charge", {}, "charge: Field required"),
    ("refund_charge", {"charge": "ch_1", "amount": "5.00", "currency": "ZZZ"}, "currency: Invalid ISO 4217"),
    ("refund_charge", {"charge": "ch_1", "amount": "-5", "currency": "usd"}, "amount: Input should be greater than 0"),
    ("refund_charge", {"charge": "ch_1", "amount": 5.5, "currency": "usd"}, "not as floating-point numbers"),
    ("refund_charge", {"charge": "ch_1", "amount": "5.001", "currency": "usd"}, "USD amounts have 2 decimal places"),
    ("refund_charge", {"charge": "ch_1", "amount": "5"}, "both amount and currency"),
    ("refund_charge", {"charge": "ch_1", "surprise": 1}, "surprise: Extra inputs are not permitted"),
    ("refund_everything", {"charge": "ch_1"}, "stripe has no action 'refund_everything'"),
]


def test_bad_actions_fail_naming_the_field_and_nothing_is_sent(database_url, schema, sandbox, stripe_account,
                                                               stripe_connection):  # fmt: skip
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    ids = [submit(database_url, schema, connection.id, action, payload).id for action, payload, _ in BAD]
    orphan = submit(database_url, schema, "stripe-no-such-account", "refund_charge", {"charge": "ch_1"}).id
    requests = sandbox.stripe_stats(key)["requests"]
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
        assert stored[action_id]["sent_at"] is None
    # A row naming no connection is failed as it is stored, and no run ever takes it.
    assert stored[orphan]["status"] == "failed" and "no connection 'stripe-no-such-account'" in stored[orphan]["error"]
    assert sandbox.stripe_stats(key)["requests"] == requests  # nothing reached Stripe


def test_the_cli_refuses_a_bad_payload_before_storing_it_and_submits_a_good_one_once(
    database_url, schema, sandbox, stripe_account, stripe_connection, secret_key
):
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    runner = CliRunner()
    refused = runner.invoke(main, ["actions", "submit", connection.id, "refund_charge", "--json",
                                   '{"charge": "ch_1", "amount": "-1", "currency": "eur"}'])  # fmt: skip
    assert refused.exit_code != 0 and "amount: Input should be greater than 0" in refused.output
    assert not rows(database_url, schema)
    unknown = runner.invoke(main, ["actions", "submit", "stripe-nope", "refund_charge", "--json", "{}"])
    assert unknown.exit_code != 0 and "no connection 'stripe-nope'" in unknown.output
    args = ["actions", "submit", connection.id, "create_customer", "--json", '{"description": "From the CRM"}',
            "--key", "crm-42"]  # fmt: skip
    first, second = runner.invoke(main, args), runner.invoke(main, args)
    assert first.exit_code == 0 and "submitted" in first.output, first.output
    assert second.exit_code == 0 and "already submitted" in second.output
    (action_id,) = rows(database_url, schema)
    other = runner.invoke(main, ["actions", "submit", connection.id, "create_customer", "--json", "{}", "--key",
                                 "crm-42"])  # fmt: skip
    assert other.exit_code != 0 and "already used" in other.output
    shown = runner.invoke(main, ["actions", "show", str(action_id)])
    assert "status: pending" in shown.output and "key crm-42" in shown.output
    assert runner.invoke(main, ["actions", "cancel", str(action_id)]).exit_code == 0
    assert rows(database_url, schema)[action_id]["status"] == "cancelled"
    assert "only failed or dead" in runner.invoke(main, ["actions", "retry", str(action_id)]).output


def test_server_errors_are_retried_under_the_same_key_and_the_refund_happens_once(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=20, subscriptions=0, days=1)
    connection = stripe_connection(key)
    charge = refundable(sandbox, key)
    done = submit(database_url, schema, connection.id, "refund_charge",
                  {"charge": charge["id"], "amount": "1", "currency": charge["currency"]})  # fmt: skip
    sandbox.set_stripe_faults(key, server_errors=50)
    try:
        first = apply(database_url, schema)
    finally:
        sandbox.clear_stripe_faults(key)
    row = rows(database_url, schema)[done.id]
    # A 5xx may have been acted on: the outcome is unknown, and the retry goes under the same key.
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 500" in row["error"]
    second = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert second.succeeded == 1 and row["status"] == "succeeded" and row["attempts"] == 2
    assert charge_now(sandbox, key, charge["id"])["amount_refunded"] == row["result"]["amount"]


def test_a_row_the_mirror_refuses_leaves_its_action_to_retry_and_the_next_action_of_the_run_succeeds(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    key = stripe_account(charges=30, subscriptions=0, days=1)
    connection = stripe_connection(key)
    refused, accepted = [c for c in sandbox.stripe_export(key, "charges") if c["status"] == "succeeded"
                         and not c["amount_refunded"] and currency_exponent(c["currency"]) == 2
                         and c["amount"] > 500][:2]  # fmt: skip
    done = [submit(database_url, schema, connection.id, "refund_charge",
                   {"charge": c["id"], "amount": "1", "currency": c["currency"]})
            for c in (refused, accepted)]  # fmt: skip
    target = table("stripe_payments", schema)
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT test_refused CHECK (id <> {})").format(
            target, sql.Literal(refused["id"])))  # fmt: skip
    first = apply(database_url, schema)
    stored = rows(database_url, schema)
    # One writer per entity serves the run's actions: the first's refusal is not taken for the second's.
    assert (first.retrying, first.succeeded) == (1, 1)
    assert stored[done[0].id]["status"] == "unknown" and "the mirror refused" in stored[done[0].id]["error"]
    assert stored[done[1].id]["status"] == "succeeded"
    assert mirror(database_url, schema, "stripe_payments", connection.id)[accepted["id"]]["amount_refunded"] == 1
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT test_refused").format(target))
    second = apply(database_url, schema)  # the same key: Stripe answers with the first refund
    assert second.succeeded == 1 and rows(database_url, schema)[done[0].id]["status"] == "succeeded"
    assert charge_now(sandbox, key, refused["id"])["amount_refunded"] == 100


def test_a_worker_killed_after_stripe_accepted_leaves_one_refund_and_the_next_run_records_it(
    database_url, schema, sandbox, stripe_account, stripe_connection, secret_key
):
    key = stripe_account(charges=20, subscriptions=0, days=1)
    connection = stripe_connection(key)
    charge = refundable(sandbox, key)
    done = submit(database_url, schema, connection.id, "refund_charge",
                  {"charge": charge["id"], "amount": "2", "currency": charge["currency"]})  # fmt: skip
    crash(database_url, schema, "stripe")
    accepted = charge_now(sandbox, key, charge["id"])["amount_refunded"]
    assert accepted > 0 and rows(database_url, schema)[done.id]["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses
    after = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert after.succeeded == 1 and row["status"] == "succeeded" and row["result_id"].startswith("re_")
    # Stripe answered the repeated key with the first refund: still one refund of that amount.
    assert charge_now(sandbox, key, charge["id"])["amount_refunded"] == accepted == row["result"]["amount"]


def test_two_runs_over_the_same_500_actions_send_each_once(database_url, schema, sandbox, stripe_account,
                                                           stripe_connection):  # fmt: skip
    key = stripe_account(charges=1, subscriptions=0, days=1)
    connection = stripe_connection(key, requests_per_second=500)
    before = {c["id"] for c in sandbox.stripe_export(key, "customers")}
    with psycopg.connect(database_url) as conn:
        for n in range(500):
            outbox.submit(conn, schema, connection_id=connection.id, action="create_customer",
                          payload={"description": f"crm customer {n}", "metadata": {"crm_id": str(n)}})  # fmt: skip
    sent: list[int] = [0, 0]
    start = threading.Barrier(2)

    def run(number: int) -> None:
        """One apply run's worth of work, taken in claims of 25 until nothing is due (both start together)."""
        start.wait()
        while done := apply(database_url, schema, limit=25).succeeded:
            sent[number] += done

    runs = [threading.Thread(target=run, args=(number,)) for number in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(timeout=300)
    assert sum(sent) == 500 and all(sent), sent  # both took a share, and together each action once
    stored = rows(database_url, schema)
    assert {r["status"] for r in stored.values()} == {"succeeded"}
    created = [c for c in sandbox.stripe_export(key, "customers") if c["id"] not in before]
    assert len(created) == 500 and {c["id"] for c in created} == {r["result_id"] for r in stored.values()}
    mirrored = mirror(database_url, schema, "stripe_customers", connection.id)
    assert set(mirrored) == {r["result_id"] for r in stored.values()}
    assert sorted(int(row["raw"]["metadata"]["crm_id"]) for row in mirrored.values()) == list(range(500))


@pytest.mark.parametrize("retry_status", ["dead"])
def test_a_dead_action_is_retried_from_the_cli_and_looked_up_first_when_it_may_have_been_sent(
    database_url, schema, sandbox, stripe_account, stripe_connection, retry_status
):
    key = stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection(key)
    done = submit(database_url, schema, connection.id, "create_customer", {"description": "again"})
    with psycopg.connect(database_url) as conn:
        conn.execute(sql.SQL("UPDATE {} SET status = %s, attempts = 5, sent_at = now(), error = 'timed out' "
                             "WHERE id = %s").format(table("integration_outbox", schema)),
                     (retry_status, done.id))  # fmt: skip
    result = CliRunner().invoke(main, ["actions", "retry", str(done.id)])
    assert result.exit_code == 0 and "unknown again" in result.output, result.output
    assert rows(database_url, schema)[done.id]["attempts"] == 0
    assert apply(database_url, schema).succeeded == 1
    assert rows(database_url, schema)[done.id]["status"] == "succeeded"


def test_refused_credentials_hold_the_action_and_mark_the_connection_without_spending_attempts(
    database_url, schema, sandbox, stripe_account, stripe_connection
):
    from nextcrm_pipelines.core import connections as vault

    stripe_account(charges=5, subscriptions=0, days=1)
    connection = stripe_connection("sk_test_" + "r" * 24, name="Revoked")
    done = submit(database_url, schema, connection.id, "create_customer", {"description": "held"})
    first = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert first.held == 1 and row["status"] == "pending" and row["attempts"] == 0, row
    with psycopg.connect(database_url) as conn:
        marked = vault.get_connection(conn, connection.id)
        assert marked.status == "needs_reauth" and "set-secret" in marked.last_error
        # Not claimed again while the connection waits for working credentials: no run, no request.
        assert outbox.due_batch(conn, schema, "stripe") is None
    assert apply(database_url, schema).processed == 0
