"""Local emulator of the MYOB Business (AccountRight Live) API v2: company files, sale invoices, customer cards.

The MYOB sync needs an API that behaves like ``api.myob.com/accountright`` and ``secure.myob.com``:
OAuth 2.0 with the API key as ``client_id`` (credentials in the form body, ``expires_in`` as a string,
a ``user`` object), two generations of API keys (before 12 Mar 2025: ``CompanyFile`` scope and a
company-file list; after: granular ``sme-*`` scopes, the file's ``businessId`` only on the consent
redirect), the ``x-myobapi-key`` / ``x-myobapi-version`` / ``x-myobapi-cftoken`` headers, OData v3
paging (``$top`` default 400, max 1000, ``$skip``, ``$orderby``, ``$filter``) in ``{Items,
NextPageLink, Count}`` envelopes, zone-less ``LastModified`` stamps with fractional seconds, ETags,
hard deletes without tombstones, and per-API-key limits (8 calls/s, a daily cap) answered with
``403 RateLimitError``.

Host layout: ``secure.myob.com`` is served under ``/myob/secure`` and ``api.myob.com`` under
``/myob/api``; URIs in answers (``Uri``, ``URI``, ``NextPageLink``) are built from the request's own
origin so they point back at the sandbox. Control routes live under ``/_sandbox/myob``.

Knobs, where MYOB does not document the behaviour or a test needs it shorter. Per API key (control
``clients`` body or a tenant spec): ``key_mode`` ``new``/``legacy``, ``requests_per_second`` 8,
``second_window_seconds`` 1, ``daily_limit`` 1,000,000, ``day_window_seconds`` 86400,
``per_second_status`` 403 or 429. Per company file (tenant spec): ``cftoken_required`` true with
``username``/``password`` (``Administrator``/empty), ``default_top`` 400, ``max_top`` 1000,
``utc_offset_minutes`` 0 (the zone of ``LastModified`` is undocumented), ``generic_invoice_lines``
false, ``unknown_path_status`` 401 (MYOB answers unknown resources with ``OAuthTokenIsInvalid``).
OAuth (control ``settings``, any ``OAuthPolicy`` field): access 1200 s, code 300 s, rotation on every
refresh with no grace for the old token, no refresh-token expiry, no PKCE, ``expires_in`` as a string,
client credentials only in the form body.

Company files are generated deterministically from a seed (same seed, same UIDs and content;
times are spread over the last ``days`` days up to the sandbox clock). Records are plain dicts; nested
links to customers are shared objects, so renaming a customer (control API) shows on its invoices
without touching their ``LastModified``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import gzip
import hashlib
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any
from urllib.parse import quote

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlClient,
    ControlError,
    bool_field,
    control_endpoint,
    number_field,
    optional_int_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.oauth import AccessDenied, Grant, OAuthError, OAuthPolicy, OAuthServer, json_response

__all__ = [
    "DEFAULT_SCOPES",
    "LAYOUTS",
    "LEGACY_SCOPE",
    "MyobControl",
    "MyobError",
    "MyobSandbox",
    "format_myob_datetime",
    "parse_myob_datetime",
]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


API_PREFIX = "/myob/api"
SECURE_PREFIX = "/myob/secure"
CONTROL_PREFIX = "/_sandbox/myob"
LAYOUTS = ("Service", "Item", "Professional", "TimeBilling", "Miscellaneous")
LEGACY_SCOPE = "CompanyFile"
DEFAULT_SCOPES = "sme-company-file sme-sales sme-contacts-customer"
SME_SCOPES = frozenset(
    _words(
        "sme-company-file sme-company-settings sme-general-ledger sme-sales sme-purchases sme-banking sme-inventory "
        "sme-timebilling sme-payroll sme-contacts-customer sme-contacts-supplier sme-contacts-employee "
        "sme-contacts-personal"
    )
)
KEY_MODES = ("new", "legacy")
ERROR_INFORMATION = "Warning, error messages have not been finalised in this release and may change"
_BASE = "@@MYOB_API@@"
_BASE_B = _BASE.encode()
_JSON = "application/json; charset=utf-8"
_EPOCH = dt.datetime(1970, 1, 1)
_US = 1_000_000
_DAY = 86400
_GZIP_MIN_BYTES = 1024

# Fields a typed layout does not carry (``InvoiceType`` is populated only on ``/Sale/Invoice``).
_LAYOUT_ONLY_FIELDS = frozenset(_words("ShipToAddress Freight FreightForeign FreightTaxCode ShippingMethod"))
_TYPED_DROP = {
    "Service": frozenset({"InvoiceType"}),
    "Item": frozenset({"InvoiceType"}),
    "TimeBilling": frozenset({"InvoiceType"}),
    "Professional": _LAYOUT_ONLY_FIELDS | {"InvoiceType"},
    "Miscellaneous": _LAYOUT_ONLY_FIELDS | {"InvoiceType", "Comment", "InvoiceDeliveryStatus"},
}
_GENERIC_DROP = frozenset({"Lines"})
_HAS_FREIGHT = frozenset({"Service", "Item", "TimeBilling"})
_LAYOUT_BY_LOWER = {name.lower(): name for name in LAYOUTS}

_TENANT_FIELDS = frozenset(
    _words(
        "client_id seed invoices customers contacts days name id cftoken_required username password "
        "generic_invoice_lines default_top max_top utc_offset_minutes unknown_path_status key_mode "
        "requests_per_second second_window_seconds daily_limit day_window_seconds per_second_status"
    )
)
_APP_LIMIT_FIELDS = tuple(
    _words("requests_per_second second_window_seconds daily_limit day_window_seconds per_second_status")
)
_CLIENT_FIELDS = frozenset({"client_id", "client_secret", "redirect_uris", "key_mode", "username", *_APP_LIMIT_FIELDS})
_FAULT_FIELDS = frozenset(
    _words("tenant server_errors server_error_status rate_limited gateway_timeouts day_limit_exhausted latency_ms")
)
_CHANGE_FIELDS = ("edits", "voids", "deletes", "creates", "archives", "customer_edits", "customer_creates")


# ---------------------------------------------------------------------------------------------------------
# Errors, time stamps and money
# ---------------------------------------------------------------------------------------------------------


class MyobError(Exception):
    """An API error rendered the way MYOB does: ``{"Errors": [{Name, Message, ...}], "Information"}``."""

    def __init__(
        self,
        status: int,
        name: str,
        message: str,
        *,
        details: str | None = None,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{name}: {message}")
        self.status = status
        self.name = name
        self.message = message
        self.details = details
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON error body."""
        error = {
            "Name": self.name,
            "Message": self.message,
            "AdditionalDetails": self.details,
            "ErrorCode": self.code,
            "Severity": "Error",
            "LearnMore": None,
        }
        return orjson.dumps({"Errors": [error], "Information": ERROR_INFORMATION})


def _token_invalid() -> MyobError:
    return MyobError(
        401,
        "OAuthTokenIsInvalid",
        "The supplied OAuth token (Bearer) is not valid",
        details="Header: Authorization",
        code=31001,
    )


def _not_found(what: str) -> MyobError:
    return MyobError(404, "NotFound", f"The requested {what} was not found", code=150)


def _bad_query(message: str) -> MyobError:
    return MyobError(400, "InvalidQuery", message, details="OData query options")


def format_myob_datetime(us: int) -> str:
    """A zone-less .NET-style stamp: ``2015-03-29T03:31:57.19`` (fraction only when non-zero)."""
    seconds, frac = divmod(us, _US)
    text = (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:06d}".rstrip("0")
    return text


_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,7}))?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
)


def parse_myob_datetime(text: str) -> int:
    """Microseconds since the epoch of a zone-less stamp (date only, minutes, seconds, up to 7 decimals)."""
    match = _DATETIME_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not a date-time: {text!r}")
    year, month, day, hour, minute, second, frac = match.groups()
    moment = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    micro = int((frac or "0").ljust(7, "0")[:6])
    delta = moment - _EPOCH
    return (delta.days * _DAY + delta.seconds) * _US + micro


def _day_stamp(us: int) -> str:
    return format_myob_datetime(us - us % (_DAY * _US))


def _ms(us: int) -> int:
    return us - us % 1000


def _money(cents: int) -> float:
    return cents / 100 if cents else 0.0


def _round_div(numerator: float, denominator: float) -> int:
    value = numerator / denominator
    return int(value + 0.5) if value >= 0 else -int(-value + 0.5)


class _When(int):
    """A date-time as microseconds, so OData comparisons can tell it from a number."""


# ---------------------------------------------------------------------------------------------------------
# OData $filter / $orderby
# ---------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<typed>(?:datetime|guid|datetimeoffset)'(?:[^']|'')*')"
    r"|(?P<str>'(?:[^']|'')*')"
    r"|(?P<num>-?\d+(?:\.\d+)?[mMdDfFlL]?)"
    r"|(?P<punc>[(),])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*))"
)
_COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
_KEYWORDS = frozenset({"and", "or", "not", "true", "false", "null"}) | _COMPARISONS
_STRING_FUNCTIONS = frozenset({"startswith", "endswith", "substringof", "tolower", "toupper", "trim", "length"})
_DATE_FUNCTIONS = frozenset({"year", "month", "day"})

Getter = Callable[[Any], Any]


def _tokenize(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None or match.end() == pos:
            raise _bad_query(f"Syntax error at position {pos} in $filter")
        pos = match.end()
        kind = match.lastgroup
        value = match.group(kind or "")
        if kind == "typed":
            prefix, _, rest = value.partition("'")
            literal = rest[:-1].replace("''", "'")
            if prefix == "guid":
                out.append(("lit", literal.lower()))
            else:
                try:
                    out.append(("lit", _When(parse_myob_datetime(literal))))
                except ValueError:
                    raise _bad_query(f"Unrecognized datetime literal '{literal}' in $filter") from None
        elif kind == "str":
            out.append(("lit", value[1:-1].replace("''", "'")))
        elif kind == "num":
            digits = value.rstrip("mMdDfFlL")
            out.append(("lit", float(digits) if "." in digits else int(digits)))
        elif kind == "punc":
            out.append(("punc", value))
        else:
            lower = value.lower()
            out.append(("kw", lower) if lower in _KEYWORDS else ("name", value))
    return out


def _coerce(a: Any, b: Any) -> tuple[Any, Any]:
    if isinstance(a, _When) and isinstance(b, str):
        try:
            return a, _When(parse_myob_datetime(b))
        except ValueError:
            return str(a), b
    if isinstance(b, _When) and isinstance(a, str):
        try:
            return _When(parse_myob_datetime(a)), b
        except ValueError:
            return a, str(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold(), b.casefold()
    return a, b


def _compare(op: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        if op == "eq":
            return a is None and b is None
        if op == "ne":
            return (a is None) != (b is None)
        return False
    a, b = _coerce(a, b)
    try:
        if op == "eq":
            return bool(a == b)
        if op == "ne":
            return bool(a != b)
        if op == "gt":
            return bool(a > b)
        if op == "ge":
            return bool(a >= b)
        if op == "lt":
            return bool(a < b)
        return bool(a <= b)
    except TypeError:
        return False


class _FilterParser:
    """Recursive-descent parser of the OData v3 ``$filter`` subset MYOB clients use, into closures."""

    def __init__(self, text: str, resolve: Callable[[str], Getter]) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.resolve = resolve

    def parse(self) -> Getter:
        if not self.tokens:
            raise _bad_query("$filter is empty")
        node = self._or()
        if self.pos != len(self.tokens):
            raise _bad_query(f"Unexpected token {self.tokens[self.pos][1]!r} in $filter")
        return node

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, kind: str, value: Any = None) -> Any:
        token = self._peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            want = value if value is not None else kind
            raise _bad_query(f"Expected {want!r} in $filter")
        self.pos += 1
        return token[1]

    def _is(self, kind: str, value: Any) -> bool:
        token = self._peek()
        return token is not None and token[0] == kind and token[1] == value

    def _or(self) -> Getter:
        left = self._and()
        while self._is("kw", "or"):
            self.pos += 1
            right = self._and()
            left = (lambda lf, rf: lambda row: bool(lf(row)) or bool(rf(row)))(left, right)
        return left

    def _and(self) -> Getter:
        left = self._unary()
        while self._is("kw", "and"):
            self.pos += 1
            right = self._unary()
            left = (lambda lf, rf: lambda row: bool(lf(row)) and bool(rf(row)))(left, right)
        return left

    def _unary(self) -> Getter:
        if self._is("kw", "not"):
            self.pos += 1
            inner = self._unary()
            return lambda row: not inner(row)
        return self._comparison()

    def _comparison(self) -> Getter:
        left = self._primary()
        token = self._peek()
        if token is not None and token[0] == "kw" and token[1] in _COMPARISONS:
            self.pos += 1
            right = self._primary()
            op = token[1]
            return lambda row: _compare(op, left(row), right(row))
        return left

    def _primary(self) -> Getter:
        token = self._peek()
        if token is None:
            raise _bad_query("Unexpected end of $filter")
        kind, value = token
        if kind == "punc" and value == "(":
            self.pos += 1
            node = self._or()
            self._take("punc", ")")
            return node
        if kind == "lit":
            self.pos += 1
            return lambda row: value
        if kind == "kw" and value in ("true", "false", "null"):
            self.pos += 1
            constant = {"true": True, "false": False, "null": None}[value]
            return lambda row: constant
        if kind == "name":
            self.pos += 1
            if self._is("punc", "("):
                return self._function(value)
            return self.resolve(value)
        raise _bad_query(f"Unexpected token {value!r} in $filter")

    def _function(self, name: str) -> Getter:
        lower = name.lower()
        if lower not in _STRING_FUNCTIONS and lower not in _DATE_FUNCTIONS:
            raise _bad_query(f"Unknown function '{name}' in $filter")
        self._take("punc", "(")
        args = [self._or()]
        while self._is("punc", ","):
            self.pos += 1
            args.append(self._or())
        self._take("punc", ")")
        arity = 2 if lower in ("startswith", "endswith", "substringof") else 1
        if len(args) != arity:
            raise _bad_query(f"Function '{name}' takes {arity} argument(s)")
        return _function_node(lower, args)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    return format_myob_datetime(value) if isinstance(value, _When) else str(value)


def _function_node(name: str, args: list[Getter]) -> Getter:
    first = args[0]
    if name in ("startswith", "endswith", "substringof"):
        second = args[1]

        def test(row: Any) -> bool:
            a, b = _as_text(first(row)), _as_text(second(row))
            if a is None or b is None:
                return False
            a, b = a.casefold(), b.casefold()
            if name == "startswith":
                return a.startswith(b)
            if name == "endswith":
                return a.endswith(b)
            return a in b

        return test
    if name in _DATE_FUNCTIONS:

        def part(row: Any) -> int | None:
            value = first(row)
            if isinstance(value, str):
                try:
                    value = parse_myob_datetime(value)
                except ValueError:
                    return None
            if not isinstance(value, int):
                return None
            moment = _EPOCH + dt.timedelta(microseconds=value)
            return getattr(moment, name)

        return part

    def transform(row: Any) -> Any:
        text = _as_text(first(row))
        if text is None:
            return None
        if name == "tolower":
            return text.lower()
        if name == "toupper":
            return text.upper()
        if name == "trim":
            return text.strip()
        return len(text)

    return transform


def _orderby_keys(text: str) -> list[tuple[str, bool]]:
    keys: list[tuple[str, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2:
            raise _bad_query(f"Invalid $orderby clause '{part.strip()}'")
        direction = words[1].lower() if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise _bad_query(f"Invalid $orderby direction '{words[1]}'")
        keys.append((words[0], direction == "desc"))
    return keys


def _sort_key(getter: Getter) -> Callable[[Any], tuple[int, Any]]:
    def key(row: Any) -> tuple[int, Any]:
        value = getter(row)
        if value is None:
            return (0, 0)
        if isinstance(value, str):
            return (1, value.casefold())
        if isinstance(value, (dict, list)):
            raise _bad_query("$orderby needs a property of a primitive type")
        return (1, value)

    return key


# ---------------------------------------------------------------------------------------------------------
# Company files and their generated records
# ---------------------------------------------------------------------------------------------------------


class _Rng(random.Random):
    def uid(self) -> str:
        return str(uuid.UUID(int=self.getrandbits(128), version=4))

    def pick(self, seq: list[Any] | tuple[Any, ...]) -> Any:
        return seq[int(self.random() * len(seq))]


@dataclass(slots=True)
class _Row:
    """One record: its API dict plus the stamps kept as integers (UTC microseconds) for filters."""

    uid: str
    rec: dict[str, Any]
    created_us: int
    lm_us: int
    layout: str | None = None


_COMPANY_WORDS = _words("Acacia Banksia Coastal Dingo Eucalypt Harbour Kookaburra Outback Southern Wattle Granite")
_COMPANY_KINDS = _words("Plumbing Electrical Landscaping Consulting Bakery Joinery Logistics Design Cleaning Motors")
_FIRST_NAMES = _words("Olivia Jack Charlotte William Amelia Noah Isla Thomas Mia Liam Grace Lachlan Chloe Oliver Ruby")
_LAST_NAMES = _words("Smith Jones Williams Brown Wilson Taylor Nguyen Anderson Martin Thompson White Walker Kelly Ryan")
_CITIES = [
    tuple(city.split(":"))
    for city in _words(
        "Sydney:NSW:2000 Melbourne:VIC:3000 Brisbane:QLD:4000 Perth:WA:6000 Adelaide:SA:5000 "
        "Hobart:TAS:7000 Canberra:ACT:2600 Darwin:NT:0800"
    )
]
_STREETS = ("George St", "Collins St", "Queen St", "Hay St", "King William St", "Elizabeth St", "Smith St")
_SERVICES = ("Consulting services", "Site inspection", "Monthly maintenance", "Installation labour", "Repairs")
# Foreign currency units per 1 AUD (the file's local currency), roughly.
_CURRENCIES = (("USD", "US Dollar", 0.65), ("NZD", "New Zealand Dollar", 1.09), ("GBP", "Pound Sterling", 0.52))
_LAYOUT_WEIGHTS = tuple(zip(LAYOUTS, (0.45, 0.30, 0.15, 0.05, 0.05), strict=True))


@dataclass
class _TenantKnobs:
    cftoken_required: bool = True
    username: str = "Administrator"
    password: str = ""
    generic_invoice_lines: bool = False
    default_top: int = 400
    max_top: int = 1000
    utc_offset_minutes: int = 0
    unknown_path_status: int = 401


class _CompanyFile:
    """One AccountRight company file: reference data, customers and sale invoices, generated from a seed."""

    def __init__(
        self,
        business_id: str,
        name: str,
        client_id: str,
        *,
        seed: int,
        invoices: int,
        customers: int,
        days: float,
        now: int,
        knobs: _TenantKnobs,
    ) -> None:
        self.id = business_id
        self.name = name
        self.client_id = client_id
        self.seed = seed
        self.knobs = knobs
        self.offset_us = knobs.utc_offset_minutes * 60 * _US
        self.cf_path = f"{_BASE}/accountright/{business_id}"
        self.invoices: dict[str, _Row] = {}
        self.customers: dict[str, _Row] = {}
        self.customer_links: dict[str, dict[str, Any]] = {}
        self.deleted_invoice_ids: list[str] = []
        self.deleted_customer_ids: list[str] = []
        rng = _Rng(seed)
        self._rv = 6_000_000_000_000_000_000 + rng.getrandbits(48)
        self._rv_rng = _Rng(seed ^ 0x5A5A)
        self.change_rng = _Rng(seed ^ 0xC4A4)
        self.next_number = 1
        self.next_card = 1
        self.serial = f"{rng.getrandbits(40):012d}"[:12]
        self.launcher_id = rng.uid()
        self._make_reference_data(rng)
        started = now * _US - int(days * _DAY * _US)
        self._generate(rng, invoices, customers, started, now * _US)

    # --- reference data ---------------------------------------------------------------------------------

    def _link(self, kind: str, uid: str, **attrs: Any) -> dict[str, Any]:
        return {"UID": uid, **attrs, "URI": f"{self.cf_path}/{kind}/{uid}"}

    def _make_reference_data(self, rng: _Rng) -> None:
        self.tax_gst = self._link("GeneralLedger/TaxCode", rng.uid(), Code="GST")
        self.tax_fre = self._link("GeneralLedger/TaxCode", rng.uid(), Code="FRE")
        self.accounts = [
            self._link("GeneralLedger/Account", rng.uid(), Name=name, DisplayID=display)
            for name, display in (("Sales", "4-1000"), ("Consulting Income", "4-2000"), ("Service Income", "4-3000"))
        ]
        self.items = [
            self._link("Inventory/Item", rng.uid(), Number=f"ITM{i:04d}", Name=name)
            for i, name in enumerate(
                ("Copper fitting", "Garden hose 20m", "LED downlight", "Timber panel", "Paint 10L", "Cable 100m"),
                start=1,
            )
        ]
        self.activities = [
            self._link("TimeBilling/Activity", rng.uid(), Name=name, DisplayID=f"ACT{i:03d}")
            for i, name in enumerate(("Consulting hour", "Travel time", "On-site labour"), start=1)
        ]
        self.currencies = {
            code: (self._link("GeneralLedger/Currency", rng.uid(), Code=code, CurrencyName=name), rate)
            for code, name, rate in _CURRENCIES
        }

    def row_version(self) -> str:
        """A fresh ``RowVersion``: a signed 64-bit integer string that grows with every change."""
        self._rv += 1 + self._rv_rng.getrandbits(16)
        return str(self._rv)

    def stamp(self, us: int) -> str:
        """The file-local zone-less rendering of a UTC instant."""
        return format_myob_datetime(us + self.offset_us)

    # --- generation -------------------------------------------------------------------------------------

    def _generate(self, rng: _Rng, n_invoices: int, n_customers: int, start_us: int, now_us: int) -> None:
        span = max(1, now_us - start_us)
        customer_times = sorted(_ms(start_us + int(rng.random() * span)) for _ in range(n_customers))
        for created in customer_times:
            self._add_customer(rng, created, self._later(rng, created, now_us))
        customer_rows = list(self.customers.values())
        invoice_times = sorted(_ms(start_us + int(rng.random() * span)) for _ in range(n_invoices))
        for created in invoice_times:
            customer = rng.pick(customer_rows) if customer_rows else None
            self._add_invoice(rng, created, self._later(rng, created, now_us), customer)
        balances: Counter[str] = Counter()
        for row in self.invoices.values():
            balances[row.rec["Customer"]["UID"]] += round(row.rec["BalanceDueAmount"] * 100)
        for row in customer_rows:
            row.rec["CurrentBalance"] = _money(balances[row.uid])

    @staticmethod
    def _later(rng: _Rng, created: int, now_us: int) -> int:
        if rng.random() < 0.35:
            return _ms(created + int(rng.random() * max(0, now_us - created)))
        return min(now_us, _ms(created + rng.randrange(0, 5_000_000)))

    def _add_customer(self, rng: _Rng, created: int, modified: int, uid: str | None = None) -> _Row:
        uid = uid or rng.uid()
        individual = rng.random() < 0.3
        city, state, postcode = rng.pick(_CITIES)
        if individual:
            first, last = rng.pick(_FIRST_NAMES), rng.pick(_LAST_NAMES)
            company, name = None, f"{last}, {first}"
            email = f"{first}.{last}{rng.randrange(100)}@example.com".lower()
        else:
            first = last = None
            company = name = f"{rng.pick(_COMPANY_WORDS)} {rng.pick(_COMPANY_KINDS)} Pty Ltd"
            email = f"accounts@{company.split()[0].lower()}{rng.randrange(1000)}.example.com.au"
        display = f"CUS{self.next_card:06d}"
        self.next_card += 1
        currency = None
        if rng.random() < 0.25:
            currency = self.currencies[rng.pick(_CURRENCIES)[0]][0]
        terms_days = rng.pick((7, 14, 30, 30, 30))
        rec: dict[str, Any] = {
            "UID": uid,
            "CompanyName": company,
            "LastName": last,
            "FirstName": first,
            "IsIndividual": individual,
            "DisplayID": display,
            "IsActive": rng.random() >= 0.08,
            "Addresses": [
                {
                    "Location": 1,
                    "Street": f"{rng.randrange(1, 400)} {rng.pick(_STREETS)}",
                    "City": city,
                    "State": state,
                    "PostCode": postcode,
                    "Country": "Australia",
                    "Phone1": f"0{rng.randrange(2, 9)} {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}",
                    "Phone2": None,
                    "Phone3": None,
                    "Fax": None,
                    "Email": email,
                    "Website": None,
                    "ContactName": None if individual else f"{rng.pick(_FIRST_NAMES)} {rng.pick(_LAST_NAMES)}",
                    "Salutation": None,
                }
            ],
            "Notes": "",
            "Identifiers": [],
            "CustomList1": None,
            "CustomList2": None,
            "CustomList3": None,
            "CustomField1": None,
            "CustomField2": None,
            "CustomField3": None,
            "CurrentBalance": 0.0,
            "SellingDetails": {
                "SaleLayout": rng.pick(("Service", "Item", "Professional")),
                "PrintedForm": "Pre-printed Invoice",
                "InvoiceDelivery": rng.pick(("Print", "Email", "PrintAndEmail")),
                "ItemPriceLevel": "Base Selling Price",
                "IncomeAccount": None,
                "ReceiptMemo": None,
                "SalesPerson": None,
                "SaleComment": None,
                "ShippingMethod": None,
                "HourlyBillingRate": 0.0,
                "ABN": f"{rng.randrange(10, 99)} {rng.randrange(100, 999)} {rng.randrange(100, 999)} "
                f"{rng.randrange(100, 999)}",
                "ABNBranch": None,
                "TaxCode": self.tax_gst,
                "FreightTaxCode": self.tax_gst,
                "UseCustomerTaxCode": False,
                "Terms": {
                    "PaymentIsDue": "InAGivenNumberOfDays",
                    "DiscountDate": 0,
                    "BalanceDueDate": terms_days,
                    "DiscountForEarlyPayment": 0.0,
                    "MonthlyChargeForLatePayment": 0.0,
                    "VolumeDiscount": 0.0,
                },
                "Credit": {"Limit": 0.0, "Available": 0.0, "PastDue": 0.0, "OnHold": False},
                "TaxIdNumber": None,
                "Memo": None,
            },
            "PaymentDetails": {
                "Method": rng.pick(("Cash", "Cheque", "Electronic")),
                "CardNumber": None,
                "NameOnCard": None,
                "BSBNumber": None,
                "BankAccountNumber": None,
                "BankAccountName": None,
                "Notes": None,
            },
            "PhotoURI": None,
            "ForeignCurrency": currency,
            "Created": self.stamp(created),
            "LastModified": self.stamp(modified),
            "URI": f"{self.cf_path}/Contact/Customer/{uid}",
            "RowVersion": self.row_version(),
        }
        self.customer_links[uid] = {"UID": uid, "Name": name, "DisplayID": display, "URI": rec["URI"]}
        row = _Row(uid, rec, created, modified)
        self.customers[uid] = row
        return row

    def _lines(
        self, rng: _Rng, layout: str, date_stamp: str, sign: int, rate: float | None
    ) -> tuple[list[dict[str, Any]], list[tuple[int, int, bool]]]:
        """Lines in the invoice's currency, and per line (amount cents, local cents, GST?)."""
        lines: list[dict[str, Any]] = []
        amounts: list[tuple[int, int, bool]] = []
        for row_id in range(1, 1 + rng.choice((1, 1, 2, 2, 3, 4))):
            gst = rng.random() < 0.85
            tax = self.tax_gst if gst else self.tax_fre
            line: dict[str, Any] = {"RowID": row_id, "Type": "Transaction"}
            if layout == "Item":
                item = rng.pick(self.items)
                qty = rng.randrange(1, 11)
                unit = rng.randrange(500, 50_000)
                cents = sign * qty * unit
                line.update(
                    Description=item["Name"],
                    ShipQuantity=float(qty),
                    UnitPrice=_money(unit),
                    UnitPriceForeign=_money(unit) if rate else None,
                    DiscountPercent=0.0,
                )
            elif layout == "TimeBilling":
                activity = rng.pick(self.activities)
                hours = rng.randrange(1, 17) / 2
                hourly = rng.randrange(8_000, 25_000)
                cents = sign * round(hours * hourly)
                line.update(
                    Date=date_stamp, Hours=hours, Activity=activity, Rate=_money(hourly), Description=activity["Name"]
                )
            else:
                cents = sign * rng.randrange(1_000, 500_000)
                line["Description"] = rng.pick(_SERVICES)
                if layout == "Professional":
                    line["Date"] = date_stamp
                line["Account"] = rng.pick(self.accounts)
            local = _round_div(cents, rate) if rate else cents
            line.update(Total=_money(local), TotalForeign=_money(cents) if rate else None, Job=None, TaxCode=tax)
            if layout == "Item":
                line["Item"] = item
                line["Location"] = None
            line["RowVersion"] = self.row_version()
            lines.append(line)
            amounts.append((cents, local, gst))
        return lines, amounts

    def _add_invoice(
        self,
        rng: _Rng,
        created: int,
        modified: int,
        customer: _Row | None,
        *,
        layout: str | None = None,
        uid: str | None = None,
        status_roll: float | None = None,
    ) -> _Row:
        uid = uid or rng.uid()
        if layout is None:
            roll, layout = rng.random(), LAYOUTS[-1]
            for name, weight in _LAYOUT_WEIGHTS:
                if roll < weight:
                    layout = name
                    break
                roll -= weight
        roll = rng.random() if status_roll is None else status_roll
        status = "Credit" if roll < 0.08 else "Closed" if roll < 0.55 else "Open"
        sign = -1 if status == "Credit" else 1
        currency_link = customer.rec["ForeignCurrency"] if customer else None
        rate: float | None = None
        if currency_link is not None:
            base_rate = self.currencies[currency_link["Code"]][1]
            rate = round(base_rate * (0.98 + rng.random() * 0.04), 6)
        date_us = created + self.offset_us
        date_stamp = format_myob_datetime(date_us - date_us % (_DAY * _US))
        lines, amounts = self._lines(rng, layout, date_stamp, sign, rate)
        inclusive = rng.random() < 0.6
        freight = 0
        if layout in _HAS_FREIGHT and rng.random() < 0.3:
            freight = sign * rng.randrange(1_000, 3_000)
        freight_local = _round_div(freight, rate) if rate else freight

        def tax_of(cents: int, gst: bool) -> int:
            if not gst:
                return 0
            return _round_div(cents, 11) if inclusive else _round_div(cents, 10)

        subtotal = sum(a for a, _, _ in amounts)
        subtotal_local = sum(loc for _, loc, _ in amounts)
        tax = sum(tax_of(a, gst) for a, _, gst in amounts) + tax_of(freight, True)
        tax_local = sum(tax_of(loc, gst) for _, loc, gst in amounts) + tax_of(freight_local, True)
        total = subtotal + freight + (0 if inclusive else tax)
        total_local = subtotal_local + freight_local + (0 if inclusive else tax_local)
        if status == "Closed":
            balance = balance_local = 0
        elif status == "Open" and rng.random() < 0.25:
            balance = total - _round_div(total * rng.randrange(10, 90), 100)
            balance_local = _round_div(balance, rate) if rate else balance
        else:
            balance, balance_local = total, total_local
        paid_on = None
        if balance != total:
            paid_us = created + int(rng.random() * max(0, modified - created)) + self.offset_us
            paid_on = format_myob_datetime(paid_us - paid_us % (_DAY * _US))
        due_days = customer.rec["SellingDetails"]["Terms"]["BalanceDueDate"] if customer else 30
        due_us = date_us - date_us % (_DAY * _US) + due_days * _DAY * _US
        link = self.customer_links[customer.uid] if customer else None
        name = link["Name"] if link else "Cash Sales"
        fx = rate is not None
        rec: dict[str, Any] = {
            "UID": uid,
            "Number": f"{self.next_number:08d}",
            "Date": date_stamp,
            "CustomerPurchaseOrderNumber": f"PO{rng.randrange(1000, 99999)}" if rng.random() < 0.3 else "",
            "Customer": link,
            "PromisedDate": None,
            "BalanceDueAmount": _money(balance_local),
            "BalanceDueAmountForeign": _money(balance) if fx else None,
            "Status": status,
            "InvoiceType": layout,
            "Lines": lines,
            "ShipToAddress": f"{name}\r\n{customer.rec['Addresses'][0]['Street']}" if customer else None,
            "Terms": {
                "PaymentIsDue": "InAGivenNumberOfDays",
                "DiscountDate": 0,
                "BalanceDueDate": due_days,
                "DiscountForEarlyPayment": 0.0,
                "MonthlyChargeForLatePayment": 0.0,
                "DiscountExpiryDate": date_stamp,
                "Discount": 0.0,
                "DiscountForeign": 0.0 if fx else None,
                "DueDate": format_myob_datetime(due_us),
                "FinanceCharge": 0.0,
                "FinanceChargeForeign": 0.0 if fx else None,
            },
            "IsTaxInclusive": inclusive,
            "Subtotal": _money(subtotal_local),
            "SubtotalForeign": _money(subtotal) if fx else None,
            "Freight": _money(freight_local),
            "FreightForeign": _money(freight) if fx else None,
            "FreightTaxCode": self.tax_gst if layout in _HAS_FREIGHT else None,
            "TotalTax": _money(tax_local),
            "TotalTaxForeign": _money(tax) if fx else None,
            "TotalAmount": _money(total_local),
            "TotalAmountForeign": _money(total) if fx else None,
            "Category": None,
            "Salesperson": None,
            "Comment": "Thank you for your business." if layout != "Miscellaneous" else None,
            "ShippingMethod": None,
            "JournalMemo": f"Sale; {name}",
            "ReferralSource": None,
            "InvoiceDeliveryStatus": rng.pick(("Print", "Email", "Nothing")) if layout != "Miscellaneous" else None,
            "LastPaymentDate": paid_on,
            "CanApplySurcharge": False,
            "Order": None,
            "OnlinePaymentMethod": "All",
            "ForeignCurrency": currency_link,
            "CurrencyExchangeRate": rate if fx else 1.0,
            "Created": self.stamp(created),
            "LastModified": self.stamp(modified),
            "URI": f"{self.cf_path}/Sale/Invoice/{layout}/{uid}",
            "RowVersion": self.row_version(),
        }
        self.next_number += 1
        row = _Row(uid, rec, created, modified, layout)
        self.invoices[uid] = row
        return row

    # --- mutation helpers -------------------------------------------------------------------------------

    def touch(self, row: _Row, us: int) -> None:
        """Record a change at ``us``: new ``LastModified`` and ``RowVersion``."""
        row.lm_us = us
        row.rec["LastModified"] = self.stamp(us)
        row.rec["RowVersion"] = self.row_version()

    def apply_changes(self, counts: Mapping[str, int], now_us: int) -> dict[str, list[str]]:
        """Edit, reverse, hard-delete and create invoices; deactivate, edit and create customers, at ``now_us``."""
        rng = self.change_rng
        out: dict[str, list[str]] = {
            name: []
            for name in (
                "edited",
                "voided",
                "deleted",
                "created",
                "archived",
                "reversals",
                "customers_edited",
                "customers_created",
            )
        }
        picked = counts["edits"] + counts["voids"] + counts["deletes"]
        if picked > len(self.invoices):
            raise ControlError(400, f"edits + voids + deletes ({picked}) exceed the {len(self.invoices)} invoices")
        chosen = rng.sample(list(self.invoices), picked)
        edits, voids = chosen[: counts["edits"]], chosen[counts["edits"] : counts["edits"] + counts["voids"]]
        deletes = chosen[counts["edits"] + counts["voids"] :]
        active = [uid for uid, row in self.customers.items() if row.rec["IsActive"]]
        if counts["archives"] > len(active):
            raise ControlError(400, f"archives ({counts['archives']}) exceed the {len(active)} active customers")
        if counts["customer_edits"] > len(self.customers):
            raise ControlError(400, "customer_edits exceed the number of customers")
        for uid in edits:
            self._edit_invoice(self.invoices[uid], rng, now_us)
            out["edited"].append(uid)
        for uid in voids:
            out["reversals"].append(self._reverse_invoice(self.invoices[uid], rng, now_us).uid)
            out["voided"].append(uid)
        for uid in deletes:
            del self.invoices[uid]
            self.deleted_invoice_ids.append(uid)
            out["deleted"].append(uid)
        for uid in rng.sample(active, counts["archives"]):
            row = self.customers[uid]
            row.rec["IsActive"] = False
            self.touch(row, now_us)
            out["archived"].append(uid)
        for uid in rng.sample(list(self.customers), counts["customer_edits"]):
            row = self.customers[uid]
            row.rec["Notes"] = f"Updated {self.stamp(now_us)}; ref {rng.randrange(10_000, 99_999)}"
            address = dict(row.rec["Addresses"][0])
            address["Phone1"] = f"0{rng.randrange(2, 9)} {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}"
            row.rec["Addresses"] = [address, *row.rec["Addresses"][1:]]
            self.touch(row, now_us)
            out["customers_edited"].append(uid)
        for _ in range(counts["customer_creates"]):
            out["customers_created"].append(self._add_customer(rng, now_us, now_us).uid)
        customers = [self.customers[uid] for uid in self.customers if self.customers[uid].rec["IsActive"]]
        for _ in range(counts["creates"]):
            customer = rng.pick(customers) if customers else None
            out["created"].append(self._add_invoice(rng, now_us, now_us, customer).uid)
        return out

    def _edit_invoice(self, row: _Row, rng: _Rng, now_us: int) -> None:
        rec = row.rec
        today = _day_stamp(now_us + self.offset_us)
        if rec["Status"] == "Open" and rng.random() < 0.6:
            balance = round(rec["BalanceDueAmount"] * 100)
            paid = balance if rng.random() < 0.6 else _round_div(balance * rng.randrange(10, 90), 100)
            rest = balance - paid
            rec["BalanceDueAmount"] = _money(rest)
            if rec["BalanceDueAmountForeign"] is not None:
                rate = rec["CurrencyExchangeRate"] or 1.0
                rec["BalanceDueAmountForeign"] = _money(round(rest * rate)) if rest else 0.0
            rec["LastPaymentDate"] = today
            if rest == 0:
                rec["Status"] = "Closed"
        else:
            rec["JournalMemo"] = f"{rec['JournalMemo'].split(' [')[0]} [rev {rng.randrange(1000, 9999)}]"
            rec["CustomerPurchaseOrderNumber"] = f"PO{rng.randrange(1000, 99999)}"
        self.touch(row, now_us)

    def _reverse_invoice(self, row: _Row, rng: _Rng, now_us: int) -> _Row:
        """MYOB has no void: "Reverse Sale" closes the sale and adds an applied sale of the opposite sign."""
        original = row.rec
        today = _day_stamp(now_us + self.offset_us)
        original["BalanceDueAmount"] = 0.0
        if original["BalanceDueAmountForeign"] is not None:
            original["BalanceDueAmountForeign"] = 0.0
        original["Status"] = "Closed"
        original["LastPaymentDate"] = today
        self.touch(row, now_us)
        rec = _clone(original)
        uid = rng.uid()
        for key in (
            "Subtotal",
            "SubtotalForeign",
            "Freight",
            "FreightForeign",
            "TotalTax",
            "TotalTaxForeign",
            "TotalAmount",
            "TotalAmountForeign",
        ):
            if rec[key] is not None:
                rec[key] = -rec[key] or 0.0
        for line in rec["Lines"]:
            for key in ("Total", "TotalForeign"):
                if line.get(key) is not None:
                    line[key] = -line[key] or 0.0
            if "ShipQuantity" in line:
                line["ShipQuantity"] = -line["ShipQuantity"] or 0.0
            line["RowVersion"] = self.row_version()
        rec.update(
            UID=uid,
            Number=f"{self.next_number:08d}",
            Date=today,
            Customer=original["Customer"],
            ForeignCurrency=original["ForeignCurrency"],
            FreightTaxCode=original["FreightTaxCode"],
            JournalMemo=f"Reversal; {original['JournalMemo']}",
            Created=self.stamp(now_us),
            LastModified=self.stamp(now_us),
            URI=f"{self.cf_path}/Sale/Invoice/{row.layout}/{uid}",
            RowVersion=self.row_version(),
        )
        self.next_number += 1
        reversal = _Row(uid, rec, now_us, now_us, row.layout)
        self.invoices[uid] = reversal
        return reversal

    def add_record(self, entity: str, fields: Mapping[str, Any], at_us: int) -> _Row:
        """A new invoice or customer stamped ``at_us`` with ``fields`` laid over the generated values."""
        rng = self.change_rng
        overrides = dict(fields)
        uid = overrides.pop("UID", None)
        if uid is not None:
            if not isinstance(uid, str) or uid.lower() in self.invoices or uid.lower() in self.customers:
                raise ControlError(400, "UID must be a new GUID string")
            uid = uid.lower()
        if entity == "customer":
            row = self._add_customer(rng, at_us, at_us, uid=uid)
        else:
            layout = overrides.pop("InvoiceType", None)
            if layout is not None and layout not in LAYOUTS:
                raise ControlError(400, f"InvoiceType must be one of {list(LAYOUTS)}")
            customer = self._customer_of(overrides)
            if customer is None:
                active = [r for r in self.customers.values() if r.rec["IsActive"]]
                customer = rng.pick(active) if active else None
            row = self._add_invoice(rng, at_us, at_us, customer, layout=layout, uid=uid)
        self.override(row, overrides)
        return row

    def _customer_of(self, overrides: dict[str, Any]) -> _Row | None:
        link = overrides.pop("Customer", None)
        if link is None:
            return None
        uid = link.get("UID") if isinstance(link, dict) else None
        row = self.customers.get(str(uid).lower()) if uid else None
        if row is None:
            raise ControlError(404, f"no customer {uid!r} in this company file")
        return row

    def override(self, row: _Row, overrides: dict[str, Any]) -> None:
        """Lay control-API field values over a record (customer links resolved, card names kept in sync)."""
        keys = _CUSTOMER_KEYS if row.layout is None else _INVOICE_KEYS
        unknown = set(overrides) - keys
        if unknown:
            raise ControlError(400, f"unknown fields: {sorted(unknown)}")
        for fixed in ("UID", "URI", "RowVersion", "LastModified", "Created", "InvoiceType"):
            if fixed in overrides:
                raise ControlError(400, f"{fixed} is managed by the sandbox (use updated_at for the time)")
        if row.layout is not None:
            customer = self._customer_of(overrides)
            if customer is not None:
                row.rec["Customer"] = self.customer_links[customer.uid]
        row.rec.update(overrides)
        if row.layout is None:
            rec, link = row.rec, self.customer_links[row.uid]
            name = rec["CompanyName"] or ", ".join(p for p in (rec["LastName"], rec["FirstName"]) if p)
            link["Name"], link["DisplayID"] = name, rec["DisplayID"]

    def counts(self) -> dict[str, Any]:
        """Record counts for the control API."""
        layouts = Counter(row.layout for row in self.invoices.values())
        return {
            "invoices": len(self.invoices),
            "customers": len(self.customers),
            "layouts": {name: layouts.get(name, 0) for name in LAYOUTS},
        }


def _clone(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


# ---------------------------------------------------------------------------------------------------------
# Per-API-key state: key generation, limits, faults
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _App:
    """One MYOB API key (= OAuth ``client_id``): its key generation and its rate limits."""

    client_id: str
    key_mode: str = "new"
    username: str = "sandbox.user@example.com"
    uid: str = ""
    requests_per_second: int = 8
    second_window_seconds: float = 1.0
    daily_limit: int = 1_000_000
    day_window_seconds: float = 86400.0
    per_second_status: int = 403
    second_started: float = 0.0
    second_count: int = 0
    day_started: float = 0.0
    day_count: int = 0
    tenants: list[str] = field(default_factory=list)

    def limits(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _APP_LIMIT_FIELDS}

    def take(self) -> str | None:
        """Count one call in fixed real-time windows; ``"day"``/``"second"`` when a limit refuses it."""
        now = time.monotonic()
        if now - self.day_started >= self.day_window_seconds:
            self.day_started, self.day_count = now, 0
        if self.daily_limit >= 0 and self.day_count >= self.daily_limit:
            return "day"
        if now - self.second_started >= self.second_window_seconds:
            self.second_started, self.second_count = now, 0
        if self.requests_per_second > 0 and self.second_count >= self.requests_per_second:
            return "second"
        self.second_count += 1
        self.day_count += 1
        return None


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    gateway_timeouts: int = 0
    day_limit_exhausted: bool = False
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "gateway_timeouts": self.gateway_timeouts,
            "day_limit_exhausted": self.day_limit_exhausted,
            "latency_ms": self.latency_ms,
        }


_control = partial(control_endpoint, oauth_errors=True)


def _status_field(body: Mapping[str, Any], name: str, default: int, allowed: Iterable[int]) -> int:
    value = optional_int_field(body, name, default)
    if value not in set(allowed):
        raise ControlError(400, f"{name} must be one of {sorted(set(allowed))}")
    return int(value)


def _control_json(status: int, payload: Any, origin: str | None = None) -> Response:
    body = orjson.dumps(payload)
    if origin is not None:
        body = body.replace(_BASE_B, f"{origin}{API_PREFIX}".encode())
    return Response(body, status_code=status, headers={"content-type": "application/json"})


def _origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def _query_string(params: Iterable[tuple[str, str]]) -> str:
    return "&".join(f"{quote(k, safe='$')}={quote(v, safe=chr(39) + '$(),:/')}" for k, v in params)


# ---------------------------------------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------------------------------------


class MyobSandbox:
    """All emulated MYOB company files and API keys of one sandbox server, plus their HTTP behaviour."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=1200,
            code_ttl=300,
            refresh_idle_ttl=None,
            rotate=True,
            rotate_after=0,
            grace=0,
            client_auth=frozenset({"body"}),
            pkce=False,
            expires_in_as_string=True,
        )
        self.oauth = OAuthServer(
            clock, policy, extra_token_fields=self._token_extras, scope_allowed=self._scope_allowed
        )
        self.apps: dict[str, _App] = {}
        self.tenants: dict[str, _CompanyFile] = {}
        self.faults: dict[str | None, _Faults] = {}
        self.stats: dict[str, Counter[str]] = {"total": Counter(), "by_path": Counter(), "by_status": Counter()}

    # --- apps and tenants -------------------------------------------------------------------------------

    def app(self, client_id: str) -> _App:
        """The settings of an API key, created with defaults on first use."""
        app = self.apps.get(client_id)
        if app is None:
            uid = str(uuid.UUID(bytes=hashlib.sha256(f"myob-user:{client_id}".encode()).digest()[:16], version=4))
            app = self.apps[client_id] = _App(client_id, uid=uid)
        return app

    def configure_app(self, client_id: str, body: Mapping[str, Any], *, user: bool = False) -> _App:
        """Apply key generation and limit knobs (and with ``user`` the my.MYOB user name) to an API key."""
        app = self.app(client_id)
        if "key_mode" in body:
            mode = body["key_mode"]
            if mode not in KEY_MODES:
                raise ControlError(400, f"key_mode must be one of {list(KEY_MODES)}")
            app.key_mode = mode
        if user and "username" in body:
            if not isinstance(body["username"], str) or not body["username"]:
                raise ControlError(400, "username must be a non-empty string")
            app.username = body["username"]
        if "requests_per_second" in body:
            app.requests_per_second = optional_int_field(body, "requests_per_second", 8)
        if "second_window_seconds" in body:
            app.second_window_seconds = number_field(body, "second_window_seconds", 1.0, 0.001)
        if "daily_limit" in body:
            app.daily_limit = optional_int_field(body, "daily_limit", 1_000_000)
        if "day_window_seconds" in body:
            app.day_window_seconds = number_field(body, "day_window_seconds", 86400.0, 0.001)
        if "per_second_status" in body:
            app.per_second_status = _status_field(body, "per_second_status", 403, (403, 429))
        return app

    def add_tenant(self, spec: Mapping[str, Any]) -> _CompanyFile:
        """Validate a tenant spec, generate the company file and install it (replacing one with the same id)."""
        tenant = self.build_tenant(spec)
        self.install_tenant(tenant, spec)
        return tenant

    def build_tenant(self, spec: Mapping[str, Any]) -> _CompanyFile:
        """Generate a company file from a control-API spec (no state change)."""
        unknown = set(spec) - _TENANT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown tenant fields: {sorted(unknown)}")
        client_id = spec.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ControlError(400, "client_id must be a non-empty string")
        seed = optional_int_field(spec, "seed", 0, minimum=None)
        invoices = optional_int_field(spec, "invoices", 100)
        customers = optional_int_field(spec, "customers", spec.get("contacts", max(1, min(invoices // 5, 2000))), 1)
        days = number_field(spec, "days", 30.0, 0.0001)
        knobs = _TenantKnobs(
            cftoken_required=bool_field(spec, "cftoken_required", True),
            username=str(spec.get("username", "Administrator")),
            password=str(spec.get("password", "")),
            generic_invoice_lines=bool_field(spec, "generic_invoice_lines", False),
            default_top=optional_int_field(spec, "default_top", 400, 1),
            max_top=optional_int_field(spec, "max_top", 1000, 1),
            utc_offset_minutes=optional_int_field(spec, "utc_offset_minutes", 0, minimum=-14 * 60),
            unknown_path_status=_status_field(spec, "unknown_path_status", 401, (401, 404)),
        )
        raw_id = spec.get("id")
        if raw_id is None:
            digest = hashlib.sha256(f"myob-cf:{client_id}:{seed}".encode()).digest()[:16]
            business_id = str(uuid.UUID(bytes=digest, version=4))
        elif isinstance(raw_id, str) and re.fullmatch(r"[A-Za-z0-9-]{1,64}", raw_id):
            business_id = raw_id.lower()
        else:
            raise ControlError(400, "id must be a GUID-like string of letters, digits and dashes")
        name = spec.get("name") or f"Sandbox Company {seed}"
        if not isinstance(name, str):
            raise ControlError(400, "name must be a string")
        return _CompanyFile(
            business_id,
            name,
            client_id,
            seed=seed,
            invoices=invoices,
            customers=customers,
            days=days,
            now=self.clock(),
            knobs=knobs,
        )

    def install_tenant(self, tenant: _CompanyFile, spec: Mapping[str, Any]) -> None:
        """Make a generated company file live and apply the app-level knobs of its spec."""
        previous = self.tenants.get(tenant.id)
        if previous is not None and tenant.id in self.app(previous.client_id).tenants:
            self.app(previous.client_id).tenants.remove(tenant.id)
        self.tenants[tenant.id] = tenant
        app = self.configure_app(tenant.client_id, spec)
        app.tenants.append(tenant.id)

    def tenant_summary(self, tenant: _CompanyFile, origin: str | None = None) -> dict[str, Any]:
        """What the control API says about a company file."""
        out = {
            "id": tenant.id,
            "name": tenant.name,
            "client_id": tenant.client_id,
            "seed": tenant.seed,
            "counts": tenant.counts(),
            "knobs": {**tenant.knobs.__dict__},
            "key_mode": self.app(tenant.client_id).key_mode,
        }
        if origin is not None:
            out["cf_uri"] = f"{origin}{API_PREFIX}/accountright/{tenant.id}"
        return out

    # --- OAuth hooks ------------------------------------------------------------------------------------

    def _scope_allowed(self, client_id: str, scope: str) -> bool:
        scopes = set(scope.split())
        if self.app(client_id).key_mode == "new":
            return LEGACY_SCOPE not in scopes and bool(scopes) and scopes <= SME_SCOPES
        return bool(scopes) and scopes <= SME_SCOPES | {LEGACY_SCOPE, "la.global"}

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> Mapping[str, Any]:
        user = grant.subject.get("user")
        if not isinstance(user, dict):
            app = self.app(grant.client_id)
            user = {"uid": app.uid, "username": app.username}
        return {"user": user}

    def subject_for(self, params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The company file an authorisation reaches, and the extras MYOB adds to the redirect."""
        client_id = params.get("client_id", "")
        if client_id not in self.oauth.clients:
            return {}, {}
        app = self.app(client_id)
        subject: dict[str, Any] = {"key_mode": app.key_mode, "user": {"uid": app.uid, "username": app.username}}
        tenant = self._chosen_tenant(app, params.get("sandbox_tenant"))
        if tenant is None:
            if app.key_mode == "new":
                raise OAuthError("access_denied", "the user has no company file to consent to", 400)
            return subject, {}
        subject["business_id"] = tenant.id
        subject["business_name"] = tenant.name
        extras: dict[str, str] = {}
        if app.key_mode == "new" and params.get("prompt") == "consent":
            extras = {"businessId": tenant.id, "businessName": tenant.name}
        return subject, extras

    def _chosen_tenant(self, app: _App, wanted: str | None) -> _CompanyFile | None:
        if wanted:
            tenant = self.tenants.get(wanted.lower())
            if tenant is None or tenant.client_id != app.client_id:
                raise OAuthError("invalid_request", f"sandbox_tenant {wanted!r} is not a file of this app", 400)
            return tenant
        return self.tenants[app.tenants[-1]] if app.tenants else None

    # --- routes -----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Secure (OAuth), API and ``/_sandbox/myob`` control routes."""
        authorize = self.oauth.authorize_endpoint(self.subject_for)
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        c = CONTROL_PREFIX
        return [
            Route(f"{SECURE_PREFIX}/oauth2/account/authorize", self._counted(authorize, "GET"), methods=["GET"]),
            Route(f"{SECURE_PREFIX}/oauth2/account/authorize/", self._counted(authorize, "GET"), methods=["GET"]),
            Route(
                f"{SECURE_PREFIX}/oauth2/v1/authorize",
                self._counted(self.oauth.token_endpoint, "POST"),
                methods=["POST"],
            ),
            Route(f"{API_PREFIX}/{{path:path}}", self._api, methods=methods),
            *self.oauth.control_routes(c),
            Route(f"{c}/clients", self._control_clients, methods=["POST"]),
            Route(f"{c}/grants", self._control_grants, methods=["POST"]),
            Route(f"{c}/settings", self._control_settings, methods=["GET", "POST"]),
            Route(f"{c}/tenants", self._control_tenants, methods=["GET", "POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/records", self._control_add_record, methods=["POST"]),
            Route(f"{c}/tenants/{{tenant_id}}/records/{{record_id}}", self._control_update_record, methods=["PATCH"]),
            Route(f"{c}/tenants/{{tenant_id}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{c}/faults", self._control_faults, methods=["GET", "POST", "DELETE"]),
            Route(f"{c}/stats", self._control_stats, methods=["GET"]),
        ]

    def _counted(self, handler: Callable[[Request], Any], method: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            response = await handler(request)
            path = request.url.path[len("/myob") :].rstrip("/")
            self._count(f"{method} {path}", response.status_code)
            return response

        return endpoint

    def _count(self, pattern: str, status: int) -> None:
        self.stats["total"]["requests"] += 1
        self.stats["by_path"][pattern] += 1
        self.stats["by_status"][str(status)] += 1

    # --- the API ----------------------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        segments = [s for s in request.path_params["path"].split("/") if s]
        pattern = _path_pattern(segments)
        headers = {"x-myobapi-requestid": request_id}
        try:
            response = await self._serve(request, segments, headers)
        except MyobError as err:
            response = Response(
                err.body(), status_code=err.status, headers={"content-type": _JSON, **headers, **err.headers}
            )
        self._count(f"{request.method} {pattern}", response.status_code)
        return response

    async def _serve(self, request: Request, segments: list[str], headers: dict[str, str]) -> Response:
        key = request.headers.get("x-myobapi-key", "")
        if not key or key not in self.oauth.clients:
            raise MyobError(403, "DeveloperInactive", "API key is missing or inactive", details="Header: x-myobapi-key")
        app = self.app(key)
        tenant_key = segments[1].lower() if len(segments) > 1 and segments[0].lower() == "accountright" else None
        await self._apply_faults(app, tenant_key)
        refused = app.take()
        if refused == "day":
            raise _daily_limit()
        if refused == "second":
            raise _second_limit(app)
        if request.headers.get("x-myobapi-version", "").lower() != "v2":
            raise MyobError(
                400,
                "IncorrectVersion",
                "The x-myobapi-version header must be 'v2'",
                details="Header: x-myobapi-version",
            )
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied:
            raise _token_invalid() from None
        if grant.client_id != key:
            raise _token_invalid()
        if not segments or segments[0].lower() != "accountright":
            raise MyobError(404, "NotFound", "The requested resource was not found")
        scopes = set(grant.scope.split())
        if len(segments) == 1:
            return self._company_files(request, app, scopes, headers)
        tenant = self.tenants.get(segments[1].lower())
        if tenant is None or not self._reaches(grant, tenant):
            raise MyobError(403, "Forbidden", "Access to this company file has not been granted", details="businessId")
        rest = [s.lower() for s in segments[2:]]
        if not rest:
            _require_scope(scopes, "sme-company-file")
            if request.method != "GET":
                raise _method_not_allowed(request.method, "GET")
            return _json_ok(request, self._company_file_entry(tenant, _origin(request)), headers)
        self._check_cftoken(request, tenant)
        if rest[:2] == ["sale", "invoice"]:
            _require_scope(scopes, "sme-sales")
            return self._invoices(request, tenant, segments[4] if len(rest) > 2 else None, rest[3:], headers)
        if rest[:2] == ["contact", "customer"]:
            _require_scope(scopes, "sme-contacts-customer")
            return self._customers(request, tenant, rest[2:], headers)
        raise self._unknown_path(tenant)

    async def _apply_faults(self, app: _App, tenant_key: str | None) -> None:
        active = [f for f in (self.faults.get(tenant_key) if tenant_key else None, self.faults.get(None)) if f]
        latency = max((f.latency_ms for f in active), default=0.0)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        for faults in active:
            if faults.day_limit_exhausted:
                raise _daily_limit()
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                raise _second_limit(app)
            if faults.server_errors > 0:
                faults.server_errors -= 1
                status = faults.server_error_status
                name = "InternalServerError" if status == 500 else "ServiceUnavailable"
                raise MyobError(status, name, "An error has occurred on the server; please try again later")
            if faults.gateway_timeouts > 0:
                faults.gateway_timeouts -= 1
                raise MyobError(
                    504,
                    "GatewayTimeout",
                    "Connection to the API has timed out",
                    details="Maximum call time is 120 seconds",
                )

    def _reaches(self, grant: Grant, tenant: _CompanyFile) -> bool:
        if tenant.client_id != grant.client_id:
            return False
        if grant.subject.get("key_mode", self.app(grant.client_id).key_mode) == "legacy":
            return True
        return grant.subject.get("business_id") == tenant.id

    @staticmethod
    def _check_cftoken(request: Request, tenant: _CompanyFile) -> None:
        if not tenant.knobs.cftoken_required:
            return
        header = request.headers.get("x-myobapi-cftoken")
        try:
            decoded = base64.b64decode(header or "", validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = None
        if decoded != f"{tenant.knobs.username}:{tenant.knobs.password}":
            raise MyobError(401, "AccessDenied", "Access denied", details="Header: x-myobapi-cftoken")

    @staticmethod
    def _unknown_path(tenant: _CompanyFile) -> MyobError:
        if tenant.knobs.unknown_path_status == 404:
            return MyobError(404, "NotFound", "The requested resource was not found")
        return _token_invalid()

    def _company_file_entry(self, tenant: _CompanyFile, origin: str) -> dict[str, Any]:
        return {
            "Id": tenant.id,
            "Name": tenant.name,
            "LibraryPath": tenant.name,
            "ProductVersion": "2025.2",
            "ProductLevel": {"Code": 30, "Name": "Plus"},
            "CheckedOutDate": None,
            "CheckedOutBy": None,
            "Uri": f"{origin}{API_PREFIX}/accountright/{tenant.id}",
            "Country": "AU",
            "LauncherId": tenant.launcher_id,
            "SerialNumber": tenant.serial,
            "UIAccessFlags": 2,
        }

    def _company_files(self, request: Request, app: _App, scopes: set[str], headers: dict[str, str]) -> Response:
        if request.method != "GET":
            raise _method_not_allowed(request.method, "GET")
        if LEGACY_SCOPE not in scopes:
            _require_scope(scopes, "sme-company-file")
        files: list[dict[str, Any]] = []
        if app.key_mode == "legacy":
            origin = _origin(request)
            files = [self._company_file_entry(self.tenants[t], origin) for t in app.tenants if t in self.tenants]
        return _json_ok(request, files, headers)

    # --- invoices and customers -------------------------------------------------------------------------

    def _invoices(
        self,
        request: Request,
        tenant: _CompanyFile,
        layout_segment: str | None,
        rest: list[str],
        headers: dict[str, str],
    ) -> Response:
        method = request.method
        if layout_segment is None:
            if method != "GET":
                raise _method_not_allowed(method, "GET")
            rows = list(tenant.invoices.values())
            drop = frozenset() if tenant.knobs.generic_invoice_lines else _GENERIC_DROP
            return self._collection(request, tenant, rows, _invoice_getter(tenant), lambda r: _view(r, drop), headers)
        layout = _LAYOUT_BY_LOWER.get(layout_segment.lower())
        if layout is None or len(rest) > 1:
            raise self._unknown_path(tenant)
        if not rest:
            if method != "GET":
                raise _not_emulated(method)
            rows = [row for row in tenant.invoices.values() if row.layout == layout]
            drop = _TYPED_DROP[layout]
            return self._collection(request, tenant, rows, _invoice_getter(tenant), lambda r: _view(r, drop), headers)
        row = tenant.invoices.get(rest[0])
        if row is None or row.layout != layout:
            raise _not_found(f"{layout} invoice")
        if method == "GET":
            return _json_ok(request, _view(row, _TYPED_DROP[layout]), headers)
        if method == "DELETE":
            del tenant.invoices[row.uid]
            tenant.deleted_invoice_ids.append(row.uid)
            return Response(b"", status_code=200, headers=headers)
        raise _not_emulated(method)

    def _customers(self, request: Request, tenant: _CompanyFile, rest: list[str], headers: dict[str, str]) -> Response:
        if len(rest) > 1:
            raise self._unknown_path(tenant)
        if request.method != "GET":
            raise _not_emulated(request.method)
        if not rest:
            rows = list(tenant.customers.values())
            return self._collection(request, tenant, rows, _customer_getter(tenant), lambda r: r.rec, headers)
        row = tenant.customers.get(rest[0])
        if row is None:
            raise _not_found("customer")
        return _json_ok(request, row.rec, headers)

    def _collection(
        self,
        request: Request,
        tenant: _CompanyFile,
        rows: list[_Row],
        resolve: Callable[[str], Getter],
        render: Callable[[_Row], dict[str, Any]],
        headers: dict[str, str],
    ) -> Response:
        params = request.query_params
        top = _query_int(params.get("$top"), "$top", tenant.knobs.default_top)
        top = min(top, tenant.knobs.max_top)
        skip = _query_int(params.get("$skip"), "$skip", 0)
        text = params.get("$filter")
        if text is not None and text.strip():
            predicate = _FilterParser(text, resolve).parse()
            rows = [row for row in rows if predicate(row)]
        orderby = params.get("$orderby")
        if orderby:
            try:
                for name, descending in reversed(_orderby_keys(orderby)):
                    rows.sort(key=_sort_key(resolve(name)), reverse=descending)
            except TypeError:
                raise _bad_query(f"The $orderby '{orderby}' compares values of different types") from None
        count = len(rows)
        page = rows[skip : skip + top]
        next_link = None
        if skip + top < count and top > 0:
            kept = [(k, v) for k, v in params.multi_items() if k not in ("$top", "$skip")]
            query = _query_string([*kept, ("$top", str(top)), ("$skip", str(skip + top))])
            next_link = f"{_origin(request)}{request.url.path}?{query}"
        payload = {"Items": [render(row) for row in page], "NextPageLink": next_link, "Count": count}
        return _json_ok(request, payload, headers)

    # --- control API ------------------------------------------------------------------------------------

    def _tenant(self, request: Request) -> _CompanyFile:
        tenant = self.tenants.get(request.path_params["tenant_id"].lower())
        if tenant is None:
            raise ControlError(404, f"no company file {request.path_params['tenant_id']!r}")
        return tenant

    @staticmethod
    def _at_us(body: Mapping[str, Any], now: int) -> int:
        value = body.get("updated_at")
        if value is None:
            return now * _US
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ControlError(400, "updated_at must be unix seconds (a number)")
        return round(value * _US)

    @staticmethod
    def _fields(body: Mapping[str, Any]) -> dict[str, Any]:
        fields_ = body.get("fields") or {}
        if not isinstance(fields_, dict):
            raise ControlError(400, "fields must be a JSON object")
        return fields_

    async def _control_clients(self, request: Request) -> Response:
        async def action() -> Response:
            body = await read_json_object(request)
            unknown = set(body) - _CLIENT_FIELDS
            if unknown:
                raise ControlError(400, f"unknown client fields: {sorted(unknown)}")
            client_id, secret = body.get("client_id"), body.get("client_secret")
            if not isinstance(client_id, str) or not client_id or not isinstance(secret, str):
                raise ControlError(400, "client_id and client_secret must be strings")
            uris = body.get("redirect_uris") or ()
            if not isinstance(uris, (list, tuple)) or not all(isinstance(u, str) for u in uris):
                raise ControlError(400, "redirect_uris must be a list of strings")
            app = self.configure_app(client_id, body, user=True)
            self.oauth.register_client(client_id, secret, tuple(uris))
            return json_response(
                200,
                {
                    "client_id": client_id,
                    "redirect_uris": list(uris),
                    "key_mode": app.key_mode,
                    "user": {"uid": app.uid, "username": app.username},
                    **app.limits(),
                },
            )

        return await _control(action)()

    async def _control_grants(self, request: Request) -> Response:
        async def action() -> Response:
            body = await read_json_object(request)
            client_id = body.get("client_id")
            if not isinstance(client_id, str) or client_id not in self.oauth.clients:
                raise ControlError(404, f"unknown client_id {client_id!r}")
            app = self.app(client_id)
            scope = body.get("scope") or (DEFAULT_SCOPES if app.key_mode == "new" else LEGACY_SCOPE)
            if not isinstance(scope, str) or not self._scope_allowed(client_id, scope):
                raise OAuthError("invalid_scope", f"scope {scope!r} is not available to this API key", 400)
            subject, _ = self.subject_for({"client_id": client_id, "sandbox_tenant": body.get("tenant") or ""})
            grant, token = self.oauth.create_grant(client_id, scope, subject)
            return json_response(
                200,
                {
                    "grant_id": grant.id,
                    "token": token,
                    "businessId": subject.get("business_id"),
                    "businessName": subject.get("business_name"),
                },
            )

        return await _control(action)()

    async def _control_settings(self, request: Request) -> Response:
        async def action() -> Response:
            policy = self.oauth.policy
            if request.method == "POST":
                body = await read_json_object(request)
                known = {f.name: f for f in fields(policy)}
                unknown = set(body) - set(known)
                if unknown:
                    raise ControlError(400, f"unknown settings: {sorted(unknown)}")
                for name, value in body.items():
                    current = getattr(policy, name)
                    if name == "client_auth":
                        if not isinstance(value, list) or not set(value) <= {"basic", "body"} or not value:
                            raise ControlError(400, "client_auth must be a non-empty list of 'basic'/'body'")
                        value = frozenset(value)
                    elif isinstance(current, bool):
                        value = bool_field(body, name, current)
                    elif isinstance(current, str):
                        if not isinstance(value, str):
                            raise ControlError(400, f"{name} must be a string")
                    else:
                        value = optional_int_field(body, name, None)
                    setattr(policy, name, value)
            state = {f.name: getattr(policy, f.name) for f in fields(policy)}
            state["client_auth"] = sorted(state["client_auth"])
            return json_response(200, state)

        return await _control(action)()

    async def _control_tenants(self, request: Request) -> Response:
        async def action() -> Response:
            origin = _origin(request)
            if request.method == "GET":
                return json_response(200, [self.tenant_summary(t, origin) for t in self.tenants.values()])
            spec = await read_json_object(request)
            started = time.perf_counter()
            tenant = await run_in_threadpool(self.build_tenant, spec)
            self.install_tenant(tenant, spec)
            summary = self.tenant_summary(tenant, origin)
            summary["generation_seconds"] = round(time.perf_counter() - started, 3)
            return json_response(200, summary)

        return await _control(action)()

    async def _control_changes(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            reject_unknown_fields(body, _CHANGE_FIELDS, "change")
            counts = {name: optional_int_field(body, name, 0) for name in _CHANGE_FIELDS}
            return json_response(200, tenant.apply_changes(counts, self.clock() * _US))

        return await _control(action)()

    async def _control_add_record(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            entity = _entity(body.get("entity"))
            row = tenant.add_record(entity, self._fields(body), self._at_us(body, self.clock()))
            return _control_json(200, row.rec, _origin(request))

        return await _control(action)()

    async def _control_update_record(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            body = await read_json_object(request)
            record_id = request.path_params["record_id"].lower()
            row = tenant.invoices.get(record_id) or tenant.customers.get(record_id)
            if row is None:
                raise ControlError(404, f"no invoice or customer {record_id!r}")
            tenant.override(row, dict(self._fields(body)))
            tenant.touch(row, self._at_us(body, self.clock()))
            return _control_json(200, row.rec, _origin(request))

        return await _control(action)()

    async def _control_export(self, request: Request) -> Response:
        async def action() -> Response:
            tenant = self._tenant(request)
            entity = _entity(request.path_params["entity"])
            if entity == "customer":
                payload = {
                    "records": [row.rec for row in tenant.customers.values()],
                    "deleted_ids": list(tenant.deleted_customer_ids),
                }
            else:
                payload = {
                    "records": [row.rec for row in tenant.invoices.values()],
                    "deleted_ids": list(tenant.deleted_invoice_ids),
                }
            return _control_json(200, payload, _origin(request))

        return await _control(action)()

    async def _control_faults(self, request: Request) -> Response:
        async def action() -> Response:
            if request.method == "DELETE":
                tenant = request.query_params.get("tenant")
                if tenant:
                    self.faults.pop(tenant.lower(), None)
                else:
                    self.faults.clear()
                return json_response(200, self._faults_state())
            if request.method == "GET":
                return json_response(200, self._faults_state())
            body = await read_json_object(request)
            reject_unknown_fields(body, _FAULT_FIELDS, "fault")
            tenant = body.get("tenant")
            if tenant is not None and (not isinstance(tenant, str) or tenant.lower() not in self.tenants):
                raise ControlError(404, f"no company file {tenant!r}")
            faults = self.faults.setdefault(tenant.lower() if tenant else None, _Faults())
            for name in ("server_errors", "rate_limited", "gateway_timeouts"):
                if name in body:
                    setattr(faults, name, optional_int_field(body, name, 0))
            if "server_error_status" in body:
                faults.server_error_status = _status_field(body, "server_error_status", 500, (500, 503))
            if "day_limit_exhausted" in body:
                faults.day_limit_exhausted = bool_field(body, "day_limit_exhausted", False)
            if "latency_ms" in body:
                faults.latency_ms = number_field(body, "latency_ms", 0.0)
            return json_response(200, self._faults_state())

        return await _control(action)()

    def _faults_state(self) -> dict[str, Any]:
        return {(key or "*"): faults.as_dict() for key, faults in self.faults.items()}

    async def _control_stats(self, request: Request) -> Response:
        return json_response(
            200,
            {
                "total": self.stats["total"]["requests"],
                "by_path": dict(self.stats["by_path"]),
                "by_status": dict(self.stats["by_status"]),
                "oauth": dict(self.oauth.stats),
                "faults": self._faults_state(),
                "apps": {cid: {"day_count": a.day_count, "key_mode": a.key_mode} for cid, a in self.apps.items()},
            },
        )


# ---------------------------------------------------------------------------------------------------------
# Request helpers
# ---------------------------------------------------------------------------------------------------------


def _path_pattern(segments: list[str]) -> str:
    if not segments or segments[0].lower() != "accountright":
        return "/api/{unknown}"
    parts = ["/accountright"]
    if len(segments) > 1:
        parts.append("{cf}")
    rest = segments[2:]
    lowered = [s.lower() for s in rest]
    if lowered[:2] == ["sale", "invoice"]:
        parts += ["Sale", "Invoice", *["{layout}", "{uid}"][: len(rest) - 2]]
    elif lowered[:2] == ["contact", "customer"]:
        parts += ["Contact", "Customer", *["{uid}"][: len(rest) - 2]]
    elif rest:
        parts.append("{unknown}")
    return "/".join(parts) if len(parts) > 1 else "/accountright/"


def _require_scope(scopes: set[str], needed: str) -> None:
    if LEGACY_SCOPE not in scopes and needed not in scopes:
        raise _token_invalid()


def _method_not_allowed(method: str, allowed: str) -> MyobError:
    return MyobError(
        405,
        "MethodNotAllowed",
        f"The requested resource does not support http method '{method}'.",
        headers={"allow": allowed},
    )


def _not_emulated(method: str) -> MyobError:
    return MyobError(501, "NotImplemented", f"{method} is not emulated by the sandbox (read-only MYOB emulator)")


def _daily_limit() -> MyobError:
    return MyobError(
        403, "RateLimitError", "API key has exceeded the daily rate limit", details="Header: x-myobapi-key"
    )


def _second_limit(app: _App) -> MyobError:
    return MyobError(
        app.per_second_status,
        "RateLimitError",
        "API key has exceeded the per second rate limit",
        details="Header: x-myobapi-key",
    )


def _query_int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _bad_query(f"The value '{value}' is not valid for {name}") from None
    if number < 0:
        raise _bad_query(f"{name} must not be negative")
    return number


def _entity(value: Any) -> str:
    names = {
        "invoice": "invoice",
        "invoices": "invoice",
        "customer": "customer",
        "customers": "customer",
        "contact": "customer",
        "contacts": "customer",
    }
    entity = names.get(str(value).lower()) if isinstance(value, str) else None
    if entity is None:
        raise ControlError(404, "entity must be 'invoice' or 'customer'")
    return entity


def _view(row: _Row, drop: frozenset[str]) -> dict[str, Any]:
    if not drop:
        return row.rec
    return {k: v for k, v in row.rec.items() if k not in drop}


def _json_ok(request: Request, payload: Any, headers: dict[str, str]) -> Response:
    body = orjson.dumps(payload).replace(_BASE_B, f"{_origin(request)}{API_PREFIX}".encode())
    etag = '"' + hashlib.sha1(body).hexdigest() + '"'
    out = {**headers, "etag": etag}
    if _etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=out)
    out["content-type"] = _JSON
    if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", "").lower():
        body = gzip.compress(body, compresslevel=1)
        out["content-encoding"] = "gzip"
        out["vary"] = "Accept-Encoding"
    return Response(body, status_code=200, headers=out)


_INVOICE_KEYS = frozenset(
    _words(
        "UID Number Date CustomerPurchaseOrderNumber Customer PromisedDate BalanceDueAmount BalanceDueAmountForeign "
        "Status InvoiceType Lines ShipToAddress Terms IsTaxInclusive Subtotal SubtotalForeign Freight FreightForeign "
        "FreightTaxCode TotalTax TotalTaxForeign TotalAmount TotalAmountForeign Category Salesperson Comment "
        "ShippingMethod JournalMemo ReferralSource InvoiceDeliveryStatus LastPaymentDate CanApplySurcharge Order "
        "OnlinePaymentMethod ForeignCurrency CurrencyExchangeRate Created LastModified URI RowVersion"
    )
)
_CUSTOMER_KEYS = frozenset(
    _words(
        "UID CompanyName LastName FirstName IsIndividual DisplayID IsActive Addresses Notes Identifiers CustomList1 "
        "CustomList2 CustomList3 CustomField1 CustomField2 CustomField3 CurrentBalance SellingDetails PaymentDetails "
        "PhotoURI ForeignCurrency Created LastModified URI RowVersion"
    )
)


def _field_getter(tenant: _CompanyFile, keys: frozenset[str], entity: str) -> Callable[[str], Getter]:
    offset = tenant.offset_us

    def resolve(path: str) -> Getter:
        parts = path.split("/")
        head = next((k for k in keys if k.lower() == parts[0].lower()), None)
        if head is None:
            raise _bad_query(f"Could not find a property named '{parts[0]}' on type '{entity}'")
        if len(parts) == 1:
            if head == "LastModified":
                return lambda row: _When(row.lm_us + offset)
            if head == "Created":
                return lambda row: _When(row.created_us + offset)
            if head == "UID":
                return lambda row: row.uid
            if head == "InvoiceType":
                return lambda row: row.layout
            return lambda row: row.rec.get(head)
        tail = parts[1:]

        def nested(row: _Row) -> Any:
            value: Any = row.rec.get(head)
            for part in tail:
                if not isinstance(value, dict):
                    return None
                value = next((v for k, v in value.items() if k.lower() == part.lower()), None)
            return value

        return nested

    return resolve


def _invoice_getter(tenant: _CompanyFile) -> Callable[[str], Getter]:
    return _field_getter(tenant, _INVOICE_KEYS, "MYOB.Sale.Invoice")


def _customer_getter(tenant: _CompanyFile) -> Callable[[str], Getter]:
    return _field_getter(tenant, _CUSTOMER_KEYS, "MYOB.Contact.Customer")


# ---------------------------------------------------------------------------------------------------------
# Typed control client for tests and demos
# ---------------------------------------------------------------------------------------------------------


class MyobControl(ControlClient):
    """Typed calls to the ``/_sandbox/myob`` control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def _post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._call("POST", path, json=dict(body))

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        *,
        redirect_uris: Iterable[str] = (),
        key_mode: str = "new",
        username: str | None = None,
        **limits: Any,
    ) -> dict[str, Any]:
        """Register an app (API key): its secret, redirect URIs, key generation and limit knobs."""
        body: dict[str, Any] = {
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uris": list(redirect_uris),
            "key_mode": key_mode,
            **limits,
        }
        if username is not None:
            body["username"] = username
        return self._post("/clients", body)

    def add_tenant(
        self, client_id: str, *, seed: int = 0, invoices: int = 100, customers: int = 20, days: float = 30, **knobs: Any
    ) -> dict[str, Any]:
        """Generate a company file of ``client_id``; returns ``{id, name, counts, cf_uri, ...}``."""
        body = {"client_id": client_id, "seed": seed, "invoices": invoices, "customers": customers, "days": days}
        return self._post("/tenants", {**body, **knobs})

    def grant(self, client_id: str, tenant: str | None = None, *, scope: str | None = None) -> dict[str, Any]:
        """Consent without the browser: ``{grant_id, token, businessId, businessName}``."""
        body: dict[str, Any] = {"client_id": client_id}
        if tenant is not None:
            body["tenant"] = tenant
        if scope is not None:
            body["scope"] = scope
        return self._post("/grants", body)

    def changes(self, tenant: str, **counts: int) -> dict[str, list[str]]:
        """Apply edits, voids (reversals), deletes, creates, archives... now on the sandbox clock."""
        return self._post(f"/tenants/{tenant}/changes", counts)

    def add_record(
        self, tenant: str, entity: str, fields: Mapping[str, Any] | None = None, *, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Create an invoice or customer stamped ``updated_at`` (default now); returns it in full."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._post(f"/tenants/{tenant}/records", body)

    def update_record(
        self, tenant: str, record_id: str, fields: Mapping[str, Any] | None = None, *, updated_at: float | None = None
    ) -> dict[str, Any]:
        """Change a record's fields and stamp it ``updated_at`` (default now); returns it in full."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("PATCH", f"/tenants/{tenant}/records/{record_id}", json=body)

    def export(self, tenant: str, entity: str) -> dict[str, Any]:
        """Every current record (full shape, with ``Lines`` and ``InvoiceType``) and the hard-deleted ids."""
        return self._call("GET", f"/tenants/{tenant}/export/{entity}")

    def set_faults(self, tenant: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject faults (``server_errors``, ``rate_limited``, ``gateway_timeouts``, ``day_limit_exhausted``...)."""
        return self._set_faults("tenant", tenant, faults)

    def clear_faults(self, tenant: str | None = None) -> dict[str, Any]:
        """Remove injected faults (all, or one company file's)."""
        params = {"tenant": tenant} if tenant is not None else None
        return self._call("DELETE", "/faults", params=params)

    def stats(self) -> dict[str, Any]:
        """Request counts (total, per path pattern, per status) and token-endpoint counts."""
        return self._call("GET", "/stats")

    def settings(self, **policy: Any) -> dict[str, Any]:
        """Read or change the OAuth knobs (``access_ttl``, ``rotate``, ``grace``, ``expires_in_as_string``...)."""
        if not policy:
            return self._call("GET", "/settings")
        return self._post("/settings", policy)

    def revoke(self, grant_id: str) -> dict[str, Any]:
        """The user disconnected the app: every token of the grant stops working."""
        return self._post(f"/oauth/grants/{grant_id}/revoke", {})

    def expire_access(self, grant_id: str) -> dict[str, Any]:
        """Make the grant's access tokens expire now."""
        return self._post(f"/oauth/grants/{grant_id}/expire-access", {})
