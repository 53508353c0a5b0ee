"""Paging: records edited mid-read are neither skipped nor repeated, and a provider that hands back a
page it already gave stops the read with a clear error instead of looping.

For keyset paging the provider is a list held in the test that changes between page requests, the
way a live organisation does; the code under test is `core.paging.updated_keyset_pages` itself. For
Stripe's cursor paging it is a small local HTTP server answering list requests the way a
misbehaving Stripe would, read through the real Stripe client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import ProviderError, RetryPolicy
from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.sync import SyncWindow
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.stripe.client import StripeApi

DAY = SyncWindow(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


class LiveList:
    """Records ordered by updated time, filtered like a provider's `updated >= cursor AND < end`."""

    def __init__(self, records: dict[str, datetime], end: datetime) -> None:
        self.records = records
        self.end = end
        self.requests = 0
        self.on_request = None

    def fetch_offset(self, page: int, size: int) -> list[dict]:
        ordered = sorted((at, rid) for rid, at in self.records.items() if at < self.end)
        return [{"id": rid, "at": at} for at, rid in ordered[page * size : (page + 1) * size]]

    def fetch(self, cursor: datetime, page: int, size: int) -> list[dict]:
        self.requests += 1
        if self.on_request:
            self.on_request(self.requests)
        ordered = sorted((at, rid) for rid, at in self.records.items() if cursor <= at < self.end)
        return [{"id": rid, "at": at} for at, rid in ordered[page * size : (page + 1) * size]]


def read(live: LiveList, size: int) -> list[str]:
    pages = updated_keyset_pages(
        lambda cursor, page: live.fetch(cursor, page, size),
        DAY,
        page_size=size,
        id_of=lambda raw: raw["id"],
        updated_of=lambda raw: raw["at"],
    )
    return [raw["id"] for page in pages for raw, _ in page]


def spread(n: int, step: timedelta) -> dict[str, datetime]:
    return {f"r{i:04d}": DAY.start + step * i for i in range(n)}


def test_every_record_of_the_window_once_and_nothing_outside_it():
    records = spread(250, timedelta(minutes=5))  # runs past the day's end
    records["before"] = DAY.start - timedelta(microseconds=1)
    records["midnight"] = DAY.end  # belongs to the next day
    live = LiveList(records, end=DAY.end + timedelta(days=2))
    ids = read(live, size=40)
    expected = {rid for rid, at in records.items() if DAY.start <= at < DAY.end}
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))


def test_a_record_edited_mid_read_skips_nothing_where_offset_paging_would():
    records = spread(100, timedelta(minutes=10))
    live = LiveList(dict(records), end=datetime(2026, 3, 5, tzinfo=UTC))

    def edit_one_already_read(request: int) -> None:
        if request == 2:  # after the first page: r0005 is edited today, so it leaves the day
            live.records["r0005"] = datetime(2026, 3, 4, tzinfo=UTC)

    live.on_request = edit_one_already_read
    ids = read(live, size=30)
    assert sorted(ids) == sorted(records) and len(ids) == len(set(ids))

    # The same edit under offset paging loses the record that moved up into the read page.
    offset = LiveList(dict(records), end=datetime(2026, 3, 5, tzinfo=UTC))
    first = offset.fetch_offset(0, 30)
    offset.records["r0005"] = datetime(2026, 3, 4, tzinfo=UTC)
    seen = {r["id"] for r in first}
    for page in range(1, 5):
        seen |= {r["id"] for r in offset.fetch_offset(page, 30) if r["at"] < DAY.end}
    assert "r0030" not in seen


def test_more_records_in_one_second_than_a_page_are_stepped_through():
    moment = DAY.start + timedelta(hours=3)
    records = {f"same{i:03d}": moment + timedelta(microseconds=i) for i in range(75)}
    records.update({f"later{i}": moment + timedelta(seconds=2 + i) for i in range(5)})
    live = LiveList(records, end=DAY.end)
    # The provider filters at whole seconds, like Xero's If-Modified-Since.
    live_fetch = live.fetch

    def by_second(cursor: datetime, page: int, size: int) -> list[dict]:
        return live_fetch(cursor.replace(microsecond=0), page, size)

    live.fetch = by_second
    ids = read(live, size=20)
    assert sorted(ids) == sorted(records)
    assert live.requests < 12


def test_a_provider_that_ignores_the_page_offset_stops_with_a_clear_error():
    """Every record in one second and a provider that answers every offset with the first page: without a
    guard the reader would step through pages forever."""
    moment = DAY.start + timedelta(hours=5)
    records = {f"same{i:03d}": moment for i in range(50)}
    live = LiveList(records, end=DAY.end)

    def first_page_always(cursor: datetime, page: int) -> list[dict]:
        assert live.requests < 20, "the reader kept asking for pages the provider keeps repeating"
        return live.fetch(cursor, 0, 10)

    pages = updated_keyset_pages(first_page_always, DAY, page_size=10, id_of=lambda raw: raw["id"],
                                 updated_of=lambda raw: raw["at"], provider="acme")  # fmt: skip
    with pytest.raises(ProviderError, match="returned the same page again") as failure:
        for _ in pages:
            pass
    assert "same009" in str(failure.value) and "stopping rather than looping" in str(failure.value)
    assert str(failure.value).startswith("acme: ") and live.requests <= 3


# --- Stripe: a list endpoint that repeats itself -----------------------------------------------------


def _charge(n: int) -> dict:
    return {"id": f"ch_{n:04d}", "object": "charge", "created": 1_770_000_000 - n}


class StripeLists:
    """What the local Stripe answers for `GET /v1/charges`, by the `starting_after` it is given."""

    def __init__(self) -> None:
        self.pages: dict[str | None, tuple[list[dict], bool]] = {}
        self.requests: list[str | None] = []


LISTS = StripeLists()


async def stripe_charges(request: Request) -> JSONResponse:
    after = request.query_params.get("starting_after")
    LISTS.requests.append(after)
    if len(LISTS.requests) > 20:  # a client that never stops: end it here, so the test fails fast
        return JSONResponse({"error": {"type": "invalid_request_error", "message": "looping"}}, status_code=400)
    data, has_more = LISTS.pages[after]
    return JSONResponse({"object": "list", "data": data, "has_more": has_more, "url": "/v1/charges"})


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/charges", stripe_charges)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def stripe_api(url: str) -> StripeApi:
    connection = Connection(id="stripe-loop", provider="stripe", display_name="Loop", base_url=url,
                            settings={"requests_per_second": 0})  # fmt: skip
    retry = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05, budget_seconds=5)
    return StripeApi(connection, Secrets({"api_key": "sk_test_loop"}), retry=retry)


FIRST = [_charge(1), _charge(2)]
REPEATS = {
    # The page after ch_0002 is the same page again.
    "same page": ({None: (FIRST, True), "ch_0002": (FIRST, True)}, "ch_0002"),
    # A next page that ends on the id it was asked to start after.
    "same last id": ({None: (FIRST, True), "ch_0002": ([_charge(3), _charge(2)], True)}, "ch_0002"),
    # Two pages that lead back to each other.
    "cycle": ({None: (FIRST, True), "ch_0002": ([_charge(3), _charge(4)], True), "ch_0004": (FIRST, True)},
              "ch_0004"),
}  # fmt: skip


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("answers", "after"), REPEATS.values(), ids=REPEATS.keys())
def test_a_stripe_list_that_repeats_a_page_stops_with_a_clear_error(stripe_url, answers, after):
    LISTS.pages, LISTS.requests = answers, []
    read: list[str] = []
    with stripe_api(stripe_url) as api, pytest.raises(ProviderError) as failure:
        for data, _ in api.list_pages("/v1/charges", {}):
            read += [obj["id"] for obj in data]
    message = str(failure.value)
    assert message.startswith("stripe connection 'stripe-loop' GET /v1/charges: Stripe returned the same page")
    assert f"the page after id {after} ends with id ch_0002" in message
    assert message.endswith("stopping rather than looping")
    # Stopped at the first page seen twice, having read nothing twice.
    assert LISTS.requests == list(answers) and len(read) == len(set(read))


@pytest.mark.timeout(20)
def test_a_stripe_list_page_that_is_empty_but_says_more_follow_is_an_error(stripe_url):
    LISTS.pages, LISTS.requests = {None: (FIRST, True), "ch_0002": ([], True)}, []
    with stripe_api(stripe_url) as api, pytest.raises(ProviderError) as failure:
        pages = [data for data, _ in api.list_pages("/v1/charges", {})]
        pytest.fail(f"the listing ended quietly after {len(pages)} page(s), as if complete")
    message = str(failure.value)
    assert "Stripe returned an empty page that says more follow, after id ch_0002" in message
    assert message.endswith("stopping rather than looping") and LISTS.requests == [None, "ch_0002"]


@pytest.mark.timeout(20)
def test_a_stripe_list_that_pages_properly_is_read_to_the_end(stripe_url):
    LISTS.pages, LISTS.requests = {None: (FIRST, True), "ch_0002": ([_charge(3)], True),
                                   "ch_0003": ([_charge(4)], False)}, []  # fmt: skip
    with stripe_api(stripe_url) as api:
        read = [obj["id"] for data, _ in api.list_pages("/v1/charges", {}) for obj in data]
    assert read == ["ch_0001", "ch_0002", "ch_0003", "ch_0004"] and LISTS.requests == [None, "ch_0002", "ch_0003"]
