"""Storage of an account's objects: sorted arrays of pre-serialised JSON with small index tuples, cursor pages
joined into list envelopes, and events that share the bytes of the object they snapshot."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import orjson

from nextcrm_sandbox.stripe.model import API_VERSION

Blob = bytes | tuple[bytes, bytes, bytes]
Row = tuple[int, str, Blob, tuple[Any, ...]]


class _Collection:
    """Objects of one type sorted ascending by (created, id); API order is the reverse (newest first).

    ``blobs[i]`` is the object's JSON (events store ``(head, data.object, tail)`` so snapshots share
    the bytes of the object they copy). ``meta[i]`` is a small per-type tuple used for filters and exports.
    """

    __slots__ = ("_views", "blobs", "created", "ids", "meta", "pos", "url")

    def __init__(self, url: str, rows: list[Row]) -> None:
        rows.sort(key=lambda r: (r[0], r[1]))
        self.url = url
        self.created: list[int] = [r[0] for r in rows]
        self.ids: list[str] = [r[1] for r in rows]
        self.blobs: list[Blob] = [r[2] for r in rows]
        self.meta: list[tuple[Any, ...]] = [r[3] for r in rows]
        self.pos: dict[str, int] = {oid: i for i, oid in enumerate(self.ids)}
        if len(self.pos) != len(self.ids):
            raise ValueError(f"duplicate ids in {url}")
        self._views: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def blob(self, i: int) -> bytes:
        b = self.blobs[i]
        return b if isinstance(b, bytes) else b"".join(b)

    def insert(self, created: int, oid: str, blob: Blob, meta: tuple[Any, ...], *, arrival: bool = False) -> int:
        """Insert an object at its place by (created, id); with ``arrival``, after everything of its second (the
        events feed: several events of one request share a second, and Stripe lists the last one first)."""
        if oid in self.pos:
            raise ValueError(f"duplicate id {oid}")
        k = bisect_right(self.created, created)
        while not arrival and k > 0 and self.created[k - 1] == created and self.ids[k - 1] > oid:
            k -= 1
        self.created.insert(k, created)
        self.ids.insert(k, oid)
        self.blobs.insert(k, blob)
        self.meta.insert(k, meta)
        ids, pos = self.ids, self.pos
        for j in range(k, len(ids)):
            pos[ids[j]] = j
        self._views.clear()
        return k

    def replace(self, i: int, blob: Blob, meta: tuple[Any, ...]) -> None:
        self.blobs[i] = blob
        if meta != self.meta[i]:
            self.meta[i] = meta
            self._views.clear()

    def view(self, key: Hashable, pred: Callable[[tuple[Any, ...]], bool]) -> list[int]:
        """Ascending positions whose meta satisfies ``pred``; cached until the collection changes."""
        sel = self._views.get(key)
        if sel is None:
            sel = [i for i, m in enumerate(self.meta) if pred(m)]
            self._views[key] = sel
        return sel

    def group(self, field_index: int) -> dict[Any, list[int]]:
        """Positions grouped by one meta field (e.g. the customer of each charge); cached."""
        key = ("group", field_index)
        groups = self._views.get(key)
        if groups is None:
            groups = {}
            for i, m in enumerate(self.meta):
                v = m[field_index]
                if v is not None:
                    groups.setdefault(v, []).append(i)
            self._views[key] = groups
        return groups

    def page(
        self,
        sel: Sequence[int] | None,
        low: int | None,
        high: int | None,
        limit: int,
        after: int | None,
        before: int | None,
    ) -> tuple[list[int], bool]:
        """Positions of one newest-first page and ``has_more``.

        ``after``/``before`` are positions of the cursor objects (``starting_after`` / ``ending_before``);
        the cursor need not be part of ``sel``. ``low``/``high`` are inclusive ``created`` bounds.
        """
        created = self.created
        if sel is None:
            lo = 0 if low is None else bisect_left(created, low)
            hi = len(created) if high is None else bisect_right(created, high)
            if after is not None:
                hi = min(hi, after)
            if before is not None:
                lo = max(lo, before + 1)
        else:
            key = created.__getitem__
            lo = 0 if low is None else bisect_left(sel, low, key=key)
            hi = len(sel) if high is None else bisect_right(sel, high, key=key)
            if after is not None:
                hi = min(hi, bisect_left(sel, after))
            if before is not None:
                lo = max(lo, bisect_right(sel, before))
        if lo >= hi:
            return [], False
        if before is not None and after is None:
            end = min(lo + limit, hi)
            js = range(end - 1, lo - 1, -1)
            more = end < hi
        else:
            start = max(lo, hi - limit)
            js = range(hi - 1, start - 1, -1)
            more = start > lo
        if sel is None:
            return list(js), more
        return [sel[j] for j in js], more


def _list_envelope(url: str, chunks: Iterable[bytes], has_more: bool) -> bytes:
    return b"".join(
        (
            b'{"object":"list","data":[',
            b",".join(chunks),
            b'],"has_more":true,"url":"' if has_more else b'],"has_more":false,"url":"',
            url.encode(),
            b'"}',
        )
    )


def _dump(obj: Any) -> bytes:
    """orjson bytes copied into an exactly sized object; orjson's own result keeps a larger allocation."""
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)[:-1]


_SENTINEL = "\x00data.object\x00"
_SENTINEL_JSON = orjson.dumps(_SENTINEL)


def _event_blob(
    *,
    event_id: str,
    created: int,
    type: str,
    obj: bytes,
    livemode: bool,
    previous: dict[str, Any] | None = None,
    request_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[bytes, bytes, bytes]:
    data: dict[str, Any] = {"object": _SENTINEL}
    if previous is not None:
        data["previous_attributes"] = previous
    raw = orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": API_VERSION,
            "created": created,
            "data": data,
            "livemode": livemode,
            "pending_webhooks": 0,
            "request": {"id": request_id, "idempotency_key": idempotency_key},
            "type": type,
        }
    )
    head, tail = raw.split(_SENTINEL_JSON, 1)
    return head, obj, tail
