"""Generated PayPal data: the tables it draws from (transaction codes, payers, places, items, plans, subscription
statuses), the seeded random source, and the transaction and payer records."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nextcrm_sandbox.paypal.model import _PAYER_ALPHABET

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
