"""Local emulator of QuickBooks Online (Intuit Accounting API v3): OAuth, query, read-one and CDC.

The demo and the tests point the real QuickBooks client code at this module instead of Intuit, so it
reproduces what that code relies on: Intuit's OAuth 2.0 flow (Basic client authentication only, one
realm per authorisation, ``realmId`` on the redirect, refresh tokens that rotate about once a day and
keep working for 24 hours after being superseded, ``x_refresh_token_expires_in``), the SQL-like query
endpoint (``SELECT * | COUNT(*) FROM Invoice|Customer``, ``MetaData.LastUpdatedTime`` windows,
``Active IN (true, false)``, ``ORDERBY``, 1-based ``STARTPOSITION``, ``MAXRESULTS`` capped at 1000, active
customers only by default, ``"QueryResponse": {}`` when nothing matches), read-one by ``Id``, Change Data
Capture with its 30-day look-back and 1,000-object cap and ``status: "Deleted"`` stubs for hard-deleted
invoices, JSON or XML by ``Accept``, the ``Fault`` error envelope (lower-case ``fault`` for 401/403), and
the throttles (500 requests a minute, 10 a second, 10 at once per realm → 429 with fault 3001 and no
``Retry-After``).

Intuit's hosts are mapped to path prefixes of the sandbox server: ``/quickbooks/appcenter`` (authorize),
``/quickbooks/oauth`` (token), ``/quickbooks/developer`` (revoke) and ``/quickbooks/api`` (both the
production and the sandbox API host). Companies (realms) are generated deterministically from a seed;
the control API under ``/_sandbox/quickbooks`` creates them, applies edits, voids, hard deletes, merges and
deactivations on the sandbox clock, injects faults and reports statistics.

Webhooks: ``POST /_sandbox/quickbooks/webhooks`` subscribes a receiver URL to an app's realms (``app``, as
Intuit configures one endpoint per app) or to one ``realm``, with the app's ``verifier_token`` and a payload
``format``, ``legacy`` (``eventNotifications``, the default) or ``cloudevents`` (a JSON array). Every
change to the data notifies the subscriptions, the changes of one call in one delivery, ids only, signed
with ``intuit-signature`` and retried on ``WEBHOOK_RETRY_DELAYS`` (see ``sandbox.webhooks`` for
duplicates, holding and reordering).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import math
import random
import re
import secrets
import threading
import time
import uuid
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape, quoteattr

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    clear_scoped_faults,
    control_endpoint,
    int_field,
    lookup,
    number_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.oauth import (
    AccessDenied,
    Grant,
    OAuthError,
    OAuthPolicy,
    OAuthServer,
    json_response,
    request_headers,
)
from nextcrm_sandbox.webhooks import Signer, WebhookControl, WebhookOutbox, webhook_control_routes

__all__ = [
    "ACCESS_TTL",
    "CDC_MAX_DAYS",
    "CDC_MAX_OBJECTS",
    "CLOUDEVENTS_PER_DELIVERY",
    "MAX_RESULTS_CAP",
    "MIN_MINOR_VERSION",
    "REFRESH_HARD_TTL",
    "REFRESH_TTL",
    "WEBHOOK_FORMATS",
    "WEBHOOK_RETRY_DELAYS",
    "DataChange",
    "QueryError",
    "QuickBooksCompany",
    "QuickBooksControl",
    "QuickBooksSandbox",
    "parse_query",
    "to_xml",
]

PREFIX = "/quickbooks"
API_PREFIX = f"{PREFIX}/api"
CONTROL_PREFIX = "/_sandbox/quickbooks"
AUTHORIZE_PATH = f"{PREFIX}/appcenter/connect/oauth2"
TOKEN_PATH = f"{PREFIX}/oauth/oauth2/v1/tokens/bearer"
REVOKE_PATH = f"{PREFIX}/developer/v2/oauth2/tokens/revoke"

ACCESS_TTL = 3600
REFRESH_TTL = 8_726_400  # what Intuit reports as x_refresh_token_expires_in; enforced as the idle lifetime
REFRESH_ROTATE_AFTER = 86_400
REFRESH_GRACE = 86_400
REFRESH_HARD_TTL = 5 * 365 * 86_400
MIN_MINOR_VERSION = 75
MAX_RESULTS_CAP = 1000
DEFAULT_MAX_RESULTS = 100
CDC_MAX_DAYS = 30
CDC_MAX_OBJECTS = 1000
SCOPE_ACCOUNTING = "com.intuit.quickbooks.accounting"

# Intuit documents no retry schedule for webhooks (``docs/providers/quickbooks.md``, Webhooks): the emulator retries a
# refused or failed delivery six times, after 30 s, 2 min, 10 min, 30 min, 2 h and 6 h (about 9 h in all).
WEBHOOK_RETRY_DELAYS = (30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)
WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_FORMATS = ("legacy", "cloudevents")
CLOUDEVENTS_PER_DELIVERY = 100
_CLOUDEVENT_VERBS = {
    "Create": "created", "Update": "updated", "Delete": "deleted", "Merge": "merged", "Void": "voided",
    "Emailed": "emailed",
}  # fmt: skip
_SUBSCRIBE_FIELDS = frozenset({"url", "duplicate_rate", "hold", "retry_delays", "app", "realm", "verifier_token",
                               "format"})  # fmt: skip

_DAY = 86_400
_JSON_CT = "application/json;charset=UTF-8"
_XML_CT = "application/xml;charset=UTF-8"
_XMLNS = "http://schema.intuit.com/finance/v3"

# Entities the emulator serves; other real QuickBooks entities answer as an empty company.
_SERVED = ("Invoice", "Customer", "CompanyInfo")
_KNOWN_EMPTY_TEXT = (
    "Account Bill BillPayment Budget Class CreditMemo Department Deposit Employee Estimate Item "
    "JournalEntry Payment PaymentMethod Preferences Purchase PurchaseOrder RefundReceipt SalesReceipt "
    "TaxCode TaxRate Term TimeActivity Transfer Vendor VendorCredit"
)
_KNOWN_EMPTY = tuple(_KNOWN_EMPTY_TEXT.split())
_ENTITY_NAMES = {name.lower(): name for name in (*_SERVED, *_KNOWN_EMPTY)}


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class QueryError(Exception):
    """A QuickBooks ``Fault`` answer: ``{"Fault": {"Error": [{Message, Detail, code, element}], "type"}}``."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: str,
        *,
        status: int = 400,
        fault_type: str = "ValidationFault",
        element: str = "",
    ) -> None:
        super().__init__(f"{code} {message}: {detail}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status
        self.fault_type = fault_type
        self.element = element

    def fault(self) -> dict[str, Any]:
        """The ``Fault`` object of the response body."""
        err = {"Message": self.message, "Detail": self.detail, "code": self.code}
        if self.element:
            err["element"] = self.element
        return {"Error": [err], "type": self.fault_type}


def _parser_error(detail: str) -> QueryError:
    return QueryError("4000", "Error parsing query", f"QueryParserError: {detail}")


def _validation_error(detail: str) -> QueryError:
    return QueryError("4001", "Invalid query", f"QueryValidationError: {detail}")


def _not_found() -> QueryError:
    return QueryError(
        "610",
        "Object Not Found",
        "Object Not Found : Something you're trying to use has been made inactive. Check the fields with "
        "accounts, customers, items, vendors or employees.",
    )


def _throttled() -> QueryError:
    return QueryError(
        "3001",
        "message=ThrottleExceeded; errorCode=003001; statusCode=429",
        "The request limit was reached.  Try again later",
        status=429,
        fault_type="SERVICE",
    )


def _system_fault(status: int) -> QueryError:
    return QueryError(
        "10000",
        "An application error has occurred while processing your request",
        "System Failure Error: An unexpected error occurred while accessing or saving your data. Please wait a "
        "few minutes and try again. If the problem persists, contact customer support.",
        status=status,
        fault_type="SystemFault",
    )


def _unsupported_operation(path: str, full: str) -> QueryError:
    return QueryError(
        "500",
        "Unsupported Operation",
        f"Operation Could not find resource for relative : {path} of full path: {full} is not supported.",
    )


# ---------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------

_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def _parse_offset(value: str) -> dt.timezone:
    m = _OFFSET_RE.match(value)
    if not m or int(m.group(2)) > 14 or int(m.group(3)) >= 60:
        raise ValueError("utc_offset must look like -07:00 or +10:00")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return dt.timezone(dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes))


def _offset_text(tz: dt.timezone) -> str:
    total = int(tz.utcoffset(None).total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    return f"{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


def _parse_when(text: str, tz: dt.timezone) -> float:
    """An ISO date or date-time from a query or ``changedSince`` as unix seconds (no offset → the company's)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed.timestamp()


# ---------------------------------------------------------------------------------------------------------
# Query language
# ---------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),*])
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset(
    {"select", "from", "where", "and", "or", "in", "like", "order", "orderby", "by", "asc", "desc", "count"}
    | {"startposition", "maxresults", "true", "false"}
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # ident, keyword, string, number, op, punct, eof
    text: str
    col: int


def _tokenize(sql: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(sql):
        m = _TOKEN_RE.match(sql, pos)
        if m is None:
            raise _parser_error(f'Lexical error at line 1, column {pos + 1}.  Encountered: "{sql[pos]}"')
        kind = m.lastgroup or ""
        text = m.group()
        if kind != "ws":
            if kind == "ident" and text.lower() in _KEYWORDS:
                kind = "keyword"
            out.append(_Tok(kind, text, pos + 1))
        pos = m.end()
    out.append(_Tok("eof", "", len(sql) + 1))
    return out


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``WHERE`` term: ``field op value`` (``values`` holds the list of an ``IN``)."""

    field: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed QuickBooks query."""

    entity: str
    count: bool
    fields: tuple[str, ...] | None
    where: tuple[Condition, ...]
    order: tuple[tuple[str, bool], ...]  # (field, descending)
    start: int
    max_results: int


class _Parser:
    def __init__(self, sql: str) -> None:
        self.toks = _tokenize(sql)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, expected: Iterable[str]) -> QueryError:
        tok = self.peek()
        if tok.kind == "eof":
            found = '"<EOF>"'
        else:
            kind = {"ident": "IDENTIFIER", "string": "STRING", "number": "INTEGER"}.get(tok.kind)
            found = f'" <{kind}> "{tok.text} ""' if kind else f'" "{tok.text}" "{tok.text} ""'
        wanted = "\n".join(f"    {e} ..." for e in expected)
        return _parser_error(f"Encountered {found} at line 1, column {tok.col}.\nWas expecting one of:\n{wanted}\n")

    def keyword(self, *words: str) -> str | None:
        tok = self.peek()
        if tok.kind == "keyword" and tok.text.lower() in words:
            self.i += 1
            return tok.text.lower()
        return None

    def expect_keyword(self, word: str) -> None:
        if self.keyword(word) is None:
            raise self.fail([f'"{word}"'])

    def expect_punct(self, char: str) -> None:
        tok = self.peek()
        if tok.kind != "punct" or tok.text != char:
            raise self.fail([f'"{char}"'])
        self.i += 1

    def ident(self) -> str:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.fail(["<IDENTIFIER>"])
        self.i += 1
        return tok.text

    def integer(self) -> int:
        tok = self.peek()
        if tok.kind != "number" or not tok.text.lstrip("-").isdigit():
            raise self.fail(["<INTEGER>"])
        self.i += 1
        return int(tok.text)

    def value(self) -> Any:
        tok = self.next()
        if tok.kind == "string":
            return re.sub(r"\\(.)", r"\1", tok.text[1:-1])
        if tok.kind == "number":
            return tok.text
        if tok.kind == "keyword" and tok.text.lower() in ("true", "false"):
            return tok.text.lower() == "true"
        self.i -= 1
        raise self.fail(["<STRING>", "<INTEGER>", '"true"', '"false"'])

    def parse(self) -> Query:
        if self.peek().kind == "eof":
            raise _parser_error('Encountered "<EOF>" at line 0, column 0.\nWas expecting:\n    "select" ...\n')
        self.expect_keyword("select")
        count = False
        fields: tuple[str, ...] | None = None
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "*":
            self.i += 1
        elif self.keyword("count"):
            self.expect_punct("(")
            self.expect_punct("*")
            self.expect_punct(")")
            count = True
        else:
            names = [self.ident()]
            while self.peek().kind == "punct" and self.peek().text == ",":
                self.i += 1
                names.append(self.ident())
            fields = tuple(names)
        self.expect_keyword("from")
        entity = self.ident()
        where: list[Condition] = []
        if self.keyword("where"):
            where.append(self.condition())
            while self.keyword("and"):
                where.append(self.condition())
        order: list[tuple[str, bool]] = []
        kw = self.keyword("order", "orderby")
        if kw:
            if kw == "order":
                self.expect_keyword("by")
            while True:
                name = self.ident()
                direction = self.keyword("asc", "desc")
                order.append((name, direction == "desc"))
                if self.peek().kind == "punct" and self.peek().text == ",":
                    self.i += 1
                    continue
                break
        start: int | None = None
        max_results: int | None = None
        while True:
            kw = self.keyword("startposition", "maxresults")
            if kw is None:
                break
            if kw == "startposition" and start is None:
                start = self.integer()
            elif kw == "maxresults" and max_results is None:
                max_results = self.integer()
            else:
                self.i -= 1
                raise self.fail(["<EOF>"])
        if self.peek().kind != "eof":
            raise self.fail(['"and"', '"orderby"', '"startposition"', '"maxresults"', "<EOF>"])
        if max_results is not None and max_results < 1:
            raise _validation_error(f"MAXRESULTS must be greater than 0, supplied value: {max_results}")
        return Query(
            entity=entity,
            count=count,
            fields=fields,
            where=tuple(where),
            order=tuple(order),
            start=max(1, start or 1),
            max_results=DEFAULT_MAX_RESULTS if max_results is None else max_results,
        )

    def condition(self) -> Condition:
        name = self.ident()
        if self.keyword("in"):
            self.expect_punct("(")
            values = [self.value()]
            while self.peek().kind == "punct" and self.peek().text == ",":
                self.i += 1
                values.append(self.value())
            self.expect_punct(")")
            return Condition(name, "in", tuple(values))
        if self.keyword("like"):
            return Condition(name, "like", (self.value(),))
        tok = self.peek()
        if tok.kind != "op":
            raise self.fail(['"="', '"<"', '">"', '"<="', '">="', '"in"', '"like"'])
        self.i += 1
        op = "!=" if tok.text == "<>" else tok.text
        return Condition(name, op, (self.value(),))


def parse_query(sql: str) -> Query:
    """Parse QuickBooks' query language; raises ``QueryError`` (4000 parser / 4001 validation) on bad input."""
    return _Parser(sql).parse()


# ---------------------------------------------------------------------------------------------------------
# Generated data
# ---------------------------------------------------------------------------------------------------------

_CURRENCY_NAMES = {
    "USD": "United States Dollar",
    "EUR": "Euro",
    "GBP": "British Pound Sterling",
    "CAD": "Canadian Dollar",
    "AUD": "Australian Dollar",
}
# Units of the foreign currency per home-currency unit are not modelled; ExchangeRate is home per foreign.
_RATES_E4 = {"USD": 10000, "EUR": 10842, "GBP": 12671, "CAD": 7312, "AUD": 6589}
_ITEMS = (
    ("1", "Services", 7500),
    ("3", "Concrete", 1500),
    ("4", "Design", 7500),
    ("5", "Rock Fountain", 27500),
    ("6", "Gardening", 3500),
    ("8", "Installation", 5000),
    ("9", "Lighting", 1850),
    ("10", "Maintenance & Repair", 6000),
    ("11", "Pest Control", 3500),
    ("13", "Pump", 1575),
    ("15", "Sprinkler Heads", 200),
    ("16", "Sprinkler Pipes", 400),
    ("19", "Hours", 2500),
)
_TERMS = (("1", 15), ("2", 30), ("3", 30), ("3", 30), ("4", 60), ("5", 0))
_GIVEN_TEXT = "Amy Bill Cathy Dylan Grace Jeff John Kate Mark Paulsen Rondonuwu Sonnenschein"
_GIVEN = tuple(_GIVEN_TEXT.split())
_FAMILY = ("Lauterbach", "Lucchini", "Chin", "Rosa", "Pariente", "Chin", "Melton", "Whelan", "Cho", "Medina", "Lee")
_WORDS_TEXT = (
    "Bird Sanctuary Cool Cars Dukes Basketball Camp Freeman Sporting Goods Geeta Kalapatapu Jeff's "
    "Jalopies Red Rock Diner Rago Travel Agency Sushi Shara Barnett Pye's Cakes Video Games Wedding "
    "Planning Weiskopf Consulting Travis Waldron Mack Plumbing"
)
_WORDS = tuple(_WORDS_TEXT.split())
_CITIES = (
    ("Bayshore", "CA", "94326"),
    ("Half Moon Bay", "CA", "94213"),
    ("Middlefield", "CA", "94303"),
    ("Sunnyvale", "CA", "94086"),
    ("Palo Alto", "CA", "94303"),
    ("Tucson", "AZ", "85719"),
    ("Monlo Park", "CA", "94304"),
)
_STREETS = ("Finch St.", "Cypress Rd.", "Maple Ave.", "Oak Dr.", "Main St.", "Hill Ct.", "Lakeside Blvd.")
_MEMOS = (
    "Thank you for your business and have a great day!",
    "Payment due on receipt. Thanks!",
    "Please include the invoice number with your payment.",
)


_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class _Rng(random.Random):
    """``random.Random`` with cheaper picks (generation draws a few hundred thousand of them)."""

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def between(self, start: int, stop: int | None = None) -> int:
        """An int in ``[start, stop)`` (or ``[0, start)``), like ``randrange``."""
        if stop is None:
            start, stop = 0, start
        return start + int(self.random() * (stop - start))


def _money(cents: int) -> float:
    return cents / 100


def _cents(value: Any) -> int:
    return round(float(value or 0) * 100)


def _home_cents(cents: int, rate_e4: int) -> int:
    return (cents * rate_e4 + 5000) // 10000


@dataclass(frozen=True)
class DataChange:
    """One change to a company's data, as a webhook reports it: entity, operation, id, time (unix seconds)."""

    entity: str
    operation: str  # Create, Update, Delete, Merge, Void or Emailed
    id: str
    at: float
    deleted_id: str | None = None  # a Merge's merged-away record


class QuickBooksCompany:
    """One QuickBooks company (realm): customers and invoices in API shape, hard-delete log, times, knobs.

    Every change made after generation is reported to ``on_change`` (the emulator's webhooks), one list
    per call that made it, as QuickBooks reports the changes of one aggregation window together.
    """

    def __init__(self, spec: Mapping[str, Any], *, now: int) -> None:
        self.spec = dict(spec)
        self.realm_id: str = spec["id"]
        self.name: str = spec["name"]
        self.client_id: str = spec["client_id"]
        self.environment: str = spec["environment"]
        self.seed: int = spec["seed"]
        self.tz = _parse_offset(spec["utc_offset"])
        self.offset = _offset_text(self.tz)
        self._shift = int(self.tz.utcoffset(None).total_seconds())
        self._dates: dict[int, str] = {}
        self.home_currency: str = spec["home_currency"]
        self.created_at = now
        # Id -> API record; times kept apart as floats (created, last updated) in unix seconds.
        self.invoices: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.times: dict[str, dict[str, list[float]]] = {"Invoice": {}, "Customer": {}}
        self.deleted: dict[str, float] = {}  # hard-deleted invoice id -> time of the delete
        self.next_id = 1
        self.next_doc = 1001
        self.version = 0
        self._cache: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
        self._rng = _Rng(f"quickbooks-changes:{self.seed}")
        self.on_change: Callable[[QuickBooksCompany, list[DataChange]], None] | None = None
        self._pending: list[DataChange] = []
        self._depth = 0
        self._generate(now)

    # --- helpers ------------------------------------------------------------------------------------------

    def _local_day(self, ts: float) -> tuple[str, int]:
        day, rem = divmod(math.floor(ts) + self._shift, _DAY)
        date = self._dates.get(day)
        if date is None:
            date = self._dates[day] = dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
        return date, rem

    def stamp(self, ts: float) -> str:
        """``MetaData`` time: whole seconds with the company's UTC offset."""
        date, rem = self._local_day(ts)
        return f"{date}T{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}{self.offset}"

    def response_time(self, now: float) -> str:
        """The ``time`` of a response: milliseconds and the company's offset."""
        d = dt.datetime.fromtimestamp(now, self.tz)
        return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{d.microsecond // 1000:03d}" + self.offset

    def _date(self, ts: float) -> str:
        return self._local_day(ts)[0]

    def table(self, entity: str) -> dict[str, dict[str, Any]]:
        """The records of ``Invoice`` or ``Customer``."""
        return self.invoices if entity == "Invoice" else self.customers

    def _alloc_id(self, gap: int = 0) -> str:
        oid = str(self.next_id + gap)
        self.next_id += gap + 1
        return oid

    def _touch(self) -> None:
        self.version += 1
        self._cache.clear()

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        """Collect the changes of one outermost call and report them together when it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending:
                changes, self._pending = self._pending, []
                if self.on_change is not None:
                    self.on_change(self, changes)

    def _record(self, entity: str, operation: str, oid: str, at: float, deleted_id: str | None = None) -> None:
        self._pending.append(DataChange(entity, operation, oid, at, deleted_id))

    def _set_times(self, entity: str, oid: str, created: float, updated: float) -> None:
        rec = self.table(entity)[oid]
        rec["MetaData"] = {"CreateTime": self.stamp(created), "LastUpdatedTime": self.stamp(updated)}
        self.times[entity][oid] = [created, updated]

    def counts(self) -> dict[str, int]:
        """Record counts for the control API."""
        return {
            "invoices": len(self.invoices),
            "customers": len(self.customers),
            "deleted_invoices": len(self.deleted),
            "voided_invoices": sum(1 for r in self.invoices.values() if r.get("PrivateNote") == "Voided"),
            "inactive_customers": sum(1 for r in self.customers.values() if not r.get("Active", True)),
        }

    # --- generation -------------------------------------------------------------------------------------

    def _generate(self, now: int) -> None:
        rng = _Rng(f"quickbooks:{self.seed}")
        spec = self.spec
        n_customers = spec["customers"]
        n_invoices = spec["invoices"]
        n_deleted = spec["deleted_invoices"]
        span = max(1.0, spec["days"] * _DAY)
        start = now - span
        currencies = spec["currencies"]
        names: set[str] = set()
        customer_created = sorted(start + rng.random() * span for _ in range(n_customers))
        for created in customer_created:
            self._new_customer(rng, created, currencies, names, now)
        customer_ids = list(self.customers)
        total = n_invoices + n_deleted
        deleted_slots = set(rng.sample(range(total), n_deleted)) if n_deleted else set()
        invoice_created = sorted(start + rng.random() * span for _ in range(total))
        balances: Counter[str] = Counter()
        for k, created in enumerate(invoice_created):
            if not customer_ids:
                break
            # A customer that already existed when the invoice was written.
            upto = max(1, bisect_right(customer_created, created))
            cid = customer_ids[rng.between(upto)]
            created = max(created, self.times["Customer"][cid][0])
            oid = self._new_invoice(rng, cid, created, now, gap=rng.pick((0, 0, 0, 1, 2)))
            if k in deleted_slots:
                self.deleted[oid] = created + rng.random() * (now - created)
                self._drop_invoice(oid)
            else:
                balances[cid] += _cents(self.invoices[oid]["Balance"])
        for cid, rec in self.customers.items():
            rec["Balance"] = rec["BalanceWithJobs"] = _money(balances[cid])
        inactive_share = spec["inactive_share"]
        for cid in list(self.customers):
            if rng.random() < inactive_share:
                created, _ = self.times["Customer"][cid]
                self._deactivate(cid, created + rng.random() * (now - created))
        self._touch()

    def _new_customer(
        self, rng: _Rng, created: float, currencies: list[str], names: set[str], now: float, *, fresh: bool = False
    ) -> str:
        given, family = rng.pick(_GIVEN), rng.pick(_FAMILY)
        company = " ".join(rng.sample(_WORDS, 2)) if rng.random() < 0.7 else ""
        display = company or f"{given} {family}"
        base, n = display, 2
        while display in names:
            display = f"{base} {n}"
            n += 1
        names.add(display)
        currency = self.home_currency if rng.random() < 0.7 or len(currencies) == 1 else rng.pick(currencies[1:])
        city, state, postal = rng.pick(_CITIES)
        oid = self._alloc_id()
        rec: dict[str, Any] = {
            "Taxable": rng.random() < 0.6,
            "BillAddr": {
                "Id": str(rng.between(2, 500)),
                "Line1": f"{rng.between(10, 9999)} {rng.pick(_STREETS)}",
                "City": city,
                "CountrySubDivisionCode": state,
                "PostalCode": postal,
            },
            "Job": False,
            "BillWithParent": False,
            "Balance": 0.0,
            "BalanceWithJobs": 0.0,
            "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]},
            "PreferredDeliveryMethod": rng.pick(("Print", "Email", "None")),
            "IsProject": False,
            "ClientEntityId": "0",
            "domain": "QBO",
            "sparse": False,
            "Id": oid,
            "SyncToken": "0",
            "MetaData": {},
            "GivenName": given,
            "FamilyName": family,
            "FullyQualifiedName": display,
            "CompanyName": company or None,
            "DisplayName": display,
            "PrintOnCheckName": display,
            "Active": True,
            "PrimaryPhone": {"FreeFormNumber": f"({rng.between(200, 999)}) 555-{rng.between(1000, 9999)}"},
            "PrimaryEmailAddr": {"Address": f"{given.lower()}.{family.lower()}{oid}@example.com"},
        }
        if rec["CompanyName"] is None:
            del rec["CompanyName"]
        self.customers[oid] = rec
        updated = created
        if not fresh and rng.random() < 0.3:
            updated = created + rng.random() * (now - created)
            rec["SyncToken"] = str(rng.between(1, 4))
        self._set_times("Customer", oid, created, updated)
        return oid

    def _lines(self, rng: _Rng, taxable: bool) -> tuple[list[dict[str, Any]], int, int, int]:
        lines: list[dict[str, Any]] = []
        subtotal = taxable_sub = 0
        n = rng.pick((1, 1, 2, 2, 3, 4, 6))
        for i in range(n):
            item_id, item_name, price = rng.pick(_ITEMS)
            qty = rng.between(1, 11)
            amount = qty * price
            line_taxable = taxable and rng.random() < 0.7
            subtotal += amount
            if line_taxable:
                taxable_sub += amount
            lines.append(
                {
                    "Id": str(i + 1),
                    "LineNum": i + 1,
                    "Description": f"{item_name} ({qty} x {_money(price):.2f})",
                    "Amount": _money(amount),
                    "DetailType": "SalesItemLineDetail",
                    "SalesItemLineDetail": {
                        "ItemRef": {"value": item_id, "name": item_name},
                        "UnitPrice": _money(price),
                        "Qty": qty,
                        "ItemAccountRef": {"value": "79", "name": "Sales of Product Income"},
                        "TaxCodeRef": {"value": "TAX" if line_taxable else "NON"},
                    },
                }
            )
        if rng.random() < 0.1:
            lines.append(
                {
                    "Id": str(n + 1),
                    "LineNum": n + 1,
                    "Description": "Thank you for your order",
                    "DetailType": "DescriptionOnly",
                    "DescriptionLineDetail": {},
                }
            )
        lines.append({"Amount": _money(subtotal), "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}})
        discount = 0
        if rng.random() < 0.1:
            percent = rng.pick((5, 10, 15))
            discount = (subtotal * percent + 50) // 100
            lines.append(
                {
                    "Amount": _money(discount),
                    "DetailType": "DiscountLineDetail",
                    "DiscountLineDetail": {
                        "PercentBased": True,
                        "DiscountPercent": percent,
                        "DiscountAccountRef": {"value": "86", "name": "Discounts given"},
                    },
                }
            )
        tax = (taxable_sub * 8 + 50) // 100
        return lines, subtotal, discount, tax

    def _new_invoice(
        self,
        rng: _Rng,
        cid: str,
        created: float,
        now: float,
        *,
        gap: int = 0,
        fresh: bool = False,
    ) -> str:
        customer = self.customers[cid]
        currency = customer["CurrencyRef"]["value"]
        lines, _subtotal, discount, tax = self._lines(rng, bool(customer.get("Taxable")))
        total = _subtotal - discount + tax
        oid = self._alloc_id(gap)
        term_id, term_days = rng.pick(_TERMS)
        txn_ts = created - rng.random() * 2 * _DAY if not fresh else created
        rec: dict[str, Any] = {
            "AllowIPNPayment": False,
            "AllowOnlinePayment": False,
            "AllowOnlineCreditCardPayment": False,
            "AllowOnlineACHPayment": False,
            "domain": "QBO",
            "sparse": False,
            "Id": oid,
            "SyncToken": "0",
            "MetaData": {},
            "CustomField": [],
            "DocNumber": str(self.next_doc),
            "TxnDate": self._date(txn_ts),
            "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]},
            "LinkedTxn": [],
            "Line": lines,
            "TxnTaxDetail": {"TotalTax": _money(tax)},
            "CustomerRef": {"value": cid, "name": customer["DisplayName"]},
            "CustomerMemo": {"value": rng.pick(_MEMOS)},
            "BillAddr": dict(customer["BillAddr"]),
            "FreeFormAddress": True,
            "SalesTermRef": {"value": term_id},
            "DueDate": self._date(txn_ts + term_days * _DAY),
            "TotalAmt": _money(total),
            "ApplyTaxAfterDiscount": False,
            "PrintStatus": rng.pick(("NotSet", "NeedToPrint")),
            "EmailStatus": rng.pick(("NotSet", "EmailSent", "NeedToSend")),
            "BillEmail": dict(customer["PrimaryEmailAddr"]),
            "Balance": _money(total),
            "Deposit": 0,
        }
        if tax:
            rec["TxnTaxDetail"]["TxnTaxCodeRef"] = {"value": "2"}
        if currency != self.home_currency:
            rate = _RATES_E4[currency] * 10000 // _RATES_E4[self.home_currency]
            rec["ExchangeRate"] = rate / 10000
            rec["HomeTotalAmt"] = _money(_home_cents(total, rate))
            rec["HomeBalance"] = rec["HomeTotalAmt"]
        self.next_doc += 1
        self.invoices[oid] = rec
        updated = created
        if not fresh:
            roll = rng.random()
            later = created + rng.random() * (now - created)
            if roll < 0.45:
                self._pay(rec, total, rng)
                updated = later
            elif roll < 0.55:
                self._pay(rec, rng.between(1, max(2, total)), rng)
                updated = later
            elif roll < 0.6:
                self._void_record(rec)
                updated = later
            elif roll < 0.7:
                rec["PrivateNote"] = "Reviewed"
                updated = later
            if updated != created:
                rec["SyncToken"] = str(rng.between(1, 4))
        self._set_times("Invoice", oid, created, updated)
        return oid

    def _pay(self, rec: dict[str, Any], cents: int, rng: _Rng) -> None:
        balance = _cents(rec["Balance"])
        cents = min(cents, balance)
        if cents <= 0:
            return
        self._set_balance(rec, balance - cents)
        rec["LinkedTxn"] = [*rec["LinkedTxn"], {"TxnId": str(self.next_id + rng.between(0, 3)), "TxnType": "Payment"}]
        self.next_id += 3

    def _set_balance(self, rec: dict[str, Any], cents: int) -> None:
        rec["Balance"] = _money(cents)
        if "ExchangeRate" in rec:
            rec["HomeBalance"] = _money(_home_cents(cents, round(rec["ExchangeRate"] * 10000)))

    @staticmethod
    def _void_record(rec: dict[str, Any]) -> None:
        for line in rec["Line"]:
            if "Amount" in line:
                line["Amount"] = 0.0
            detail = line.get("SalesItemLineDetail")
            if detail is not None:
                detail["Qty"] = 0
        rec["TxnTaxDetail"] = {"TotalTax": 0.0}
        rec["TotalAmt"] = 0.0
        rec["Balance"] = 0.0
        if "ExchangeRate" in rec:
            rec["HomeTotalAmt"] = 0.0
            rec["HomeBalance"] = 0.0
        rec["PrivateNote"] = "Voided"

    def _drop_invoice(self, oid: str) -> None:
        del self.invoices[oid]
        del self.times["Invoice"][oid]

    def _deactivate(self, cid: str, when: float) -> None:
        rec = self.customers[cid]
        rec["Active"] = False
        for key in ("DisplayName", "FullyQualifiedName", "PrintOnCheckName"):
            if not str(rec.get(key, "")).endswith(" (deleted)"):
                rec[key] = f"{rec[key]} (deleted)"
        rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
        self._set_times("Customer", cid, self.times["Customer"][cid][0], when)

    def _adjust_customer(self, cid: str, delta_cents: int) -> None:
        customer = self.customers.get(cid)
        if customer is None or delta_cents == 0:
            return
        value = _money(_cents(customer.get("Balance")) + delta_cents)
        customer["Balance"] = customer["BalanceWithJobs"] = value

    # --- changes (control API) --------------------------------------------------------------------------

    def apply_changes(self, changes: Mapping[str, int], now: float) -> dict[str, list[str]]:
        """Edit, void, hard-delete and create invoices; deactivate, edit and create customers; at ``now``."""
        with self._reporting():
            return self._apply_changes(changes, now)

    def _apply_changes(self, changes: Mapping[str, int], now: float) -> dict[str, list[str]]:
        rng = self._rng
        out: dict[str, list[str]] = {
            "edited": [],
            "voided": [],
            "deleted": [],
            "created": [],
            "archived": [],
            "customers_edited": [],
            "customers_created": [],
        }
        live = [oid for oid, rec in self.invoices.items() if rec.get("PrivateNote") != "Voided"]
        rng.shuffle(live)
        for oid in live[: changes.get("edits", 0)]:
            self._record("Invoice", self._edit_invoice(oid, now, rng), oid, now)
            out["edited"].append(oid)
        live = live[changes.get("edits", 0) :]
        for oid in live[: changes.get("voids", 0)]:
            self.void_invoice(oid, now)
            out["voided"].append(oid)
        live = live[changes.get("voids", 0) :]
        pool = live + [oid for oid, rec in self.invoices.items() if rec.get("PrivateNote") == "Voided"]
        for oid in pool[: changes.get("deletes", 0)]:
            self.delete_invoice(oid, now)
            out["deleted"].append(oid)
        active = [cid for cid, rec in self.customers.items() if rec.get("Active", True)]
        rng.shuffle(active)
        for cid in active[: changes.get("archives", 0)]:
            self._deactivate(cid, now)
            self._record("Customer", "Update", cid, now)
            out["archived"].append(cid)
        active = [cid for cid in active[changes.get("archives", 0) :]]
        for cid in active[: changes.get("customer_edits", 0)]:
            rec = self.customers[cid]
            rec["PrimaryPhone"] = {"FreeFormNumber": f"({rng.between(200, 999)}) 555-{rng.between(1000, 9999)}"}
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Customer", cid, self.times["Customer"][cid][0], now)
            self._record("Customer", "Update", cid, now)
            out["customers_edited"].append(cid)
        currencies = self.spec["currencies"]
        names = {rec["DisplayName"] for rec in self.customers.values()}
        for _ in range(changes.get("customer_creates", 0)):
            cid = self._new_customer(rng, now, currencies, names, now, fresh=True)
            self._record("Customer", "Create", cid, now)
            out["customers_created"].append(cid)
        targets = [cid for cid, rec in self.customers.items() if rec.get("Active", True)]
        for _ in range(changes.get("creates", 0)):
            if not targets:
                break
            cid = rng.pick(targets)
            oid = self._new_invoice(rng, cid, now, now, fresh=True)
            self._adjust_customer(cid, _cents(self.invoices[oid]["Balance"]))
            self._record("Invoice", "Create", oid, now)
            out["created"].append(oid)
        self._touch()
        return out

    def _edit_invoice(self, oid: str, now: float, rng: _Rng) -> str:
        """Pay, email or annotate an invoice; returns the webhook operation (``Emailed`` or ``Update``)."""
        rec = self.invoices[oid]
        operation = "Update"
        balance = _cents(rec["Balance"])
        roll = rng.random()
        if balance > 0 and roll < 0.5:
            paid = balance if rng.random() < 0.7 else rng.between(1, balance + 1)
            before = balance
            self._pay(rec, paid, rng)
            self._adjust_customer(rec["CustomerRef"]["value"], _cents(rec["Balance"]) - before)
        elif roll < 0.75:
            rec["CustomerMemo"] = {"value": rng.pick(_MEMOS)}
            rec["EmailStatus"] = "EmailSent"
            operation = "Emailed"
        else:
            rec["PrivateNote"] = f"Edited {self.stamp(now)}"
        rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
        self._set_times("Invoice", oid, self.times["Invoice"][oid][0], now)
        return operation

    def void_invoice(self, oid: str, now: float) -> None:
        """Void: zero amounts and quantities, ``Voided`` private note, new ``SyncToken`` and update time."""
        with self._reporting():
            rec = self.invoices[oid]
            self._adjust_customer(rec["CustomerRef"]["value"], -_cents(rec["Balance"]))
            self._void_record(rec)
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Invoice", oid, self.times["Invoice"][oid][0], now)
            self._touch()
            self._record("Invoice", "Void", oid, now)

    def delete_invoice(self, oid: str, now: float) -> None:
        """Hard delete: gone from query and read-one, kept as a ``Deleted`` stub for CDC."""
        with self._reporting():
            rec = self.invoices[oid]
            self._adjust_customer(rec["CustomerRef"]["value"], -_cents(rec["Balance"]))
            self._drop_invoice(oid)
            self.deleted[oid] = now
            self._touch()
            self._record("Invoice", "Delete", oid, now)

    def merge_invoices(self, source: str, target: str, now: float) -> dict[str, Any]:
        """Merge invoice ``source`` into ``target`` (same currency, neither voided) at ``now``.

        ``target`` takes over ``source``'s lines, tax, total and balance, with a new ``SyncToken`` and
        update time; ``source`` is gone as a hard delete leaves it (a ``Deleted`` stub in CDC).
        """
        if source == target:
            raise ValueError("an invoice cannot be merged into itself")
        for oid in (source, target):
            if oid not in self.invoices:
                raise LookupError(f"no invoice {oid}")
            if self.invoices[oid].get("PrivateNote") == "Voided":
                raise ValueError(f"invoice {oid} is voided")
        old, rec = self.invoices[source], self.invoices[target]
        if old["CurrencyRef"]["value"] != rec["CurrencyRef"]["value"]:
            raise ValueError("only invoices in the same currency can be merged")
        with self._reporting():
            moved = [dict(line) for line in old["Line"] if line.get("DetailType") != "SubTotalLineDetail"]
            lines = [line for line in rec["Line"] if line.get("DetailType") != "SubTotalLineDetail"]
            numbered = [line for line in [*lines, *moved] if "LineNum" in line]
            for n, line in enumerate(numbered, start=1):
                line["Id"], line["LineNum"] = str(n), n
            subtotal = sum(_cents(line.get("Amount")) for line in (old["Line"] + rec["Line"])
                           if line.get("DetailType") == "SubTotalLineDetail")  # fmt: skip
            rec["Line"] = [*lines, *moved, {"Amount": _money(subtotal), "DetailType": "SubTotalLineDetail",
                                            "SubTotalLineDetail": {}}]  # fmt: skip
            tax = _cents(rec["TxnTaxDetail"].get("TotalTax")) + _cents(old["TxnTaxDetail"].get("TotalTax"))
            rec["TxnTaxDetail"]["TotalTax"] = _money(tax)
            total = _cents(rec["TotalAmt"]) + _cents(old["TotalAmt"])
            rec["TotalAmt"] = _money(total)
            if "ExchangeRate" in rec:
                rec["HomeTotalAmt"] = _money(_home_cents(total, round(rec["ExchangeRate"] * 10000)))
            moved_balance = _cents(old["Balance"])
            self._set_balance(rec, _cents(rec["Balance"]) + moved_balance)
            self._adjust_customer(old["CustomerRef"]["value"], -moved_balance)
            self._adjust_customer(rec["CustomerRef"]["value"], moved_balance)
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Invoice", target, self.times["Invoice"][target][0], now)
            self._drop_invoice(source)
            self.deleted[source] = now
            self._touch()
            self._record("Invoice", "Merge", target, now, deleted_id=source)
        return rec

    # --- control records --------------------------------------------------------------------------------

    def add_record(self, entity: str, fields: Mapping[str, Any], updated_at: float) -> dict[str, Any]:
        """Create an invoice or customer at ``updated_at`` with ``fields`` overriding the generated values."""
        rng = self._rng
        if entity == "Customer":
            names = {rec["DisplayName"] for rec in self.customers.values()}
            currencies = self.spec["currencies"]
            oid = self._new_customer(rng, updated_at, currencies, names, updated_at, fresh=True)
        else:
            ref = fields.get("CustomerRef")
            cid = str(ref.get("value")) if isinstance(ref, Mapping) else None
            if cid is None:
                active = [c for c, rec in self.customers.items() if rec.get("Active", True)]
                if not active:
                    raise ValueError("the company has no active customer to invoice")
                cid = rng.pick(active)
            elif cid not in self.customers:
                raise ValueError(f"no customer {cid}")
            oid = self._new_invoice(rng, cid, updated_at, updated_at, fresh=True)
            self._adjust_customer(cid, _cents(self.invoices[oid]["Balance"]))
        rec = self.table(entity)[oid]
        rec.update({k: v for k, v in fields.items() if k not in ("Id", "MetaData")})
        self._set_times(entity, oid, updated_at, updated_at)
        self._touch()
        with self._reporting():
            self._record(entity, "Create", oid, updated_at)
        return rec

    def update_record(self, entity: str, oid: str, fields: Mapping[str, Any], updated_at: float) -> dict[str, Any]:
        """Merge ``fields`` into a record, bump ``SyncToken`` and set its update time."""
        rec = self.table(entity)[oid]
        sync = str(int(rec["SyncToken"]) + 1)
        rec.update({k: v for k, v in fields.items() if k not in ("Id", "MetaData")})
        if "SyncToken" not in fields:
            rec["SyncToken"] = sync
        self._set_times(entity, oid, self.times[entity][oid][0], updated_at)
        self._touch()
        with self._reporting():
            self._record(entity, "Update", oid, updated_at)
        return rec

    def export(self, entity: str) -> dict[str, Any]:
        """Every current record (full API shape) and the ids hard-deleted so far."""
        table = self.table(entity)
        records = [table[oid] for oid in sorted(table, key=int)]
        deleted = sorted(self.deleted, key=int) if entity == "Invoice" else []
        return {"records": records, "deleted_ids": deleted}

    def company_info(self) -> dict[str, Any]:
        """The ``CompanyInfo`` entity of this realm."""
        stamp = self.stamp(self.created_at)
        return {
            "CompanyName": self.name,
            "LegalName": self.name,
            "CompanyAddr": {"Id": "1", "Line1": "123 Sierra Way", "City": "San Pablo", "PostalCode": "87999"},
            "Country": "US",
            "SupportedLanguages": "en",
            "DefaultTimeZone": f"UTC{self.offset}",
            "domain": "QBO",
            "sparse": False,
            "Id": "1",
            "SyncToken": "0",
            "MetaData": {"CreateTime": stamp, "LastUpdatedTime": stamp},
            "NameValue": [{"Name": "HomeCurrency", "Value": self.home_currency}],
        }

    # --- query ------------------------------------------------------------------------------------------

    def _field_value(self, entity: str, oid: str, rec: Mapping[str, Any], name: str) -> Any:
        if name == "metadata.lastupdatedtime":
            return math.floor(self.times[entity][oid][1])
        if name == "metadata.createtime":
            return math.floor(self.times[entity][oid][0])
        if name == "id":
            return int(oid)
        if name == "active":
            return bool(rec.get("Active", True))
        if name == "customerref":
            return int(rec["CustomerRef"]["value"])
        if name == "totalamt" or name == "balance":
            return _cents(rec.get("TotalAmt" if name == "totalamt" else "Balance"))
        key = _QUERYABLE[entity][name]
        return rec.get(key)

    def _predicate(self, entity: str, cond: Condition) -> Callable[[str, Mapping[str, Any]], bool]:
        name = cond.field.lower()
        if name not in _QUERYABLE[entity]:
            raise _validation_error(f"property '{cond.field}' is not queryable")
        kind = _FIELD_KINDS.get(name, "string")
        values = [self._coerce(kind, cond.field, v) for v in cond.values]
        op = cond.op
        if (op == "like" and kind != "string") or (kind == "bool" and op not in ("=", "!=", "in")):
            raise _validation_error(f"operator '{op.upper()}' is not supported for property '{cond.field}'")
        if op == "like":
            pattern = re.compile(
                "^" + ".*".join(re.escape(p) for p in str(values[0]).split("%")) + "$", re.IGNORECASE | re.DOTALL
            )

            def like(oid: str, rec: Mapping[str, Any]) -> bool:
                value = self._field_value(entity, oid, rec, name)
                return value is not None and pattern.match(str(value)) is not None

            return like
        if op == "in":
            wanted = set(values)
            return lambda oid, rec: self._field_value(entity, oid, rec, name) in wanted
        target = values[0]
        compare = _OPS[op]

        def test(oid: str, rec: Mapping[str, Any]) -> bool:
            value = self._field_value(entity, oid, rec, name)
            return value is not None and compare(value, target)

        return test

    def _coerce(self, kind: str, name: str, value: Any) -> Any:
        try:
            if kind == "datetime":
                if isinstance(value, bool):
                    raise ValueError
                return _parse_when(str(value), self.tz)
            if kind == "int":
                return int(str(value))
            if kind == "money":
                return round(float(str(value)) * 100)
            if kind == "bool":
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("true", "false"):
                    return str(value).lower() == "true"
                raise ValueError
        except ValueError:
            raise _validation_error(f"Invalid value '{value}' for property '{name}'") from None
        return value if isinstance(value, str) else str(value)

    def _sort_key(self, entity: str, name: str) -> Callable[[str], Any]:
        lname = name.lower()
        if lname not in _QUERYABLE[entity]:
            raise _validation_error(f"property '{name}' is not queryable")
        table = self.table(entity)
        if lname in ("metadata.lastupdatedtime", "metadata.createtime"):
            slot = 1 if lname == "metadata.lastupdatedtime" else 0
            times = self.times[entity]
            return lambda oid: math.floor(times[oid][slot])
        if lname in ("id", "customerref", "totalamt", "balance", "active"):
            return lambda oid: self._field_value(entity, oid, table[oid], lname)
        return lambda oid: str(self._field_value(entity, oid, table[oid], lname) or "").lower()

    def select(self, q: Query) -> list[str]:
        """Ids matching ``q`` in its order (cached per data version, so paging costs one slice)."""
        key = (q.entity, q.where, q.order, self.version)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        table = self.table(q.entity)
        preds = [self._predicate(q.entity, c) for c in q.where]
        if q.entity == "Customer" and not any(c.field.lower() == "active" for c in q.where):
            preds.append(lambda oid, rec: bool(rec.get("Active", True)))
        ids = sorted(table, key=int)
        if preds:
            ids = [oid for oid in ids if all(p(oid, table[oid]) for p in preds)]
        for name, desc in reversed(q.order):
            ids.sort(key=self._sort_key(q.entity, name), reverse=desc)
        self._cache[key] = ids
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return ids

    def query(self, q: Query) -> dict[str, Any]:
        """The ``QueryResponse`` object for a parsed query."""
        entity = _ENTITY_NAMES.get(q.entity.lower())
        if entity is None:
            raise _validation_error(f"Invalid entity name: {q.entity}")
        q = Query(entity, q.count, q.fields, q.where, q.order, q.start, q.max_results)
        if entity not in ("Invoice", "Customer"):
            if entity == "CompanyInfo" and not q.where:
                rows = [self.company_info()]
                if q.count:
                    return {"totalCount": 1}
                if q.start > 1:
                    return {}
                return {entity: rows, "startPosition": q.start, "maxResults": 1}
            return {"totalCount": 0} if q.count else {}
        ids = self.select(q)
        if q.count:
            return {"totalCount": len(ids)}
        limit = min(q.max_results, MAX_RESULTS_CAP)
        page = ids[q.start - 1 : q.start - 1 + limit]
        if not page:
            return {}
        table = self.table(entity)
        rows = [table[oid] for oid in page]
        if q.fields is not None:
            rows = [_project(rec, q.fields) for rec in rows]
        return {entity: rows, "startPosition": q.start, "maxResults": len(rows)}

    # --- change data capture ----------------------------------------------------------------------------

    def cdc(self, entities: list[str], since: float, cap: int) -> list[dict[str, Any]]:
        """CDC blocks: per entity the changed records (full) and deleted stubs, oldest first, ``cap`` overall."""
        found: list[tuple[float, int, str, dict[str, Any]]] = []
        for entity in entities:
            if entity not in ("Invoice", "Customer"):
                continue
            table = self.table(entity)
            for oid, (_created, updated) in self.times[entity].items():
                if math.floor(updated) >= since:
                    found.append((math.floor(updated), int(oid), entity, table[oid]))
            if entity == "Invoice":
                for oid, when in self.deleted.items():
                    if math.floor(when) >= since:
                        stub = {
                            "domain": "QBO",
                            "status": "Deleted",
                            "Id": oid,
                            "MetaData": {"LastUpdatedTime": self.stamp(when)},
                        }
                        found.append((math.floor(when), int(oid), entity, stub))
        found.sort(key=lambda row: (row[0], row[1]))
        found = found[:cap]
        blocks: list[dict[str, Any]] = []
        for entity in entities:
            rows = [row[3] for row in found if row[2] == entity]
            if rows:
                blocks.append({entity: rows, "startPosition": 1, "maxResults": len(rows)})
        return blocks or [{}]


# ---------------------------------------------------------------------------------------------------------
# Webhook payloads
# ---------------------------------------------------------------------------------------------------------


def legacy_notification(company: QuickBooksCompany, changes: Sequence[DataChange]) -> bytes:
    """One ``eventNotifications`` body for one realm: ids only, ``lastUpdated`` with the company's offset."""
    entities = []
    for change in changes:
        stamp = company.stamp(change.at)
        entity = {"name": change.entity, "id": change.id, "operation": change.operation,
                  "lastUpdated": stamp[:-3] + stamp[-2:]}  # fmt: skip
        if change.deleted_id:
            entity["deletedId"] = change.deleted_id
        entities.append(entity)
    note = {"realmId": company.realm_id, "dataChangeEvent": {"entities": entities}}
    return orjson.dumps({"eventNotifications": [note]})


def cloudevents_batches(company: QuickBooksCompany, changes: Sequence[DataChange]) -> list[bytes]:
    """CloudEvents JSON arrays of at most 100 events: uuid ids, ``qbo.<entity>.<verb>.v1``, ISO UTC ``time``.

    A merge names the merged-away record in ``data.deletedId`` (the legacy ``deletedId``; unverified).
    """
    events = []
    for change in changes:
        moment = dt.datetime.fromtimestamp(change.at, dt.UTC).isoformat(timespec="milliseconds")
        events.append({
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "intuit.qbo.sandbox",
            "type": f"qbo.{change.entity.lower()}.{_CLOUDEVENT_VERBS[change.operation]}.v1",
            "datacontenttype": "application/json",
            "time": moment.replace("+00:00", "Z"),
            "intuitentityid": change.id,
            "intuitaccountid": company.realm_id,
            "data": {"deletedId": change.deleted_id} if change.deleted_id else {},
        })  # fmt: skip
    step = CLOUDEVENTS_PER_DELIVERY
    return [orjson.dumps(events[i : i + step]) for i in range(0, len(events), step)]


def intuit_signer(verifier_token: str) -> Signer:
    """``intuit-signature``: base64 HMAC-SHA256 of the exact body with the app's verifier token."""
    key = verifier_token.encode()

    def sign(body: bytes, at: int) -> dict[str, str]:
        return {"intuit-signature": base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()}

    return sign


def _project(rec: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    wanted = {f.split(".")[0].lower() for f in fields}
    out = {k: v for k, v in rec.items() if k.lower() in wanted}
    out.update({"domain": rec.get("domain", "QBO"), "sparse": True})
    return out


_QUERYABLE: dict[str, dict[str, str]] = {
    "Invoice": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "docnumber": "DocNumber",
        "txndate": "TxnDate",
        "duedate": "DueDate",
        "customerref": "CustomerRef",
        "totalamt": "TotalAmt",
        "balance": "Balance",
    },
    "Customer": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "active": "Active",
        "displayname": "DisplayName",
        "givenname": "GivenName",
        "familyname": "FamilyName",
        "companyname": "CompanyName",
        "fullyqualifiedname": "FullyQualifiedName",
        "balance": "Balance",
    },
}
_FIELD_KINDS = {
    "metadata.lastupdatedtime": "datetime",
    "metadata.createtime": "datetime",
    "id": "int",
    "customerref": "int",
    "active": "bool",
    "totalamt": "money",
    "balance": "money",
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


# ---------------------------------------------------------------------------------------------------------
# XML rendering (Accept other than JSON)
# ---------------------------------------------------------------------------------------------------------

_ENTITY_ATTRS = ("domain", "sparse", "status")


def _xml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(str(value))


def _xml_element(name: str, value: Any, out: list[str], *, entity: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            _xml_element(name, item, out, entity=entity)
        return
    if not isinstance(value, dict):
        out.append(f"<{name}>{_xml_scalar(value)}</{name}>")
        return
    if name.endswith("Ref") and "value" in value:
        attrs = "".join(f" {k}={quoteattr(str(value[k]))}" for k in ("name", "type") if k in value)
        out.append(f"<{name}{attrs}>{_xml_scalar(value['value'])}</{name}>")
        return
    attr_keys = _ENTITY_ATTRS if entity else ()
    attrs = "".join(f" {k}={quoteattr(_xml_scalar(value[k]))}" for k in attr_keys if k in value)
    children: list[str] = []
    for key, child in value.items():
        if key not in attr_keys:
            _xml_element(key, child, children)
    if children:
        out.append(f"<{name}{attrs}>{''.join(children)}</{name}>")
    else:
        out.append(f"<{name}{attrs}/>")


def _xml_query_response(block: Mapping[str, Any], out: list[str]) -> None:
    attrs = "".join(f' {k}="{block[k]}"' for k in ("startPosition", "maxResults", "totalCount") if k in block)
    inner: list[str] = []
    for key, value in block.items():
        if key not in ("startPosition", "maxResults", "totalCount"):
            _xml_element(key, value, inner, entity=True)
    out.append(f"<QueryResponse{attrs}>{''.join(inner)}</QueryResponse>" if inner else f"<QueryResponse{attrs}/>")


def to_xml(payload: Mapping[str, Any]) -> bytes:
    """Render a JSON response body as Intuit's ``IntuitResponse`` XML document."""
    out: list[str] = []
    for key, value in payload.items():
        if key == "time":
            continue
        if key == "QueryResponse":
            _xml_query_response(value, out)
        elif key == "CDCResponse":
            for cdc in value:
                inner: list[str] = []
                for block in cdc.get("QueryResponse", []):
                    _xml_query_response(block, inner)
                out.append(f"<CDCResponse>{''.join(inner)}</CDCResponse>")
        elif key == "Fault":
            errors = "".join(
                f"<Error code={quoteattr(e['code'])}"
                + (f" element={quoteattr(e['element'])}" if e.get("element") else "")
                + ">"
                f"<Message>{escape(e['Message'])}</Message><Detail>{escape(e['Detail'])}</Detail></Error>"
                for e in value["Error"]
            )
            out.append(f"<Fault type={quoteattr(value['type'])}>{errors}</Fault>")
        else:
            _xml_element(key, value, out, entity=True)
    time_attr = f" time={quoteattr(payload['time'])}" if "time" in payload else ""
    doc = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f'<IntuitResponse xmlns="{_XMLNS}"{time_attr}>{"".join(out)}</IntuitResponse>'
    )
    return doc.encode()


# ---------------------------------------------------------------------------------------------------------
# Runtime: limits, faults, statistics
# ---------------------------------------------------------------------------------------------------------


class _Window:
    """A fixed window counter on ``time.monotonic``."""

    __slots__ = ("count", "start")

    def __init__(self) -> None:
        self.start = -math.inf
        self.count = 0

    def room(self, limit: int | None, length: float, now: float) -> bool:
        if not limit:
            return True
        if now - self.start >= length:
            self.start = now
            self.count = 0
        return self.count < limit

    def take(self, limit: int | None) -> None:
        if limit:
            self.count += 1


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    day_limit_exhausted: bool = False
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "day_limit_exhausted": self.day_limit_exhausted,
            "latency_ms": self.latency_ms,
        }


@dataclass
class _Runtime:
    company: QuickBooksCompany
    added: int
    minute: _Window = field(default_factory=_Window)
    second: _Window = field(default_factory=_Window)
    active: int = 0
    peak_concurrency: int = 0
    requests: int = 0
    throttled: int = 0


_TENANT_FIELDS = frozenset(
    {
        "client_id",
        "seed",
        "invoices",
        "customers",
        "contacts",
        "days",
        "name",
        "id",
        "environment",
        "utc_offset",
        "home_currency",
        "currencies",
        "deleted_invoices",
        "inactive_share",
        "requests_per_minute",
        "requests_per_second",
        "max_concurrent",
        "minute_seconds",
        "second_seconds",
        "cdc_max_days",
        "cdc_max_objects",
    }
)
_CHANGE_FIELDS = ("edits", "voids", "deletes", "creates", "archives", "customer_edits", "customer_creates")
_FAULT_FIELDS = frozenset(
    {"tenant", "server_errors", "server_error_status", "rate_limited", "day_limit_exhausted", "latency_ms"}
)


_int_field = partial(int_field, nullable=True)
_control = partial(control_endpoint, bad_request=(ValueError,))


def _entity_of(name: Any) -> str:
    key = str(name or "").lower().rstrip("s")
    if key == "invoice":
        return "Invoice"
    if key in ("customer", "contact"):
        return "Customer"
    raise ControlError(400, "entity must be invoice or customer (contact)")


def _wants_json(request: Request) -> bool:
    return "json" in request.headers.get("accept", "").lower()


def _tid() -> str:
    return secrets.token_hex(16)


class QuickBooksSandbox:
    """QuickBooks API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=ACCESS_TTL,
            code_ttl=300,
            refresh_idle_ttl=REFRESH_TTL,
            rotate=True,
            rotate_after=REFRESH_ROTATE_AFTER,
            grace=REFRESH_GRACE,
            client_auth=frozenset({"basic"}),
            pkce=False,
            token_type="bearer",
            refresh_hard_ttl=REFRESH_HARD_TTL,
        )
        self.oauth = OAuthServer(clock, policy, extra_token_fields=self._token_extras)
        self.client_environments: dict[str, str] = {}
        self._runtime: dict[str, _Runtime] = {}
        self._added = 0
        self._lock = threading.Lock()
        self._faults: dict[str | None, _Faults] = {}
        self.stats: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.minor_versions: Counter[str] = Counter()
        self.formats: Counter[str] = Counter()
        self.webhooks = WebhookOutbox("quickbooks", clock, retry_delays=WEBHOOK_RETRY_DELAYS,
                                      timeout=WEBHOOK_TIMEOUT_SECONDS)  # fmt: skip

    # --- companies ----------------------------------------------------------------------------------------

    def company(self, realm_id: str) -> QuickBooksCompany | None:
        """The company with this realm id, if any."""
        rt = self._runtime.get(realm_id)
        return rt.company if rt else None

    def normalise_spec(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a tenant spec and fill in the defaults."""
        unknown = set(body) - _TENANT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown tenant fields: {sorted(unknown)}")
        client_id = body.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ControlError(400, "client_id must be a non-empty string")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ControlError(400, "seed must be an integer")
        environment = body.get("environment", "sandbox")
        if environment not in ("sandbox", "production"):
            raise ControlError(400, "environment must be sandbox or production")
        invoices = _int_field(body, "invoices", 200)
        customers = _int_field(body, "customers", body.get("contacts", 50))
        assert invoices is not None and customers is not None
        if invoices and not customers:
            raise ControlError(400, "invoices need at least one customer")
        rng = _Rng(f"quickbooks-realm:{client_id}:{seed}")
        prefix = 9341450000000000 if environment == "sandbox" else 123145000000000
        realm = body.get("id") or str(prefix + rng.between(10**10))
        utc_offset = body.get("utc_offset", "-07:00")
        try:
            _parse_offset(str(utc_offset))
        except ValueError as err:
            raise ControlError(400, str(err)) from None
        home = str(body.get("home_currency", "USD"))
        currencies = body.get("currencies", ["USD", "EUR", "GBP", "CAD", "AUD"])
        if (
            not isinstance(currencies, list)
            or any(c not in _CURRENCY_NAMES for c in currencies)
            or home not in _CURRENCY_NAMES
        ):
            raise ControlError(400, f"currencies must be among {sorted(_CURRENCY_NAMES)}")
        days = number_field(body, "days", 90)
        if days <= 0:
            raise ControlError(400, "days must be > 0")
        return {
            "client_id": client_id,
            "seed": seed,
            "id": str(realm),
            "name": str(body.get("name") or f"Sandbox Company_US_{seed}"),
            "environment": environment,
            "invoices": invoices,
            "customers": customers,
            "days": days,
            "utc_offset": str(utc_offset),
            "home_currency": home,
            "currencies": [home, *[c for c in currencies if c != home]],
            "deleted_invoices": _int_field(body, "deleted_invoices", invoices // 50),
            "inactive_share": number_field(body, "inactive_share", 0.08),
            "requests_per_minute": _int_field(body, "requests_per_minute", 500),
            "requests_per_second": _int_field(body, "requests_per_second", 10),
            "max_concurrent": _int_field(body, "max_concurrent", 10),
            "minute_seconds": number_field(body, "minute_seconds", 60.0, 0.001),
            "second_seconds": number_field(body, "second_seconds", 1.0, 0.001),
            "cdc_max_days": number_field(body, "cdc_max_days", CDC_MAX_DAYS),
            "cdc_max_objects": _int_field(body, "cdc_max_objects", CDC_MAX_OBJECTS, 1),
        }

    def add_tenant(self, body: Mapping[str, Any]) -> QuickBooksCompany:
        """Generate a company from a spec and install it (replacing one with the same realm id)."""
        spec = self.normalise_spec(body)
        company = QuickBooksCompany(spec, now=self.clock())
        self._install(company)
        return company

    def _install(self, company: QuickBooksCompany) -> None:
        company.on_change = self._notify
        with self._lock:
            self._added += 1
            self._runtime[company.realm_id] = _Runtime(company, self._added)

    # --- webhooks ---------------------------------------------------------------------------------------

    def _webhook_signer(self, body: Mapping[str, Any]) -> tuple[str, Signer]:
        """A subscription's key (app or realm, and payload format) and its ``intuit-signature`` signer.

        Like Intuit, one app's endpoint gets the events of every realm connected to the app (``app``);
        ``realm`` narrows a subscription to one company. ``format`` is ``legacy`` or ``cloudevents``.
        """
        reject_unknown_fields(body, _SUBSCRIBE_FIELDS, "webhook subscription")
        token = body.get("verifier_token")
        if not isinstance(token, str) or not token:
            raise ControlError(400, "verifier_token must be a non-empty string")
        shape = body.get("format", "legacy")
        if shape not in WEBHOOK_FORMATS:
            raise ControlError(400, f"format must be one of {list(WEBHOOK_FORMATS)}")
        app, realm = body.get("app"), body.get("realm")
        if (app is None) == (realm is None):
            raise ControlError(400, "name exactly one of app (a client_id) or realm")
        if realm is not None:
            scope = f"realm:{self._rt(str(realm)).company.realm_id}"
        elif str(app) in self.oauth.clients:
            scope = f"app:{app}"
        else:
            raise ControlError(404, f"no app {app!r}")
        return f"{scope}:{shape}", intuit_signer(token)

    def _notify(self, company: QuickBooksCompany, changes: list[DataChange]) -> None:
        """Queue one notification of ``changes`` for every subscription of the company's app or realm."""
        for shape in WEBHOOK_FORMATS:
            keys = [f"{scope}:{shape}" for scope in (f"app:{company.client_id}", f"realm:{company.realm_id}")]
            keys = [key for key in keys if self.webhooks.subscriptions(key)]
            if not keys:
                continue
            bodies = (
                [legacy_notification(company, changes)] if shape == "legacy" else cloudevents_batches(company, changes)
            )
            for key in keys:
                for body in bodies:
                    self.webhooks.emit(key, body)

    def _summary(self, company: QuickBooksCompany) -> dict[str, Any]:
        spec = company.spec
        return {
            "id": company.realm_id,
            "name": company.name,
            "client_id": company.client_id,
            "environment": company.environment,
            "utc_offset": company.offset,
            "home_currency": company.home_currency,
            "counts": company.counts(),
            "limits": {
                k: spec[k]
                for k in (
                    "requests_per_minute",
                    "requests_per_second",
                    "max_concurrent",
                    "minute_seconds",
                    "second_seconds",
                    "cdc_max_days",
                    "cdc_max_objects",
                )
            },
        }

    # --- OAuth ------------------------------------------------------------------------------------------

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> dict[str, Any]:
        extras: dict[str, Any] = {"x_refresh_token_expires_in": REFRESH_TTL}
        if request_headers().get("x-include-refresh-token-hard-expires-in", "").lower() == "true":
            extras["x_refresh_token_hard_expires_in"] = max(0, REFRESH_HARD_TTL - (self.clock() - grant.created_at))
        return extras

    def _subject_for(self, params: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
        client_id = params.get("client_id", "")
        if client_id not in self.oauth.clients:
            raise OAuthError("invalid_client", "unknown client_id", 400)
        wanted = params.get("sandbox_tenant")
        if wanted:
            rt = self._runtime.get(wanted)
            if rt is None or rt.company.client_id != client_id:
                raise OAuthError("invalid_request", f"no company {wanted!r} for this app", 400)
            company = rt.company
        else:
            company = self._latest_company(client_id)
            if company is None:
                raise OAuthError("invalid_request", "the app has no QuickBooks company to connect", 400)
        return {"realm_id": company.realm_id}, {"realmId": company.realm_id}

    def _latest_company(self, client_id: str) -> QuickBooksCompany | None:
        mine = [rt for rt in self._runtime.values() if rt.company.client_id == client_id]
        return max(mine, key=lambda rt: rt.added).company if mine else None

    def _grant_realm(self, grant: Grant) -> str | None:
        subject = grant.subject
        realm = subject.get("realm_id") or subject.get("realmId")
        if realm:
            return str(realm)
        company = self._latest_company(grant.client_id)
        return company.realm_id if company else None

    async def _revoke(self, request: Request) -> Response:
        """``POST`` JSON ``{"token": ...}`` with the app's Basic credentials; revokes the whole connection."""
        try:
            client_id = self.oauth.authenticate_client({}, request.headers.get("authorization")).client_id
        except OAuthError as err:
            return json_response(err.status, err.body())
        raw = await request.body()
        token = None
        try:
            body = orjson.loads(raw) if raw else {}
            token = body.get("token") if isinstance(body, dict) else None
        except orjson.JSONDecodeError:
            token = dict(parse_qsl(raw.decode("utf-8", "replace"))).get("token")
        if not token:
            return json_response(400, {"error": "invalid_request", "error_description": "token is required"})
        self.oauth.revoke(str(token), client_id)
        return Response(b"", status_code=200)

    # --- API --------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """OAuth, API and control routes under ``/quickbooks/...`` and ``/_sandbox/quickbooks/...``."""
        api = f"{API_PREFIX}/v3/company/{{realm}}"
        control = CONTROL_PREFIX
        invoices = f"{control}/tenants/{{tenant}}/invoices"
        return [
            Route(AUTHORIZE_PATH, self.oauth.authorize_endpoint(self._subject_for), methods=["GET"]),
            Route(TOKEN_PATH, self.oauth.token_endpoint, methods=["POST"]),
            Route(REVOKE_PATH, self._revoke, methods=["POST"]),
            Route(f"{api}/query", self._api("query"), methods=["GET", "POST"]),
            Route(f"{api}/cdc", self._api("cdc"), methods=["GET"]),
            Route(f"{api}/invoice/{{oid}}", self._api("invoice"), methods=["GET"]),
            Route(f"{api}/customer/{{oid}}", self._api("customer"), methods=["GET"]),
            Route(f"{api}/companyinfo/{{oid}}", self._api("companyinfo"), methods=["GET"]),
            Route(f"{api}/{{rest:path}}", self._api(None), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            Route(f"{API_PREFIX}/{{rest:path}}", self._not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            *self.oauth.control_routes(control),
            Route(f"{control}/clients", self._control_clients, methods=["POST"]),
            Route(f"{control}/tenants", self._control_tenants, methods=["GET", "POST"]),
            Route(f"{control}/tenants/{{tenant}}", self._control_tenant, methods=["GET"]),
            Route(f"{control}/tenants/{{tenant}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{control}/tenants/{{tenant}}/records", self._control_add_record, methods=["POST"]),
            Route(f"{control}/tenants/{{tenant}}/records/{{oid}}", self._control_update_record, methods=["PATCH"]),
            Route(f"{control}/tenants/{{tenant}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{invoices}/merge", self._control_merge, methods=["POST"]),
            Route(f"{invoices}/{{oid}}/{{action}}", self._control_invoice_action, methods=["POST"]),
            *webhook_control_routes(control, self.webhooks, self._webhook_signer),
            Route(f"{control}/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route(f"{control}/stats", self._control_stats, methods=["GET"]),
        ]

    async def _not_found(self, request: Request) -> Response:
        self._count(f"{request.method} (unknown)", 404)
        return Response(b"Not Found", status_code=404, headers={"content-type": "text/plain", "intuit_tid": _tid()})

    def _count(self, route: str, status: int) -> None:
        self.stats["requests"] += 1
        self.by_route[route] += 1
        self.by_status[str(status)] += 1

    def _render(
        self, request: Request, status: int, payload: dict[str, Any], route: str, extra: Mapping[str, str] | None = None
    ) -> Response:
        self._count(route, status)
        headers = {"intuit_tid": _tid(), **(extra or {})}
        if _wants_json(request):
            self.formats["json"] += 1
            return Response(orjson.dumps(payload), status_code=status, headers={"content-type": _JSON_CT, **headers})
        self.formats["xml"] += 1
        return Response(to_xml(payload), status_code=status, headers={"content-type": _XML_CT, **headers})

    def _auth_fault(self, status: int, detail: str | None, route: str) -> Response:
        self._count(route, status)
        if status == 401:
            message, code, kind = (
                "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                "3200",
                "AUTHENTICATION",
            )
            extra = {"www-authenticate": 'Bearer realm="Intuit", error="invalid_token"'}
        else:
            message, code, kind = (
                "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                "3100",
                "SERVICE",
            )
            extra = {}
        body = {
            "warnings": None,
            "intuitObject": None,
            "fault": {"error": [{"message": message, "detail": detail, "code": code, "element": None}], "type": kind},
            "report": None,
            "queryResponse": None,
            "batchItemResponse": [],
            "attachableResponse": [],
            "syncErrorResponse": None,
            "requestId": None,
            "time": int(time.time() * 1000),
            "status": None,
            "cdcresponse": [],
        }
        return Response(
            orjson.dumps(body),
            status_code=status,
            headers={"content-type": "application/json", "intuit_tid": _tid(), **extra},
        )

    def _api(self, kind: str | None) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, kind)

        endpoint.__name__ = f"quickbooks_{kind or 'unsupported'}"
        return endpoint

    def _fault_for(self, realm: str) -> _Faults | None:
        for key in (realm, None):
            f = self._faults.get(key)
            if f is not None and (f.server_errors or f.rate_limited or f.day_limit_exhausted or f.latency_ms):
                return f
        return None

    async def _serve(self, request: Request, kind: str | None) -> Response:
        realm = request.path_params["realm"]
        oid = request.path_params.get("oid")
        route = f"{request.method} /v3/company/{{realmId}}/" + (
            f"{kind}/{{id}}" if oid is not None else (kind or "{unsupported}")
        )
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied as denied:
            detail = {
                "missing": "Authorization header is missing or is not a Bearer token",
                "invalid": "Malformed bearer token: too short or too long",
                "expired": "Token expired: "
                + (request.headers.get("authorization", "")[7:][:50] if denied.reason == "expired" else ""),
                "revoked": "Token revoked",
            }.get(denied.reason, denied.reason)
            return self._auth_fault(401, detail, route)
        rt = self._runtime.get(realm)
        faults = self._fault_for(realm)
        if faults is not None:
            if faults.server_errors > 0:
                faults.server_errors -= 1
                return self._error(request, _system_fault(faults.server_error_status), route, rt)
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                return self._error(request, _throttled(), route, rt)
            if faults.day_limit_exhausted:
                return self._error(request, _throttled(), route, rt)
        if rt is None or self._grant_realm(grant) != realm or grant.client_id != rt.company.client_id:
            return self._auth_fault(403, None, route)
        env = self.client_environments.get(grant.client_id)
        if env is not None and env != rt.company.environment:
            return self._auth_fault(403, None, route)
        spec = rt.company.spec
        now = time.monotonic()
        if (
            (spec["max_concurrent"] and rt.active >= spec["max_concurrent"])
            or not rt.minute.room(spec["requests_per_minute"], spec["minute_seconds"], now)
            or not rt.second.room(spec["requests_per_second"], spec["second_seconds"], now)
        ):
            rt.throttled += 1
            return self._error(request, _throttled(), route, rt)
        rt.minute.take(spec["requests_per_minute"])
        rt.second.take(spec["requests_per_second"])
        rt.requests += 1
        rt.active += 1
        rt.peak_concurrency = max(rt.peak_concurrency, rt.active)
        try:
            if faults is not None and faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            self._minor_version(request)
            company = rt.company
            payload = await self._dispatch(request, company, kind, oid)
            payload["time"] = company.response_time(self._now_precise())
            return self._render(request, 200, payload, route)
        except QueryError as err:
            return self._error(request, err, route, rt)
        finally:
            rt.active -= 1

    def _now_precise(self) -> float:
        now = self.clock()
        return now + (time.time() % 1.0)

    def _error(self, request: Request, err: QueryError, route: str, rt: _Runtime | None) -> Response:
        tz_company = rt.company if rt else None
        stamp = (
            tz_company.response_time(self._now_precise())
            if tz_company
            else dt.datetime.fromtimestamp(self._now_precise(), dt.UTC).isoformat(timespec="milliseconds")
        )
        return self._render(request, err.status, {"Fault": err.fault(), "time": stamp}, route)

    def _minor_version(self, request: Request) -> int:
        raw = request.query_params.get("minorversion")
        try:
            asked = int(raw) if raw is not None else MIN_MINOR_VERSION
        except ValueError:
            asked = MIN_MINOR_VERSION
        served = max(MIN_MINOR_VERSION, asked)
        self.minor_versions[str(served)] += 1
        return served

    async def _dispatch(
        self, request: Request, company: QuickBooksCompany, kind: str | None, oid: str | None
    ) -> dict[str, Any]:
        if kind == "query":
            sql = request.query_params.get("query")
            if request.method == "POST":
                body = (await request.body()).decode("utf-8", "replace")
                sql = body if body.strip() else sql
            return {"QueryResponse": company.query(parse_query(sql or ""))}
        if kind == "cdc":
            return {"CDCResponse": [{"QueryResponse": self._cdc(request, company)}]}
        if kind in ("invoice", "customer") and oid is not None:
            entity = "Invoice" if kind == "invoice" else "Customer"
            rec = company.table(entity).get(oid)
            if rec is None:
                raise _not_found()
            return {entity: rec}
        if kind == "companyinfo" and oid is not None:
            if oid != company.realm_id:
                raise _not_found()
            return {"CompanyInfo": company.company_info()}
        path = request.url.path[len(API_PREFIX) :]
        full = f"https://quickbooks.api.intuit.com{path}"
        raise _unsupported_operation(path, full)

    def _cdc(self, request: Request, company: QuickBooksCompany) -> list[dict[str, Any]]:
        raw_entities = request.query_params.get("entities", "")
        since_raw = request.query_params.get("changedSince", "")
        if not raw_entities:
            raise QueryError("2010", "Request has invalid or unsupported property", "Property Name:entities")
        if not since_raw:
            raise QueryError("2010", "Request has invalid or unsupported property", "Property Name:changedSince")
        entities: list[str] = []
        for name in raw_entities.split(","):
            canonical = _ENTITY_NAMES.get(name.strip().lower())
            if canonical is None or canonical in ("CompanyInfo", "TaxCode", "TaxRate", "TimeActivity"):
                raise QueryError(
                    "2010", "Request has invalid or unsupported property", f"Property Name:{name.strip()} for cdc"
                )
            if canonical not in entities:
                entities.append(canonical)
        try:
            since = _parse_when(since_raw, company.tz)
        except ValueError:
            raise QueryError(
                "2010", "Request has invalid or unsupported property", f"Property Name:changedSince {since_raw}"
            ) from None
        spec = company.spec
        if self.clock() - since > spec["cdc_max_days"] * _DAY:
            raise QueryError(
                "2010",
                "Request has invalid or unsupported property",
                f"Property Name:Operation cdc with changedSince date {since_raw} which is older than fixed days "
                "is not supported.",
            )
        return company.cdc(entities, since, spec["cdc_max_objects"])

    # --- control API ------------------------------------------------------------------------------------

    def _rt(self, tenant: str) -> _Runtime:
        return lookup(self._runtime, tenant, "tenant")

    async def _control_clients(self, request: Request) -> Response:
        async def handle(request: Request) -> dict[str, Any]:
            body = await read_json_object(request)
            client_id, secret = body.get("client_id"), body.get("client_secret")
            if not isinstance(client_id, str) or not client_id or not isinstance(secret, str):
                raise ControlError(400, "client_id and client_secret are required strings")
            environment = body.get("environment")
            if environment not in (None, "sandbox", "production"):
                raise ControlError(400, "environment must be sandbox or production")
            client = self.oauth.register_client(client_id, secret, tuple(body.get("redirect_uris") or ()))
            if environment is None:
                self.client_environments.pop(client_id, None)
            else:
                self.client_environments[client_id] = environment
            return {
                "client_id": client.client_id,
                "redirect_uris": list(client.redirect_uris),
                "environment": environment,
            }

        return await _control(handle)(request)

    async def _control_tenants(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            if request.method == "GET":
                return [self._summary(rt.company) for rt in self._runtime.values()]
            spec = self.normalise_spec(await read_json_object(request))
            started = time.perf_counter()
            now = self.clock()
            company = await run_in_threadpool(lambda: QuickBooksCompany(spec, now=now))
            self._install(company)
            return {**self._summary(company), "generation_seconds": round(time.perf_counter() - started, 3)}

        return await _control(handle)(request)

    async def _control_tenant(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            return self._summary(self._rt(request.path_params["tenant"]).company)

        return await _control(handle)(request)

    async def _control_changes(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            reject_unknown_fields(body, _CHANGE_FIELDS, "change")
            changes = {k: _int_field(body, k, 0) or 0 for k in _CHANGE_FIELDS}
            return company.apply_changes(changes, self.clock())

        return await _control(handle)(request)

    def _updated_at(self, body: Mapping[str, Any]) -> float:
        value = body.get("updated_at")
        if value is None:
            return float(self.clock())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ControlError(400, "updated_at must be unix seconds")
        return float(value)

    async def _control_add_record(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            entity = _entity_of(body.get("entity"))
            fields = body.get("fields") or {}
            if not isinstance(fields, dict):
                raise ControlError(400, "fields must be an object")
            lines = fields.get("Line")
            if isinstance(lines, list) and len(lines) > 750:
                raise ControlError(400, "an invoice holds at most 750 lines")
            return company.add_record(entity, fields, self._updated_at(body))

        return await _control(handle)(request)

    async def _control_update_record(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            oid = request.path_params["oid"]
            if body.get("entity") is not None:
                entity = _entity_of(body["entity"])
            else:
                entity = "Invoice" if oid in company.invoices else "Customer"
            if oid not in company.table(entity):
                raise ControlError(404, f"no {entity.lower()} {oid}")
            fields = body.get("fields") or {}
            if not isinstance(fields, dict):
                raise ControlError(400, "fields must be an object")
            return company.update_record(entity, oid, fields, self._updated_at(body))

        return await _control(handle)(request)

    async def _control_invoice_action(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            oid, action = request.path_params["oid"], request.path_params["action"]
            if action not in ("void", "delete"):
                raise ControlError(404, f"no invoice action {action!r} (void or delete)")
            if oid not in company.invoices:
                raise ControlError(404, f"no invoice {oid}")
            at = self._updated_at(await read_json_object(request))
            if action == "void":
                company.void_invoice(oid, at)
                return company.invoices[oid]
            company.delete_invoice(oid, at)
            return {"deleted": oid}

        return await _control(handle)(request)

    async def _control_merge(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            body = await read_json_object(request)
            reject_unknown_fields(body, ("from", "into", "updated_at"), "merge")
            source, target = body.get("from"), body.get("into")
            if not isinstance(source, str) or not isinstance(target, str):
                raise ControlError(400, "from and into must be invoice ids")
            try:
                merged = company.merge_invoices(source, target, self._updated_at(body))
            except LookupError as err:
                raise ControlError(404, str(err)) from None
            return {"merged": merged, "deleted_id": source}

        return await _control(handle)(request)

    async def _control_export(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            company = self._rt(request.path_params["tenant"]).company
            return company.export(_entity_of(request.path_params["entity"]))

        return await _control(handle)(request)

    async def _control_faults(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            if request.method == "DELETE":
                return clear_scoped_faults(self._faults, request.query_params.get("tenant"))
            body = await read_json_object(request)
            reject_unknown_fields(body, _FAULT_FIELDS, "fault")
            tenant = body.get("tenant")
            if tenant is not None:
                self._rt(str(tenant))
                tenant = str(tenant)
            f = self._faults.setdefault(tenant, _Faults())
            if "server_errors" in body:
                f.server_errors = _int_field(body, "server_errors", 0) or 0
            if "server_error_status" in body:
                status = body["server_error_status"]
                if status not in (500, 502, 503, 504):
                    raise ControlError(400, "server_error_status must be 500, 502, 503 or 504")
                f.server_error_status = status
            if "rate_limited" in body:
                f.rate_limited = _int_field(body, "rate_limited", 0) or 0
            if "day_limit_exhausted" in body:
                f.day_limit_exhausted = bool(body["day_limit_exhausted"])
            if "latency_ms" in body:
                f.latency_ms = number_field(body, "latency_ms", 0.0)
            return {"tenant": tenant, **f.as_dict()}

        return await _control(handle)(request)

    async def _control_stats(self, request: Request) -> Response:
        async def handle(request: Request) -> Any:
            return {
                "requests": self.stats["requests"],
                "by_route": dict(self.by_route),
                "by_status": dict(self.by_status),
                "minor_versions": dict(self.minor_versions),
                "formats": dict(self.formats),
                "tenants": {
                    realm: {
                        "requests": rt.requests,
                        "throttled": rt.throttled,
                        "peak_concurrency": rt.peak_concurrency,
                    }
                    for realm, rt in self._runtime.items()
                },
                "faults": {str(k): f.as_dict() for k, f in self._faults.items()},
                "oauth": self.oauth.control_state()["stats"],
            }

        return await _control(handle)(request)


class QuickBooksControl(WebhookControl):
    """Typed calls to the QuickBooks control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def add_client(
        self,
        client_id: str,
        client_secret: str,
        redirect_uris: Iterable[str] = (),
        environment: str | None = None,
    ) -> dict[str, Any]:
        """Register an app (``environment`` pins it to sandbox or production companies)."""
        body: dict[str, Any] = {"client_id": client_id, "client_secret": client_secret}
        body["redirect_uris"] = list(redirect_uris)
        if environment is not None:
            body["environment"] = environment
        return self._call("POST", "/clients", json=body)

    def add_tenant(self, client_id: str, **spec: Any) -> dict[str, Any]:
        """Create a company for an app; ``spec`` takes seed, invoices, customers, days and the knobs."""
        return self._call("POST", "/tenants", json={"client_id": client_id, **spec})

    def tenants(self) -> list[dict[str, Any]]:
        """Summaries of every company."""
        return self._call("GET", "/tenants")

    def grant(self, client_id: str, realm_id: str | None = None, scope: str = SCOPE_ACCOUNTING) -> dict[str, Any]:
        """Consent without the browser: ``{"grant_id", "token": {access_token, refresh_token, ...}}``."""
        subject = {"realm_id": realm_id} if realm_id else {}
        return self._call("POST", "/oauth/grants", json={"client_id": client_id, "scope": scope, "subject": subject})

    def revoke_grant(self, grant_id: str) -> dict[str, Any]:
        """The user disconnected the app."""
        return self._call("POST", f"/oauth/grants/{grant_id}/revoke")

    def expire_access(self, grant_id: str) -> dict[str, Any]:
        """Expire the grant's access tokens now."""
        return self._call("POST", f"/oauth/grants/{grant_id}/expire-access")

    def oauth_state(self) -> dict[str, Any]:
        """Token-call statistics and grants."""
        return self._call("GET", "/oauth")

    def changes(self, tenant: str, **counts: int) -> dict[str, list[str]]:
        """Apply edits, voids, deletes, creates, archives (and customer_edits, customer_creates) now."""
        return self._call("POST", f"/tenants/{tenant}/changes", json=counts)

    def add_record(
        self,
        tenant: str,
        entity: str,
        fields: Mapping[str, Any] | None = None,
        updated_at: float | None = None,
    ) -> dict[str, Any]:
        """Create an invoice or customer (at ``updated_at``) and return it as the API would."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant}/records", json=body)

    def update_record(
        self,
        tenant: str,
        record_id: str,
        fields: Mapping[str, Any] | None = None,
        updated_at: float | None = None,
        entity: str | None = None,
    ) -> dict[str, Any]:
        """Change a record (at ``updated_at``) and return it as the API would."""
        body: dict[str, Any] = {"fields": dict(fields or {})}
        if updated_at is not None:
            body["updated_at"] = updated_at
        if entity is not None:
            body["entity"] = entity
        return self._call("PATCH", f"/tenants/{tenant}/records/{record_id}", json=body)

    def export(self, tenant: str, entity: str) -> dict[str, Any]:
        """``{"records": [...], "deleted_ids": [...]}`` for ``invoice`` or ``customer``."""
        return self._call("GET", f"/tenants/{tenant}/export/{entity}")

    def void_invoice(self, tenant: str, invoice_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Void one invoice (at ``updated_at``); returns it as the API now shows it."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/invoices/{invoice_id}/void", json=body)

    def delete_invoice(self, tenant: str, invoice_id: str, updated_at: float | None = None) -> dict[str, Any]:
        """Hard-delete one invoice (at ``updated_at``)."""
        body = {} if updated_at is None else {"updated_at": updated_at}
        return self._call("POST", f"/tenants/{tenant}/invoices/{invoice_id}/delete", json=body)

    def merge_invoices(self, tenant: str, source: str, into: str, updated_at: float | None = None) -> dict[str, Any]:
        """Merge invoice ``source`` into ``into``: ``{"merged": <into as the API shows it>, "deleted_id": source}``."""
        body: dict[str, Any] = {"from": source, "into": into}
        if updated_at is not None:
            body["updated_at"] = updated_at
        return self._call("POST", f"/tenants/{tenant}/invoices/merge", json=body)

    def subscribe_webhooks(
        self,
        url: str,
        verifier_token: str,
        *,
        app: str | None = None,
        realm: str | None = None,
        format: str = "legacy",
        hold: bool = False,
        duplicate_rate: float = 0.0,
        retry_delays: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Deliver the events of an app's realms (or of one realm) to ``url``: ``{"id", "account", "url"}``."""
        body: dict[str, Any] = {"url": url, "verifier_token": verifier_token, "format": format, "hold": hold,
                                "duplicate_rate": duplicate_rate}  # fmt: skip
        body.update({k: v for k, v in (("app", app), ("realm", realm)) if v is not None})
        if retry_delays is not None:
            body["retry_delays"] = list(retry_delays)
        return self._call("POST", "/webhooks", json=body)

    def set_faults(self, tenant: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject server_errors, rate_limited, day_limit_exhausted, latency_ms (for one tenant or all)."""
        return self._set_faults("tenant", tenant, faults)

    def clear_faults(self, tenant: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one tenant, or all)."""
        return self._clear_faults("tenant", tenant)

    def stats(self) -> dict[str, Any]:
        """Request counts per route and status, per tenant, and the OAuth statistics."""
        return self._call("GET", "/stats")
