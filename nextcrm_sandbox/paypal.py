"""Local emulator of PayPal's REST APIs: OAuth client credentials, Transaction Search, Subscriptions and Plans.

The demo and the tests point the real PayPal client code at this module instead of PayPal, so it
reproduces what that code relies on: ``POST /v1/oauth2/token`` (HTTP Basic ``client_id:secret``,
``grant_type=client_credentials``; ``scope``, ``access_token``, ``token_type``, ``app_id``, ``expires_in``,
``nonce``; ``invalid_client`` for bad credentials; 401 for unknown or expired tokens), Transaction Search
``GET /v1/reporting/transactions`` (required RFC 3339 ``start_date``/``end_date``, a 31-day window, three
years of history, "Data for the given start date is not available." for starts after the last refresh,
rows visible only three hours after they happen, ``last_refreshed_datetime``, ``page``/``page_size`` up
to 500, ``total_items``/``total_pages``, ``RESULTSET_TOO_LARGE`` above 10,000 rows with ``total_items`` and
``maximum_items``, ``balance_affecting_records_only``, ``fields``, the optional filters, rows sharing a
``transaction_id``, decimal-string money, ``ending_balance`` left out when a filter is set), Subscriptions
(``GET /v1/billing/subscriptions/{id}``, ``/{id}/transactions``, the list endpoint behind a knob) and
Plans (``GET /v1/billing/plans`` with ``page_size`` up to 20, ``GET /v1/billing/plans/{id}``), PayPal's
error envelope ``{name, message, debug_id, details[], links[]}`` with a ``Paypal-Debug-Id`` header, and
429 ``RATE_LIMIT_REACHED`` with ``Retry-After``.

Both PayPal hosts (``api-m.paypal.com`` and ``api-m.sandbox.paypal.com``) are served under
``/paypal/api``. An account is one merchant's REST app: its client credentials, its merchant account
number and its data, generated deterministically from a seed. Transaction Search lists rows in ascending
``transaction_initiation_date`` order (rows of the same second in the order PayPal recorded them) and
filters on that date. The control API under ``/_sandbox/paypal`` creates accounts, applies changes on the
sandbox clock, adds single records or a whole busy day, exports data, injects faults and reports
statistics.

Payments and webhooks: Checkout captures (code T0006) are read and refunded through Payments v2
(``GET /v2/payments/captures/{id}``, ``POST …/refund`` with ``PayPal-Request-Id`` replay), subscription
sales (T0002) through ``GET /v1/payments/sale/{id}``; subscriptions are suspended, activated and cancelled
through ``POST /v1/billing/subscriptions/{id}/{action}``. Each change made through the API or the control
API is announced to the app's webhooks (``POST /v1/notifications/webhooks`` or ``POST
/_sandbox/paypal/webhooks`` with ``account`` and ``webhook_id``) as PayPal's events (``PAYMENT.CAPTURE.*``,
``PAYMENT.SALE.*``, ``BILLING.SUBSCRIPTION.*``), delivered with PayPal's retries (25 over three days) and
signed as PayPal signs them: SHA256withRSA over ``transmission_id|transmission_time|webhook_id|crc32``,
by a certificate for ``messageverificationcerts.sandbox.paypal.com`` served at
``/v1/notifications/certs/<name>`` and issued by the sandbox's own CA (``GET /_sandbox/paypal/webhook-ca``,
the trust root a sandbox connection is configured with). ``POST /v1/notifications/verify-webhook-signature``
checks a delivery as PayPal does, over the event serialised again; the events are listed and resent under
``/v1/notifications/webhooks-events``. For tests, ``/_sandbox/paypal/webhook-certs`` mints expired,
misnamed or untrusted certificates and ``/_sandbox/paypal/webhook-signatures`` signs any body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import datetime as dt
import hashlib
import math
import random
import re
import secrets
import threading
import time
import uuid
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
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
from nextcrm_sandbox.oauth import AccessDenied, Grant, OAuthError, OAuthPolicy, OAuthServer, json_response
from nextcrm_sandbox.webhooks import Signer, WebhookControl, WebhookOutbox, webhook_control_routes

__all__ = [
    "API_PREFIX",
    "AUTH_ALGO",
    "CONTROL_PREFIX",
    "DEFAULT_KNOBS",
    "MESSAGE_CERT_CN",
    "SCOPE_REPORTING",
    "SCOPE_SUBSCRIPTIONS",
    "SCOPE_VERIFY_WEBHOOKS",
    "TOKEN_PATH",
    "WEBHOOK_RETRY_DELAYS",
    "MessageCerts",
    "PayPalAccount",
    "PayPalControl",
    "PayPalError",
    "PayPalSandbox",
    "signed_message",
]

PREFIX = "/paypal"
API_PREFIX = f"{PREFIX}/api"
CONTROL_PREFIX = "/_sandbox/paypal"
TOKEN_PATH = f"{API_PREFIX}/v1/oauth2/token"
TERMINATE_PATH = f"{API_PREFIX}/v1/oauth2/token/terminate"

SCOPE_REPORTING = "https://uri.paypal.com/services/reporting/search/read"
SCOPE_SUBSCRIPTIONS = "https://uri.paypal.com/services/subscriptions"
SCOPE_PAYMENTS = "https://uri.paypal.com/services/payments/payment/authcapture"
SCOPE_REFUNDS = "https://uri.paypal.com/services/payments/refund"
SCOPE_WEBHOOKS = "https://uri.paypal.com/services/applications/webhooks"
SCOPE_VERIFY_WEBHOOKS = "https://uri.paypal.com/services/applications/verify-webhook-signature"
AUTH_ALGO = "SHA256withRSA"
MESSAGE_CERT_CN = "messageverificationcerts.sandbox.paypal.com"


def _retry_delays() -> tuple[float, ...]:
    """PayPal retries a failed delivery up to 25 times over 3 days; it publishes no spacing, so: doubling
    from a minute for nine retries, then equal gaps to fill the three days."""
    first = [60.0 * 2**i for i in range(9)]
    rest = (3 * 86_400 - sum(first)) / 16
    return (*first, *([rest] * 16))


WEBHOOK_RETRY_DELAYS = _retry_delays()
EVENTS_KEPT = 10_000  # per app, for GET /v1/notifications/webhooks-events and resend
DEFAULT_SCOPES = (
    "https://uri.paypal.com/services/invoicing",
    "https://uri.paypal.com/services/vault/payment-tokens/read",
    "https://uri.paypal.com/services/disputes/read-buyer",
    "https://uri.paypal.com/services/payments/realtimepayment",
    "https://uri.paypal.com/services/disputes/update-seller",
    SCOPE_PAYMENTS,
    "openid",
    "https://uri.paypal.com/services/disputes/read-seller",
    SCOPE_REFUNDS,
    "https://api-m.paypal.com/v1/payments/.*",
    "https://uri.paypal.com/payments/payouts",
    "https://uri.paypal.com/services/vault/payment-tokens/readwrite",
    SCOPE_SUBSCRIPTIONS,
    SCOPE_WEBHOOKS,
    SCOPE_REPORTING,
    SCOPE_VERIFY_WEBHOOKS,
)

# Knobs of an account, with their defaults (facts PayPal leaves undocumented are knobs too).
DEFAULT_KNOBS: dict[str, Any] = {
    "result_cap": 10_000,  # RESULTSET_TOO_LARGE above this many matching rows
    "visibility_lag_seconds": 10_800,  # a row reaches Transaction Search this long after it happens
    "refresh_interval_seconds": 0,  # 0: continuous; N: data refreshed in N-second batches (last refresh ends :59:59)
    "max_window_days": 31,
    "history_years": 3,
    "min_start_age_seconds": None,  # None: a start is refused only after last_refreshed_datetime (36 h: 129600)
    "page_size_max": 500,
    "token_ttl": 32_400,
    "requests_per_minute": 50,  # per app, token calls included; 0 = unlimited
    "minute_seconds": 60.0,  # length of the rate-limit window
    "list_subscriptions": False,  # GET /v1/billing/subscriptions (limited release)
    "expired_token_error": "invalid_token",  # or AUTHENTICATION_FAILURE
    "date_style": "Z",  # Transaction Search times: "Z" (2025-03-01T15:40:49Z) or "+0000"
    "scopes": list(DEFAULT_SCOPES),
}

_DAY = 86_400
_EMPTY: dict[str, Any] = {}  # shared empty section (never mutated)
_JSON_CT = "application/json"
_INFO_LINK = "https://developer.paypal.com/docs/api/overview/#error"
_DECIMALS = {"JPY": 0, "HUF": 0, "TWD": 0}
_FIXED_FEE = {"USD": 49, "EUR": 39, "GBP": 30, "CAD": 59, "AUD": 30, "JPY": 40, "HUF": 90, "TWD": 10}
_PRICE_FACTOR = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CAD": 1.36, "AUD": 1.52, "JPY": 1.5, "HUF": 3.6, "TWD": 0.32}
_PAYER_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXY"
_SALE_CODES = ("T0006", "T0006", "T0006", "T0006", "T0006", "T0007", "T0007", "T0005", "T0003", "T0011", "T0013")
_SUBJECTS = {
    "T0006": "PayPal Checkout payment",
    "T0007": "Website payment",
    "T0005": "Card payment",
    "T0003": "Pre-approved payment",
    "T0011": "In-store payment",
    "T0013": "Donation",
    "T0002": "Subscription payment",
}
_STATUS_OF_CAPTURE = {"S": "COMPLETED", "P": "PENDING", "V": "REFUNDED", "F": "PARTIALLY_REFUNDED", "D": "DECLINED"}
_STATE_OF_SALE = {"S": "completed", "P": "pending", "V": "refunded", "F": "partially_refunded", "D": "denied"}
# Webhooks announce Checkout captures (Transaction Search code T0006, "PayPal Checkout APIs") and subscription
# sales (T0002); the other codes are classic products that notify by IPN, not REST webhooks.
_PAYMENT_EVENTS = {"T0006": ("PAYMENT.CAPTURE", "capture"), "T0002": ("PAYMENT.SALE", "sale")}
_SUBSCRIPTION_EVENTS = {
    "ACTIVE": "BILLING.SUBSCRIPTION.ACTIVATED",
    "SUSPENDED": "BILLING.SUBSCRIPTION.SUSPENDED",
    "CANCELLED": "BILLING.SUBSCRIPTION.CANCELLED",
    "EXPIRED": "BILLING.SUBSCRIPTION.EXPIRED",
}
# action -> (statuses it applies to, the status it sets, the event it sends)
_SUBSCRIPTION_ACTIONS = {
    "suspend": (frozenset({"ACTIVE"}), "SUSPENDED", "BILLING.SUBSCRIPTION.SUSPENDED"),
    "activate": (frozenset({"SUSPENDED", "APPROVED"}), "ACTIVE", "BILLING.SUBSCRIPTION.ACTIVATED"),
    "cancel": (frozenset({"ACTIVE", "SUSPENDED", "APPROVED"}), "CANCELLED", "BILLING.SUBSCRIPTION.CANCELLED"),
}
# Transaction Search protection_eligibility (01 eligible, 02 not eligible, 03 partially) as a capture shows it.
_PROTECTION: dict[str | None, dict[str, Any]] = {
    "01": {"status": "ELIGIBLE", "dispute_categories": ["ITEM_NOT_RECEIVED", "UNAUTHORIZED_TRANSACTION"]},
    "02": {"status": "NOT_ELIGIBLE"},
    "03": {"status": "PARTIALLY_ELIGIBLE", "dispute_categories": ["ITEM_NOT_RECEIVED"]},
}
_INSTRUMENTS = (
    ("PAYPAL", "PayPal", "PayPal Wallet"),
    ("PAYPAL", "PayPal", "PayPal Wallet"),
    ("PAYPAL", "PayPal", "PayPal Wallet"),
    ("CREDITCARD", "CreditCard", "VISA"),
    ("CREDITCARD", "CreditCard", "MASTERCARD"),
    ("DEBITCARD", "DebitCard", "VISA"),
)
_GIVEN_TEXT = "Ruth Amy Bill Cathy Dylan Grace Jeff John Kate Mark Lena Omar Priya Sofia Tom Yuki Hana Luca Mia Noah"
_GIVEN = tuple(_GIVEN_TEXT.split())
_SURNAMES_TEXT = (
    "Smith Lee Chin Rosa Pariente Melton Whelan Cho Medina Okafor Novak Tanaka Schmidt Dubois Rossi Kowalski"
)
_SURNAMES = tuple(_SURNAMES_TEXT.split())
_PLACES = (
    ("US", "San Jose", "CA", "95131"),
    ("US", "Austin", "TX", "73301"),
    ("US", "Chicago", "IL", "60601"),
    ("US", "Portland", "OR", "97201"),
    ("US", "Boston", "MA", "02108"),
    ("GB", "London", "", "EC1A 1BB"),
    ("DE", "Berlin", "", "10115"),
    ("CA", "Toronto", "ON", "M5H 2N2"),
    ("AU", "Sydney", "NSW", "2000"),
    ("FR", "Paris", "", "75001"),
    ("JP", "Tokyo", "", "100-0001"),
)
_STREETS = ("N First Street", "Main Street", "Market Street", "High Street", "Oak Avenue", "Harbour Road")
_ITEMS = (
    ("SKU-100", "Coffee beans 1kg", 2450),
    ("SKU-101", "Espresso cups, set of 4", 3200),
    ("SKU-102", "Pour-over kettle", 5900),
    ("SKU-103", "Barista course", 12900),
    ("SKU-104", "Gift card", 5000),
    ("SKU-105", "Grinder", 18900),
    ("SKU-106", "Filter papers", 650),
    ("SKU-107", "Travel mug", 1999),
)
_PLAN_NAMES = ("Basic", "Standard", "Pro", "Team", "Enterprise", "Starter", "Plus", "Premium")
_PLAN_PRICES = (500, 900, 1500, 2900, 4900, 9900)
_INTERVALS = ("MONTH", "MONTH", "MONTH", "MONTH", "WEEK", "YEAR")
_SUB_STATUSES = (
    ("ACTIVE", 0.60),
    ("CANCELLED", 0.15),
    ("SUSPENDED", 0.08),
    ("EXPIRED", 0.07),
    ("APPROVAL_PENDING", 0.05),
    ("APPROVED", 0.05),
)
_OPTIONAL_FILTERS = (
    "transaction_id",
    "transaction_type",
    "transaction_status",
    "transaction_amount",
    "transaction_currency",
    "payment_instrument_type",
    "store_id",
    "terminal_id",
)
_SECTIONS = (
    "transaction_info",
    "payer_info",
    "shipping_info",
    "cart_info",
    "store_info",
    "auction_info",
    "incentive_info",
)
_AFTER_BALANCE = frozenset(
    {"invoice_id", "custom_field", "protection_eligibility", "instrument_type", "instrument_sub_type"}
)
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$")
_AMOUNT_RE = re.compile(r"^\[\s*(-?\d+)\s+TO\s+(-?\d+)\s*\]$")


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class PayPalError(Exception):
    """A PayPal error answer: ``{name, message, debug_id, details[], links[]}`` plus any extra fields."""

    def __init__(
        self,
        status: int,
        name: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        link: str | None = _INFO_LINK,
    ) -> None:
        super().__init__(f"{status} {name}: {message}")
        self.status = status
        self.name = name
        self.message = message
        self.details = [dict(d) for d in details]
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        self.link = link

    def body(self, debug_id: str) -> dict[str, Any]:
        """The JSON body PayPal sends."""
        out: dict[str, Any] = {"name": self.name, "message": self.message, "debug_id": debug_id}
        out["details"] = self.details
        out.update(self.extra)
        out["links"] = [{"href": self.link, "rel": "information_link", "method": "GET"}] if self.link else []
        return out


def _bad_request(field_name: str, value: str | None, issue: str) -> PayPalError:
    """Transaction Search's validation answer (``Invalid request - see details.``)."""
    detail = {"field": field_name, "value": value or "", "location": "query", "issue": issue}
    return PayPalError(400, "INVALID_REQUEST", "Invalid request - see details.", [detail])


def _schema_error(field_name: str, value: str | None, issue: str, description: str) -> PayPalError:
    """The Subscriptions API's validation answer (issue codes such as ``INVALID_PARAMETER_VALUE``)."""
    detail: dict[str, Any] = {"field": field_name, "location": "query", "issue": issue, "description": description}
    if value is not None:
        detail["value"] = value
    return PayPalError(
        400,
        "INVALID_REQUEST",
        "Request is not well-formed, syntactically incorrect, or violates schema.",
        [detail],
        link=f"https://developer.paypal.com/docs/api/v1/billing/subscriptions#{issue}",
    )


def _not_available(value: str | None = None) -> PayPalError:
    details = []
    if value is not None:
        details = [
            {
                "field": "start_date",
                "value": value,
                "location": "query",
                "issue": "Data for the given start date is not available.",
            }
        ]
        return PayPalError(
            400,
            "INVALID_REQUEST",
            "Request is not well-formed, syntactically incorrect, or violates schema.",
            details,
        )
    return PayPalError(400, "INVALID_REQUEST", "Data for the given start date is not available.", [], link=None)


def _not_found(resource: str) -> PayPalError:
    return PayPalError(
        404,
        "RESOURCE_NOT_FOUND",
        "The specified resource does not exist.",
        [{"issue": "INVALID_RESOURCE_ID", "description": "Requested resource ID was not found."}],
        link=f"https://developer.paypal.com/docs/api/v1/billing/{resource}#RESOURCE_NOT_FOUND",
    )


def _auth_failure() -> PayPalError:
    return PayPalError(
        401,
        "AUTHENTICATION_FAILURE",
        "Authentication failed due to invalid authentication credentials or a missing Authorization header.",
    )


def _not_authorized() -> PayPalError:
    return PayPalError(
        403,
        "NOT_AUTHORIZED",
        "Authorization failed due to insufficient permissions.",
        [
            {
                "issue": "PERMISSION_DENIED",
                "description": "You do not have permission to access or perform operations on this resource.",
            }
        ],
    )


def _rate_limited(retry_after: int) -> PayPalError:
    return PayPalError(
        429,
        "RATE_LIMIT_REACHED",
        "Too many requests. Blocked due to rate limiting.",
        headers={"retry-after": str(max(1, retry_after))},
        link="https://developer.paypal.com/api/rest/reference/rate-limiting/",
    )


def _server_error(status: int) -> PayPalError:
    if status == 503:
        return PayPalError(503, "SERVICE_UNAVAILABLE", "Service Unavailable.")
    return PayPalError(status, "INTERNAL_SERVER_ERROR", "An internal server error occurred.")


def _debug_id() -> str:
    return secrets.token_hex(7)[:13]


def _payment_not_found(resource: str) -> PayPalError:
    return PayPalError(
        404,
        "RESOURCE_NOT_FOUND",
        "The specified resource does not exist.",
        [{"issue": "INVALID_RESOURCE_ID", "description": "Specified resource ID does not exist. Please check the "
                                                          "resource ID and try again."}],
        link=f"https://developer.paypal.com/docs/api/payments/v2/#{resource}",
    )  # fmt: skip


def _unprocessable(issue: str, description: str) -> PayPalError:
    return PayPalError(
        422,
        "UNPROCESSABLE_ENTITY",
        "The requested action could not be performed, semantically incorrect, or failed business validation.",
        [{"issue": issue, "description": description}],
        link=f"https://developer.paypal.com/docs/api/payments/v2/#error-{issue}",
    )


def _random_id(length: int) -> str:
    """A fresh PayPal-looking id (webhooks, events)."""
    return "".join(secrets.choice(_PAYER_ALPHABET) for _ in range(length))


def _derived_id(prefix: str, seed: str) -> str:
    """A stable PayPal-looking id derived from another (an order of a capture, a v1 payment of a sale)."""
    digest = hashlib.sha256(f"{prefix}:{seed}".encode()).digest()
    text = "".join(_PAYER_ALPHABET[b % len(_PAYER_ALPHABET)] for b in digest[:17])
    return f"{prefix}{text}" if prefix.endswith("-") else text


# ---------------------------------------------------------------------------------------------------------
# Time and money
# ---------------------------------------------------------------------------------------------------------


def stamp(ts: float, style: str = "Z") -> str:
    """RFC 3339 UTC time in whole seconds: ``2025-03-01T15:40:49Z`` (or ``...+0000`` with style ``+0000``)."""
    t = time.gmtime(math.floor(ts))
    text = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return text + ("Z" if style == "Z" else "+0000")


def parse_time(text: str) -> float:
    """An RFC 3339 time with seconds and an offset (``Z``, ``+02:00`` or PayPal's ``-0700``) as unix seconds."""
    m = _DATE_RE.match(text.strip())
    if m is None:
        raise ValueError(text)
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = float(m.group(7)) if m.group(7) else 0.0
    second = min(second, 59)
    base = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()
    if m.group(8):
        return base + frac
    sign = -1 if m.group(9) == "-" else 1
    offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
    return base + frac - sign * offset


def _money_text(minor: int, currency: str) -> str:
    decimals = _DECIMALS.get(currency, 2)
    if decimals == 0:
        return str(minor)
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 100)
    return f"{sign}{whole}.{frac:02d}"


_MONEY_CACHE: dict[tuple[int, str], dict[str, str]] = {}


def _money(minor: int, currency: str) -> dict[str, str]:
    """``{"currency_code", "value"}``; common amounts share one (never mutated) object."""
    key = (minor, currency)
    found = _MONEY_CACHE.get(key)
    if found is None:
        found = {"currency_code": currency, "value": _money_text(minor, currency)}
        if len(_MONEY_CACHE) < 200_000:
            _MONEY_CACHE[key] = found
    return found


def _price(base_cents: int, currency: str) -> int:
    """A price given in US cents, in minor units of ``currency`` (yen prices are whole yen)."""
    return max(1, round(base_cents * _PRICE_FACTOR.get(currency, 1.0)))


def _fee(amount: int, currency: str) -> int:
    """PayPal's standard fee on a received payment (negative minor units)."""
    return -((abs(amount) * 349 + 5000) // 10000 + _FIXED_FEE.get(currency, 30))


def _add_interval(ts: float, unit: str, count: int = 1) -> float:
    if unit == "DAY":
        return ts + count * _DAY
    if unit == "WEEK":
        return ts + count * 7 * _DAY
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    months = count * (12 if unit == "YEAR" else 1)
    year, month0 = divmod(d.month - 1 + months, 12)
    year += d.year
    day = min(d.day, calendar.monthrange(year, month0 + 1)[1])
    return d.replace(year=year, month=month0 + 1, day=day).timestamp()


def _years_before(ts: float, years: int) -> float:
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    try:
        return d.replace(year=d.year - years).timestamp()
    except ValueError:
        return d.replace(year=d.year - years, day=28).timestamp()


# ---------------------------------------------------------------------------------------------------------
# Generated data
# ---------------------------------------------------------------------------------------------------------


class _Rng(random.Random):
    """``random.Random`` with cheap picks and PayPal-shaped identifiers."""

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def between(self, start: int, stop: int) -> int:
        return start + int(self.random() * (stop - start))

    def chars(self, alphabet: str, n: int) -> str:
        return "".join(self.choices(alphabet, k=n))

    def txn_id(self) -> str:
        """17 characters, mostly digits with a few letters, like ``25B16188FF732802U``."""
        bits = self.getrandbits(90)
        digits = f"{bits % 10**17:017d}"
        bits //= 10**17
        chars = list(digits)
        for _ in range(1 + bits % 4):
            bits //= 4
            chars[bits % 17] = _LETTERS[(bits // 17) % len(_LETTERS)]
            bits //= 17 * len(_LETTERS)
        return "".join(chars)

    def account_id(self) -> str:
        return self.chars(_PAYER_ALPHABET, 13)


@dataclass(slots=True, eq=False)
class _Txn:
    """One Transaction Search row; ``infos`` holds its ``transaction_info`` versions as (time, info)."""

    time: int
    seq: int
    txn_id: str
    code: str
    balance: bool
    currency: str
    amount: int
    fee: int
    instrument: str
    infos: list[tuple[int, dict[str, Any]]]
    sections: dict[str, dict[str, Any]]
    subscription: str | None = None
    payer_name: dict[str, str] | None = None
    payer_email: str | None = None
    ending: int = 0
    available: int = 0

    @property
    def status(self) -> str:
        return self.infos[-1][1]["transaction_status"]

    def info_at(self, cutoff: float | None) -> dict[str, Any]:
        """The ``transaction_info`` as Transaction Search shows it when its data ends at ``cutoff``."""
        if cutoff is None or len(self.infos) == 1:
            return self.infos[-1][1]
        for when, info in reversed(self.infos):
            if when <= cutoff:
                return info
        return self.infos[0][1]


@dataclass(slots=True)
class _Payer:
    account_id: str
    given: str
    surname: str
    email: str
    phone: str
    place: tuple[str, str, str, str]
    street: str
    payer_status: str
    address_status: str
    payer_info: dict[str, Any] = field(default_factory=dict)
    shipping_info: dict[str, Any] = field(default_factory=dict)
    name: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        country, city, state, postal = self.place
        address: dict[str, Any] = {"line1": self.street, "city": city}
        if state:
            address["state"] = state
        address.update({"country_code": country, "postal_code": postal})
        self.payer_info = {
            "account_id": self.account_id,
            "email_address": self.email,
            "phone_number": {"country_code": "1", "national_number": self.phone},
            "address_status": self.address_status,
            "payer_status": self.payer_status,
            "payer_name": {
                "given_name": self.given,
                "surname": self.surname,
                "alternate_full_name": f"{self.given} {self.surname}",
            },
            "country_code": country,
        }
        self.shipping_info = {"name": f"{self.given}, {self.surname}", "address": address}
        self.name = {"given_name": self.given, "surname": self.surname}


class PayPalAccount:
    """One merchant's REST app: credentials, knobs, transactions, subscriptions and plans."""

    def __init__(self, spec: Mapping[str, Any], *, now: int) -> None:
        self.spec = dict(spec)
        self.id: str = spec["id"]
        self.client_id: str = spec["client_id"]
        self.client_secret: str = spec["client_secret"]
        self.app_id: str = spec["app_id"]
        self.seed: int = spec["seed"]
        self.knobs: dict[str, Any] = dict(spec["knobs"])
        self.currencies: list[str] = list(spec["currencies"])
        self.created_at = now
        self.rows: list[_Txn] = []
        self.times: list[int] = []
        self.plans: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.sub_meta: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._balances_dirty = True
        self._invoice = 1000
        self.lock = threading.RLock()
        self.by_txn: dict[str, _Txn] = {}  # balance-affecting rows by transaction id (captures, sales, refunds)
        self.refunded: dict[str, int] = {}  # minor units refunded so far, by the refunded row's transaction id
        self.refund_requests: dict[str, tuple[str, dict[str, Any]]] = {}  # PayPal-Request-Id -> (capture, refund)
        # Told of each change webhooks announce: (event type, resource type, resource builder taking the API base).
        self.on_event: Callable[[str, str, Callable[[str], dict[str, Any]]], None] | None = None
        self._rng = _Rng(f"paypal-changes:{self.client_id}:{self.seed}")
        rng = _Rng(f"paypal:{self.client_id}:{self.seed}")
        self.payers = [self._new_payer(rng) for _ in range(max(20, min(2000, spec["transactions"] // 5)))]
        self._generate(rng, now)

    # --- generation -------------------------------------------------------------------------------------

    @staticmethod
    def _new_payer(rng: _Rng) -> _Payer:
        given, surname = rng.pick(_GIVEN), rng.pick(_SURNAMES)
        account = rng.account_id()
        return _Payer(
            account_id=account,
            given=given,
            surname=surname,
            email=f"{given.lower()}.{surname.lower()}.{account[:4].lower()}@example.com",
            phone=f"{rng.between(200, 999)}{rng.between(1000000, 9999999)}",
            place=rng.pick(_PLACES),
            street=f"{rng.between(1, 9999)} {rng.pick(_STREETS)}",
            payer_status=rng.pick(("Y", "Y", "N")),
            address_status=rng.pick(("Y", "N")),
        )

    def _currency(self, rng: _Rng) -> str:
        if len(self.currencies) == 1 or rng.random() < 0.6:
            return self.currencies[0]
        return rng.pick(self.currencies[1:])

    def _generate(self, rng: _Rng, now: int) -> None:
        spec = self.spec
        span = max(1.0, spec["days"] * _DAY)
        start = now - span
        for _ in range(spec["plans"]):
            self._new_plan(rng, start + rng.random() * span * 0.2)
        plan_ids = list(self.plans)
        budget = spec["transactions"]
        sub_created = sorted(start + rng.random() * span for _ in range(spec["subscriptions"]))
        for created in sub_created:
            sid = self._new_subscription(rng, rng.pick(plan_ids), int(created), now)
            budget -= self._history(rng, sid, now, budget)
        times = sorted(int(start + rng.random() * span) for _ in range(max(0, budget)))
        made = 0
        new_rows: list[_Txn] = []
        for t in times:
            if made >= budget:
                break
            roll = rng.random()
            if roll < 0.02:
                new_rows.append(self._withdrawal(rng, t))
                made += 1
                continue
            sale = self._sale(rng, t)
            new_rows.append(sale)
            made += 1
            if made < budget and sale.code in ("T0006", "T0005") and rng.random() < 0.06:
                new_rows.append(self._authorization(sale))
                made += 1
            if made < budget and sale.status == "S" and rng.random() < 0.07:
                when = int(t + rng.random() * (now - t))
                partial = rng.random() < 0.3
                new_rows.append(self._refund(rng, sale, when, partial=partial))
                made += 1
        self._insert(new_rows)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _new_plan(self, rng: _Rng, created: float, fields: Mapping[str, Any] | None = None) -> str:
        pid = "P-" + rng.chars(_PAYER_ALPHABET, 24)
        currency = self._currency(rng)
        unit = rng.pick(_INTERVALS)
        price = _price(rng.pick(_PLAN_PRICES) * (10 if unit == "YEAR" else 1), currency)
        when = stamp(created)
        cycles: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            cycles.append(
                {
                    "frequency": {"interval_unit": unit, "interval_count": 1},
                    "tenure_type": "TRIAL",
                    "sequence": 1,
                    "total_cycles": 1,
                }
            )
        cycles.append(
            {
                "pricing_scheme": {
                    "version": 1,
                    "fixed_price": _money(price, currency),
                    "create_time": when,
                    "update_time": when,
                },
                "frequency": {"interval_unit": unit, "interval_count": 1},
                "tenure_type": "REGULAR",
                "sequence": len(cycles) + 1,
                "total_cycles": rng.pick((0, 0, 0, 12, 24)),
            }
        )
        name = f"{rng.pick(_PLAN_NAMES)} {unit.lower()}ly plan".replace("dayly", "daily")
        plan: dict[str, Any] = {
            "id": pid,
            "product_id": "PROD-" + rng.chars(_PAYER_ALPHABET, 17),
            "name": name,
            "status": "ACTIVE" if rng.random() < 0.85 else rng.pick(("INACTIVE", "CREATED")),
            "description": f"{name} ({currency})",
            "usage_type": "LICENSED",
            "billing_cycles": cycles,
            "payment_preferences": {
                "auto_bill_outstanding": True,
                "setup_fee": _money(0, currency),
                "setup_fee_failure_action": "CONTINUE",
                "payment_failure_threshold": 3,
            },
            "taxes": {"percentage": rng.pick(("0", "10", "20")), "inclusive": False},
            "quantity_supported": False,
            "create_time": when,
            "update_time": when,
        }
        for key, value in (fields or {}).items():
            if key not in ("id", "links"):
                plan[key] = value
        self.plans[pid] = plan
        return pid

    def _regular_cycle(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        return next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")

    def _new_subscription(self, rng: _Rng, plan_id: str, created: int, now: int, status: str | None = None) -> str:
        plan = self.plans[plan_id]
        sid = "I-" + rng.chars(_PAYER_ALPHABET, 12)
        payer = rng.pick(self.payers)
        regular = self._regular_cycle(plan)
        currency = regular["pricing_scheme"]["fixed_price"]["currency_code"]
        if status is None:
            roll, acc = rng.random(), 0.0
            status = "ACTIVE"
            for name, share in _SUB_STATUSES:
                acc += share
                if roll < acc:
                    status = name
                    break
        start_time = created + rng.between(60, 3600)
        country, city, state, postal = payer.place
        address: dict[str, Any] = {"address_line_1": payer.street, "admin_area_2": city}
        if state:
            address["admin_area_1"] = state
        address.update({"postal_code": postal, "country_code": country})
        sub: dict[str, Any] = {
            "status": status,
            "status_update_time": stamp(created),
            "id": sid,
            "plan_id": plan_id,
            "start_time": stamp(start_time),
            "quantity": "1",
            "shipping_amount": _money(0, currency),
            "subscriber": {
                "email_address": payer.email,
                "payer_id": payer.account_id,
                "name": {"given_name": payer.given, "surname": payer.surname},
                "shipping_address": {
                    "name": {"full_name": f"{payer.given} {payer.surname}"},
                    "address": address,
                },
            },
            "billing_info": {
                "outstanding_balance": _money(0, currency),
                "cycle_executions": [
                    {
                        "tenure_type": c["tenure_type"],
                        "sequence": c["sequence"],
                        "cycles_completed": 0,
                        "cycles_remaining": c.get("total_cycles", 1),
                        "current_pricing_scheme_version": 1,
                        "total_cycles": c.get("total_cycles", 1),
                    }
                    for c in plan["billing_cycles"]
                ],
                "failed_payments_count": 0,
            },
            "create_time": stamp(created),
            "update_time": stamp(created),
            "plan_overridden": False,
        }
        if rng.random() < 0.5:
            sub["custom_id"] = f"cust-{rng.between(10000, 99999)}"
        self.subscriptions[sid] = sub
        self.sub_meta[sid] = {
            "payer": payer,
            "created": created,
            "start": start_time,
            "updated": created,
            "status_time": created,
            "payments": [],
            "currency": currency,
            "price": _minor(regular["pricing_scheme"]["fixed_price"]["value"], currency),
            "unit": regular["frequency"]["interval_unit"],
            "trial": plan["billing_cycles"][0]["tenure_type"] == "TRIAL",
        }
        return sid

    def _history(self, rng: _Rng, sid: str, now: int, budget: int) -> int:
        """Payments and status changes of a generated subscription up to ``now``; returns rows made."""
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        status = sub["status"]
        if status in ("APPROVAL_PENDING", "APPROVED"):
            return 0
        end = now
        if status != "ACTIVE":
            end = int(meta["start"] + rng.random() * (now - meta["start"]))
        t = meta["start"]
        if meta["trial"]:
            self._complete_cycle(sid, 0)
            t = _add_interval(t, meta["unit"])
        rows: list[_Txn] = []
        while t <= end and len(rows) < budget and self._cycles_left(sid) != 0:
            rows.append(self._subscription_payment(rng, sid, int(t)))
            t = _add_interval(t, meta["unit"])
        self._insert(rows)
        if status == "ACTIVE" and self._cycles_left(sid) == 0:
            self._set_status(sid, "EXPIRED", rows[-1].time if rows else meta["start"])
        elif status != "ACTIVE":
            self._set_status(sid, status, max(end, meta["start"]))
        self._refresh_billing(sid)
        return len(rows)

    def _cycles_left(self, sid: str) -> int | None:
        """Regular billing cycles still to run (None: the plan bills until cancelled)."""
        cycle = self.subscriptions[sid]["billing_info"]["cycle_executions"][-1]
        return cycle["cycles_remaining"] if cycle["total_cycles"] else None

    def _complete_cycle(self, sid: str, index: int) -> None:
        cycles = self.subscriptions[sid]["billing_info"]["cycle_executions"]
        if index < len(cycles):
            cycle = cycles[index]
            cycle["cycles_completed"] += 1
            if cycle["total_cycles"]:
                cycle["cycles_remaining"] = max(0, cycle["total_cycles"] - cycle["cycles_completed"])

    def _set_status(self, sid: str, status: str, when: float, note: str | None = None) -> None:
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        sub["status"] = status
        sub["status_update_time"] = stamp(when)
        meta["status_time"] = when
        if note:
            sub["status_change_note"] = note
        self._touch_sub(sid, when)

    def _touch_sub(self, sid: str, when: float) -> None:
        meta = self.sub_meta[sid]
        meta["updated"] = max(meta["updated"], when)
        self.subscriptions[sid]["update_time"] = stamp(meta["updated"])

    def _refresh_billing(self, sid: str) -> None:
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        billing = sub["billing_info"]
        payments = [r for r in meta["payments"] if r.status != "D"]
        if payments:
            last = payments[-1]
            billing["last_payment"] = {"amount": _money(last.amount, last.currency), "time": stamp(last.time)}
        if sub["status"] == "ACTIVE":
            base = payments[-1].time if payments else meta["start"]
            nxt = _add_interval(base, meta["unit"]) if payments else base
            billing["next_billing_time"] = stamp(nxt)
        else:
            billing.pop("next_billing_time", None)

    def _subscription_payment(self, rng: _Rng, sid: str, t: int) -> _Txn:
        meta = self.sub_meta[sid]
        row = self._sale(rng, t, code="T0002", payer=meta["payer"], currency=meta["currency"], amount=meta["price"])
        info = row.infos[-1][1]
        info["paypal_reference_id"] = sid
        info["paypal_reference_id_type"] = "SUB"
        row.subscription = sid
        meta["payments"].append(row)
        index = 1 if meta["trial"] else 0
        self._complete_cycle(sid, index)
        self._touch_sub(sid, t)
        return row

    def _sale(
        self,
        rng: _Rng,
        t: int,
        *,
        code: str | None = None,
        payer: _Payer | None = None,
        currency: str | None = None,
        amount: int | None = None,
    ) -> _Txn:
        style = self.knobs["date_style"]
        code = code or rng.pick(_SALE_CODES)
        payer = payer or rng.pick(self.payers)
        currency = currency or self._currency(rng)
        item_code, item_name, base = rng.pick(_ITEMS)
        quantity = 1 if code in ("T0002", "T0013") or rng.random() < 0.7 else rng.between(2, 5)
        unit = _price(base, currency)
        if amount is None:
            amount = unit * quantity
        else:
            unit, quantity = amount, 1
        roll = rng.random()
        status = "S" if roll < 0.93 else "P" if roll < 0.97 else "D"
        fee = 0 if status == "D" else _fee(amount, currency)
        category, instrument_type, instrument_sub = rng.pick(_INSTRUMENTS)
        when = stamp(t, style)
        txn_id = rng.txn_id()
        self._invoice += 1
        subject = _SUBJECTS.get(code, "Payment") if code != "T0002" else f"{item_name} subscription"
        info: dict[str, Any] = {
            "paypal_account_id": payer.account_id,
            "transaction_id": txn_id,
            "transaction_event_code": code,
            "transaction_initiation_date": when,
            "transaction_updated_date": when,
            "transaction_amount": _money(amount, currency),
        }
        if fee:
            info["fee_amount"] = _money(fee, currency)
        info["transaction_status"] = status
        info["transaction_subject"] = subject
        if rng.random() < 0.1:
            info["transaction_note"] = "Thanks, see you soon"
        info["invoice_id"] = f"INV-{self._invoice:07d}"
        if rng.random() < 0.3:
            info["custom_field"] = f"order-{self._invoice}"
        info["protection_eligibility"] = rng.pick(("01", "02", "02", "03"))
        info["instrument_type"] = instrument_type
        info["instrument_sub_type"] = instrument_sub
        shipping = payer.shipping_info if code not in ("T0013", "T0002") and rng.random() < 0.7 else _EMPTY
        item: dict[str, Any] = {
            "item_code": item_code,
            "item_name": item_name,
            "item_description": item_name,
            "item_quantity": str(quantity),
            "item_unit_price": _money(unit, currency),
            "item_amount": _money(unit * quantity, currency),
            "total_item_amount": _money(amount, currency),
            "invoice_number": info["invoice_id"],
        }
        store: dict[str, Any] = _EMPTY
        if code == "T0011":
            store = {"store_id": f"STORE{rng.between(1, 4)}", "terminal_id": f"T{rng.between(1, 9)}"}
        row = _Txn(
            time=t,
            seq=self._next_seq(),
            txn_id=txn_id,
            code=code,
            balance=True,
            currency=currency,
            amount=amount,
            fee=fee,
            instrument=category,
            infos=[(t, info)],
            sections={
                "payer_info": payer.payer_info,
                "shipping_info": shipping,
                "cart_info": {"item_details": [item]},
                "store_info": store,
                "auction_info": _EMPTY,
                "incentive_info": _EMPTY,
            },
            payer_name=payer.name,
            payer_email=payer.email,
        )
        return row

    def _authorization(self, sale: _Txn) -> _Txn:
        """A non-balance-affecting authorization row sharing the sale's ``transaction_id``."""
        info = dict(sale.infos[0][1])
        info["transaction_event_code"] = "T1301"
        info.pop("fee_amount", None)
        info["transaction_status"] = "S"
        info["transaction_subject"] = "Authorization"
        return _Txn(
            time=sale.time,
            seq=self._next_seq(),
            txn_id=sale.txn_id,
            code="T1301",
            balance=False,
            currency=sale.currency,
            amount=sale.amount,
            fee=0,
            instrument=sale.instrument,
            infos=[(sale.time, info)],
            sections={**sale.sections},
            payer_name=sale.payer_name,
            payer_email=sale.payer_email,
        )

    def _withdrawal(self, rng: _Rng, t: int) -> _Txn:
        currency = self._currency(rng)
        amount = -_price(rng.between(5000, 200000), currency)
        when = stamp(t, self.knobs["date_style"])
        txn_id = rng.txn_id()
        info: dict[str, Any] = {
            "transaction_id": txn_id,
            "transaction_event_code": "T0403",
            "transaction_initiation_date": when,
            "transaction_updated_date": when,
            "transaction_amount": _money(amount, currency),
            "transaction_status": "S",
            "bank_reference_id": str(rng.between(10**12, 10**13 - 1)),
            "protection_eligibility": "02",
            "instrument_type": "PayPal",
            "instrument_sub_type": "PayPal Wallet",
        }
        return _Txn(
            time=t,
            seq=self._next_seq(),
            txn_id=txn_id,
            code="T0403",
            balance=True,
            currency=currency,
            amount=amount,
            fee=0,
            instrument="PAYPAL",
            infos=[(t, info)],
            sections={
                "payer_info": {"address_status": "N", "payer_name": {}},
                "shipping_info": {},
                "cart_info": {},
                "store_info": {},
                "auction_info": {},
                "incentive_info": {},
            },
        )

    def _refund(self, rng: _Rng, sale: _Txn, when: int, *, partial: bool, back: int | None = None) -> _Txn:
        """A ``T1107`` refund row at ``when`` (of ``back`` minor units, else all or a random part); the sale
        becomes ``V`` once refunded in full, ``F`` before."""
        style = self.knobs["date_style"]
        if back is None:
            back = sale.amount if not partial else max(1, int(sale.amount * (0.2 + rng.random() * 0.6)))
        percent_fee = (abs(sale.fee) - _FIXED_FEE.get(sale.currency, 30)) if sale.fee else 0
        fee_back = (percent_fee * back) // sale.amount if sale.amount else 0
        txn_id = rng.txn_id()
        stamp_when = stamp(when, style)
        source = sale.infos[-1][1]
        info: dict[str, Any] = {
            "paypal_account_id": source.get("paypal_account_id"),
            "transaction_id": txn_id,
            "paypal_reference_id": sale.txn_id,
            "paypal_reference_id_type": "TXN",
            "transaction_event_code": "T1107",
            "transaction_initiation_date": stamp_when,
            "transaction_updated_date": stamp_when,
            "transaction_amount": _money(-back, sale.currency),
        }
        if fee_back:
            info["fee_amount"] = _money(fee_back, sale.currency)
        info["transaction_status"] = "S"
        info["transaction_subject"] = "Refund"
        for key in ("invoice_id", "custom_field", "protection_eligibility", "instrument_type", "instrument_sub_type"):
            if key in source:
                info[key] = source[key]
        if info["paypal_account_id"] is None:
            del info["paypal_account_id"]
        row = _Txn(
            time=when,
            seq=self._next_seq(),
            txn_id=txn_id,
            code="T1107",
            balance=True,
            currency=sale.currency,
            amount=-back,
            fee=fee_back,
            instrument=sale.instrument,
            infos=[(when, info)],
            sections={**sale.sections, "shipping_info": {}, "store_info": {}},
            subscription=sale.subscription,
            payer_name=sale.payer_name,
            payer_email=sale.payer_email,
        )
        refunded = self.refunded.get(sale.txn_id, 0) + back
        self.refunded[sale.txn_id] = refunded
        self._new_version(sale, when, {"transaction_status": "V" if refunded >= sale.amount else "F"})
        return row

    def _new_version(self, row: _Txn, when: int, changes: Mapping[str, Any]) -> None:
        info = {**row.infos[-1][1], **changes}
        info["transaction_updated_date"] = stamp(when, self.knobs["date_style"])
        row.infos.append((when, info))
        row.infos.sort(key=lambda v: v[0])
        self._balances_dirty = True

    def _insert(self, rows: Iterable[_Txn]) -> None:
        rows = list(rows)
        if not rows:
            return
        for row in rows:
            if row.balance:
                self.by_txn[row.txn_id] = row
        if len(rows) == 1 and (not self.rows or (rows[0].time, rows[0].seq) >= (self.rows[-1].time, 0)):
            self.rows.append(rows[0])
            self.times.append(rows[0].time)
        else:
            self.rows.extend(rows)
            self.rows.sort(key=lambda r: (r.time, r.seq))
            self.times = [r.time for r in self.rows]
        self._balances_dirty = True

    # --- balances, visibility -----------------------------------------------------------------------------

    def _refresh_balances(self) -> None:
        if not self._balances_dirty:
            return
        ending: Counter[str] = Counter()
        pending: Counter[str] = Counter()
        for row in self.rows:
            if row.balance:
                status = row.status
                if status != "D":
                    ending[row.currency] += row.amount + row.fee
                    if status == "P":
                        pending[row.currency] += row.amount + row.fee
            row.ending = ending[row.currency]
            row.available = ending[row.currency] - pending[row.currency]
        self._balances_dirty = False

    def last_refreshed(self, now: float) -> int:
        """The time Transaction Search's data ends at (``last_refreshed_datetime``)."""
        lag = self.knobs["visibility_lag_seconds"]
        interval = self.knobs["refresh_interval_seconds"]
        edge = int(now) - lag
        if interval:
            return (edge // interval) * interval - 1
        return edge

    # --- Transaction Search -------------------------------------------------------------------------------

    def search(self, params: Mapping[str, str], now: int, base_url: str) -> dict[str, Any]:
        """Answer ``GET /v1/reporting/transactions``; raises ``PayPalError`` as PayPal would."""
        knobs = self.knobs
        raw_start, raw_end = params.get("start_date"), params.get("end_date")
        if not raw_start:
            raise _bad_request("start_date", raw_start, "start_date is required")
        if not raw_end:
            raise _bad_request("end_date", raw_end, "end_date is required")
        try:
            start = parse_time(raw_start)
        except ValueError:
            raise _bad_request("start_date", raw_start, "Invalid date format") from None
        try:
            end = parse_time(raw_end)
        except ValueError:
            raise _bad_request("end_date", raw_end, "Invalid date format") from None
        if end < start:
            raise _bad_request("end_date", raw_end, "End date should be greater than start date")
        if end - start > knobs["max_window_days"] * _DAY:
            raise _bad_request("end_date", raw_end, f"Date range is greater than {knobs['max_window_days']} days")
        refreshed = self.last_refreshed(now)
        if start < _years_before(now, knobs["history_years"]):
            raise _not_available(raw_start)
        min_age = knobs["min_start_age_seconds"]
        if start > refreshed or (min_age is not None and start > now - min_age):
            raise _not_available()
        page_size = _int_param(params, "page_size", 100, 1, knobs["page_size_max"])
        page = _int_param(params, "page", 1, 1, 2_147_483_647)
        sections = _fields(params.get("fields"))
        balance_only = params.get("balance_affecting_records_only", "Y").upper()
        if balance_only not in ("Y", "N"):
            raise _bad_request("balance_affecting_records_only", params.get("balance_affecting_records_only"), "Y or N")
        filters = {k: params[k] for k in _OPTIONAL_FILTERS if params.get(k)}
        match = self._matcher(filters, refreshed)
        with self.lock:
            self._refresh_balances()
            lo = bisect_left(self.times, start)
            hi = bisect_right(self.times, min(end, refreshed))
            hits = [r for r in self.rows[lo:hi] if (r.balance or balance_only == "N") and (match is None or match(r))]
            total = len(hits)
            if total > knobs["result_cap"]:
                raise PayPalError(
                    400,
                    "RESULTSET_TOO_LARGE",
                    "Result set size is greater than the maximum limit. Change the filter criteria and try again.",
                    extra={"total_items": total, "maximum_items": knobs["result_cap"]},
                )
            page_rows = hits[(page - 1) * page_size : page * page_size]
            details = [self.render(r, sections, refreshed, balances=not filters) for r in page_rows]
        total_pages = (total + page_size - 1) // page_size
        style = knobs["date_style"]
        body: dict[str, Any] = {
            "transaction_details": details,
            "account_number": self.id,
            "start_date": stamp(start, style),
            "end_date": stamp(end, style),
            "last_refreshed_datetime": stamp(refreshed, style),
            "page": page,
            "total_items": total,
            "total_pages": total_pages,
            "links": _page_links(f"{base_url}/v1/reporting/transactions", params, page, total_pages),
        }
        return body

    def _matcher(self, filters: Mapping[str, str], cutoff: int) -> Callable[[_Txn], bool] | None:
        if not filters:
            return None
        tests: list[Callable[[_Txn], bool]] = []
        if "transaction_id" in filters:
            wanted = filters["transaction_id"]
            if not 17 <= len(wanted) <= 19:
                raise _bad_request("transaction_id", wanted, "Invalid transaction_id length")
            tests.append(lambda r: r.txn_id == wanted)
        if "transaction_type" in filters:
            code = filters["transaction_type"].upper()
            tests.append(lambda r: r.code == code)
        if "transaction_status" in filters:
            status = filters["transaction_status"].upper()
            if status not in ("S", "P", "V", "F", "D"):
                raise _bad_request("transaction_status", filters["transaction_status"], "Invalid transaction status")
            tests.append(lambda r: r.info_at(cutoff)["transaction_status"] == status)
        if "transaction_amount" in filters:
            m = _AMOUNT_RE.match(filters["transaction_amount"])
            if m is None:
                raise _bad_request("transaction_amount", filters["transaction_amount"], "Invalid amount range")
            low, high = int(m.group(1)), int(m.group(2))
            tests.append(lambda r: low <= r.amount <= high)
        if "transaction_currency" in filters:
            currency = filters["transaction_currency"].upper()
            tests.append(lambda r: r.currency == currency)
        if "payment_instrument_type" in filters:
            kind = filters["payment_instrument_type"].upper().replace("_", "")
            tests.append(lambda r: r.instrument == kind)
        if "store_id" in filters:
            store = filters["store_id"]
            tests.append(lambda r: r.sections["store_info"].get("store_id") == store)
        if "terminal_id" in filters:
            terminal = filters["terminal_id"]
            tests.append(lambda r: r.sections["store_info"].get("terminal_id") == terminal)
        return lambda r: all(test(r) for test in tests)

    def render(
        self, row: _Txn, sections: Sequence[str], cutoff: float | None, *, balances: bool = True
    ) -> dict[str, Any]:
        """One ``transaction_details`` entry with the asked sections."""
        out: dict[str, Any] = {}
        for section in sections:
            if section != "transaction_info":
                out[section] = row.sections[section]
                continue
            info = row.info_at(cutoff)
            if not row.balance:
                out[section] = info
                continue
            rendered: dict[str, Any] = {}
            placed = False
            for key, value in info.items():
                if not placed and key in _AFTER_BALANCE:
                    self._place_balances(rendered, row, balances)
                    placed = True
                rendered[key] = value
            if not placed:
                self._place_balances(rendered, row, balances)
            out[section] = rendered
        return out

    @staticmethod
    def _place_balances(target: dict[str, Any], row: _Txn, with_ending: bool) -> None:
        if with_ending:
            target["ending_balance"] = _money(row.ending, row.currency)
        target["available_balance"] = _money(row.available, row.currency)

    # --- Subscriptions and plans --------------------------------------------------------------------------

    def subscription(self, sid: str, base_url: str, fields: str | None = None) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions/{id}`` (``fields=plan,last_failed_payment`` add those parts)."""
        sub = self.subscriptions.get(sid)
        if sub is None:
            raise _not_found("subscriptions")
        wanted = {f.strip() for f in (fields or "").split(",") if f.strip()}
        out = dict(sub)
        billing = dict(sub["billing_info"])
        if "last_failed_payment" not in wanted:
            billing.pop("last_failed_payment", None)
        out["billing_info"] = billing
        if "plan" in wanted:
            out["plan"] = self.plan(sub["plan_id"], base_url)
        href = f"{base_url}/v1/billing/subscriptions/{sid}"
        links = [{"href": href, "rel": "self", "method": "GET"}, {"href": href, "rel": "edit", "method": "PATCH"}]
        if sub["status"] in ("ACTIVE", "SUSPENDED"):
            links += [
                {"href": f"{href}/cancel", "rel": "cancel", "method": "POST"},
                {"href": f"{href}/capture", "rel": "capture", "method": "POST"},
            ]
            action = "suspend" if sub["status"] == "ACTIVE" else "activate"
            links.append({"href": f"{href}/{action}", "rel": action, "method": "POST"})
        out["links"] = links
        return out

    def subscription_transactions(self, sid: str, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions/{id}/transactions?start_time&end_time``."""
        if sid not in self.subscriptions:
            raise _not_found("subscriptions")
        bounds: list[float] = []
        for name in ("start_time", "end_time"):
            raw = params.get(name)
            if not raw:
                raise _schema_error(
                    name, None, "MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing."
                )
            try:
                bounds.append(parse_time(raw))
            except ValueError:
                raise _schema_error(
                    name,
                    raw,
                    "INVALID_PARAMETER_SYNTAX",
                    "The value of a field does not conform to the expected format.",
                ) from None
        start, end = bounds
        if end < start:
            raise _schema_error(
                "end_time", params.get("end_time"), "INVALID_PARAMETER_VALUE", "The value of a field is invalid."
            )
        items = []
        for row in self.sub_meta[sid]["payments"]:
            if start <= row.time <= end:
                gross = row.amount
                fee = -row.fee
                item: dict[str, Any] = {
                    "status": _STATUS_OF_CAPTURE[row.status],
                    "id": row.txn_id,
                    "amount_with_breakdown": {
                        "gross_amount": _money(gross, row.currency),
                        "fee_amount": _money(fee, row.currency),
                        "net_amount": _money(gross - fee, row.currency),
                    },
                    "payer_name": dict(row.payer_name or {}),
                    "payer_email": row.payer_email,
                    "time": stamp(row.time),
                }
                items.append(item)
        href = f"{base_url}/v1/billing/subscriptions/{sid}/transactions?" + urlencode(
            {"start_time": params["start_time"], "end_time": params["end_time"]}
        )
        return {
            "transactions": items,
            "total_items": len(items),
            "total_pages": 1,
            "links": [{"href": href, "rel": "SELF", "method": "GET"}],
        }

    def list_subscriptions(self, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions`` (the list endpoint of the newer server SDK)."""
        page_size = _schema_int(params, "page_size", 10, 1, 20)
        page = _schema_int(params, "page", 1, 1, 10_000_000)
        plan_ids = _id_list(params.get("plan_ids"), "plan_ids", 70)
        statuses = None
        if params.get("statuses"):
            raw = params["statuses"]
            if not re.fullmatch(r"[A-Z_,]+", raw):
                raise _schema_error("statuses", raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.")
            statuses = set(raw.split(","))
        ranges: dict[str, tuple[float | None, float | None]] = {}
        for key in ("created", "status_updated"):
            low = _time_param(params, f"{key}_after")
            high = _time_param(params, f"{key}_before")
            ranges[key] = (low, high)
        hits = []
        for sid, sub in self.subscriptions.items():
            meta = self.sub_meta[sid]
            if plan_ids is not None and sub["plan_id"] not in plan_ids:
                continue
            if statuses is not None and sub["status"] not in statuses:
                continue
            if not _in_range(meta["created"], ranges["created"]):
                continue
            if not _in_range(meta["status_time"], ranges["status_updated"]):
                continue
            hits.append((meta["created"], sid))
        hits.sort()
        chosen = hits[(page - 1) * page_size : page * page_size]
        subs = [self.subscription(sid, base_url) for _, sid in chosen]
        total_pages = (len(hits) + page_size - 1) // page_size
        return {
            "subscriptions": subs,
            "links": _page_links(f"{base_url}/v1/billing/subscriptions", params, page, total_pages),
        }

    def plan(self, pid: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/plans/{id}``: the full plan."""
        plan = self.plans.get(pid)
        if plan is None:
            raise _not_found("plans")
        href = f"{base_url}/v1/billing/plans/{pid}"
        action = "deactivate" if plan["status"] == "ACTIVE" else "activate"
        links = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": href, "rel": "edit", "method": "PATCH"},
            {"href": f"{href}/{action}", "rel": action, "method": "POST"},
        ]
        return {**plan, "links": links}

    def list_plans(self, params: Mapping[str, str], prefer: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/plans`` (minimal items unless ``Prefer: return=representation``)."""
        page_size = _schema_int(params, "page_size", 10, 1, 20)
        page = _schema_int(params, "page", 1, 1, 100_000)
        product = params.get("product_id")
        if product is not None and not 6 <= len(product) <= 50:
            raise _schema_error("product_id", product, "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
        plan_ids = _id_list(params.get("plan_ids"), "plan_ids", 10)
        total_required = params.get("total_required", "false").lower() == "true"
        hits = [
            p
            for p in sorted(self.plans.values(), key=lambda p: (p["create_time"], p["id"]))
            if (product is None or p["product_id"] == product) and (plan_ids is None or p["id"] in plan_ids)
        ]
        chosen = hits[(page - 1) * page_size : page * page_size]
        full = "return=representation" in prefer.replace(" ", "").lower()
        plans = []
        for plan in chosen:
            if full:
                plans.append(self.plan(plan["id"], base_url))
                continue
            item = {k: plan[k] for k in ("id", "product_id", "name", "status", "description", "usage_type")}
            item["create_time"] = plan["create_time"]
            item["links"] = [{"href": f"{base_url}/v1/billing/plans/{plan['id']}", "rel": "self", "method": "GET"}]
            plans.append(item)
        total_pages = (len(hits) + page_size - 1) // page_size
        body: dict[str, Any] = {"plans": plans}
        if total_required:
            body["total_items"] = len(hits)
            body["total_pages"] = total_pages
        body["links"] = _page_links(
            f"{base_url}/v1/billing/plans", params, page, total_pages if total_required else None
        )
        return body

    # --- changes (control API) ----------------------------------------------------------------------------

    def apply_changes(self, changes: Mapping[str, int], now: int) -> dict[str, list[str]]:
        """New transactions, refunds, subscription updates and cancellations, all at ``now``."""
        rng = self._rng
        out: dict[str, list[str]] = {
            "created": [],
            "edited": [],
            "deleted": [],
            "refunds": [],
            "subscriptions_updated": [],
            "subscriptions_cancelled": [],
        }
        with self.lock:
            rows: list[_Txn] = []
            announce: list[Callable[[], None]] = []
            for _ in range(changes.get("transactions", 0)):
                sale = self._sale(rng, now)
                rows.append(sale)
                out["created"].append(sale.txn_id)
                announce.append(partial(self._announce_payment, sale))
            refundable = [
                r
                for r in self.rows
                if r.balance and r.status == "S" and r.code.startswith("T00") and r.amount > 0 and r.code != "T0403"
            ]
            rng.shuffle(refundable)
            for sale in refundable[: changes.get("refunds", 0)]:
                refund = self._refund(rng, sale, now, partial=rng.random() < 0.3)
                rows.append(refund)
                out["refunds"].append(refund.txn_id)
                out["created"].append(refund.txn_id)
                out["edited"].append(sale.txn_id)
                announce.append(partial(self._announce_refund, refund, sale))
                if sale.subscription:
                    self._touch_sub(sale.subscription, now)
            live = [sid for sid, s in self.subscriptions.items() if s["status"] not in ("CANCELLED", "EXPIRED")]
            rng.shuffle(live)
            n_updates = changes.get("subscription_updates", 0)
            for sid in live[:n_updates]:
                before = (self.subscriptions[sid]["status"], self.subscriptions[sid]["quantity"])
                row = self._update_subscription(rng, sid, now)
                if row is not None:
                    rows.append(row)
                    out["created"].append(row.txn_id)
                    announce.append(partial(self._announce_payment, row))
                kind = self._subscription_change(sid, *before)
                if kind is not None:
                    announce.append(partial(self._announce_subscription, sid, kind))
                out["subscriptions_updated"].append(sid)
            for sid in live[n_updates : n_updates + changes.get("cancels", 0)]:
                self._set_status(sid, "CANCELLED", now, note="Cancelled by the subscriber")
                self._refresh_billing(sid)
                out["subscriptions_cancelled"].append(sid)
                announce.append(partial(self._announce_subscription, sid, "BILLING.SUBSCRIPTION.CANCELLED"))
            self._insert(rows)
            for call in announce:
                call()
        return out

    # --- webhook announcements ----------------------------------------------------------------------------

    def _subscription_change(self, sid: str, status: str, quantity: str) -> str | None:
        """The ``BILLING.SUBSCRIPTION.*`` event a change from (status, quantity) makes, if any."""
        sub = self.subscriptions[sid]
        if sub["status"] != status:
            return _SUBSCRIPTION_EVENTS.get(sub["status"], "BILLING.SUBSCRIPTION.UPDATED")
        return "BILLING.SUBSCRIPTION.UPDATED" if sub["quantity"] != quantity else None

    def _announce_payment(self, row: _Txn) -> None:
        """``PAYMENT.CAPTURE.*`` for a Checkout capture (T0006), ``PAYMENT.SALE.*`` for a subscription sale (T0002)."""
        kind = _PAYMENT_EVENTS.get(row.code)
        word = {"S": "COMPLETED", "P": "PENDING", "D": "DENIED"}.get(row.status)
        if self.on_event is None or kind is None or word is None or not row.balance:
            return
        prefix, resource_type = kind
        build = partial(self.capture_resource if row.code == "T0006" else self.sale_resource, row)
        self.on_event(f"{prefix}.{word}", resource_type, build)

    def _announce_refund(self, refund: _Txn, sale: _Txn) -> None:
        """``PAYMENT.CAPTURE.REFUNDED`` (a v2 refund) or ``PAYMENT.SALE.REFUNDED`` (a v1 refund)."""
        kind = _PAYMENT_EVENTS.get(sale.code)
        if self.on_event is None or kind is None:
            return
        total = self.refunded.get(sale.txn_id, 0)
        build = partial(self.refund_resource, refund, sale, total)
        self.on_event(f"{kind[0]}.REFUNDED", "refund", build)

    def _announce_subscription(self, sid: str, event_type: str) -> None:
        if self.on_event is not None:
            self.on_event(event_type, "subscription", lambda base: self.subscription(sid, base))

    # --- payment resources (Payments v2 captures and refunds, v1 sales and refunds) ---------------------------

    def capture_resource(self, row: _Txn, base_url: str) -> dict[str, Any]:
        """A Checkout capture as ``GET /v2/payments/captures/{id}`` shows it now."""
        info, currency = row.infos[-1][1], row.currency
        href = f"{base_url}/v2/payments/captures/{row.txn_id}"
        breakdown: dict[str, Any] = {"gross_amount": _money(row.amount, currency)}
        if row.fee:
            breakdown["paypal_fee"] = _money(-row.fee, currency)
        breakdown["net_amount"] = _money(row.amount + row.fee, currency)
        out: dict[str, Any] = {
            "id": row.txn_id,
            "amount": _money(row.amount, currency),
            "final_capture": True,
            "seller_protection": _PROTECTION.get(info.get("protection_eligibility"), _PROTECTION["02"]),
            "seller_receivable_breakdown": breakdown,
            "status": _STATUS_OF_CAPTURE[row.status],
        }
        if info.get("invoice_id"):
            out["invoice_id"] = info["invoice_id"]
        if info.get("custom_field"):
            out["custom_id"] = info["custom_field"]
        out["supplementary_data"] = {"related_ids": {"order_id": _derived_id("order", row.txn_id)}}
        out["payee"] = {"merchant_id": self.id}
        out["create_time"] = stamp(row.time)
        out["update_time"] = stamp(row.infos[-1][0])
        out["links"] = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": f"{href}/refund", "rel": "refund", "method": "POST"},
            {"href": f"{base_url}/v2/checkout/orders/{_derived_id('order', row.txn_id)}", "rel": "up",
             "method": "GET"},
        ]  # fmt: skip
        return out

    def sale_resource(self, row: _Txn, base_url: str) -> dict[str, Any]:
        """A subscription payment as ``GET /v1/payments/sale/{id}`` shows it now."""
        info, currency = row.infos[-1][1], row.currency
        total = _money_text(row.amount, currency)
        href = f"{base_url}/v1/payments/sale/{row.txn_id}"
        out: dict[str, Any] = {
            "id": row.txn_id,
            "state": _STATE_OF_SALE[row.status],
            "amount": {"total": total, "currency": currency, "details": {"subtotal": total}},
            "payment_mode": "INSTANT_TRANSFER",
            "protection_eligibility": _PROTECTION.get(info.get("protection_eligibility"), _PROTECTION["02"])["status"],
        }
        if row.fee:
            out["transaction_fee"] = {"value": _money_text(-row.fee, currency), "currency": currency}
        if row.subscription:
            out["billing_agreement_id"] = row.subscription
        if info.get("invoice_id"):
            out["invoice_number"] = info["invoice_id"]
        if info.get("custom_field"):
            out["custom"] = info["custom_field"]
        out["create_time"] = stamp(row.time)
        out["update_time"] = stamp(row.infos[-1][0])
        out["links"] = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": f"{href}/refund", "rel": "refund", "method": "POST"},
        ]
        return out

    def refund_resource(self, refund: _Txn, sale: _Txn, refunded: int, base_url: str) -> dict[str, Any]:
        """The refund of a capture (Payments v2 shape) or of a sale (v1 shape), ``refunded`` in all so far."""
        info, currency = refund.infos[-1][1], refund.currency
        back, fee_back = -refund.amount, refund.fee
        when, updated = stamp(refund.time), stamp(refund.infos[-1][0])
        if sale.code == "T0006":
            breakdown: dict[str, Any] = {"gross_amount": _money(back, currency)}
            if fee_back:
                breakdown["paypal_fee"] = _money(fee_back, currency)
            breakdown["net_amount"] = _money(back - fee_back, currency)
            breakdown["total_refunded_amount"] = _money(refunded, currency)
            out: dict[str, Any] = {"id": refund.txn_id, "amount": _money(back, currency),
                                   "seller_payable_breakdown": breakdown}  # fmt: skip
            if info.get("invoice_id"):
                out["invoice_id"] = info["invoice_id"]
            if info.get("custom_field"):
                out["custom_id"] = info["custom_field"]
            out.update({"status": "COMPLETED", "create_time": when, "update_time": updated})
            out["links"] = [
                {"href": f"{base_url}/v2/payments/refunds/{refund.txn_id}", "rel": "self", "method": "GET"},
                {"href": f"{base_url}/v2/payments/captures/{sale.txn_id}", "rel": "up", "method": "GET"},
            ]
            return out
        payment = _derived_id("PAYID-", sale.txn_id)
        out = {"id": refund.txn_id, "state": "completed",
               "amount": {"total": _money_text(back, currency), "currency": currency}}  # fmt: skip
        if fee_back:
            out["refund_from_transaction_fee"] = {"currency": currency, "value": _money_text(fee_back, currency)}
        out["total_refunded_amount"] = {"currency": currency, "value": _money_text(refunded, currency)}
        out["refund_from_received_amount"] = {"currency": currency, "value": _money_text(back - fee_back, currency)}
        out["sale_id"] = sale.txn_id
        out["parent_payment"] = payment
        if info.get("invoice_id"):
            out["invoice_number"] = info["invoice_id"]
        out.update({"create_time": when, "update_time": updated})
        out["links"] = [
            {"href": f"{base_url}/v1/payments/refund/{refund.txn_id}", "rel": "self", "method": "GET"},
            {"href": f"{base_url}/v1/payments/payment/{payment}", "rel": "parent_payment", "method": "GET"},
            {"href": f"{base_url}/v1/payments/sale/{sale.txn_id}", "rel": "sale", "method": "GET"},
        ]
        return out

    def capture(self, capture_id: str, base_url: str) -> dict[str, Any]:
        """``GET /v2/payments/captures/{id}``: Checkout captures (T0006) only."""
        row = self.by_txn.get(capture_id)
        if row is None or row.code != "T0006":
            raise _payment_not_found("captures")
        return self.capture_resource(row, base_url)

    def sale(self, sale_id: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/payments/sale/{id}``: subscription sales (T0002) only."""
        row = self.by_txn.get(sale_id)
        if row is None or row.code != "T0002":
            raise PayPalError(404, "INVALID_RESOURCE_ID", "Requested resource ID was not found.",
                              link="https://developer.paypal.com/docs/api/payments/#errors")  # fmt: skip
        return self.sale_resource(row, base_url)

    def refund_capture(self, capture_id: str, body: Mapping[str, Any], request_id: str | None, now: int,
                       base_url: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """``POST /v2/payments/captures/{id}/refund``: all that is left, or ``amount``; a replayed
        ``PayPal-Request-Id`` answers the first refund again (200 instead of 201)."""
        if request_id and request_id in self.refund_requests:
            first_capture, first = self.refund_requests[request_id]
            if first_capture == capture_id:
                return 200, first
        row = self.by_txn.get(capture_id)
        if row is None or row.code != "T0006":
            raise _payment_not_found("captures")
        left = row.amount - self.refunded.get(capture_id, 0)
        if row.status not in ("S", "F") or left <= 0:
            raise _unprocessable("CAPTURE_FULLY_REFUNDED", "The capture has already been fully refunded.")
        back = left
        amount = body.get("amount")
        if amount is not None:
            if not isinstance(amount, dict) or amount.get("currency_code") != row.currency:
                raise _unprocessable("REFUND_CURRENCY_MISMATCH", "Refund must be in the currency of the capture.")
            try:
                back = _minor(amount.get("value"), row.currency)
            except (TypeError, ValueError):
                raise _schema_error(
                    "amount.value",
                    str(amount.get("value")),
                    "INVALID_PARAMETER_SYNTAX",
                    "The value of a field does not conform to the expected format.",
                ) from None
            if back <= 0 or back > left:
                raise _unprocessable("REFUND_AMOUNT_EXCEEDED", "The refund amount must be at most what is left.")
        refund = self._refund(self._rng, row, now, partial=back < row.amount, back=back)
        self._insert([refund])
        self._announce_refund(refund, row)
        out = self.refund_resource(refund, row, self.refunded[capture_id], base_url)
        if request_id:
            self.refund_requests[request_id] = (capture_id, out)
        return 201, out

    def subscription_action(self, sid: str, action: str, reason: str | None, now: int) -> None:
        """``POST /v1/billing/subscriptions/{id}/suspend|activate|cancel`` (204 on success)."""
        sub = self.subscriptions.get(sid)
        if sub is None:
            raise _not_found("subscriptions")
        allowed, target, event = _SUBSCRIPTION_ACTIONS[action]
        if sub["status"] not in allowed:
            raise _unprocessable(
                "SUBSCRIPTION_STATUS_INVALID",
                f"Invalid subscription status for {action} action; subscription status should be "
                + " or ".join(s.lower() for s in sorted(allowed))
                + ".",
            )
        self._set_status(sid, target, now, note=reason)
        self._refresh_billing(sid)
        self._announce_subscription(sid, event)

    def _update_subscription(self, rng: _Rng, sid: str, now: int) -> _Txn | None:
        sub = self.subscriptions[sid]
        status = sub["status"]
        row = None
        if status == "APPROVAL_PENDING":
            self._set_status(sid, "APPROVED", now)
        elif status in ("APPROVED", "SUSPENDED"):
            self._set_status(sid, "ACTIVE", now)
        else:
            roll = rng.random()
            if roll < 0.6 and self._cycles_left(sid) == 0:
                self._set_status(sid, "EXPIRED", now)
            elif roll < 0.6:
                row = self._subscription_payment(rng, sid, now)
            elif roll < 0.8:
                self._set_status(sid, "SUSPENDED", now, note="Suspended by the merchant")
            else:
                sub["quantity"] = str(int(sub["quantity"]) + 1)
                self._touch_sub(sid, now)
        self._touch_sub(sid, now)
        self._refresh_billing(sid)
        return row

    def bulk(self, day: str, count: int) -> dict[str, Any]:
        """``count`` sales spread over one UTC day (for days above the result cap)."""
        try:
            start = int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
        except ValueError:
            raise ValueError("day must look like YYYY-MM-DD") from None
        rng = _Rng(f"paypal-bulk:{self.client_id}:{self.seed}:{day}:{len(self.rows)}")
        times = sorted(start + int(rng.random() * _DAY) for _ in range(count))
        with self.lock:
            rows = [self._sale(rng, t) for t in times]
            self._insert(rows)
        return {
            "day": day,
            "created": len(rows),
            "first": stamp(times[0]) if times else None,
            "last": stamp(times[-1]) if times else None,
            "counts": self.counts(),
        }

    def add_record(self, entity: str, fields: Mapping[str, Any], at: int, now: int, base_url: str) -> dict[str, Any]:
        """Create one transaction, subscription or plan at ``at`` with ``fields`` over the generated values."""
        rng = self._rng
        with self.lock:
            if entity == "transaction":
                row = self._add_transaction(rng, dict(fields), at)
                self._announce_payment(row)
                return self.render(row, _SECTIONS, None)
            if entity == "subscription":
                plan_id = fields.get("plan_id")
                if plan_id is None:
                    if not self.plans:
                        raise ValueError("the account has no plan to subscribe to")
                    plan_id = rng.pick(list(self.plans))
                elif plan_id not in self.plans:
                    raise ValueError(f"no plan {plan_id}")
                sid = self._new_subscription(rng, str(plan_id), at, now, status=str(fields.get("status", "ACTIVE")))
                sub = self.subscriptions[sid]
                for key, value in fields.items():
                    if key not in ("id", "links", "status", "plan_id"):
                        sub[key] = value
                self._refresh_billing(sid)
                self._announce_subscription(sid, "BILLING.SUBSCRIPTION.CREATED")
                return self.subscription(sid, base_url)
            if entity == "plan":
                pid = self._new_plan(rng, at, fields)
                return self.plan(pid, base_url)
        raise ValueError("entity must be transaction, subscription or plan")

    def _add_transaction(self, rng: _Rng, fields: dict[str, Any], at: int) -> _Txn:
        balance = fields.pop("balance_affecting", True)
        sid = fields.pop("subscription_id", None)
        info_fields = dict(fields.pop("transaction_info", {}) or {})
        sections = {k: fields.pop(k) for k in list(fields) if k in _SECTIONS}
        info_fields.update(fields)
        if sid is not None:
            if sid not in self.subscriptions:
                raise ValueError(f"no subscription {sid}")
            row = self._subscription_payment(rng, sid, at)
            self._refresh_billing(sid)
        else:
            row = self._sale(rng, at, code=info_fields.get("transaction_event_code"))
        info = row.infos[-1][1]
        for key, value in info_fields.items():
            info[key] = value
        if "transaction_amount" in info_fields:
            money = info_fields["transaction_amount"]
            row.currency = money["currency_code"]
            row.amount = _minor(money["value"], row.currency)
            if "fee_amount" not in info_fields:
                row.fee = _fee(row.amount, row.currency) if row.amount > 0 else 0
                if row.fee:
                    info["fee_amount"] = _money(row.fee, row.currency)
                else:
                    info.pop("fee_amount", None)
        if "fee_amount" in info_fields:
            row.fee = _minor(info_fields["fee_amount"]["value"], row.currency)
        row.txn_id = info["transaction_id"]
        row.code = info["transaction_event_code"]
        row.balance = bool(balance)
        for name, value in sections.items():
            row.sections[name] = value
        self._insert([row])
        self._refresh_balances()
        return row

    # --- export -------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Record counts for the control API."""
        return {
            "transactions": len(self.rows),
            "balance_affecting": sum(1 for r in self.rows if r.balance),
            "subscriptions": len(self.subscriptions),
            "plans": len(self.plans),
        }

    def export(self, entity: str, now: int, base_url: str, visible: bool = False) -> dict[str, Any]:
        """Every current record (full API shape); ``visible`` keeps what Transaction Search shows now."""
        with self.lock:
            if entity == "transactions":
                self._refresh_balances()
                refreshed = self.last_refreshed(now)
                rows = [r for r in self.rows if not visible or r.time <= refreshed]
                cutoff = refreshed if visible else None
                return {
                    "records": [self.render(r, _SECTIONS, cutoff) for r in rows],
                    "deleted_ids": [],
                    "last_refreshed_datetime": stamp(refreshed, self.knobs["date_style"]),
                }
            if entity == "subscriptions":
                return {
                    "records": [self.subscription(sid, base_url, "last_failed_payment") for sid in self.subscriptions],
                    "deleted_ids": [],
                }
            if entity == "plans":
                return {"records": [self.plan(pid, base_url) for pid in self.plans], "deleted_ids": []}
        raise ValueError("entity must be transactions, subscriptions or plans")


# ---------------------------------------------------------------------------------------------------------
# Request parameters
# ---------------------------------------------------------------------------------------------------------


def _int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(name, raw, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _bad_request(name, raw, f"{name} should be between {low} and {high}")
    return value


def _schema_int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _schema_error(name, raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.") from None
    if not low <= value <= high:
        raise _schema_error(name, raw, "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
    return value


def _id_list(raw: str | None, name: str, limit: int) -> set[str] | None:
    if not raw:
        return None
    ids = [p.strip() for p in raw.split(",") if p.strip()]
    if len(ids) > limit:
        raise _schema_error(name, raw, "INVALID_PARAMETER_VALUE", f"A maximum of {limit} ids are allowed.")
    return set(ids)


def _time_param(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise _schema_error(name, raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.") from None


def _in_range(value: float, bounds: tuple[float | None, float | None]) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def _fields(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ("transaction_info",)
    names = [p.strip().lower() for p in raw.split(",") if p.strip()]
    if "all" in names:
        return _SECTIONS
    for name in names:
        if name not in _SECTIONS:
            raise _bad_request("fields", raw, "Invalid fields value")
    return tuple(s for s in _SECTIONS if s in names)


def _minor(value: Any, currency: str) -> int:
    text = str(value)
    if _DECIMALS.get(currency, 2) == 0:
        return int(float(text))
    return round(float(text) * 100)


def _page_links(base: str, params: Mapping[str, str], page: int, total_pages: int | None) -> list[dict[str, str]]:
    def href(p: int) -> str:
        query = {k: v for k, v in params.items() if k != "page"}
        query["page"] = str(p)
        return f"{base}?{urlencode(query)}"

    links = [{"href": href(page), "rel": "self", "method": "GET"}]
    if total_pages is None:
        return links
    if page > 1:
        links.append({"href": href(1), "rel": "first", "method": "GET"})
        links.append({"href": href(min(page - 1, max(total_pages, 1))), "rel": "prev", "method": "GET"})
    if page < total_pages:
        links.append({"href": href(page + 1), "rel": "next", "method": "GET"})
    if total_pages > 1:
        links.append({"href": href(total_pages), "rel": "last", "method": "GET"})
    return links


# ---------------------------------------------------------------------------------------------------------
# Runtime: limits, faults, statistics
# ---------------------------------------------------------------------------------------------------------


class _Window:
    """A fixed window counter on ``time.monotonic``."""

    __slots__ = ("count", "start")

    def __init__(self) -> None:
        self.start = -math.inf
        self.count = 0

    def take(self, limit: int, length: float, now: float) -> float | None:
        """Count one request; ``None`` if allowed, else seconds until the window resets."""
        if not limit:
            return None
        if now - self.start >= length:
            self.start = now
            self.count = 0
        if self.count >= limit:
            return self.start + length - now
        self.count += 1
        return None


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    retry_after: int = 1
    latency_ms: float = 0.0
    token_errors: int = 0
    data_unavailable: int = 0

    def active(self) -> bool:
        return bool(
            self.server_errors or self.rate_limited or self.latency_ms or self.token_errors or self.data_unavailable
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "retry_after": self.retry_after,
            "latency_ms": self.latency_ms,
            "token_errors": self.token_errors,
            "data_unavailable": self.data_unavailable,
        }


@dataclass
class _Runtime:
    account: PayPalAccount
    window: _Window = field(default_factory=_Window)
    requests: int = 0
    throttled: int = 0
    tokens: int = 0
    searches: int = 0


_ACCOUNT_FIELDS = frozenset(
    {
        "id",
        "client_id",
        "client_secret",
        "seed",
        "transactions",
        "subscriptions",
        "plans",
        "days",
        "currencies",
        "knobs",
    }
)
_CHANGE_FIELDS = ("transactions", "refunds", "subscription_updates", "cancels")
# The shared subscription fields (see ``sandbox.webhooks``) plus the account, its webhook id, the event filter
# and a minted certificate to sign with.
_WEBHOOK_FIELDS = frozenset(
    {"url", "duplicate_rate", "hold", "retry_delays", "account", "webhook_id", "event_types", "cert"}
)
_VERIFY_FIELDS = ("auth_algo", "cert_url", "transmission_id", "transmission_sig", "transmission_time", "webhook_id",
                  "webhook_event")  # fmt: skip
_EVENT_SUMMARIES = {
    "PAYMENT.CAPTURE.COMPLETED": "Payment completed",
    "PAYMENT.CAPTURE.PENDING": "Payment pending",
    "PAYMENT.CAPTURE.DENIED": "Payment denied",
    "PAYMENT.CAPTURE.REFUNDED": "A payment capture was refunded",
    "PAYMENT.SALE.COMPLETED": "Payment completed",
    "PAYMENT.SALE.PENDING": "Payment pending",
    "PAYMENT.SALE.DENIED": "Payment denied",
    "PAYMENT.SALE.REFUNDED": "A sale was refunded",
    "BILLING.SUBSCRIPTION.CREATED": "Subscription created",
    "BILLING.SUBSCRIPTION.ACTIVATED": "Subscription activated",
    "BILLING.SUBSCRIPTION.UPDATED": "Subscription updated",
    "BILLING.SUBSCRIPTION.SUSPENDED": "Subscription suspended",
    "BILLING.SUBSCRIPTION.CANCELLED": "Subscription cancelled",
    "BILLING.SUBSCRIPTION.EXPIRED": "Subscription expired",
}


@dataclass(frozen=True)
class _Hook:
    """One webhook of an app: where its events go, which types it takes (None: all) and the cert it signs with."""

    webhook_id: str
    account: str
    url: str
    event_types: frozenset[str] | None
    cert: str | None = None

    @property
    def key(self) -> str:
        return f"{self.account}/{self.webhook_id}"

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


def _verify_request(body: dict[str, Any]) -> dict[str, Any]:
    """A verify-webhook-signature body with every field (strings, and the event as an object); 400 otherwise."""
    problems = [(name, "MISSING_REQUIRED_PARAMETER") for name in _VERIFY_FIELDS if name not in body]
    problems += [
        (name, "INVALID_PARAMETER_VALUE")
        for name in _VERIFY_FIELDS
        if name in body and not isinstance(body[name], dict if name == "webhook_event" else str)
    ]
    if problems:
        details = [{"field": f"/{name}", "location": "body", "issue": issue} for name, issue in problems]
        raise PayPalError(400, "VALIDATION_ERROR", "Invalid request - see details.", details)
    return body


async def _paypal_json(request: Request) -> dict[str, Any]:
    """A request's JSON object body (``{}`` when empty); PayPal's 400 ``MALFORMED_REQUEST_JSON`` otherwise."""
    raw = await request.body()
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise PayPalError(
            400,
            "MALFORMED_REQUEST_JSON",
            "The request JSON is not well formed.",
            [{"issue": "MALFORMED_REQUEST_JSON", "description": "The request JSON is not well formed."}],
        )
    return body


_FAULT_FIELDS = frozenset(
    {
        "account",
        "server_errors",
        "server_error_status",
        "rate_limited",
        "retry_after",
        "latency_ms",
        "token_errors",
        "data_unavailable",
    }
)
_CURRENCIES = tuple(_PRICE_FACTOR)


_int_field = partial(int_field, nullable=True)
_control = partial(control_endpoint, bad_request=(ValueError, KeyError, TypeError))


def normalise_knobs(raw: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate knob values over ``base`` (the defaults when None)."""
    knobs = dict(base or DEFAULT_KNOBS)
    unknown = set(raw) - set(DEFAULT_KNOBS)
    if unknown:
        raise ControlError(400, f"unknown knobs: {sorted(unknown)}")
    for name in ("result_cap", "max_window_days", "page_size_max", "token_ttl", "history_years"):
        if name in raw:
            knobs[name] = _int_field(raw, name, None, 1)
    for name in ("visibility_lag_seconds", "refresh_interval_seconds", "requests_per_minute"):
        if name in raw:
            knobs[name] = _int_field(raw, name, None, 0)
    if "min_start_age_seconds" in raw:
        knobs["min_start_age_seconds"] = _int_field(raw, "min_start_age_seconds", None, 0)
    if "minute_seconds" in raw:
        knobs["minute_seconds"] = number_field(raw, "minute_seconds", 60.0, 0.001)
    if "list_subscriptions" in raw:
        knobs["list_subscriptions"] = bool(raw["list_subscriptions"])
    if "expired_token_error" in raw:
        if raw["expired_token_error"] not in ("invalid_token", "AUTHENTICATION_FAILURE"):
            raise ControlError(400, "expired_token_error must be invalid_token or AUTHENTICATION_FAILURE")
        knobs["expired_token_error"] = raw["expired_token_error"]
    if "date_style" in raw:
        if raw["date_style"] not in ("Z", "+0000"):
            raise ControlError(400, 'date_style must be "Z" or "+0000"')
        knobs["date_style"] = raw["date_style"]
    if "scopes" in raw:
        scopes = raw["scopes"]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ControlError(400, "scopes must be a list of strings")
        knobs["scopes"] = list(scopes)
    return knobs


def normalise_spec(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an account spec and fill in the defaults (knobs may sit at the top level or under ``knobs``)."""
    knob_raw = {k: v for k, v in body.items() if k in DEFAULT_KNOBS}
    nested = body.get("knobs") or {}
    if not isinstance(nested, dict):
        raise ControlError(400, "knobs must be an object")
    knob_raw.update(nested)
    unknown = set(body) - _ACCOUNT_FIELDS - set(DEFAULT_KNOBS)
    if unknown:
        raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
    client_id, secret = body.get("client_id"), body.get("client_secret")
    if not isinstance(client_id, str) or not client_id or not isinstance(secret, str) or not secret:
        raise ControlError(400, "client_id and client_secret are required strings")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ControlError(400, "seed must be an integer")
    currencies = body.get("currencies", ["USD", "EUR", "GBP", "CAD", "AUD", "JPY"])
    if not isinstance(currencies, list) or not currencies or any(c not in _CURRENCIES for c in currencies):
        raise ControlError(400, f"currencies must be a non-empty list among {sorted(_CURRENCIES)}")
    transactions = _int_field(body, "transactions", 200)
    subscriptions = _int_field(body, "subscriptions", 20)
    plans = _int_field(body, "plans", 3)
    assert transactions is not None and subscriptions is not None and plans is not None
    if subscriptions and not plans:
        raise ControlError(400, "subscriptions need at least one plan")
    days = number_field(body, "days", 30)
    if days <= 0:
        raise ControlError(400, "days must be > 0")
    rng = _Rng(f"paypal-account:{client_id}:{seed}")
    account_id = body.get("id") or rng.account_id()
    return {
        "id": str(account_id),
        "client_id": client_id,
        "client_secret": secret,
        "app_id": "APP-" + rng.chars("0123456789" * 2 + "ABCDEFGHJKLMNPRSTUVWXY", 17),
        "seed": seed,
        "transactions": transactions,
        "subscriptions": subscriptions,
        "plans": plans,
        "days": days,
        "currencies": list(dict.fromkeys(currencies)),
        "knobs": normalise_knobs(knob_raw),
    }


def _render_error(err: PayPalError) -> Response:
    debug_id = _debug_id()
    return Response(
        orjson.dumps(err.body(debug_id)),
        status_code=err.status,
        headers={"content-type": _JSON_CT, "paypal-debug-id": debug_id, **err.headers},
    )


def _ok(payload: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(payload),
        status_code=status,
        headers={"content-type": _JSON_CT, "paypal-debug-id": _debug_id()},
    )


# ---------------------------------------------------------------------------------------------------------
# Webhook signing: the sandbox's own message-verification certificates
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cert:
    """One certificate the sandbox publishes at ``/v1/notifications/certs/<name>`` (PEM, leaf first)."""

    name: str
    kind: str
    pem: bytes
    key: rsa.RSAPrivateKey = field(repr=False)


class MessageCerts:
    """The sandbox's stand-in for PayPal's signing PKI: a CA of its own and leaf certificates for
    ``messageverificationcerts.sandbox.paypal.com``, created on first use (RSA keys take a moment).

    Besides the genuine leaf (``valid``), ``mint`` makes the certificates a receiver must refuse, all
    over the same leaf key so only the named flaw differs: ``expired``; ``untrusted`` (issued by a CA
    nobody trusts, served with that CA); ``wrong_cn`` (issued by the sandbox CA to another name).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ca_key: rsa.RSAPrivateKey | None = None
        self._ca: x509.Certificate | None = None
        self._leaf_key: rsa.RSAPrivateKey | None = None
        self.certs: dict[str, _Cert] = {}
        self.current = ""

    def _ready(self) -> None:
        with self._lock:
            if self._ca is not None:
                return
            self._ca_key, self._ca = _ca_certificate("NextCRM Sandbox PayPal Message Verification CA")
            self._leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.current = self._add("valid", MESSAGE_CERT_CN, self._ca_key, self._ca, _VALID)

    def default(self) -> str:
        """The name of the genuine certificate deliveries are signed with."""
        self._ready()
        return self.current

    def ca_pem(self) -> str:
        """The CA a sandbox connection trusts for webhook certificates (PEM)."""
        self._ready()
        assert self._ca is not None
        return self._ca.public_bytes(serialization.Encoding.PEM).decode()

    def mint(self, kind: str) -> _Cert:
        """A new certificate of ``kind`` (``valid``, ``expired``, ``untrusted``, ``wrong_cn``), published."""
        self._ready()
        assert self._ca_key is not None and self._ca is not None
        with self._lock:
            if kind == "valid":
                return self.certs[self._add(kind, MESSAGE_CERT_CN, self._ca_key, self._ca, _VALID)]
            if kind == "expired":
                return self.certs[self._add(kind, MESSAGE_CERT_CN, self._ca_key, self._ca, _EXPIRED)]
            if kind == "wrong_cn":
                cn = "messageverificationcerts.paypal.com.attacker.example"
                return self.certs[self._add(kind, cn, self._ca_key, self._ca, _VALID)]
            if kind == "untrusted":
                rogue_key, rogue = _ca_certificate("PayPal Message Verification CA")
                return self.certs[self._add(kind, MESSAGE_CERT_CN, rogue_key, rogue, _VALID, chain=True)]
        raise ValueError("kind must be valid, expired, untrusted or wrong_cn")

    def _add(self, kind: str, cn: str, issuer_key: rsa.RSAPrivateKey, issuer: x509.Certificate,
             validity: tuple[int, int], chain: bool = False) -> str:  # fmt: skip
        assert self._leaf_key is not None
        now = dt.datetime.now(dt.UTC)
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PayPal, Inc."),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]))
            .issuer_name(issuer.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=validity[0]))
            .not_valid_after(now + dt.timedelta(days=validity[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )  # fmt: skip
        pem = leaf.public_bytes(serialization.Encoding.PEM)
        if chain:
            pem += issuer.public_bytes(serialization.Encoding.PEM)
        name = "CERT-" + "-".join(secrets.token_hex(4) for _ in range(3))
        self.certs[name] = _Cert(name, kind, pem, self._leaf_key)
        return name

    def sign(self, name: str, message: bytes) -> str:
        """Base64 SHA256withRSA (PKCS#1 v1.5) signature of ``message`` by certificate ``name``'s key."""
        self._ready()
        key = self.certs[name].key
        return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()

    def genuine(self, name: str, message: bytes, signature: str) -> bool:
        """Whether ``signature`` is the genuine certificate ``name``'s over ``message`` (online verification)."""
        cert = self.certs.get(name)
        if cert is None or cert.kind != "valid":
            return False
        try:
            raw = base64.b64decode(signature, validate=True)
            cert.key.public_key().verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


# (days from now) validity of leaf certificates
_VALID = (-1, 365)
_EXPIRED = (-400, -30)


def _ca_certificate(name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NextCRM sandbox"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def signed_message(transmission_id: str, transmission_time: str, webhook_id: str, body: bytes) -> bytes:
    """What PayPal signs: ``id|time|webhook_id|crc32`` with the body's unsigned decimal CRC-32."""
    return f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()


# ---------------------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------------------


class PayPalSandbox:
    """PayPal API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        policy = OAuthPolicy(
            access_ttl=DEFAULT_KNOBS["token_ttl"],
            refresh_idle_ttl=None,
            rotate=False,
            client_auth=frozenset({"basic"}),
            pkce=False,
            token_type="Bearer",
        )
        self.oauth = OAuthServer(
            clock,
            policy,
            extra_token_fields=self._token_extras,
            client_credentials_subject=self._subject,
            access_token_factory=self._new_token,
            access_ttl_for=self._ttl_for,
        )
        self._runtime: dict[str, _Runtime] = {}
        self._by_client: dict[str, str] = {}
        self._token_clients: dict[str, str] = {}  # access token -> client id
        self._lock = threading.Lock()
        self._faults: dict[str | None, _Faults] = {}
        self.stats: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.certs = MessageCerts()
        self.webhooks = WebhookOutbox("paypal", clock, retry_delays=WEBHOOK_RETRY_DELAYS)
        self._hooks: dict[str, _Hook] = {}  # webhook id -> subscription
        self._events: dict[str, dict[str, bytes]] = {}  # account id -> event id -> the body as sent
        self._public: str | None = None  # this server's base URL, learnt from the requests it serves

    # --- accounts -----------------------------------------------------------------------------------------

    def account(self, account_id: str) -> PayPalAccount | None:
        """The account with this merchant id, if any."""
        rt = self._runtime.get(account_id)
        return rt.account if rt else None

    def add_account(self, body: Mapping[str, Any]) -> PayPalAccount:
        """Generate an account from a spec and install it (replacing one with the same id or client)."""
        account = PayPalAccount(normalise_spec(body), now=self.clock())
        self._install(account)
        return account

    def _install(self, account: PayPalAccount) -> None:
        with self._lock:
            old = self._by_client.get(account.client_id)
            if old is not None and old != account.id:
                self._runtime.pop(old, None)
            for client_id in [c for c, aid in self._by_client.items() if aid == account.id]:
                del self._by_client[client_id]
            self._runtime[account.id] = _Runtime(account)
            self._by_client[account.client_id] = account.id
        account.on_event = partial(self._emit, account.id)
        self.oauth.register_client(account.client_id, account.client_secret)

    def _summary(self, account: PayPalAccount) -> dict[str, Any]:
        return {
            "id": account.id,
            "account_number": account.id,
            "client_id": account.client_id,
            "app_id": account.app_id,
            "base_path": API_PREFIX,
            "token_path": TOKEN_PATH,
            "counts": account.counts(),
            "knobs": account.knobs,
            "currencies": account.currencies,
        }

    def _account_of_client(self, client_id: str) -> PayPalAccount | None:
        aid = self._by_client.get(client_id)
        return self.account(aid) if aid else None

    # --- OAuth --------------------------------------------------------------------------------------------

    def _subject(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        aid = self._by_client.get(client_id)
        return {"account": aid} if aid else {}

    def _new_token(self, grant: Grant, expires_at: int) -> str:
        token = "A21AA" + secrets.token_urlsafe(69)
        self._token_clients[token] = grant.client_id
        return token

    def _ttl_for(self, grant: Grant) -> int:
        account = self._account_of_client(grant.client_id)
        return int(account.knobs["token_ttl"]) if account else DEFAULT_KNOBS["token_ttl"]

    def _token_extras(self, grant: Grant, body: dict[str, Any]) -> dict[str, Any]:
        account = self._account_of_client(grant.client_id)
        scopes = account.knobs["scopes"] if account else list(DEFAULT_SCOPES)
        nonce = stamp(self.clock()) + secrets.token_urlsafe(32)[:43]
        return {"scope": " ".join(scopes), "app_id": account.app_id if account else "", "nonce": nonce}

    @staticmethod
    def _basic_client(authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("basic "):
            return None
        try:
            return base64.b64decode(authorization[6:].strip()).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return None

    async def _token(self, request: Request) -> Response:
        """``POST /v1/oauth2/token``: client credentials with HTTP Basic."""
        route = "POST /v1/oauth2/token"
        authorization = request.headers.get("authorization")
        client_id = self._basic_client(authorization)
        account = self._account_of_client(client_id) if client_id else None
        rt = self._runtime.get(account.id) if account else None
        if rt is not None:
            faults = self._fault_for(rt.account.id)
            if faults is not None:
                if faults.latency_ms:
                    await asyncio.sleep(faults.latency_ms / 1000)
                if faults.token_errors > 0:
                    faults.token_errors -= 1
                    return self._error(_server_error(500), route, rt)
            wait = rt.window.take(
                rt.account.knobs["requests_per_minute"], rt.account.knobs["minute_seconds"], time.monotonic()
            )
            if wait is not None:
                rt.throttled += 1
                return self._error(_rate_limited(math.ceil(wait)), route, rt)
            rt.requests += 1
        body = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        grant_type = form.get("grant_type")
        try:
            if grant_type is not None and grant_type != "client_credentials":
                self.oauth.authenticate_client(form, authorization)
                raise OAuthError("unsupported_grant_type", "Grant Type is not supported", 400)
            if grant_type is None:
                self.oauth.authenticate_client(form, authorization)
                raise OAuthError("unsupported_grant_type", "Grant Type is NULL", 400)
            payload = self.oauth.token(form, authorization)
        except OAuthError as err:
            description = "Client Authentication failed" if err.error == "invalid_client" else err.description
            self._count(route, err.status)
            return json_response(
                err.status,
                {"error": err.error, "error_description": description},
                {"paypal-debug-id": _debug_id()},
            )
        if rt is not None:
            rt.tokens += 1
        ordered = {k: payload[k] for k in ("scope", "access_token", "token_type", "app_id", "expires_in", "nonce")}
        self._count(route, 200)
        return json_response(200, ordered, {"paypal-debug-id": _debug_id(), "cache-control": "no-store"})

    async def _terminate(self, request: Request) -> Response:
        """``POST /v1/oauth2/token/terminate``: revoke an access token with the app's Basic credentials."""
        route = "POST /v1/oauth2/token/terminate"
        try:
            client = self.oauth.authenticate_client({}, request.headers.get("authorization"))
        except OAuthError as err:
            self._count(route, err.status)
            return json_response(err.status, {"error": err.error, "error_description": "Client Authentication failed"})
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        token = form.get("token", "")
        self.oauth.revoke(token, client.client_id)
        self._count(route, 200)
        return Response(b"", status_code=200)

    # --- API ----------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """API routes under ``/paypal/api`` and control routes under ``/_sandbox/paypal``."""
        return [self._remembering(route) for route in self._routes()]

    def _remembering(self, route: BaseRoute) -> BaseRoute:
        """The route, noting this server's base URL from its first request (webhook certificate URLs)."""
        if not isinstance(route, Route):
            return route
        endpoint = route.endpoint

        async def noted(request: Request) -> Response:
            if self._public is None:
                self._public = str(request.base_url).rstrip("/")
            return await endpoint(request)

        noted.__name__ = getattr(endpoint, "__name__", "endpoint")
        return Route(route.path, noted, methods=sorted((route.methods or {"GET"}) - {"HEAD"}), name=route.name)

    def _routes(self) -> list[BaseRoute]:
        api = f"{API_PREFIX}/v1"
        events = f"{api}/notifications/webhooks-events"
        control = CONTROL_PREFIX
        return [
            Route(TOKEN_PATH, self._token, methods=["POST"]),
            Route(TERMINATE_PATH, self._terminate, methods=["POST"]),
            Route(f"{api}/reporting/transactions", self._api("transactions"), methods=["GET"]),
            Route(f"{api}/billing/subscriptions", self._api("subscriptions"), methods=["GET"]),
            Route(f"{api}/billing/subscriptions/{{sid}}", self._api("subscription"), methods=["GET"]),
            Route(
                f"{api}/billing/subscriptions/{{sid}}/transactions",
                self._api("subscription_transactions"),
                methods=["GET"],
            ),
            Route(f"{api}/billing/plans", self._api("plans"), methods=["GET"]),
            Route(f"{api}/billing/plans/{{pid}}", self._api("plan"), methods=["GET"]),
            Route(f"{api}/billing/subscriptions/{{sid}}/{{action}}", self._subscription_action, methods=["POST"]),
            Route(f"{API_PREFIX}/v2/payments/captures/{{capture_id}}", self._payments_api, methods=["GET"]),
            Route(f"{API_PREFIX}/v2/payments/captures/{{capture_id}}/refund", self._payments_api, methods=["POST"]),
            Route(f"{api}/payments/sale/{{sale_id}}", self._payments_api, methods=["GET"]),
            Route(f"{api}/notifications/certs/{{name}}", self._cert, methods=["GET"]),
            Route(f"{api}/notifications/verify-webhook-signature", self._verify_signature, methods=["POST"]),
            Route(f"{api}/notifications/webhooks", self._webhooks_api, methods=["GET", "POST"]),
            Route(f"{api}/notifications/webhooks/{{webhook_id}}", self._webhooks_api, methods=["GET", "DELETE"]),
            Route(events, self._webhook_events_api, methods=["GET"]),
            Route(f"{events}/{{event_id}}", self._webhook_events_api, methods=["GET"]),
            Route(f"{events}/{{event_id}}/resend", self._webhook_events_api, methods=["POST"]),
            Route(f"{API_PREFIX}/{{rest:path}}", self._unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            *self.oauth.control_routes(control),
            Route(f"{control}/accounts", _control(self._c_accounts), methods=["GET", "POST"]),
            Route(f"{control}/accounts/{{aid}}", _control(self._c_account), methods=["GET"]),
            Route(f"{control}/accounts/{{aid}}/changes", _control(self._c_changes), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/records", _control(self._c_records), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/bulk", _control(self._c_bulk), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/knobs", _control(self._c_knobs), methods=["PATCH"]),
            Route(f"{control}/accounts/{{aid}}/expire-tokens", _control(self._c_expire), methods=["POST"]),
            Route(f"{control}/accounts/{{aid}}/export/{{entity}}", _control(self._c_export), methods=["GET"]),
            Route(f"{control}/faults", _control(self._c_faults), methods=["POST", "DELETE"]),
            Route(f"{control}/stats", _control(self._c_stats), methods=["GET"]),
            Route(f"{control}/webhook-ca", _control(self._c_webhook_ca), methods=["GET"]),
            Route(f"{control}/webhook-certs", _control(self._c_webhook_certs), methods=["POST"]),
            Route(f"{control}/webhook-signatures", _control(self._c_webhook_signature), methods=["POST"]),
            *webhook_control_routes(control, self.webhooks, self._webhook_subscriber),
        ]

    _ROUTES = {
        "transactions": ("GET /v1/reporting/transactions", SCOPE_REPORTING),
        "subscriptions": ("GET /v1/billing/subscriptions", SCOPE_SUBSCRIPTIONS),
        "subscription": ("GET /v1/billing/subscriptions/{id}", SCOPE_SUBSCRIPTIONS),
        "subscription_transactions": ("GET /v1/billing/subscriptions/{id}/transactions", SCOPE_SUBSCRIPTIONS),
        "plans": ("GET /v1/billing/plans", SCOPE_SUBSCRIPTIONS),
        "plan": ("GET /v1/billing/plans/{id}", SCOPE_SUBSCRIPTIONS),
    }

    def _api(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, kind)

        endpoint.__name__ = f"paypal_{kind}"
        return endpoint

    async def _unknown(self, request: Request) -> Response:
        self._count(f"{request.method} (unknown)", 404)
        return _render_error(PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist."))

    def _count(self, route: str, status: int) -> None:
        self.stats["requests"] += 1
        self.by_route[route] += 1
        self.by_status[str(status)] += 1

    def _error(self, err: PayPalError, route: str, rt: _Runtime | None) -> Response:
        self._count(route, err.status)
        return _render_error(err)

    def _fault_for(self, account_id: str) -> _Faults | None:
        for key in (account_id, None):
            f = self._faults.get(key)
            if f is not None and f.active():
                return f
        return None

    def _authenticate(self, request: Request) -> _Runtime:
        try:
            grant = self.oauth.check_access(request.headers.get("authorization"))
        except AccessDenied as denied:
            if denied.reason == "expired":
                token = request.headers.get("authorization", "")[7:].strip()
                account = self._account_of_client(self._token_clients.get(token, ""))
                style = account.knobs["expired_token_error"] if account else DEFAULT_KNOBS["expired_token_error"]
                if style == "invalid_token":
                    raise _InvalidToken() from None
            raise _auth_failure() from None
        account = self._account_of_client(grant.client_id)
        rt = self._runtime.get(account.id) if account else None
        if rt is None:
            raise _auth_failure()
        return rt

    async def _admit(self, request: Request, route: str, scope: str) -> _Runtime | Response:
        """Authenticate a call and apply the account's faults, rate limit and scopes; a ``Response`` refuses it."""
        try:
            rt = self._authenticate(request)
        except _InvalidToken:
            self._count(route, 401)
            return json_response(
                401,
                {"error": "invalid_token", "error_description": "Access Token not found in cache"},
                {"paypal-debug-id": _debug_id()},
            )
        except PayPalError as err:
            return self._error(err, route, None)
        account = rt.account
        faults = self._fault_for(account.id)
        if faults is not None:
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            if faults.server_errors > 0:
                faults.server_errors -= 1
                return self._error(_server_error(faults.server_error_status), route, rt)
            if faults.rate_limited > 0:
                faults.rate_limited -= 1
                rt.throttled += 1
                return self._error(_rate_limited(faults.retry_after), route, rt)
        wait = rt.window.take(account.knobs["requests_per_minute"], account.knobs["minute_seconds"], time.monotonic())
        if wait is not None:
            rt.throttled += 1
            return self._error(_rate_limited(math.ceil(wait)), route, rt)
        rt.requests += 1
        if scope not in account.knobs["scopes"]:
            return self._error(_not_authorized(), route, rt)
        return rt

    async def _serve(self, request: Request, kind: str) -> Response:
        route, scope = self._ROUTES[kind]
        admitted = await self._admit(request, route, scope)
        if isinstance(admitted, Response):
            return admitted
        rt = admitted
        account = rt.account
        faults = self._fault_for(account.id)
        base_url = str(request.base_url).rstrip("/") + API_PREFIX
        params = dict(request.query_params)
        try:
            if kind == "transactions":
                rt.searches += 1
                if faults is not None and faults.data_unavailable > 0:
                    faults.data_unavailable -= 1
                    raise _not_available()
                now = self.clock()
                payload = await run_in_threadpool(account.search, params, now, base_url)
            elif kind == "subscription":
                with account.lock:
                    payload = account.subscription(request.path_params["sid"], base_url, params.get("fields"))
            elif kind == "subscription_transactions":
                with account.lock:
                    payload = account.subscription_transactions(request.path_params["sid"], params, base_url)
            elif kind == "subscriptions":
                if not account.knobs["list_subscriptions"]:
                    raise PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.")
                with account.lock:
                    payload = account.list_subscriptions(params, base_url)
            elif kind == "plans":
                with account.lock:
                    payload = account.list_plans(params, request.headers.get("prefer", "return=minimal"), base_url)
            else:
                with account.lock:
                    payload = account.plan(request.path_params["pid"], base_url)
        except PayPalError as err:
            return self._error(err, route, rt)
        self._count(route, 200)
        return _ok(payload)

    # --- payments and subscription actions --------------------------------------------------------------

    async def _payments_api(self, request: Request) -> Response:
        """``GET /v2/payments/captures/{id}``, ``POST …/{id}/refund``, ``GET /v1/payments/sale/{id}``."""
        path = request.url.path
        refund = request.method == "POST"
        if "/v1/payments/sale/" in path:
            route, scope = "GET /v1/payments/sale/{id}", SCOPE_PAYMENTS
        elif refund:
            route, scope = "POST /v2/payments/captures/{id}/refund", SCOPE_REFUNDS
        else:
            route, scope = "GET /v2/payments/captures/{id}", SCOPE_PAYMENTS
        admitted = await self._admit(request, route, scope)
        if isinstance(admitted, Response):
            return admitted
        account, base_url = admitted.account, self._base_url(request)
        status = 200
        try:
            with account.lock:
                if "/v1/payments/sale/" in path:
                    payload = account.sale(request.path_params["sale_id"], base_url)
                elif refund:
                    body = await _paypal_json(request)
                    status, payload = account.refund_capture(request.path_params["capture_id"], body,
                                                             request.headers.get("paypal-request-id"), self.clock(),
                                                             base_url)  # fmt: skip
                else:
                    payload = account.capture(request.path_params["capture_id"], base_url)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, status)
        return _ok(payload, status)

    async def _subscription_action(self, request: Request) -> Response:
        """``POST /v1/billing/subscriptions/{id}/suspend|activate|cancel`` with an optional ``reason``."""
        action = request.path_params["action"]
        route = f"POST /v1/billing/subscriptions/{{id}}/{action}"
        if action not in _SUBSCRIPTION_ACTIONS:
            return await self._unknown(request)
        admitted = await self._admit(request, route, SCOPE_SUBSCRIPTIONS)
        if isinstance(admitted, Response):
            return admitted
        try:
            body = await _paypal_json(request)
            reason = body.get("reason")
            with admitted.account.lock:
                admitted.account.subscription_action(request.path_params["sid"], action,
                                                     str(reason) if reason else None, self.clock())  # fmt: skip
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 204)
        return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})

    # --- webhooks -----------------------------------------------------------------------------------------

    def _api_base(self) -> str:
        return f"{self._public or 'http://127.0.0.1'}{API_PREFIX}"

    def _cert_url(self, name: str) -> str:
        return f"{self._api_base()}/v1/notifications/certs/{name}"

    def sign(self, body: bytes, webhook_id: str, now: int, cert: str | None = None) -> dict[str, str]:
        """The headers PayPal sends with ``body`` for ``webhook_id`` at ``now``: a fresh transmission id and
        time, their signature by the certificate's key, its URL here, and the algorithm."""
        name = cert or self.certs.default()
        transmission_id, at = str(uuid.uuid4()), stamp(now)
        signature = self.certs.sign(name, signed_message(transmission_id, at, webhook_id, body))
        return {"PAYPAL-TRANSMISSION-ID": transmission_id, "PAYPAL-TRANSMISSION-TIME": at,
                "PAYPAL-TRANSMISSION-SIG": signature, "PAYPAL-CERT-URL": self._cert_url(name),
                "PAYPAL-AUTH-ALGO": AUTH_ALGO}  # fmt: skip

    def _signer(self, webhook_id: str) -> Signer:
        def sign(body: bytes, now: int) -> dict[str, str]:
            hook = self._hooks.get(webhook_id)
            return self.sign(body, webhook_id, now, hook.cert if hook else None)

        return sign

    def _new_hook(self, account_id: str, url: str, webhook_id: str | None, event_types: Any,
                  cert: str | None = None) -> _Hook:  # fmt: skip
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ControlError(400, "url must be an http(s) URL")
        if webhook_id is None:
            webhook_id = _random_id(17)
        if not isinstance(webhook_id, str) or not re.fullmatch(r"[A-Za-z0-9]{1,50}", webhook_id):
            raise ControlError(400, "webhook_id must be 1 to 50 letters and digits")
        if webhook_id in self._hooks:
            raise ControlError(400, f"webhook {webhook_id} exists already")
        types = event_types if event_types is not None else ["*"]
        if not isinstance(types, list) or not types or not all(isinstance(t, str) and t for t in types):
            raise ControlError(400, 'event_types must be a non-empty list of event types, or ["*"]')
        if cert is not None and cert not in self.certs.certs:
            raise ControlError(400, f"no certificate {cert!r} (mint one with POST {CONTROL_PREFIX}/webhook-certs)")
        hook = _Hook(webhook_id, account_id, url, None if "*" in types else frozenset(types), cert)
        self._hooks[webhook_id] = hook
        return hook

    def _webhook_subscriber(self, body: dict[str, Any]) -> tuple[str, Signer]:
        """Read a control subscription's PayPal fields: ``account``, ``webhook_id`` (assigned when absent),
        ``event_types`` (``["*"]`` by default) and ``cert`` (a minted certificate to sign with)."""
        reject_unknown_fields(body, _WEBHOOK_FIELDS, "webhook subscription")
        account_id = str(body.get("account", ""))
        self._rt(account_id)
        hook = self._new_hook(account_id, body.get("url"), body.get("webhook_id"), body.get("event_types"),
                              body.get("cert"))  # fmt: skip
        return hook.key, self._signer(hook.webhook_id)

    def _emit(self, account_id: str, event_type: str, resource_type: str,
              build: Callable[[str], dict[str, Any]]) -> None:  # fmt: skip
        """Send an event about a change to every webhook of the account that wants its type."""
        hooks = [h for h in self._hooks.values() if h.account == account_id and h.wants(event_type)]
        if not hooks:
            return
        base = self._api_base()
        event_id = f"WH-{_random_id(17)}-{_random_id(17)}"
        resource = build(base)
        event = {
            "id": event_id,
            "event_version": "1.0",
            "create_time": stamp(self.clock()),
            "resource_type": resource_type,
            "resource_version": "1.0" if event_type.startswith("PAYMENT.SALE.") else "2.0",
            "event_type": event_type,
            "summary": _EVENT_SUMMARIES.get(event_type, event_type.replace(".", " ").capitalize()),
            "resource": resource,
            "links": [
                {"href": f"{base}/v1/notifications/webhooks-events/{event_id}", "rel": "self", "method": "GET"},
                {"href": f"{base}/v1/notifications/webhooks-events/{event_id}/resend", "rel": "resend",
                 "method": "POST"},
            ],
        }  # fmt: skip
        body = orjson.dumps(event)
        kept = self._events.setdefault(account_id, {})
        kept[event_id] = body
        if len(kept) > EVENTS_KEPT:
            del kept[next(iter(kept))]
        for hook in hooks:
            self.webhooks.emit(hook.key, body)

    def close(self) -> None:
        """Stop the webhook delivery thread (undelivered events are dropped)."""
        self.webhooks.close()

    async def _cert(self, request: Request) -> Response:
        """``GET /v1/notifications/certs/{name}``: a signing certificate (PEM), public like PayPal's."""
        route = "GET /v1/notifications/certs/{name}"
        cert = self.certs.certs.get(request.path_params["name"])
        if cert is None:
            self._count(route, 404)
            return _render_error(PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist."))
        self._count(route, 200)
        return Response(cert.pem, headers={"content-type": "application/x-pem-file"})

    async def _verify_signature(self, request: Request) -> Response:
        """``POST /v1/notifications/verify-webhook-signature``: PayPal's own check, over ``webhook_event``
        serialised again (so an event whose bytes differ from what was signed fails, as at PayPal)."""
        route = "POST /v1/notifications/verify-webhook-signature"
        admitted = await self._admit(request, route, SCOPE_VERIFY_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        try:
            body = _verify_request(await _paypal_json(request))
        except PayPalError as err:
            return self._error(err, route, admitted)
        hook = self._hooks.get(body["webhook_id"])
        name = body["cert_url"].rsplit("/", 1)[-1]
        message = signed_message(body["transmission_id"], body["transmission_time"], body["webhook_id"],
                                 orjson.dumps(body["webhook_event"]))  # fmt: skip
        genuine = (
            hook is not None
            and hook.account == admitted.account.id
            and body["auth_algo"] == AUTH_ALGO
            and body["cert_url"] == self._cert_url(name)
            and self.certs.genuine(name, message, body["transmission_sig"])
        )
        self._count(route, 200)
        return _ok({"verification_status": "SUCCESS" if genuine else "FAILURE"})

    def _webhook_object(self, hook: _Hook) -> dict[str, Any]:
        href = f"{self._api_base()}/v1/notifications/webhooks/{hook.webhook_id}"
        types = ["*"] if hook.event_types is None else sorted(hook.event_types)
        return {
            "id": hook.webhook_id,
            "url": hook.url,
            "event_types": [{"name": t, "description": _EVENT_SUMMARIES.get(t, "ALL")} for t in types],
            "links": [
                {"href": href, "rel": "self", "method": "GET"},
                {"href": href, "rel": "update", "method": "PATCH"},
                {"href": href, "rel": "delete", "method": "DELETE"},
            ],
        }

    async def _webhooks_api(self, request: Request) -> Response:
        """``POST``/``GET /v1/notifications/webhooks`` and ``GET``/``DELETE …/{webhook_id}``: the app's webhooks."""
        wid = request.path_params.get("webhook_id")
        route = f"{request.method} /v1/notifications/webhooks" + ("/{id}" if wid else "")
        admitted = await self._admit(request, route, SCOPE_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        account = admitted.account
        mine = {w: h for w, h in self._hooks.items() if h.account == account.id}
        try:
            if wid is not None:
                hook = mine.get(wid)
                if hook is None:
                    raise PayPalError(404, "INVALID_RESOURCE_ID", "Resource id is invalid.")
                if request.method == "GET":
                    self._count(route, 200)
                    return _ok(self._webhook_object(hook))
                for sub in self.webhooks.subscriptions(hook.key):
                    self.webhooks.unsubscribe(sub.id)
                del self._hooks[wid]
                self._count(route, 204)
                return Response(status_code=204, headers={"paypal-debug-id": _debug_id()})
            if request.method == "GET":
                self._count(route, 200)
                return _ok({"webhooks": [self._webhook_object(h) for h in mine.values()]})
            body = await _paypal_json(request)
            url, types = body.get("url"), body.get("event_types")
            if len(mine) >= 10:
                raise PayPalError(400, "WEBHOOK_NUMBER_LIMIT_EXCEEDED", "Maximum number of webhooks exceeded.")
            if any(h.url == url for h in mine.values()):
                raise PayPalError(400, "WEBHOOK_URL_ALREADY_EXISTS", "Webhook URL already exists.")
            names = [t.get("name") if isinstance(t, dict) else None for t in types] if isinstance(types, list) else []
            if not names or not all(isinstance(n, str) for n in names):
                issue = {"field": "event_types", "issue": "Event types must be a non-empty list of {name}."}
                raise PayPalError(400, "VALIDATION_ERROR", "Invalid data provided.", [issue])
            try:
                hook = self._new_hook(account.id, url, None, names)
            except ControlError as err:
                raise PayPalError(
                    400, "VALIDATION_ERROR", "Invalid data provided.", [{"field": "url", "issue": err.message}]
                ) from None
            self.webhooks.subscribe(hook.key, hook.url, self._signer(hook.webhook_id))
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 201)
        return _ok(self._webhook_object(hook), 201)

    async def _webhook_events_api(self, request: Request) -> Response:
        """``GET /v1/notifications/webhooks-events`` (newest first, ``page_size``, ``event_type``,
        ``start_time``/``end_time``), ``GET …/{id}`` and ``POST …/{id}/resend``."""
        eid = request.path_params.get("event_id")
        resend = request.url.path.endswith("/resend")
        suffix = ("/{id}" if eid else "") + ("/resend" if resend else "")
        route = f"{request.method} /v1/notifications/webhooks-events{suffix}"
        admitted = await self._admit(request, route, SCOPE_WEBHOOKS)
        if isinstance(admitted, Response):
            return admitted
        events = self._events.get(admitted.account.id, {})
        try:
            if eid is None:
                params = request.query_params
                size = _schema_int(params, "page_size", 10, 1, 300)
                start, end = _time_param(params, "start_time"), _time_param(params, "end_time")
                found = []
                for body in reversed(list(events.values())):
                    event = orjson.loads(body)
                    if params.get("event_type") and event["event_type"] != params["event_type"]:
                        continue
                    if not _in_range(parse_time(event["create_time"]), (start, end)):
                        continue
                    found.append(event)
                self._count(route, 200)
                return _ok({"events": found[:size], "count": min(size, len(found)), "links": []})
            body = events.get(eid)
            if body is None:
                raise PayPalError(404, "INVALID_RESOURCE_ID", "Resource id is invalid.")
            if not resend:
                self._count(route, 200)
                return Response(body, headers={"content-type": _JSON_CT, "paypal-debug-id": _debug_id()})
            event = orjson.loads(body)
            wanted = (await _paypal_json(request)).get("webhook_ids")
            for hook in list(self._hooks.values()):
                if hook.account == admitted.account.id and (not wanted or hook.webhook_id in wanted):
                    self.webhooks.emit(hook.key, body)
        except PayPalError as err:
            return self._error(err, route, admitted)
        self._count(route, 202)
        return _ok(event, 202)

    # --- control API --------------------------------------------------------------------------------------

    def _rt(self, account_id: str) -> _Runtime:
        return lookup(self._runtime, account_id, "account")

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + API_PREFIX

    async def _c_accounts(self, request: Request) -> Any:
        if request.method == "GET":
            return [self._summary(rt.account) for rt in self._runtime.values()]
        spec = normalise_spec(await read_json_object(request))
        started = time.perf_counter()
        now = self.clock()
        account = await run_in_threadpool(lambda: PayPalAccount(spec, now=now))
        self._install(account)
        return {**self._summary(account), "generation_seconds": round(time.perf_counter() - started, 3)}

    async def _c_account(self, request: Request) -> Any:
        return self._summary(self._rt(request.path_params["aid"]).account)

    async def _c_changes(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        reject_unknown_fields(body, _CHANGE_FIELDS, "change")
        changes = {k: _int_field(body, k, 0) or 0 for k in _CHANGE_FIELDS}
        return account.apply_changes(changes, self.clock())

    async def _c_records(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        entity = str(body.get("entity", "")).lower().rstrip("s")
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        at = body.get("at")
        if at is None:
            at = self.clock()
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            raise ControlError(400, "at must be unix seconds")
        return account.add_record(entity, fields, int(at), self.clock(), self._base_url(request))

    async def _c_bulk(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        count = _int_field(body, "count", None, 0)
        if count is None or not isinstance(body.get("day"), str):
            raise ControlError(400, 'bulk needs {"day": "YYYY-MM-DD", "count": n}')
        started = time.perf_counter()
        result = await run_in_threadpool(account.bulk, body["day"], count)
        return {**result, "generation_seconds": round(time.perf_counter() - started, 3)}

    async def _c_knobs(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        body = await read_json_object(request)
        if "date_style" in body:
            raise ControlError(400, "date_style is fixed when the account is created")
        account.knobs = normalise_knobs(body, account.knobs)
        return {"id": account.id, "knobs": account.knobs}

    async def _c_expire(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        expired = 0
        for grant in list(self.oauth.grants.values()):
            if grant.client_id == account.client_id:
                expired += self.oauth.expire_access_tokens(grant.id)
        return {"id": account.id, "expired": expired}

    async def _c_export(self, request: Request) -> Any:
        account = self._rt(request.path_params["aid"]).account
        entity = request.path_params["entity"].lower()
        if not entity.endswith("s"):
            entity += "s"
        visible = request.query_params.get("visible", "").lower() in ("1", "true", "yes")
        return await run_in_threadpool(account.export, entity, self.clock(), self._base_url(request), visible)

    async def _c_faults(self, request: Request) -> Any:
        if request.method == "DELETE":
            return clear_scoped_faults(self._faults, request.query_params.get("account"))
        body = await read_json_object(request)
        reject_unknown_fields(body, _FAULT_FIELDS, "fault")
        target = body.get("account")
        if target is not None:
            self._rt(str(target))
            target = str(target)
        f = self._faults.setdefault(target, _Faults())
        for name in ("server_errors", "rate_limited", "token_errors", "data_unavailable"):
            if name in body:
                setattr(f, name, _int_field(body, name, 0) or 0)
        if "retry_after" in body:
            f.retry_after = _int_field(body, "retry_after", 1, 1) or 1
        if "server_error_status" in body:
            status = body["server_error_status"]
            if status not in (500, 502, 503, 504):
                raise ControlError(400, "server_error_status must be 500, 502, 503 or 504")
            f.server_error_status = status
        if "latency_ms" in body:
            f.latency_ms = number_field(body, "latency_ms", 0.0)
        return {"account": target, **f.as_dict()}

    async def _c_webhook_ca(self, request: Request) -> Any:
        """The CA a sandbox connection trusts for webhook certificates (its ``webhook_ca_pem`` setting)."""
        return {"pem": await run_in_threadpool(self.certs.ca_pem)}

    async def _c_webhook_certs(self, request: Request) -> Any:
        """Mint and publish a certificate: ``{"kind": "valid" | "expired" | "untrusted" | "wrong_cn"}``."""
        body = await read_json_object(request)
        reject_unknown_fields(body, {"kind"}, "certificate")
        cert = await run_in_threadpool(self.certs.mint, str(body.get("kind", "valid")))
        return {"name": cert.name, "kind": cert.kind, "cert_url": self._cert_url(cert.name)}

    async def _c_webhook_signature(self, request: Request) -> Any:
        """The headers a delivery of ``body`` (text, or ``body_base64``) to ``webhook_id`` would carry, signed
        at ``at`` (default now) by the genuine certificate or a minted ``cert``; for tests that forge."""
        body = await read_json_object(request)
        reject_unknown_fields(body, {"body", "body_base64", "webhook_id", "cert", "at"}, "signature")
        if isinstance(body.get("body_base64"), str):
            raw = base64.b64decode(body["body_base64"])
        elif isinstance(body.get("body"), str):
            raw = body["body"].encode()
        else:
            raise ControlError(400, "give the delivery's body as body (text) or body_base64")
        webhook_id, cert = body.get("webhook_id"), body.get("cert")
        if not isinstance(webhook_id, str) or not webhook_id:
            raise ControlError(400, "webhook_id is required")
        if cert is not None and cert not in self.certs.certs:
            raise ControlError(404, f"no certificate {cert!r}")
        at = _int_field(body, "at", None, 0)
        now = self.clock() if at is None else at
        return {"headers": await run_in_threadpool(self.sign, raw, webhook_id, now, cert)}

    async def _c_stats(self, request: Request) -> Any:
        return {
            "requests": self.stats["requests"],
            "by_route": dict(self.by_route),
            "by_status": dict(self.by_status),
            "accounts": {
                aid: {
                    "requests": rt.requests,
                    "throttled": rt.throttled,
                    "tokens": rt.tokens,
                    "searches": rt.searches,
                }
                for aid, rt in self._runtime.items()
            },
            "faults": {str(k): f.as_dict() for k, f in self._faults.items()},
            "oauth": self.oauth.control_state()["stats"],
        }


class _InvalidToken(Exception):
    """An expired token answered the ``invalid_token`` way."""


class PayPalControl(WebhookControl):
    """Typed calls to the PayPal control API of a running ``SandboxServer``."""

    prefix = CONTROL_PREFIX

    def add_account(self, client_id: str, client_secret: str, **spec: Any) -> dict[str, Any]:
        """Create a merchant app: seed, transactions, subscriptions, plans, days, currencies, id and knobs."""
        return self._call("POST", "/accounts", json={"client_id": client_id, "client_secret": client_secret, **spec})

    def accounts(self) -> list[dict[str, Any]]:
        """Summaries of every account."""
        return self._call("GET", "/accounts")

    def account(self, account_id: str) -> dict[str, Any]:
        """One account's summary (counts, knobs, app id)."""
        return self._call("GET", f"/accounts/{account_id}")

    def changes(self, account_id: str, **counts: int) -> dict[str, list[str]]:
        """Apply transactions, refunds, subscription_updates and cancels now."""
        return self._call("POST", f"/accounts/{account_id}/changes", json=counts)

    def add_record(
        self, account_id: str, entity: str, fields: Mapping[str, Any] | None = None, at: int | None = None
    ) -> dict[str, Any]:
        """Create a transaction, subscription or plan (at ``at``) and return it as the API would."""
        body: dict[str, Any] = {"entity": entity, "fields": dict(fields or {})}
        if at is not None:
            body["at"] = at
        return self._call("POST", f"/accounts/{account_id}/records", json=body)

    def bulk(self, account_id: str, day: str, count: int) -> dict[str, Any]:
        """``count`` transactions spread over the UTC day ``YYYY-MM-DD``."""
        return self._call("POST", f"/accounts/{account_id}/bulk", json={"day": day, "count": count})

    def set_knobs(self, account_id: str, **knobs: Any) -> dict[str, Any]:
        """Change knobs of a running account (all but ``date_style``)."""
        return self._call("PATCH", f"/accounts/{account_id}/knobs", json=knobs)

    def expire_tokens(self, account_id: str) -> dict[str, Any]:
        """Expire every access token of the account's app now."""
        return self._call("POST", f"/accounts/{account_id}/expire-tokens")

    def export(self, account_id: str, entity: str, visible: bool = False) -> dict[str, Any]:
        """``{"records", "deleted_ids"}`` for transactions, subscriptions or plans."""
        params = {"visible": "true"} if visible else None
        return self._call("GET", f"/accounts/{account_id}/export/{entity}", params=params)

    def set_faults(self, account: str | None = None, **faults: Any) -> dict[str, Any]:
        """Inject server_errors, rate_limited, latency_ms, token_errors, data_unavailable (one account or all)."""
        return self._set_faults("account", account, faults)

    def clear_faults(self, account: str | None = None) -> dict[str, Any]:
        """Remove injected faults (of one account, or all)."""
        return self._clear_faults("account", account)

    def stats(self) -> dict[str, Any]:
        """Request counts per route and status, per account, and the OAuth statistics."""
        return self._call("GET", "/stats")

    def oauth_state(self) -> dict[str, Any]:
        """Token calls per grant type and the grants."""
        return self._call("GET", "/oauth")

    def subscribe_webhooks(self, account_id: str, url: str, webhook_id: str | None = None,
                           **options: Any) -> dict[str, Any]:  # fmt: skip
        """Deliver the account's events to ``url`` for ``webhook_id`` (assigned when None); options:
        ``event_types``, ``retry_delays``, ``hold``, ``duplicate_rate``, ``cert``. Returns ``{"id", "account",
        "url", "webhook_id"}`` (``id`` names the subscription in the hold/release/flush calls)."""
        webhook_id = webhook_id or "WH" + uuid.uuid4().hex[:15].upper()
        body = {"account": account_id, "url": url, "webhook_id": webhook_id, **options}
        return {**self._call("POST", "/webhooks", json=body), "webhook_id": webhook_id}

    def webhook_ca(self) -> str:
        """The sandbox CA's PEM: a sandbox connection's ``webhook_ca_pem`` setting."""
        return self._call("GET", "/webhook-ca")["pem"]

    def mint_webhook_cert(self, kind: str) -> dict[str, str]:
        """Publish a certificate of ``kind`` (``valid``, ``expired``, ``untrusted``, ``wrong_cn``).

        Returns ``{"name", "kind", "cert_url"}``."""
        return self._call("POST", "/webhook-certs", json={"kind": kind})

    def sign_webhook(self, body: bytes, webhook_id: str, cert: str | None = None,
                     at: int | None = None) -> dict[str, str]:  # fmt: skip
        """The PAYPAL-* headers a delivery of ``body`` would carry (signed now, or at ``at``)."""
        payload: dict[str, Any] = {"body_base64": base64.b64encode(body).decode(), "webhook_id": webhook_id}
        if cert is not None:
            payload["cert"] = cert
        if at is not None:
            payload["at"] = at
        return self._call("POST", "/webhook-signatures", json=payload)["headers"]
