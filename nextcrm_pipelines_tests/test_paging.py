"""Paging a window by updated time: records edited mid-read are neither skipped nor repeated.

The provider here is a list held in the test that changes between page requests, the way a live
organisation does; the code under test is `core.paging.updated_keyset_pages` itself.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from nextcrm_pipelines.core.paging import updated_keyset_pages
from nextcrm_pipelines.core.sync import SyncWindow

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
