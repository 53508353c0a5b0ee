"""Local emulator of the Stripe API v1: charges, subscriptions, customers, refunds and the events feed.

The demo, the test-suite and the sync benchmark need a Stripe that behaves like the real one (cursor
pagination newest first, ``created`` windows, subscriptions hidden when canceled, a 30-day events feed,
rate limits, idempotency keys, injected faults) without network access and at 200,000-charge scale.

Accounts are generated deterministically from a seed (``StripeAccount``). Every object is kept as
pre-serialised orjson bytes next to small index arrays (``created``, ids, a compact metadata tuple), so a
page of 100 charges is a ``bytes`` join, not 100 serialisations. Objects are parsed back into dicts only
while a request mutates them. ``StripeSandbox`` holds the accounts plus their per-key runtime state
(token bucket, faults, statistics, idempotency records) and exposes Starlette routes for the API
(``/v1/...``) and for the loopback-only control API (``/_sandbox/stripe/...``).

Webhooks: ``POST /_sandbox/stripe/webhooks`` subscribes a receiver URL to an account (``api_key``) with
the endpoint's signing ``secret``; every Event a runtime mutation creates is then delivered as the exact
bytes ``GET /v1/events/{id}`` returns, signed ``Stripe-Signature: t=<now>,v1=<HMAC-SHA256 hex>`` afresh
at each attempt, retried like a Stripe sandbox (3 times over a few hours, or the subscription's
``retry_delays``). An account nobody subscribed to pays one attribute check per event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import datetime as dt
import hashlib
import hmac
import math
import random
import re
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    control_endpoint,
    optional_int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.webhooks import Signer, WebhookControl, WebhookOutbox, webhook_control_routes

__all__ = [
    "API_VERSION",
    "EVENT_RETENTION_SECONDS",
    "WEBHOOK_RETRY_DELAYS",
    "StripeAccount",
    "StripeControl",
    "StripeError",
    "StripeSandbox",
    "mask_api_key",
    "parse_bracket_params",
    "stripe_signature",
]

API_VERSION = "2026-10-28.endive"
EVENT_RETENTION_SECONDS = 30 * 86400
IDEMPOTENCY_TTL_SECONDS = 86400
MAX_LIMIT = 100
DEFAULT_LIMIT = 10
CUSTOMERS_CAP = 5000
# Stripe sandboxes retry a failed webhook "3 times over a few hours" (live mode: up to 3 days).
WEBHOOK_RETRY_DELAYS = (3600.0, 7200.0, 10800.0)

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DAY = 86400

RESOURCES = ("charges", "subscriptions", "customers", "refunds", "events")
_OBJECT_NAMES = {
    "charges": "charge",
    "subscriptions": "subscription",
    "customers": "customer",
    "refunds": "refund",
    "events": "event",
}
SUBSCRIPTION_STATUSES = (
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
)
_ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
_COMMON_LIST_PARAMS = frozenset({"limit", "starting_after", "ending_before", "created", "expand"})
_LIST_PARAMS = {
    "charges": _COMMON_LIST_PARAMS | {"customer", "payment_intent", "transfer_group"},
    "subscriptions": _COMMON_LIST_PARAMS | {"customer", "price", "status"},
    "customers": _COMMON_LIST_PARAMS | {"email"},
    "refunds": _COMMON_LIST_PARAMS | {"charge", "payment_intent"},
    "events": _COMMON_LIST_PARAMS | {"type", "types", "delivery_success"},
}
_ZERO_DECIMAL = frozenset({"jpy", "krw", "vnd", "clp", "pyg", "xaf", "xof", "ugx", "bif", "djf", "gnf"})


# ---------------------------------------------------------------------------------------------------------
# Errors and request parameters
# ---------------------------------------------------------------------------------------------------------


class StripeError(Exception):
    """An API error rendered with Stripe's envelope ``{"error": {"type", "code", "message", "param"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> bytes:
        """The JSON error envelope."""
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            err["param"] = self.param
        return orjson.dumps({"error": err})


def _missing(kind: str, object_id: str, param: str | None = "id", status: int = 404) -> StripeError:
    return StripeError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def _unknown_param(name: str) -> StripeError:
    return StripeError(400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name)


def _split_key(key: str) -> list[str]:
    start = key.find("[")
    if start <= 0 or not key.endswith("]"):
        return [key]
    parts = key[start + 1 : -1].split("][")
    if any("[" in p or "]" in p for p in parts) or "" in parts[:-1]:
        return [key]
    return [key[:start], *parts]


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            node[k] = _listify(v)
        n = len(node)
        if n and all(k.isdigit() for k in node) and {int(k) for k in node} == set(range(n)):
            return [node[str(i)] for i in range(n)]
        return node
    if isinstance(node, list):
        return [_listify(v) for v in node]
    return node


def parse_bracket_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest Stripe's bracket notation: ``created[gte]=1`` → ``{"created": {"gte": "1"}}``.

    ``expand[]=a&expand[]=b`` and ``expand[0]=a&expand[1]=b`` both give ``{"expand": ["a", "b"]}``;
    ``items[0][price]=p`` gives ``{"items": [{"price": "p"}]}``. A dict whose keys are exactly ``"0".."n-1"``
    becomes a list. Values stay strings; a repeated plain key keeps the last value.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        segs = _split_key(key)
        *parents, leaf = segs
        node: dict[str, Any] = root
        if leaf == "":
            for seg in parents[:-1]:
                child = node.get(seg)
                if not isinstance(child, dict):
                    child = {}
                    node[seg] = child
                node = child
            lst = node.get(parents[-1])
            if not isinstance(lst, list):
                lst = []
                node[parents[-1]] = lst
            lst.append(value)
            continue
        for seg in parents:
            child = node.get(seg)
            if not isinstance(child, dict):
                child = {}
                node[seg] = child
            node = child
        node[leaf] = value
    return _listify(root)


def _as_int(value: Any, param: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StripeError(400, f"Invalid integer: {value!r}", param=param)
    try:
        n = int(value)
    except ValueError:
        raise StripeError(400, f"Invalid integer: {value}", param=param) from None
    if minimum is not None and n < minimum:
        raise StripeError(400, f"This value must be greater than or equal to {minimum}.", param=param)
    if maximum is not None and n > maximum:
        raise StripeError(400, f"This value must be less than or equal to {maximum}.", param=param)
    return n


def _as_bool(value: Any, param: str) -> bool:
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise StripeError(400, f"Invalid boolean: {value}", param=param)


def _as_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise StripeError(400, f"Invalid string: {param} must be a string", param=param)
    return value


def _as_list(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise StripeError(400, f"Invalid array: {param}", param=param)


def _created_bounds(value: Any) -> tuple[int | None, int | None]:
    """``created`` as an int or ``{gt, gte, lt, lte}`` → inclusive (low, high) bounds."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        n = _as_int(value, "created")
        return n, n
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid created: must be an integer or a hash", param="created")
    low: int | None = None
    high: int | None = None
    for op, raw in value.items():
        param = f"created[{op}]"
        n = _as_int(raw, param)
        if op == "gt":
            low = n + 1 if low is None else max(low, n + 1)
        elif op == "gte":
            low = n if low is None else max(low, n)
        elif op == "lt":
            high = n - 1 if high is None else min(high, n - 1)
        elif op == "lte":
            high = n if high is None else min(high, n)
        else:
            raise _unknown_param(param)
    return low, high


def _check_params(params: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed:
            raise _unknown_param(name)


def _metadata_update(current: dict[str, str], value: Any) -> dict[str, str]:
    if value == "":
        return {}
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid object: metadata must be a hash", param="metadata")
    out = dict(current)
    for k, v in value.items():
        if not isinstance(v, str):
            raise StripeError(400, f"Invalid metadata value for key {k}", param=f"metadata[{k}]")
        if v == "":
            out.pop(k, None)
        else:
            out[k] = v
    if len(out) > 50:
        raise StripeError(400, "Metadata can have up to 50 keys.", param="metadata")
    return out


def mask_api_key(key: str) -> str:
    """Redact a key for error messages: ``sk_test_****abcd`` (the last four shown only for long keys)."""
    m = re.match(r"^([a-z]{2,4}_(?:test|live)_)", key)
    prefix = m.group(1) if m else ""
    tail = key[-4:] if len(key) >= len(prefix) + 12 else ""
    return f"{prefix}****{tail}"


# ---------------------------------------------------------------------------------------------------------
# Storage: sorted arrays of pre-serialised objects
# ---------------------------------------------------------------------------------------------------------

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

    def insert(self, created: int, oid: str, blob: Blob, meta: tuple[Any, ...]) -> int:
        if oid in self.pos:
            raise ValueError(f"duplicate id {oid}")
        k = bisect_right(self.created, created)
        while k > 0 and self.created[k - 1] == created and self.ids[k - 1] > oid:
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


# ---------------------------------------------------------------------------------------------------------
# Deterministic generation
# ---------------------------------------------------------------------------------------------------------

_FIRST_NAMES = (
    "Jenny Olivia Liam Noah Emma Ava Sophia Mia Lucas Mateo Ethan Amelia Harper Elena Hugo Chloe Louis "
    "Hannah Felix Clara Yuki Haruto Sakura Ren Aoi Oliver George Isla Freya Arthur Leo Lena Paul Marie"
)
_LAST_NAMES = (
    "Rosen Smith Johnson Brown Garcia Miller Davis Martin Bernard Dubois Muller Schmidt Fischer Weber "
    "Taylor Wilson Evans Thomas Sato Suzuki Takahashi Tanaka Watanabe Rossi Russo Novak Jensen Silva"
)
_FIRST = tuple(_FIRST_NAMES.split())
_LAST = tuple(_LAST_NAMES.split())
_PLACES: dict[str, tuple[tuple[str, str | None, str, str], ...]] = {
    "US": (
        ("New York", "NY", "10001", "350 5th Ave"),
        ("San Francisco", "CA", "94103", "510 Townsend St"),
        ("Austin", "TX", "78701", "600 Congress Ave"),
        ("Seattle", "WA", "98101", "1301 2nd Ave"),
    ),
    "GB": (("London", None, "EC1A 1BB", "1 Long Lane"), ("Manchester", None, "M1 1AE", "12 Piccadilly")),
    "DE": (("Berlin", None, "10115", "Invalidenstrasse 1"), ("Munich", None, "80331", "Marienplatz 8")),
    "FR": (("Paris", None, "75001", "10 Rue de Rivoli"), ("Lyon", None, "69001", "3 Place Bellecour")),
    "NL": (("Amsterdam", None, "1012 JS", "Dam 1"),),
    "JP": (("Tokyo", None, "100-0001", "1-1 Chiyoda"), ("Osaka", None, "530-0001", "2-4 Umeda")),
}
_CURRENCY_COUNTRIES = {"usd": ("US",), "eur": ("DE", "FR", "NL"), "gbp": ("GB",), "jpy": ("JP",)}
_CURRENCIES = ("usd", "eur", "gbp", "jpy")
_CURRENCY_CUMULATIVE = (0.55, 0.75, 0.90, 1.0)
_BRANDS = (("visa", 0.55), ("mastercard", 0.85), ("amex", 0.95), ("discover", 1.0))
_DESCRIPTIONS = (
    "NextCRM Pro seat",
    "Invoice payment",
    "Annual plan upgrade",
    "Consulting hours",
    "Onboarding package",
    "Add-on: extra storage",
    None,
)
_FAILURES = (
    (
        "card_declined",
        "Your card was declined.",
        "generic_decline",
        "issuer_declined",
        "declined_by_network",
        "The bank did not return any further details with this decline.",
    ),
    (
        "card_declined",
        "Your card has insufficient funds.",
        "insufficient_funds",
        "issuer_declined",
        "declined_by_network",
        "The bank returned the decline code `insufficient_funds`.",
    ),
    (
        "expired_card",
        "Your card has expired.",
        "expired_card",
        "issuer_declined",
        "declined_by_network",
        "The bank returned the decline code `expired_card`.",
    ),
    (
        "incorrect_cvc",
        "Your card's security code is incorrect.",
        "incorrect_cvc",
        "issuer_declined",
        "declined_by_network",
        "The bank returned the decline code `incorrect_cvc`.",
    ),
    (
        "card_declined",
        "Your card was declined.",
        "highest_risk_level",
        "blocked",
        "not_sent_to_network",
        "Stripe blocked this payment as too risky.",
    ),
)
_OUTCOME_OK = {
    "advice_code": None,
    "network_advice_code": None,
    "network_decline_code": None,
    "network_status": "approved_by_network",
    "reason": None,
    "seller_message": "Payment complete.",
    "type": "authorized",
}
_OUTCOME_PENDING = {**_OUTCOME_OK, "seller_message": "Payment pending."}
_CHARGE_TEMPLATE: dict[str, Any] = {
    "id": None,
    "object": "charge",
    "amount": 0,
    "amount_captured": 0,
    "amount_refunded": 0,
    "application": None,
    "application_fee": None,
    "application_fee_amount": None,
    "balance_transaction": None,
    "billing_details": None,
    "calculated_statement_descriptor": "NEXTCRM",
    "captured": False,
    "created": 0,
    "currency": None,
    "customer": None,
    "description": None,
    "disputed": False,
    "failure_balance_transaction": None,
    "failure_code": None,
    "failure_message": None,
    "fraud_details": {},
    "livemode": False,
    "metadata": {},
    "on_behalf_of": None,
    "outcome": None,
    "paid": False,
    "payment_intent": None,
    "payment_method": None,
    "payment_method_details": None,
    "receipt_email": None,
    "receipt_number": None,
    "receipt_url": None,
    "refunded": False,
    "review": None,
    "shipping": None,
    "source": None,
    "source_transfer": None,
    "statement_descriptor": None,
    "statement_descriptor_suffix": None,
    "status": None,
    "transfer_data": None,
    "transfer_group": None,
}
_CARD_TEMPLATE: dict[str, Any] = {
    "amount_authorized": None,
    "authorization_code": None,
    "brand": None,
    "checks": None,
    "country": None,
    "exp_month": None,
    "exp_year": None,
    "extended_authorization": {"status": "disabled"},
    "fingerprint": None,
    "funding": None,
    "incremental_authorization": {"status": "unavailable"},
    "installments": None,
    "last4": None,
    "mandate": None,
    "multicapture": {"status": "unavailable"},
    "network": None,
    "network_token": {"used": False},
    "network_transaction_id": None,
    "overcapture": None,
    "regulated_status": "unregulated",
    "three_d_secure": None,
    "wallet": None,
}
_CHECKS_PASS = {"address_line1_check": None, "address_postal_code_check": "pass", "cvc_check": "pass"}
_CHECKS_CVC_FAIL = {**_CHECKS_PASS, "cvc_check": "fail"}
_PRICE_CATALOG = (
    ("usd", 2000, "month", "Starter"),
    ("usd", 4900, "month", "Team"),
    ("usd", 49900, "year", "Team (annual)"),
    ("eur", 1900, "month", "Starter EU"),
    ("eur", 19000, "year", "Starter EU (annual)"),
    ("gbp", 1500, "month", "Starter UK"),
    ("jpy", 980, "month", "Starter JP"),
    ("jpy", 12000, "year", "Starter JP (annual)"),
)
_SUB_STATUS_CUMULATIVE = (
    ("canceled", 0.20),
    ("incomplete", 0.23),
    ("incomplete_expired", 0.27),
    ("trialing", 0.35),
    ("past_due", 0.40),
    ("unpaid", 0.42),
    ("paused", 0.44),
    ("active", 1.0),
)


def _add_months(ts: int, months: int) -> int:
    d = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    total = d.month - 1 + months
    year, month = d.year + total // 12, total % 12 + 1
    day = min(d.day, calendar.monthrange(year, month)[1])
    return int(d.replace(year=year, month=month, day=day).timestamp())


def _period_containing(anchor: int, ref: int, interval: str) -> tuple[int, int]:
    step = 12 if interval == "year" else 1
    start = anchor
    end = _add_months(anchor, step)
    n = 1
    while end <= ref:
        n += 1
        start, end = end, _add_months(anchor, step * n)
    return start, end


_BASE62_TABLE = bytes(ord(_ALPHABET[i % 62]) for i in range(256))


class _Rng(random.Random):
    """``random.Random`` with cheaper draws for bulk generation (still fully determined by the seed)."""

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def between(self, a: int, b: int) -> int:
        """Uniform integer in ``[a, b]``."""
        return a + int(self.random() * (b - a + 1))

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def text(self, k: int) -> str:
        """``k`` base62 characters."""
        return self.randbytes(k).translate(_BASE62_TABLE).decode("ascii")

    def digits(self, k: int) -> str:
        return f"{self.getrandbits(4 * k + 8) % 10**k:0{k}d}"


class _Ids:
    """Stripe-looking ids from the account rng: ``ch_3`` + 5 chars + a 10-char account tag + 9 chars."""

    def __init__(self, rng: _Rng) -> None:
        self.rng = rng
        self.tag = rng.text(10)

    def long(self, prefix: str) -> str:
        r = self.rng.text(14)
        return f"{prefix}{r[:5]}{self.tag}{r[5:]}"

    def suffix(self) -> str:
        r = self.rng.text(14)
        return f"{r[:5]}{self.tag}{r[5:]}"

    def short(self, prefix: str, k: int = 14) -> str:
        return prefix + self.rng.text(k)


@dataclass(slots=True)
class _Card:
    payment_method: str
    brand: str
    country: str
    exp_month: int
    exp_year: int
    fingerprint: str
    funding: str
    last4: str


@dataclass(slots=True)
class _Customer:
    id: str
    created: int
    name: str
    email: str
    phone: str | None
    country: str
    address: dict[str, Any]
    currency: str
    card: _Card


def _card(ids: _Ids, country: str, year_now: int) -> _Card:
    rng = ids.rng
    x = rng.random()
    brand = next(b for b, c in _BRANDS if x < c)
    return _Card(
        payment_method=ids.long("pm_1"),
        brand=brand,
        country=country,
        exp_month=rng.between(1, 12),
        exp_year=year_now + rng.between(1, 6),
        fingerprint=ids.short("", 16),
        funding="credit" if rng.random() < 0.7 else "debit",
        last4=rng.digits(4),
    )


def _pick_currency(rng: _Rng) -> str:
    x = rng.random()
    for cur, c in zip(_CURRENCIES, _CURRENCY_CUMULATIVE, strict=True):
        if x < c:
            return cur
    return "usd"


def _address(rng: _Rng, country: str) -> dict[str, Any]:
    city, state, postal, line1 = rng.pick(_PLACES[country])
    return {
        "city": city,
        "country": country,
        "line1": line1,
        "line2": None,
        "postal_code": postal,
        "state": state,
    }


def _charge_amount(rng: _Rng, currency: str) -> int:
    if currency in _ZERO_DECIMAL:
        return max(50, 10 * round(math.exp(rng.uniform(math.log(100), math.log(500000))) / 10))
    return int(math.exp(rng.uniform(math.log(50), math.log(500000))))


# ---------------------------------------------------------------------------------------------------------
# The account
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RequestInfo:
    request_id: str | None = None
    idempotency_key: str | None = None


class StripeAccount:
    """One emulated Stripe account: generated objects, the events feed, and the mutations on them.

    Same arguments → byte-identical objects (ids included). ``now`` anchors generation: objects are
    created uniformly in ``[now - days*86400, now)`` and events exist for object changes in the last 30
    days before ``now``. The API methods take the sandbox clock's ``now`` so that events created by
    mutations and the events retention window follow the shared clock. ``on_event(type, event bytes)``,
    when set, is told of every event a mutation creates (webhook delivery).
    """

    def __init__(
        self,
        api_key: str,
        seed: int = 0,
        charges: int = 1000,
        subscriptions: int = 100,
        customers: int | None = None,
        days: float = 90,
        now: int | None = None,
    ) -> None:
        if charges < 0 or subscriptions < 0:
            raise ValueError("charges and subscriptions must be >= 0")
        if not days * _DAY >= 1:
            raise ValueError("days must be > 0 (fractions of a day are allowed)")
        self.api_key = api_key
        self.seed = seed
        self.days = days
        self.now = int(time.time()) if now is None else int(now)
        self.livemode = api_key.startswith("sk_live_")
        self.on_event: Callable[[str, bytes], None] | None = None
        n_customers = min(CUSTOMERS_CAP, max(10, charges // 20)) if customers is None else customers
        if n_customers < 1:
            raise ValueError("customers must be >= 1")
        self._rng = _Rng(seed)
        self._ids = _Ids(self._rng)
        self._prices = self._make_prices()
        rows_cus, rows_ch, rows_re, rows_sub, rows_evt = self._generate(n_customers, charges, subscriptions)
        self.customers = _Collection("/v1/customers", rows_cus)
        self.charges = _Collection("/v1/charges", rows_ch)
        self.refunds = _Collection("/v1/refunds", rows_re)
        self.subscriptions = _Collection("/v1/subscriptions", rows_sub)
        self.events = _Collection("/v1/events", rows_evt)
        self._collections = {
            "charges": self.charges,
            "subscriptions": self.subscriptions,
            "customers": self.customers,
            "refunds": self.refunds,
            "events": self.events,
        }

    # --- generation -------------------------------------------------------------------------------------

    def _make_prices(self) -> list[dict[str, Any]]:
        ids = self._ids
        prices = []
        created = self.now - int((self.days + 365) * _DAY)
        for cur, amount, interval, nickname in _PRICE_CATALOG:
            prices.append(
                {
                    "id": ids.long("price_1"),
                    "object": "price",
                    "active": True,
                    "billing_scheme": "per_unit",
                    "created": created,
                    "currency": cur,
                    "custom_unit_amount": None,
                    "livemode": self.livemode,
                    "lookup_key": None,
                    "metadata": {},
                    "nickname": nickname,
                    "product": ids.short("prod_"),
                    "recurring": {
                        "interval": interval,
                        "interval_count": 1,
                        "meter": None,
                        "trial_period_days": None,
                        "usage_type": "licensed",
                    },
                    "tax_behavior": "unspecified",
                    "tiers_mode": None,
                    "transform_quantity": None,
                    "type": "recurring",
                    "unit_amount": amount,
                    "unit_amount_decimal": str(amount),
                }
            )
        return prices

    def _generate(
        self, n_customers: int, n_charges: int, n_subscriptions: int
    ) -> tuple[list[Row], list[Row], list[Row], list[Row], list[Row]]:
        rng, ids, now, lm = self._rng, self._ids, self.now, self.livemode
        start = now - int(self.days * _DAY)
        horizon = now - EVENT_RETENTION_SECONDS
        year_now = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
        events: list[Row] = []

        def add_event(created: int, type_: str, obj: bytes, previous: dict[str, Any] | None = None) -> None:
            eid = ids.long("evt_3" if type_.startswith(("charge.", "refund.")) else "evt_1")
            with_request = type_.endswith((".created", ".succeeded", ".failed", ".pending", ".refunded"))
            blob = _event_blob(
                event_id=eid,
                created=created,
                type=type_,
                obj=obj,
                livemode=lm,
                previous=previous,
                request_id=ids.short("req_") if with_request else None,
                idempotency_key=ids.rng.text(16) if with_request else None,
            )
            events.append((created, eid, blob, (type_,)))

        # customers
        cus_created = sorted(start + rng.below(now - start) for _ in range(n_customers))
        customers: list[_Customer] = []
        rows_cus: list[Row] = []
        for created in cus_created:
            first, last = rng.pick(_FIRST), rng.pick(_LAST)
            cur = _pick_currency(rng)
            country = rng.pick(_CURRENCY_COUNTRIES[cur])
            email = f"{first.lower()}.{last.lower()}{rng.below(1000)}@example.com"
            phone = f"+1555{rng.digits(7)}" if rng.random() < 0.4 else None
            c = _Customer(
                id=ids.short("cus_"),
                created=created,
                name=f"{first} {last}",
                email=email,
                phone=phone,
                country=country,
                address=_address(rng, country),
                currency=cur,
                card=_card(ids, country, year_now),
            )
            customers.append(c)
            blob = _dump(self._customer_dict(c, rng))
            rows_cus.append((created, c.id, blob, (c.email,)))
            if created >= horizon:
                add_event(created, "customer.created", blob)

        # charges and their refunds
        rows_ch: list[Row] = []
        rows_re: list[Row] = []
        for _ in range(n_charges):
            created = start + rng.below(now - start)
            k = bisect_right(cus_created, created)
            cust = customers[rng.below(k)] if k else None
            currency = cust.currency if cust is not None and rng.random() < 0.8 else _pick_currency(rng)
            amount = _charge_amount(rng, currency)
            x = rng.random()
            status = "succeeded" if x < 0.90 else ("failed" if x < 0.97 else "pending")
            ch = self._charge_dict(
                ids.suffix(),
                created,
                amount,
                currency,
                status,
                cust,
                year_now,
                description=_DESCRIPTIONS[rng.below(len(_DESCRIPTIONS))],
            )
            blob = _dump(ch)
            refund_at = None
            if status == "succeeded" and rng.random() < 0.05 and created < now - 1:
                refund_at = min(now - 1, created + 60 + int(rng.random() * min(now - created, 21 * _DAY)))
                if rng.random() < 0.6:
                    ramount = amount
                else:
                    step = 10 if currency in _ZERO_DECIMAL else 1
                    ramount = max(step, (rng.below(amount) // step) * step) if amount > step else amount
                refund = self._refund_dict(ids.long("re_3"), ch, ramount, refund_at, rng)
                refund_blob = _dump(refund)
                before = blob
                ch["amount_refunded"] = ramount
                ch["refunded"] = ramount == amount
                blob = _dump(ch)
                rows_re.append((refund_at, refund["id"], refund_blob, (ch["id"],)))
                if created >= horizon:
                    add_event(created, "charge.succeeded", before)
                if refund_at >= horizon:
                    add_event(refund_at, "charge.refunded", blob, {"amount_refunded": 0, "refunded": False})
                    add_event(refund_at, "refund.created", refund_blob)
            elif created >= horizon:
                add_event(created, f"charge.{status}", blob)
            rows_ch.append((created, ch["id"], blob, self._charge_meta(ch)))

        # subscriptions
        rows_sub: list[Row] = []
        for n in range(n_subscriptions):
            created = start + rng.below(now - start)
            if n < len(SUBSCRIPTION_STATUSES):
                status = SUBSCRIPTION_STATUSES[n]
            else:
                x = rng.random()
                status = next(s for s, c in _SUB_STATUS_CUMULATIVE if x < c)
            k = bisect_right(cus_created, created)
            cust = customers[rng.below(k)] if k else customers[0]
            sub, initial = self._subscription_dict(created, status, cust, rng)
            blob = _dump(sub)
            rows_sub.append((created, sub["id"], blob, self._subscription_meta(sub)))
            if created >= horizon:
                add_event(created, "customer.subscription.created", _dump(initial) if initial else blob)
            if status == "canceled" and sub["canceled_at"] >= horizon:
                add_event(sub["canceled_at"], "customer.subscription.deleted", blob)
        return rows_cus, rows_ch, rows_re, rows_sub, events

    def _customer_dict(self, c: _Customer, rng: _Rng) -> dict[str, Any]:
        return {
            "id": c.id,
            "object": "customer",
            "address": c.address,
            "balance": 0,
            "created": c.created,
            "currency": c.currency,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": c.email,
            "invoice_prefix": f"{rng.getrandbits(32):08X}",
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": c.card.payment_method,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": self.livemode,
            "metadata": {},
            "name": c.name,
            "next_invoice_sequence": rng.between(1, 24),
            "phone": c.phone,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }

    def _charge_dict(
        self,
        suffix: str,
        created: int,
        amount: int,
        currency: str,
        status: str,
        cust: _Customer | None,
        year_now: int,
        *,
        description: str | None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        ids = self._ids
        rng = ids.rng
        if cust is not None:
            card = cust.card
            name, email, address = cust.name, cust.email, cust.address
        else:
            country = rng.pick(_CURRENCY_COUNTRIES.get(currency, ("US",)))
            card = _card(ids, country, year_now)
            name = f"{rng.pick(_FIRST)} {rng.pick(_LAST)}"
            email = None
            address = _address(rng, country)
        ok = status == "succeeded"
        failure = _FAILURES[rng.below(len(_FAILURES))] if status == "failed" else None
        if failure is None:
            outcome = _OUTCOME_OK if ok else _OUTCOME_PENDING
        else:
            outcome = {
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": failure[2] if failure[3] == "issuer_declined" else None,
                "network_status": failure[4],
                "reason": failure[2],
                "seller_message": failure[5],
                "type": failure[3],
            }
        cid = f"ch_3{suffix}"
        card_details = {
            **_CARD_TEMPLATE,
            "amount_authorized": amount if ok else None,
            "authorization_code": rng.digits(6) if ok else None,
            "brand": card.brand,
            "checks": _CHECKS_CVC_FAIL if failure and failure[0] == "incorrect_cvc" else _CHECKS_PASS,
            "country": card.country,
            "exp_month": card.exp_month,
            "exp_year": card.exp_year,
            "fingerprint": card.fingerprint,
            "funding": card.funding,
            "last4": card.last4,
            "network": card.brand,
            "network_transaction_id": rng.digits(15) if ok else None,
            "overcapture": {"maximum_amount_capturable": amount, "status": "unavailable"},
        }
        return {
            **_CHARGE_TEMPLATE,
            "id": cid,
            "amount": amount,
            "amount_captured": amount if ok else 0,
            "balance_transaction": f"txn_3{suffix}" if ok else None,
            "billing_details": {
                "address": address,
                "email": email,
                "name": name,
                "phone": None,
                "tax_id": None,
            },
            "captured": ok,
            "created": created,
            "currency": currency,
            "customer": cust.id if cust is not None else None,
            "description": description,
            "failure_code": failure[0] if failure else None,
            "failure_message": failure[1] if failure else None,
            "livemode": self.livemode,
            "metadata": metadata if metadata is not None else {},
            "outcome": outcome,
            "paid": ok,
            "payment_intent": f"pi_3{suffix}",
            "payment_method": card.payment_method,
            "payment_method_details": {"card": card_details, "type": "card"},
            "receipt_email": email,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/CAcaFwoV{rng.text(96)}" if ok else None,
            "status": status,
        }

    def _refund_dict(
        self,
        rid: str,
        ch: dict[str, Any],
        amount: int,
        created: int,
        rng: _Rng,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "refund",
            "amount": amount,
            "balance_transaction": "txn_3" + rid[4:],
            "charge": ch["id"],
            "created": created,
            "currency": ch["currency"],
            "customer": ch["customer"],
            "destination_details": {
                "card": {
                    "reference": rng.digits(12),
                    "reference_status": "available",
                    "reference_type": "acquirer_reference_number",
                    "type": "refund",
                },
                "type": "card",
            },
            "metadata": metadata if metadata is not None else {},
            "payment_intent": ch["payment_intent"],
            "payment_method": ch["payment_method"],
            "reason": reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": "succeeded",
            "transfer_reversal": None,
        }

    def _subscription_dict(
        self, created: int, status: str, cust: _Customer, rng: _Rng
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        ids, now = self._ids, self.now
        sid = ids.long("sub_1")
        candidates = [p for p in self._prices if p["currency"] == cust.currency] or self._prices
        price = candidates[rng.below(len(candidates))] if rng.random() < 0.85 else rng.pick(self._prices)
        interval = price["recurring"]["interval"]
        trial_start = trial_end = canceled_at = ended_at = cancel_at = None
        anchor = created
        reason = None
        if status == "trialing":
            trial_start, trial_end = created, max(created + 14 * _DAY, now + rng.between(1, 14) * _DAY)
            anchor = trial_end
        elif status == "paused":
            trial_start = created
            trial_end = created + min(14 * _DAY, max(1, (now - created) // 2))
            anchor = trial_end
        elif status == "canceled":
            canceled_at = created + 60 + int(rng.random() * max(1, now - created - 61))
            canceled_at = ended_at = max(created, min(now - 1, canceled_at))
            reason = "cancellation_requested" if rng.random() < 0.7 else "payment_failed"
        elif status == "incomplete_expired":
            ended_at = max(created, min(created + 23 * 3600, now - 1))
        cancel_at_period_end = status == "active" and rng.random() < 0.1
        if status == "trialing":
            period = (trial_start, trial_end)
        elif status in ("incomplete", "incomplete_expired"):
            period = (created, _add_months(created, 12 if interval == "year" else 1))
        else:
            period = _period_containing(anchor, ended_at if ended_at is not None else now, interval)
        if cancel_at_period_end:
            cancel_at = period[1]
        plan = {
            "id": price["id"],
            "object": "plan",
            "active": True,
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": "per_unit",
            "created": price["created"],
            "currency": price["currency"],
            "interval": interval,
            "interval_count": 1,
            "livemode": self.livemode,
            "metadata": {},
            "meter": None,
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }
        quantity = 1 if rng.random() < 0.7 else rng.between(2, 25)
        item = {
            "id": ids.short("si_"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": created + 1,
            "current_period_end": period[1],
            "current_period_start": period[0],
            "discounts": [],
            "metadata": {},
            "plan": plan,
            "price": price,
            "quantity": quantity,
            "subscription": sid,
            "tax_rates": [],
        }
        active_like = status not in ("incomplete", "incomplete_expired")
        sub = {
            "id": sid,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": anchor,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"type": "classic"},
            "billing_thresholds": None,
            "cancel_at": cancel_at,
            "cancel_at_period_end": cancel_at_period_end,
            "canceled_at": canceled_at,
            "cancellation_details": {"comment": None, "feedback": None, "reason": reason},
            "collection_method": "charge_automatically",
            "created": created,
            "currency": price["currency"],
            "customer": cust.id,
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": cust.card.payment_method if active_like else None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": ended_at,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": [item],
                "has_more": False,
                "total_count": 1,
                "url": f"/v1/subscription_items?subscription={sid}",
            },
            "latest_invoice": ids.long("in_1"),
            "livemode": self.livemode,
            "metadata": {},
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "plan": plan,
            "quantity": quantity,
            "schedule": None,
            "start_date": created,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": trial_end,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": trial_start,
        }
        initial = None
        if status in ("canceled", "incomplete_expired", "paused"):
            initial_status = "trialing" if trial_start else "active"
            if status == "incomplete_expired":
                initial_status = "incomplete"
            initial = {
                **sub,
                "status": initial_status,
                "canceled_at": None,
                "ended_at": None,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            }
        return sub, initial

    @staticmethod
    def _charge_meta(ch: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            ch["amount"],
            ch["amount_refunded"],
            ch["currency"],
            ch["status"],
            ch["refunded"],
            ch["customer"],
        )

    @staticmethod
    def _subscription_meta(sub: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            sub["status"],
            sub["canceled_at"],
            sub["currency"],
            sub["customer"],
            sub["items"]["data"][0]["price"]["id"] if sub["items"]["data"] else None,
        )

    # --- reads ------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of stored objects per resource (events include those past retention)."""
        return {name: len(coll) for name, coll in self._collections.items()}

    def list_page(self, resource: str, params: Mapping[str, Any], *, now: int) -> bytes:
        """``GET /v1/<resource>`` → the serialised list envelope (newest first)."""
        coll = self._collections.get(resource)
        if coll is None:
            raise StripeError(404, f"Unrecognized request URL (GET: /v1/{resource}).")
        _check_params(params, _LIST_PARAMS[resource])
        limit = DEFAULT_LIMIT
        if params.get("limit", "") != "":
            limit = _as_int(params["limit"], "limit", minimum=1, maximum=MAX_LIMIT)
        after_id = params.get("starting_after") or None
        before_id = params.get("ending_before") or None
        if after_id is not None and before_id is not None:
            raise StripeError(
                400,
                "You may only specify one of these parameters: starting_after, ending_before.",
                param="ending_before",
            )
        low, high = _created_bounds(params.get("created"))
        if resource == "events":
            floor = now - EVENT_RETENTION_SECONDS
            low = floor if low is None else max(low, floor)
        after = self._cursor(resource, after_id, "starting_after", now)
        before = self._cursor(resource, before_id, "ending_before", now)
        expand = self._expansions(resource, params, "data.")
        sel = self._selection(resource, coll, params)
        positions, has_more = coll.page(sel, low, high, limit, after, before)
        if expand:
            chunks = [self._expand_charge(coll.blob(i), expand) for i in positions]
        else:
            chunks = [coll.blob(i) for i in positions]
        return _list_envelope(coll.url, chunks, has_more)

    def _cursor(self, resource: str, oid: Any, param: str, now: int) -> int | None:
        if oid is None:
            return None
        coll = self._collections[resource]
        i = coll.pos.get(oid) if isinstance(oid, str) else None
        if i is None or (resource == "events" and coll.created[i] < now - EVENT_RETENTION_SECONDS):
            raise _missing(_OBJECT_NAMES[resource], str(oid), param=param, status=400)
        return i

    def _selection(self, resource: str, coll: _Collection, params: Mapping[str, Any]) -> list[int] | None:
        sel: list[int] | None = None

        def narrow(new: list[int]) -> None:
            nonlocal sel
            if sel is None:
                sel = new
            else:
                keep = set(new)
                sel = [i for i in sel if i in keep]

        if resource == "charges":
            if params.get("customer"):
                narrow(coll.group(5).get(_as_str(params["customer"], "customer"), []))
            if params.get("payment_intent"):
                pi = _as_str(params["payment_intent"], "payment_intent")
                i = coll.pos.get("ch_" + pi[3:]) if pi.startswith("pi_") else None
                narrow([] if i is None else [i])
            if params.get("transfer_group"):
                narrow([])
        elif resource == "subscriptions":
            status = params.get("status") or None
            if status is None:
                narrow(coll.view(("status", "default"), lambda m: m[0] not in _ENDED_STATUSES))
            elif status == "ended":
                narrow(coll.view(("status", "ended"), lambda m: m[0] in _ENDED_STATUSES))
            elif status != "all":
                if status not in SUBSCRIPTION_STATUSES:
                    raise StripeError(
                        400,
                        "Invalid status: must be one of " + ", ".join((*SUBSCRIPTION_STATUSES, "all", "ended")),
                        param="status",
                    )
                narrow(coll.view(("status", status), lambda m, s=status: m[0] == s))
            if params.get("customer"):
                narrow(coll.group(3).get(_as_str(params["customer"], "customer"), []))
            if params.get("price"):
                narrow(coll.group(4).get(_as_str(params["price"], "price"), []))
        elif resource == "customers":
            if params.get("email"):
                narrow(coll.group(0).get(_as_str(params["email"], "email"), []))
        elif resource == "refunds":
            if params.get("charge"):
                narrow(coll.group(0).get(_as_str(params["charge"], "charge"), []))
            if params.get("payment_intent"):
                pi = _as_str(params["payment_intent"], "payment_intent")
                narrow(coll.group(0).get("ch_" + pi[3:], []) if pi.startswith("pi_") else [])
        elif resource == "events":
            type_ = params.get("type") or None
            types = params.get("types") or None
            if type_ is not None and types is not None:
                raise StripeError(400, "You may only specify one of these parameters: type, types.", param="types")
            if type_ is not None:
                pattern = re.compile("^" + re.escape(_as_str(type_, "type")).replace(r"\*", ".*") + "$")
                narrow(coll.view(("type", type_), lambda m, p=pattern: p.match(m[0]) is not None))
            elif types is not None:
                names = _as_list(types, "types")
                if len(names) > 20:
                    raise StripeError(400, "You may pass at most 20 types.", param="types")
                wanted = frozenset(names)
                narrow(coll.view(("types", wanted), lambda m, w=wanted: m[0] in w))
            if "delivery_success" in params and not _as_bool(params["delivery_success"], "delivery_success"):
                narrow([])
        return sel

    @staticmethod
    def _expansions(resource: str, params: Mapping[str, Any], prefix: str) -> frozenset[str]:
        """Validated ``expand`` paths; charges can expand ``customer`` and ``refunds``, nothing else can."""
        if not params.get("expand"):
            return frozenset()
        wanted = set()
        for path in _as_list(params["expand"], "expand"):
            name = path[len(prefix) :] if path.startswith(prefix) else None
            if resource != "charges" or name not in ("customer", "refunds"):
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
            wanted.add(name)
        return frozenset(wanted)

    def _expand_charge(self, blob: bytes, fields: frozenset[str]) -> bytes:
        obj = orjson.loads(blob)
        cid = obj.get("customer")
        if "customer" in fields and isinstance(cid, str):
            i = self.customers.pos.get(cid)
            if i is not None:
                obj["customer"] = orjson.loads(self.customers.blob(i))
        if "refunds" in fields:
            refunds = self.refunds
            positions = sorted(refunds.group(0).get(obj["id"], []), reverse=True)
            obj["refunds"] = {
                "object": "list",
                "data": [orjson.loads(refunds.blob(i)) for i in positions],
                "has_more": False,
                "total_count": len(positions),
                "url": f"/v1/charges/{obj['id']}/refunds",
            }
        return orjson.dumps(obj)

    def retrieve(self, resource: str, oid: str, params: Mapping[str, Any], *, now: int) -> bytes:
        """``GET /v1/<resource>/<id>`` → the object's bytes (404 ``resource_missing`` when unknown)."""
        coll = self._collections.get(resource)
        if coll is None:
            raise StripeError(404, f"Unrecognized request URL (GET: /v1/{resource}/{oid}).")
        _check_params(params, frozenset({"expand"}))
        i = coll.pos.get(oid)
        if i is None or (resource == "events" and coll.created[i] < now - EVENT_RETENTION_SECONDS):
            raise _missing(_OBJECT_NAMES[resource], oid)
        expand = self._expansions(resource, params, "")
        return self._expand_charge(coll.blob(i), expand) if expand else coll.blob(i)

    def export(self, resource: str) -> list[dict[str, Any]]:
        """Compact ground truth of every object (any status), newest first, for comparing mirrors."""
        if resource == "charges":
            c = self.charges
            return [
                {
                    "id": c.ids[i],
                    "created": c.created[i],
                    "amount": m[0],
                    "amount_refunded": m[1],
                    "currency": m[2],
                    "status": m[3],
                    "refunded": m[4],
                    "customer": m[5],
                }
                for i in range(len(c) - 1, -1, -1)
                for m in (c.meta[i],)
            ]
        if resource == "subscriptions":
            s = self.subscriptions
            return [
                {
                    "id": s.ids[i],
                    "created": s.created[i],
                    "status": m[0],
                    "canceled_at": m[1],
                    "currency": m[2],
                    "customer": m[3],
                }
                for i in range(len(s) - 1, -1, -1)
                for m in (s.meta[i],)
            ]
        raise KeyError(resource)

    # --- mutations --------------------------------------------------------------------------------------

    def _emit(
        self,
        created: int,
        type_: str,
        obj: bytes,
        request: _RequestInfo,
        previous: dict[str, Any] | None = None,
    ) -> str:
        prefix = "evt_3" if type_.startswith(("charge.", "refund.")) else "evt_1"
        eid = self._ids.long(prefix)
        blob = _event_blob(
            event_id=eid,
            created=created,
            type=type_,
            obj=obj,
            livemode=self.livemode,
            previous=previous,
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
        )
        k = self.events.insert(created, eid, blob, (type_,))
        if self.on_event is not None:
            self.on_event(type_, self.events.blob(k))
        return eid

    _CHARGE_CREATE = frozenset(
        {
            "amount",
            "currency",
            "customer",
            "description",
            "metadata",
            "receipt_email",
            "source",
            "statement_descriptor",
            "statement_descriptor_suffix",
            "capture",
            "expand",
            "transfer_group",
        }
    )

    def create_charge(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``POST /v1/charges``: a succeeded card charge created at ``now``; emits ``charge.succeeded``."""
        _check_params(params, self._CHARGE_CREATE)
        if "amount" not in params:
            raise StripeError(400, "Missing required param: amount.", code="parameter_missing", param="amount")
        if "currency" not in params:
            raise StripeError(400, "Missing required param: currency.", code="parameter_missing", param="currency")
        expand = self._expansions("charges", params, "")
        amount = _as_int(params["amount"], "amount", minimum=1, maximum=99_999_999)
        currency = _as_str(params["currency"], "currency").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise StripeError(400, f"Invalid currency: {currency}.", param="currency")
        cust = None
        year_now = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
        if params.get("customer"):
            cid = _as_str(params["customer"], "customer")
            i = self.customers.pos.get(cid)
            if i is None:
                raise _missing("customer", cid, param="customer", status=400)
            cust = self._customer_from_blob(orjson.loads(self.customers.blob(i)), year_now)
        metadata = _metadata_update({}, params["metadata"]) if "metadata" in params else {}
        description = _as_str(params["description"], "description") if params.get("description") else None
        ch = self._charge_dict(
            self._ids.suffix(),
            now,
            amount,
            currency,
            "succeeded",
            cust,
            year_now,
            description=description,
            metadata=metadata,
        )
        if params.get("receipt_email"):
            ch["receipt_email"] = _as_str(params["receipt_email"], "receipt_email")
        blob = _dump(ch)
        self.charges.insert(now, ch["id"], blob, self._charge_meta(ch))
        self._emit(now, "charge.succeeded", blob, request or _RequestInfo())
        return self._expand_charge(blob, expand) if expand else blob

    def _customer_from_blob(self, c: dict[str, Any], year_now: int) -> _Customer:
        address = c.get("address") or _address(self._rng, "US")
        country = address.get("country") or "US"
        pm = (c.get("invoice_settings") or {}).get("default_payment_method")
        card = _card(self._ids, country, year_now)
        if pm:
            card.payment_method = pm
        return _Customer(
            id=c["id"],
            created=c["created"],
            name=c.get("name") or "",
            email=c.get("email") or "",
            phone=c.get("phone"),
            country=country,
            address=address,
            currency=c.get("currency") or "usd",
            card=card,
        )

    _REFUND_CREATE = frozenset({"charge", "payment_intent", "amount", "reason", "metadata", "expand"})
    _REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

    def create_refund(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``POST /v1/refunds``: refund (part of) a charge; emits ``charge.refunded``, ``refund.created``."""
        _check_params(params, self._REFUND_CREATE)
        if params.get("expand"):
            raise StripeError(400, "This property cannot be expanded.", param="expand")
        if params.get("charge"):
            cid = _as_str(params["charge"], "charge")
            param = "charge"
        elif params.get("payment_intent"):
            pi = _as_str(params["payment_intent"], "payment_intent")
            cid, param = "ch_" + pi[3:] if pi.startswith("pi_") else pi, "payment_intent"
        else:
            raise StripeError(
                400,
                "One of the following params should be provided for this request: charge or payment_intent.",
                code="parameter_missing",
                param="charge",
            )
        i = self.charges.pos.get(cid)
        if i is None:
            shown = cid if param == "charge" else params["payment_intent"]
            raise _missing("charge" if param == "charge" else "payment_intent", shown, param=param, status=400)
        ch = orjson.loads(self.charges.blob(i))
        if ch["status"] != "succeeded":
            raise StripeError(
                400,
                f"Charge {cid} has a status of {ch['status']} and cannot be refunded.",
                code="charge_not_refundable",
                param=param,
            )
        remaining = ch["amount"] - ch["amount_refunded"]
        if remaining <= 0:
            raise StripeError(
                400, f"Charge {cid} has already been refunded.", code="charge_already_refunded", param=param
            )
        amount = remaining
        if params.get("amount", "") != "":
            amount = _as_int(params["amount"], "amount", minimum=1)
            if amount > remaining:
                raise StripeError(
                    400,
                    f"Refund amount ({amount} {ch['currency']}) is greater than unrefunded amount on charge "
                    f"({remaining} {ch['currency']})",
                    code="amount_too_large",
                    param="amount",
                )
        reason = params.get("reason") or None
        if reason is not None and reason not in self._REFUND_REASONS:
            raise StripeError(400, f"Invalid reason: {reason}", param="reason")
        metadata = _metadata_update({}, params["metadata"]) if "metadata" in params else {}
        refund = self._refund_dict(self._ids.long("re_3"), ch, amount, now, self._rng, reason, metadata)
        refund_blob = _dump(refund)
        previous = {"amount_refunded": ch["amount_refunded"], "refunded": ch["refunded"]}
        ch["amount_refunded"] += amount
        ch["refunded"] = ch["amount_refunded"] == ch["amount"]
        blob = _dump(ch)
        self.charges.replace(i, blob, self._charge_meta(ch))
        self.refunds.insert(now, refund["id"], refund_blob, (cid,))
        req = request or _RequestInfo()
        self._emit(now, "charge.refunded", blob, req, previous)
        self._emit(now, "refund.created", refund_blob, req)
        return refund_blob

    def cancel_subscription(
        self, sid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``DELETE /v1/subscriptions/<id>``: cancel now; emits ``customer.subscription.deleted``.

        Like Stripe, an already ended subscription answers 404 ``No such subscription``.
        """
        _check_params(params, frozenset({"invoice_now", "prorate", "cancellation_details", "expand"}))
        i = self.subscriptions.pos.get(sid)
        if i is None or self.subscriptions.meta[i][0] in _ENDED_STATUSES:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        details = params.get("cancellation_details")
        sub["status"] = "canceled"
        sub["canceled_at"] = sub["ended_at"] = now
        sub["cancel_at_period_end"] = False
        sub["cancellation_details"] = {
            "comment": details.get("comment") if isinstance(details, dict) else None,
            "feedback": details.get("feedback") if isinstance(details, dict) else None,
            "reason": "cancellation_requested",
        }
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.deleted", blob, request or _RequestInfo())
        return blob

    def update_subscription(
        self, sid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``POST /v1/subscriptions/<id>`` (``cancel_at_period_end``, ``metadata``, ``description``).

        Emits ``customer.subscription.updated`` with ``previous_attributes`` when something changed.
        """
        _check_params(params, frozenset({"cancel_at_period_end", "metadata", "description", "expand"}))
        i = self.subscriptions.pos.get(sid)
        if i is None:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        previous: dict[str, Any] = {}
        if "cancel_at_period_end" in params:
            flag = _as_bool(params["cancel_at_period_end"], "cancel_at_period_end")
            if sub["status"] in _ENDED_STATUSES:
                raise StripeError(
                    400,
                    "A canceled subscription can only update its cancellation_details and metadata.",
                    param="cancel_at_period_end",
                )
            if flag != sub["cancel_at_period_end"]:
                previous["cancel_at_period_end"] = sub["cancel_at_period_end"]
                previous["cancel_at"] = sub["cancel_at"]
                sub["cancel_at_period_end"] = flag
                sub["cancel_at"] = sub["items"]["data"][0]["current_period_end"] if flag else None
        if "metadata" in params:
            new_md = _metadata_update(sub["metadata"], params["metadata"])
            if new_md != sub["metadata"]:
                previous["metadata"] = sub["metadata"]
                sub["metadata"] = new_md
        if "description" in params:
            desc = _as_str(params["description"], "description") or None
            if desc != sub["description"]:
                previous["description"] = sub["description"]
                sub["description"] = desc
        if not previous:
            return self.subscriptions.blob(i)
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.updated", blob, request or _RequestInfo(), previous)
        return blob


# ---------------------------------------------------------------------------------------------------------
# HTTP: runtime state per key, the API routes and the control routes
# ---------------------------------------------------------------------------------------------------------


class _TokenBucket:
    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        t = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class _Faults:
    rate_limit_burst: int = 0
    server_errors: int = 0
    latency_ms: float = 0.0
    fail_after_requests: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate_limit_burst": self.rate_limit_burst,
            "server_errors": self.server_errors,
            "latency_ms": self.latency_ms,
            "fail_after_requests": self.fail_after_requests,
        }


@dataclass(slots=True)
class _Idempotent:
    fingerprint: str
    status: int
    body: bytes
    stored_at: int
    request_id: str


@dataclass(slots=True)
class _Runtime:
    account: StripeAccount
    spec: dict[str, Any]
    bucket: _TokenBucket
    faults: _Faults = field(default_factory=_Faults)
    requests: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    stripe_version: str | None = None
    stripe_account: str | None = None
    idempotency: dict[str, _Idempotent] = field(default_factory=dict)


_REQ_RNG = _Rng()
_JSON = "application/json"
_RATE_LIMIT_BODY = orjson.dumps(
    {
        "error": {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Request rate limit exceeded. You can learn more about rate limits here "
            "https://stripe.com/docs/rate-limits.",
        }
    }
)
_SERVER_ERROR_BODY = orjson.dumps(
    {
        "error": {
            "type": "api_error",
            "message": "An unknown error occurred (injected by the sandbox). Retrying may succeed.",
        }
    }
)
_ACCOUNT_FIELDS = frozenset(
    {"api_key", "seed", "charges", "subscriptions", "customers", "days", "requests_per_second", "now"}
)
_FAULT_FIELDS = frozenset({"api_key", "rate_limit_burst", "server_errors", "latency_ms", "fail_after_requests"})
# The shared subscription fields (see ``sandbox.webhooks``) plus the account, its secret(s), the event filter
# and a shift of the signed timestamp (negative: stale signatures, to exercise the receiver's tolerance).
_WEBHOOK_FIELDS = frozenset(
    {"url", "duplicate_rate", "hold", "retry_delays", "api_key", "secret", "enabled_events", "timestamp_offset"}
)


def _request_id() -> str:
    return "req_" + _REQ_RNG.text(14)


def _api_key_from(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer":
        return value or None
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None


def _json_response(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers={"content-type": _JSON})


def stripe_signature(body: bytes, at: int, secrets: Sequence[str]) -> str:
    """The ``Stripe-Signature`` of ``body`` signed at ``at``: ``t=`` then one ``v1=`` per secret (two while
    a secret is rolled), each the hex HMAC-SHA256 of ``"{t}.{body}"`` (``docs/providers/stripe.md``, Webhooks)."""
    signed = b"%d." % at + body
    v1 = (hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets)
    return ",".join([f"t={at}", *(f"v1={digest}" for digest in v1)])


def _signer(secrets: tuple[str, ...], offset: int) -> Signer:
    def sign(body: bytes, now: int) -> dict[str, str]:
        return {"Stripe-Signature": stripe_signature(body, now + offset, secrets)}

    return sign


def _control_days(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value * _DAY >= 1:
        raise ControlError(400, "days must be a number > 0 (fractions of a day are allowed)")
    return value


class StripeSandbox:
    """All emulated Stripe accounts of one sandbox server, keyed by API key, plus their HTTP behaviour.

    ``clock`` returns the sandbox's current unix time; mutations stamp events with it and the events
    feed keeps 30 days relative to it. ``webhooks`` delivers the events mutations create to the
    subscriptions of their account.
    """

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self.clock: Callable[[], int] = clock or (lambda: int(time.time()))
        self._runtime: dict[str, _Runtime] = {}
        self.webhooks = WebhookOutbox("stripe", self.clock, retry_delays=WEBHOOK_RETRY_DELAYS)
        # api key -> {outbox key: the event types it receives, None for all}
        self._webhook_keys: dict[str, dict[str, frozenset[str] | None]] = {}

    # --- accounts ---------------------------------------------------------------------------------------

    @staticmethod
    def normalise_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a control-API account body and fill the defaults (``now`` only when given)."""
        unknown = set(spec) - _ACCOUNT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
        key = spec.get("api_key")
        if not isinstance(key, str) or not key:
            raise ControlError(400, "api_key must be a non-empty string")
        charges = optional_int_field(spec, "charges", 1000)
        rps = spec.get("requests_per_second")
        if rps is None:
            rps = 100 if key.startswith("sk_live_") else 25
        if isinstance(rps, bool) or not isinstance(rps, (int, float)) or rps < 0:
            raise ControlError(400, "requests_per_second must be a number >= 0")
        out = {
            "api_key": key,
            "seed": optional_int_field(spec, "seed", 0, minimum=None),
            "charges": charges,
            "subscriptions": optional_int_field(spec, "subscriptions", 100),
            "customers": optional_int_field(spec, "customers", None, minimum=1),
            "days": _control_days(spec.get("days", 90)),
            "requests_per_second": rps,
        }
        if spec.get("now") is not None:
            out["now"] = optional_int_field(spec, "now", None, minimum=None)
        return out

    def add_account(self, spec: Mapping[str, Any]) -> tuple[StripeAccount, str]:
        """Create (or keep, when identical, or replace) an account; returns it and the outcome word."""
        norm = self.normalise_spec(spec)
        return self._install(norm, self._build(norm))

    def _build(self, norm: Mapping[str, Any]) -> StripeAccount | None:
        current = self._runtime.get(norm["api_key"])
        if current is not None and current.spec == norm:
            return None
        return StripeAccount(
            norm["api_key"],
            seed=norm["seed"],
            charges=norm["charges"],
            subscriptions=norm["subscriptions"],
            customers=norm["customers"],
            days=norm["days"],
            now=norm.get("now", self.clock()),
        )

    def _install(self, norm: dict[str, Any], account: StripeAccount | None) -> tuple[StripeAccount, str]:
        key = norm["api_key"]
        current = self._runtime.get(key)
        if account is None and current is not None:
            return current.account, "unchanged"
        assert account is not None
        if key in self._webhook_keys:
            account.on_event = partial(self._deliver, key)
        self._runtime[key] = _Runtime(account=account, spec=norm, bucket=_TokenBucket(norm["requests_per_second"]))
        return account, "created" if current is None else "replaced"

    def account(self, api_key: str) -> StripeAccount | None:
        """The account for a key, if any."""
        rt = self._runtime.get(api_key)
        return rt.account if rt else None

    def accounts(self) -> list[StripeAccount]:
        """All accounts."""
        return [rt.account for rt in self._runtime.values()]

    # --- API --------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The ``/v1`` API routes and the ``/_sandbox/stripe`` control routes (no catch-all)."""
        routes: list[BaseRoute] = []
        for res in RESOURCES:
            routes.append(Route(f"/v1/{res}", self._endpoint(res, False), methods=["GET", "POST", "DELETE"]))
            routes.append(Route(f"/v1/{res}/{{oid}}", self._endpoint(res, True), methods=["GET", "POST", "DELETE"]))
        routes += [
            Route("/_sandbox/stripe/accounts", self._control_accounts, methods=["GET", "POST"]),
            Route("/_sandbox/stripe/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route("/_sandbox/stripe/export/{kind}", self._control_export, methods=["GET"]),
            Route("/_sandbox/stripe/stats", self._control_stats, methods=["GET"]),
            *webhook_control_routes("/_sandbox/stripe", self.webhooks, self._webhook_subscriber),
        ]
        return routes

    def close(self) -> None:
        """Stop the webhook delivery thread (undelivered events are dropped)."""
        self.webhooks.close()

    # --- webhooks ---------------------------------------------------------------------------------------

    def _webhook_subscriber(self, body: dict[str, Any]) -> tuple[str, Signer]:
        """Read a subscription's Stripe fields: the account's api key, the endpoint secret (or the old and
        new secrets during a roll), ``enabled_events`` (``["*"]`` by default) and ``timestamp_offset``."""
        reject_unknown_fields(body, _WEBHOOK_FIELDS, "webhook subscription")
        api_key = body.get("api_key")
        rt = self._runtime_for(api_key)
        secrets = body.get("secret")
        secrets = [secrets] if isinstance(secrets, str) else secrets
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) and s for s in secrets):
            raise ControlError(400, "secret must be the endpoint's signing secret (whsec_...) or a list of them")
        enabled = body.get("enabled_events", ["*"])
        if not isinstance(enabled, list) or not enabled or not all(isinstance(e, str) and e for e in enabled):
            raise ControlError(400, 'enabled_events must be a non-empty list of event types, or ["*"]')
        offset = optional_int_field(body, "timestamp_offset", 0, minimum=None)
        types = None if "*" in enabled else frozenset(enabled)
        key = api_key if types is None else f"{api_key}:{','.join(sorted(types))}"
        self._webhook_keys.setdefault(api_key, {})[key] = types
        rt.account.on_event = partial(self._deliver, api_key)
        return key, _signer(tuple(secrets), offset)

    def _deliver(self, api_key: str, event_type: str, body: bytes) -> None:
        for key, types in self._webhook_keys[api_key].items():
            if types is None or event_type in types:
                self.webhooks.emit(key, body)

    def fallback_routes(self) -> list[BaseRoute]:
        """A ``/v1/{path}`` catch-all answering Stripe's 404 ``Unrecognized request URL``; mount last."""

        async def unknown(request: Request) -> Response:
            return await self._serve(request, None, None)

        return [Route("/v1/{path:path}", unknown, methods=["GET", "POST", "DELETE", "PUT", "PATCH"])]

    def _endpoint(self, resource: str, with_id: bool) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            oid = request.path_params["oid"] if with_id else None
            return await self._serve(request, resource, oid)

        endpoint.__name__ = f"stripe_{resource}{'_object' if with_id else ''}"
        return endpoint

    async def _serve(self, request: Request, resource: str | None, oid: str | None) -> Response:
        rid = _request_id()
        headers = {"content-type": _JSON, "request-id": rid}
        version = request.headers.get("stripe-version")
        headers["stripe-version"] = version or API_VERSION
        key = _api_key_from(request.headers.get("authorization"))
        if key is None:
            err = StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
            return Response(err.body(), status_code=401, headers=headers)
        rt = self._runtime.get(key)
        if rt is None:
            err = StripeError(401, f"Invalid API Key provided: {mask_api_key(key)}")
            return Response(err.body(), status_code=401, headers=headers)
        rt.requests += 1
        if version:
            rt.stripe_version = version
        acct_header = request.headers.get("stripe-account")
        if acct_header:
            rt.stripe_account = acct_header
        faults = rt.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000.0)
        if faults.rate_limit_burst > 0:
            faults.rate_limit_burst -= 1
            rt.rate_limited += 1
            return Response(_RATE_LIMIT_BODY, 429, headers={**headers, "stripe-should-retry": "true"})
        if faults.server_errors > 0 or (faults.fail_after_requests is not None and faults.fail_after_requests <= 0):
            if faults.server_errors > 0:
                faults.server_errors -= 1
            rt.server_errors += 1
            return Response(_SERVER_ERROR_BODY, 500, headers={**headers, "stripe-should-retry": "true"})
        if not rt.bucket.take():
            rt.rate_limited += 1
            return Response(_RATE_LIMIT_BODY, 429, headers={**headers, "stripe-should-retry": "true"})

        method = request.method
        path = request.scope["path"]
        pairs = parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        if method != "GET":
            body = await request.body()
            if body:
                pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        now = self.clock()
        idem_key = request.headers.get("idempotency-key") if method == "POST" else None
        fingerprint = ""
        if idem_key is not None:
            if len(idem_key) > 255:
                err = StripeError(
                    400, "Idempotency-Key must be no longer than 255 characters.", param="Idempotency-Key"
                )
                return Response(err.body(), status_code=400, headers=headers)
            fingerprint = hashlib.sha256(orjson.dumps([method, path, sorted(pairs)])).hexdigest()
            stored = rt.idempotency.get(idem_key)
            if stored is not None and now - stored.stored_at < IDEMPOTENCY_TTL_SECONDS:
                if stored.fingerprint != fingerprint:
                    err = StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they were "
                        f"first used with. Try using a key other than '{idem_key}' if you meant to execute a "
                        "different request.",
                        type="idempotency_error",
                    )
                    return Response(err.body(), status_code=400, headers=headers)
                headers["idempotent-replayed"] = "true"
                headers["original-request"] = stored.request_id
                self._count_success(rt, stored.status)
                return Response(stored.body, status_code=stored.status, headers=headers)
        try:
            params = parse_bracket_params(pairs)
            info = _RequestInfo(rid, idem_key)
            status, payload = 200, self._dispatch(rt.account, method, path, resource, oid, params, now, info)
        except StripeError as err:
            status, payload = err.status, err.body()
        except Exception as exc:  # an emulator bug must still answer with Stripe's envelope
            status = 500
            payload = StripeError(500, f"Internal sandbox error: {exc!r}", type="api_error").body()
        if idem_key is not None and 200 <= status < 300:
            rt.idempotency[idem_key] = _Idempotent(fingerprint, status, payload, now, rid)
            if len(rt.idempotency) > 10000:
                cutoff = now - IDEMPOTENCY_TTL_SECONDS
                rt.idempotency = {k: v for k, v in rt.idempotency.items() if v.stored_at >= cutoff}
        self._count_success(rt, status)
        if status == 429 or status >= 500:
            headers["stripe-should-retry"] = "true"
        return Response(payload, status_code=status, headers=headers)

    @staticmethod
    def _count_success(rt: _Runtime, status: int) -> None:
        f = rt.faults.fail_after_requests
        if f is not None and status < 400:
            rt.faults.fail_after_requests = f - 1

    def _dispatch(
        self,
        account: StripeAccount,
        method: str,
        path: str,
        resource: str | None,
        oid: str | None,
        params: dict[str, Any],
        now: int,
        info: _RequestInfo,
    ) -> bytes:
        if resource is not None:
            if method == "GET":
                if oid is None:
                    return account.list_page(resource, params, now=now)
                return account.retrieve(resource, oid, params, now=now)
            if method == "POST" and oid is None and resource == "charges":
                return account.create_charge(params, now=now, request=info)
            if method == "POST" and oid is None and resource == "refunds":
                return account.create_refund(params, now=now, request=info)
            if resource == "subscriptions" and oid is not None:
                if method == "DELETE":
                    return account.cancel_subscription(oid, params, now=now, request=info)
                if method == "POST":
                    return account.update_subscription(oid, params, now=now, request=info)
        raise StripeError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help "
            "at https://support.stripe.com/.",
        )

    # --- control API ------------------------------------------------------------------------------------

    def _runtime_for(self, api_key: Any) -> _Runtime:
        rt = self._runtime.get(api_key) if isinstance(api_key, str) else None
        if rt is None:
            raise ControlError(404, "unknown api_key")
        return rt

    @staticmethod
    def _account_summary(account: StripeAccount, rt: _Runtime, status: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "api_key": account.api_key,
            "livemode": account.livemode,
            "seed": account.seed,
            "now": account.now,
            "days": account.days,
            "requests_per_second": rt.spec["requests_per_second"],
            **account.counts(),
        }
        if status is not None:
            out["status"] = status
        return out

    @partial(control_endpoint, bad_request=(ValueError,))
    async def _control_accounts(self, request: Request) -> Response:
        if request.method == "GET":
            return _json_response(200, [self._account_summary(rt.account, rt) for rt in self._runtime.values()])
        norm = self.normalise_spec(await read_json_object(request))
        started = time.perf_counter()
        built = await run_in_threadpool(self._build, norm)
        account, status = self._install(norm, built)
        summary = self._account_summary(account, self._runtime[norm["api_key"]], status)
        summary["generation_seconds"] = round(time.perf_counter() - started, 3)
        return _json_response(200, summary)

    @control_endpoint
    async def _control_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            rt = self._runtime_for(request.query_params.get("api_key"))
            rt.faults = _Faults()
            return _json_response(200, rt.faults.as_dict())
        body = await read_json_object(request)
        reject_unknown_fields(body, _FAULT_FIELDS, "fault")
        rt = self._runtime_for(body.get("api_key"))
        f = rt.faults
        if "rate_limit_burst" in body:
            f.rate_limit_burst = optional_int_field(body, "rate_limit_burst", 0) or 0
        if "server_errors" in body:
            f.server_errors = optional_int_field(body, "server_errors", 0) or 0
        if "fail_after_requests" in body:
            f.fail_after_requests = optional_int_field(body, "fail_after_requests", None)
        if "latency_ms" in body:
            latency = body["latency_ms"]
            if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
                raise ControlError(400, "latency_ms must be a number >= 0")
            f.latency_ms = float(latency)
        return _json_response(200, f.as_dict())

    @control_endpoint
    async def _control_export(self, request: Request) -> Response:
        rt = self._runtime_for(request.query_params.get("api_key"))
        kind = request.path_params["kind"]
        if kind not in ("charges", "subscriptions"):
            raise ControlError(404, "export kind must be charges or subscriptions")
        return _json_response(200, rt.account.export(kind))

    @control_endpoint
    async def _control_stats(self, request: Request) -> Response:
        rt = self._runtime_for(request.query_params.get("api_key"))
        return _json_response(
            200,
            {
                "requests": rt.requests,
                "rate_limited": rt.rate_limited,
                "server_errors": rt.server_errors,
                "stripe_version": rt.stripe_version,
                "stripe_account": rt.stripe_account,
                "faults": rt.faults.as_dict(),
            },
        )


class StripeControl(WebhookControl):
    """Typed calls to the Stripe webhook control API of a running ``SandboxServer``."""

    prefix = "/_sandbox/stripe"

    def subscribe_webhooks(self, api_key: str, url: str, secret: str | Sequence[str], **options: Any) -> dict[str, Any]:
        """Deliver the account's new events to ``url`` signed with ``secret``; options: ``enabled_events``,
        ``retry_delays``, ``hold``, ``duplicate_rate``, ``timestamp_offset``. Returns ``{"id", "account", "url"}``."""
        signing = secret if isinstance(secret, str) else list(secret)
        return self._call("POST", "/webhooks", json={"api_key": api_key, "url": url, "secret": signing, **options})
