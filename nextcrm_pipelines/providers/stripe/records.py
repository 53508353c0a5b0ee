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
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.stripe import tables

ENDED_SUBSCRIPTION_STATUSES = frozenset({"canceled", "incomplete_expired"})

PAYMENTS_TABLE = table_spec(tables.PAYMENTS)
SUBSCRIPTIONS_TABLE = table_spec(tables.SUBSCRIPTIONS)


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
        PAYMENTS_TABLE.values(
            amount=minor_to_major(raw["amount"], currency),
            amount_captured=minor_to_major(raw.get("amount_captured"), currency),
            amount_refunded=minor_to_major(raw.get("amount_refunded") or 0, currency),
            currency=currency,
            status=raw["status"],
            paid=raw.get("paid"),
            captured=raw.get("captured"),
            refunded=bool(raw.get("refunded")),
            disputed=raw.get("disputed"),
            customer_id=ref_id(raw.get("customer")),
            payment_intent_id=ref_id(raw.get("payment_intent")),
            description=raw.get("description"),
            receipt_email=raw.get("receipt_email"),
            failure_code=raw.get("failure_code"),
            failure_message=raw.get("failure_message"),
            livemode=raw.get("livemode"),
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
        SUBSCRIPTIONS_TABLE.values(
            customer_id=ref_id(raw.get("customer")),
            status=raw["status"],
            currency=currency,
            amount=minor_to_major(amount_minor, currency) if currency else None,
            billing_interval=(price.get("recurring") or {}).get("interval") or price.get("interval"),
            quantity=sum(int(item.get("quantity") or 1) for item in items) if items else None,
            current_period_start=timestamp(period_start),
            current_period_end=timestamp(period_end),
            cancel_at_period_end=raw.get("cancel_at_period_end"),
            canceled_at=timestamp(raw.get("canceled_at")),
            ended_at=timestamp(raw.get("ended_at")),
            trial_end=timestamp(raw.get("trial_end")),
            livemode=raw.get("livemode"),
        ),
        created_at=timestamp(raw["created"]),
        version=version,
        deleted=raw["status"] in ENDED_SUBSCRIPTION_STATUSES,
        raw=raw,
    )
