"""Tests of the Stripe emulator in ``nextcrm_sandbox``, driven over real loopback HTTP.

The official stripe-python client is pointed at the sandbox so the emulator is checked against the
behaviour the sync code will rely on: auto paging, ``created`` windows, hidden canceled subscriptions,
error classes, refunds feeding the events feed, the 30-day events retention on the sandbox clock,
idempotency replay and determinism of generated accounts.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import stripe

from nextcrm_sandbox.server import SandboxServer, build_app, main
from nextcrm_sandbox.stripe import (
    EVENT_RETENTION_SECONDS,
    StripeAccount,
    mask_api_key,
    parse_bracket_params,
)

READ_KEY = "sk_test_reader000000000000000001"
TWIN_KEY = "sk_test_reader000000000000000002"
WRITE_KEY = "sk_test_writer000000000000000001"
LIMITED_KEY = "sk_test_limited00000000000000001"
FAULT_KEY = "sk_test_faults000000000000000001"
NOW = 1_770_000_000


# Built, so that no string in the repository looks like a live Stripe key.
LIVE_PREFIX = "sk_" + "live_"


def _client(server: SandboxServer, key: str) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": server.url}, max_network_retries=0)


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    common = {"seed": 7, "charges": 500, "subscriptions": 80, "requests_per_second": 0, "now": NOW}
    accounts = [
        {"api_key": READ_KEY, **common},
        {"api_key": TWIN_KEY, **common},
        {"api_key": WRITE_KEY, "seed": 11, "charges": 300, "subscriptions": 40, "requests_per_second": 0},
        {"api_key": FAULT_KEY, "seed": 5, "charges": 50, "subscriptions": 10, "requests_per_second": 0},
    ]
    with SandboxServer(accounts, now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}) as client:
        yield client


# --- listing -------------------------------------------------------------------------------------------


def test_auto_paging_returns_exactly_the_exported_charges(server: SandboxServer) -> None:
    client = _client(server, READ_KEY)
    listed = [ch.id for ch in client.v1.charges.list({"limit": 100}).auto_paging_iter()]
    export = server.stripe_export(READ_KEY, "charges")
    assert len(listed) == 500
    assert listed == [row["id"] for row in export]
    keys = [(row["created"], row["id"]) for row in export]
    assert keys == sorted(keys, reverse=True)


def test_created_window_filters(server: SandboxServer) -> None:
    client = _client(server, READ_KEY)
    export = server.stripe_export(READ_KEY, "charges")
    created = sorted(row["created"] for row in export)
    gte, lt = created[100], created[300]
    params: dict[str, Any] = {"limit": 100, "created": {"gte": gte, "lt": lt}}
    got = [ch.id for ch in client.v1.charges.list(params).auto_paging_iter()]
    assert got == [row["id"] for row in export if gte <= row["created"] < lt]
    exact = created[42]
    got_exact = {ch.id for ch in client.v1.charges.list({"created": exact, "limit": 100})}
    assert got_exact == {row["id"] for row in export if row["created"] == exact}


def test_ending_before_returns_the_previous_page_newest_first(http: httpx.Client, server: SandboxServer) -> None:
    ids = [row["id"] for row in server.stripe_export(READ_KEY, "charges")]
    page = http.get("/v1/charges", params={"limit": 5, "ending_before": ids[20]}).json()
    assert [c["id"] for c in page["data"]] == ids[15:20]
    assert page["has_more"] is True
    first = http.get("/v1/charges", params={"limit": 5, "ending_before": ids[3]}).json()
    assert [c["id"] for c in first["data"]] == ids[0:3]
    assert first["has_more"] is False
    after = http.get("/v1/charges", params={"limit": 3, "starting_after": ids[-3]}).json()
    assert [c["id"] for c in after["data"]] == ids[-2:]
    assert after["has_more"] is False
    assert after["url"] == "/v1/charges" and after["object"] == "list"


def test_backward_auto_paging_with_ending_before(server: SandboxServer) -> None:
    client = _client(server, READ_KEY)
    ids = [row["id"] for row in server.stripe_export(READ_KEY, "charges")]
    walked = [ch.id for ch in client.v1.charges.list({"limit": 7, "ending_before": ids[30]}).auto_paging_iter()]
    assert walked == list(reversed(ids[:30]))


def test_customer_filter_and_expand(server: SandboxServer, http: httpx.Client) -> None:
    export = server.stripe_export(READ_KEY, "charges")
    customer = next(row["customer"] for row in export if row["customer"])
    client = _client(server, READ_KEY)
    mine = [ch.id for ch in client.v1.charges.list({"customer": customer, "limit": 100}).auto_paging_iter()]
    assert mine == [row["id"] for row in export if row["customer"] == customer]
    page = http.get("/v1/charges", params={"limit": 5, "expand[]": "data.customer", "customer": customer}).json()
    assert page["data"] and all(c["customer"]["id"] == customer for c in page["data"])
    assert page["data"][0]["customer"]["object"] == "customer"
    bad = http.get("/v1/charges", params={"expand[]": "data.invoice"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expand"


def test_subscriptions_hide_ended_unless_status_all(server: SandboxServer) -> None:
    client = _client(server, READ_KEY)
    export = server.stripe_export(READ_KEY, "subscriptions")
    statuses = {row["status"] for row in export}
    assert statuses == {
        "incomplete",
        "incomplete_expired",
        "trialing",
        "active",
        "past_due",
        "canceled",
        "unpaid",
        "paused",
    }
    default = [s.id for s in client.v1.subscriptions.list({"limit": 100}).auto_paging_iter()]
    everything = [s.id for s in client.v1.subscriptions.list({"status": "all", "limit": 100}).auto_paging_iter()]
    ended = [s.id for s in client.v1.subscriptions.list({"status": "ended", "limit": 100}).auto_paging_iter()]
    canceled = list(client.v1.subscriptions.list({"status": "canceled", "limit": 100}).auto_paging_iter())
    assert everything == [row["id"] for row in export]
    assert default == [row["id"] for row in export if row["status"] not in ("canceled", "incomplete_expired")]
    assert ended == [row["id"] for row in export if row["status"] in ("canceled", "incomplete_expired")]
    assert canceled and all(s.status == "canceled" and s.canceled_at and s.ended_at for s in canceled)
    item = canceled[0]["items"]["data"][0]
    assert item["current_period_start"] < item["current_period_end"]
    assert isinstance(item["price"]["unit_amount"], int) and item["price"]["currency"]


def test_events_type_filters(server: SandboxServer, http: httpx.Client) -> None:
    client = _client(server, READ_KEY)
    all_events = list(client.v1.events.list({"limit": 100}).auto_paging_iter())
    assert all_events
    now = server.clock()
    assert all(now - EVENT_RETENTION_SECONDS <= e.created <= now for e in all_events)
    charge_events = [e.id for e in client.v1.events.list({"type": "charge.*", "limit": 100}).auto_paging_iter()]
    assert charge_events == [e.id for e in all_events if e.type.startswith("charge.")]
    picked = ["charge.failed", "customer.subscription.deleted"]
    typed = [e.id for e in client.v1.events.list({"types": picked, "limit": 100}).auto_paging_iter()]
    assert typed == [e.id for e in all_events if e.type in picked]
    both = http.get("/v1/events", params={"type": "charge.failed", "types[]": "charge.failed"})
    assert both.status_code == 400
    too_many = http.get("/v1/events", params=[("types[]", f"x.{i}") for i in range(21)])
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "types"
    event = all_events[0]
    assert set(event.to_dict()) >= {"id", "object", "api_version", "created", "data", "livemode", "request"}
    assert event.data.object.id


# --- errors and HTTP details ---------------------------------------------------------------------------


def test_bad_key_raises_authentication_error_without_echoing_the_key(server: SandboxServer) -> None:
    key = "sk_test_doesnotexist0000000009876"
    with pytest.raises(stripe.AuthenticationError) as info:
        _client(server, key).v1.charges.list()
    assert key not in str(info.value)
    assert "sk_test_****9876" in str(info.value)
    assert mask_api_key(LIVE_PREFIX + "0123456789abcdefWXYZ") == "sk_live_****WXYZ"


def test_basic_auth_and_response_headers(server: SandboxServer) -> None:
    resp = httpx.get(f"{server.url}/v1/customers", params={"limit": 2}, auth=(READ_KEY, ""))
    assert resp.status_code == 200
    assert resp.headers["request-id"].startswith("req_")
    assert resp.headers["content-type"] == "application/json"
    assert len(resp.json()["data"]) == 2
    missing = httpx.get(f"{server.url}/v1/charges")
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"


def test_parameter_errors(server: SandboxServer, http: httpx.Client) -> None:
    for limit in (0, 101, "x"):
        resp = http.get("/v1/charges", params={"limit": limit})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "limit"
    ids = [row["id"] for row in server.stripe_export(READ_KEY, "charges")]
    both = http.get("/v1/charges", params={"starting_after": ids[1], "ending_before": ids[0]})
    assert both.status_code == 400
    unknown = http.get("/v1/charges", params={"starting_after": "ch_3nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "starting_after"
    client = _client(server, READ_KEY)
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.charges.retrieve("ch_3doesnotexist")
    assert info.value.code == "resource_missing" and info.value.http_status == 404
    assert client.v1.charges.retrieve(ids[0]).id == ids[0]
    odd = http.get("/v1/charges", params={"colour": "blue"})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "colour"
    nowhere = http.get("/v1/balance_transactions")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_burst_and_token_bucket(server: SandboxServer) -> None:
    client = _client(server, FAULT_KEY)
    server.set_stripe_faults(FAULT_KEY, rate_limit_burst=2)
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError) as info:
            client.v1.charges.list()
        assert info.value.headers["stripe-should-retry"] == "true"
    assert len(client.v1.charges.list().data) == 10
    assert server.stripe_stats(FAULT_KEY)["rate_limited"] >= 2

    server.add_stripe_account(LIMITED_KEY, seed=1, charges=20, subscriptions=2, requests_per_second=3)
    limited = _client(server, LIMITED_KEY)
    outcomes = []
    for _ in range(6):
        try:
            limited.v1.charges.list({"limit": 1})
            outcomes.append("ok")
        except stripe.RateLimitError:
            outcomes.append("429")
    assert outcomes[:3] == ["ok", "ok", "ok"] and "429" in outcomes[3:]


def test_server_errors_latency_and_fail_after(server: SandboxServer) -> None:
    client = _client(server, FAULT_KEY)
    server.set_stripe_faults(FAULT_KEY, server_errors=1, latency_ms=50)
    started = time.perf_counter()
    with pytest.raises(stripe.APIError) as info:
        client.v1.charges.list()
    assert info.value.http_status == 500
    client.v1.charges.list()
    assert time.perf_counter() - started >= 0.1
    server.clear_stripe_faults(FAULT_KEY)
    server.set_stripe_faults(FAULT_KEY, fail_after_requests=2)
    client.v1.charges.list()
    client.v1.customers.list()
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            client.v1.charges.list()
    server.clear_stripe_faults(FAULT_KEY)
    client.v1.charges.list()
    stats = server.stripe_stats(FAULT_KEY)
    assert stats["server_errors"] >= 3 and stats["requests"] >= 7


# --- mutations -----------------------------------------------------------------------------------------


def _refundable(server: SandboxServer, currency: str | None = None) -> dict[str, Any]:
    return next(
        row
        for row in server.stripe_export(WRITE_KEY, "charges")
        if row["status"] == "succeeded"
        and row["amount_refunded"] == 0
        and row["amount"] >= 100
        and (currency is None or row["currency"] == currency)
    )


def test_refund_updates_charge_and_feeds_events(server: SandboxServer) -> None:
    client = _client(server, WRITE_KEY)
    target = _refundable(server)
    partial = target["amount"] // 2
    refund = client.v1.refunds.create({"charge": target["id"], "amount": partial})
    assert refund.id.startswith("re_") and refund.amount == partial and refund.charge == target["id"]
    charge = client.v1.charges.retrieve(target["id"])
    assert charge.amount_refunded == partial and charge.refunded is False
    rest = client.v1.refunds.create({"charge": target["id"]})
    assert rest.amount == target["amount"] - partial
    charge = client.v1.charges.retrieve(target["id"])
    assert charge.refunded is True and charge.amount_refunded == target["amount"]

    refunded_events = [
        e for e in client.v1.events.list({"type": "charge.refunded", "limit": 100}) if e.data.object.id == target["id"]
    ]
    snapshots = sorted(
        (e.data.object.amount_refunded, e.data.object.refunded, e.data.previous_attributes.to_dict())
        for e in refunded_events
    )
    assert snapshots == [
        (partial, False, {"amount_refunded": 0, "refunded": False}),
        (target["amount"], True, {"amount_refunded": partial, "refunded": False}),
    ]
    refund_events = {e.data.object.id for e in client.v1.events.list({"type": "refund.created", "limit": 10})}
    assert {refund.id, rest.id} <= refund_events
    assert {r.id for r in client.v1.refunds.list({"charge": target["id"]})} == {refund.id, rest.id}
    row = next(r for r in server.stripe_export(WRITE_KEY, "charges") if r["id"] == target["id"])
    assert row["refunded"] is True and row["amount_refunded"] == target["amount"]

    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create({"charge": target["id"]})
    failed = next(r for r in server.stripe_export(WRITE_KEY, "charges") if r["status"] == "failed")
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.create({"charge": failed["id"]})
    other = _refundable(server)
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.refunds.create({"charge": other["id"], "amount": other["amount"] + 1})
    assert info.value.param == "amount"


def test_idempotency_replay_and_conflict(server: SandboxServer) -> None:
    client = _client(server, WRITE_KEY)
    target = _refundable(server)
    key = f"refund-{uuid.uuid4()}"
    first = client.v1.refunds.create({"charge": target["id"], "amount": 10}, {"idempotency_key": key})
    again = client.v1.refunds.create({"charge": target["id"], "amount": 10}, {"idempotency_key": key})
    assert first.id == again.id
    assert again.last_response.headers.get("idempotent-replayed") == "true"
    assert client.v1.charges.retrieve(target["id"]).amount_refunded == 10
    with pytest.raises(stripe.IdempotencyError):
        client.v1.refunds.create({"charge": target["id"], "amount": 11}, {"idempotency_key": key})


def test_create_charge_cancel_and_update_subscription(server: SandboxServer) -> None:
    client = _client(server, WRITE_KEY)
    customer = next(c.id for c in client.v1.customers.list({"limit": 1}))
    charge = client.v1.charges.create({"amount": 1500, "currency": "jpy", "customer": customer})
    assert charge.status == "succeeded" and charge.amount == 1500 and charge.currency == "jpy"
    assert client.v1.charges.list({"limit": 1}).data[0].id == charge.id
    succeeded = [e.data.object.id for e in client.v1.events.list({"type": "charge.succeeded", "limit": 5})]
    assert charge.id in succeeded

    sub = next(s for s in client.v1.subscriptions.list({"status": "active", "limit": 100}))
    updated = client.v1.subscriptions.update(sub.id, {"metadata": {"crm_id": "42"}})
    assert updated.metadata.to_dict() == {"crm_id": "42"}
    upd_event = client.v1.events.list({"type": "customer.subscription.updated", "limit": 1}).data[0]
    assert upd_event.data.object.id == sub.id
    assert upd_event.data.previous_attributes.to_dict() == {"metadata": {}}

    canceled = client.v1.subscriptions.cancel(sub.id)
    assert canceled.status == "canceled" and canceled.canceled_at == canceled.ended_at
    deleted = client.v1.events.list({"type": "customer.subscription.deleted", "limit": 1}).data[0]
    assert deleted.data.object.id == sub.id and deleted.data.object.status == "canceled"
    assert sub.id not in {s.id for s in client.v1.subscriptions.list({"limit": 100}).auto_paging_iter()}
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.subscriptions.cancel(sub.id)
    assert info.value.http_status == 404


# --- clock, determinism, money -------------------------------------------------------------------------


def test_clock_advance_expires_old_events() -> None:
    key = "sk_test_clock0000000000000000001"
    with SandboxServer(
        [{"api_key": key, "seed": 3, "charges": 300, "subscriptions": 30, "requests_per_second": 0}],
        now=NOW,
    ) as srv:
        client = _client(srv, key)
        start = srv.clock()
        assert abs(start - NOW) < 60
        events = list(client.v1.events.list({"limit": 100}).auto_paging_iter())
        oldest = events[-1]
        assert oldest.created >= start - EVENT_RETENTION_SECONDS
        assert client.v1.events.retrieve(oldest.id).id == oldest.id
        assert srv.advance_clock(31 * 86400) >= start + 31 * 86400
        remaining = {e.id for e in client.v1.events.list({"limit": 100}).auto_paging_iter()}
        assert oldest.id not in remaining
        with pytest.raises(stripe.InvalidRequestError) as info:
            client.v1.events.retrieve(oldest.id)
        assert info.value.http_status == 404
        target = next(r for r in srv.stripe_export(key, "charges") if r["status"] == "succeeded")
        client.v1.refunds.create({"charge": target["id"]})
        fresh = client.v1.events.list({"limit": 2}).data
        assert {e.type for e in fresh} == {"charge.refunded", "refund.created"}
        assert all(e.created >= start + 31 * 86400 for e in fresh)


def test_same_seed_gives_identical_accounts(server: SandboxServer) -> None:
    with (
        httpx.Client(base_url=server.url, auth=(READ_KEY, "")) as a,
        httpx.Client(base_url=server.url, auth=(TWIN_KEY, "")) as b,
    ):
        for path in ("/v1/charges", "/v1/subscriptions", "/v1/customers", "/v1/refunds"):
            assert a.get(path, params={"limit": 100}).content == b.get(path, params={"limit": 100}).content
    assert server.stripe_export(READ_KEY, "charges") == server.stripe_export(TWIN_KEY, "charges")
    one = StripeAccount("sk_test_x", seed=99, charges=200, subscriptions=20, now=NOW)
    two = StripeAccount("sk_test_x", seed=99, charges=200, subscriptions=20, now=NOW)
    three = StripeAccount("sk_test_x", seed=100, charges=200, subscriptions=20, now=NOW)
    assert one.charges.blobs == two.charges.blobs and one.events.ids == two.events.ids
    assert one.charges.ids != three.charges.ids


def test_charge_shape_and_zero_decimal_jpy(server: SandboxServer) -> None:
    export = server.stripe_export(READ_KEY, "charges")
    assert {row["currency"] for row in export} == {"usd", "eur", "gbp", "jpy"}
    statuses = [row["status"] for row in export]
    assert 0.8 < statuses.count("succeeded") / len(statuses) < 0.97
    assert any(row["refunded"] for row in export)
    assert any(0 < row["amount_refunded"] < row["amount"] for row in export) or any(row["refunded"] for row in export)
    jpy = [row for row in export if row["currency"] == "jpy"]
    assert jpy
    for row in jpy:
        assert type(row["amount"]) is int and row["amount"] >= 50 and row["amount"] % 10 == 0
    client = _client(server, READ_KEY)
    charge = client.v1.charges.retrieve(jpy[0]["id"]).to_dict()
    assert charge["amount"] == jpy[0]["amount"] and type(charge["amount"]) is int
    raw = orjson.dumps(charge)
    assert 1200 < len(raw) < 2800
    assert {"billing_details", "outcome", "payment_method_details", "livemode", "metadata"} <= set(charge)
    assert "updated" not in charge
    failed = client.v1.charges.retrieve(next(r["id"] for r in export if r["status"] == "failed"))
    assert failed.paid is False and failed.captured is False and failed.failure_code


def test_fractional_day_span_and_invalid_specs(server: SandboxServer) -> None:
    key = "sk_test_shortspan000000000000001"
    summary = server.add_stripe_account(key, seed=4, charges=120, subscriptions=16, days=0.25)
    now = summary["now"]
    for kind in ("charges", "subscriptions"):
        rows = server.stripe_export(key, kind)
        assert rows and all(now - 6 * 3600 <= row["created"] < now for row in rows)
    subs = server.stripe_export(key, "subscriptions")
    assert all(row["canceled_at"] is None or row["created"] <= row["canceled_at"] < now for row in subs)
    with pytest.raises(RuntimeError, match="days"):
        server.add_stripe_account(key, seed=4, charges=10, subscriptions=1, days=0)
    with pytest.raises(RuntimeError, match="400"):
        server.add_stripe_account("", charges=10)


def test_bracket_parser() -> None:
    pairs = [
        ("created[gte]", "1"),
        ("created[lt]", "5"),
        ("expand[]", "data.customer"),
        ("expand[]", "data.refunds"),
        ("types[0]", "a"),
        ("types[1]", "b"),
        ("items[0][price]", "price_1"),
        ("items[0][quantity]", "2"),
        ("metadata[crm]", "x"),
        ("limit", "3"),
    ]
    assert parse_bracket_params(pairs) == {
        "created": {"gte": "1", "lt": "5"},
        "expand": ["data.customer", "data.refunds"],
        "types": ["a", "b"],
        "items": [{"price": "price_1", "quantity": "2"}],
        "metadata": {"crm": "x"},
        "limit": "3",
    }


# --- servers: subprocess mode and scale ---------------------------------------------------------------


def test_subprocess_server_and_account_replacement() -> None:
    key = LIVE_PREFIX + "subprocess00000000000001"
    with SandboxServer([{"api_key": key, "seed": 1, "charges": 40, "subscriptions": 5}], subprocess=True) as srv:
        assert srv.pid is not None
        client = _client(srv, key)
        charges = list(client.v1.charges.list({"limit": 100}).auto_paging_iter())
        assert len(charges) == 40 and all(c.livemode for c in charges)
        same = srv.add_stripe_account(key, seed=1, charges=40, subscriptions=5)
        assert same["status"] == "unchanged"
        replaced = srv.add_stripe_account(key, seed=2, charges=10, subscriptions=1)
        assert replaced["status"] == "replaced" and replaced["charges"] == 10
        assert len(list(client.v1.charges.list({"limit": 100}).auto_paging_iter())) == 10


def _live_children() -> set[int]:
    """Process ids of this process's children that are still running (Linux /proc)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return {pid for pid in pids if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")}


def test_a_subprocess_server_whose_start_fails_does_not_outlive_it() -> None:
    before = _live_children()
    server = SandboxServer([{"api_key": "sk_test_refused", "charges": "not a number"}], subprocess=True)
    with pytest.raises(RuntimeError, match="sandbox control POST"):
        server.start()
    assert _live_children() <= before
    assert server.pid is None


def test_build_app_exposes_state() -> None:
    app = build_app([{"api_key": "sk_test_state", "seed": 1, "charges": 5, "subscriptions": 1}], now=NOW)
    account = app.state.stripe.account("sk_test_state")
    assert account is not None and account.counts()["charges"] == 5
    assert abs(app.state.clock.now() - NOW) < 60
    with pytest.raises(SystemExit):
        main(["--host", "0.0.0.0", "--port", "0"])
    with pytest.raises(ValueError):
        SandboxServer(host="192.0.2.1")


def test_two_hundred_thousand_charges() -> None:
    key = "sk_test_scale000000000000000001"
    with SandboxServer() as srv:
        started = time.perf_counter()
        summary = srv.add_stripe_account(key, seed=42, charges=200_000, subscriptions=2_000, requests_per_second=0)
        elapsed = time.perf_counter() - started
        assert summary["charges"] == 200_000
        assert elapsed < 20, f"generating 200k charges took {elapsed:.1f}s"
        with httpx.Client(base_url=srv.url, auth=(key, "")) as http:
            page = http.get("/v1/charges", params={"limit": 100}).json()
            assert len(page["data"]) == 100 and page["has_more"] is True
            nxt = http.get("/v1/charges", params={"limit": 100, "starting_after": page["data"][-1]["id"]}).json()
            assert len(nxt["data"]) == 100
            assert nxt["data"][0]["created"] <= page["data"][-1]["created"]
        assert srv.app is not None
        account = srv.app.state.stripe.account(key)
        started = time.perf_counter()
        for _ in range(200):
            account.list_page("charges", {"limit": "100"}, now=srv.clock())
        per_page = (time.perf_counter() - started) / 200
        assert per_page < 0.005, f"building a 100-charge page took {per_page * 1000:.2f} ms"
