"""PayPal JSON -> rows of `paypal_payments` (Transaction Search rows) and `paypal_subscriptions`.

A `transaction_id` is not unique in Transaction Search (a balance-affecting row and a non-affecting
one can share it), so a payment row's id is `<transaction_id>:<event code>`. Money comes as decimal
strings and stays exact. Transactions are never deleted (refunds and reversals are rows of their
own, or status `V`); a subscription that is CANCELLED or EXPIRED is flagged `deleted`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.paypal import tables

ENDED_SUBSCRIPTION_STATUSES = frozenset({"CANCELLED", "EXPIRED"})

PAYMENTS_TABLE = table_spec(tables.PAYMENTS)
SUBSCRIPTIONS_TABLE = table_spec(tables.SUBSCRIPTIONS)


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 (`2024-01-31T10:00:00Z`, `+0000` or `+00:00` offsets) as aware UTC."""
    if not value:
        return None
    text = str(value).replace("Z", "+00:00")
    if len(text) > 5 and text[-5] in "+-" and text[-3] != ":":
        text = f"{text[:-2]}:{text[-2:]}"
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def money(value: Any) -> tuple[Decimal | None, str | None]:
    """A PayPal money object `{currency_code, value: "12.34"}` as (exact amount, currency)."""
    if not isinstance(value, dict) or value.get("value") in (None, ""):
        return None, None
    return Decimal(str(value["value"])), value.get("currency_code")


def payment_key(raw: dict[str, Any]) -> str:
    info = raw["transaction_info"]
    return f"{info['transaction_id']}:{info.get('transaction_event_code', '')}"


def payment_version(raw: dict[str, Any]) -> datetime:
    info = raw["transaction_info"]
    moment = parse_time(info.get("transaction_updated_date")) or parse_time(info.get("transaction_initiation_date"))
    if moment is None:
        raise ValueError("transaction has no transaction_updated_date")
    return moment


def subscription_of(raw: dict[str, Any]) -> str | None:
    """The subscription a transaction belongs to (`paypal_reference_id` of type SUB)."""
    info = raw.get("transaction_info") or {}
    if info.get("paypal_reference_id_type") == "SUB":
        return info.get("paypal_reference_id")
    return None


def payment_row(raw: dict[str, Any], version: datetime) -> Row:
    info = raw["transaction_info"]
    payer = raw.get("payer_info") or {}
    name = payer.get("payer_name") or {}
    amount, currency = money(info.get("transaction_amount"))
    fee, _ = money(info.get("fee_amount"))
    full_name = name.get("alternate_full_name") or " ".join(
        part for part in (name.get("given_name"), name.get("surname")) if part
    )
    return Row.build(
        payment_key(raw),
        PAYMENTS_TABLE.values(
            transaction_id=info["transaction_id"],
            event_code=info.get("transaction_event_code"),
            status=info.get("transaction_status"),
            amount=amount,
            fee=fee,
            currency=currency,
            payer_id=payer.get("account_id"),
            payer_email=payer.get("email_address"),
            payer_name=full_name or None,
            invoice_id=info.get("invoice_id"),
            reference_id=info.get("paypal_reference_id"),
            reference_type=info.get("paypal_reference_id_type"),
            subscription_id=subscription_of(raw),
        ),
        created_at=parse_time(info.get("transaction_initiation_date")),
        version=version,
        deleted=False,
        raw=raw,
    )


def subscription_row(raw: dict[str, Any], version: datetime) -> Row:
    subscriber = raw.get("subscriber") or {}
    name = subscriber.get("name") or {}
    billing = raw.get("billing_info") or {}
    last_amount, currency = money((billing.get("last_payment") or {}).get("amount"))
    outstanding, outstanding_currency = money(billing.get("outstanding_balance"))
    quantity = raw.get("quantity")
    status = raw.get("status")
    return Row.build(
        raw["id"],
        SUBSCRIPTIONS_TABLE.values(
            plan_id=raw.get("plan_id"),
            plan_name=(raw.get("plan") or {}).get("name"),
            status=status,
            subscriber_email=subscriber.get("email_address"),
            subscriber_payer_id=subscriber.get("payer_id"),
            subscriber_name=" ".join(p for p in (name.get("given_name"), name.get("surname")) if p) or None,
            quantity=int(quantity) if quantity not in (None, "") else None,
            start_time=parse_time(raw.get("start_time")),
            next_billing_time=parse_time(billing.get("next_billing_time")),
            last_payment_amount=last_amount,
            currency=currency or outstanding_currency,
            outstanding_balance=outstanding,
            status_update_time=parse_time(raw.get("status_update_time")),
        ),
        created_at=parse_time(raw.get("create_time")),
        version=version,
        deleted=status in ENDED_SUBSCRIPTION_STATUSES,
        raw=raw,
    )
