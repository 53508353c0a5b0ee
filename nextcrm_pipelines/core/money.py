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


# A float holds any decimal literal of up to 15 significant digits exactly enough that its shortest
# repr gives the literal back; past that, the JSON number may already have been rounded.
_MAX_FLOAT_DIGITS = 15


def decimal_amount(value: float | int | str | None) -> Decimal | None:
    """An amount sent as a JSON number (major units: Xero, QuickBooks, MYOB) as an exact Decimal.

    JSON parsers hand over floats; the shortest repr of a float restores the literal the provider
    wrote, as long as it had at most 15 significant digits. Longer ones are refused rather than
    stored approximately.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"amount must be a number, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        amount = Decimal(repr(value))
        if not amount.is_finite() or len(amount.as_tuple().digits) > _MAX_FLOAT_DIGITS:
            raise ValueError(f"amount {value!r} cannot be represented exactly")
        return amount
    if isinstance(value, str):
        return Decimal(value)
    raise ValueError(f"amount must be a number, got {value!r}")
