"""Writes the MYOB emulator takes, as AccountRight does: ``POST {cf}/Contact/Customer`` makes a customer card and
``POST {cf}/Sale/Invoice/Service`` a service sale invoice.

A create answers ``201 Created`` with a ``Location`` header naming the new record and no body (``?returnBody=true``
adds the record). A request MYOB would refuse answers ``400`` listing every problem in its ``Errors``: ``Required``
(100) for a missing field, ``SerializationError`` (50) for a value of the wrong type (a GUID that is not one),
``NotFound`` (150) for a UID the company file does not hold (customer, account, tax code, currency) and
``ValidationError`` (1000, ``CommonRules_StringLength``; the message wording is unverified) for a string longer
than its field. Messages name fields, never the values sent (names and emails are personal data). MYOB takes no
idempotency key: the same POST twice makes two records. New records show in the read endpoints at once, stamped
with the sandbox clock; an invoice adds its balance to its customer's ``CurrentBalance`` (the card's
``LastModified`` stays, as for the balances of generated invoices).
"""

from __future__ import annotations

import hashlib
import uuid
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from nextcrm_sandbox.myob.data import _CompanyFile, _Row
from nextcrm_sandbox.myob.model import (
    _BASE,
    _JSON,
    _US,
    API_PREFIX,
    ERROR_INFORMATION,
    MyobError,
    _money,
    _round_div,
    format_myob_datetime,
    parse_myob_datetime,
)

# Field lengths of the MYOB contracts (developer.myob.com: Contact/Customer, Sale/Invoice/Service).
_CUSTOMER_LIMITS = {"CompanyName": 50, "LastName": 30, "FirstName": 20, "DisplayID": 15, "Notes": 255}
_ADDRESS_LIMITS = {"Street": 255, "City": 255, "State": 255, "PostCode": 11, "Country": 255, "Phone1": 21,
                   "Phone2": 21, "Phone3": 21, "Fax": 21, "Email": 255, "Website": 255, "ContactName": 25,
                   "Salutation": 15}  # fmt: skip
_INVOICE_LIMITS = {"Number": 13, "CustomerPurchaseOrderNumber": 255, "JournalMemo": 255, "Comment": 255,
                   "ShipToAddress": 255}  # fmt: skip
_LINE_DESCRIPTION = 1000
_MAX_ADDRESSES = 5
_LINE_TYPES = ("Transaction", "Header", "Subtotal")
_CENT = Decimal("0.01")


class WriteRefused(MyobError):
    """A POST MYOB refuses: ``400`` with every problem found in ``Errors``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        first = errors[0]
        super().__init__(400, first["Name"], first["Message"], details=first["AdditionalDetails"],
                         code=first["ErrorCode"])  # fmt: skip
        self.errors = errors

    def body(self) -> bytes:
        return orjson.dumps({"Errors": self.errors, "Information": ERROR_INFORMATION})


class _Problems:
    """The problems of one request body, gathered so the answer lists them all as MYOB does."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, name: str, message: str, details: str | None, code: int) -> None:
        self.errors.append({"Name": name, "Message": message, "AdditionalDetails": details, "ErrorCode": code,
                            "Severity": "Error", "LearnMore": None})  # fmt: skip

    def required(self, path: str) -> None:
        self.add("Required", f"{path} is required", path, 100)

    def wrong_type(self, path: str, kind: str) -> None:
        self.add("SerializationError", f"Error converting value to type '{kind}'. Path '{path}'.", path, 50)

    def not_found(self, path: str, what: str) -> None:
        self.add("NotFound", f"The {what} was not found", path, 150)

    def too_long(self, path: str, entity: str) -> None:
        self.add("ValidationError", "CommonRules_StringLength", f"{path}:({entity})", 1000)

    def check(self) -> None:
        if self.errors:
            raise WriteRefused(self.errors)


def read_body(raw: bytes) -> dict[str, Any]:
    """The POSTed JSON object; a body that is not one is a ``SerializationError``."""
    try:
        body = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        problems = _Problems()
        problems.add("SerializationError", "Unexpected character encountered while parsing value.", None, 50)
        problems.check()
    return body  # type: ignore[return-value]


def _text(body: dict[str, Any], key: str, limit: int, problems: _Problems, entity: str, *, path: str | None = None,
          required: bool = False) -> str | None:  # fmt: skip
    where = path or key
    value = body.get(key)
    if value is None or value == "":
        if required:
            problems.required(where)
        return None
    if not isinstance(value, str):
        problems.wrong_type(where, "System.String")
        return None
    if len(value) > limit:
        problems.too_long(where, entity)
        return None
    return value


def _flag(body: dict[str, Any], key: str, default: bool | None, problems: _Problems) -> bool | None:
    value = body.get(key, default)
    if value is None:
        if default is None:
            problems.required(key)
        return default
    if not isinstance(value, bool):
        problems.wrong_type(key, "System.Boolean")
        return default
    return value


def _uid_of(link: Any, path: str, problems: _Problems, *, required: bool) -> str | None:
    """The ``UID`` of a ``{"UID": ...}`` link, lower-cased; reports a missing or malformed one."""
    if link is None or (isinstance(link, dict) and link.get("UID") in (None, "")):
        if required:
            problems.required(f"{path}.UID")
        return None
    uid = link.get("UID") if isinstance(link, dict) else None
    try:
        return str(uuid.UUID(uid)) if isinstance(uid, str) else _bad_guid(path, problems)
    except ValueError:
        return _bad_guid(path, problems)


def _bad_guid(path: str, problems: _Problems) -> None:
    problems.wrong_type(f"{path}.UID", "System.Guid")
    return None


def _cents(value: Any, path: str, problems: _Problems, *, required: bool) -> int | None:
    """A money amount in cents (MYOB rounds to its two decimals); numbers and numeric strings, as JSON.NET."""
    if value is None:
        if required:
            problems.required(path)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        problems.wrong_type(path, "System.Decimal")
        return None
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite():
        problems.wrong_type(path, "System.Decimal")
        return None
    return int(amount.quantize(_CENT, rounding=ROUND_HALF_UP) * 100)


def _moment(value: Any, path: str, problems: _Problems, *, required: bool) -> int | None:
    if value is None or value == "":
        if required:
            problems.required(path)
        return None
    try:
        return parse_myob_datetime(value) if isinstance(value, str) else _bad_date(path, problems)
    except ValueError:
        return _bad_date(path, problems)


def _bad_date(path: str, problems: _Problems) -> None:
    problems.wrong_type(path, "System.DateTime")
    return None


def _new_uid(tenant: _CompanyFile) -> str:
    """A fresh GUID, deterministic for the company file's history (its row versions never repeat)."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{tenant.id}:{tenant.row_version()}".encode()).digest()[:16],
                         version=4))  # fmt: skip


def _links(tenant: _CompanyFile) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """The company file's tax codes, accounts and foreign currencies by UID."""
    taxes = {link["UID"]: link for link in (tenant.tax_gst, tenant.tax_fre)}
    accounts = {link["UID"]: link for link in (*tenant.accounts, *tenant.bank_accounts)}
    currencies = {link["UID"]: (link, rate) for link, rate in tenant.currencies.values()}
    return taxes, accounts, currencies


def create_customer(tenant: _CompanyFile, body: dict[str, Any], now_us: int) -> _Row:
    """A new customer card from a POSTed ``Customer`` contract (``IsIndividual``; ``LastName`` for a person,
    ``CompanyName`` for a company; ``SellingDetails.TaxCode`` and ``FreightTaxCode`` required)."""
    problems = _Problems()
    individual = _flag(body, "IsIndividual", None, problems)
    texts = {key: _text(body, key, limit, problems, "Customer") for key, limit in _CUSTOMER_LIMITS.items()}
    for needed, when in (("LastName", True), ("CompanyName", False)):
        if individual is when and body.get(needed) in (None, ""):
            problems.required(needed)
    active = _flag(body, "IsActive", True, problems)
    addresses = _addresses(body.get("Addresses"), problems)
    selling = body.get("SellingDetails")
    if selling is not None and not isinstance(selling, dict):
        problems.wrong_type("SellingDetails", "SellingDetails")
        selling = {}
    selling = selling or {}
    taxes, accounts, currencies = _links(tenant)
    tax = _uid_of(selling.get("TaxCode"), "SellingDetails.TaxCode", problems, required=True)
    freight = _uid_of(selling.get("FreightTaxCode"), "SellingDetails.FreightTaxCode", problems, required=True)
    income = _uid_of(selling.get("IncomeAccount"), "SellingDetails.IncomeAccount", problems, required=False)
    currency = _uid_of(body.get("ForeignCurrency"), "ForeignCurrency", problems, required=False)
    for uid, path, known, what in ((tax, "SellingDetails.TaxCode", taxes, "tax code"),
                                   (freight, "SellingDetails.FreightTaxCode", taxes, "tax code"),
                                   (income, "SellingDetails.IncomeAccount", accounts, "account"),
                                   (currency, "ForeignCurrency", currencies, "currency")):  # fmt: skip
        if uid is not None and uid not in known:
            problems.not_found(f"{path}.UID", what)
    problems.check()
    uid = _new_uid(tenant)
    company = texts["CompanyName"] if not individual else None
    first, last = (texts["FirstName"], texts["LastName"]) if individual else (None, None)
    terms = selling.get("Terms") if isinstance(selling.get("Terms"), dict) else {}
    return tenant.add_card(
        uid,
        company or ", ".join(part for part in (last, first) if part),
        now_us,
        now_us,
        company=company,
        last=last,
        first=first,
        individual=bool(individual),
        display=texts["DisplayID"] or "*None",
        active=bool(active),
        addresses=addresses,
        notes=texts["Notes"] or "",
        layout="NoDefault",
        delivery="Print",
        income=accounts[income] if income else None,
        abn=None,
        tax=taxes[tax],  # type: ignore[index]
        freight_tax=taxes[freight],  # type: ignore[index]
        due=terms.get("PaymentIsDue") or "InAGivenNumberOfDays",
        due_days=terms.get("BalanceDueDate") if isinstance(terms.get("BalanceDueDate"), int) else 30,
        method="Cash",
        currency=currencies[currency][0] if currency else None,
    )


def _addresses(value: Any, problems: _Problems) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        problems.wrong_type("Addresses", "List`1[Address]")
        return []
    if len(value) > _MAX_ADDRESSES:
        problems.add("ValidationError", "CommonRules_TooManyItems", "Addresses:(Customer)", 1000)
        return []
    out = []
    for index, given in enumerate(value):
        address: dict[str, Any] = {"Location": given.get("Location") or index + 1}
        for key, limit in _ADDRESS_LIMITS.items():
            address[key] = _text(given, key, limit, problems, "Address", path=f"Addresses[{index}].{key}")
        out.append(address)
    return out


def create_service_invoice(tenant: _CompanyFile, body: dict[str, Any], now_us: int) -> _Row:
    """A new service sale invoice from a POSTed ``ServiceInvoice`` contract (``Date``, ``Customer.UID`` and lines,
    each with its ``Total``, ``Account.UID`` and ``TaxCode.UID``; ``FreightTaxCode`` when there is freight). Amounts
    are in the customer's currency (its card's ``ForeignCurrency``, else the file's)."""
    problems = _Problems()
    texts = {key: _text(body, key, limit, problems, "Invoice") for key, limit in _INVOICE_LIMITS.items()}
    date_us = _moment(body.get("Date"), "Date", problems, required=True)
    promised = _moment(body.get("PromisedDate"), "PromisedDate", problems, required=False)
    inclusive = _flag(body, "IsTaxInclusive", False, problems)
    customer_uid = _uid_of(body.get("Customer"), "Customer", problems, required=True)
    customer = tenant.customers.get(customer_uid) if customer_uid else None
    if customer_uid is not None and customer is None:
        problems.not_found("Customer.UID", "customer")
    taxes, accounts, currencies = _links(tenant)
    lines = body.get("Lines")
    if not lines:
        problems.required("Lines")
        lines = []
    elif not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
        problems.wrong_type("Lines", "List`1[ServiceInvoiceLine]")
        lines = []
    parsed = [_line(line, index, taxes, accounts, problems) for index, line in enumerate(lines)]
    freight = _cents(body.get("Freight"), "Freight", problems, required=False) or 0
    freight_tax = _uid_of(body.get("FreightTaxCode"), "FreightTaxCode", problems, required=bool(freight))
    if freight_tax is not None and freight_tax not in taxes:
        problems.not_found("FreightTaxCode.UID", "tax code")
    problems.check()
    if customer is None or date_us is None:  # reported above
        raise WriteRefused(problems.errors)
    card = customer.rec
    currency_link = card["ForeignCurrency"]
    rate = _rate(body.get("CurrencyExchangeRate"), currencies, currency_link)
    if freight_tax is None:
        freight_tax = card["SellingDetails"]["FreightTaxCode"]["UID"]

    def local(cents: int) -> int:
        return _round_div(cents, rate) if rate else cents

    def tax_of(cents: int, tax_uid: str) -> int:
        if taxes[tax_uid]["Code"] != "GST":
            return 0
        return _round_div(cents, 11) if inclusive else _round_div(cents, 10)

    uid = _new_uid(tenant)
    out_lines = []
    subtotal = tax = 0
    subtotal_local = tax_local = 0
    for row_id, (kind, description, cents, account, tax_uid) in enumerate(parsed, start=1):
        line: dict[str, Any] = {"RowID": row_id, "Type": kind, "Description": description}
        if kind == "Transaction":
            subtotal += cents
            subtotal_local += local(cents)
            tax += tax_of(cents, tax_uid)
            tax_local += tax_of(local(cents), tax_uid)
            line.update(Account=accounts[account], Total=_money(local(cents)),
                        TotalForeign=_money(cents) if rate else None, Job=None, TaxCode=taxes[tax_uid])  # fmt: skip
        else:
            line.update(Account=None, Total=0.0, TotalForeign=0.0 if rate else None, Job=None, TaxCode=None)
        line["RowVersion"] = tenant.row_version()
        out_lines.append(line)
    tax += tax_of(freight, freight_tax)
    tax_local += tax_of(local(freight), freight_tax)
    total = subtotal + freight + (0 if inclusive else tax)
    total_local = subtotal_local + local(freight) + (0 if inclusive else tax_local)
    status = "Credit" if total_local < 0 else "Closed" if total_local == 0 else "Open"
    link = tenant.customer_links[customer.uid]
    number = texts["Number"]
    if number is None:
        number = f"{tenant.next_number:08d}"
        tenant.next_number += 1
    row = tenant.add_sale_invoice(
        uid,
        "Service",
        now_us,
        now_us,
        number=number,
        date=format_myob_datetime(date_us),
        purchase_order=texts["CustomerPurchaseOrderNumber"] or "",
        customer=link,
        promised=format_myob_datetime(promised) if promised is not None else None,
        balance=(total_local, total),
        status=status,
        lines=out_lines,
        ship_to=texts["ShipToAddress"],
        day_us=date_us - date_us % (86400 * _US),
        due_days=card["SellingDetails"]["Terms"]["BalanceDueDate"],
        inclusive=inclusive,
        subtotal=(subtotal_local, subtotal),
        freight=(local(freight), freight),
        freight_tax=taxes[freight_tax],
        tax=(tax_local, tax),
        total=(total_local, total),
        comment=texts["Comment"],
        memo=texts["JournalMemo"] or f"Sale; {link['Name']}",
        delivery_status="Nothing",
        last_payment=None,
        currency=currency_link,
        rate=rate,
    )
    card["CurrentBalance"] = _money(round(card["CurrentBalance"] * 100) + total_local)
    return row


def _line(line: dict[str, Any], index: int, taxes: dict[str, Any], accounts: dict[str, Any],
          problems: _Problems) -> tuple[str, str | None, int, str | None, str | None]:  # fmt: skip
    """(type, description, cents, account UID, tax code UID) of one posted line."""
    where = f"Lines[{index}]"
    kind = line.get("Type") or "Transaction"
    if kind not in _LINE_TYPES:
        problems.wrong_type(f"{where}.Type", "InvoiceLineType")
        kind = "Transaction"
    description = _text(line, "Description", _LINE_DESCRIPTION, problems, "InvoiceLine", path=f"{where}.Description")
    if kind != "Transaction":
        return kind, description, 0, None, None
    cents = _cents(line.get("Total"), f"{where}.Total", problems, required=True) or 0
    account = _uid_of(line.get("Account"), f"{where}.Account", problems, required=True)
    tax = _uid_of(line.get("TaxCode"), f"{where}.TaxCode", problems, required=True)
    if account is not None and account not in accounts:
        problems.not_found(f"{where}.Account.UID", "account")
    if tax is not None and tax not in taxes:
        problems.not_found(f"{where}.TaxCode.UID", "tax code")
    return kind, description, cents, account, tax


def _rate(given: Any, currencies: dict[str, Any], currency_link: dict[str, Any] | None) -> float | None:
    """The exchange rate of a foreign-currency sale (units of its currency per local unit): as posted, else the
    file's current rate; None for a sale in the file's own currency."""
    if currency_link is None:
        return None
    if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0:
        return float(given)
    return float(currencies[currency_link["UID"]][1])


def created(request: Request, tenant: _CompanyFile, row: _Row, headers: dict[str, str]) -> Response:
    """MYOB's answer to a create: ``201 Created``, the record's URI as ``Location`` (on the company file's
    ``location_origin`` when set), a body only when asked for."""
    origin = f"{request.url.scheme}://{request.url.netloc}{API_PREFIX}"
    location = row.rec["URI"].replace(
        _BASE, f"{tenant.knobs.location_origin}{API_PREFIX}" if tenant.knobs.location_origin else origin
    )
    out = {**headers, "location": location}
    if request.query_params.get("returnBody", "").lower() == "true":
        body = orjson.dumps(row.rec).replace(_BASE.encode(), origin.encode())
        return Response(body, status_code=201, headers={**out, "content-type": _JSON})
    return Response(b"", status_code=201, headers=out)
