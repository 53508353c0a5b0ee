"""Exact money: provider minor units to `numeric` major units by the currency's exponent.

Stripe sends integers in the currency's smallest unit; zero-decimal currencies (JPY, KRW, ...)
have no minor unit and three-decimal ones (BHD, KWD, ...) have three
(https://docs.stripe.com/currencies). Amounts never pass through float.
"""

from __future__ import annotations

from decimal import Decimal

ZERO_DECIMAL = frozenset(
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])


def currency_exponent(currency: str) -> int:
    """Number of minor-unit digits of an ISO 4217 currency, as Stripe counts them."""
    code = currency.lower()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def minor_to_major(amount: int | None, currency: str) -> Decimal | None:
    """An integer amount in minor units as an exact Decimal in major units (None stays None)."""
    if amount is None:
        return None
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise ValueError(f"amount must be an integer number of minor units, got {amount!r}")
    return Decimal(amount).scaleb(-currency_exponent(currency))
