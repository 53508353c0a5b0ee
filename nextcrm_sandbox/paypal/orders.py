"""Checkout orders in the sandbox (Orders v2) and the ``PayPal-Request-Id`` replays of PayPal's writes.

``POST /v2/checkout/orders`` checks the order as PayPal does (``intent``, one to ten ``purchase_units`` with an
``amount`` in a currency PayPal takes, with its decimals: none for HUF, JPY and TWD, two for the others; an
``amount.breakdown`` that adds up; items that add up to its ``item_total``; unique ``reference_id`` values) and
answers 201 with the order ``CREATED`` (minimal, or whole with ``Prefer: return=representation``) and its
``approve`` link. The payer approves it on that link (``GET /paypal/checkoutnow?token=<id>``) or through the
control API, which makes it ``APPROVED`` and announces ``CHECKOUT.ORDER.APPROVED``. ``POST …/{id}/capture``
captures an approved order: a Checkout capture (Transaction Search code T0006) per purchase unit, announced as
``PAYMENT.CAPTURE.COMPLETED``, the order ``COMPLETED``; an order not approved yet answers 422
``ORDER_NOT_APPROVED``, one captured already ``ORDER_ALREADY_CAPTURED``.

A write repeated with the ``PayPal-Request-Id`` of an earlier one (order and plan creation, captures; refunds
keep theirs in the account) within the key's retention (``request_id_ttl_seconds``, six hours by default as
PayPal states) answers the first result again with 200, whatever the body; after it, the write is done anew.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from nextcrm_sandbox.paypal.data import _Payer, _Rng, _Txn
from nextcrm_sandbox.paypal.errors import PayPalError
from nextcrm_sandbox.paypal.model import _fee, _money, stamp

if TYPE_CHECKING:
    from nextcrm_sandbox.paypal.account import PayPalAccount

# The currencies PayPal takes for payments, and those without decimals (a decimal amount is an error).
CURRENCIES = frozenset({"AUD", "BRL", "CAD", "CNY", "CZK", "DKK", "EUR", "HKD", "HUF", "INR", "ILS", "JPY",
                        "MYR", "MXN", "TWD", "NZD", "NOK", "PHP", "PLN", "GBP", "SGD", "SEK", "CHF", "THB",
                        "USD"})  # fmt: skip
ZERO_DECIMAL = frozenset({"HUF", "JPY", "TWD"})
MAX_VALUE = Decimal("999999999999999.99")
INTENTS = ("CAPTURE", "AUTHORIZE")
_VALUE = re.compile(r"^((-?[0-9]+)|(-?([0-9]+)?[.][0-9]+))$")
_QUANTITY = re.compile(r"^[1-9][0-9]{0,9}$")
_DOCS = "https://developer.paypal.com/docs/api/orders/v2/"
_MESSAGES = {
    400: ("INVALID_REQUEST", "Request is not well-formed, syntactically incorrect, or violates schema."),
    404: ("RESOURCE_NOT_FOUND", "The specified resource does not exist."),
    422: ("UNPROCESSABLE_ENTITY", "The requested action could not be performed, semantically incorrect, or failed "
                                  "business validation."),
}  # fmt: skip
_DESCRIPTIONS = {
    "MISSING_REQUIRED_PARAMETER": "A required field / parameter is missing.",
    "INVALID_PARAMETER_VALUE": "The value of a field is invalid.",
    "INVALID_PARAMETER_SYNTAX": "The value of a field does not conform to the expected format.",
    "INVALID_STRING_MAX_LENGTH": "The value of a field is too long.",
    "INVALID_ARRAY_MAX_ITEMS": "The number of items in an array parameter is too large.",
    "INVALID_CURRENCY_CODE": "Currency code is invalid or is not currently supported. Please refer "
    "https://developer.paypal.com/api/rest/reference/currency-codes/ for list of supported currency codes.",
    "DECIMAL_PRECISION": "If the currency supports decimals, only two decimal place precision is supported.",
    "CANNOT_BE_ZERO_OR_NEGATIVE": "Must be greater than zero. If the currency supports decimals, only two decimal "
    "place precision is supported.",
    "MAX_VALUE_EXCEEDED": "Should be less than or equal to 999999999999999.99.",
    "AMOUNT_MISMATCH": "Should equal item_total + tax_total + shipping + handling + insurance - shipping_discount - "
    "discount.",
    "ITEM_TOTAL_MISMATCH": "Should equal sum of (unit_amount * quantity) across all items for a given purchase_unit.",
    "ITEM_TOTAL_REQUIRED": "If item details are specified (items.unit_amount and items.quantity) corresponding "
    "amount.breakdown.item_total is required.",
    "DUPLICATE_REFERENCE_ID": "`reference_id` must be unique if multiple `purchase_unit` are provided.",
    "CURRENCY_MISMATCH": "Currency code should be same for all amounts in the purchase unit.",
    "ORDER_NOT_APPROVED": "Payer has not yet approved the Order for payment. Please redirect the payer to the "
    "'rel':'approve' url returned as part of the HATEOAS links within the Create Order call or provide a valid "
    "`payment_source` in the request.",
    "ORDER_ALREADY_CAPTURED": "Order already captured.If 'intent=CAPTURE' only one capture per order is allowed.",
    "ACTION_DOES_NOT_MATCH_INTENT": "Order was created with an intent to 'AUTHORIZE'. Please use "
    "v2/checkout/orders/order_id/authorize to complete the transaction or alternately Create an order with an "
    "intent of 'CAPTURE'.",
    "INVALID_RESOURCE_ID": "Specified resource ID does not exist. Please check the resource ID and try again.",
}
_BREAKDOWN_ADDS = ("item_total", "tax_total", "shipping", "handling", "insurance")
_BREAKDOWN_SUBTRACTS = ("shipping_discount", "discount")


def order_error(status: int, issue: str, field: str | None = None, value: Any = None,
                location: str = "body") -> PayPalError:  # fmt: skip
    """An Orders v2 error: PayPal's name and message for the status, one detail naming the field and issue."""
    name, message = _MESSAGES[status]
    detail: dict[str, Any] = {}
    if field is not None:
        detail["field"] = field
    if value is not None:
        detail["value"] = str(value)
    detail.update({"location": location, "issue": issue, "description": _DESCRIPTIONS.get(issue, issue)})
    return PayPalError(status, name, message, [detail], link=f"{_DOCS}#error-{issue}")


def money_minor(money: Any, field: str, *, positive: bool = True) -> tuple[int, str]:
    """A request's money object as (minor units, currency), checked as PayPal checks it: a currency it takes,
    a value matching its pattern with the currency's decimals, above zero and below its maximum."""
    if not isinstance(money, dict):
        raise order_error(400, "MISSING_REQUIRED_PARAMETER" if money is None else "INVALID_PARAMETER_SYNTAX", field)
    currency, value = money.get("currency_code"), money.get("value")
    if currency is None:
        raise order_error(400, "MISSING_REQUIRED_PARAMETER", f"{field}/currency_code")
    if value is None:
        raise order_error(400, "MISSING_REQUIRED_PARAMETER", f"{field}/value")
    if not isinstance(currency, str) or currency not in CURRENCIES:
        raise order_error(422, "INVALID_CURRENCY_CODE", f"{field}/currency_code", currency)
    if not isinstance(value, str) or len(value) > 32 or not _VALUE.match(value):
        raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{field}/value", value)
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{field}/value", value) from None
    decimals = 0 if currency in ZERO_DECIMAL else 2
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > decimals:
        raise order_error(422, "DECIMAL_PRECISION", f"{field}/value", value)
    if positive and amount <= 0:
        raise order_error(422, "CANNOT_BE_ZERO_OR_NEGATIVE", f"{field}/value", value)
    if amount > MAX_VALUE:
        raise order_error(422, "MAX_VALUE_EXCEEDED", f"{field}/value", value)
    return int(amount.scaleb(decimals)), currency


def _text(unit: Mapping[str, Any], name: str, limit: int, field: str) -> str | None:
    value = unit.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{field}/{name}")
    if len(value) > limit:
        raise order_error(400, "INVALID_STRING_MAX_LENGTH", f"{field}/{name}")
    return value


class Replays:
    """First answers of writes by ``PayPal-Request-Id``: (operation, key) -> (when, target, status, body)."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, str], tuple[int, str, dict[str, Any]]] = {}

    def get(self, operation: str, key: str | None, target: str, now: int, ttl: int) -> dict[str, Any] | None:
        """The first answer to ``key`` for the same operation and target while the key is kept, else None."""
        if not key:
            return None
        found = self.first.get((operation, key))
        if found is None or found[1] != target or now - found[0] > ttl:
            return None
        return found[2]

    def keep(self, operation: str, key: str | None, target: str, now: int, body: dict[str, Any]) -> None:
        if key:
            self.first[(operation, key)] = (now, target, body)


class Checkout:
    """One app's checkout orders (callers hold the account's lock)."""

    def __init__(self, account: PayPalAccount) -> None:
        self.account = account
        self.orders: dict[str, dict[str, Any]] = {}
        self.by_capture: dict[str, str] = {}  # capture (transaction) id -> order id
        self.replays = Replays()
        self._rng = _Rng(f"paypal-orders:{account.client_id}:{account.seed}")

    @property
    def ttl(self) -> int:
        return int(self.account.knobs.get("request_id_ttl_seconds", 21_600))

    # --- create -------------------------------------------------------------------------------------------

    def _unit(self, raw: Any, n: int, single: bool) -> dict[str, Any]:
        """One purchase unit of a create request, checked; as the order keeps it."""
        if not isinstance(raw, dict):
            raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"/purchase_units/{n}")
        reference = _text(raw, "reference_id", 256, f"/purchase_units/{n}")
        where = f"/purchase_units/@reference_id=='{reference or ('default' if single else n)}'"
        amount = raw.get("amount")
        minor, currency = money_minor(amount, f"{where}/amount")
        unit: dict[str, Any] = {"reference_id": reference or ("default" if single else str(n))}
        breakdown = amount.get("breakdown")
        parts: dict[str, int] = {}
        if breakdown is not None:
            if not isinstance(breakdown, dict):
                raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{where}/amount/breakdown")
            for name in (*_BREAKDOWN_ADDS, *_BREAKDOWN_SUBTRACTS):
                if name in breakdown:
                    value, part_currency = money_minor(breakdown[name], f"{where}/amount/breakdown/{name}",
                                                       positive=False)  # fmt: skip
                    if part_currency != currency:
                        raise order_error(422, "CURRENCY_MISMATCH", f"{where}/amount/breakdown/{name}/currency_code")
                    parts[name] = value
            total = sum(parts.get(n, 0) for n in _BREAKDOWN_ADDS) - sum(parts.get(n, 0) for n in _BREAKDOWN_SUBTRACTS)
            if total != minor:
                raise order_error(422, "AMOUNT_MISMATCH", f"{where}/amount/value", amount.get("value"))
        unit["amount"] = {"currency_code": currency, "value": amount["value"]}
        if breakdown is not None:
            unit["amount"]["breakdown"] = breakdown
        unit["payee"] = {"email_address": f"merchant-{self.account.id.lower()}@example.com",
                         "merchant_id": self.account.id}  # fmt: skip
        for name, limit in (("description", 127), ("custom_id", 127), ("invoice_id", 127), ("soft_descriptor", 22)):
            value = _text(raw, name, limit, where)
            if value is not None:
                unit[name] = value
        items = raw.get("items")
        if items is not None:
            unit["items"] = self._items(items, where, currency, parts)
        return unit

    @staticmethod
    def _items(items: Any, where: str, currency: str, parts: Mapping[str, int]) -> list[dict[str, Any]]:
        if not isinstance(items, list):
            raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{where}/items")
        kept, total = [], 0
        for i, item in enumerate(items):
            at = f"{where}/items/{i}"
            if not isinstance(item, dict):
                raise order_error(400, "INVALID_PARAMETER_SYNTAX", at)
            if not item.get("name"):
                raise order_error(400, "MISSING_REQUIRED_PARAMETER", f"{at}/name")
            _text(item, "name", 127, at)
            quantity = item.get("quantity")
            if quantity is None:
                raise order_error(400, "MISSING_REQUIRED_PARAMETER", f"{at}/quantity")
            if not isinstance(quantity, str) or not _QUANTITY.match(quantity):
                raise order_error(400, "INVALID_PARAMETER_SYNTAX", f"{at}/quantity", quantity)
            price, item_currency = money_minor(item.get("unit_amount"), f"{at}/unit_amount", positive=False)
            if item_currency != currency:
                raise order_error(422, "CURRENCY_MISMATCH", f"{at}/unit_amount/currency_code")
            total += price * int(quantity)
            kept.append(dict(item))
        if "item_total" not in parts:
            raise order_error(422, "ITEM_TOTAL_REQUIRED", f"{where}/amount/breakdown/item_total")
        if parts["item_total"] != total:
            raise order_error(422, "ITEM_TOTAL_MISMATCH", f"{where}/amount/breakdown/item_total")
        return kept

    def create(self, body: Mapping[str, Any], request_id: str | None, full: bool, now: int,
               base_url: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """``POST /v2/checkout/orders``: 201 with the new order, or 200 with the first one for a repeated key."""
        first = self.replays.get("orders.create", request_id, "", now, self.ttl)
        if first is not None:
            return 200, first
        intent = body.get("intent")
        if intent is None:
            raise order_error(400, "MISSING_REQUIRED_PARAMETER", "/intent")
        if intent not in INTENTS:
            raise order_error(400, "INVALID_PARAMETER_VALUE", "/intent", intent)
        units = body.get("purchase_units")
        if units is None or units == []:
            raise order_error(400, "MISSING_REQUIRED_PARAMETER", "/purchase_units")
        if not isinstance(units, list):
            raise order_error(400, "INVALID_PARAMETER_SYNTAX", "/purchase_units")
        if len(units) > 10:
            raise order_error(400, "INVALID_ARRAY_MAX_ITEMS", "/purchase_units")
        kept = [self._unit(raw, n, len(units) == 1) for n, raw in enumerate(units)]
        references = [u["reference_id"] for u in kept]
        if len(set(references)) != len(references):
            raise order_error(422, "DUPLICATE_REFERENCE_ID", "/purchase_units")
        order_id = self._rng.txn_id()
        while order_id in self.orders:
            order_id = self._rng.txn_id()
        order: dict[str, Any] = {"id": order_id, "intent": intent, "status": "CREATED", "purchase_units": kept,
                                 "create_time": stamp(now)}  # fmt: skip
        context = body.get("application_context")
        if isinstance(context, dict):
            order["_context"] = {k: context[k] for k in ("return_url", "cancel_url", "brand_name") if k in context}
        self.orders[order_id] = order
        answer = self.view(order, base_url, full)
        self.replays.keep("orders.create", request_id, "", now, answer)
        return 201, answer

    # --- read ---------------------------------------------------------------------------------------------

    def get(self, order_id: str) -> dict[str, Any]:
        order = self.orders.get(order_id)
        if order is None:
            raise order_error(404, "INVALID_RESOURCE_ID", None, None, "path")
        return order

    def _links(self, order: Mapping[str, Any], base_url: str) -> list[dict[str, str]]:
        href = f"{base_url}/v2/checkout/orders/{order['id']}"
        links = [{"href": href, "rel": "self", "method": "GET"}]
        if order["status"] == "CREATED":
            site = base_url.rsplit("/api", 1)[0]
            links.append({"href": f"{site}/checkoutnow?token={order['id']}", "rel": "approve", "method": "GET"})
        if order["status"] in ("CREATED", "APPROVED"):
            links.append({"href": href, "rel": "update", "method": "PATCH"})
            action = "capture" if order["intent"] == "CAPTURE" else "authorize"
            links.append({"href": f"{href}/{action}", "rel": action, "method": "POST"})
        return links

    def view(self, order: Mapping[str, Any], base_url: str, full: bool = True) -> dict[str, Any]:
        """The order as PayPal answers it: whole (``return=representation``, and ``GET``) or minimal."""
        captures = order.get("_captures") or []
        if not full:
            out: dict[str, Any] = {"id": order["id"], "status": order["status"]}
            if "payment_source" in order:
                out["payment_source"] = order["payment_source"]
            if captures:
                out["purchase_units"] = [
                    {"reference_id": unit["reference_id"],
                     "payments": {"captures": [self._capture(txn, base_url) for txn in ids]}}
                    for unit, ids in zip(order["purchase_units"], captures, strict=True)
                ]  # fmt: skip
            if "payer" in order:
                out["payer"] = order["payer"]
            out["links"] = self._links(order, base_url)
            return out
        out = {"id": order["id"]}
        if "payment_source" in order:
            out["payment_source"] = order["payment_source"]
        out["intent"] = order["intent"]
        out["status"] = order["status"]
        units = []
        for n, unit in enumerate(order["purchase_units"]):
            shown = dict(unit)
            if captures:
                shown["payments"] = {"captures": [self._capture(txn, base_url) for txn in captures[n]]}
            units.append(shown)
        out["purchase_units"] = units
        if "payer" in order:
            out["payer"] = order["payer"]
        out["create_time"] = order["create_time"]
        if "update_time" in order:
            out["update_time"] = order["update_time"]
        out["links"] = self._links(order, base_url)
        return out

    def _capture(self, txn: str, base_url: str) -> dict[str, Any]:
        """A capture as an order shows it: as Payments v2 does, less the order it is in and its payee."""
        shown = self.account.capture_resource(self.account.by_txn[txn], base_url)
        return {k: v for k, v in shown.items() if k not in ("supplementary_data", "payee")}

    # --- approve and capture ------------------------------------------------------------------------------

    def approve(self, order_id: str, payer_id: str | None, now: int, base_url: str) -> dict[str, Any]:
        """The payer approves the order (on its approve link): APPROVED, with the payer and its PayPal wallet."""
        order = self.get(order_id)
        if order["status"] == "APPROVED":
            return self.view(order, base_url)
        if order["status"] != "CREATED":
            raise order_error(422, "ORDER_ALREADY_CAPTURED", None, None, "path")
        payers = {p.account_id: p for p in self.account.payers}
        if payer_id is not None and payer_id not in payers:
            raise ValueError(f"no payer {payer_id} in the account")
        payer: _Payer = payers[payer_id] if payer_id else self._rng.pick(self.account.payers)
        country = payer.place[0]
        order["_payer"] = payer.account_id
        order["payment_source"] = {"paypal": {"email_address": payer.email, "account_id": payer.account_id,
                                              "account_status": "VERIFIED", "name": dict(payer.name),
                                              "address": {"country_code": country}}}  # fmt: skip
        order["payer"] = {"name": dict(payer.name), "email_address": payer.email, "payer_id": payer.account_id,
                          "address": {"country_code": country}}  # fmt: skip
        order["status"] = "APPROVED"
        order["update_time"] = stamp(now)
        if self.account.on_event is not None:
            self.account.on_event("CHECKOUT.ORDER.APPROVED", "checkout-order", lambda base: self.view(order, base))
        return self.view(order, base_url)

    def capture(self, order_id: str, request_id: str | None, full: bool, now: int,
                base_url: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """``POST /v2/checkout/orders/{id}/capture``: a completed Checkout capture per purchase unit."""
        first = self.replays.get("orders.capture", request_id, order_id, now, self.ttl)
        if first is not None:
            return 200, first
        order = self.get(order_id)
        if order["intent"] != "CAPTURE":
            raise order_error(422, "ACTION_DOES_NOT_MATCH_INTENT", None, None, "path")
        if order["status"] == "COMPLETED":
            raise order_error(422, "ORDER_ALREADY_CAPTURED", None, None, "path")
        if order["status"] != "APPROVED":
            raise order_error(422, "ORDER_NOT_APPROVED", None, None, "path")
        payer = next(p for p in self.account.payers if p.account_id == order["_payer"])
        captures = []
        for unit in order["purchase_units"]:
            minor, currency = money_minor(unit["amount"], "/amount")
            row = self._capture_row(payer, currency, minor, unit, now)
            self.by_capture[row.txn_id] = order_id
            captures.append([row.txn_id])
        order["_captures"] = captures
        order["status"] = "COMPLETED"
        order["update_time"] = stamp(now)
        for ids in captures:
            for txn in ids:
                self.account._announce_payment(self.account.by_txn[txn])
        answer = self.view(order, base_url, full)
        self.replays.keep("orders.capture", request_id, order_id, now, answer)
        return 201, answer

    def _capture_row(self, payer: _Payer, currency: str, minor: int, unit: Mapping[str, Any], now: int) -> _Txn:
        """The T0006 Transaction Search row of a capture: completed, with PayPal's fee, the unit's invoice and
        custom ids (none when it gave none) and its description as the item's name; stored."""
        account = self.account
        row = account._sale(self._rng, now, code="T0006", payer=payer, currency=currency, amount=minor)
        when, info = row.infos[-1]
        fee = _fee(minor, currency)
        rebuilt: dict[str, Any] = {}
        for key, value in info.items():
            if key == "transaction_status":
                rebuilt["fee_amount"] = _money(fee, currency)
                rebuilt[key] = "S"
            elif key == "invoice_id":
                if unit.get("invoice_id"):
                    rebuilt[key] = unit["invoice_id"]
            elif key == "custom_field":
                continue
            elif key != "fee_amount":
                rebuilt[key] = value
            if key == "invoice_id" and unit.get("custom_id"):
                rebuilt["custom_field"] = unit["custom_id"]
        row.infos[-1] = (when, rebuilt)
        row.fee = fee
        item = dict(row.sections["cart_info"]["item_details"][0])
        if unit.get("description"):
            item["item_name"] = item["item_description"] = unit["description"]
        if unit.get("invoice_id"):
            item["invoice_number"] = unit["invoice_id"]
        else:
            item.pop("invoice_number", None)
        row.sections = {**row.sections, "cart_info": {"item_details": [item]}}
        account._insert([row])
        return row

    def order_of(self, capture_id: str) -> str | None:
        """The order a capture made here belongs to."""
        return self.by_capture.get(capture_id)

    def export(self, base_url: str) -> dict[str, Any]:
        """Every order in full."""
        return {"records": [self.view(o, base_url) for o in self.orders.values()], "deleted_ids": []}
