"""What NextCRM asks PayPal to do, through the outbox (`core.outbox`): create a checkout order and capture it once
the payer approved it, refund a capture, create, activate and deactivate a billing plan, cancel or suspend a
subscription.

Every request carries the outbox row's key as `PayPal-Request-Id` (`client.request_id`). PayPal answers a
repeated one on order and plan creation, captures and refunds with its first result (for six hours), so a retry
after a timeout, a 5xx or a crash never makes a second order, capture, refund or plan. Activating, deactivating,
cancelling and suspending take no request id at PayPal, and a second one is refused (422 `PLAN_STATUS_INVALID`,
`SUBSCRIPTION_STATUS_INVALID`): before re-sending one whose earlier attempt may have reached PayPal, `find` reads
the plan or subscription and adopts the change when it is made. A capture is found the same way (an order is
captured once), after the six hours too.

Money is a decimal string with its currency, sent as PayPal's `{"currency_code", "value"}` with the currency's
decimals at PayPal (none for HUF, JPY and TWD, two for the others; PayPal refuses other currencies and finer
amounts, and so does the payload check, before anything is sent).

Read your writes. A capture and a refund become `paypal_payments` rows keyed as the sync keys Transaction Search
rows (`<transaction id>:T0006` for a Checkout capture, `:T1107` for a refund). Each is read back as the sync reads
it (Transaction Search, that second, every field) when PayPal shows it already in its current state, so a later
sync changes nothing; PayPal shows transactions up to three hours late, and until then the row is what the
capture or refund says, laid over the older Transaction Search row where there is one (its payer) or over the
order's payer, as the webhooks do; the sync later stores the full row. Plans and subscriptions are read back with
the endpoints the sync uses, at their `update_time`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, field_validator, model_validator

from nextcrm_pipelines.core.actions import ActionInvalid, ActionSpec, Amount, Currency, Mirrored, Payload, Sent
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.providers.paypal.client import PayPalApi, paypal_errors
from nextcrm_pipelines.providers.paypal.records import parse_time, payment_version, plan_version
from nextcrm_pipelines.providers.paypal.webhooks import in_search_order, payment_info, refund_info

# The currencies PayPal takes for payments and balances; HUF, JPY and TWD have no decimals there.
PAYPAL_CURRENCIES = frozenset({"AUD", "BRL", "CAD", "CNY", "CZK", "DKK", "EUR", "HKD", "HUF", "INR", "ILS", "JPY",
                               "MYR", "MXN", "TWD", "NZD", "NOK", "PHP", "PLN", "GBP", "SGD", "SEK", "CHF", "THB",
                               "USD"})  # fmt: skip
ZERO_DECIMAL = frozenset({"HUF", "JPY", "TWD"})
MAX_VALUE = Decimal("999999999999999.99")
# The longest interval of each unit PayPal bills by.
MAX_INTERVAL = {"DAY": 365, "WEEK": 52, "MONTH": 12, "YEAR": 1}
PAYPAL_ID = r"^[A-Z0-9]{10,36}$"  # orders and captures (Transaction Search transaction ids)
PLAN_ID = r"^P-[A-Z0-9]{6,50}$"
SUBSCRIPTION_ID = r"^I-[A-Z0-9]{6,50}$"
URL = r"^https?://\S+$"
PAYMENTS, PLANS, SUBSCRIPTIONS = "paypal_payments", "paypal_plans", "paypal_subscriptions"
Interval = Literal["DAY", "WEEK", "MONTH", "YEAR"]


def paypal_value(amount: Decimal, currency: str) -> str:
    """`amount` as PayPal's decimal string in `currency`: its decimals at PayPal (none for HUF, JPY, TWD), never
    rounded (finer amounts are refused)."""
    code = currency.upper()
    places = 0 if code in ZERO_DECIMAL else 2
    if amount != amount.quantize(Decimal(1).scaleb(-places)):
        unit = "no decimals" if not places else f"{places} decimal places"
        raise ValueError(f"{code} amounts have {unit} at PayPal, got {amount}")
    if amount > MAX_VALUE:
        raise ValueError(f"PayPal takes amounts up to {MAX_VALUE}")
    return f"{amount:.{places}f}"


def _money(amount: Decimal, currency: str) -> dict[str, str]:
    return {"currency_code": currency.upper(), "value": paypal_value(amount, currency)}


def _paypal_currency(currency: str | None) -> str | None:
    if currency is not None and currency.upper() not in PAYPAL_CURRENCIES:
        raise ValueError(f"PayPal does not take {currency.upper()} (it takes {', '.join(sorted(PAYPAL_CURRENCIES))})")
    return currency


def _checked(field: str, amount: Decimal | None, currency: str | None) -> None:
    """Refuse an amount the currency cannot hold at PayPal, naming the field."""
    if amount is not None and currency is not None:
        try:
            paypal_value(amount, currency)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None


# --- payloads ---------------------------------------------------------------------------------------------------


class Item(Payload):
    """One line of an order: what is sold, how many, at what unit price (in the order's currency)."""

    name: str = Field(min_length=1, max_length=127)
    quantity: int = Field(default=1, ge=1, le=9_999_999_999)
    unit_amount: Amount
    sku: str | None = Field(default=None, max_length=127)
    description: str | None = Field(default=None, max_length=127)


class CreateOrder(Payload):
    """A checkout order to capture once the payer approves it (on the `approve` link of the result). With `items`,
    their unit amounts times quantities add up to `amount`."""

    amount: Amount
    currency: Currency
    description: str | None = Field(default=None, max_length=127)
    invoice_id: str | None = Field(default=None, max_length=127, description="Your invoice number (unique at PayPal)")
    custom_id: str | None = Field(default=None, max_length=127, description="Your reference, shown in reports")
    reference_id: str | None = Field(default=None, max_length=256)
    items: list[Item] = Field(default_factory=list, max_length=100)
    brand_name: str | None = Field(default=None, max_length=127)
    return_url: str | None = Field(default=None, max_length=4000, pattern=URL)
    cancel_url: str | None = Field(default=None, max_length=4000, pattern=URL)

    paypal_currency = field_validator("currency")(_paypal_currency)

    @model_validator(mode="after")
    def _check(self) -> CreateOrder:
        _checked("amount", self.amount, self.currency)
        for n, item in enumerate(self.items):
            _checked(f"items.{n}.unit_amount", item.unit_amount, self.currency)
        if self.items and sum(i.unit_amount * i.quantity for i in self.items) != self.amount:
            raise ValueError("items: their unit amounts times quantities do not add up to amount")
        return self


class CaptureOrder(Payload):
    """Capture an order the payer approved (all of it: an order is captured once)."""

    order_id: str = Field(pattern=PAYPAL_ID)


class RefundCapture(Payload):
    """Refund a capture: what is left of it without `amount`, else that much (in the capture's currency)."""

    capture_id: str = Field(pattern=PAYPAL_ID)
    amount: Amount | None = None
    currency: Currency | None = None
    invoice_id: str | None = Field(default=None, max_length=127)
    custom_id: str | None = Field(default=None, max_length=127)
    note_to_payer: str | None = Field(default=None, max_length=255)

    paypal_currency = field_validator("currency")(_paypal_currency)

    @model_validator(mode="after")
    def _check(self) -> RefundCapture:
        if (self.amount is None) != (self.currency is None):
            raise ValueError("a partial refund gives both amount and currency (a full refund neither)")
        _checked("amount", self.amount, self.currency)
        return self


class Trial(Payload):
    """A trial billed before the regular cycle: free without `price`."""

    interval_unit: Interval
    interval_count: int = Field(default=1, ge=1, le=365)
    total_cycles: int = Field(default=1, ge=1, le=999)
    price: Amount | None = None


class CreatePlan(Payload):
    """A billing plan of a catalog product (`PROD-...`, made in PayPal): its regular price every `interval_count`
    `interval_unit`s for `total_cycles` cycles (0: until cancelled), after an optional trial."""

    product_id: str = Field(min_length=6, max_length=50, pattern=r"^[A-Za-z0-9_-]+$")
    name: str = Field(min_length=1, max_length=127)
    description: str | None = Field(default=None, min_length=1, max_length=127)
    interval_unit: Interval
    interval_count: int = Field(default=1, ge=1, le=365)
    price: Amount
    currency: Currency
    total_cycles: int = Field(default=0, ge=0, le=999)
    trial: Trial | None = None
    setup_fee: Amount | None = None
    auto_bill_outstanding: bool = True
    payment_failure_threshold: int = Field(default=0, ge=0, le=999)
    tax_percentage: Decimal | None = Field(default=None, ge=0, le=100, max_digits=5, decimal_places=2)
    tax_inclusive: bool = True
    status: Literal["ACTIVE", "CREATED"] = "ACTIVE"

    paypal_currency = field_validator("currency")(_paypal_currency)

    @model_validator(mode="after")
    def _check(self) -> CreatePlan:
        for name, unit, count in [("interval_count", self.interval_unit, self.interval_count),
                                  *([("trial.interval_count", self.trial.interval_unit, self.trial.interval_count)]
                                    if self.trial else [])]:  # fmt: skip
            if count > MAX_INTERVAL[unit]:
                raise ValueError(f"{name}: PayPal bills a {unit} interval at most every {MAX_INTERVAL[unit]}")
        _checked("price", self.price, self.currency)
        _checked("setup_fee", self.setup_fee, self.currency)
        _checked("trial.price", self.trial.price if self.trial else None, self.currency)
        return self


class ChangePlan(Payload):
    """Activate or deactivate a billing plan (deactivated, no new subscriptions take it)."""

    plan_id: str = Field(pattern=PLAN_ID)


class ChangeSubscription(Payload):
    """Cancel or suspend a subscription, saying why (PayPal shows the reason to the subscriber)."""

    subscription_id: str = Field(pattern=SUBSCRIPTION_ID)
    reason: str = Field(min_length=1, max_length=128)


# --- the mirror -------------------------------------------------------------------------------------------------


def _version(resource: dict[str, Any]) -> datetime:
    """When a PayPal resource's state was true, as the sync dates it: its `update_time` (else `create_time`)."""
    moment = parse_time(resource.get("update_time")) or parse_time(resource.get("create_time"))
    if moment is None:
        raise ProviderError(f"{resource.get('id')} has no update_time", provider="paypal")
    return moment


def _shown(api: PayPalApi, transaction_id: str, code: str, at: datetime | None) -> dict[str, Any] | None:
    """The Transaction Search row `<transaction_id>:<code>` initiated at `at` as the sync reads it, if PayPal shows
    it yet; a search PayPal refuses reads as not shown (the write it follows is done)."""
    if at is None:
        return None
    try:
        rows = api.transaction_rows(transaction_id, at)
    except ProviderError as exc:
        if exc.status is None or not 400 <= exc.status < 500:
            raise
        return None
    return next((r for r in rows if r["transaction_info"].get("transaction_event_code") == code), None)


def _payment(api: PayPalApi, info: dict[str, Any], code: str, resource: dict[str, Any],
             base: Callable[[], dict[str, Any]]) -> tuple[Mirrored, dict[str, Any]]:  # fmt: skip
    """A `paypal_payments` row of a capture or refund: the Transaction Search row when it shows the resource's
    state, else `info` laid over that row (or, when PayPal does not show it yet, over `base()`: the payer) as of
    the resource's time. Returns the row and what it was laid over."""
    version = _version(resource)
    listed = _shown(api, info["transaction_id"], code, parse_time(resource.get("create_time")))
    if listed is not None and payment_version(listed) >= version:
        return Mirrored(PAYMENTS, listed, payment_version(listed)), listed
    base_row = listed if listed is not None else base()
    merged = {**(base_row.get("transaction_info") or {}), **info, "transaction_event_code": code}
    raw = {**base_row, "transaction_info": in_search_order(merged)}
    return Mirrored(PAYMENTS, raw, version), base_row


def _payer_base(order: dict[str, Any]) -> dict[str, Any]:
    """An order's payer as Transaction Search's `payer_info` names it (until the sync reads the row)."""
    payer = order.get("payer") or {}
    if not payer.get("payer_id"):
        return {}
    name = payer.get("name") or {}
    info: dict[str, Any] = {"account_id": payer["payer_id"]}
    if payer.get("email_address"):
        info["email_address"] = payer["email_address"]
    full = " ".join(p for p in (name.get("given_name"), name.get("surname")) if p)
    if full:
        info["payer_name"] = {**{k: name[k] for k in ("given_name", "surname") if name.get(k)},
                              "alternate_full_name": full}  # fmt: skip
    if (payer.get("address") or {}).get("country_code"):
        info["country_code"] = payer["address"]["country_code"]
    return {"payer_info": info}


def _order_of(api: PayPalApi, capture: dict[str, Any]) -> dict[str, Any]:
    """The order a capture belongs to, or `{}` when PayPal does not give it."""
    order_id = ((capture.get("supplementary_data") or {}).get("related_ids") or {}).get("order_id")
    if not order_id:
        return {}
    try:
        return api.order(str(order_id))
    except ProviderError as exc:
        if exc.status == 404:
            return {}
        raise


def _captured(api: PayPalApi, order: dict[str, Any]) -> Sent:
    """A captured order's captures in the mirror; the result is the order, its id the (first) capture's."""
    captures = [c for unit in order.get("purchase_units") or []
                for c in ((unit.get("payments") or {}).get("captures") or []) if isinstance(c, dict)]  # fmt: skip
    if not captures:
        raise ProviderError(f"order {order.get('id')} was captured but the answer names no capture",
                            provider="paypal")  # fmt: skip
    base = _payer_base(order)
    mirrored = tuple(_payment(api, payment_info(c, sale=False), "T0006", c, lambda: base)[0] for c in captures)
    return Sent(order, str(captures[0]["id"]), mirrored)


def _plan_mirror(plan: dict[str, Any]) -> Mirrored:
    return Mirrored(PLANS, plan, plan_version(plan))


def _subscription_mirror(sub: dict[str, Any]) -> Mirrored:
    return Mirrored(SUBSCRIPTIONS, sub, _version(sub))


# --- the actions --------------------------------------------------------------------------------------------------


def create_order(api: PayPalApi, payload: CreateOrder, key: str) -> Sent:
    """POST /v2/checkout/orders (intent CAPTURE); the result carries the `approve` link for the payer."""
    amount: dict[str, Any] = _money(payload.amount, payload.currency)
    unit: dict[str, Any] = {"amount": amount}
    if payload.items:
        amount["breakdown"] = {"item_total": _money(payload.amount, payload.currency)}
        unit["items"] = [
            {k: v for k, v in {"name": i.name, "quantity": str(i.quantity),
                               "unit_amount": _money(i.unit_amount, payload.currency), "sku": i.sku,
                               "description": i.description}.items() if v is not None}
            for i in payload.items
        ]  # fmt: skip
    for name in ("reference_id", "description", "invoice_id", "custom_id"):
        if getattr(payload, name) is not None:
            unit[name] = getattr(payload, name)
    body: dict[str, Any] = {"intent": "CAPTURE", "purchase_units": [unit]}
    context = {k: getattr(payload, k) for k in ("brand_name", "return_url", "cancel_url") if getattr(payload, k)}
    if context:
        body["application_context"] = context
    order = api.write("/v2/checkout/orders", body, key=key)
    return Sent(order, str(order["id"]))


def capture_order(api: PayPalApi, payload: CaptureOrder, key: str) -> Sent:
    """POST /v2/checkout/orders/{id}/capture; the captures go to `paypal_payments`."""
    order = api.write(f"/v2/checkout/orders/{quote(payload.order_id, safe='')}/capture", {}, key=key)
    return _captured(api, order)


def find_capture(api: PayPalApi, payload: CaptureOrder, key: str) -> Sent | None:
    """The order's captures when an earlier attempt captured it (an order is captured once)."""
    with paypal_errors():
        order = api.order(payload.order_id)
    return _captured(api, order) if order.get("status") == "COMPLETED" else None


def refund_capture(api: PayPalApi, payload: RefundCapture, key: str) -> Sent:
    """POST /v2/payments/captures/{id}/refund, then the refund and the refunded capture to `paypal_payments`."""
    path = f"/v2/payments/captures/{quote(payload.capture_id, safe='')}"
    body: dict[str, Any] = {}
    if payload.amount is not None and payload.currency is not None:
        with paypal_errors():
            theirs = str(((api.capture(payload.capture_id).get("amount")) or {}).get("currency_code") or "")
        if theirs.upper() != payload.currency.upper():
            raise ActionInvalid(f"refund_capture: currency: {payload.currency.upper()} is not capture "
                                f"{payload.capture_id}'s currency ({theirs}): nothing was sent")  # fmt: skip
        body["amount"] = _money(payload.amount, payload.currency)
    for name in ("invoice_id", "custom_id", "note_to_payer"):
        if getattr(payload, name) is not None:
            body[name] = getattr(payload, name)
    refund = api.write(f"{path}/refund", body, key=key)
    with paypal_errors():
        capture = api.capture(payload.capture_id)
    captured, base = _payment(api, payment_info(capture, sale=False), "T0006", capture,
                              lambda: _payer_base(_order_of(api, capture)))  # fmt: skip
    payer = {"payer_info": base["payer_info"]} if base.get("payer_info") else {}
    refunded, _ = _payment(api, refund_info(refund, payload.capture_id, sale=False), "T1107", refund, lambda: payer)
    return Sent(refund, str(refund["id"]), (refunded, captured))


def create_plan(api: PayPalApi, payload: CreatePlan, key: str) -> Sent:
    """POST /v1/billing/plans; the plan, read back, goes to `paypal_plans`."""
    cycles: list[dict[str, Any]] = []
    if payload.trial is not None:
        trial: dict[str, Any] = {
            "frequency": {"interval_unit": payload.trial.interval_unit, "interval_count": payload.trial.interval_count},
            "tenure_type": "TRIAL",
            "sequence": 1,
            "total_cycles": payload.trial.total_cycles,
        }
        if payload.trial.price is not None:
            trial["pricing_scheme"] = {"fixed_price": _money(payload.trial.price, payload.currency)}
        cycles.append(trial)  # fmt: skip
    cycles.append({"frequency": {"interval_unit": payload.interval_unit, "interval_count": payload.interval_count},
                   "tenure_type": "REGULAR", "sequence": len(cycles) + 1, "total_cycles": payload.total_cycles,
                   "pricing_scheme": {"fixed_price": _money(payload.price, payload.currency)}})  # fmt: skip
    preferences: dict[str, Any] = {"auto_bill_outstanding": payload.auto_bill_outstanding,
                                   "payment_failure_threshold": payload.payment_failure_threshold}  # fmt: skip
    if payload.setup_fee is not None:
        preferences["setup_fee"] = _money(payload.setup_fee, payload.currency)
        preferences["setup_fee_failure_action"] = "CANCEL"
    body: dict[str, Any] = {"product_id": payload.product_id, "name": payload.name, "status": payload.status,
                            "billing_cycles": cycles, "payment_preferences": preferences}  # fmt: skip
    if payload.description is not None:
        body["description"] = payload.description
    if payload.tax_percentage is not None:
        body["taxes"] = {"percentage": format(payload.tax_percentage, "f"), "inclusive": payload.tax_inclusive}
    plan = api.write("/v1/billing/plans", body, key=key)
    with paypal_errors():
        current = api.plan(str(plan["id"]), fresh=True)
    return Sent(plan, str(plan["id"]), (_plan_mirror(current),))


def _plan_change(action: str, target: str) -> tuple[Callable[..., Sent], Callable[..., Sent | None]]:
    """POST /v1/billing/plans/{id}/<action> (204), then the plan read back; and its lookup: the plan when it is
    `target` already."""

    def send(api: PayPalApi, payload: ChangePlan, key: str) -> Sent:
        api.write(f"/v1/billing/plans/{quote(payload.plan_id, safe='')}/{action}", None, key=key)
        with paypal_errors():
            plan = api.plan(payload.plan_id, fresh=True)
        return Sent(plan, payload.plan_id, (_plan_mirror(plan),))

    def find(api: PayPalApi, payload: ChangePlan, key: str) -> Sent | None:
        with paypal_errors():
            plan = api.plan(payload.plan_id, fresh=True)
        return Sent(plan, payload.plan_id, (_plan_mirror(plan),)) if plan.get("status") == target else None

    return send, find


def _subscription_change(action: str, target: str) -> tuple[Callable[..., Sent], Callable[..., Sent | None]]:
    """POST /v1/billing/subscriptions/{id}/<action> with the reason (204), then the subscription read back with
    its plan; and its lookup: the subscription when it is `target` already."""

    def send(api: PayPalApi, payload: ChangeSubscription, key: str) -> Sent:
        path = f"/v1/billing/subscriptions/{quote(payload.subscription_id, safe='')}/{action}"
        api.write(path, {"reason": payload.reason}, key=key)
        with paypal_errors():
            sub = api.subscription(payload.subscription_id)
        return Sent(sub, payload.subscription_id, (_subscription_mirror(sub),))

    def find(api: PayPalApi, payload: ChangeSubscription, key: str) -> Sent | None:
        with paypal_errors():
            sub = api.subscription(payload.subscription_id)
        if sub.get("status") != target:
            return None
        return Sent(sub, payload.subscription_id, (_subscription_mirror(sub),))

    return send, find


_activate, _found_active = _plan_change("activate", "ACTIVE")
_deactivate, _found_inactive = _plan_change("deactivate", "INACTIVE")
_cancel, _found_cancelled = _subscription_change("cancel", "CANCELLED")
_suspend, _found_suspended = _subscription_change("suspend", "SUSPENDED")

ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_order", CreateOrder, create_order,
                   "Create a checkout order for the payer to approve (its approve link is in the result)."),
        ActionSpec("capture_order", CaptureOrder, capture_order, "Capture an order the payer approved.",
                   find=find_capture, entities=(PAYMENTS,)),
        ActionSpec("refund_capture", RefundCapture, refund_capture, "Refund a capture, in full or in part.",
                   entities=(PAYMENTS,)),
        ActionSpec("create_plan", CreatePlan, create_plan, "Create a billing plan of a catalog product.",
                   entities=(PLANS,)),
        ActionSpec("activate_plan", ChangePlan, _activate, "Activate a billing plan.", find=_found_active,
                   entities=(PLANS,)),
        ActionSpec("deactivate_plan", ChangePlan, _deactivate, "Deactivate (archive) a billing plan.",
                   find=_found_inactive, entities=(PLANS,)),
        ActionSpec("cancel_subscription", ChangeSubscription, _cancel, "Cancel a subscription (for good).",
                   find=_found_cancelled, entities=(SUBSCRIPTIONS,)),
        ActionSpec("suspend_subscription", ChangeSubscription, _suspend, "Suspend a subscription (it can be "
                   "activated again).", find=_found_suspended, entities=(SUBSCRIPTIONS,)),
    )
}  # fmt: skip
