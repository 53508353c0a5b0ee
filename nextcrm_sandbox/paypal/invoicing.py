"""Invoicing v2 in the sandbox: one app's invoices, generated from its seed (those paid through PayPal are its
Checkout captures, under the invoice numbers Transaction Search shows), the search, list and read answers
(search and list items are summaries: no ``last_update_time``, collections only when ``fields`` asks), sending,
cancelling, recording external payments, deleting drafts, PayPal payments and refunds of invoices, and the
``INVOICING.INVOICE.*`` events each change announces."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from nextcrm_sandbox.paypal.data import _ITEMS, _Payer, _Rng, _Txn
from nextcrm_sandbox.paypal.errors import PayPalError
from nextcrm_sandbox.paypal.model import _DAY, _PAYER_ALPHABET, _money, _price, parse_time, stamp
from nextcrm_sandbox.paypal.params import _minor

if TYPE_CHECKING:
    from nextcrm_sandbox.paypal.account import PayPalAccount

STATUSES = ("DRAFT", "SENT", "SCHEDULED", "PAID", "MARKED_AS_PAID", "CANCELLED", "REFUNDED", "PARTIALLY_PAID",
            "PARTIALLY_REFUNDED", "MARKED_AS_REFUNDED", "UNPAID", "PAYMENT_PENDING")  # fmt: skip
PAYABLE = frozenset({"SENT", "UNPAID", "PARTIALLY_PAID", "PAYMENT_PENDING"})
CANCELLABLE = frozenset({"SENT", "UNPAID", "PARTIALLY_PAID", "SCHEDULED"})
DELETABLE = frozenset({"DRAFT", "SCHEDULED"})
PAYMENT_METHODS = ("BANK_TRANSFER", "CASH", "CHECK", "CREDIT_CARD", "DEBIT_CARD", "PAYPAL", "WIRE_TRANSFER", "OTHER")
COLLECTIONS = frozenset({"items", "payments", "refunds", "additional_recipients_info", "attachments"})
_TERMS = (("NET_10", 10), ("NET_15", 15), ("NET_30", 30), ("NET_30", 30), ("DUE_ON_RECEIPT", 0))
_BUSINESS = ("LLC", "Ltd", "GmbH", "& Co", "Studio")
_DATE_TIME = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?"
                        r"([Zz]|[+-]\d{2}:\d{2})$")  # fmt: skip
_DATE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
_DOCS = "https://developer.paypal.com/docs/api/invoicing/v2/"
EVENT_SUMMARIES = {
    "INVOICING.INVOICE.CREATED": "An invoice was created",
    "INVOICING.INVOICE.UPDATED": "An invoice was updated",
    "INVOICING.INVOICE.SCHEDULED": "An invoice was scheduled",
    "INVOICING.INVOICE.PAID": "An invoice is paid, partially paid, or payment is made and is pending.",
    "INVOICING.INVOICE.REFUNDED": "An invoice is refunded or partially refunded.",
    "INVOICING.INVOICE.CANCELLED": "A merchant or customer cancels an invoice.",
}


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def _schema_error(location: str, path: str, issue: str, description: str, value: Any = None) -> PayPalError:
    """Invoicing's validation answer (``INVALID_REQUEST`` with the field as a JSON pointer in the body)."""
    detail: dict[str, Any] = {"field": path, "location": location, "issue": issue, "description": description}
    if value is not None:
        detail["value"] = str(value)
    return PayPalError(400, "INVALID_REQUEST", "Request is not well-formed, syntactically incorrect, or violates "
                       "schema.", [detail], link=f"{_DOCS}#errors")  # fmt: skip


def _not_found() -> PayPalError:
    return PayPalError(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.",
                       [{"issue": "INVALID_RESOURCE_ID", "description": "Requested resource ID was not found."}],
                       link=f"{_DOCS}#errors")  # fmt: skip


def _unprocessable(issue: str, description: str) -> PayPalError:
    return PayPalError(422, "UNPROCESSABLE_ENTITY", "The requested action could not be performed, semantically "
                       "incorrect, or failed business validation.", [{"issue": issue, "description": description}],
                       link=f"{_DOCS}#errors")  # fmt: skip


def query_int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter of the Invoicing API, with its validation answers."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _schema_error("query", name, "INVALID_PARAMETER_SYNTAX", "The value of a field does not conform to "
                            "the expected format.", raw) from None  # fmt: skip
    if value > high:
        raise _schema_error("query", name, "INVALID_INTEGER_MAX_VALUE", "Value exceeds max value.", raw)
    if value < low:
        raise _schema_error("query", name, "INVALID_INTEGER_MIN_VALUE", "Value is less than min value.", raw)
    return value


def _true(params: Mapping[str, str], name: str) -> bool:
    return str(params.get(name, "false")).lower() == "true"


def _method(body: Mapping[str, Any]) -> str:
    """The ``method`` of a recorded payment or refund: one of `PAYMENT_METHODS`, else PayPal's 400."""
    method = body.get("method")
    if method is None:
        raise _schema_error("body", "/method", "MISSING_REQUIRED_PARAMETER", "A required field is missing.")
    if method not in PAYMENT_METHODS:
        raise _schema_error("body", "/method", "INVALID_PARAMETER_VALUE", "The value of a field is invalid.",
                            method)  # fmt: skip
    return str(method)


def _amount(body: Mapping[str, Any], currency: str, left: int, kind: str, most: str) -> int:
    """The minor units of a recorded ``kind`` (``payment``, ``refund``): its ``amount``, in the invoice's
    ``currency``, more than zero and at most ``left`` (``most`` says what that is); all of ``left`` without one."""
    amount = body.get("amount")
    if amount is None:
        return left
    if not isinstance(amount, dict) or amount.get("currency_code") != currency:
        raise _unprocessable("CURRENCY_MISMATCH", f"The {kind} must be in the invoice's currency.")
    try:
        minor = _minor(amount.get("value"), currency)
    except (TypeError, ValueError):
        raise _schema_error("body", "/amount/value", "INVALID_PARAMETER_SYNTAX", "The value of a field does not "
                            "conform to the expected format.", amount.get("value")) from None  # fmt: skip
    if minor <= 0 or minor > left:
        raise _unprocessable(f"{kind.upper()}_AMOUNT_EXCEEDED", f"The {kind} must be more than zero and at most "
                             f"{most}.")  # fmt: skip
    return minor


@dataclass(slots=True, eq=False)
class _Invoice:
    """One invoice: its parts, and the times of what happened to it (unix seconds)."""

    id: str
    number: str
    currency: str
    created: int
    updated: int
    status: str
    payer: _Payer
    business: str | None
    items: list[dict[str, Any]]
    total: int
    invoice_date: str
    term: str
    due_date: str | None
    template: str
    reference: str | None = None
    memo: str | None = None
    first_sent: int | None = None
    last_sent: int | None = None
    cancelled: int | None = None
    viewed: bool = False
    archived: bool = False
    partial_allowed: bool = False
    payments: list[dict[str, Any]] = field(default_factory=list)  # API shape plus "time" and minor "minor"
    refunds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def paid(self) -> int:
        return sum(p["minor"] for p in self.payments)

    @property
    def refunded(self) -> int:
        return sum(r["minor"] for r in self.refunds)

    @property
    def due(self) -> int:
        return max(0, self.total - self.paid)

    def paid_between(self, start: float, end: float) -> bool:
        return any(start <= p["time"] <= end for p in self.payments)


class Invoicing:
    """The invoices of one app (see the module doc); callers hold the account's lock."""

    def __init__(self, account: PayPalAccount, count: int, now: int) -> None:
        self.account = account
        self.invoices: dict[str, _Invoice] = {}
        self.deleted: list[str] = []
        self.by_payment: dict[str, str] = {}  # PayPal transaction id -> invoice id
        self._rng = _Rng(f"paypal-invoices:{account.client_id}:{account.seed}")
        self._generate(count, now)

    # --- generation -------------------------------------------------------------------------------------

    def _new_id(self, rng: _Rng) -> str:
        text = rng.chars(_PAYER_ALPHABET, 16)
        return "INV2-" + "-".join(text[i : i + 4] for i in range(0, 16, 4))

    def _next_number(self) -> str:
        self.account._invoice += 1
        return f"INV-{self.account._invoice:07d}"

    def _items(self, rng: _Rng, currency: str) -> list[dict[str, Any]]:
        items = []
        for _ in range(rng.between(1, 4)):
            code, name, base = rng.pick(_ITEMS)
            items.append({"id": "ITEM-" + rng.chars(_PAYER_ALPHABET, 17), "name": name, "description": code,
                          "quantity": str(rng.between(1, 4)), "unit_amount": _money(_price(base, currency), currency),
                          "unit_of_measure": "QUANTITY"})  # fmt: skip
        return items

    @staticmethod
    def _total(items: list[dict[str, Any]], currency: str) -> int:
        return sum(_minor(i["unit_amount"]["value"], currency) * int(i["quantity"]) for i in items)

    def _make(self, rng: _Rng, created: int, payer: _Payer, currency: str, items: list[dict[str, Any]],
              number: str | None = None) -> _Invoice:  # fmt: skip
        term, days = rng.pick(_TERMS)
        invoice_date = _day(created)
        due = _day(created + days * _DAY) if days else invoice_date
        business = f"{payer.surname} {rng.pick(_BUSINESS)}" if rng.random() < 0.3 else None
        return _Invoice(
            id=self._new_id(rng), number=number or self._next_number(), currency=currency, created=created,
            updated=created, status="DRAFT", payer=payer, business=business, items=items,
            total=self._total(items, currency), invoice_date=invoice_date, term=term, due_date=due,
            template="TEMP-" + rng.chars(_PAYER_ALPHABET, 17),
            reference=f"PO-{rng.between(10000, 99999)}" if rng.random() < 0.4 else None,
            memo="Net terms agreed by phone" if rng.random() < 0.1 else None,
            partial_allowed=rng.random() < 0.2,
        )  # fmt: skip

    def _send(self, inv: _Invoice, when: int) -> None:
        inv.status = "SENT"
        inv.first_sent = inv.first_sent or when
        inv.last_sent = when
        inv.updated = max(inv.updated, when)

    def _pay(self, inv: _Invoice, minor: int, when: int, method: str, payment_id: str, kind: str) -> None:
        """A payment of ``minor`` at ``when``: PAID, MARKED_AS_PAID or PARTIALLY_PAID by what is left."""
        entry: dict[str, Any] = {"type": kind, "payment_id": payment_id}
        if kind == "PAYPAL":
            entry["transaction_type"] = "SALE"
        entry.update({"payment_date": _day(when), "method": method, "amount": _money(minor, inv.currency),
                      "time": when, "minor": minor})  # fmt: skip
        inv.payments.append(entry)
        if kind == "PAYPAL":
            self.by_payment[payment_id] = inv.id
        if inv.paid < inv.total:
            inv.status = "PARTIALLY_PAID"
        else:
            inv.status = "PAID" if all(p["type"] == "PAYPAL" for p in inv.payments) else "MARKED_AS_PAID"
        inv.viewed = inv.viewed or kind == "PAYPAL"
        inv.updated = max(inv.updated, when)

    def _refund(self, inv: _Invoice, minor: int, when: int, refund_id: str, method: str = "PAYPAL") -> None:
        """A refund of ``minor`` at ``when``, through PayPal or recorded (``method``): REFUNDED (MARKED_AS_REFUNDED
        when recorded) once all that was paid is back, PARTIALLY_REFUNDED before."""
        kind = "PAYPAL" if method == "PAYPAL" else "EXTERNAL"
        inv.refunds.append({"type": kind, "refund_id": refund_id, "refund_date": _day(when),
                            "amount": _money(minor, inv.currency), "method": method, "time": when,
                            "minor": minor})  # fmt: skip
        whole = "REFUNDED" if kind == "PAYPAL" else "MARKED_AS_REFUNDED"
        inv.status = whole if inv.refunded >= inv.paid else "PARTIALLY_REFUNDED"
        inv.updated = max(inv.updated, when)

    def _generate(self, count: int, now: int) -> None:
        """``count`` invoices over the account's days: about two in five paid through PayPal (its Checkout
        captures, each created some hours to days before its capture), the rest drafts, scheduled, sent,
        paid by cash or check (in full or in part) or cancelled; the first three are from the last day."""
        account, rng = self.account, self._rng
        start = now - max(1.0, account.spec["days"] * _DAY)
        payers = {p.account_id: p for p in account.payers}
        refunds: dict[str, list[_Txn]] = {}
        for row in account.rows:
            if row.code == "T1107" and row.balance:
                refunds.setdefault(row.infos[0][1].get("paypal_reference_id", ""), []).append(row)
        captures = [r for r in account.rows if r.code == "T0006" and r.balance and r.amount > 0
                    and r.status in ("S", "V", "F") and r.time > start + _DAY / 4
                    and r.infos[0][1].get("paypal_account_id") in payers]  # fmt: skip
        rng.shuffle(captures)
        made: list[_Invoice] = []
        for n in range(count):
            roll = rng.random()
            if n >= 3 and roll < 0.4 and captures:
                made.append(self._paid_capture(rng, captures.pop(), payers, refunds, start))
                continue
            created = int(now - rng.between(600, 20 * 3600)) if n < 3 else int(start + rng.random() * (now - start))
            currency = account._currency(rng)
            inv = self._make(rng, created, rng.pick(account.payers), currency, self._items(rng, currency))
            self._advance(rng, inv, rng.random(), now)
            made.append(inv)
        for inv in sorted(made, key=lambda i: (i.created, i.id)):
            self.invoices[inv.id] = inv

    def _paid_capture(self, rng: _Rng, sale: _Txn, payers: Mapping[str, _Payer], refunds: Mapping[str, list[_Txn]],
                      start: float) -> _Invoice:  # fmt: skip
        """An invoice its capture paid: created before it for the capture's item, payer and amount."""
        info = sale.infos[0][1]
        item = sale.sections["cart_info"]["item_details"][0]
        lines = [{"id": "ITEM-" + rng.chars(_PAYER_ALPHABET, 17), "name": item["item_name"],
                  "description": item["item_code"], "quantity": "1", "unit_amount": _money(sale.amount, sale.currency),
                  "unit_of_measure": "QUANTITY"}]  # fmt: skip
        created = int(sale.time - rng.between(600, int(min(4 * _DAY, sale.time - start))))
        inv = self._make(rng, created, payers[info["paypal_account_id"]], sale.currency, lines,
                         number=info.get("invoice_id"))  # fmt: skip
        self._send(inv, min(sale.time, created + rng.between(30, 600)))
        self._pay(inv, sale.amount, sale.time, "PAYPAL", sale.txn_id, "PAYPAL")
        for refund in refunds.get(sale.txn_id, []):
            self._refund(inv, -refund.amount, refund.time, refund.txn_id)
        return inv

    def _advance(self, rng: _Rng, inv: _Invoice, roll: float, now: int) -> None:
        """Take a generated invoice from draft to where ``roll`` puts it, each step before ``now``."""
        if roll < 0.10:
            return  # a draft
        if roll < 0.14:
            inv.status = "SCHEDULED"
            inv.invoice_date = _day(inv.created + rng.between(2, 10) * _DAY)
            inv.due_date = inv.invoice_date
            inv.term = "DUE_ON_RECEIPT"
            return
        sent = min(now - 1, inv.created + rng.between(30, 3600))
        self._send(inv, sent)
        later = int(sent + rng.random() * max(0, now - sent))
        if roll < 0.60:
            inv.viewed = rng.random() < 0.5
        elif roll < 0.76:
            method = rng.pick(("CASH", "CHECK", "BANK_TRANSFER"))
            self._pay(inv, inv.total, later, method, "EXTR-" + rng.chars(_PAYER_ALPHABET, 17), "EXTERNAL")
        elif roll < 0.86:
            part = max(1, int(inv.total * (0.3 + 0.4 * rng.random())))
            inv.partial_allowed = True
            self._pay(inv, part, later, "CHECK", "EXTR-" + rng.chars(_PAYER_ALPHABET, 17), "EXTERNAL")
        else:
            inv.status = "CANCELLED"
            inv.cancelled = later  # cancelling leaves last_update_time as it was

    # --- answers ------------------------------------------------------------------------------------------

    def _links(self, inv: _Invoice, base_url: str) -> list[dict[str, str]]:
        href = f"{base_url}/v2/invoicing/invoices/{inv.id}"
        links = [{"href": href, "rel": "self", "method": "GET"}]
        if inv.status == "DRAFT":
            links += [{"href": f"{href}/send", "rel": "send", "method": "POST"},
                      {"href": href, "rel": "replace", "method": "PUT"},
                      {"href": href, "rel": "delete", "method": "DELETE"}]  # fmt: skip
        if inv.status in PAYABLE:
            links += [{"href": f"{href}/remind", "rel": "remind", "method": "POST"},
                      {"href": f"{href}/cancel", "rel": "cancel", "method": "POST"}]  # fmt: skip
        if inv.status in PAYABLE or inv.status == "DRAFT":
            links.append({"href": f"{href}/payments", "rel": "record-payment", "method": "POST"})
        if inv.payments and inv.refunded < inv.paid:
            links.append({"href": f"{href}/refunds", "rel": "record-refund", "method": "POST"})
        return links

    def _recipient(self, inv: _Invoice, full: bool) -> dict[str, Any]:
        payer = inv.payer
        name = {"given_name": payer.given, "surname": payer.surname, "full_name": f"{payer.given} {payer.surname}"}
        billing: dict[str, Any] = {"name": name}
        if inv.business:
            billing["business_name"] = inv.business
        billing["email_address"] = payer.email
        if full:
            country, city, state, postal = payer.place
            address: dict[str, Any] = {"address_line_1": payer.street, "admin_area_2": city}
            if state:
                address["admin_area_1"] = state
            address.update({"postal_code": postal, "country_code": country})
            billing["address"] = address
            billing["phones"] = [{"country_code": "1", "national_number": payer.phone, "phone_type": "MOBILE"}]
        return {"billing_info": billing, "shipping_info": {"name": name}}

    def _money_parts(self, inv: _Invoice, out: dict[str, Any], full: bool) -> None:
        amount: dict[str, Any] = {"currency_code": inv.currency, "value": _money(inv.total, inv.currency)["value"]}
        if full:
            amount["breakdown"] = {"item_total": _money(inv.total, inv.currency),
                                   "tax_total": _money(0, inv.currency)}  # fmt: skip
        out["amount"] = amount
        out["due_amount"] = _money(inv.due, inv.currency)

    def _collection(self, entries: list[dict[str, Any]], total_key: str, total: int, currency: str,
                    with_entries: bool) -> dict[str, Any]:  # fmt: skip
        out: dict[str, Any] = {total_key: _money(total, currency)}
        if with_entries:
            out["transactions"] = [{k: v for k, v in e.items() if k not in ("time", "minor")} for e in entries]
        return out

    def full(self, inv: _Invoice, base_url: str) -> dict[str, Any]:
        """``GET /v2/invoicing/invoices/{id}``: the whole invoice (also what webhooks carry)."""
        metadata: dict[str, Any] = {"create_time": stamp(inv.created)}
        if inv.updated > inv.created:
            metadata["last_update_time"] = stamp(inv.updated)
        if inv.cancelled is not None:
            metadata["cancel_time"] = stamp(inv.cancelled)
        if inv.first_sent is not None:
            metadata["first_sent_time"] = stamp(inv.first_sent)
            metadata["last_sent_time"] = stamp(inv.last_sent or inv.first_sent)
        metadata["created_by_flow"] = "REGULAR_SINGLE"
        compact = inv.id[5:].replace("-", "")
        if inv.first_sent is not None:
            metadata["recipient_view_url"] = f"https://www.sandbox.paypal.com/invoice/p/#{compact}"
        metadata["invoicer_view_url"] = f"https://www.sandbox.paypal.com/invoice/details/{inv.id}"
        metadata["caller_type"] = "API_V2_INVOICE"
        out: dict[str, Any] = {"id": inv.id, "status": inv.status, "detail": self._detail(inv, metadata, True)}
        out["invoicer"] = {"business_name": f"Merchant {self.account.id}",
                           "email_address": f"billing-{self.account.id.lower()}@merchant.example.com"}  # fmt: skip
        out["primary_recipients"] = [self._recipient(inv, True)]
        out["items"] = [dict(i) for i in inv.items]
        out["configuration"] = {"tax_calculated_after_discount": True, "tax_inclusive": False, "allow_tip": False,
                                "partial_payment": {"allow_partial_payment": inv.partial_allowed},
                                "template_id": inv.template}  # fmt: skip
        self._money_parts(inv, out, True)
        if inv.payments:
            out["payments"] = self._collection(inv.payments, "paid_amount", inv.paid, inv.currency, True)
        if inv.refunds:
            out["refunds"] = self._collection(inv.refunds, "refund_amount", inv.refunded, inv.currency, True)
        out["links"] = self._links(inv, base_url)
        return out

    def _detail(self, inv: _Invoice, metadata: dict[str, Any], full: bool) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if inv.reference:
            detail["reference"] = inv.reference
        detail["currency_code"] = inv.currency
        detail["note"] = "Thank you for your business."
        if inv.memo:
            detail["memo"] = inv.memo
        detail["invoice_number"] = inv.number
        detail["invoice_date"] = inv.invoice_date
        term: dict[str, Any] = {"term_type": inv.term} if full else {}
        if inv.due_date:
            term["due_date"] = inv.due_date
        detail["payment_term"] = term
        detail["viewed_by_recipient"] = inv.viewed
        detail["group_draft"] = False
        detail["metadata"] = metadata
        if full:
            detail["archived"] = inv.archived
        return detail

    def summary(self, inv: _Invoice, base_url: str, fields: frozenset[str]) -> dict[str, Any]:
        """A search or list item: the invoice without its items, configuration or audit times but its creation
        (collections only when ``fields`` names them)."""
        out: dict[str, Any] = {"id": inv.id, "status": inv.status}
        out["detail"] = self._detail(inv, {"create_time": stamp(inv.created)}, False)
        out["primary_recipients"] = [self._recipient(inv, False)]
        if "items" in fields:
            out["items"] = [dict(i) for i in inv.items]
        self._money_parts(inv, out, False)
        if inv.payments:
            out["payments"] = self._collection(inv.payments, "paid_amount", inv.paid, inv.currency,
                                               "payments" in fields)  # fmt: skip
        if inv.refunds:
            out["refunds"] = self._collection(inv.refunds, "refund_amount", inv.refunded, inv.currency,
                                              "refunds" in fields)  # fmt: skip
        out["links"] = self._links(inv, base_url)
        return out

    def get(self, invoice_id: str) -> _Invoice:
        inv = self.invoices.get(invoice_id)
        if inv is None:
            raise _not_found()
        return inv

    @staticmethod
    def _page(base: str, path_params: dict[str, Any], page: int, size: int, total_pages: int | None,
              method: str) -> list[dict[str, str]]:  # fmt: skip
        def href(p: int) -> str:
            return f"{base}?{urlencode({**path_params, 'page': p, 'page_size': size})}"

        links = [{"href": href(page), "rel": "self", "method": method}]
        if page > 1:
            links.append({"href": href(page - 1), "rel": "prev", "method": method})
        if total_pages is None or page < total_pages:
            links.append({"href": href(page + 1), "rel": "next", "method": method})
        if total_pages:
            links.append({"href": href(1), "rel": "first", "method": method})
            links.append({"href": href(total_pages), "rel": "last", "method": method})
        return links

    def _listing(self, hits: list[_Invoice], params: Mapping[str, str], fields: frozenset[str], base_url: str,
                 path: str, method: str) -> dict[str, Any]:  # fmt: skip
        page = query_int(params, "page", 1, 1, 1000)
        size = query_int(params, "page_size", 20, 1, 100)
        total_required = _true(params, "total_required")
        hits.sort(key=lambda i: (-i.created, i.id))  # newest first
        chosen = hits[(page - 1) * size : page * size]
        pages = (len(hits) + size - 1) // size
        body: dict[str, Any] = {}
        if total_required:
            body["total_items"] = len(hits)
            body["total_pages"] = pages
        body["items"] = [self.summary(inv, base_url, fields) for inv in chosen]
        extra = {"total_required": "true"} if total_required else {}
        body["links"] = self._page(f"{base_url}{path}", extra, page, size, pages if total_required else None,
                                   method) if chosen or page == 1 else []  # fmt: skip
        return body

    def list(self, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """``GET /v2/invoicing/invoices``: every invoice, newest first (``fields=all`` adds the collections)."""
        fields = COLLECTIONS if str(params.get("fields", "")).lower() == "all" else frozenset()
        return self._listing(list(self.invoices.values()), params, fields, base_url, "/v2/invoicing/invoices", "GET")

    def search(self, params: Mapping[str, str], criteria: Mapping[str, Any], base_url: str) -> dict[str, Any]:
        """``POST /v2/invoicing/search-invoices``: the invoices matching every criterion, newest first."""
        tests = _criteria(criteria)
        wanted = criteria.get("fields") or []
        fields = frozenset(str(f) for f in wanted) & COLLECTIONS
        hits = [inv for inv in self.invoices.values() if all(test(inv) for test in tests)]
        return self._listing(hits, params, fields, base_url, "/v2/invoicing/search-invoices", "POST")

    # --- changes ------------------------------------------------------------------------------------------

    def _announce(self, inv: _Invoice, event_type: str) -> None:
        on_event = self.account.on_event
        if on_event is not None:
            on_event(event_type, "invoices", lambda base: {"invoice": self.full(inv, base)})

    def add(self, fields: Mapping[str, Any], at: int, base_url: str) -> dict[str, Any]:
        """A new invoice at ``at`` (``status``: DRAFT, SENT, PAID or CANCELLED, SENT by default; ``currency``,
        ``amount`` as a decimal string, ``invoice_number``, ``invoice_date``), announced as created in that status,
        then paid or cancelled."""
        rng = self._rng
        currency = str(fields.get("currency", self.account.currencies[0]))
        items = self._items(rng, currency)
        if "amount" in fields:
            items = [{**items[0], "quantity": "1", "unit_amount": {"currency_code": currency,
                                                                   "value": str(fields["amount"])}}]  # fmt: skip
        inv = self._make(rng, at, rng.pick(self.account.payers), currency, items, fields.get("invoice_number"))
        if fields.get("invoice_date"):
            inv.invoice_date = inv.due_date = str(fields["invoice_date"])
            inv.term = "DUE_ON_DATE_SPECIFIED"
        status = str(fields.get("status", "SENT"))
        if status not in ("DRAFT", "SENT", "PAID", "CANCELLED"):
            raise ValueError("status must be DRAFT, SENT, PAID or CANCELLED")
        if status != "DRAFT":
            self._send(inv, at)
        self.invoices[inv.id] = inv
        self._announce(inv, "INVOICING.INVOICE.CREATED")
        if status == "PAID":
            self.pay_with_paypal(inv.id, at)
        elif status == "CANCELLED":
            self.cancel(inv.id, at)
        return self.full(inv, base_url)

    def send(self, invoice_id: str, now: int) -> _Invoice:
        """``POST …/{id}/send``: a draft becomes SENT, or SCHEDULED when its invoice date is still to come (a
        payable invoice is sent again)."""
        inv = self.get(invoice_id)
        if inv.status not in ("DRAFT", "SCHEDULED", *PAYABLE):
            raise _unprocessable("INVALID_INVOICE_STATUS", f"An invoice in {inv.status} status cannot be sent.")
        if inv.status == "DRAFT" and inv.invoice_date > _day(now):
            inv.status = "SCHEDULED"
            inv.updated = max(inv.updated, now)
            self._announce(inv, "INVOICING.INVOICE.SCHEDULED")
            return inv
        self._send(inv, now)
        self._announce(inv, "INVOICING.INVOICE.UPDATED")
        return inv

    def cancel(self, invoice_id: str, now: int) -> None:
        """``POST …/{id}/cancel``: a sent or scheduled invoice becomes CANCELLED (204)."""
        inv = self.get(invoice_id)
        if inv.status not in CANCELLABLE:
            raise _unprocessable("INVALID_INVOICE_STATUS", f"An invoice in {inv.status} status cannot be cancelled.")
        inv.status = "CANCELLED"
        inv.cancelled = now
        self._announce(inv, "INVOICING.INVOICE.CANCELLED")

    def delete(self, invoice_id: str) -> None:
        """``DELETE …/{id}``: drafts and scheduled invoices only (204); the id is gone for good."""
        inv = self.get(invoice_id)
        if inv.status not in DELETABLE:
            raise _unprocessable("INVALID_INVOICE_STATUS", "Only draft or scheduled invoices can be deleted; "
                                 "cancel a sent invoice instead.")  # fmt: skip
        del self.invoices[invoice_id]
        self.deleted.append(invoice_id)

    def record_payment(self, invoice_id: str, body: Mapping[str, Any], now: int) -> dict[str, str]:
        """``POST …/{id}/payments``: an external payment (``method``, ``payment_date``, ``amount``, ``note``)."""
        inv = self.get(invoice_id)
        method = _method(body)
        when = now
        if body.get("payment_date") is not None:
            raw = str(body["payment_date"])
            if not _DATE.match(raw):
                raise _schema_error("body", "/payment_date", "INVALID_PARAMETER_SYNTAX", "The value of a field does "
                                    "not conform to the expected format.", raw)  # fmt: skip
            day = int(dt.datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
            when = now if day <= now < day + _DAY else min(now, day)
        if inv.status not in PAYABLE and inv.status != "DRAFT":
            raise _unprocessable("INVALID_INVOICE_STATUS", f"A payment cannot be recorded on a {inv.status} invoice.")
        minor = _amount(body, inv.currency, inv.total - inv.paid, "payment", "the amount due")
        if inv.status == "DRAFT":
            self._send(inv, when)
        payment_id = "EXTR-" + self._rng.chars(_PAYER_ALPHABET, 17)
        self._pay(inv, minor, when, method, payment_id, "EXTERNAL")
        if body.get("note"):
            inv.payments[-1]["note"] = str(body["note"])
        inv.updated = max(inv.updated, now)
        self._announce(inv, "INVOICING.INVOICE.PAID")
        return {"payment_id": payment_id}

    def record_refund(self, invoice_id: str, body: Mapping[str, Any], now: int) -> dict[str, str]:
        """``POST …/{id}/refunds``: a refund made outside PayPal (``method``, ``refund_date``, ``amount``)."""
        inv = self.get(invoice_id)
        method = _method(body)
        left = inv.paid - inv.refunded
        if left <= 0:
            raise _unprocessable("INVALID_INVOICE_STATUS", "Nothing paid on the invoice is left to refund.")
        minor = _amount(body, inv.currency, left, "refund", "what was paid")
        refund_id = "EXTR-" + self._rng.chars(_PAYER_ALPHABET, 17)
        self._refund(inv, minor, now, refund_id, method)
        self._announce(inv, "INVOICING.INVOICE.REFUNDED")
        return {"refund_id": refund_id}

    def remind(self, invoice_id: str, now: int) -> None:
        """``POST …/{id}/remind``: a payable invoice is sent again as a reminder (204)."""
        inv = self.get(invoice_id)
        if inv.status not in PAYABLE:
            raise _unprocessable("INVALID_INVOICE_STATUS", f"A reminder cannot be sent for a {inv.status} invoice.")
        inv.last_sent = now
        inv.updated = max(inv.updated, now)
        self._announce(inv, "INVOICING.INVOICE.UPDATED")

    def pay_with_paypal(self, invoice_id: str, now: int) -> str:
        """The recipient pays what is due through PayPal: a Checkout capture (announced) under the invoice's
        number, then the invoice PAID; returns the capture's id."""
        inv = self.get(invoice_id)
        if inv.status not in PAYABLE:
            raise ValueError(f"invoice {invoice_id} is {inv.status}, not payable")
        capture = self.account.invoice_capture(inv.payer, inv.currency, inv.total - inv.paid, inv.number, now)
        self._pay(inv, capture.amount, now, "PAYPAL", capture.txn_id, "PAYPAL")
        self._announce(inv, "INVOICING.INVOICE.PAID")
        return capture.txn_id

    def capture_refunded(self, capture: _Txn, refund: _Txn) -> None:
        """A capture that paid an invoice was refunded (in part): the invoice's refund, announced."""
        invoice_id = self.by_payment.get(capture.txn_id)
        inv = self.invoices.get(invoice_id or "")
        if inv is None:
            return
        self._refund(inv, -refund.amount, refund.time, refund.txn_id)
        self._announce(inv, "INVOICING.INVOICE.REFUNDED")

    def apply_changes(self, created: int, paid: int, cancelled: int, now: int) -> dict[str, list[str]]:
        """``created`` new sent invoices, ``paid`` open ones paid through PayPal, ``cancelled`` open ones
        cancelled, all at ``now``."""
        rng = self._rng
        out: dict[str, list[str]] = {"invoices_created": [], "invoices_paid": [], "invoices_cancelled": []}
        for _ in range(created):
            currency = self.account._currency(rng)
            inv = self._make(rng, now, rng.pick(self.account.payers), currency, self._items(rng, currency))
            self._send(inv, now)
            self.invoices[inv.id] = inv
            self._announce(inv, "INVOICING.INVOICE.CREATED")
            out["invoices_created"].append(inv.id)
        open_ids = [i.id for i in self.invoices.values() if i.status in PAYABLE and i.id not in out["invoices_created"]]
        rng.shuffle(open_ids)
        for invoice_id in open_ids[:paid]:
            self.pay_with_paypal(invoice_id, now)
            out["invoices_paid"].append(invoice_id)
        for invoice_id in open_ids[paid : paid + cancelled]:
            self.cancel(invoice_id, now)
            out["invoices_cancelled"].append(invoice_id)
        return out

    def export(self, base_url: str) -> dict[str, Any]:
        """Every invoice in full, and the ids of deleted ones."""
        return {"records": [self.full(inv, base_url) for inv in self.invoices.values()],
                "deleted_ids": list(self.deleted)}  # fmt: skip


# --- search criteria ---------------------------------------------------------------------------------------


def _formatted(value: Any, path: str, pattern: re.Pattern[str]) -> str:
    """A required string in the format `pattern` matches; PayPal's 400 for a missing or malformed one."""
    if value is None:
        raise _schema_error("body", path, "MISSING_REQUIRED_PARAMETER", "A required field is missing.")
    if not isinstance(value, str) or not pattern.match(value):
        raise _schema_error("body", path, "INVALID_PARAMETER_SYNTAX", "The value of a field does not conform to the "
                            "expected format.", value)  # fmt: skip
    return value


def _time(value: Any, path: str) -> float:
    return parse_time(_formatted(value, path, _DATE_TIME))


def _date(value: Any, path: str) -> str:
    return _formatted(value, path, _DATE)


def _range(criteria: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = criteria[name]
    if not isinstance(value, dict):
        raise _schema_error("body", f"/{name}", "INVALID_PARAMETER_SYNTAX", "The value of a field does not conform "
                            "to the expected format.")  # fmt: skip
    return value


def _prefix(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _schema_error("body", f"/{name}", "INVALID_PARAMETER_SYNTAX", "The value of a field does not conform "
                            "to the expected format.", value)  # fmt: skip
    return value.lower()


def _criteria(criteria: Mapping[str, Any]) -> list[Any]:
    """Tests of an invoice for each search criterion; PayPal's 400 for a malformed one."""
    tests: list[Any] = []
    for name in ("creation_date_range", "payment_date_range"):
        if criteria.get(name) is not None:
            bounds = _range(criteria, name)
            low, high = _time(bounds.get("start"), f"/{name}/start"), _time(bounds.get("end"), f"/{name}/end")
            if name == "creation_date_range":
                tests.append(lambda i, lo=low, hi=high: lo <= i.created <= hi)
            else:
                tests.append(lambda i, lo=low, hi=high: i.paid_between(lo, hi))
    for name, attribute in (("invoice_date_range", "invoice_date"), ("due_date_range", "due_date")):
        if criteria.get(name) is not None:
            bounds = _range(criteria, name)
            low, high = _date(bounds.get("start"), f"/{name}/start"), _date(bounds.get("end"), f"/{name}/end")
            tests.append(lambda i, a=attribute, lo=low, hi=high: getattr(i, a) is not None
                         and lo <= getattr(i, a) <= hi)  # fmt: skip
    if criteria.get("status") is not None:
        statuses = criteria["status"]
        if not isinstance(statuses, list) or any(s not in STATUSES for s in statuses):
            raise _schema_error("body", "/status", "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
        if len(statuses) > 5:
            raise _schema_error("body", "/status", "INVALID_ARRAY_MAX_ITEMS", "The number of items in an array "
                                "parameter is too large.")  # fmt: skip
        tests.append(lambda i, wanted=frozenset(statuses): i.status in wanted)
    prefixes = {"recipient_email": lambda i: i.payer.email, "recipient_first_name": lambda i: i.payer.given,
                "recipient_last_name": lambda i: i.payer.surname,
                "recipient_business_name": lambda i: i.business or ""}  # fmt: skip
    for name, read in prefixes.items():
        if criteria.get(name) is not None:
            start = _prefix(criteria[name], name)
            tests.append(lambda i, read=read, start=start: read(i).lower().startswith(start))
    for name, read in (("invoice_number", lambda i: i.number), ("reference", lambda i: i.reference),
                       ("currency_code", lambda i: i.currency)):  # fmt: skip
        if criteria.get(name) is not None:
            tests.append(lambda i, read=read, wanted=criteria[name]: read(i) == wanted)
    if criteria.get("memo") is not None:
        memo = _prefix(criteria["memo"], "memo")
        tests.append(lambda i: memo in (i.memo or "").lower())
    if criteria.get("archived") is not None:
        tests.append(lambda i, wanted=bool(criteria["archived"]): i.archived == wanted)
    if criteria.get("total_amount_range") is not None:
        bounds = _range(criteria, "total_amount_range")
        low, high = bounds.get("lower_amount"), bounds.get("upper_amount")
        if not isinstance(low, dict) or not isinstance(high, dict):
            raise _schema_error("body", "/total_amount_range", "MISSING_REQUIRED_PARAMETER", "A required field is "
                                "missing.")  # fmt: skip
        currency = str(low.get("currency_code"))
        lo, hi = _minor(low.get("value"), currency), _minor(high.get("value"), currency)
        tests.append(lambda i: i.currency == currency and lo <= i.total <= hi)
    return tests
