"""Reading one window of records ordered by their updated time, without skipping or repeating any.

Offset paging over a list ordered by updated time loses records when the data changes mid-read: a
record edited between two pages jumps to the end of the order and every record behind it moves up
one place, so the next page starts one record too far. `updated_keyset_pages` pages by the updated
time instead (the Xero advice: "use the max UpdatedDateUTC seen as the next cursor"): each request
asks for records updated at or after the cursor, the cursor moves to the last record's time, and ids
already read at that time are skipped. Only when a whole page shares one cursor value (providers'
filters have whole-second precision) does it step by page offset within that value.

A provider that hands back a page it already gave (an offset or cursor it ignores) would keep such a
reader asking forever. Both readers here compare one id per page, never per record, and stop with a
`ProviderError` that says so: `updated_keyset_pages` when a page stepped to ends like the page
before it, `PageCursors` for listings paged by an opaque last-id cursor (Stripe's `starting_after`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.core.sync import Record, SyncWindow

LOOPING = "stopping rather than looping"

# fetch(cursor, page) -> one page of raw records with updated time >= cursor (and < the window's end
# when the provider can filter on it), ordered by updated time ascending; `page` counts from 0 and
# is non-zero only while a whole page shares one cursor value.
KeysetFetch = Callable[[datetime, int], list[dict[str, Any]]]


def _floor(moment: datetime, resolution: timedelta) -> datetime:
    step = resolution.total_seconds()
    return datetime.fromtimestamp((moment.timestamp() // step) * step, moment.tzinfo)


def updated_keyset_pages(
    fetch: KeysetFetch,
    window: SyncWindow,
    *,
    page_size: int,
    id_of: Callable[[dict[str, Any]], str],
    updated_of: Callable[[dict[str, Any]], datetime],
    resolution: timedelta = timedelta(seconds=1),
    provider: str = "provider",
) -> Iterator[list[Record]]:
    """Every record updated in `window` (start inclusive, end exclusive), once, page by page.

    Raises `ProviderError` (naming `provider`) when a page stepped to within one cursor value ends
    with the same record as the page before it: the provider ignores the offset.
    """
    cursor = _floor(window.start, resolution)
    seen: dict[str, datetime] = {}  # ids already yielded whose time is at or after the cursor
    page = 0
    previous_last: str | None = None  # id ending the page before, to notice a provider repeating it
    while True:
        items = fetch(cursor, page)
        batch: list[Record] = []
        for raw in items:
            updated = updated_of(raw)
            rid = id_of(raw)
            if updated < window.start or updated >= window.end or rid in seen:
                continue
            seen[rid] = updated
            batch.append((raw, updated))
        if batch:
            yield batch
        if len(items) < page_size:
            return
        last_id = id_of(items[-1])
        if page and last_id == previous_last:
            raise ProviderError(
                f"the provider returned the same page again: page {page + 1} of the records updated from "
                f"{cursor.isoformat()} ends with id {last_id}, as page {page} did; {LOOPING}",
                provider=provider,
            )
        previous_last = last_id
        last = _floor(max(updated_of(raw) for raw in items), resolution)
        if last >= window.end:
            return
        if last > cursor:
            cursor, page = last, 0
            seen = {rid: at for rid, at in seen.items() if at >= cursor}
        else:
            page += 1


class PageCursors:
    """The cursors one listing paged by last id has moved through (one per page, not per record), so a
    provider that answers with a page it already gave, or an empty page that says more follow, stops
    the read with a clear error instead of looping forever."""

    def __init__(self, provider: str, *, name: str, connection_id: str | None = None, endpoint: str | None = None):
        self._error = {"provider": provider, "connection_id": connection_id, "endpoint": endpoint}
        self._name = name
        self._seen: set[str] = set()
        self._after: str | None = None

    def advance(self, last_id: str | None) -> str:
        """The cursor for the page after one that says more follow and ends with `last_id` (None: it
        was empty); raises `ProviderError` when it was empty or ends where an earlier page ended."""
        after = f"after id {self._after}" if self._after is not None else "on the first page"
        if last_id is None:
            raise ProviderError(f"{self._name} returned an empty page that says more follow, {after}; {LOOPING}",
                                **self._error)  # fmt: skip
        if last_id in self._seen:
            raise ProviderError(
                f"{self._name} returned the same page again: the page {after} ends with id {last_id}, "
                f"as an earlier page did; {LOOPING}",
                **self._error,
            )
        self._seen.add(last_id)
        self._after = last_id
        return last_id
