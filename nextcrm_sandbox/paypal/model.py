"""PayPal's vocabulary for the sandbox: host paths, OAuth scopes, ids, RFC 3339 times as PayPal writes and reads
them, and money as decimal strings in each currency's exponent with PayPal's fees."""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import math
import re
import secrets
import time
from typing import Any

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
SCOPE_INVOICING = "https://uri.paypal.com/services/invoicing"
SCOPE_BALANCES = "https://uri.paypal.com/services/reporting/balances/read"
DEFAULT_SCOPES = (
    SCOPE_INVOICING,
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
    SCOPE_BALANCES,
    SCOPE_VERIFY_WEBHOOKS,
)

_DAY = 86_400
_EMPTY: dict[str, Any] = {}  # shared empty section (never mutated)
_JSON_CT = "application/json"
_DECIMALS = {"JPY": 0, "HUF": 0, "TWD": 0}
_FIXED_FEE = {"USD": 49, "EUR": 39, "GBP": 30, "CAD": 59, "AUD": 30, "JPY": 40, "HUF": 90, "TWD": 10}
_PRICE_FACTOR = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CAD": 1.36, "AUD": 1.52, "JPY": 1.5, "HUF": 3.6, "TWD": 0.32}
_PAYER_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$")


def _random_id(length: int) -> str:
    """A fresh PayPal-looking id (webhooks, events)."""
    return "".join(secrets.choice(_PAYER_ALPHABET) for _ in range(length))


def _derived_id(prefix: str, seed: str) -> str:
    """A stable PayPal-looking id derived from another (an order of a capture, a v1 payment of a sale)."""
    digest = hashlib.sha256(f"{prefix}:{seed}".encode()).digest()
    text = "".join(_PAYER_ALPHABET[b % len(_PAYER_ALPHABET)] for b in digest[:17])
    return f"{prefix}{text}" if prefix.endswith("-") else text


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
