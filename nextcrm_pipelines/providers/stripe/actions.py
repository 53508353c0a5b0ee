"""What NextCRM asks Stripe to do, through the outbox (`core.outbox`): customers, refunds, payment intents and
subscriptions. Each write carries the outbox row's key as `Idempotency-Key`, so a retry after a timeout or a crash
gets Stripe's first answer back instead of acting twice. What Stripe answers goes into the mirror in the same run
(read your writes): customers to `stripe_customers`, a refunded or paid charge to `stripe_payments`, subscriptions
to `stripe_subscriptions` (payment intents have no table of their own: their charge does).

Stripe keeps an idempotency key for 24 hours only. So every object an action creates also carries the key in its
metadata (`nextcrm_key`), and an action whose earlier attempt may have reached Stripe is first looked up by it
(`find`: the customer and payment intent searches, a charge's refunds, the subscription search); the outbox adopts
what it finds instead of sending again. A cancellation is looked up by the subscription's state. Stripe's search
is eventually consistent (normally under a minute), which the key covers: it is the one retry window the search
may miss.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from nextcrm_pipelines.core.actions import (
    ActionInvalid,
    ActionSpec,
    Amount,
    Currency,
    Mirrored,
    Payload,
    Sent,
    minor_units,
)
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.providers.stripe.client import PROVIDER

# The metadata key every object an action creates carries: the outbox row's idempotency key.
KEY_FIELD = "nextcrm_key"
# Stripe's metadata: up to 50 keys of at most 40 characters, values of at most 500; one key is ours.
Metadata = dict[str, str]
ENDED = ("canceled", "incomplete_expired")

CustomerId = Annotated[str, Field(pattern=r"^cus_[A-Za-z0-9]+$", max_length=255)]
SubscriptionId = Annotated[str, Field(pattern=r"^sub_[A-Za-z0-9]+$", max_length=255)]
PriceId = Annotated[str, Field(pattern=r"^price_[A-Za-z0-9]+$", max_length=255)]
# A PaymentMethod (`pm_...`, Stripe's test methods `pm_card_visa` included) or a legacy card or source.
PaymentMethodId = Annotated[str, Field(pattern=r"^(pm|card|src)_[A-Za-z0-9_]+$", max_length=255)]
Quantity = Annotated[int, Field(strict=True, ge=1, le=1_000_000)]
# Checked here: Stripe's refusal of a malformed address would quote it in its message, and so in ours.
Email = Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$", max_length=512)]
Feedback = Literal["customer_service", "low_quality", "missing_features", "other", "switched_service", "too_complex",
                   "too_expensive", "unused"]  # fmt: skip


def _metadata_ok(metadata: Metadata) -> Metadata:
    if KEY_FIELD in metadata:
        raise ValueError(f"metadata.{KEY_FIELD} is set by NextCRM (the action's idempotency key)")
    if len(metadata) > 49:
        raise ValueError(f"Stripe takes at most 50 metadata keys, one of them NextCRM's {KEY_FIELD}")
    for key, value in metadata.items():
        if len(key) > 40 or len(value) > 500:
            raise ValueError("Stripe metadata keys are at most 40 characters and values at most 500")
    return metadata


class CreateCustomer(Payload):
    """A new customer (all fields optional, as in Stripe)."""

    email: Email | None = None
    name: str | None = Field(default=None, max_length=256)
    phone: str | None = Field(default=None, max_length=20)
    description: str | None = Field(default=None, max_length=350)
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CreateCustomer:
        _metadata_ok(self.metadata)
        return self


class RefundCharge(Payload):
    """Refund a charge: in full without `amount`, else that much of it (in the charge's currency)."""

    charge: str = Field(pattern=r"^(ch|py)_[A-Za-z0-9]+$", description="The charge id (ch_...)")
    amount: Amount | None = None
    currency: Currency | None = None
    reason: str | None = Field(default=None, pattern=r"^(duplicate|fraudulent|requested_by_customer)$")
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> RefundCharge:
        if (self.amount is None) != (self.currency is None):
            raise ValueError("a partial refund gives both amount and currency (a full refund neither)")
        if self.amount is not None and self.currency is not None:
            minor_units(self.amount, self.currency)  # refuses more decimals than the currency has
        _metadata_ok(self.metadata)
        return self


class CreatePaymentIntent(Payload):
    """Ask a customer (or a card) for money: a payment intent of `amount` in `currency`, confirmed at once with
    `payment_method` when `confirm` is true (its charge then lands in `stripe_payments`)."""

    amount: Amount
    currency: Currency
    customer: CustomerId | None = None
    payment_method: PaymentMethodId | None = None
    confirm: bool = False
    # Only where the payment method may redirect the payer (else redirect-based methods are not offered).
    return_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)
    description: str | None = Field(default=None, max_length=1000)
    receipt_email: Email | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CreatePaymentIntent:
        minor_units(self.amount, self.currency)  # refuses more decimals than the currency has
        if self.confirm and not self.payment_method:
            raise ValueError("confirm needs a payment_method")
        if self.return_url and not self.confirm:
            raise ValueError("return_url is for a payment intent confirmed at once (confirm: true)")
        _metadata_ok(self.metadata)
        return self


class ConfirmPaymentIntent(Payload):
    """Confirm a payment intent (with `payment_method`, or the one it already has): Stripe charges it."""

    payment_intent: str = Field(pattern=r"^pi_[A-Za-z0-9]+$", max_length=255)
    payment_method: PaymentMethodId | None = None
    return_url: str | None = Field(default=None, pattern=r"^https?://", max_length=2048)


class CreateSubscription(Payload):
    """Subscribe a customer to a recurring price. Stripe bills the first period at once with the customer's
    default card (or `default_payment_method`); `payment_behavior: default_incomplete` leaves it to be paid."""

    customer: CustomerId
    price: PriceId
    quantity: Quantity = 1
    trial_period_days: Annotated[int, Field(strict=True, ge=1, le=730)] | None = None
    payment_behavior: Literal["allow_incomplete", "default_incomplete", "error_if_incomplete"] | None = None
    default_payment_method: PaymentMethodId | None = None
    description: str | None = Field(default=None, max_length=500)
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CreateSubscription:
        _metadata_ok(self.metadata)
        return self


class UpdateSubscription(Payload):
    """Change a subscription's price or quantity (its only item, or `item`), prorated as `proration_behavior`
    says (Stripe's default: `create_prorations`, billed with the next invoice)."""

    subscription: SubscriptionId
    item: str | None = Field(default=None, pattern=r"^si_[A-Za-z0-9]+$", max_length=255)
    price: PriceId | None = None
    quantity: Quantity | None = None
    proration_behavior: Literal["create_prorations", "always_invoice", "none"] | None = None

    @model_validator(mode="after")
    def _check(self) -> UpdateSubscription:
        if self.price is None and self.quantity is None:
            raise ValueError("give the new price, the new quantity or both")
        return self


class CancelSubscription(Payload):
    """Cancel a subscription now, or at the end of its current period (`at_period_end`). Canceled now, it can be
    prorated (a credit for the unused time) and billed at once (`invoice_now`)."""

    subscription: SubscriptionId
    at_period_end: bool = False
    prorate: bool | None = None
    invoice_now: bool | None = None
    feedback: Feedback | None = None
    comment: str | None = Field(default=None, max_length=5000)

    @model_validator(mode="after")
    def _check(self) -> CancelSubscription:
        if self.at_period_end and (self.prorate is not None or self.invoice_now is not None):
            raise ValueError("prorate and invoice_now are for a cancellation now, not at the period's end")
        return self


def _form(values: dict[str, Any]) -> dict[str, Any]:
    """Drop unset fields; Stripe's form encoding takes the rest as they are (metadata as a nested dict)."""
    return {key: value for key, value in values.items() if value not in (None, {}, "")}


def _now() -> datetime:
    return datetime.now(UTC)


def _tagged(metadata: Metadata, key: str) -> Metadata:
    """The metadata an action's new object gets: the caller's, and the outbox key it is found by later."""
    return {**metadata, KEY_FIELD: key}


def _quoted(value: str) -> str:
    """A value in Stripe's search language: single-quoted, quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _searched(api: Any, resource: str, key: str) -> dict[str, Any] | None:
    """The object of `resource` whose metadata carries `key`, from Stripe's search (exact match kept: the search
    compares case-insensitively)."""
    query = {"query": f"metadata[{_quoted(KEY_FIELD)}]:{_quoted(key)}", "limit": 100}
    while True:
        page = api.get(f"/v1/{resource}/search", query)
        for found in page.get("data") or []:
            if (found.get("metadata") or {}).get(KEY_FIELD) == key:
                return found
        if not page.get("has_more") or not page.get("next_page"):
            return None
        query = {**query, "page": page["next_page"]}


# --- customers and refunds ------------------------------------------------------------------------------------


def create_customer(api: Any, payload: CreateCustomer, key: str) -> Sent:
    """Create the customer, its metadata carrying the key."""
    params = {**payload.model_dump(), "metadata": _tagged(payload.metadata, key)}
    customer = api.post("/v1/customers", _form(params), idempotency_key=key)
    return Sent(customer, customer["id"], (Mirrored("stripe_customers", customer, _now()),))


def find_customer(api: Any, payload: CreateCustomer, key: str) -> Sent | None:
    """The customer an earlier attempt created, found by its `nextcrm_key`."""
    customer = _searched(api, "customers", key)
    if customer is None:
        return None
    return Sent(customer, customer["id"], (Mirrored("stripe_customers", customer, _now()),))


def refund_charge(api: Any, payload: RefundCharge, key: str) -> Sent:
    """Refund, with the charge expanded in Stripe's answer: the mirror's payment row carries the refunded amount
    without a second read. A partial refund first checks that its currency is the charge's (an amount in the
    wrong currency's units would refund the wrong sum)."""
    params: dict[str, Any] = {"charge": payload.charge, "reason": payload.reason,
                              "metadata": _tagged(payload.metadata, key), "expand": ["charge"]}  # fmt: skip
    if payload.amount is not None and payload.currency is not None:
        charge = api.get(f"/v1/charges/{payload.charge}", {})
        if str(charge.get("currency", "")).upper() != payload.currency.upper():
            raise ActionInvalid(f"refund_charge: currency {payload.currency} is not the charge's "
                                f"({str(charge.get('currency', '')).upper()}): nothing was sent")  # fmt: skip
        params["amount"] = minor_units(payload.amount, payload.currency)
    refund = api.post("/v1/refunds", _form(params), idempotency_key=key)
    return _refund_sent(api, refund, payload.charge)


def find_refund(api: Any, payload: RefundCharge, key: str) -> Sent | None:
    """The refund an earlier attempt made: one of the charge's refunds (`GET /v1/refunds?charge=`) carrying the key."""
    for refunds, _ in api.list_pages("/v1/refunds", {"charge": payload.charge}):
        for refund in refunds:
            if (refund.get("metadata") or {}).get(KEY_FIELD) == key:
                return _refund_sent(api, refund, payload.charge)
    return None


def _refund_sent(api: Any, refund: dict[str, Any], charge_id: str) -> Sent:
    """The refund as the action's result (its charge as an id) and the charge for the mirror: the expanded one
    Stripe answered with, else read now."""
    charge = refund.get("charge")
    if not isinstance(charge, dict):
        charge = api.get(f"/v1/charges/{charge_id}", {})
    return Sent({**refund, "charge": charge["id"]}, refund["id"], (Mirrored("stripe_payments", charge, _now()),))


# --- payment intents --------------------------------------------------------------------------------------------


def create_payment_intent(api: Any, payload: CreatePaymentIntent, key: str) -> Sent:
    """Create the payment intent (confirmed at once with `confirm`), its metadata carrying the key. A declined
    card is Stripe's 402 `card_error`: the action fails with Stripe's message."""
    params = {
        "amount": minor_units(payload.amount, payload.currency),
        "currency": payload.currency.lower(),
        "customer": payload.customer,
        "payment_method": payload.payment_method,
        "confirm": payload.confirm,
        "return_url": payload.return_url,
        # Redirect-based methods (bank redirects, wallets) need somewhere to bring the payer back to.
        "automatic_payment_methods": {"enabled": True, "allow_redirects": "always" if payload.return_url else "never"},
        "description": payload.description,
        "receipt_email": payload.receipt_email,
        "metadata": _tagged(payload.metadata, key),
    }
    intent = api.post("/v1/payment_intents", _form(params), idempotency_key=key)
    return _intent_sent(api, intent)


def find_payment_intent(api: Any, payload: CreatePaymentIntent, key: str) -> Sent | None:
    """The payment intent an earlier attempt created, found by its `nextcrm_key`. One that was declined ends the
    action as the 402 did; one created but not yet confirmed (Stripe failed in between) is confirmed now."""
    intent = _searched(api, "payment_intents", key)
    if intent is None:
        return None
    if payload.confirm and intent["status"] == "requires_confirmation":
        intent = api.post(f"/v1/payment_intents/{intent['id']}/confirm", _form({"return_url": payload.return_url}),
                          idempotency_key=f"{key}:confirm")  # fmt: skip
    elif payload.confirm and intent["status"] == "requires_payment_method" and intent.get("last_payment_error"):
        _declined(api, intent, "POST /v1/payment_intents")
    return _intent_sent(api, intent)


def confirm_payment_intent(api: Any, payload: ConfirmPaymentIntent, key: str) -> Sent:
    """Confirm the payment intent: Stripe charges it (a decline is its 402 `card_error`)."""
    params = {"payment_method": payload.payment_method, "return_url": payload.return_url}
    intent = api.post(f"/v1/payment_intents/{payload.payment_intent}/confirm", _form(params), idempotency_key=key)
    return _intent_sent(api, intent)


def find_confirmed_intent(api: Any, payload: ConfirmPaymentIntent, key: str) -> Sent | None:
    """The payment intent, if an earlier attempt (or anyone) already had it paid or processing."""
    intent = api.get(f"/v1/payment_intents/{payload.payment_intent}", {})
    if intent["status"] not in ("succeeded", "processing", "requires_capture"):
        return None
    return _intent_sent(api, intent)


def _declined(api: Any, intent: dict[str, Any], endpoint: str) -> None:
    error = intent["last_payment_error"]
    raise ProviderError(f"{error.get('message') or 'the card was declined'} ({error.get('code')}; payment intent "
                        f"{intent['id']}, found after an earlier attempt)", provider=PROVIDER,
                        connection_id=api.connection.id, endpoint=endpoint, status=402)  # fmt: skip


def _intent_sent(api: Any, intent: dict[str, Any]) -> Sent:
    """A payment intent as the action's result; its latest charge, read back, goes to the mirror."""
    charge_id = intent.get("latest_charge")
    if isinstance(charge_id, dict):
        charge_id = charge_id.get("id")
    if not charge_id:
        return Sent(intent, intent["id"])
    charge = api.get(f"/v1/charges/{charge_id}", {})
    return Sent(intent, intent["id"], (Mirrored("stripe_payments", charge, _now()),))


# --- subscriptions ----------------------------------------------------------------------------------------------


def _subscription_sent(subscription: dict[str, Any]) -> Sent:
    return Sent(subscription, subscription["id"], (Mirrored("stripe_subscriptions", subscription, _now()),))


def create_subscription(api: Any, payload: CreateSubscription, key: str) -> Sent:
    """Create the subscription, its metadata carrying the key."""
    params = {
        "customer": payload.customer,
        "items": [{"price": payload.price, "quantity": payload.quantity}],
        "trial_period_days": payload.trial_period_days,
        "payment_behavior": payload.payment_behavior,
        "default_payment_method": payload.default_payment_method,
        "description": payload.description,
        "metadata": _tagged(payload.metadata, key),
    }
    return _subscription_sent(api.post("/v1/subscriptions", _form(params), idempotency_key=key))


def find_subscription(api: Any, payload: CreateSubscription, key: str) -> Sent | None:
    """The subscription an earlier attempt created, found by its `nextcrm_key`."""
    subscription = _searched(api, "subscriptions", key)
    return None if subscription is None else _subscription_sent(subscription)


def update_subscription(api: Any, payload: UpdateSubscription, key: str) -> Sent:
    """Change the item's price or quantity (`items[0][id]` with the new values): the item keeps its id, and a
    repeat of the same change, even after the key expired, changes nothing."""
    subscription = api.get(f"/v1/subscriptions/{payload.subscription}", {})
    items = (subscription.get("items") or {}).get("data") or []
    if payload.item is not None:
        item = next((i for i in items if i["id"] == payload.item), None)
        if item is None:
            raise ActionInvalid(f"update_subscription: {payload.subscription} has no item {payload.item}: "
                                "nothing was sent")  # fmt: skip
    elif len(items) == 1:
        item = items[0]
    else:
        raise ActionInvalid(f"update_subscription: {payload.subscription} has {len(items)} items: name the one to "
                            "change (item): nothing was sent")  # fmt: skip
    change = _form({"id": item["id"], "price": payload.price, "quantity": payload.quantity})
    params = {"items": [change], "proration_behavior": payload.proration_behavior}
    updated = api.post(f"/v1/subscriptions/{payload.subscription}", _form(params), idempotency_key=key)
    return _subscription_sent(updated)


def cancel_subscription(api: Any, payload: CancelSubscription, key: str) -> Sent:
    """At the period's end: `cancel_at_period_end` (a POST under the key). Now: `DELETE`, which takes no key;
    a 404 after the subscription was seen live means a retry of this very request found it canceled."""
    details = _form({"feedback": payload.feedback, "comment": payload.comment})
    path = f"/v1/subscriptions/{payload.subscription}"
    if payload.at_period_end:
        params = {"cancel_at_period_end": True, "cancellation_details": details}
        return _subscription_sent(api.post(path, _form(params), idempotency_key=key))
    current = api.get(path, {})
    if current["status"] in ENDED:
        raise ActionInvalid(f"cancel_subscription: {payload.subscription} has already ended ({current['status']}): "
                            "nothing was sent")  # fmt: skip
    params = _form({"prorate": payload.prorate, "invoice_now": payload.invoice_now, "cancellation_details": details})
    try:
        return _subscription_sent(api.delete(path, params))
    except ProviderError as exc:
        if exc.status != 404:
            raise
        after = api.get(path, {})
        if after["status"] not in ENDED:
            raise
        return _subscription_sent(after)


def find_cancellation(api: Any, payload: CancelSubscription, key: str) -> Sent | None:
    """The subscription, if it is already canceled (or, for `at_period_end`, set to cancel then)."""
    subscription = api.get(f"/v1/subscriptions/{payload.subscription}", {})
    done = subscription["status"] in ENDED or (payload.at_period_end and subscription.get("cancel_at_period_end"))
    return _subscription_sent(subscription) if done else None


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_customer", CreateCustomer, create_customer, "Create a customer.", find=find_customer,
                   entities=("stripe_customers",)),
        ActionSpec("refund_charge", RefundCharge, refund_charge, "Refund a charge, in full or in part.",
                   find=find_refund, entities=("stripe_payments",)),
        ActionSpec("create_payment_intent", CreatePaymentIntent, create_payment_intent,
                   "Create a payment intent, confirmed at once with a payment method when asked.",
                   find=find_payment_intent, entities=("stripe_payments",)),
        ActionSpec("confirm_payment_intent", ConfirmPaymentIntent, confirm_payment_intent,
                   "Confirm a payment intent: Stripe charges its payment method.", find=find_confirmed_intent,
                   entities=("stripe_payments",)),
        ActionSpec("create_subscription", CreateSubscription, create_subscription,
                   "Subscribe a customer to a recurring price.", find=find_subscription,
                   entities=("stripe_subscriptions",)),
        ActionSpec("update_subscription", UpdateSubscription, update_subscription,
                   "Change a subscription's price or quantity, prorated.", entities=("stripe_subscriptions",)),
        ActionSpec("cancel_subscription", CancelSubscription, cancel_subscription,
                   "Cancel a subscription now or at the end of its period.", find=find_cancellation,
                   entities=("stripe_subscriptions",)),
    )
}  # fmt: skip
