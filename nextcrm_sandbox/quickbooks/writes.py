"""The writes the QuickBooks emulator serves as Intuit's API does: ``POST /customer`` and ``POST /invoice`` create,
``POST /invoice?operation=void|delete`` with the invoice's ``Id`` and current ``SyncToken``. Each answers
``{"Customer"|"Invoice": {...}}`` in the read shape and reaches the queries, Change Data Capture and the webhooks.

Refusals are Intuit's ``Fault`` bodies (HTTP 400, ``ValidationFault``): 2010 for a property the entity does not
have, 2020 for a required one missing, 2050 for a string too long, 2500 for a reference to nothing (or to an
inactive customer), 6240 for a customer name already used, 6000 for business rules (the invoice's currency must
be its customer's), 610 for an invoice that is not there, 5010 (``Stale Object Error``) for a ``SyncToken`` that
is not the current one. No message repeats a value the request carried (names, emails). Empty strings count as
absent, and the computed or read-only fields official SDKs send along with a new object (``Balance``,
``TotalAmt``, ``FullyQualifiedName``, ``MetaData``...) are ignored, as QuickBooks ignores them. A body with an
``Id`` is an update, which the emulator does not serve (``Unsupported Operation``). The ``requestid`` replay
is ``api``'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from nextcrm_sandbox.quickbooks.data import (
    _CURRENCY_NAMES,
    _ITEMS,
    _RATES_E4,
    QuickBooksCompany,
    _home_cents,
    _money,
)
from nextcrm_sandbox.quickbooks.model import QueryError, _not_found

# Every property of a Customer and of an Invoice (Intuit's entity references and the official SDKs' models): any
# other is refused with 2010, as QuickBooks' schema does.
_CUSTOMER_FIELDS_TEXT = (
    "Id SyncToken domain sparse status MetaData Title GivenName MiddleName FamilyName Suffix FullyQualifiedName "
    "CompanyName DisplayName PrintOnCheckName Notes Active Job BillWithParent Taxable Balance BalanceWithJobs "
    "OpenBalanceDate PreferredDeliveryMethod ResaleNum BillAddr ShipAddr PrimaryPhone AlternatePhone Mobile Fax "
    "PrimaryEmailAddr WebAddr DefaultTaxCodeRef SalesTermRef PaymentMethodRef CurrencyRef ParentRef Level "
    "CustomerTypeRef ARAccountRef TaxExemptionReasonId PrimaryTaxIdentifier SecondaryTaxIdentifier BusinessNumber "
    "GSTIN GSTRegistrationType IsProject ClientEntityId Source TaxRegime"
)
_INVOICE_FIELDS_TEXT = (
    "Id SyncToken domain sparse status MetaData CustomField DocNumber TxnDate DepartmentRef PrivateNote LinkedTxn "
    "Line TxnTaxDetail CustomerRef CustomerMemo BillAddr ShipAddr FreeFormAddress ShipFromAddr ClassRef "
    "SalesTermRef DueDate GlobalTaxCalculation ShipMethodRef ShipDate TrackingNum TotalAmt HomeTotalAmt "
    "ApplyTaxAfterDiscount PrintStatus EmailStatus BillEmail BillEmailCc BillEmailBcc Balance HomeBalance Deposit "
    "DepositToAccountRef AllowIPNPayment AllowOnlinePayment AllowOnlineCreditCardPayment AllowOnlineACHPayment "
    "CurrencyRef ExchangeRate TransactionLocationType TxnSource ProjectRef RecurDataRef TaxExemptionRef "
    "InvoiceLink DeliveryInfo EInvoiceStatus"
)
_CUSTOMER_FIELDS = frozenset(_CUSTOMER_FIELDS_TEXT.split())
_INVOICE_FIELDS = frozenset(_INVOICE_FIELDS_TEXT.split())
# What a new customer takes from the request as it is (the rest of the record is QuickBooks' own).
_CUSTOMER_COPIED = (
    "Title", "GivenName", "MiddleName", "FamilyName", "Suffix", "CompanyName", "PrintOnCheckName", "Notes",
    "Taxable", "PreferredDeliveryMethod", "ResaleNum", "BillAddr", "ShipAddr", "PrimaryPhone", "AlternatePhone",
    "Mobile", "Fax", "PrimaryEmailAddr", "WebAddr",
)  # fmt: skip
# What a new invoice takes from the request as it is.
_INVOICE_COPIED = (
    "CustomerMemo", "PrivateNote", "ShipAddr", "BillEmail", "BillEmailCc", "BillEmailBcc", "SalesTermRef",
    "ClassRef", "DepartmentRef", "ShipDate", "TrackingNum", "CustomField",
)  # fmt: skip
# Intuit's string limits (characters) of the fields the emulator checks.
_MAX_LENGTH = {
    "DisplayName": 500, "Title": 16, "GivenName": 100, "MiddleName": 100, "FamilyName": 100, "Suffix": 16,
    "CompanyName": 100, "PrintOnCheckName": 110, "Notes": 2000, "DocNumber": 21, "PrivateNote": 4000,
    "PrimaryEmailAddr.Address": 100, "PrimaryPhone.FreeFormNumber": 30, "CustomerMemo.value": 1000,
    "Line.Description": 4000,
}  # fmt: skip
_NAME_PARTS = ("Title", "GivenName", "MiddleName", "FamilyName", "Suffix")
_LINE_TYPES = frozenset(
    {"SalesItemLineDetail", "DescriptionOnly", "SubTotalLineDetail", "DiscountLineDetail", "GroupLineDetail"}
)
_ITEM_NAMES = {item_id: name for item_id, name, _price in _ITEMS}
MAX_LINES = 750
# The longest ``requestid`` QuickBooks takes outside a batch.
REQUEST_ID_MAX = 50
# Who QuickBooks says made the other change in a Stale Object Error (a company user's name in reality).
_OTHER_USER = "Sandbox Admin"


def _invalid_property(name: str, entity: str) -> QueryError:
    return QueryError(
        "2010",
        "Request has invalid or unsupported property",
        f'Property Name:Unrecognized field "{name}" (class com.intuit.schema.finance.v3.{entity}), not marked as '
        "ignorable specified is unsupported or invalid",
        element=name,
    )


def _bad_value(name: str) -> QueryError:
    return QueryError("2010", "Request has invalid or unsupported property",
                      f"Property Name:{name} specified is unsupported or invalid", element=name)  # fmt: skip


def _missing(name: str) -> QueryError:
    return QueryError(
        "2020",
        "Required param missing, need to supply the required value for the API",
        f"Required parameter {name} is missing in the request",
        element=name,
    )


def _too_long(name: str, limit: int, supplied: int) -> QueryError:
    return QueryError(
        "2050",
        "String length is either shorter or longer than supported by specification",
        f"String length specified does not match the supported length. Min:0 Max:{limit} supported. "
        f"Supplied length:{supplied}",
        element=name,
    )


def _invalid_reference(name: str) -> QueryError:
    return QueryError(
        "2500",
        "Invalid Reference Id",
        "Invalid Reference Id : Something you're trying to use has been made inactive. Check the fields with "
        "accounts, customers, items, vendors or employees.",
        element=name,
    )


def _duplicate_name(existing: str) -> QueryError:
    return QueryError(
        "6240",
        "Duplicate Name Exists Error",
        "The name supplied already exists. : Another customer, vendor or employee is already using this name. "
        f"Please use a different name. Id={existing}",
    )


def _business(detail: str) -> QueryError:
    return QueryError("6000", "A business validation error has occurred while processing your request",
                      f"Business Validation Error: {detail}")  # fmt: skip


def _stale() -> QueryError:
    return QueryError(
        "5010",
        "Stale Object Error",
        f"Stale Object Error : You and {_OTHER_USER} were working on this at the same time. {_OTHER_USER} finished "
        "before you did, so your work was not saved.",
    )


def _given(body: Mapping[str, Any], name: str) -> Any:
    """The request's value of `name`; an empty string or null counts as absent."""
    value = body.get(name)
    return None if value in ("", None) else value


def _check_fields(body: Mapping[str, Any], known: frozenset[str], entity: str) -> None:
    for name in body:
        if name not in known:
            raise _invalid_property(name, entity)
    if _given(body, "Id") is not None:
        raise QueryError("500", "Unsupported Operation",
                         f"Operation {entity} update is not supported by the sandbox")  # fmt: skip


def _check_lengths(body: Mapping[str, Any]) -> None:
    for path, limit in _MAX_LENGTH.items():
        head, _, tail = path.partition(".")
        if head == "Line":
            values = [line.get(tail) for line in body.get("Line") or [] if isinstance(line, dict)]
        else:
            value = body.get(head)
            values = [value.get(tail) if isinstance(value, dict) else None] if tail else [value]
        for value in values:
            if value is not None and not isinstance(value, str):
                raise _bad_value(path)
            if isinstance(value, str) and len(value) > limit:
                raise _too_long(path, limit, len(value))


def _ref(body: Mapping[str, Any], name: str) -> str | None:
    ref = _given(body, name)
    if ref is None:
        return None
    value = ref.get("value") if isinstance(ref, dict) else None
    if value in (None, ""):
        raise _missing(f"{name}.value")
    return str(value)


def _currency(company: QuickBooksCompany, body: Mapping[str, Any]) -> str | None:
    code = _ref(body, "CurrencyRef")
    if code is not None and code not in company.spec["currencies"]:
        raise _invalid_reference("CurrencyRef")
    return code


def create_customer(company: QuickBooksCompany, body: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A new customer from a ``POST /customer`` body: active, no balance, in the company's currency unless
    ``CurrencyRef`` names another of its currencies; ``DisplayName`` (else made of the name parts) unique."""
    _check_fields(body, _CUSTOMER_FIELDS, "Customer")
    _check_lengths(body)
    parts = [str(_given(body, part)) for part in _NAME_PARTS if _given(body, part) is not None]
    display = _given(body, "DisplayName")
    if display is None:
        if not parts:
            raise _missing("DisplayName")
        display = " ".join(parts)
    display = str(display).strip()
    if any(ch in display for ch in ":\t\n\r"):
        raise _bad_value("DisplayName")
    taken = {str(rec.get("DisplayName", "")).lower(): oid for oid, rec in company.customers.items()}
    if display.lower() in taken:
        raise _duplicate_name(taken[display.lower()])
    currency = _currency(company, body) or company.home_currency
    parent = _ref(body, "ParentRef")
    if parent is not None and parent not in company.customers:
        raise _invalid_reference("ParentRef")
    oid = company._alloc_id()
    rec: dict[str, Any] = {
        "Taxable": False, "Job": parent is not None, "BillWithParent": False, "Balance": 0.0, "BalanceWithJobs": 0.0,
        "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]}, "PreferredDeliveryMethod": "Print",
        "IsProject": False, "ClientEntityId": "0", "domain": "QBO", "sparse": False, "Id": oid, "SyncToken": "0",
        "MetaData": {},
    }  # fmt: skip
    rec.update({name: body[name] for name in _CUSTOMER_COPIED if _given(body, name) is not None})
    qualified = f"{company.customers[parent]['FullyQualifiedName']}:{display}" if parent is not None else display
    rec.update({"FullyQualifiedName": qualified, "DisplayName": display, "Active": True})
    rec.setdefault("PrintOnCheckName", display)
    if parent is not None:
        rec["ParentRef"] = {"value": parent}
        rec["Level"] = 1
    if _given(body, "Active") is False:
        rec["Active"] = False
    with company._reporting():
        company.customers[oid] = rec
        company._set_times("Customer", oid, now, now)
        company._touch()
        company._record("Customer", "Create", oid, now)
    return rec


def _amount(value: Any, name: str) -> int:
    """A JSON amount as cents; more than two decimals, or not a number, is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad_value(name)
    try:
        exact = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        raise _bad_value(name) from None
    if not exact.is_finite() or exact != exact.quantize(Decimal("0.01")):
        raise _bad_value(name)
    return int(exact * 100)


def _sales_line(line: Mapping[str, Any], number: int, taxable: bool) -> tuple[dict[str, Any], int, int]:
    """One ``SalesItemLineDetail`` line as stored, its amount and its taxable amount (cents)."""
    detail = line.get("SalesItemLineDetail")
    if detail is not None and not isinstance(detail, dict):
        raise _bad_value("Line.SalesItemLineDetail")
    detail = dict(detail or {})
    if _given(line, "Amount") is None:
        raise _missing("Line.Amount")
    cents = _amount(line["Amount"], "Line.Amount")
    item = _ref(detail, "ItemRef")
    if item is None:
        raise _missing("Line.SalesItemLineDetail.ItemRef")
    if item not in _ITEM_NAMES:
        raise _invalid_reference("Line.SalesItemLineDetail.ItemRef")
    qty, price = _given(detail, "Qty"), _given(detail, "UnitPrice")
    if qty is not None and price is not None:
        product = Decimal(repr(qty) if isinstance(qty, float) else str(qty)) * Decimal(
            repr(price) if isinstance(price, float) else str(price)
        )
        if product.quantize(Decimal("0.01")) != Decimal(cents) / 100:
            raise QueryError("6070", "Amount is not equal to UnitPrice * Qty",
                             "Amount is not equal to UnitPrice * Qty. Supplied value:" + str(Decimal(cents) / 100),
                             element="Line.Amount")  # fmt: skip
    tax_code = _ref(detail, "TaxCodeRef") or "NON"
    stored_detail: dict[str, Any] = {
        "ItemRef": {"value": item, "name": _ITEM_NAMES[item]},
        "ItemAccountRef": {"value": "79", "name": "Sales of Product Income"},
        "TaxCodeRef": {"value": "TAX" if tax_code == "TAX" else "NON"},
    }
    if qty is not None:
        stored_detail["Qty"] = qty
    if price is not None:
        stored_detail["UnitPrice"] = price
    stored: dict[str, Any] = {"Id": str(number), "LineNum": number}
    if _given(line, "Description") is not None:
        stored["Description"] = line["Description"]
    stored.update({"Amount": _money(cents), "DetailType": "SalesItemLineDetail",
                   "SalesItemLineDetail": stored_detail})  # fmt: skip
    return stored, cents, cents if taxable and tax_code == "TAX" else 0


def _lines(body: Mapping[str, Any], taxable: bool) -> tuple[list[dict[str, Any]], int, int]:
    """The invoice's lines as stored (numbered, a subtotal line added), its subtotal and its tax (cents)."""
    lines = _given(body, "Line")
    if lines is None:
        raise _missing("Line")
    if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
        raise _bad_value("Line")
    if len(lines) > MAX_LINES:
        raise _business(f"An invoice holds at most {MAX_LINES} lines. Supplied:{len(lines)}")
    stored: list[dict[str, Any]] = []
    subtotal = taxable_sub = 0
    for line in lines:
        kind = _given(line, "DetailType")
        if kind is None:
            raise _missing("Line.DetailType")
        if kind not in _LINE_TYPES:
            raise _bad_value("Line.DetailType")
        if kind == "SubTotalLineDetail":
            continue  # QuickBooks computes the subtotal itself
        if kind == "DescriptionOnly":
            number = len(stored) + 1
            stored.append({"Id": str(number), "LineNum": number, "Description": line.get("Description", ""),
                           "DetailType": "DescriptionOnly", "DescriptionLineDetail": {}})  # fmt: skip
            continue
        if kind != "SalesItemLineDetail":
            raise QueryError("500", "Unsupported Operation",
                             f"Operation {kind} lines are not supported by the sandbox")  # fmt: skip
        line_stored, cents, taxed = _sales_line(line, len(stored) + 1, taxable)
        stored.append(line_stored)
        subtotal += cents
        taxable_sub += taxed
    if not any(line["DetailType"] == "SalesItemLineDetail" for line in stored):
        raise _missing("Line.SalesItemLineDetail")
    stored.append({"Amount": _money(subtotal), "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}})
    return stored, subtotal, (taxable_sub * 8 + 50) // 100


def _date(value: Any, name: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value)
    try:
        return dt.date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        raise _bad_value(name) from None


def create_invoice(company: QuickBooksCompany, body: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A new invoice from a ``POST /invoice`` body: its customer (active, existing) owes its total; ``DocNumber``
    is the next number unless given; ``TxnDate`` today and ``DueDate`` the transaction date unless given; the
    currency is the customer's (``CurrencyRef`` naming another is refused)."""
    _check_fields(body, _INVOICE_FIELDS, "Invoice")
    _check_lengths(body)
    cid = _ref(body, "CustomerRef")
    if cid is None:
        raise _missing("CustomerRef")
    customer = company.customers.get(cid)
    if customer is None or not customer.get("Active", True):
        raise _invalid_reference("CustomerRef")
    currency = customer["CurrencyRef"]["value"]
    asked = _currency(company, body)
    if asked is not None and asked != currency:
        raise _business(f"The currency of the transaction ({asked}) must be the customer's currency ({currency}).")
    lines, subtotal, tax = _lines(body, bool(customer.get("Taxable")))
    total = subtotal + tax
    txn_date = _date(body.get("TxnDate"), "TxnDate") or company._date(now)
    due_date = _date(body.get("DueDate"), "DueDate") or txn_date
    if due_date < txn_date:
        raise _business("The due date cannot be earlier than the transaction date.")
    doc = _given(body, "DocNumber")
    oid = company._alloc_id()
    rec: dict[str, Any] = {
        "AllowIPNPayment": False, "AllowOnlinePayment": False, "AllowOnlineCreditCardPayment": False,
        "AllowOnlineACHPayment": False, "domain": "QBO", "sparse": False, "Id": oid, "SyncToken": "0",
        "MetaData": {}, "CustomField": [], "DocNumber": str(doc) if doc is not None else str(company.next_doc),
        "TxnDate": txn_date, "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]}, "LinkedTxn": [],
        "Line": lines, "TxnTaxDetail": {"TotalTax": _money(tax)},
        "CustomerRef": {"value": cid, "name": customer["DisplayName"]},
        "BillAddr": dict(customer.get("BillAddr") or {}), "FreeFormAddress": True, "DueDate": due_date,
        "TotalAmt": _money(total), "ApplyTaxAfterDiscount": False, "PrintStatus": "NotSet", "EmailStatus": "NotSet",
        "Balance": _money(total), "Deposit": 0,
    }  # fmt: skip
    if customer.get("PrimaryEmailAddr"):
        rec["BillEmail"] = dict(customer["PrimaryEmailAddr"])
    if not rec["BillAddr"]:
        del rec["BillAddr"]
    rec.update({name: body[name] for name in _INVOICE_COPIED if _given(body, name) is not None})
    if tax:
        rec["TxnTaxDetail"]["TxnTaxCodeRef"] = {"value": "2"}
    if currency != company.home_currency:
        rate = _RATES_E4[currency] * 10000 // _RATES_E4[company.home_currency]
        rec["ExchangeRate"] = rate / 10000
        rec["HomeTotalAmt"] = rec["HomeBalance"] = _money(_home_cents(total, rate))
    if doc is None:
        company.next_doc += 1
    with company._reporting():
        company.invoices[oid] = rec
        company._set_times("Invoice", oid, now, now)
        company._adjust_customer(cid, total, now)
        company._touch()
        company._record("Invoice", "Create", oid, now)
    return rec


def _current(company: QuickBooksCompany, body: Mapping[str, Any]) -> str:
    """The invoice an operation names, checked against its ``SyncToken`` (optimistic locking)."""
    for name in body:
        if name not in _INVOICE_FIELDS:
            raise _invalid_property(name, "Invoice")
    oid = _given(body, "Id")
    if oid is None:
        raise _missing("Id")
    token = _given(body, "SyncToken")
    if token is None:
        raise _missing("SyncToken")
    rec = company.invoices.get(str(oid))
    if rec is None:
        raise _not_found()
    if str(token) != rec["SyncToken"]:
        raise _stale()
    return str(oid)


def invoice_operation(company: QuickBooksCompany, operation: str, body: Mapping[str, Any],
                      now: float) -> dict[str, Any]:  # fmt: skip
    """``void`` (zeroed, "Voided" in ``PrivateNote``, a new ``SyncToken``; the invoice stays queryable) or ``delete``
    (gone from queries, a ``Deleted`` stub in Change Data Capture): the object QuickBooks answers."""
    oid = _current(company, body)
    if operation == "void":
        company.void_invoice(oid, now)
        return company.invoices[oid]
    company.delete_invoice(oid, now)
    return {"domain": "QBO", "status": "Deleted", "Id": oid}
