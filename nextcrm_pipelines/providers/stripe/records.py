"""Stripe JSON -> rows of `stripe_payments` (charges) and `stripe_subscriptions`.

Amounts are integers in the currency's minor unit and become exact `numeric` major units by the
currency's exponent (JPY has none). A subscription ended by cancellation (Stripe's
`DELETE /v1/subscriptions/{id}`, event `customer.subscription.deleted`) or expiry is flagged
`deleted`; its row stays with its final status.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines.core.upsert import Row, TableSpec

ENDED_SUBSCRIPTION_STATUSES = frozenset({"canceled", "incomplete_expired"})

PAYMENTS_TABLE = TableSpec(
    "stripe_payments",
    (
        ("amount", "numeric"), ("amount_captured", "numeric"), ("amount_refunded", "numeric"),
        ("currency", "text"), ("status", "text"), ("paid", "bool"), ("captured", "bool"),
        ("refunded", "bool"), ("disputed", "bool"), ("customer_id", "text"), ("payment_intent_id", "text"),
        ("description", "text"), ("receipt_email", "text"), ("failure_code", "text"),
        ("failure_message", "text"), ("livemode", "bool"),
    ),
)  # fmt: skip

SUBSCRIPTIONS_TABLE = TableSpec(
    "stripe_subscriptions",
    (
        ("customer_id", "text"), ("status", "text"), ("currency", "text"), ("amount", "numeric"),
        ("billing_interval", "text"), ("quantity", "int4"), ("current_period_start", "timestamptz"),
        ("current_period_end", "timestamptz"), ("cancel_at_period_end", "bool"), ("canceled_at", "timestamptz"),
        ("ended_at", "timestamptz"), ("trial_end", "timestamptz"), ("livemode", "bool"),
    ),
)  # fmt: skip


def timestamp(value: Any) -> datetime | None:
    """Stripe's unix seconds as an aware UTC datetime (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected unix seconds, got {value!r}")
    return datetime.fromtimestamp(value, UTC)


def ref_id(value: Any) -> str | None:
    """An id whether the field holds the id or the expanded object."""
    if isinstance(value, dict):
        return value.get("id")
    return value


def _currency(raw: dict[str, Any]) -> str:
    currency = raw["currency"]
    if not isinstance(currency, str) or len(currency) != 3:
        raise ValueError(f"currency must be a 3-letter code, got {currency!r}")
    return currency.lower()


def charge_row(raw: dict[str, Any], version: datetime) -> Row:
    if raw.get("object") != "charge":
        raise ValueError(f"expected a charge, got object {raw.get('object')!r}")
    currency = _currency(raw)
    return Row.build(
        raw["id"],
        (
            minor_to_major(raw["amount"], currency),
            minor_to_major(raw.get("amount_captured"), currency),
            minor_to_major(raw.get("amount_refunded") or 0, currency),
            currency,
            raw["status"],
            raw.get("paid"),
            raw.get("captured"),
            bool(raw.get("refunded")),
            raw.get("disputed"),
            ref_id(raw.get("customer")),
            ref_id(raw.get("payment_intent")),
            raw.get("description"),
            raw.get("receipt_email"),
            raw.get("failure_code"),
            raw.get("failure_message"),
            raw.get("livemode"),
        ),
        created_at=timestamp(raw["created"]),
        version=version,
        deleted=False,
        raw=raw,
    )


def subscription_row(raw: dict[str, Any], version: datetime) -> Row:
    if raw.get("object") != "subscription":
        raise ValueError(f"expected a subscription, got object {raw.get('object')!r}")
    items = ((raw.get("items") or {}).get("data")) or []
    first = items[0] if items else {}
    price = first.get("price") or first.get("plan") or {}
    currency = (raw.get("currency") or price.get("currency") or "").lower() or None
    amount_minor = sum(
        int((item.get("price") or item.get("plan") or {}).get("unit_amount") or 0) * int(item.get("quantity") or 1)
        for item in items
    )
    # Since API version 2025-03-31 ("basil") the billing period lives on the items.
    period_start = raw.get("current_period_start", first.get("current_period_start"))
    period_end = raw.get("current_period_end", first.get("current_period_end"))
    return Row.build(
        raw["id"],
        (
            ref_id(raw.get("customer")),
            raw["status"],
            currency,
            minor_to_major(amount_minor, currency) if currency else None,
            (price.get("recurring") or {}).get("interval") or price.get("interval"),
            sum(int(item.get("quantity") or 1) for item in items) if items else None,
            timestamp(period_start),
            timestamp(period_end),
            raw.get("cancel_at_period_end"),
            timestamp(raw.get("canceled_at")),
            timestamp(raw.get("ended_at")),
            timestamp(raw.get("trial_end")),
            raw.get("livemode"),
        ),
        created_at=timestamp(raw["created"]),
        version=version,
        deleted=raw["status"] in ENDED_SUBSCRIPTION_STATUSES,
        raw=raw,
    )
