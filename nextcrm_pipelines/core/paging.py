"""Reading one window of records ordered by their updated time, without skipping or repeating any.

Offset paging over a list ordered by updated time loses records when the data changes mid-read: a
record edited between two pages jumps to the end of the order and every record behind it moves up
one place, so the next page starts one record too far. `updated_keyset_pages` pages by the updated
time instead (the Xero advice: "use the max UpdatedDateUTC seen as the next cursor"): each request
asks for records updated at or after the cursor, the cursor moves to the last record's time, and ids
already read at that time are skipped. Only when a whole page shares one cursor value (providers'
filters have whole-second precision) does it step by page offset within that value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from nextcrm_pipelines.core.sync import Record, SyncWindow

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
) -> Iterator[list[Record]]:
    """Every record updated in `window` (start inclusive, end exclusive), once, page by page."""
    cursor = _floor(window.start, resolution)
    seen: dict[str, datetime] = {}  # ids already yielded whose time is at or after the cursor
    page = 0
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
        last = _floor(max(updated_of(raw) for raw in items), resolution)
        if last >= window.end:
            return
        if last > cursor:
            cursor, page = last, 0
            seen = {rid: at for rid, at in seen.items() if at >= cursor}
        else:
            page += 1
