"""Deterministic generation for Stripe accounts: names, places, currencies, card brands, charge templates,
failures and prices, the seeded random source and Stripe-shaped ids."""

from __future__ import annotations

import calendar
import datetime as dt
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nextcrm_sandbox.stripe.model import _ALPHABET, _ZERO_DECIMAL

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
