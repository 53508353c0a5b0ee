"""Stripe invoices for the sandbox: the invoice object at API version ``endive`` (lines, ``parent``,
``status_transitions``), its lifecycle (finalize, pay, a failed attempt, void, mark uncollectible) and the
seeded history of an account's invoices with the events each step emits.

Invoices are generated from their own random source (derived from the account's seed), so adding them
left every charge, subscription and customer of a seed as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from nextcrm_sandbox.stripe.data import _charge_amount, _Ids, _Rng
from nextcrm_sandbox.stripe.model import _DAY

# The events each lifecycle step emits, in Stripe's order (payment_succeeded and paid share a second).
STEP_EVENTS = {
    "create": ("invoice.created",),
    "finalize": ("invoice.finalized",),
    "pay": ("invoice.payment_succeeded", "invoice.paid"),
    "fail": ("invoice.payment_failed",),
    "void": ("invoice.voided",),
    "uncollectible": ("invoice.marked_uncollectible",),
    "delete": ("invoice.deleted",),
}
INVOICE_STATUSES = ("draft", "open", "paid", "uncollectible", "void")
_LINE_DESCRIPTIONS = (
    "Consulting hours",
    "Onboarding package",
    "Implementation services",
    "Training session",
    "Add-on: extra storage",
    "Priority support (quarter)",
)
# One-off invoices' final state: draft, deleted draft, open, paid, void, uncollectible.
_ONE_OFF_CUMULATIVE = (
    ("draft", 0.08),
    ("deleted", 0.12),
    ("open", 0.30),
    ("paid", 0.80),
    ("void", 0.90),
    ("uncollectible", 1.0),
)


def billing_seed(seed: int) -> int:
    """The seed of an account's invoice generation: its own stream, derived from the account's seed."""
    return seed * 1_000_003 + 0x1A7


def line_item(
    ids: _Ids,
    invoice_id: str,
    *,
    amount: int,
    currency: str,
    description: str,
    quantity: int,
    period: tuple[int, int],
    livemode: bool,
    subscription: str | None = None,
    subscription_item: str | None = None,
    price: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``line_item`` of an invoice: a subscription item's period, or a one-off invoice item."""
    if subscription is not None:
        parent = {
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": subscription,
                "subscription_item": subscription_item,
            },
            "type": "subscription_item_details",
        }
    else:
        parent = {
            "invoice_item_details": {
                "invoice_item": ids.long("ii_1"),
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": None,
            },
            "subscription_item_details": None,
            "type": "invoice_item_details",
        }
    unit = amount // quantity if quantity else amount
    return {
        "id": ids.long("il_1"),
        "object": "line_item",
        "amount": amount,
        "currency": currency,
        "description": description,
        "discount_amounts": [],
        "discountable": True,
        "discounts": [],
        "invoice": invoice_id,
        "livemode": livemode,
        "metadata": {},
        "parent": parent,
        "period": {"end": period[1], "start": period[0]},
        "pretax_credit_amounts": [],
        "pricing": {
            "price_details": {"price": price["id"], "product": price["product"]} if price else None,
            "type": "price_details" if price else None,
            "unit_amount_decimal": str(unit),
        },
        "quantity": quantity,
        "subtotal": amount,
        "taxes": [],
    }


def invoice_item_dict(
    item_id: str,
    customer: str,
    *,
    created: int,
    amount: int,
    currency: str,
    quantity: int,
    unit_amount_decimal: str | None,
    livemode: bool,
    description: str | None = None,
    period: tuple[int, int] | None = None,
    price: dict[str, Any] | None = None,
    subscription: str | None = None,
    discountable: bool = True,
    metadata: dict[str, str] | None = None,
    invoice: str | None = None,
) -> dict[str, Any]:
    """An ``invoiceitem`` at the sandbox's API version: pending (``invoice`` null) until an invoice takes it."""
    return {
        "id": item_id,
        "object": "invoiceitem",
        "amount": amount,
        "currency": currency,
        "customer": customer,
        "customer_account": None,
        "date": created,
        "description": description,
        "discountable": discountable,
        "discounts": [],
        "invoice": invoice,
        "livemode": livemode,
        "metadata": metadata if metadata is not None else {},
        "net_amount": amount,
        "parent": {"subscription_details": {"subscription": subscription, "subscription_item": None},
                   "type": "subscription_details"} if subscription else None,
        "period": {"end": (period or (created, created))[1], "start": (period or (created, created))[0]},
        "pricing": {
            "price_details": {"price": price["id"], "product": price["product"]} if price else None,
            "type": "price_details",
            "unit_amount_decimal": unit_amount_decimal,
        },
        "proration": False,
        "proration_details": {"credited_items": None, "discount_amounts": []},
        "quantity": quantity,
        "quantity_decimal": str(quantity),
        "tax_rates": [],
        "test_clock": None,
    }  # fmt: skip


def item_line(ids: _Ids, item: dict[str, Any], invoice_id: str) -> dict[str, Any]:
    """The ``line_item`` an invoice item becomes on ``invoice_id``."""
    subscription = ((item.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    return {
        "id": ids.long("il_1"),
        "object": "line_item",
        "amount": item["amount"],
        "currency": item["currency"],
        "description": item["description"],
        "discount_amounts": [],
        "discountable": item["discountable"],
        "discounts": [],
        "invoice": invoice_id,
        "livemode": item["livemode"],
        "metadata": dict(item["metadata"]),
        "parent": {
            "invoice_item_details": {"invoice_item": item["id"], "proration": False,
                                     "proration_details": {"credited_items": None}, "subscription": subscription},
            "subscription_item_details": None,
            "type": "invoice_item_details",
        },
        "period": dict(item["period"]),
        "pretax_credit_amounts": [],
        "pricing": dict(item["pricing"]),
        "quantity": item["quantity"],
        "subtotal": item["amount"],
        "taxes": [],
    }  # fmt: skip


def add_lines(inv: dict[str, Any], lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Append lines to a draft and total it again; returns Stripe's ``previous_attributes`` of what changed."""
    fields = ("amount_due", "amount_remaining", "subtotal", "subtotal_excluding_tax", "total", "total_excluding_tax")
    previous = {name: inv[name] for name in fields}
    data = [*inv["lines"]["data"], *lines]
    total = sum(line["amount"] for line in data)
    inv["lines"] = {**inv["lines"], "data": data, "total_count": len(data)}
    for name in ("subtotal", "subtotal_excluding_tax", "total", "total_excluding_tax"):
        inv[name] = total
    inv["amount_due"] = max(0, total - inv["starting_balance"])
    inv["amount_remaining"] = max(0, inv["amount_due"] - inv["amount_paid"])
    return {name: value for name, value in previous.items() if inv[name] != value}


def remove_line(inv: dict[str, Any], item_id: str) -> dict[str, Any]:
    """Take an invoice item's line off a draft and total it again; returns ``previous_attributes``."""

    def item_of(line: dict[str, Any]) -> Any:
        return ((line.get("parent") or {}).get("invoice_item_details") or {}).get("invoice_item")

    kept = [line for line in inv["lines"]["data"] if item_of(line) != item_id]
    inv["lines"] = {**inv["lines"], "data": []}
    return add_lines(inv, kept)


def invoice_dict(
    invoice_id: str,
    customer: dict[str, Any],
    *,
    created: int,
    currency: str,
    lines: list[dict[str, Any]],
    livemode: bool,
    account_name: str,
    collection_method: str = "charge_automatically",
    billing_reason: str = "manual",
    subscription: str | None = None,
    description: str | None = None,
    days_until_due: int | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A draft invoice of ``customer`` (its JSON) as Stripe renders it at the sandbox's API version."""
    total = sum(line["amount"] for line in lines)
    period = (min((ln["period"]["start"] for ln in lines), default=created),
              max((ln["period"]["end"] for ln in lines), default=created))  # fmt: skip
    if subscription is None:
        period = (created, created)
    parent = None
    if subscription is not None:
        parent = {
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription},
            "type": "subscription_details",
        }
    return {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": account_name,
        "account_tax_ids": None,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_paid_off_stripe": 0,
        "amount_remaining": total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": True,
        "automatic_tax": {
            "disabled_reason": None,
            "enabled": False,
            "liability": None,
            "provider": None,
            "status": None,
        },
        "automatically_finalizes_at": created + 3600,
        "billing_reason": billing_reason,
        "collection_method": collection_method,
        "confirmation_secret": None,
        "created": created,
        "currency": currency,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_account": None,
        "customer_address": customer.get("address"),
        "customer_email": customer.get("email"),
        "customer_name": customer.get("name"),
        "customer_phone": customer.get("phone"),
        "customer_shipping": customer.get("shipping"),
        "customer_tax_exempt": customer.get("tax_exempt") or "none",
        "customer_tax_ids": [],
        "default_payment_method": None,
        "default_source": None,
        "default_tax_rates": [],
        "description": description,
        "discounts": [],
        "due_date": created + days_until_due * _DAY if collection_method == "send_invoice" and days_until_due else None,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": {
            "object": "list",
            "data": lines,
            "has_more": False,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": livemode,
        "metadata": metadata if metadata is not None else {},
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "parent": parent,
        "payment_settings": {"default_mandate": None, "payment_method_options": None, "payment_method_types": None},
        "period_end": period[1],
        "period_start": period[0],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": None,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": created,
    }


# --- lifecycle: each step changes the invoice in place and returns Stripe's previous_attributes ------------


def finalize(inv: dict[str, Any], at: int, number: str, account_id: str) -> dict[str, Any]:
    """Draft → open, numbered, with its hosted page; an invoice of zero is paid at once (``pay`` follows)."""
    previous = {"status": inv["status"], "number": inv["number"], "effective_at": inv["effective_at"],
                "status_transitions": dict(inv["status_transitions"])}  # fmt: skip
    token = inv["id"][3:]
    inv["status"] = "open"
    inv["number"] = number
    inv["effective_at"] = at
    inv["automatically_finalizes_at"] = None
    inv["status_transitions"]["finalized_at"] = at
    inv["hosted_invoice_url"] = f"https://invoice.stripe.com/i/{account_id}/test_{token}"
    inv["invoice_pdf"] = f"https://pay.stripe.com/invoice/{account_id}/test_{token}/pdf?s=ap"
    if inv["collection_method"] == "charge_automatically" and inv["amount_due"] > 0:
        inv["next_payment_attempt"] = at + 3600
    return previous


def pay(inv: dict[str, Any], at: int) -> dict[str, Any]:
    """Open (or uncollectible) → paid: the amount due is paid in full."""
    previous = {"status": inv["status"], "amount_paid": inv["amount_paid"], "amount_remaining": inv["amount_remaining"],
                "status_transitions": dict(inv["status_transitions"])}  # fmt: skip
    inv["status"] = "paid"
    inv["amount_paid"] = inv["amount_due"]
    inv["amount_remaining"] = 0
    if inv["amount_due"] > 0:
        inv["attempted"] = True
        inv["attempt_count"] += 1
    inv["next_payment_attempt"] = None
    inv["auto_advance"] = False
    inv["status_transitions"]["paid_at"] = at
    return previous


def fail(inv: dict[str, Any], at: int) -> dict[str, Any]:
    """A failed payment attempt: still open, the next attempt scheduled (Smart Retries)."""
    previous = {"attempt_count": inv["attempt_count"], "attempted": inv["attempted"],
                "next_payment_attempt": inv["next_payment_attempt"]}  # fmt: skip
    inv["attempted"] = True
    inv["attempt_count"] += 1
    inv["next_payment_attempt"] = at + 3 * _DAY if inv["collection_method"] == "charge_automatically" else None
    return previous


def void(inv: dict[str, Any], at: int) -> dict[str, Any]:
    """Open (or uncollectible) → void."""
    previous = {"status": inv["status"], "status_transitions": dict(inv["status_transitions"])}
    inv["status"] = "void"
    inv["next_payment_attempt"] = None
    inv["auto_advance"] = False
    inv["status_transitions"]["voided_at"] = at
    return previous


def uncollectible(inv: dict[str, Any], at: int) -> dict[str, Any]:
    """Open → uncollectible (it can still be paid or voided)."""
    previous = {"status": inv["status"], "status_transitions": dict(inv["status_transitions"])}
    inv["status"] = "uncollectible"
    inv["next_payment_attempt"] = None
    inv["auto_advance"] = False
    inv["status_transitions"]["marked_uncollectible_at"] = at
    return previous


# --- seeded history -------------------------------------------------------------------------------------


@dataclass
class SeededInvoice:
    """A generated invoice: its final state, whether it was a deleted draft, and its history of
    ``(time, event type, the invoice's JSON then, previous_attributes)``."""

    invoice: dict[str, Any]
    deleted: bool = False
    history: list[tuple[int, str, bytes, dict[str, Any] | None]] = field(default_factory=list)


class _History:
    def __init__(self, inv: dict[str, Any]) -> None:
        self.inv = inv
        self.steps: list[tuple[int, str, bytes, dict[str, Any] | None]] = []

    def record(self, step: str, at: int, previous: dict[str, Any] | None = None) -> None:
        snapshot = orjson.dumps(self.inv)
        for event_type in STEP_EVENTS[step]:
            self.steps.append((at, event_type, snapshot, previous))


def _lifecycle(
    inv: dict[str, Any], outcome: str, times: Sequence[int], number: Callable[[], str], account_id: str
) -> SeededInvoice:
    """Walk a draft to ``outcome`` at ascending ``times`` (creation, finalization, then the last step)."""
    h = _History(inv)
    created, finalized, last = times
    h.record("create", created)
    if outcome == "draft":
        return SeededInvoice(inv, False, h.steps)
    if outcome == "deleted":
        h.record("delete", last)
        return SeededInvoice(inv, True, h.steps)
    h.record("finalize", finalized, finalize(inv, finalized, number(), account_id))
    if inv["amount_due"] == 0 or outcome == "paid":
        paid_at = finalized if inv["amount_due"] == 0 else last
        h.record("pay", paid_at, pay(inv, paid_at))
        return SeededInvoice(inv, False, h.steps)
    if outcome.startswith("failed"):
        attempts = int(outcome.removeprefix("failed"))
        for k in range(attempts):
            at = finalized + (last - finalized) * (k + 1) // attempts
            h.record("fail", at, fail(inv, at))
        return SeededInvoice(inv, False, h.steps)
    if outcome == "void":
        h.record("void", last, void(inv, last))
    elif outcome == "uncollectible":
        h.record("uncollectible", last, uncollectible(inv, last))
    return SeededInvoice(inv, False, h.steps)


class InvoiceSeeder:
    """Generates an account's invoices: each subscription's latest invoice, then one-off invoices."""

    def __init__(self, seed: int, now: int, livemode: bool, account_id: str, account_name: str) -> None:
        self.rng = _Rng(billing_seed(seed))
        self.ids = _Ids(self.rng)
        self.now = now
        self.livemode = livemode
        self.account_id = account_id
        self.account_name = account_name
        self._sequence: dict[str, int] = {}

    def number_for(self, customer: dict[str, Any]) -> str:
        """The customer's next invoice number: its ``invoice_prefix``, a dash and a 4-digit sequence."""
        n = self._sequence.get(customer["id"], customer.get("next_invoice_sequence") or 1)
        self._sequence[customer["id"]] = n + 1
        return f"{customer.get('invoice_prefix') or 'INV'}-{n:04d}"

    def _times(self, created: int, step_after: int) -> tuple[int, int, int]:
        last_second = self.now - 1
        created = min(created, last_second)
        finalized = min(last_second, created + step_after)
        span = max(0, last_second - finalized)
        last = finalized + (int(self.rng.random() * min(span, 10 * _DAY)) if span else 0)
        return created, finalized, last

    def subscription_invoice(self, sub: dict[str, Any], customer: dict[str, Any]) -> SeededInvoice:
        """The subscription's latest invoice (its ``latest_invoice`` id), in the state its status implies."""
        item = sub["items"]["data"][0]
        status = sub["status"]
        trial = status in ("trialing", "paused")
        created = sub["created"] if trial else max(sub["created"], item["current_period_start"])
        first = created == sub["created"]
        amount = 0 if trial else item["price"]["unit_amount"] * item["quantity"]
        period = (item["current_period_start"], item["current_period_end"])
        line = line_item(self.ids, sub["latest_invoice"], amount=amount, currency=sub["currency"],
                         description=f"{item['quantity']} x {item['price']['nickname']}", quantity=item["quantity"],
                         period=period, livemode=self.livemode, subscription=sub["id"],
                         subscription_item=item["id"], price=item["price"])  # fmt: skip
        inv = invoice_dict(sub["latest_invoice"], customer, created=created, currency=sub["currency"], lines=[line],
                           livemode=self.livemode, account_name=self.account_name,
                           billing_reason="subscription_create" if first else "subscription_cycle",
                           subscription=sub["id"])  # fmt: skip
        outcome = {"past_due": "failed1", "incomplete": "failed1", "unpaid": "failed3"}.get(status, "paid")
        ended = sub.get("ended_at")
        if status == "incomplete_expired" or (status == "canceled" and sub["cancellation_details"]["reason"]
                                              == "payment_failed"):  # fmt: skip
            outcome = "void"
        times = self._times(created, 0 if first else 3600)
        if outcome == "void" and ended is not None:
            times = (times[0], times[1], max(times[1], min(ended, self.now - 1)))
        return _lifecycle(inv, outcome, times, lambda: self.number_for(customer), self.account_id)

    def one_off_invoice(self, customer: dict[str, Any], created: int) -> SeededInvoice:
        """A one-off invoice of 1 to 3 items, sent or charged automatically, in a random final state."""
        rng = self.rng
        currency = customer.get("currency") or "usd"
        iid = self.ids.long("in_1")
        lines = []
        for _ in range(1 + rng.below(3)):
            quantity = 1 + rng.below(4)
            unit = max(1, _charge_amount(rng, currency) // 4)
            lines.append(line_item(self.ids, iid, amount=unit * quantity, currency=currency,
                                   description=rng.pick(_LINE_DESCRIPTIONS), quantity=quantity,
                                   period=(created, created), livemode=self.livemode))  # fmt: skip
        send = rng.random() < 0.5
        inv = invoice_dict(iid, customer, created=created, currency=currency, lines=lines, livemode=self.livemode,
                           account_name=self.account_name,
                           collection_method="send_invoice" if send else "charge_automatically",
                           days_until_due=30 if send else None)  # fmt: skip
        x = rng.random()
        outcome = next(s for s, c in _ONE_OFF_CUMULATIVE if x < c)
        if outcome == "open" and not send and rng.random() < 0.5:
            outcome = "failed1"
        return _lifecycle(inv, outcome, self._times(created, 3600), lambda: self.number_for(customer), self.account_id)
