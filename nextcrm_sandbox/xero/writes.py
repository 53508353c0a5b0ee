"""Writing to a Xero organisation: ``PUT``/``POST /Contacts``, ``POST /Contacts/{id}``, ``PUT``/``POST /Invoices``
and ``POST /Invoices/{id}``, as the Accounting API answers them.

A request body is ``{"Contacts": [...]}`` or ``{"Invoices": [...]}`` (the key in any case), its numbers read
exactly (``Quantity`` and ``UnitAmount`` to four decimals, ``UnitAmount`` to two unless ``unitdp=4``). ``PUT``
creates; ``POST`` updates the element that names a ``ContactID``/``InvoiceID`` (or a sales invoice's
``InvoiceNumber``) and creates the others; the path's id names the element on ``POST .../{id}``. An id the
organisation never issued, as the element's own or as an invoice's ``Contact.ContactID``, makes the whole
request Xero's plain 404. What Xero refuses comes back per element, the element echoed with
``ValidationErrors`` (a refused create carrying the all-zero id): with ``summarizeErrors`` (the default) as one
400 ``ValidationException`` and nothing written, with ``summarizeErrors=false`` as a 200 mixing written and
refused elements. The refusals reproduced: a contact name already held by an active contact (case-insensitive),
any edit of an archived contact, an invalid email address, a sales invoice number already used, a currency
the organisation has not enabled, an account code or tax type it does not have, an invoice without a contact,
deleting an approved invoice or voiding a draft, any change to a paid, voided or deleted invoice, and edits
of an invoice with payments (voiding it included).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from nextcrm_sandbox.xero.data import (
    _MSDATE_RE,
    _PURCHASE_ACCOUNTS,
    _RATES,
    _SALES_ACCOUNT,
    _TAX,
    XeroTenant,
    _Contact,
    _Invoice,
    _Line,
    _midnight,
    _Settings,
)
from nextcrm_sandbox.xero.query import _Renderer, _View, currencies_of
from nextcrm_sandbox.xero.webhooks import Change

ZERO_ID = "00000000-0000-0000-0000-000000000000"
# The resources the API writes, with their envelope key and id field.
WRITABLE = {"contacts": ("Contacts", "ContactID"), "invoices": ("Invoices", "InvoiceID")}
# The demo organisation's chart of accounts: the codes a line item may name.
_ACCOUNT_CODES = frozenset(
    {"200", "260", "270", "400", "404", "408", "412", "416", "420", "425", "429", "433", "437", "441", "445", "449",
     "453", "461", "469", "473", "477", "485", "489", "493", "497", "505"}
)  # fmt: skip
_LINE_AMOUNT_TYPES = {"exclusive": "Exclusive", "inclusive": "Inclusive", "notax": "NoTax"}
_CREATE_STATUSES = ("DRAFT", "SUBMITTED", "AUTHORISED")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NAME_TAKEN = (
    "The contact name {name} is already assigned to another contact. The contact name must be unique across all "
    "active contacts."
)
_ARCHIVED = (
    "The specified contact details matched an archived contact. Archived contacts cannot currently be edited via "
    "the API."
)
_NOT_MODIFIABLE = "Invoice not of valid status for modification"
_HAS_PAYMENTS = "This document cannot be edited as it has a payment or credit note allocated to it."
_NO_CONTACT = (
    "The Contact must contain at least 1 of the following elements to identify the contact: Name, ContactID, "
    "ContactNumber"
)


class BadBody(Exception):
    """A body Xero cannot read: 400 ``PostDataInvalidException``."""


class _Unknown(Exception):
    """An id the organisation never issued: the whole request is Xero's plain 404."""


@dataclass
class Written:
    """What a write request did: its status, the elements it answers (None: the plain 404) and the changes
    the webhooks report."""

    status: int
    elements: list[dict[str, Any]] | None
    changes: list[Change] = field(default_factory=list)


def _plain(value: Any) -> Any:
    """An echoed element with its exact numbers as JSON numbers."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _text(element: Mapping[str, Any], key: str) -> str | None:
    value = element.get(key)
    if value is None:
        return None
    return str(value).strip()


def _day(value: Any, name: str) -> int:
    """A date field (``2026-01-31``, an ISO date-time or ``/Date(ms)/``) as the midnight it names, in ms."""
    if isinstance(value, str):
        match = _MSDATE_RE.match(value)
        if match:
            return _midnight(int(match.group(1)))
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return _midnight(int(moment.timestamp() * 1000))
    raise ValueError(f"{name} is not a valid date")


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number")
    try:
        number = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ValueError(f"{name} must be a number") from None
    if not number.is_finite():
        raise ValueError(f"{name} must be a number")
    return number


def _ten_thousandths(number: Decimal, places: int) -> int:
    """``number`` rounded half up to ``places`` decimals, in ten-thousandths."""
    rounded = number.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return int(rounded.scaleb(4))


class XeroWriter:
    """Applies one write request to an organisation (see the module)."""

    def __init__(self, tenant: XeroTenant, settings: _Settings, now_ms: int) -> None:
        self.tenant = tenant
        self.renderer = _Renderer(tenant, settings)
        self.now_ms = now_ms
        self.changes: list[Change] = []

    def _stamp(self, previous: int = 0) -> int:
        """A write's ``UpdatedDateUTC``: now, and always after the record's previous one."""
        return max(self.now_ms, previous + 1)

    # --- the request ------------------------------------------------------------------------------------

    def write(self, resource: str, method: str, rid: str | None, body: Any, params: Mapping[str, str]) -> Written:
        """Apply ``body`` (parsed, numbers as ``Decimal``) to ``resource``; raises ``BadBody``."""
        key, id_field = WRITABLE[resource]
        elements = self._elements(body, key, id_field, rid)
        summarize = params.get("summarizeerrors", "true").lower() != "false"
        unitdp4 = params.get("unitdp") == "4"
        check: Callable[[dict[str, Any], str], tuple[list[str], Any]]
        apply: Callable[[dict[str, Any], Any], dict[str, Any]]
        if resource == "contacts":
            check, apply = self._check_contact, self._apply_contact
        else:
            check = lambda element, how: self._check_invoice(element, how, unitdp4)  # noqa: E731
            apply = lambda element, plan: self._apply_invoice(element, plan, unitdp4)  # noqa: E731
        try:
            checked = [(element, *check(element, method)) for element in elements]
        except _Unknown:
            return Written(404, None)
        refused = any(errors for _, errors, _ in checked)
        if refused and summarize:
            return Written(400, [self._refusal(e, errors, id_field, plan) if errors else self._echo(e)
                                 for e, errors, plan in checked])  # fmt: skip
        out = [self._refusal(e, errors, id_field, plan) if errors else apply(e, plan) for e, errors, plan in checked]
        if not summarize:
            for element in out:
                element.setdefault("StatusAttributeString", "OK")
        return Written(200, out, self.changes)

    @staticmethod
    def _elements(body: Any, key: str, id_field: str, rid: str | None) -> list[dict[str, Any]]:
        if not isinstance(body, Mapping):
            raise BadBody("Invalid Json data")
        found = next((value for name, value in body.items() if str(name).lower() == key.lower()), None)
        if found is None:
            found = [body] if body else None  # one element sent without the envelope
        if not isinstance(found, list) or not found or not all(isinstance(e, Mapping) for e in found):
            raise BadBody(f"No {key} were found in the request body")
        elements = [dict(e) for e in found]
        if rid is not None:
            for element in elements:
                sent = _text(element, id_field)
                if sent and sent.lower() != rid.lower():
                    raise _Unknown
                element[id_field] = rid
        return elements

    @staticmethod
    def _echo(element: Mapping[str, Any]) -> dict[str, Any]:
        return _plain(element)

    @staticmethod
    def _refusal(element: Mapping[str, Any], errors: list[str], id_field: str, plan: Any) -> dict[str, Any]:
        existing = getattr(plan, "id", None) if plan is not None else None
        out = {**_plain(element), id_field: existing or ZERO_ID}
        if id_field == "InvoiceID":
            out["HasErrors"] = True
        out["HasValidationErrors"] = True
        out["StatusAttributeString"] = "ERROR"
        out["ValidationErrors"] = [{"Message": message} for message in errors]
        return out

    # --- contacts ---------------------------------------------------------------------------------------

    def _check_contact(self, element: dict[str, Any], method: str) -> tuple[list[str], _Contact | None]:
        tenant = self.tenant
        cid = _text(element, "ContactID")
        existing = tenant.contacts.get(cid.lower()) if cid else None
        if cid and existing is None:
            raise _Unknown
        errors: list[str] = []
        if existing is not None and existing.status == "ARCHIVED":
            return [_ARCHIVED], existing
        name = _text(element, "Name")
        if existing is None and not name:
            errors.append("The contact name must be specified.")
        if name and self._name_taken(name, existing):
            errors.append(_NAME_TAKEN.format(name=name))
        email = _text(element, "EmailAddress")
        if email and not _EMAIL.match(email):
            errors.append("Email address must be valid.")
        status = _text(element, "ContactStatus")
        if status is not None and status.upper() not in ("ACTIVE", "ARCHIVED"):
            errors.append(f"The contact status {status} is not valid.")
        currency = _text(element, "DefaultCurrency")
        if currency and currency.upper() not in {c.code for c in currencies_of(tenant)}:
            errors.append(f"Organisation is not subscribed to currency {currency.upper()}")
        return errors, existing

    def _name_taken(self, name: str, existing: _Contact | None) -> bool:
        folded = name.casefold()
        return any(c.name.casefold() == folded and c.status == "ACTIVE" and c is not existing
                   for c in self.tenant.contacts.values())  # fmt: skip

    def _new_contact(self, name: str) -> _Contact:
        tenant = self.tenant
        at = self._stamp()
        contact = _Contact(
            seq=len(tenant.contacts) + len(tenant.purged_contacts),
            id=str(uuid.uuid4()),
            name=name,
            first_name="",
            last_name="",
            email="",
            status="ACTIVE",
            currency=tenant.base_currency,
            created=at,
            updated=at,
            addresses=[{"AddressType": kind, "City": "", "Region": "", "PostalCode": "", "Country": "",
                        "AttentionTo": ""} for kind in ("STREET", "POBOX")],
            phones=[{"PhoneType": kind, "PhoneNumber": "", "PhoneAreaCode": "", "PhoneCountryCode": ""}
                    for kind in ("DEFAULT", "DDI", "FAX", "MOBILE")],
        )  # fmt: skip
        tenant.contacts[contact.id] = contact
        tenant.contact_list.append(contact)
        tenant.names.add(name)
        self.changes.append(Change("CONTACT", contact.id, "CREATE", at))
        return contact

    def _apply_contact(self, element: dict[str, Any], existing: _Contact | None) -> dict[str, Any]:
        tenant = self.tenant
        contact = existing if existing is not None else self._new_contact(str(_text(element, "Name")))
        if existing is not None:
            contact.updated = self._stamp(contact.updated)
            self.changes.append(Change("CONTACT", contact.id, "UPDATE", contact.updated))
        name = _text(element, "Name")
        if name and name != contact.name:
            tenant.names.discard(contact.name)
            contact.name = name
            tenant.names.add(name)
        for key, attr in (("FirstName", "first_name"), ("LastName", "last_name"), ("EmailAddress", "email"),
                          ("TaxNumber", "tax_number")):  # fmt: skip
            if key in element:
                setattr(contact, attr, _text(element, key) or "")
        for key, attr in (("AccountNumber", "account_number"),):
            if key in element:
                setattr(contact, attr, _text(element, key) or None)
        if "ContactNumber" in element:
            if contact.number:
                tenant.contact_by_number.pop(contact.number.lower(), None)
            contact.number = _text(element, "ContactNumber") or None
            if contact.number:
                tenant.contact_by_number[contact.number.lower()] = contact.id
        if _text(element, "DefaultCurrency"):
            contact.currency = str(_text(element, "DefaultCurrency")).upper()
        if _text(element, "ContactStatus"):
            contact.status = str(_text(element, "ContactStatus")).upper()
        for key, kind, slots in (("Phones", "PhoneType", contact.phones), ("Addresses", "AddressType",
                                                                            contact.addresses)):  # fmt: skip
            for sent in element.get(key) or []:
                if not isinstance(sent, Mapping):
                    continue
                values = {str(k): "" if v is None else str(v) for k, v in sent.items() if k != "ValidationErrors"}
                slot = next((s for s in slots if s.get(kind) == values.get(kind)), None)
                if slot is None:
                    slots.append(values)
                else:
                    slot.update(values)
        view = _View(True, False, balances=tenant.balances(self.now_ms), roles=tenant.roles())
        return self.renderer.contact(contact, view)

    # --- invoices ---------------------------------------------------------------------------------------

    def _check_invoice(self, element: dict[str, Any], method: str, unitdp4: bool) -> tuple[list[str], Any]:
        tenant = self.tenant
        iid = _text(element, "InvoiceID")
        existing = tenant.invoices.get(iid.lower()) if iid else None
        if iid and existing is None:
            raise _Unknown
        number = _text(element, "InvoiceNumber")
        inv_type = (_text(element, "Type") or (existing.type if existing else "")).upper()
        if existing is None and method == "POST" and number and inv_type == "ACCREC":
            found = tenant.by_number.get(number.lower())
            candidate = tenant.invoices.get(found) if found else None
            if candidate is not None and candidate.type == "ACCREC":
                existing = candidate  # POST updates a sales invoice named by its number
        contact = element.get("Contact")
        named = _text(contact, "ContactID") if isinstance(contact, Mapping) else None
        if named and named.lower() not in tenant.contacts:
            raise _Unknown
        errors: list[str] = []
        if existing is None:
            errors += self._creatable(element, inv_type, number)
        else:
            errors += self._modifiable(existing, element)
            if number and number.lower() != existing.number.lower() and existing.type == "ACCREC":
                taken = tenant.by_number.get(number.lower())
                if taken and taken != existing.id:
                    errors.append("Invoice # must be unique.")
        currency = _text(element, "CurrencyCode")
        if currency and currency.upper() not in {c.code for c in currencies_of(tenant)}:
            errors.append(f"Organisation is not subscribed to currency {currency.upper()}")
        lat = _text(element, "LineAmountTypes")
        if lat is not None and lat.lower() not in _LINE_AMOUNT_TYPES:
            errors.append(f"LineAmountTypes {lat} is not valid.")
        for name in ("Date", "DueDate"):
            if element.get(name) not in (None, ""):
                try:
                    _day(element[name], name)
                except ValueError as exc:
                    errors.append(str(exc))
        lines = element.get("LineItems")
        if lines is not None:
            if not isinstance(lines, list) or not all(isinstance(line, Mapping) for line in lines):
                errors.append("LineItems must be a list of line items.")
            else:
                for line in lines:
                    errors += self._line_errors(line, inv_type or "ACCREC")
        return errors, existing

    def _creatable(self, element: Mapping[str, Any], inv_type: str, number: str | None) -> list[str]:
        errors = []
        if inv_type not in ("ACCREC", "ACCPAY"):
            errors.append("Invoice Type must be ACCREC or ACCPAY." if inv_type else "Invoice Type must be specified.")
        contact = element.get("Contact")
        keys = [k for k in ("ContactID", "Name", "ContactNumber") if isinstance(contact, Mapping) and _text(contact, k)]
        if not keys:
            errors.append(_NO_CONTACT)
        by_number = str(_text(contact, "ContactNumber")).lower() if keys == ["ContactNumber"] else None
        if by_number is not None and by_number not in self.tenant.contact_by_number:
            raise _Unknown
        status = (_text(element, "Status") or "DRAFT").upper()
        if status not in _CREATE_STATUSES:
            errors.append(f"Invoice status {status} is not valid for a new invoice.")
        if inv_type == "ACCREC" and number and number.lower() in self.tenant.by_number:
            errors.append("Invoice # must be unique.")
        return errors

    def _modifiable(self, inv: _Invoice, element: Mapping[str, Any]) -> list[str]:
        status = (_text(element, "Status") or inv.status).upper()
        if inv.status in ("PAID", "VOIDED", "DELETED"):
            return [_NOT_MODIFIABLE]
        edits = status == "VOIDED" or set(element) & {"LineItems", "Contact", "CurrencyCode", "LineAmountTypes"}
        if (inv.payments or inv.paid) and edits:
            return [_HAS_PAYMENTS]
        allowed = {"DRAFT": ("DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"),
                   "SUBMITTED": ("DRAFT", "SUBMITTED", "AUTHORISED", "DELETED"),
                   "AUTHORISED": ("AUTHORISED", "VOIDED")}[inv.status]  # fmt: skip
        if status not in allowed:
            return [_NOT_MODIFIABLE]
        return []

    def _line_errors(self, line: Mapping[str, Any], inv_type: str) -> list[str]:
        errors = []
        for name in ("Quantity", "UnitAmount"):
            if line.get(name) is not None:
                try:
                    _decimal(line[name], name)
                except ValueError as exc:
                    errors.append(str(exc))
        code = _text(line, "AccountCode")
        if code and code not in _ACCOUNT_CODES:
            errors.append(f"Account code '{code}' is not a valid code for this document.")
        tax = _text(line, "TaxType")
        sales, purchases, _ = _TAX[self.tenant.base_currency]
        if tax and tax.upper() not in ("NONE", sales if inv_type == "ACCREC" else purchases):
            errors.append(f"The TaxType code '{tax}' does not exist or cannot be used for this type of transaction.")
        return errors

    def _contact_of(self, sent: Mapping[str, Any]) -> _Contact:
        """The contact an invoice names: by id, number or name; a name Xero does not know makes a new contact."""
        tenant = self.tenant
        if _text(sent, "ContactID"):
            return tenant.contacts[str(_text(sent, "ContactID")).lower()]
        if _text(sent, "ContactNumber") and not _text(sent, "Name"):
            return tenant.contacts[tenant.contact_by_number[str(_text(sent, "ContactNumber")).lower()]]
        name = str(_text(sent, "Name"))
        folded = name.casefold()
        named = [c for c in tenant.contacts.values() if c.name.casefold() == folded]
        found = next((c for c in named if c.status == "ACTIVE"), named[0] if named else None)
        return found or self._new_contact(name)

    def _line(self, sent: Mapping[str, Any], inv: _Invoice, unitdp4: bool, old: Mapping[str, _Line]) -> _Line:
        sales, purchases, _ = _TAX[self.tenant.base_currency]
        default_tax = "NONE" if inv.line_amount_types == "NoTax" else sales if inv.type == "ACCREC" else purchases
        default_account = _SALES_ACCOUNT if inv.type == "ACCREC" else _PURCHASE_ACCOUNTS[0]
        line_id = _text(sent, "LineItemID")
        previous = old.get(line_id.lower()) if line_id else None
        quantity = sent.get("Quantity")
        unit = sent.get("UnitAmount")
        return _Line(
            id=previous.id if previous else str(uuid.uuid4()),
            description=_text(sent, "Description") or (previous.description if previous else ""),
            quantity=_ten_thousandths(_decimal(quantity, "Quantity"), 4) if quantity is not None
            else (previous.quantity if previous else 10000),
            unit=_ten_thousandths(_decimal(unit, "UnitAmount"), 4 if unitdp4 else 2) if unit is not None
            else (previous.unit if previous else 0),
            account_code=_text(sent, "AccountCode") or (previous.account_code if previous else default_account),
            tax_type=(_text(sent, "TaxType") or (previous.tax_type if previous else default_tax)).upper(),
            item_code=_text(sent, "ItemCode") or (previous.item_code if previous else None),
        )  # fmt: skip

    def _apply_invoice(self, element: dict[str, Any], existing: _Invoice | None, unitdp4: bool) -> dict[str, Any]:
        tenant = self.tenant
        if existing is None:
            inv = self._new_invoice(element)
        else:
            inv = existing
            inv.updated = self._stamp(inv.updated)
            self.changes.append(Change("INVOICE", inv.id, "UPDATE", inv.updated))
            if isinstance(element.get("Contact"), Mapping):
                inv.contact_id = self._contact_of(element["Contact"]).id
        number = _text(element, "InvoiceNumber")
        if existing is not None and number and number != inv.number:
            tenant.by_number.pop(inv.number.lower(), None)
            inv.number = number
            tenant.by_number[number.lower()] = inv.id
        if "Reference" in element:
            inv.reference = _text(element, "Reference") or ""
        if _text(element, "LineAmountTypes"):
            inv.line_amount_types = _LINE_AMOUNT_TYPES[str(_text(element, "LineAmountTypes")).lower()]
        if _text(element, "CurrencyCode"):
            inv.currency = str(_text(element, "CurrencyCode")).upper()
            inv.rate = self._rate(inv.currency)
        if element.get("CurrencyRate") not in (None, ""):
            inv.rate = int(_decimal(element["CurrencyRate"], "CurrencyRate").scaleb(6))
        if element.get("Date") not in (None, ""):
            inv.date = _day(element["Date"], "Date")
        if element.get("DueDate") not in (None, ""):
            inv.due = _day(element["DueDate"], "DueDate")
        elif existing is None:
            inv.due = inv.date
        if "SentToContact" in element:
            inv.sent = bool(element["SentToContact"])
        if isinstance(element.get("LineItems"), list):
            old = {line.id.lower(): line for line in inv.lines}
            inv.lines = [self._line(line, inv, unitdp4, old) for line in element["LineItems"]]
        if _text(element, "Status"):
            inv.status = str(_text(element, "Status")).upper()
        tenant._recompute(inv, inv.updated)
        view = _View(True, True, unitdp4=unitdp4, roles=tenant.roles())
        return self.renderer.invoice(inv, view)

    def _rate(self, currency: str) -> int:
        base = self.tenant.base_currency
        if currency == base:
            return 1_000_000
        return int(_RATES.get(currency, 1.0) / _RATES.get(base, 1.0) * 1_000_000)

    def _new_invoice(self, element: Mapping[str, Any]) -> _Invoice:
        tenant = self.tenant
        inv_type = str(_text(element, "Type")).upper()
        contact = self._contact_of(element["Contact"])
        number = _text(element, "InvoiceNumber") or ""
        if not number and inv_type == "ACCREC":
            while True:
                number = f"INV-{tenant.next_invoice_number:05d}"
                tenant.next_invoice_number += 1
                if number.lower() not in tenant.by_number:
                    break
        enabled = {c.code for c in currencies_of(tenant)}
        currency = contact.currency if contact.currency in enabled else tenant.base_currency
        at = self._stamp()
        inv = _Invoice(
            seq=len(tenant.invoices) + len(tenant.purged_invoices),
            id=str(uuid.uuid4()),
            type=inv_type,
            number=number,
            reference="",
            contact_id=contact.id,
            date=_midnight(self.now_ms),
            due=_midnight(self.now_ms),
            status="DRAFT",
            line_amount_types="Exclusive",
            lines=[],
            currency=currency,
            rate=self._rate(currency),
            created=at,
            updated=at,
        )
        tenant.invoices[inv.id] = inv
        if number:
            tenant.by_number.setdefault(number.lower(), inv.id)
        self.changes.append(Change("INVOICE", inv.id, "CREATE", at))
        return inv
