"""Provider strings holding NUL land with it removed, the hourly schedule re-reads days left partial, and the
Stripe transport follows no redirect."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg
import pytest
import stripe
import uvicorn
from psycopg import sql
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextcrm_pipelines.assets import run_since
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderError, RequestStats, RetryPolicy
from nextcrm_pipelines.core.runner import day_window, windows_held_whole
from nextcrm_pipelines.core.sync import SyncResult, SyncWindow, sync_entity
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.partitions import connections_partitions_name, month_key
from nextcrm_pipelines.providers.stripe import PAYMENTS
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_pipelines_tests.helpers import mirror_rows, sandbox_now, sync_days


def _sync_log(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT status, failed_records, error FROM {} ORDER BY id").format(
                table("integration_sync_logs", schema)
            )
        ).fetchall()


def test_a_charge_whose_description_holds_nul_lands_without_it(database_url, schema, sandbox, stripe_account,
                                                               stripe_connection):  # fmt: skip
    key = stripe_account(charges=40, subscriptions=2, days=1)
    connection = stripe_connection(key)
    client = stripe.StripeClient(key, base_addresses={"api": sandbox.url}, max_network_retries=0)
    charge = client.v1.charges.create({"amount": 1250, "currency": "usd", "description": "Gift\x00card \x00#7"})
    assert charge.description == "Gift\x00card \x00#7"  # the emulator keeps the NUL, as Stripe would

    (result,) = sync_days(database_url, schema, connection.id, "stripe_payments", [sandbox_now(sandbox).date()])

    assert result.status == "success" and result.counts.failed == 0
    stored = dict(mirror_rows(database_url, schema, "stripe_payments", "id, description"))
    assert stored[charge.id] == "Giftcard #7"
    with psycopg.connect(database_url) as conn:
        raw_description, raw_text = conn.execute(
            sql.SQL("SELECT raw->>'description', raw::text FROM {} WHERE id = %s").format(
                table("stripe_payments", schema)
            ),
            (charge.id,),
        ).fetchone()
    assert raw_description == "Giftcard #7" and "\\u0000" not in raw_text
    assert _sync_log(database_url, schema) == [("success", 0, None)]

    # The stored copy is what the provider's record becomes every time: a re-read leaves it alone.
    (again,) = sync_days(database_url, schema, connection.id, "stripe_payments", [sandbox_now(sandbox).date()])
    assert again.status == "success" and again.counts.updated == 0 and again.counts.inserted == 0


def test_nul_is_removed_from_keys_and_nested_strings_and_an_escaped_backslash_is_kept(database_url, schema,
                                                                                      stripe_connection):  # fmt: skip
    connection = stripe_connection("sk_test_unused")
    t0 = datetime(2026, 2, 1, tzinfo=UTC)
    good = [{"id": f"ch_{i}", "object": "charge", "amount": 100 + i, "currency": "eur", "status": "succeeded",
             "created": int(t0.timestamp()) + i, "description": f"order {i}"} for i in range(30)]  # fmt: skip
    nul = {**good[0], "id": "ch_nul", "description": "a\x00b", "customer": "cus_\x001",
           "metadata": {"no\x00te": ["x\x00", {"deep": "\x00\x00y"}], "path": "C:\\u0000"}}  # fmt: skip
    with psycopg.connect(database_url) as conn:
        result = sync_entity(conn=conn, schema=schema, provider="stripe", entity=PAYMENTS,
                             connection_id=connection.id, window=SyncWindow(t0, t0 + timedelta(days=1)),
                             pages=[[(r, t0) for r in [*good[:15], nul, *good[15:]]]],
                             stats=RequestStats())  # fmt: skip
        raw, description, customer = conn.execute(
            sql.SQL("SELECT raw, description, customer_id FROM {} WHERE id = 'ch_nul'").format(
                table("stripe_payments", schema)
            )
        ).fetchone()
    assert result.status == "success" and result.counts.inserted == 31 and result.counts.failed == 0
    assert (description, customer) == ("ab", "cus_1")
    # The literal text backslash-u0000 is no NUL: it is kept as it came.
    assert raw["metadata"] == {"note": ["x", {"deep": "y"}], "path": "C:\\u0000"}
    assert len(mirror_rows(database_url, schema, "stripe_payments", "id")) == 31


def _charges(day: date, count: int) -> list[dict]:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    return [{"id": f"ch_{day:%m%d}_{i}", "object": "charge", "amount": 100 + i, "currency": "eur",
             "status": "succeeded", "created": start + 60 * i} for i in range(count)]  # fmt: skip


def _sync_day(database_url: str, schema: str, connection_id: str, day: date, records: list[dict], *,
              then_fail: bool = False) -> SyncResult:  # fmt: skip
    """One real sync of the day's window of `stripe_payments`, logged under the day's partition; with
    `then_fail` the provider drops the connection after the first page."""
    window = day_window(day)

    def pages() -> Iterator[list[tuple[dict, datetime]]]:
        yield [(r, window.start) for r in records]
        if then_fail:
            raise ConnectionError("provider went away mid-listing")

    with psycopg.connect(database_url) as conn:
        return sync_entity(conn=conn, schema=schema, provider="stripe", entity=PAYMENTS, connection_id=connection_id,
                           window=window, pages=pages(), stats=RequestStats(),
                           partition=f"{connection_id}|{day}")  # fmt: skip


def _hourly_dates(instance: dg.DagsterInstance, when: datetime, database_url: str, schema: str) -> list[str]:
    """The days an hourly run at `when` syncs: the recent days, less those the sync logs hold whole."""
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                   resources={"mirror": defs.resources["mirror"]},
                                   repository_def=defs.get_repository_def()) as context:  # fmt: skip
        (request,) = defs.resolve_schedule_def("stripe_hourly").evaluate_tick(context).run_requests
    since = run_since(request.tags, when.date())
    days = [since + timedelta(days=n) for n in range((when.date() - since).days + 1)]
    connection_id = request.tags["dagster/asset_partition_range_start"].split("|")[0]
    assert {request.tags[f"dagster/asset_partition_range_{edge}"].split("|")[1] for edge in ("start", "end")} == {
        month_key(d) for d in days
    }
    with psycopg.connect(database_url) as conn:
        held = windows_held_whole(conn, schema, "stripe_payments", connection_id,
                                  [day_window(d).start for d in days])  # fmt: skip
    return [str(d) for d in days if day_window(d).start not in held]


def test_hourly_schedule_rereads_partial_and_failed_days_until_a_success_covers_them(database_url, schema,
                                                                                     stripe_connection):  # fmt: skip
    connection = stripe_connection("sk_test_unused")
    when = datetime(2026, 11, 26, 1, 7, tzinfo=UTC)
    today = when.date()
    old, failed, partial = (today - timedelta(days=n) for n in (3, 2, 1))
    refused = {"id": "ch_no_currency", "object": "charge", "amount": 5, "currency": None, "status": "succeeded",
               "created": int(day_window(partial).start.timestamp())}  # fmt: skip
    # Before the look-back: a partial day there is left alone.
    assert _sync_day(database_url, schema, connection.id, old, [*_charges(old, 5), refused]).status == "partial"
    # Whole, then a later sync of the same day lost a record: the latest log decides.
    assert _sync_day(database_url, schema, connection.id, partial, _charges(partial, 5)).status == "success"
    assert _sync_day(database_url, schema, connection.id, partial, [*_charges(partial, 5), refused]).status == "partial"
    with pytest.raises(ConnectionError):
        _sync_day(database_url, schema, connection.id, failed, _charges(failed, 5), then_fail=True)
    statuses = [s for s, _, _ in _sync_log(database_url, schema)]
    assert statuses == ["partial", "success", "partial", "failed"]

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("stripe"), [connection.id])
        assert _hourly_dates(instance, when, database_url, schema) == [str(failed), str(partial), str(today)]
        # Asked again an hour later, while nothing synced them, they still are.
        assert _hourly_dates(instance, when + timedelta(hours=1), database_url, schema) == [
            str(failed),
            str(partial),
            str(today),
        ]

        assert _sync_day(database_url, schema, connection.id, partial, _charges(partial, 5)).status == "success"
        assert _hourly_dates(instance, when, database_url, schema) == [str(failed), str(today)]
        assert _sync_day(database_url, schema, connection.id, failed, _charges(failed, 5)).status == "success"
        assert _hourly_dates(instance, when, database_url, schema) == [str(today)]


@pytest.fixture
def redirecting_stripe() -> Iterator[tuple[str, list[str]]]:
    """A server whose Stripe list answers a redirect to another path; yields its URL and the paths requested."""
    seen: list[str] = []

    async def charges(request: Request) -> Response:
        seen.append(request.url.path)
        return Response(status_code=307, headers={"Location": "/collect"})

    async def collect(request: Request) -> Response:
        seen.append(request.url.path)
        return Response(b'{"object": "list", "data": [], "has_more": false}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/charges", charges), Route("/collect", collect)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    ready = time.monotonic() + 10
    while not server.started and time.monotonic() < ready:
        time.sleep(0.01)  # uvicorn offers no event to await
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_the_stripe_transport_does_not_follow_a_redirect(redirecting_stripe):
    url, seen = redirecting_stripe
    connection = Connection(id="stripe-redirect", provider="stripe", display_name="Redirect", base_url=url,
                            settings={"requests_per_second": 0})  # fmt: skip
    retry = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05, budget_seconds=5)
    api = StripeApi(connection, Secrets({"api_key": "sk_test_redirected_key"}), retry=retry)
    with api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 1})
    # The key went to the address it was meant for, and nowhere the answer pointed.
    assert seen == ["/v1/charges"]
    assert "sk_test_redirected_key" not in str(failure.value)
