"""Stripe invoice items for the sandbox: ``POST /v1/invoiceitems``, ``GET /v1/invoiceitems`` and
``GET``/``DELETE /v1/invoiceitems/<id>``.

An item is pending (``invoice`` null) until an invoice takes it: ``POST /v1/invoices`` with
``pending_invoice_items_behavior=include`` takes every pending item of its customer in its currency (since API
version 2022-08-01 the default is ``exclude``), and ``invoice=<draft>`` adds an item to that draft at once. Its
amount is ``amount``, or ``unit_amount_decimal`` times ``quantity``, or a price's unit amount times
``quantity`` (``pricing[price]``, ``price`` before API version 2025-03-31 "basil", or an inline
``price_data``): exactly one of them. The line an item becomes names it (``parent.invoice_item_details``), and
the draft is totalled again. Creating and deleting emit ``invoiceitem.created`` and ``invoiceitem.deleted``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson

from nextcrm_sandbox.stripe import billing
from nextcrm_sandbox.stripe.model import StripeError, _missing
from nextcrm_sandbox.stripe.params import _as_bool, _as_int, _as_str, _check_params, _metadata_update
from nextcrm_sandbox.stripe.store import Row, _Collection, _dump

if TYPE_CHECKING:
    from nextcrm_sandbox.stripe.account import _RequestInfo

# The API version that replaced ``price`` and ``unit_amount`` with ``pricing`` on invoice items.
BASIL = "2025-03-31"
_CREATE = frozenset({"customer", "amount", "currency", "description", "discountable", "invoice", "metadata",
                     "period", "price_data", "pricing", "quantity", "subscription", "unit_amount_decimal",
                     "tax_behavior", "expand"})  # fmt: skip
_BEFORE_BASIL = frozenset({"price", "unit_amount"})
_PRICE_DATA = frozenset({"currency", "product", "unit_amount", "unit_amount_decimal", "tax_behavior"})
_DECIMAL = re.compile(r"-?\d+(\.\d{1,12})?")


def _before_basil(version: str | None) -> bool:
    return bool(version) and str(version)[:10] < BASIL


def _decimal(value: Any, param: str) -> Decimal:
    text = _as_str(value, param)
    if not _DECIMAL.fullmatch(text):
        raise StripeError(400, f"Invalid decimal: {text}", param=param)
    try:
        return Decimal(text)
    except InvalidOperation:
        raise StripeError(400, f"Invalid decimal: {text}", param=param) from None


def _decimal_text(value: Decimal) -> str:
    """A decimal as Stripe prints one: no exponent, no trailing zeros."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _currency(value: Any, param: str) -> str:
    currency = _as_str(value, param).lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise StripeError(400, f"Invalid currency: {currency}.", param=param)
    return currency


def _item_amount(params: Mapping[str, Any], price: Mapping[str, Any] | None) -> tuple[int, Decimal, int]:
    """(quantity, unit amount, amount) of an item: ``amount`` alone (quantity 1), or a unit amount times
    ``quantity``, rounded to the currency's smallest unit."""
    if "amount" in params:
        if "quantity" in params:
            raise StripeError(400, "You may only specify one of these parameters: amount, quantity.", param="quantity")
        amount = _as_int(params["amount"], "amount", minimum=-99_999_999, maximum=99_999_999)
        return 1, Decimal(amount), amount
    quantity = _as_int(params["quantity"], "quantity", minimum=0) if "quantity" in params else 1
    if price is not None:
        unit = Decimal(price["unit_amount_decimal"])
    elif "unit_amount" in params:
        unit = Decimal(_as_int(params["unit_amount"], "unit_amount", minimum=-99_999_999, maximum=99_999_999))
    else:
        unit = _decimal(params["unit_amount_decimal"], "unit_amount_decimal")
    return quantity, unit, int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _period(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """``period[start]`` and ``period[end]`` (inclusive); None: the item's creation time."""
    if "period" not in params:
        return None
    raw = params["period"]
    if not isinstance(raw, dict) or set(raw) != {"start", "end"}:
        raise StripeError(400, "Invalid period: must be a hash of start and end.", param="period")
    start, end = _as_int(raw["start"], "period[start]"), _as_int(raw["end"], "period[end]")
    if end < start:
        raise StripeError(400, "The period end must be greater than or equal to its start.", param="period[end]")
    return start, end


class InvoiceItems:
    """The invoice items of a ``StripeAccount`` (mixed into it: it uses the account's customers, invoices,
    subscriptions, prices, ids and events feed)."""

    invoiceitems: _Collection
    customers: _Collection
    invoices: _Collection
    subscriptions: _Collection
    livemode: bool
    _prices: list[dict[str, Any]]
    _inline_prices: dict[str, dict[str, Any]]
    _billing: billing.InvoiceSeeder
    _emit: Callable[..., str]
    _live_customer: Callable[..., int]
    _expansions: Callable[..., frozenset[str]]
    _expand: Callable[..., bytes]

    # --- seeded items: one per line of each generated one-off invoice -----------------------------------

    @staticmethod
    def _item_meta(item: Mapping[str, Any], deleted: bool = False) -> tuple[Any, ...]:
        subscription = ((item.get("parent") or {}).get("subscription_details") or {}).get("subscription")
        return (item["customer"], item["invoice"], deleted, subscription)

    @classmethod
    def _seeded_items(cls, rows_inv: list[Row], livemode: bool) -> list[Row]:
        """The invoice items behind the generated invoices' one-off lines (a deleted draft's went with it)."""
        rows: list[Row] = []
        for created, iid, blob, meta in rows_inv:
            inv = orjson.loads(blob)
            for line in inv["lines"]["data"]:
                details = (line.get("parent") or {}).get("invoice_item_details")
                if not details:
                    continue
                item = billing.invoice_item_dict(
                    details["invoice_item"], inv["customer"], created=created, amount=line["amount"],
                    currency=line["currency"], quantity=line["quantity"],
                    unit_amount_decimal=line["pricing"]["unit_amount_decimal"], livemode=livemode,
                    description=line["description"], period=(line["period"]["start"], line["period"]["end"]),
                    invoice=iid,
                )  # fmt: skip
                rows.append((created, item["id"], _dump(item), cls._item_meta(item, deleted=meta[4])))
        return rows

    # --- reads --------------------------------------------------------------------------------------------

    def _item_selection(self, params: Mapping[str, Any]) -> list[int]:
        """Positions matching ``GET /v1/invoiceitems`` filters: ``customer``, ``invoice``, ``pending``."""
        coll = self.invoiceitems
        sel = coll.view(("live",), lambda m: not m[2])
        if params.get("customer"):
            keep = set(coll.group(0).get(_as_str(params["customer"], "customer"), []))
            sel = [i for i in sel if i in keep]
        if params.get("invoice"):
            keep = set(coll.group(1).get(_as_str(params["invoice"], "invoice"), []))
            sel = [i for i in sel if i in keep]
        if params.get("pending", "") != "":
            pending = _as_bool(params["pending"], "pending")
            sel = [i for i in sel if (coll.meta[i][1] is None) is pending]
        return sel

    # --- create -------------------------------------------------------------------------------------------

    def _find_price(self, price_id: str, param: str) -> dict[str, Any]:
        for price in self._prices:
            if price["id"] == price_id:
                return price
        if price_id in self._inline_prices:
            return self._inline_prices[price_id]
        raise _missing("price", price_id, param=param, status=400)

    def _inline_price(self, data: Any, currency: str | None) -> dict[str, Any]:
        """A one-time price made from ``price_data`` (``currency``, ``product``, a unit amount)."""
        if not isinstance(data, dict):
            raise StripeError(400, "Invalid object: price_data must be a hash", param="price_data")
        _check_params({f"price_data[{k}]": v for k, v in data.items()},
                      frozenset(f"price_data[{k}]" for k in _PRICE_DATA))  # fmt: skip
        for name in ("currency", "product"):
            if not data.get(name):
                raise StripeError(400, f"Missing required param: price_data[{name}].", code="parameter_missing",
                                  param=f"price_data[{name}]")  # fmt: skip
        product = _as_str(data["product"], "price_data[product]")
        if product not in {price["product"] for price in self._prices}:
            raise _missing("product", product, param="price_data[product]", status=400)
        if ("unit_amount" in data) == ("unit_amount_decimal" in data):
            raise StripeError(400, "You must specify exactly one of price_data[unit_amount] or "
                              "price_data[unit_amount_decimal].", param="price_data[unit_amount]")  # fmt: skip
        if "unit_amount" in data:
            unit = Decimal(_as_int(data["unit_amount"], "price_data[unit_amount]", minimum=0))
        else:
            unit = _decimal(data["unit_amount_decimal"], "price_data[unit_amount_decimal]")
        price_currency = _currency(data["currency"], "price_data[currency]")
        if currency is not None and currency != price_currency:
            raise StripeError(400, f"The price_data[currency] ({price_currency}) must match the currency of the "
                              f"invoice item ({currency}).", param="price_data[currency]")  # fmt: skip
        whole = unit == unit.to_integral()
        price = {"id": self._billing.ids.long("price_1"), "object": "price", "currency": price_currency,
                 "product": product, "type": "one_time", "unit_amount": int(unit) if whole else None,
                 "unit_amount_decimal": _decimal_text(unit)}  # fmt: skip
        self._inline_prices[price["id"]] = price
        return price

    def _draft_for_item(self, invoice_id: str, customer: str) -> tuple[int, dict[str, Any]]:
        i = self.invoices.pos.get(invoice_id)
        if i is None or self.invoices.meta[i][4]:
            raise _missing("invoice", invoice_id, param="invoice", status=400)
        inv = orjson.loads(self.invoices.blob(i))
        if inv["status"] != "draft":
            raise StripeError(400, f"You can only add invoice items to draft invoices; invoice {invoice_id} is "
                              f"{inv['status']}.", code="invoice_not_editable", param="invoice")  # fmt: skip
        if inv["customer"] != customer:
            raise StripeError(400, f"The invoice {invoice_id} belongs to customer {inv['customer']}, not to "
                              f"{customer}.", param="invoice")  # fmt: skip
        return i, inv

    def create_invoice_item(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo) -> bytes:
        """``POST /v1/invoiceitems``: a pending item of ``customer``, or one added to the draft ``invoice``;
        emits ``invoiceitem.created`` (and ``invoice.updated`` for the draft it joins)."""
        old = _before_basil(request.api_version)
        _check_params(params, (_CREATE | _BEFORE_BASIL) - {"pricing"} if old else _CREATE)
        expand = self._expansions("invoiceitems", params, "")
        if not params.get("customer"):
            raise StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        cid = _as_str(params["customer"], "customer")
        customer = orjson.loads(self.customers.blob(self._live_customer(cid, "customer", 400)))
        invoice = self._draft_for_item(_as_str(params["invoice"], "invoice"), cid) if params.get("invoice") else None
        price, currency = self._item_price(params, old)
        currency = currency or (invoice[1]["currency"] if invoice else None) or customer.get("currency") or "usd"
        if invoice is not None and currency != invoice[1]["currency"]:
            target = invoice[1]
            raise StripeError(400, f"The currency of the invoice item ({currency}) must match the currency of "
                              f"invoice {target['id']} ({target['currency']}).", param="currency")  # fmt: skip
        quantity, unit, amount = _item_amount(params, price)
        discountable = _as_bool(params["discountable"], "discountable") if "discountable" in params else amount >= 0
        metadata = _metadata_update({}, params["metadata"]) if "metadata" in params else {}
        item = billing.invoice_item_dict(
            self._billing.ids.long("ii_1"), cid, created=now, amount=amount, currency=currency, quantity=quantity,
            unit_amount_decimal=_decimal_text(unit), livemode=self.livemode,
            description=_as_str(params["description"], "description") or None if params.get("description") else None,
            period=_period(params), price=price, subscription=self._item_subscription(params, cid),
            discountable=discountable, metadata=metadata,
        )  # fmt: skip
        self.invoiceitems.insert(now, item["id"], _dump(item), self._item_meta(item))
        lines = self._attach_items(invoice[1]["id"], [item]) if invoice is not None else []
        blob = self.invoiceitems.blob(self.invoiceitems.pos[item["id"]])
        self._emit(now, "invoiceitem.created", blob, request)
        if invoice is not None:
            i, inv = invoice
            self._store_draft(i, inv, billing.add_lines(inv, lines), now, request)
        return self._expand("invoiceitems", blob, expand) if expand else blob

    def _item_price(self, params: Mapping[str, Any], old: bool) -> tuple[dict[str, Any] | None, str | None]:
        """The price an item is billed at (none for an amount), and its currency as far as the params fix it.

        Exactly one of ``amount``, ``unit_amount_decimal``, a price (``pricing[price]``; ``price`` and
        ``unit_amount`` before basil) or ``price_data`` says what the item costs."""
        price_param = "price" if old else "pricing[price]"
        if not old and "pricing" in params:
            pricing = params["pricing"]
            if not isinstance(pricing, dict) or set(pricing) - {"price"}:
                raise StripeError(400, "Invalid pricing: only pricing[price] can be given.", param="pricing")
        price_id = params.get("price") if old else (params.get("pricing") or {}).get("price")
        given = {"amount": "amount" in params, "unit_amount": "unit_amount" in params,
                 "unit_amount_decimal": "unit_amount_decimal" in params, price_param: bool(price_id),
                 "price_data": "price_data" in params}  # fmt: skip
        sources = [name for name, present in given.items() if present]
        if len(sources) > 1:
            raise StripeError(400, f"You may only specify one of these parameters: {', '.join(sources)}.",
                              param=sources[1])  # fmt: skip
        if not sources:
            raise StripeError(400, f"You must specify either amount, {price_param}, price_data or "
                              "unit_amount_decimal.", code="parameter_missing", param="amount")  # fmt: skip
        currency = _currency(params["currency"], "currency") if params.get("currency") else None
        if price_id:
            price = self._find_price(_as_str(price_id, price_param), price_param)
        elif "price_data" in params:
            price = self._inline_price(params["price_data"], currency)
        else:
            return None, currency
        if currency is not None and currency != price["currency"]:
            raise StripeError(400, f"The price {price['id']} is in {price['currency']}, not {currency}.",
                              param="currency")  # fmt: skip
        return price, price["currency"]

    def _item_subscription(self, params: Mapping[str, Any], customer: str) -> str | None:
        """The subscription whose next invoice the item waits for: one of the customer's."""
        if not params.get("subscription"):
            return None
        subscription = _as_str(params["subscription"], "subscription")
        k = self.subscriptions.pos.get(subscription)
        if k is None or self.subscriptions.meta[k][3] != customer:
            raise _missing("subscription", subscription, param="subscription", status=400)
        return subscription

    def _attach_items(self, invoice_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Put the items on ``invoice_id`` (stored so); returns their lines."""
        lines = []
        for item in items:
            item["invoice"] = invoice_id
            k = self.invoiceitems.pos[item["id"]]
            self.invoiceitems.replace(k, _dump(item), self._item_meta(item))
            lines.append(billing.item_line(self._billing.ids, item, invoice_id))
        return lines

    def _pending_items(self, customer: str, currency: str) -> list[dict[str, Any]]:
        """The customer's pending items in ``currency`` an invoice of its own would take (not those waiting for a
        subscription's invoice), oldest first."""
        coll = self.invoiceitems
        found = []
        for k in coll.group(0).get(customer, []):
            _, invoice, deleted, subscription = coll.meta[k]
            if invoice is None and not deleted and subscription is None:
                item = orjson.loads(coll.blob(k))
                if item["currency"] == currency:
                    found.append(item)
        return found

    def _store_draft(self, i: int, inv: dict[str, Any], previous: dict[str, Any], now: int,
                     request: _RequestInfo) -> None:  # fmt: skip
        """Store a draft whose lines changed; ``invoice.updated`` when its totals did."""
        blob = _dump(inv)
        self.invoices.replace(i, blob, self.invoices.meta[i])
        if previous:
            self._emit(now, "invoice.updated", blob, request, previous)

    # --- delete -------------------------------------------------------------------------------------------

    def delete_invoice_item(self, item_id: str, *, now: int, request: _RequestInfo) -> bytes:
        """``DELETE /v1/invoiceitems/<id>``: a pending item, or one on a draft (which is totalled again); emits
        ``invoiceitem.deleted``."""
        k = self.invoiceitems.pos.get(item_id)
        if k is None or self.invoiceitems.meta[k][2]:
            raise _missing("invoiceitem", item_id)
        item = orjson.loads(self.invoiceitems.blob(k))
        if item["invoice"] is not None:
            i = self.invoices.pos[item["invoice"]]
            inv = orjson.loads(self.invoices.blob(i))
            if inv["status"] != "draft":
                raise StripeError(400, f"You can only delete invoice items that are pending or on a draft invoice; "
                                  f"invoice {inv['id']} is {inv['status']}.", code="invoice_not_editable")  # fmt: skip
            self._store_draft(i, inv, billing.remove_line(inv, item_id), now, request)
        blob = self.invoiceitems.blob(k)
        self.invoiceitems.replace(k, blob, self._item_meta(item, deleted=True))
        self._emit(now, "invoiceitem.deleted", blob, request)
        return orjson.dumps({"id": item_id, "object": "invoiceitem", "deleted": True})

    def _drop_items_of(self, invoice_id: str) -> None:
        """A deleted draft's items go with it."""
        coll = self.invoiceitems
        for k in list(coll.group(1).get(invoice_id, [])):
            customer, invoice, _, subscription = coll.meta[k]
            coll.replace(k, coll.blobs[k], (customer, invoice, True, subscription))
