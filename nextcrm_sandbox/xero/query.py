"""Reading a Xero organisation: the ``where``/``order`` syntax, and records rendered as JSON or XML.

``parse_where`` compiles the Dynamic-LINQ subset Xero accepts (``Type=="ACCREC" AND
UpdatedDateUTC>=DateTime(2024,01,31,00,00,00)``, ``OR``, ``NOT``, ``Guid()``, ``.Contains()``...);
``_Renderer`` builds the API dicts and ``to_xml`` Xero's XML default.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from nextcrm_sandbox.xero.data import (
    _MSDATE_RE,
    XeroTenant,
    _Contact,
    _Invoice,
    _iso_seconds,
    _Line,
    _money,
    _Payment,
    _round_div,
    _Settings,
    _utc,
    format_msdate,
)

# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _View:
    """How a list or single answer renders its records."""

    lines: bool
    full_contact: bool
    unitdp4: bool = False
    summary_only: bool = False
    balances: dict[str, tuple[int, int, int, int]] | None = None
    roles: tuple[set[str], set[str]] | None = None


def _line_api(line: _Line, unitdp4: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if line.item_code:
        out["ItemCode"] = line.item_code
    out.update(
        {
            "Description": line.description,
            "UnitAmount": line.unit / 10000 if unitdp4 else _money(_round_div(line.unit, 100)),
            "TaxType": line.tax_type,
            "TaxAmount": _money(line.tax),
            "LineAmount": _money(line.amount),
            "AccountCode": line.account_code,
            "Tracking": [],
            "Quantity": line.quantity / 10000,
            "LineItemID": line.id,
            "ValidationErrors": [],
        }
    )
    return out


def _contact_summary(contact: _Contact) -> dict[str, Any]:
    return {
        "ContactID": contact.id,
        "Name": contact.name,
        "Addresses": [],
        "Phones": [],
        "ContactGroups": [],
        "ContactPersons": [],
        "HasValidationErrors": False,
    }


class _Renderer:
    """API dicts of one tenant's records, honouring the tenant's date knobs."""

    def __init__(self, tenant: XeroTenant, settings: _Settings) -> None:
        self.tenant = tenant
        self.offset = settings.msdate_offset
        self.invoice_string = settings.updated_date_utc_string
        self.contact_string = settings.contacts_updated_date_utc_string

    def date(self, ms: int) -> str:
        return format_msdate(ms, self.offset)

    def contact(self, c: _Contact, view: _View) -> dict[str, Any]:
        out: dict[str, Any] = {"ContactID": c.id}
        if c.number:
            out["ContactNumber"] = c.number
        if c.account_number:
            out["AccountNumber"] = c.account_number
        out["ContactStatus"] = c.status
        out["Name"] = c.name
        out["FirstName"] = c.first_name
        out["LastName"] = c.last_name
        out["EmailAddress"] = c.email
        if view.summary_only:
            out["UpdatedDateUTC"] = self.date(c.updated)
            if self.contact_string:
                out["UpdatedDateUTCString"] = _iso_seconds(c.updated) + "Z"
            out["HasValidationErrors"] = False
            return out
        customers, suppliers = view.roles or (set(), set())
        out.update(
            {
                "BankAccountDetails": "",
                "TaxNumber": c.tax_number,
                "Addresses": [dict(a) for a in c.addresses],
                "Phones": [dict(p) for p in c.phones],
                "UpdatedDateUTC": self.date(c.updated),
            }
        )
        if self.contact_string:
            out["UpdatedDateUTCString"] = _iso_seconds(c.updated) + "Z"
        out.update(
            {
                "ContactGroups": [],
                "IsSupplier": c.id in suppliers,
                "IsCustomer": c.id in customers,
                "DefaultCurrency": c.currency,
            }
        )
        if view.balances is not None:
            ar, ar_over, ap, ap_over = view.balances.get(c.id, (0, 0, 0, 0))
            out["Balances"] = {
                "AccountsReceivable": {"Outstanding": _money(ar), "Overdue": _money(ar_over)},
                "AccountsPayable": {"Outstanding": _money(ap), "Overdue": _money(ap_over)},
            }
        out["ContactPersons"] = [dict(p) for p in c.persons]
        out["HasAttachments"] = False
        out["HasValidationErrors"] = False
        return out

    def invoice(self, inv: _Invoice, view: _View) -> dict[str, Any]:
        contact = self.tenant.contacts[inv.contact_id]
        out: dict[str, Any] = {"Type": inv.type, "InvoiceID": inv.id, "InvoiceNumber": inv.number}
        out["Reference"] = inv.reference
        if not view.summary_only:
            out["Payments"] = [self.invoice_payment(p) for p in inv.payments]
            out["CreditNotes"] = []
            out["Prepayments"] = []
            out["Overpayments"] = []
        out.update(
            {
                "AmountDue": _money(inv.amount_due),
                "AmountPaid": _money(inv.paid),
                "AmountCredited": 0.0,
                "SentToContact": inv.sent,
                "CurrencyRate": inv.rate / 1_000_000,
                "HasErrors": False,
                "IsDiscounted": False,
                "HasAttachments": False,
                "Contact": self.contact(contact, _View(False, False, roles=view.roles))
                if view.full_contact
                else _contact_summary(contact),
                "DateString": _iso_seconds(inv.date),
                "Date": self.date(inv.date),
                "DueDateString": _iso_seconds(inv.due),
                "DueDate": self.date(inv.due),
                "Status": inv.status,
                "LineAmountTypes": inv.line_amount_types,
            }
        )
        if not view.summary_only:
            out["LineItems"] = [_line_api(line, view.unitdp4) for line in inv.lines] if view.lines else []
        out["SubTotal"] = _money(inv.sub_total)
        out["TotalTax"] = _money(inv.total_tax)
        out["Total"] = _money(inv.total)
        out["UpdatedDateUTC"] = self.date(inv.updated)
        if self.invoice_string:
            out["UpdatedDateUTCString"] = _iso_seconds(inv.updated) + "Z"
        out["CurrencyCode"] = inv.currency
        if inv.fully_paid_on is not None and inv.status == "PAID":
            out["FullyPaidOnDate"] = self.date(inv.fully_paid_on)
        return out

    def organisation(self, created_ms: int) -> dict[str, Any]:
        """The organisation as ``GET /Organisation`` gives it (its id is the tenant id of ``/connections``)."""
        t = self.tenant
        country, version, timezone, year_end_month, tax_basis, tax_period = _COUNTRY[t.base_currency]
        own = random.Random(f"xero-organisation:{t.id}")
        code = "".join(own.choice(string.ascii_letters + string.digits) for _ in range(5))
        return {
            "APIKey": "".join(own.choice(string.ascii_uppercase + string.digits) for _ in range(30)),
            "Name": t.name,
            "LegalName": t.name,
            "PaysTax": True,
            "Version": version,
            "OrganisationType": "COMPANY",
            "BaseCurrency": t.base_currency,
            "CountryCode": country,
            "IsDemoCompany": False,
            "OrganisationStatus": "ACTIVE",
            "FinancialYearEndDay": 30 if year_end_month == 6 else 31,
            "FinancialYearEndMonth": year_end_month,
            "SalesTaxBasis": tax_basis,
            "SalesTaxPeriod": tax_period,
            "DefaultSalesTax": "Tax Exclusive",
            "DefaultPurchasesTax": "Tax Exclusive",
            "CreatedDateUTC": format_msdate(created_ms, offset=False),
            "OrganisationEntityType": "COMPANY",
            "Timezone": timezone,
            "ShortCode": f"!{code}",
            "OrganisationID": t.id,
            "Edition": "BUSINESS",
            "Class": "STANDARD",
            "Addresses": [],
            "Phones": [],
            "ExternalLinks": [],
            "PaymentTerms": {},
        }

    def invoice_payment(self, p: _Payment) -> dict[str, Any]:
        """A payment as its invoice lists it (``Invoice.Payments``): a summary without status or account."""
        return {
            "PaymentID": p.id,
            "Date": self.date(p.date),
            "Amount": _money(p.amount),
            "Reference": p.reference,
            "CurrencyRate": p.rate / 1_000_000,
            "HasAccount": False,
            "HasValidationErrors": False,
        }

    def payment(self, p: _Payment) -> dict[str, Any]:
        """A payment as ``GET /Payments`` gives it: type, status, account, and the invoice it pays in brief."""
        inv = self.tenant.invoices[p.invoice_id]
        contact = self.tenant.contacts[inv.contact_id]
        account_id, code, _ = self.tenant.bank_accounts[p.account]
        foreign = inv.currency != self.tenant.base_currency
        bank_cents = _round_div(p.amount * 1_000_000, p.rate) if foreign and p.rate else p.amount
        summary = _contact_summary(contact)
        summary = {"ContactID": contact.id, "ContactNumber": contact.number or "", **summary}
        out: dict[str, Any] = {
            "PaymentID": p.id,
            "Date": self.date(p.date),
            "BankAmount": _money(bank_cents),
            "Amount": _money(p.amount),
            "Reference": p.reference,
            "CurrencyRate": p.rate / 1_000_000,
            "PaymentType": "ACCRECPAYMENT" if inv.type == "ACCREC" else "ACCPAYPAYMENT",
            "Status": p.status,
            "UpdatedDateUTC": self.date(p.updated),
        }
        if self.invoice_string:
            out["UpdatedDateUTCString"] = _iso_seconds(p.updated) + "Z"
        out.update(
            {
                "HasAccount": True,
                "IsReconciled": p.reconciled,
                "Account": {"AccountID": account_id, "Code": code},
                "Invoice": {
                    "Type": inv.type,
                    "InvoiceID": inv.id,
                    "InvoiceNumber": inv.number,
                    "Payments": [],
                    "CreditNotes": [],
                    "Prepayments": [],
                    "Overpayments": [],
                    "HasErrors": False,
                    "IsDiscounted": False,
                    "Contact": summary,
                    "LineItems": [],
                    "CurrencyCode": inv.currency,
                },
                "HasValidationErrors": False,
            }
        )
        return out


# Base currency -> CountryCode, Version, Timezone, FinancialYearEndMonth, SalesTaxBasis, SalesTaxPeriod.
_COUNTRY = {
    "NZD": ("NZ", "NZ", "NEWZEALANDSTANDARDTIME", 3, "PAYMENTS", "TWOMONTHS"),
    "AUD": ("AU", "AU", "AUSEASTERNSTANDARDTIME", 6, "CASH", "QUARTERLY1"),
    "GBP": ("GB", "UK", "GMTSTANDARDTIME", 3, "ACCRUALS", "QUARTERLY1"),
    "USD": ("US", "US", "PACIFICSTANDARDTIME", 12, "ACCRUALS", "MONTHLY"),
}
CURRENCY_NAMES = {
    "NZD": "New Zealand Dollar", "AUD": "Australian Dollar", "GBP": "British Pound", "USD": "United States Dollar",
    "EUR": "Euro", "CAD": "Canadian Dollar",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Currency:
    """One currency the organisation has enabled (``GET /Currencies``): the base one first."""

    seq: int
    code: str
    description: str


def currencies_of(tenant: XeroTenant) -> list[_Currency]:
    """The base currency, then every other currency its contacts or invoices use, by code."""
    used = {c.currency for c in tenant.contacts.values()} | {i.currency for i in tenant.invoices.values()}
    codes = [tenant.base_currency, *sorted(used - {tenant.base_currency})]
    return [_Currency(n, code, CURRENCY_NAMES.get(code, code)) for n, code in enumerate(codes)]


_SINGULAR = {
    "Invoices": "Invoice",
    "Contacts": "Contact",
    "LineItems": "LineItem",
    "Organisations": "Organisation",
    "Currencies": "Currency",
    "ExternalLinks": "ExternalLink",
    "Payments": "Payment",
    "CreditNotes": "CreditNote",
    "Prepayments": "Prepayment",
    "Overpayments": "Overpayment",
    "Addresses": "Address",
    "Phones": "Phone",
    "ContactGroups": "ContactGroup",
    "ContactPersons": "ContactPerson",
    "Tracking": "TrackingCategory",
    "ValidationErrors": "ValidationError",
    "Elements": "DataContractBase",
}
_XML_NS = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"'


def _xml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        m = _MSDATE_RE.match(value)
        if m:
            ms = int(m.group(1))
            text = _utc(ms).strftime("%Y-%m-%dT%H:%M:%S")
            return text + (f".{ms % 1000:03d}".rstrip("0") if ms % 1000 else "")
        return xml_escape(value)
    if isinstance(value, float) and value.is_integer():
        return f"{value:.2f}"
    return xml_escape(str(value))


def _xml_node(name: str, value: Any, parts: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, dict):
        parts.append(f"<{name}>")
        for key, item in value.items():
            _xml_node(key, item, parts)
        parts.append(f"</{name}>")
    elif isinstance(value, list):
        if not value:
            return
        child = _SINGULAR.get(name, name.rstrip("s") or "Item")
        parts.append(f"<{name}>")
        for item in value:
            _xml_node(child, item, parts)
        parts.append(f"</{name}>")
    else:
        parts.append(f"<{name}>{_xml_value(value)}</{name}>")


def to_xml(payload: Mapping[str, Any], root: str = "Response") -> bytes:
    """Xero's XML rendering of a JSON answer (the default when ``Accept`` does not ask for JSON)."""
    parts = [f"<{root} {_XML_NS}>"]
    for key, value in payload.items():
        _xml_node(key, value, parts)
    parts.append(f"</{root}>")
    return "".join(parts).encode()


# ---------------------------------------------------------------------------------------------------------
# The `where` filter (a subset of the Dynamic LINQ syntax Xero accepts)
# ---------------------------------------------------------------------------------------------------------


class _QueryError(Exception):
    """A ``where``/``order`` that Xero would refuse with ``QueryParseException`` (ErrorNumber 16)."""


_TOKEN_RE = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>\d+(?:\.\d+)?)|(?P<id>[A-Za-z_][A-Za-z0-9_]*)'
    r"|(?P<op>==|!=|<>|>=|<=|&&|\|\||[=<>!(),.\-]))"
)
Getter = Callable[[Any], Any]


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise _QueryError(f"Syntax error at position {pos}")
        kind = m.lastgroup or "op"
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _order(op: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    try:
        if op == ">":
            return a > b
        if op == ">=":
            return a >= b
        if op == "<":
            return a < b
        return a <= b
    except TypeError:
        raise _QueryError(
            f"Operator '{op}' incompatible with operand types '{type(a).__name__}' and '{type(b).__name__}'"
        ) from None


_METHODS: dict[str, Callable[..., Any]] = {
    "contains": lambda s, x: s is not None and str(x) in s,
    "startswith": lambda s, x: s is not None and s.startswith(str(x)),
    "endswith": lambda s, x: s is not None and s.endswith(str(x)),
    "tolower": lambda s: s.lower() if isinstance(s, str) else s,
    "toupper": lambda s: s.upper() if isinstance(s, str) else s,
}


class _WhereParser:
    """Recursive descent over ``or := and ((OR | ||) and)*``, ``and := not ((AND | &&) not)*``, comparisons."""

    def __init__(self, text: str, fields: Mapping[str, Getter], entity: str) -> None:
        self.toks = _tokens(text)
        self.pos = 0
        self.fields = fields
        self.entity = entity

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def at(self, ahead: int) -> str | None:
        i = self.pos + ahead
        return self.toks[i][1] if i < len(self.toks) else None

    def kind_at(self, ahead: int) -> str | None:
        i = self.pos + ahead
        return self.toks[i][0] if i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _QueryError("Unexpected end of expression")
        self.pos += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.take()
        if tok[1] != value:
            raise _QueryError(f"'{value}' expected")

    def word(self, *words: str) -> bool:
        tok = self.peek()
        if tok is not None and (tok[1] in words or (tok[0] == "id" and tok[1].upper() in words)):
            self.pos += 1
            return True
        return False

    def parse(self) -> Getter:
        if not self.toks:
            return lambda obj: True
        expr = self.parse_or()
        if self.at(0) is not None:
            raise _QueryError(f"Syntax error near '{self.at(0)}'")
        return expr

    def parse_or(self) -> Getter:
        parts = [self.parse_and()]
        while self.word("OR", "||"):
            parts.append(self.parse_and())
        if len(parts) == 1:
            return parts[0]
        return lambda obj: any(bool(p(obj)) for p in parts)

    def parse_and(self) -> Getter:
        parts = [self.parse_not()]
        while self.word("AND", "&&"):
            parts.append(self.parse_not())
        if len(parts) == 1:
            return parts[0]
        return lambda obj: all(bool(p(obj)) for p in parts)

    def parse_not(self) -> Getter:
        if self.word("NOT", "!"):
            inner = self.parse_not()
            return lambda obj: not inner(obj)
        return self.parse_comparison()

    def parse_comparison(self) -> Getter:
        left = self.parse_operand()
        tok = self.peek()
        if tok is None or tok[1] not in ("==", "=", "!=", "<>", ">", ">=", "<", "<="):
            return left
        op = self.take()[1]
        right = self.parse_operand()
        if op in ("==", "="):
            return lambda obj: _eq(left(obj), right(obj))
        if op in ("!=", "<>"):
            return lambda obj: not _eq(left(obj), right(obj))
        return lambda obj: _order(op, left(obj), right(obj))

    def args(self) -> list[Getter]:
        self.expect("(")
        out: list[Getter] = []
        if self.at(0) == ")":
            self.take()
            return out
        while True:
            out.append(self.parse_or())
            tok = self.take()
            if tok[1] == ")":
                return out
            if tok[1] != ",":
                raise _QueryError("',' or ')' expected")

    def parse_operand(self) -> Getter:
        getter = self.parse_primary()
        while self.at(0) == ".":
            self.take()
            kind, name = self.take()
            if kind != "id":
                raise _QueryError("Identifier expected")
            method = _METHODS.get(name.lower())
            if method is None:
                raise _QueryError(f"No applicable method '{name}' exists")
            args = self.args()
            getter = self._method(getter, method, args)
        return getter

    @staticmethod
    def _method(target: Getter, method: Callable[..., Any], args: list[Getter]) -> Getter:
        return lambda obj: method(target(obj), *(a(obj) for a in args))

    def parse_primary(self) -> Getter:
        kind, value = self.take()
        if value == "(":
            inner = self.parse_or()
            self.expect(")")
            return inner
        if value == "-":
            kind, value = self.take()
            if kind != "num":
                raise _QueryError("Number expected after '-'")
            number = -(float(value) if "." in value else int(value))
            return lambda obj: number
        if kind == "str":
            text = re.sub(r"\\(.)", r"\1", value[1:-1])
            return lambda obj: text
        if kind == "num":
            number = float(value) if "." in value else int(value)
            return lambda obj: number
        if kind != "id":
            raise _QueryError(f"Syntax error near '{value}'")
        upper = value.upper()
        if upper in ("TRUE", "FALSE"):
            flag = upper == "TRUE"
            return lambda obj: flag
        if upper == "NULL":
            return lambda obj: None
        if self.at(0) == "(":
            return self._function(upper, self.args())
        path = [value]
        while self.at(0) == "." and self.kind_at(1) == "id" and self.at(2) != "(":
            self.take()
            path.append(self.take()[1])
        key = ".".join(path).lower()
        getter = self.fields.get(key)
        if getter is None:
            raise _QueryError(f"No property or field '{'.'.join(path)}' exists in type '{self.entity}'")
        return getter

    @staticmethod
    def _function(name: str, args: list[Getter]) -> Getter:
        try:
            values = [a(None) for a in args]
        except (AttributeError, TypeError, KeyError):
            raise _QueryError(f"{name.title()} expects constant arguments") from None
        if name == "DATETIME":
            if not 3 <= len(values) <= 6 or not all(isinstance(v, int) for v in values):
                raise _QueryError("DateTime expects 3 to 6 integer arguments")
            try:
                moment = datetime(*values, tzinfo=UTC)  # type: ignore[misc]
            except ValueError as err:
                raise _QueryError(str(err)) from None
            ms = int(moment.timestamp()) * 1000
            return lambda obj: ms
        if name == "GUID":
            if len(values) != 1 or not isinstance(values[0], str):
                raise _QueryError("Guid expects one string argument")
            try:
                guid = str(uuid.UUID(values[0]))
            except ValueError:
                raise _QueryError(f"'{values[0]}' is not a valid Guid") from None
            return lambda obj: guid
        raise _QueryError(f"No applicable method '{name}' exists")


_INVOICE_GETTERS: dict[str, Getter] = {
    "type": lambda i: i.type,
    "invoiceid": lambda i: i.id,
    "invoicenumber": lambda i: i.number,
    "reference": lambda i: i.reference,
    "status": lambda i: i.status,
    "date": lambda i: i.date,
    "duedate": lambda i: i.due,
    "updateddateutc": lambda i: i.updated,
    "fullypaidondate": lambda i: i.fully_paid_on,
    "currencycode": lambda i: i.currency,
    "currencyrate": lambda i: i.rate / 1_000_000,
    "subtotal": lambda i: _money(i.sub_total),
    "totaltax": lambda i: _money(i.total_tax),
    "total": lambda i: _money(i.total),
    "amountdue": lambda i: _money(i.amount_due),
    "amountpaid": lambda i: _money(i.paid),
    "amountcredited": lambda i: 0.0,
    "lineamounttypes": lambda i: i.line_amount_types,
    "senttocontact": lambda i: i.sent,
    "hasattachments": lambda i: False,
    "isdiscounted": lambda i: False,
    "contact.contactid": lambda i: i.contact_id,
}
_CONTACT_GETTERS: dict[str, Getter] = {
    "contactid": lambda c: c.id,
    "contactnumber": lambda c: c.number,
    "accountnumber": lambda c: c.account_number,
    "contactstatus": lambda c: c.status,
    "name": lambda c: c.name,
    "firstname": lambda c: c.first_name,
    "lastname": lambda c: c.last_name,
    "emailaddress": lambda c: c.email,
    "taxnumber": lambda c: c.tax_number,
    "defaultcurrency": lambda c: c.currency,
    "updateddateutc": lambda c: c.updated,
    "hasattachments": lambda c: False,
}


_CURRENCY_GETTERS: dict[str, Getter] = {"code": lambda c: c.code, "description": lambda c: c.description}


def _payment_getters(tenant: XeroTenant) -> dict[str, Getter]:
    invoices, contacts = tenant.invoices, tenant.contacts
    return {
        "paymentid": lambda p: p.id,
        "status": lambda p: p.status,
        "paymenttype": lambda p: "ACCRECPAYMENT" if invoices[p.invoice_id].type == "ACCREC" else "ACCPAYPAYMENT",
        "date": lambda p: p.date,
        "updateddateutc": lambda p: p.updated,
        "amount": lambda p: _money(p.amount),
        "reference": lambda p: p.reference,
        "currencyrate": lambda p: p.rate / 1_000_000,
        "isreconciled": lambda p: p.reconciled,
        "hasaccount": lambda p: True,
        "account.accountid": lambda p: tenant.bank_accounts[p.account][0],
        "account.code": lambda p: tenant.bank_accounts[p.account][1],
        "invoice.invoiceid": lambda p: p.invoice_id,
        "invoice.invoicenumber": lambda p: invoices[p.invoice_id].number,
        "invoice.type": lambda p: invoices[p.invoice_id].type,
        "invoice.currencycode": lambda p: invoices[p.invoice_id].currency,
        "invoice.contact.contactid": lambda p: invoices[p.invoice_id].contact_id,
        "invoice.contact.name": lambda p: contacts[invoices[p.invoice_id].contact_id].name,
    }


def _getters(entity: str, tenant: XeroTenant | None) -> dict[str, Getter]:
    if entity == "Currency":
        return dict(_CURRENCY_GETTERS)
    if entity == "Payment":
        if tenant is None:
            raise ValueError("payment filters need the organisation")
        return _payment_getters(tenant)
    if entity == "Invoice":
        fields = dict(_INVOICE_GETTERS)
        if tenant is not None:
            contacts = tenant.contacts
            fields["contact.name"] = lambda i: contacts[i.contact_id].name
            fields["contact.contactnumber"] = lambda i: contacts[i.contact_id].number
        return fields
    fields = dict(_CONTACT_GETTERS)
    if tenant is not None:
        customers, suppliers = tenant.roles()
        fields["iscustomer"] = lambda c: c.id in customers
        fields["issupplier"] = lambda c: c.id in suppliers
    return fields


def parse_where(text: str, entity: str = "Invoice", tenant: XeroTenant | None = None) -> Callable[[Any], bool]:
    """Compile a Xero ``where`` (``Type=="ACCREC" AND UpdatedDateUTC>=DateTime(2024,01,31,00,00,00)``)."""
    getter = _WhereParser(text, _getters(entity, tenant), entity).parse()
    return lambda obj: bool(getter(obj))


def _parse_order(text: str, fields: Mapping[str, Getter], entity: str) -> list[tuple[Getter, bool]]:
    keys: list[tuple[Getter, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1].upper() not in ("ASC", "DESC")):
            raise _QueryError(f"Syntax error in order '{part.strip()}'")
        getter = fields.get(words[0].lower())
        if getter is None:
            raise _QueryError(f"No property or field '{words[0]}' exists in type '{entity}'")
        keys.append((getter, len(words) == 2 and words[1].upper() == "DESC"))
    return keys


def _sort(items: list[Any], keys: list[tuple[Getter, bool]]) -> list[Any]:
    items.sort(key=lambda obj: obj.seq)
    for getter, desc in reversed(keys):
        items.sort(key=lambda obj, g=getter: (g(obj) is not None, g(obj)) if desc else (g(obj) is None, g(obj)),
                   reverse=desc)  # fmt: skip
    return items
