"""Stripe subscriptions for the sandbox: the price and product catalogue (``GET /v1/prices``, ``/v1/products``),
and subscriptions created, changed and canceled through the API.

``POST /v1/subscriptions`` takes a live ``customer`` and ``items[n][price]`` (recurring prices of one currency and
interval) with ``items[n][quantity]``, and starts the first billing period now with its invoice
(``subscription_create``): a trial's invoice is of zero and paid; with ``collection_method=charge_automatically``
the invoice is paid with ``default_payment_method`` or the customer's default card (a PaymentIntent and its
charge), and the subscription is created ``incomplete`` then made ``active`` (two events, as at Stripe). Without
a card ``payment_behavior=default_incomplete`` leaves it ``incomplete`` with its invoice open; ``allow_incomplete``
(the default) and ``error_if_incomplete`` are refused with Stripe's "no attached payment source". A declined
card leaves it ``incomplete`` (``allow_incomplete``) or creates nothing and answers the 402
(``error_if_incomplete``).

``POST /v1/subscriptions/<id>`` changes items (``items[n][id]`` with a new ``price`` or ``quantity``,
``items[n][deleted]``, or a new item without ``id``), ``metadata``, ``description`` and
``cancel_at_period_end`` (which sets ``cancel_at`` to the period's end and ``canceled_at`` to now). A change of
price or quantity is prorated over the rest of the period (``proration_behavior``): ``create_prorations`` (the
default) leaves two pending invoice items (``proration: true``) for the next invoice, ``always_invoice`` bills them
at once, ``none`` does neither. A price of another billing interval is not emulated.

``DELETE /v1/subscriptions/<id>`` cancels now; ``prorate=true`` credits the unused time as a pending item and
``invoice_now=true`` bills the subscription's pending items in a final invoice; with neither, its pending
prorations are removed. An ended subscription answers 404, as at Stripe.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from nextcrm_sandbox.stripe import billing
from nextcrm_sandbox.stripe.data import _add_months, _Ids
from nextcrm_sandbox.stripe.model import _ENDED_STATUSES, StripeError, _missing
from nextcrm_sandbox.stripe.params import _as_bool, _as_int, _as_list, _as_str, _check_params, _metadata_update
from nextcrm_sandbox.stripe.store import Row, _Collection, _dump

if TYPE_CHECKING:
    from nextcrm_sandbox.stripe.account import _RequestInfo

_CREATE = frozenset({"customer", "items", "metadata", "description", "default_payment_method", "payment_behavior",
                     "proration_behavior", "trial_period_days", "trial_end", "cancel_at_period_end",
                     "collection_method", "days_until_due", "off_session", "expand"})  # fmt: skip
_UPDATE = frozenset({"items", "metadata", "description", "cancel_at_period_end", "cancellation_details",
                     "proration_behavior", "proration_date", "payment_behavior", "off_session", "expand"})  # fmt: skip
_CANCEL = frozenset({"invoice_now", "prorate", "cancellation_details", "expand"})
_ITEM_CREATE = frozenset({"price", "quantity", "metadata"})
_ITEM_UPDATE = frozenset({"id", "price", "quantity", "metadata", "deleted", "clear_usage"})
_PAYMENT_BEHAVIORS = ("allow_incomplete", "default_incomplete", "error_if_incomplete", "pending_if_incomplete")
_PRORATIONS = ("always_invoice", "create_prorations", "none")
_FEEDBACK = frozenset({"customer_service", "low_quality", "missing_features", "other", "switched_service",
                       "too_complex", "too_expensive", "unused"})  # fmt: skip
_NO_PAYMENT_SOURCE = (
    "This customer has no attached payment source or default payment method. Please consider adding a default "
    "payment method. For more information, visit "
    "https://stripe.com/docs/billing/subscriptions/payment-methods-setting#payment-method-priority."
)
_MAX_ITEMS = 20
_TIMES = "\u00d7"  # Stripe's line descriptions: "2 \u00d7 Starter"
# An item's change: (what it was, what it is), None for an item added or deleted.
_Change = tuple[dict[str, Any] | None, dict[str, Any] | None]


# --- the catalogue ----------------------------------------------------------------------------------------------


def plan_object(price: Mapping[str, Any], livemode: bool) -> dict[str, Any]:
    """The legacy ``plan`` a recurring price is also shown as on subscriptions and their items."""
    return {
        "id": price["id"],
        "object": "plan",
        "active": True,
        "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"],
        "billing_scheme": "per_unit",
        "created": price["created"],
        "currency": price["currency"],
        "interval": price["recurring"]["interval"],
        "interval_count": 1,
        "livemode": livemode,
        "metadata": {},
        "meter": None,
        "nickname": price["nickname"],
        "product": price["product"],
        "tiers_mode": None,
        "transform_usage": None,
        "trial_period_days": None,
        "usage_type": "licensed",
    }


def subscription_item(item_id: str, subscription: str, price: dict[str, Any], quantity: int, *, created: int,
                      period: tuple[int, int], livemode: bool, metadata: dict[str, str] | None = None
                      ) -> dict[str, Any]:  # fmt: skip
    """One ``subscription_item``: a price and its quantity over the current period (basil moved it there)."""
    return {
        "id": item_id,
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": created,
        "current_period_end": period[1],
        "current_period_start": period[0],
        "discounts": [],
        "metadata": metadata if metadata is not None else {},
        "plan": plan_object(price, livemode),
        "price": price,
        "quantity": quantity,
        "subscription": subscription,
        "tax_rates": [],
    }


def catalogue_rows(prices: list[dict[str, Any]]) -> tuple[list[Row], list[Row]]:
    """(price rows, product rows) of an account's catalogue: one product per price, named after it."""
    price_rows: list[Row] = []
    product_rows: list[Row] = []
    for price in prices:
        interval = (price.get("recurring") or {}).get("interval")
        meta = (price["active"], price["currency"], price["product"], price["type"], interval, price["lookup_key"])
        price_rows.append((price["created"], price["id"], _dump(price), meta))
        product = {
            "id": price["product"],
            "object": "product",
            "active": True,
            "created": price["created"],
            "default_price": price["id"],
            "description": None,
            "images": [],
            "livemode": price["livemode"],
            "marketing_features": [],
            "metadata": {},
            "name": f"NextCRM {price['nickname']}",
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": price["created"],
            "url": None,
        }
        product_rows.append((price["created"], product["id"], _dump(product), (True, None)))
    return price_rows, product_rows


def _period_after(start: int, interval: str) -> tuple[int, int]:
    return start, _add_months(start, 12 if interval == "year" else 1)


def _prorated(amount: int, period: tuple[int, int], at: int) -> int:
    """``amount`` for the part of ``period`` left at ``at`` (Stripe prorates by the second)."""
    span = max(1, period[1] - period[0])
    left = min(span, max(0, period[1] - at))
    return round(amount * left / span)


def _day(at: int) -> str:
    return dt.datetime.fromtimestamp(at, tz=dt.UTC).strftime("%d %b %Y")


class Subscriptions:
    """The catalogue and the subscription writes of a ``StripeAccount`` (mixed into it: it uses the account's
    customers, subscriptions, invoices, invoice items, PaymentIntents and events feed)."""

    prices: _Collection
    products: _Collection
    subscriptions: _Collection
    customers: _Collection
    invoices: _Collection
    invoiceitems: _Collection
    livemode: bool
    _ids: _Ids
    _billing: billing.InvoiceSeeder
    _emit: Callable[..., str]
    _live_customer: Callable[..., int]
    _find_price: Callable[..., dict[str, Any]]
    _subscription_meta: Callable[..., tuple[Any, ...]]
    _invoice_meta: Callable[..., tuple[Any, ...]]
    _item_meta: Callable[..., tuple[Any, ...]]
    _attach_items: Callable[..., list[dict[str, Any]]]
    _finalize: Callable[..., list[tuple[str, dict[str, Any] | None]]]
    _store_invoice: Callable[..., bytes]
    _resolve_method: Callable[..., str]
    _payment_methods: dict[str, tuple[dict[str, Any], str | None]]
    pay_with: Callable[..., tuple[dict[str, Any], StripeError | None]]
    _expansions: Callable[..., frozenset[str]]
    _expand: Callable[..., bytes]

    # --- catalogue reads --------------------------------------------------------------------------------------

    def _catalogue_selection(self, resource: str, params: Mapping[str, Any]) -> list[int] | None:
        """Positions matching ``GET /v1/prices`` (``active``, ``currency``, ``product``, ``type``,
        ``recurring[interval]``, ``lookup_keys``) or ``GET /v1/products`` (``active``, ``ids``, ``shippable``,
        ``url``) filters."""
        coll = self.prices if resource == "prices" else self.products
        keep = list(range(len(coll)))
        if params.get("active", "") != "":
            active = _as_bool(params["active"], "active")
            keep = [i for i in keep if coll.meta[i][0] is active]
        if resource == "products":
            if params.get("ids"):
                wanted = set(_as_list(params["ids"], "ids"))
                keep = [i for i in keep if coll.ids[i] in wanted]
            if params.get("shippable", "") != "":
                shippable = _as_bool(params["shippable"], "shippable")
                keep = [i for i in keep if coll.meta[i][1] is shippable]
            if params.get("url"):
                keep = []  # no product of the catalogue has a url
            return keep
        if params.get("currency"):
            currency = _as_str(params["currency"], "currency").lower()
            keep = [i for i in keep if coll.meta[i][1] == currency]
        if params.get("product"):
            product = _as_str(params["product"], "product")
            keep = [i for i in keep if coll.meta[i][2] == product]
        if params.get("type"):
            kind = _as_str(params["type"], "type")
            if kind not in ("one_time", "recurring"):
                raise StripeError(400, "Invalid type: must be one of one_time or recurring", param="type")
            keep = [i for i in keep if coll.meta[i][3] == kind]
        if params.get("recurring"):
            recurring = params["recurring"]
            if not isinstance(recurring, dict) or set(recurring) - {"interval", "meter", "usage_type"}:
                raise StripeError(400, "Invalid recurring: must be a hash of interval, meter or usage_type.",
                                  param="recurring")  # fmt: skip
            if recurring.get("interval"):
                keep = [i for i in keep if coll.meta[i][4] == recurring["interval"]]
            if recurring.get("usage_type") not in (None, "", "licensed"):
                keep = []
            if recurring.get("meter"):
                keep = []
        if params.get("lookup_keys"):
            keys = set(_as_list(params["lookup_keys"], "lookup_keys"))
            keep = [i for i in keep if coll.meta[i][5] in keys]
        return keep

    def _recurring_price(self, price_id: Any, param: str) -> dict[str, Any]:
        price = self._find_price(_as_str(price_id, param), param)
        if price.get("type") != "recurring":
            raise StripeError(400, f"The price specified ({price['id']}) is set to `type=one_time` but this field only "
                              "accepts prices with `type=recurring`.", param=param)  # fmt: skip
        return price

    # --- create -------------------------------------------------------------------------------------------------

    def create_subscription(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo) -> bytes:
        """``POST /v1/subscriptions`` (see the module)."""
        _check_params(params, _CREATE)
        expand = self._expansions("subscriptions", params, "")
        if not params.get("customer"):
            raise StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        cid = _as_str(params["customer"], "customer")
        customer = orjson.loads(self.customers.blob(self._live_customer(cid, "customer", 400)))
        wanted = self._new_items(params.get("items"))
        currency = wanted[0][0]["currency"]
        interval = wanted[0][0]["recurring"]["interval"]
        method = _as_str(params.get("collection_method") or "charge_automatically", "collection_method")
        if method not in ("charge_automatically", "send_invoice"):
            raise StripeError(400, "Invalid collection_method: must be one of charge_automatically, send_invoice",
                              param="collection_method")  # fmt: skip
        days_until_due = None
        if method == "send_invoice":
            if params.get("days_until_due", "") == "":
                raise StripeError(400, "Missing required param: days_until_due.", code="parameter_missing",
                                  param="days_until_due")  # fmt: skip
            days_until_due = _as_int(params["days_until_due"], "days_until_due", minimum=0, maximum=730)
        behavior = self._payment_behavior(params)
        if behavior == "pending_if_incomplete":
            raise StripeError(400, "payment_behavior=pending_if_incomplete is only available when updating a "
                              "subscription.", param="payment_behavior")  # fmt: skip
        if params.get("proration_behavior") and params["proration_behavior"] not in _PRORATIONS:
            raise StripeError(400, "Invalid proration_behavior: must be one of " + ", ".join(_PRORATIONS),
                              param="proration_behavior")  # fmt: skip
        trial_end = self._trial_end(params, now)
        given_method = None
        if params.get("default_payment_method"):
            given_method = self._resolve_method(_as_str(params["default_payment_method"], "default_payment_method"),
                                                now)  # fmt: skip
        card = given_method or (customer.get("invoice_settings") or {}).get("default_payment_method")
        amount = sum(price["unit_amount"] * quantity for price, quantity, _ in wanted)
        charging = method == "charge_automatically" and trial_end is None and amount > 0
        if charging and behavior != "default_incomplete":
            if card is None:
                raise StripeError(400, _NO_PAYMENT_SOURCE, code="resource_missing")
            decline = self._payment_methods[self._resolve_method(card, now)][1]
            if decline is not None and behavior == "error_if_incomplete":
                _, answer = self.pay_with(card, customer=cid, amount=amount, currency=currency,
                                          description="Subscription creation", now=now, request=request)  # fmt: skip
                assert answer is not None
                raise answer  # the subscription is not created; the failed payment stays, as at Stripe

        sid = self._ids.long("sub_1")
        period = (now, trial_end) if trial_end is not None else _period_after(now, interval)
        items = [subscription_item(self._ids.short("si_"), sid, price, quantity, created=now + 1, period=period,
                                   livemode=self.livemode, metadata=metadata)
                 for price, quantity, metadata in wanted]  # fmt: skip
        iid = self._billing.ids.long("in_1")
        sub = self._subscription_object(sid, customer, items, created=now, currency=currency, latest_invoice=iid,
                                        status="trialing" if trial_end is not None else "incomplete")  # fmt: skip
        sub.update(collection_method=method, days_until_due=days_until_due, default_payment_method=given_method,
                   trial_start=now if trial_end is not None else None, trial_end=trial_end,
                   description=_as_str(params["description"], "description") or None if params.get("description")
                   else None,
                   metadata=_metadata_update({}, params["metadata"]) if "metadata" in params else {})  # fmt: skip
        if params.get("cancel_at_period_end", "") != "" and _as_bool(params["cancel_at_period_end"],
                                                                     "cancel_at_period_end"):  # fmt: skip
            sub.update(cancel_at_period_end=True, cancel_at=period[1], canceled_at=now)
        if not charging:
            sub["status"] = "trialing" if trial_end is not None else "active"
        blob = _dump(sub)
        self.subscriptions.insert(now, sid, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.created", blob, request)

        lines = [billing.line_item(self._billing.ids, iid, amount=0 if trial_end is not None else
                                   item["price"]["unit_amount"] * item["quantity"], currency=currency,
                                   description=f"{item['quantity']} {_TIMES} {item['price']['nickname']}"
                                   + (f" (trial until {_day(trial_end)})" if trial_end is not None else ""),
                                   quantity=item["quantity"], period=period, livemode=self.livemode,
                                   subscription=sid, subscription_item=item["id"], price=item["price"])
                 for item in items]  # fmt: skip
        paid = self._first_invoice(iid, customer, sid, lines, method, days_until_due, card if charging else None,
                                   behavior, now, request)  # fmt: skip
        if charging and paid:
            previous = {"status": sub["status"]}
            sub["status"] = "active"
            blob = _dump(sub)
            self.subscriptions.replace(self.subscriptions.pos[sid], blob, self._subscription_meta(sub))
            self._emit(now, "customer.subscription.updated", blob, request, previous)
        return self._expand("subscriptions", blob, expand) if expand else blob

    def _first_invoice(self, iid: str, customer: dict[str, Any], sid: str, lines: list[dict[str, Any]], method: str,
                       days_until_due: int | None, card: str | None, behavior: str, now: int,
                       request: _RequestInfo) -> bool:  # fmt: skip
        """The subscription's first invoice: created and finalized, then paid with ``card`` when one is given and
        not left for the customer (``default_incomplete``); whether it ended paid."""
        inv = billing.invoice_dict(iid, customer, created=now, currency=lines[0]["currency"], lines=lines,
                                   livemode=self.livemode, account_name=self._billing.account_name,
                                   collection_method=method, billing_reason="subscription_create", subscription=sid,
                                   days_until_due=days_until_due)  # fmt: skip
        self._bill(inv, card if behavior != "default_incomplete" else None, now, request)
        return inv["status"] == "paid"

    def _bill(self, inv: dict[str, Any], card: str | None, now: int, request: _RequestInfo) -> None:
        """Store a new invoice and finalize it (``invoice.created``, ``invoice.finalized``), then collect it with
        ``card`` when it is charged automatically and something is due: paid, or a failed attempt (no card is a
        failed attempt too). A negative total is owed to the customer: nothing is due, and the customer's credit
        balance takes it."""
        if inv["total"] < 0:
            inv["amount_due"] = inv["amount_remaining"] = 0
        self.invoices.insert(now, inv["id"], _dump(inv), self._invoice_meta(inv))
        i = self.invoices.pos[inv["id"]]
        self._emit(now, "invoice.created", self.invoices.blob(i), request)
        self._store_invoice(i, inv, self._finalize(inv, now), now, request)
        if inv["total"] < 0:
            self._credit(inv["customer"], inv["total"], now, request)
        if inv["status"] == "open" and inv["collection_method"] == "charge_automatically":
            steps = self._collect(inv, card, now, request) if card else [("fail", billing.fail(inv, now))]
            self._store_invoice(i, inv, steps, now, request)

    def _credit(self, cid: str, amount: int, now: int, request: _RequestInfo) -> None:
        """Add ``amount`` (negative: owed to the customer) to the customer's balance; emits ``customer.updated``."""
        k = self.customers.pos[cid]
        cus = orjson.loads(self.customers.blob(k))
        previous = {"balance": cus["balance"]}
        cus["balance"] += amount
        blob = _dump(cus)
        self.customers.replace(k, blob, self.customers.meta[k])
        self._emit(now, "customer.updated", blob, request, previous)

    def _collect(self, inv: dict[str, Any], card: str, now: int,
                 request: _RequestInfo) -> list[tuple[str, dict[str, Any] | None]]:  # fmt: skip
        """Pay an open invoice with ``card``: its PaymentIntent and charge, then the invoice's paid or failed step."""
        description = {
            "subscription_create": "Subscription creation",
            "subscription_update": "Subscription update",
            "subscription_cycle": "Subscription cycle",
        }.get(inv["billing_reason"], "Invoice payment")
        _, declined = self.pay_with(card, customer=inv["customer"], amount=inv["amount_due"], currency=inv["currency"],
                                    description=description, now=now, request=request)  # fmt: skip
        if declined is not None:
            return [("fail", billing.fail(inv, now))]
        return [("pay", billing.pay(inv, now))]

    def _new_items(self, raw: Any) -> list[tuple[dict[str, Any], int, dict[str, str]]]:
        """(price, quantity, metadata) of each item of a new subscription, checked as Stripe does."""
        if not raw:
            raise StripeError(400, "Missing required param: items.", code="parameter_missing", param="items")
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise StripeError(400, "Invalid array: items must be a list of hashes", param="items")
        if len(raw) > _MAX_ITEMS:
            raise StripeError(400, f"A subscription can have at most {_MAX_ITEMS} items.", param="items")
        wanted = []
        for n, item in enumerate(raw):
            _check_params({f"items[{n}][{k}]": v for k, v in item.items()},
                          frozenset(f"items[{n}][{k}]" for k in _ITEM_CREATE))  # fmt: skip
            if not item.get("price"):
                raise StripeError(400, f"Missing required param: items[{n}][price].", code="parameter_missing",
                                  param=f"items[{n}][price]")  # fmt: skip
            price = self._recurring_price(item["price"], f"items[{n}][price]")
            quantity = _as_int(item["quantity"], f"items[{n}][quantity]", minimum=0) if item.get("quantity", "") != "" \
                else 1  # fmt: skip
            metadata = _metadata_update({}, item["metadata"]) if "metadata" in item else {}
            wanted.append((price, quantity, metadata))
        self._check_mix([price for price, _, _ in wanted], "items")
        return wanted

    @staticmethod
    def _check_mix(prices: list[dict[str, Any]], param: str) -> None:
        """One currency and one interval on a subscription, and no price twice."""
        first = prices[0]
        for price in prices[1:]:
            if price["currency"] != first["currency"] or price["recurring"]["interval"] != first["recurring"][
                    "interval"]:  # fmt: skip
                raise StripeError(400, "Currency and interval fields must match across all plans on this "
                                  f"subscription. Found mismatch in {price['id']}.", param=param)  # fmt: skip
        seen: set[str] = set()
        for price in prices:
            if price["id"] in seen:
                raise StripeError(400, f"Cannot add multiple subscription items with the same price: {price['id']}",
                                  param=param)  # fmt: skip
            seen.add(price["id"])

    @staticmethod
    def _payment_behavior(params: Mapping[str, Any]) -> str:
        behavior = _as_str(params.get("payment_behavior") or "allow_incomplete", "payment_behavior")
        if behavior not in _PAYMENT_BEHAVIORS:
            raise StripeError(400, "Invalid payment_behavior: must be one of " + ", ".join(_PAYMENT_BEHAVIORS),
                              param="payment_behavior")  # fmt: skip
        return behavior

    @staticmethod
    def _trial_end(params: Mapping[str, Any], now: int) -> int | None:
        if params.get("trial_end", "") != "" and params.get("trial_period_days", "") != "":
            raise StripeError(400, "You may only specify one of these parameters: trial_end, trial_period_days.",
                              param="trial_period_days")  # fmt: skip
        if params.get("trial_period_days", "") != "":
            days = _as_int(params["trial_period_days"], "trial_period_days", minimum=0, maximum=730)
            return now + days * 86400 if days else None
        if params.get("trial_end", "") != "":
            if params["trial_end"] == "now":
                return None
            end = _as_int(params["trial_end"], "trial_end")
            if end <= now:
                raise StripeError(400, "Invalid timestamp: must be an integer Unix timestamp in the future.",
                                  param="trial_end")  # fmt: skip
            return end
        return None

    def _subscription_object(self, sid: str, customer: dict[str, Any], items: list[dict[str, Any]], *, created: int,
                             currency: str, latest_invoice: str, status: str) -> dict[str, Any]:  # fmt: skip
        """A subscription of ``customer`` created through the API, as Stripe renders one at the sandbox's version."""
        single = items[0] if len(items) == 1 else None
        return {
            "id": sid,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": items[0]["current_period_end"] if status == "trialing" else created,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"type": "classic"},
            "billing_schedules": [],
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": created,
            "currency": currency,
            "customer": customer["id"],
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {"object": "list", "data": items, "has_more": False, "total_count": len(items),
                      "url": f"/v1/subscription_items?subscription={sid}"},
            "latest_invoice": latest_invoice,
            "livemode": self.livemode,
            "managed_payments": None,
            "metadata": {},
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                                 "save_default_payment_method": "off"},
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "plan": single["plan"] if single else None,
            "quantity": single["quantity"] if single else None,
            "schedule": None,
            "start_date": created,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": None,
        }  # fmt: skip

    # --- update -------------------------------------------------------------------------------------------------

    def update_subscription(self, sid: str, params: Mapping[str, Any], *, now: int,
                            request: _RequestInfo | None = None) -> bytes:  # fmt: skip
        """``POST /v1/subscriptions/<id>`` (see the module): emits ``customer.subscription.updated`` with
        ``previous_attributes`` when something changed, after the proration items (and invoice) it made."""
        from nextcrm_sandbox.stripe.account import _RequestInfo

        req = request or _RequestInfo()
        _check_params(params, _UPDATE)
        expand = self._expansions("subscriptions", params, "")
        i = self.subscriptions.pos.get(sid)
        if i is None:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        if sub["status"] in _ENDED_STATUSES and set(params) - {"metadata", "cancellation_details", "expand"}:
            first = sorted(set(params) - {"metadata", "cancellation_details", "expand"})[0]
            raise StripeError(400, "A canceled subscription can only update its cancellation_details and metadata.",
                              param=first)  # fmt: skip
        behavior = self._payment_behavior(params)
        if behavior == "pending_if_incomplete":
            raise StripeError(400, "The sandbox does not emulate pending updates (payment_behavior="
                              "pending_if_incomplete).", param="payment_behavior")  # fmt: skip
        proration = _as_str(params.get("proration_behavior") or "create_prorations", "proration_behavior")
        if proration not in _PRORATIONS:
            raise StripeError(400, "Invalid proration_behavior: must be one of " + ", ".join(_PRORATIONS),
                              param="proration_behavior")  # fmt: skip
        period = (sub["items"]["data"][0]["current_period_start"], sub["items"]["data"][0]["current_period_end"])
        at = now
        if params.get("proration_date", "") != "":
            at = _as_int(params["proration_date"], "proration_date")
            if not period[0] <= at <= period[1]:
                raise StripeError(400, "The proration_date must be within the subscription's current period.",
                                  param="proration_date")  # fmt: skip
        previous: dict[str, Any] = {}
        changes: list[_Change] = []
        if "items" in params:
            changes = self._change_items(sub, params["items"], now, previous)
        if "cancel_at_period_end" in params:
            flag = _as_bool(params["cancel_at_period_end"], "cancel_at_period_end")
            if flag != sub["cancel_at_period_end"]:
                for name in ("cancel_at_period_end", "cancel_at", "canceled_at"):
                    previous[name] = sub[name]
                sub.update(cancel_at_period_end=flag, cancel_at=period[1] if flag else None,
                           canceled_at=now if flag else None)  # fmt: skip
        if "cancellation_details" in params:
            details = self._cancellation_details(params["cancellation_details"], sub["cancellation_details"])
            if details != sub["cancellation_details"]:
                previous["cancellation_details"], sub["cancellation_details"] = sub["cancellation_details"], details
        if "metadata" in params:
            metadata = _metadata_update(sub["metadata"], params["metadata"])
            if metadata != sub["metadata"]:
                previous["metadata"], sub["metadata"] = sub["metadata"], metadata
        if "description" in params:
            description = _as_str(params["description"], "description") or None
            if description != sub["description"]:
                previous["description"], sub["description"] = sub["description"], description
        if not previous:
            blob = self.subscriptions.blob(i)
            return self._expand("subscriptions", blob, expand) if expand else blob
        billed = sub["status"] in ("active", "past_due", "unpaid") and proration != "none"
        prorations = [self._proration(sub, old, new, period, at, now, req) for old, new in changes] if billed else []
        if prorations and proration == "always_invoice":
            self._invoice_now(sub, "subscription_update", now, req, previous)
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.updated", blob, req, previous)
        return self._expand("subscriptions", blob, expand) if expand else blob

    def _change_items(self, sub: dict[str, Any], raw: Any, now: int, previous: dict[str, Any]) -> list[_Change]:
        """Apply ``items`` to ``sub``; returns (old, new) of each item whose price or quantity changed (None for
        an item added or deleted) and fills ``previous``."""
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise StripeError(400, "Invalid array: items must be a list of hashes", param="items")
        items = [dict(item) for item in sub["items"]["data"]]
        by_id = {item["id"]: n for n, item in enumerate(items)}
        period = (items[0]["current_period_start"], items[0]["current_period_end"])
        changes: list[_Change] = []
        deleted: set[str] = set()
        for n, change in enumerate(raw):
            _check_params({f"items[{n}][{k}]": v for k, v in change.items()},
                          frozenset(f"items[{n}][{k}]" for k in _ITEM_UPDATE))  # fmt: skip
            quantity = _as_int(change["quantity"], f"items[{n}][quantity]", minimum=0) \
                if change.get("quantity", "") != "" else None  # fmt: skip
            price = self._recurring_price(change["price"], f"items[{n}][price]") if change.get("price") else None
            if change.get("id"):
                k = by_id.get(_as_str(change["id"], f"items[{n}][id]"))
                if k is None:
                    raise StripeError(400, f"No such subscription_item: '{change['id']}'", code="resource_missing",
                                      param=f"items[{n}][id]")  # fmt: skip
                old = items[k]
                if change.get("deleted", "") != "" and _as_bool(change["deleted"], f"items[{n}][deleted]"):
                    deleted.add(old["id"])
                    changes.append((old, None))
                    continue
                new = dict(old)
                if price is not None and price["id"] != old["price"]["id"]:
                    if price["recurring"]["interval"] != old["price"]["recurring"]["interval"]:
                        raise StripeError(400, "The sandbox does not emulate a change of billing interval: give a "
                                          f"price billed every {old['price']['recurring']['interval']}.",
                                          param=f"items[{n}][price]")  # fmt: skip
                    new.update(price=price, plan=plan_object(price, self.livemode))
                if quantity is not None:
                    new["quantity"] = quantity
                if "metadata" in change:
                    new["metadata"] = _metadata_update(old["metadata"], change["metadata"])
                items[k] = new
                if (new["price"]["id"], new["quantity"]) != (old["price"]["id"], old["quantity"]):
                    changes.append((old, new))
            else:
                if price is None:
                    raise StripeError(400, f"Missing required param: items[{n}][price].", code="parameter_missing",
                                      param=f"items[{n}][price]")  # fmt: skip
                new = subscription_item(self._ids.short("si_"), sub["id"], price, 1 if quantity is None else quantity,
                                        created=now, period=period, livemode=self.livemode,
                                        metadata=_metadata_update({}, change["metadata"]) if "metadata" in change
                                        else {})  # fmt: skip
                items.append(new)
                changes.append((None, new))
        items = [item for item in items if item["id"] not in deleted]
        if not items:
            raise StripeError(400, "A subscription must have at least one active plan. To cancel a subscription, "
                              "please use the cancel endpoint.", param="items")  # fmt: skip
        self._check_mix([item["price"] for item in items], "items")
        if items != sub["items"]["data"]:
            previous["items"] = sub["items"]
            single = items[0] if len(items) == 1 else None
            for name, value in (("plan", single["plan"] if single else None),
                                ("quantity", single["quantity"] if single else None)):  # fmt: skip
                if sub[name] != value:
                    previous[name] = sub[name]
                    sub[name] = value
            sub["items"] = {**sub["items"], "data": items, "total_count": len(items)}
        return changes

    def _proration(self, sub: dict[str, Any], old: dict[str, Any] | None, new: dict[str, Any] | None,
                   period: tuple[int, int], at: int, now: int,
                   request: _RequestInfo) -> list[dict[str, Any]]:  # fmt: skip
        """The pending items prorating one item's change from ``at`` to the period's end: a credit for the unused
        time of what was, a charge for the remaining time of what is."""
        made = []
        for item, sign, words in ((old, -1, "Unused time on"), (new, 1, "Remaining time on")):
            if item is None:
                continue
            amount = sign * _prorated(item["price"]["unit_amount"] * item["quantity"], period, at)
            if amount == 0:
                continue
            made.append(self._pending_item(sub, item, amount, f"{words} {item['quantity']} {_TIMES} "
                                           f"{item['price']['nickname']} after {_day(at)}", (at, period[1]), now,
                                           request))  # fmt: skip
        return made

    def _pending_item(self, sub: dict[str, Any], item: dict[str, Any], amount: int, description: str,
                      period: tuple[int, int], now: int, request: _RequestInfo) -> dict[str, Any]:  # fmt: skip
        """A proration waiting for the subscription's next invoice; emits ``invoiceitem.created``."""
        made = billing.invoice_item_dict(self._billing.ids.long("ii_1"), sub["customer"], created=now, amount=amount,
                                         currency=sub["currency"], quantity=item["quantity"],
                                         unit_amount_decimal=item["price"]["unit_amount_decimal"],
                                         livemode=self.livemode, description=description, period=period,
                                         price=item["price"], subscription=sub["id"])  # fmt: skip
        made["proration"] = True
        made["parent"]["subscription_details"]["subscription_item"] = item["id"]
        blob = _dump(made)
        self.invoiceitems.insert(now, made["id"], blob, self._item_meta(made))
        self._emit(now, "invoiceitem.created", blob, request)
        return made

    def _waiting_items(self, sid: str, customer: str) -> list[dict[str, Any]]:
        """The subscription's pending items (prorations included), oldest first."""
        coll = self.invoiceitems
        found = []
        for k in coll.group(0).get(customer, []):
            _, invoice, deleted, subscription = coll.meta[k]
            if invoice is None and not deleted and subscription == sid:
                found.append(orjson.loads(coll.blob(k)))
        return found

    def _invoice_now(self, sub: dict[str, Any], reason: str, now: int, request: _RequestInfo,
                     previous: dict[str, Any] | None) -> None:  # fmt: skip
        """Bill the subscription's pending items at once (finalized, and collected where it is charged
        automatically); ``latest_invoice`` becomes that invoice. A failed payment leaves the subscription
        ``past_due``."""
        customer = orjson.loads(self.customers.blob(self.customers.pos[sub["customer"]]))
        iid = self._billing.ids.long("in_1")
        lines = self._attach_items(iid, self._waiting_items(sub["id"], sub["customer"]))
        inv = billing.invoice_dict(iid, customer, created=now, currency=sub["currency"], lines=lines,
                                   livemode=self.livemode, account_name=self._billing.account_name,
                                   collection_method=sub["collection_method"], billing_reason=reason,
                                   subscription=sub["id"], days_until_due=sub["days_until_due"])  # fmt: skip
        card = sub["default_payment_method"] or (customer.get("invoice_settings") or {}).get("default_payment_method")
        self._bill(inv, card, now, request)
        if previous is not None:
            previous.setdefault("latest_invoice", sub["latest_invoice"])
            if inv["status"] == "open" and sub["collection_method"] == "charge_automatically":
                previous.setdefault("status", sub["status"])
                sub["status"] = "past_due"
        sub["latest_invoice"] = iid

    # --- cancel -------------------------------------------------------------------------------------------------

    def cancel_subscription(self, sid: str, params: Mapping[str, Any], *, now: int,
                            request: _RequestInfo | None = None) -> bytes:  # fmt: skip
        """``DELETE /v1/subscriptions/<id>``: cancel now; emits ``customer.subscription.deleted`` (after what
        ``prorate`` and ``invoice_now`` made). Like Stripe, an ended subscription answers 404 ``No such
        subscription``."""
        from nextcrm_sandbox.stripe.account import _RequestInfo

        req = request or _RequestInfo()
        _check_params(params, _CANCEL)
        expand = self._expansions("subscriptions", params, "")
        i = self.subscriptions.pos.get(sid)
        if i is None or self.subscriptions.meta[i][0] in _ENDED_STATUSES:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        prorate = _as_bool(params["prorate"], "prorate") if params.get("prorate", "") != "" else False
        invoice_now = _as_bool(params["invoice_now"], "invoice_now") if params.get("invoice_now", "") != "" else False
        details = self._cancellation_details(params.get("cancellation_details"), sub["cancellation_details"])
        if prorate and sub["status"] in ("active", "past_due", "unpaid"):
            items = sub["items"]["data"]
            period = (items[0]["current_period_start"], items[0]["current_period_end"])
            for item in items:
                amount = -_prorated(item["price"]["unit_amount"] * item["quantity"], period, now)
                if amount:
                    self._pending_item(sub, item, amount, f"Unused time on {item['quantity']} {_TIMES} "
                                       f"{item['price']['nickname']} after {_day(now)}", (now, period[1]), now,
                                       req)  # fmt: skip
        if invoice_now and self._waiting_items(sid, sub["customer"]):
            self._invoice_now(sub, "subscription_update", now, req, None)
        elif not invoice_now and not prorate:
            self._drop_prorations(sid, sub["customer"], now, req)
        sub.update(status="canceled", canceled_at=now, ended_at=now, cancel_at_period_end=False,
                   cancellation_details={**details, "reason": "cancellation_requested"})  # fmt: skip
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.deleted", blob, req)
        return self._expand("subscriptions", blob, expand) if expand else blob

    def _drop_prorations(self, sid: str, customer: str, now: int, request: _RequestInfo) -> None:
        """A subscription canceled without ``prorate`` or ``invoice_now`` leaves no pending proration behind."""
        for item in self._waiting_items(sid, customer):
            if item["proration"]:
                k = self.invoiceitems.pos[item["id"]]
                blob = self.invoiceitems.blob(k)
                self.invoiceitems.replace(k, blob, self._item_meta(item, deleted=True))
                self._emit(now, "invoiceitem.deleted", blob, request)

    @staticmethod
    def _cancellation_details(raw: Any, current: Mapping[str, Any]) -> dict[str, Any]:
        """``cancellation_details`` (``comment``, ``feedback``) over the current ones."""
        details = {"comment": current.get("comment"), "feedback": current.get("feedback")}
        if "reason" in current:
            details["reason"] = current["reason"]
        if raw in (None, ""):
            return details
        if not isinstance(raw, dict) or set(raw) - {"comment", "feedback"}:
            raise StripeError(400, "Invalid cancellation_details: only comment and feedback can be given.",
                              param="cancellation_details")  # fmt: skip
        if "comment" in raw:
            details["comment"] = _as_str(raw["comment"], "cancellation_details[comment]") or None
        if "feedback" in raw:
            feedback = _as_str(raw["feedback"], "cancellation_details[feedback]") or None
            if feedback is not None and feedback not in _FEEDBACK:
                raise StripeError(400, "Invalid feedback: must be one of " + ", ".join(sorted(_FEEDBACK)),
                                  param="cancellation_details[feedback]")  # fmt: skip
            details["feedback"] = feedback
        return details
