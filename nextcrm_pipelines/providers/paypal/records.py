"""PayPal JSON -> rows of `paypal_payments` (Transaction Search rows), `paypal_subscriptions`, `paypal_plans`
and `paypal_invoices`.

A `transaction_id` is not unique in Transaction Search (a balance-affecting row and a non-affecting
one can share it), so a payment row's id is `<transaction_id>:<event code>`. Money comes as decimal
strings and stays exact. Transactions are never deleted (refunds and reversals are rows of their
own, or status `V`); a subscription that is CANCELLED or EXPIRED is flagged `deleted`, and so are an
INACTIVE plan (PayPal never deletes plans: deactivating is its archive) and a CANCELLED invoice (void).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.paypal import tables

ENDED_SUBSCRIPTION_STATUSES = frozenset({"CANCELLED", "EXPIRED"})
ARCHIVED_PLAN_STATUS = "INACTIVE"
VOID_INVOICE_STATUS = "CANCELLED"

PAYMENTS_TABLE = table_spec(tables.PAYMENTS)
SUBSCRIPTIONS_TABLE = table_spec(tables.SUBSCRIPTIONS)
PLANS_TABLE = table_spec(tables.PLANS)
INVOICES_TABLE = table_spec(tables.INVOICES)


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


def parse_date(value: Any) -> date | None:
    """A PayPal date without time (`2024-01-31`; a time or zone after it is ignored)."""
    if not value:
        return None
    return date.fromisoformat(str(value)[:10])


def plan_version(raw: dict[str, Any]) -> datetime:
    """When a plan's state was true: its `update_time` (a new plan has only `create_time`)."""
    moment = parse_time(raw.get("update_time")) or parse_time(raw.get("create_time"))
    if moment is None:
        raise ValueError("plan has no update_time or create_time")
    return moment


def _regular_cycle(raw: dict[str, Any]) -> dict[str, Any]:
    cycles = [c for c in raw.get("billing_cycles") or [] if isinstance(c, dict)]
    return next((c for c in cycles if c.get("tenure_type") == "REGULAR"), {})


def plan_row(raw: dict[str, Any], version: datetime) -> Row:
    """A billing plan with its regular cycle (interval, fixed price, total cycles) and the number of trial cycles;
    a plan read without its billing cycles (a minimal list item) leaves those columns empty."""
    regular = _regular_cycle(raw)
    frequency = regular.get("frequency") or {}
    price, currency = money((regular.get("pricing_scheme") or {}).get("fixed_price"))
    setup_fee, setup_currency = money((raw.get("payment_preferences") or {}).get("setup_fee"))
    trials = [c for c in raw.get("billing_cycles") or [] if isinstance(c, dict) and c.get("tenure_type") == "TRIAL"]
    count = frequency.get("interval_count", 1 if frequency.get("interval_unit") else None)
    total = regular.get("total_cycles", 1 if regular else None)
    return Row.build(
        raw["id"],
        PLANS_TABLE.values(
            product_id=raw.get("product_id"),
            name=raw.get("name"),
            description=raw.get("description"),
            status=raw.get("status"),
            usage_type=raw.get("usage_type"),
            interval_unit=frequency.get("interval_unit"),
            interval_count=int(count) if count is not None else None,
            price=price,
            currency=currency or setup_currency,
            total_cycles=int(total) if total is not None else None,
            trial_cycles=sum(int(c.get("total_cycles", 1)) for c in trials) if "billing_cycles" in raw else None,
            setup_fee=setup_fee,
            quantity_supported=raw.get("quantity_supported"),
        ),
        created_at=parse_time(raw.get("create_time")),
        version=version,
        deleted=raw.get("status") == ARCHIVED_PLAN_STATUS,
        raw=raw,
    )


def invoice_version(raw: dict[str, Any]) -> datetime | None:
    """The newest time an invoice's own record names (created, updated, sent or cancelled): cancelling leaves
    `last_update_time` as it was and sets `cancel_time`. None when it names none."""
    metadata = (raw.get("detail") or {}).get("metadata") or {}
    times = [parse_time(metadata.get(name)) for name in ("create_time", "last_update_time", "first_sent_time",
                                                           "last_sent_time", "cancel_time")]  # fmt: skip
    return max((t for t in times if t is not None), default=None)


def _full_name(name: dict[str, Any]) -> str | None:
    joined = " ".join(part for part in (name.get("given_name"), name.get("surname")) if part)
    return name.get("full_name") or joined or name.get("alternate_full_name") or None


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    """An invoice with its first recipient's billing details, dates and amounts. A search result carries
    `payments.transactions` only when the search asked for them; without them `payment_ids` is null."""
    detail = raw.get("detail") or {}
    metadata = detail.get("metadata") or {}
    recipients = [r for r in raw.get("primary_recipients") or [] if isinstance(r, dict)]
    billing = (recipients[0].get("billing_info") or {}) if recipients else {}
    amount, currency = money(raw.get("amount"))
    due, _ = money(raw.get("due_amount"))
    payments = raw.get("payments") or {}
    paid, _ = money(payments.get("paid_amount"))
    refunded, _ = money((raw.get("refunds") or {}).get("refund_amount"))
    transactions = payments.get("transactions")
    payment_ids = None
    if isinstance(transactions, list):
        payment_ids = [str(t["payment_id"]) for t in transactions if isinstance(t, dict) and t.get("payment_id")]
    term = detail.get("payment_term") or {}
    status = raw.get("status")
    return Row.build(
        raw["id"],
        INVOICES_TABLE.values(
            invoice_number=detail.get("invoice_number"),
            status=status,
            reference=detail.get("reference"),
            currency=currency or detail.get("currency_code"),
            amount=amount,
            due_amount=due,
            paid_amount=paid,
            refunded_amount=refunded,
            recipient_email=billing.get("email_address"),
            recipient_name=_full_name(billing.get("name") or {}),
            recipient_business_name=billing.get("business_name"),
            invoice_date=parse_date(detail.get("invoice_date")),
            due_date=parse_date(term.get("due_date")),
            term_type=term.get("term_type"),
            payment_ids=payment_ids,
            first_sent_at=parse_time(metadata.get("first_sent_time")),
            cancelled_at=parse_time(metadata.get("cancel_time")),
            archived=detail.get("archived"),
        ),
        created_at=parse_time(metadata.get("create_time")),
        version=version,
        deleted=status == VOID_INVOICE_STATUS,
        raw=raw,
    )
