"""Stripe JSON -> rows of `stripe_payments` (charges), `stripe_subscriptions`, `stripe_customers` and
`stripe_invoices`.

Amounts are integers in the currency's minor unit and become exact `numeric` major units by the
currency's exponent (JPY has none). A subscription ended by cancellation (Stripe's
`DELETE /v1/subscriptions/{id}`, event `customer.subscription.deleted`) or expiry is flagged
`deleted`; its row stays with its final status. A customer or invoice read from its `*.deleted`
event carries `"deleted": true` (the mark Stripe's deleted objects have) and is flagged `deleted`
with its last data; so is an invoice that is `void` or `uncollectible`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from nextcrm_pipelines.core.money import minor_to_major
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.stripe import tables

ENDED_SUBSCRIPTION_STATUSES = frozenset({"canceled", "incomplete_expired"})

PAYMENTS_TABLE = table_spec(tables.PAYMENTS)
SUBSCRIPTIONS_TABLE = table_spec(tables.SUBSCRIPTIONS)
CUSTOMERS_TABLE = table_spec(tables.CUSTOMERS)
INVOICES_TABLE = table_spec(tables.INVOICES)
CLOSED_INVOICE_STATUSES = frozenset({"void", "uncollectible"})


# Stripe stamps events in whole seconds, and one change often makes several in the same second (a subscription
# is `created` incomplete and `updated` active at once). As versions, such events are ordered by their kind, a
# microsecond apart: whatever order they arrive in, the creation never replaces the update, nor either the deletion.
_EVENT_RANK = {"created": 0, "deleted": 2}


def event_version(created: datetime, event_type: str | None) -> datetime:
    """The version of the object an event carries: its time, plus a microsecond for a change and two for a deletion
    (see above)."""
    kind = str(event_type or "").rsplit(".", 1)[-1]
    return created + timedelta(microseconds=_EVENT_RANK.get(kind, 1))


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


def _deleted_mark(raw: dict[str, Any]) -> bool:
    return raw.get("deleted") is True


def customer_row(raw: dict[str, Any], version: datetime) -> Row:
    """A customer as a row; `balance` is in its billing currency, null while it has none."""
    if raw.get("object") != "customer":
        raise ValueError(f"expected a customer, got object {raw.get('object')!r}")
    currency = raw.get("currency")
    currency = currency.lower() if isinstance(currency, str) and currency else None
    balance = raw.get("balance")
    address = raw.get("address") or {}
    return Row.build(
        raw["id"],
        CUSTOMERS_TABLE.values(
            name=raw.get("name"),
            email=raw.get("email"),
            phone=raw.get("phone"),
            description=raw.get("description"),
            currency=currency,
            balance=minor_to_major(balance, currency) if balance is not None and currency else None,
            delinquent=raw.get("delinquent"),
            address_line1=address.get("line1"),
            address_line2=address.get("line2"),
            address_city=address.get("city"),
            address_state=address.get("state"),
            address_postal_code=address.get("postal_code"),
            address_country=address.get("country"),
            tax_exempt=raw.get("tax_exempt"),
            livemode=raw.get("livemode"),
        ),
        created_at=timestamp(raw["created"]),
        version=version,
        deleted=_deleted_mark(raw),
        raw=raw,
    )


def invoice_subscription(raw: dict[str, Any]) -> str | None:
    """The invoice's subscription: under `parent.subscription_details` since API version 2025-03-31
    ("basil"), a top-level `subscription` before."""
    details = (raw.get("parent") or {}).get("subscription_details") or {}
    return ref_id(details.get("subscription")) or ref_id(raw.get("subscription"))


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    """An invoice as a row, linked to its customer and subscription."""
    if raw.get("object") != "invoice":
        raise ValueError(f"expected an invoice, got object {raw.get('object')!r}")
    currency = _currency(raw)
    transitions = raw.get("status_transitions") or {}
    return Row.build(
        raw["id"],
        INVOICES_TABLE.values(
            customer_id=ref_id(raw.get("customer")),
            subscription_id=invoice_subscription(raw),
            number=raw.get("number"),
            status=raw.get("status"),
            currency=currency,
            subtotal=minor_to_major(raw.get("subtotal"), currency),
            total=minor_to_major(raw.get("total"), currency),
            amount_due=minor_to_major(raw.get("amount_due"), currency),
            amount_paid=minor_to_major(raw.get("amount_paid"), currency),
            amount_remaining=minor_to_major(raw.get("amount_remaining"), currency),
            collection_method=raw.get("collection_method"),
            billing_reason=raw.get("billing_reason"),
            customer_name=raw.get("customer_name"),
            customer_email=raw.get("customer_email"),
            description=raw.get("description"),
            attempt_count=raw.get("attempt_count"),
            due_date=timestamp(raw.get("due_date")),
            period_start=timestamp(raw.get("period_start")),
            period_end=timestamp(raw.get("period_end")),
            finalized_at=timestamp(transitions.get("finalized_at")),
            paid_at=timestamp(transitions.get("paid_at")),
            voided_at=timestamp(transitions.get("voided_at")),
            marked_uncollectible_at=timestamp(transitions.get("marked_uncollectible_at")),
            hosted_invoice_url=raw.get("hosted_invoice_url"),
            livemode=raw.get("livemode"),
        ),
        created_at=timestamp(raw["created"]),
        version=version,
        deleted=_deleted_mark(raw) or raw.get("status") in CLOSED_INVOICE_STATUSES,
        raw=raw,
    )
