"""What NextCRM asks Xero to do, through the outbox (`core.outbox`): create and update contacts, create, update
and void invoices (sales invoices and bills).

Every write carries the outbox row's key as Xero's `Idempotency-Key`, so a retry after a timeout, a 5xx or a
crash gets Xero's first answer back instead of acting twice. Xero remembers a key for six minutes only; an
action retried later than that is first looked up where it can be: a new contact by its `ContactNumber` (the
CRM's, or one derived from the key, Xero's field for another system's id), a new invoice by the number the
CRM gave it, and a void by the invoice's status. What Xero answers is read back the way the sync reads it
(the list endpoint, paged) and goes into the mirror in the same run at its `UpdatedDateUTC`, so a later sync
of the unchanged record changes nothing.

Xero takes decimal amounts: unit amounts (up to four decimals, sent with `unitdp=4`) and quantities go as
exact JSON numbers. A grant without Xero's write scope (`accounting.invoices` or the older
`accounting.transactions` for invoices, `accounting.contacts` for contacts) is refused before anything is
sent: the connection is connected again to grant it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from nextcrm_pipelines.core.actions import ActionInvalid, ActionSpec, Amount, Currency, Mirrored, Payload, Sent
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.providers.xero.records import DELETED_INVOICE_STATUSES, updated_at

INVOICE_WRITE_SCOPES = ("accounting.invoices", "accounting.transactions")
CONTACT_WRITE_SCOPES = ("accounting.contacts",)
# The prefix of the ContactNumber an action gives a new contact when the CRM gives none.
REFERENCE_PREFIX = "nextcrm-"


def _no_float(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError('give quantities as decimal strings ("2.5"), not as floating-point numbers')
    return value


Guid = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
# Xero keeps quantities and (with unitdp=4) unit amounts to four decimals.
Quantity = Annotated[Decimal, BeforeValidator(_no_float), Field(gt=0, allow_inf_nan=False, decimal_places=4)]
UnitAmount = Annotated[Amount, Field(decimal_places=4)]
Email = Annotated[str, Field(max_length=255, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]
# Xero searches ContactNumber and InvoiceNumber in `where` and `InvoiceNumbers`: no quotes, backslashes or commas.
Reference = Annotated[str, Field(min_length=1, max_length=50, pattern=r'^[^"\\,]+$')]


class Phone(Payload):
    """One of Xero's four phone slots."""

    type: Literal["DEFAULT", "MOBILE", "DDI", "FAX"] = "DEFAULT"
    number: str = Field(min_length=1, max_length=50)
    area_code: str | None = Field(default=None, max_length=10)
    country_code: str | None = Field(default=None, max_length=20)


class Address(Payload):
    """One of Xero's two address slots (POBOX is the postal address, STREET the physical one)."""

    type: Literal["POBOX", "STREET"] = "POBOX"
    line1: str | None = Field(default=None, max_length=500)
    line2: str | None = Field(default=None, max_length=500)
    line3: str | None = Field(default=None, max_length=500)
    line4: str | None = Field(default=None, max_length=500)
    city: str | None = Field(default=None, max_length=255)
    region: str | None = Field(default=None, max_length=255)
    postal_code: str | None = Field(default=None, max_length=50)
    country: str | None = Field(default=None, max_length=50)
    attention_to: str | None = Field(default=None, max_length=255)


def _one_per_type(items: list[Any], what: str) -> None:
    kinds = [item.type for item in items]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"Xero keeps one {what} of each type")


class _ContactFields(Payload):
    first_name: str | None = Field(default=None, max_length=255)
    last_name: str | None = Field(default=None, max_length=255)
    email: Email | None = None
    phones: list[Phone] = Field(default_factory=list, max_length=4)
    addresses: list[Address] = Field(default_factory=list, max_length=2)
    account_number: str | None = Field(default=None, max_length=50)
    tax_number: str | None = Field(default=None, max_length=50)
    default_currency: Currency | None = None

    @model_validator(mode="after")
    def _slots(self) -> _ContactFields:
        _one_per_type(self.phones, "phone")
        _one_per_type(self.addresses, "address")
        return self


class CreateContact(_ContactFields):
    """A new contact. Xero wants a name no active contact has; `contact_number` is the CRM's id for it (by
    default one derived from the action's key)."""

    name: str = Field(min_length=1, max_length=255)
    contact_number: Reference | None = None


class UpdateContact(_ContactFields):
    """Change a contact: only the fields given; `status` ARCHIVED archives it (Xero then refuses every edit)."""

    contact_id: Guid
    name: str | None = Field(default=None, min_length=1, max_length=255)
    contact_number: Reference | None = None
    status: Literal["ACTIVE", "ARCHIVED"] | None = None

    @model_validator(mode="after")
    def _something(self) -> UpdateContact:
        if not self.model_fields_set - {"contact_id"}:
            raise ValueError("give at least one field to change")
        return self


class LineItem(Payload):
    """An invoice line: `quantity` x `unit_amount` (in the invoice's currency), booked to `account_code`."""

    description: str = Field(min_length=1, max_length=4000)
    quantity: Quantity = Decimal(1)
    unit_amount: UnitAmount
    account_code: str | None = Field(default=None, max_length=10, pattern=r"^[A-Za-z0-9.\-]+$")
    tax_type: str | None = Field(default=None, max_length=50, pattern=r"^[A-Z0-9]+$")
    item_code: str | None = Field(default=None, max_length=30)


class _InvoiceFields(Payload):
    date: dt.date | None = None
    due_date: dt.date | None = None
    reference: str | None = Field(default=None, max_length=255)
    invoice_number: Reference | None = None
    line_amount_types: Literal["Exclusive", "Inclusive", "NoTax"] | None = None

    @model_validator(mode="after")
    def _dates(self) -> _InvoiceFields:
        if self.date and self.due_date and self.due_date < self.date:
            raise ValueError("due_date is before date")
        return self


class CreateInvoice(_InvoiceFields):
    """A sales invoice (ACCREC) or bill (ACCPAY) for a contact, DRAFT unless approved (AUTHORISED) or submitted
    for approval; in `currency` (by default the contact's, or the organisation's)."""

    type: Literal["ACCREC", "ACCPAY"] = "ACCREC"
    contact_id: Guid
    line_items: list[LineItem] = Field(min_length=1, max_length=200)
    currency: Currency | None = None
    status: Literal["DRAFT", "SUBMITTED", "AUTHORISED"] = "DRAFT"


class UpdateInvoice(_InvoiceFields):
    """Change a draft, submitted or approved (unpaid) invoice: only the fields given; `line_items` replace its
    lines; `status` SUBMITTED or AUTHORISED submits or approves it."""

    invoice_id: Guid
    contact_id: Guid | None = None
    line_items: list[LineItem] | None = Field(default=None, min_length=1, max_length=200)
    status: Literal["DRAFT", "SUBMITTED", "AUTHORISED"] | None = None

    @model_validator(mode="after")
    def _something(self) -> UpdateInvoice:
        if not self.model_fields_set - {"invoice_id"}:
            raise ValueError("give at least one field to change")
        return self


class VoidInvoice(Payload):
    """Void an approved invoice (Xero deletes a draft or submitted one instead); one with payments is refused."""

    invoice_id: Guid


def reference_of(key: str) -> str:
    """The ContactNumber a new contact gets from the action's idempotency key when the CRM gives none."""
    return REFERENCE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:24]


def _need_scope(api: Any, action: str, any_of: tuple[str, ...]) -> None:
    if api.lacks_scope(any_of):
        raise ActionInvalid(f"{action}: the connection's Xero grant lacks the scope {' or '.join(any_of)}; "
                            "connect it again (`nextcrm-pipelines connect xero`) to grant it, then "
                            "`nextcrm-pipelines actions retry`: nothing was sent")  # fmt: skip


def _set(element: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        element[key] = value


def _contact_element(payload: _ContactFields) -> dict[str, Any]:
    element: dict[str, Any] = {}
    fields = payload.model_fields_set
    for name, key in (("first_name", "FirstName"), ("last_name", "LastName"), ("email", "EmailAddress"),
                      ("account_number", "AccountNumber"), ("tax_number", "TaxNumber")):  # fmt: skip
        if name in fields:
            element[key] = getattr(payload, name) or ""
    if payload.default_currency:
        element["DefaultCurrency"] = payload.default_currency.upper()
    if payload.phones:
        element["Phones"] = [
            {"PhoneType": p.type, "PhoneNumber": p.number, "PhoneAreaCode": p.area_code or "",
             "PhoneCountryCode": p.country_code or ""} for p in payload.phones
        ]  # fmt: skip
    if payload.addresses:
        keys = (("line1", "AddressLine1"), ("line2", "AddressLine2"), ("line3", "AddressLine3"),
                ("line4", "AddressLine4"), ("city", "City"), ("region", "Region"), ("postal_code", "PostalCode"),
                ("country", "Country"), ("attention_to", "AttentionTo"))  # fmt: skip
        element["Addresses"] = [
            {"AddressType": a.type, **{key: getattr(a, name) for name, key in keys if getattr(a, name) is not None}}
            for a in payload.addresses
        ]
    return element


# A contact's fields that are personal data (Xero repeats a refused name in its message).
PERSONAL_FIELDS = ("name", "first_name", "last_name", "email", "phones", "addresses", "account_number", "tax_number")


def _personal(payload: Payload) -> list[str]:
    """The payload's personal data, to keep out of error messages (ids stay: they say which record)."""
    out: list[str] = []
    dumped = payload.model_dump()
    for value in (dumped.get(name) for name in PERSONAL_FIELDS):
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                out += [str(v) for v in item.values() if isinstance(v, str)]
            elif isinstance(item, str):
                out.append(item)
    return out


def _line_element(line: LineItem) -> dict[str, Any]:
    element: dict[str, Any] = {"Description": line.description, "Quantity": line.quantity,
                               "UnitAmount": line.unit_amount}  # fmt: skip
    _set(element, "AccountCode", line.account_code)
    _set(element, "TaxType", line.tax_type)
    _set(element, "ItemCode", line.item_code)
    return element


def _invoice_element(payload: CreateInvoice | UpdateInvoice) -> dict[str, Any]:
    element: dict[str, Any] = {}
    fields = payload.model_fields_set
    if payload.date:
        element["Date"] = payload.date.isoformat()
    if payload.due_date:
        element["DueDate"] = payload.due_date.isoformat()
    if "reference" in fields:
        element["Reference"] = payload.reference or ""
    _set(element, "InvoiceNumber", payload.invoice_number)
    _set(element, "LineAmountTypes", payload.line_amount_types)
    if payload.contact_id:
        element["Contact"] = {"ContactID": payload.contact_id}
    if payload.line_items:
        element["LineItems"] = [_line_element(line) for line in payload.line_items]
    _set(element, "Status", payload.status)
    return element


def _contact_sent(api: Any, written: dict[str, Any]) -> Sent:
    """The written contact, read back as the sync reads it, for the mirror."""
    contact_id = written["ContactID"]
    (raw,) = api.contacts_by_id([contact_id]) or (written,)
    return Sent(written, contact_id, (Mirrored("xero_contacts", raw, updated_at(raw)),))


def _invoice_sent(api: Any, written: dict[str, Any]) -> Sent:
    """The written invoice, read back as the sync reads it (paged: with its lines), for the mirror."""
    invoice_id = written["InvoiceID"]
    (raw,) = api.invoices_by_id([invoice_id]) or (written,)
    return Sent(written, invoice_id, (Mirrored("xero_invoices", raw, updated_at(raw)),))


def create_contact(api: Any, payload: CreateContact, key: str) -> Sent:
    _need_scope(api, "create_contact", CONTACT_WRITE_SCOPES)
    element = {"Name": payload.name, "ContactNumber": payload.contact_number or reference_of(key),
               **_contact_element(payload)}  # fmt: skip
    written = api.write("PUT", "Contacts", [element], key, personal=_personal(payload))
    return _contact_sent(api, written)


def find_contact(api: Any, payload: CreateContact, key: str) -> Sent | None:
    """The contact an earlier attempt made, by its ContactNumber (the key's reference unless the CRM gave one)."""
    number = payload.contact_number or reference_of(key)
    found = [c for c in api.contacts_where(f'ContactNumber=="{number}"') if c.get("ContactNumber") == number]
    if not found:
        return None
    return Sent(found[0], found[0]["ContactID"], (Mirrored("xero_contacts", found[0], updated_at(found[0])),))


def update_contact(api: Any, payload: UpdateContact, key: str) -> Sent:
    _need_scope(api, "update_contact", CONTACT_WRITE_SCOPES)
    element: dict[str, Any] = {"ContactID": payload.contact_id, **_contact_element(payload)}
    _set(element, "Name", payload.name)
    _set(element, "ContactNumber", payload.contact_number)
    _set(element, "ContactStatus", payload.status)
    try:
        written = api.write("POST", "Contacts", [element], key, record_id=payload.contact_id,
                            personal=_personal(payload))  # fmt: skip
    except ProviderError as exc:
        # Xero refuses every edit of an archived contact, an archive included: one an earlier attempt archived
        # (after Xero forgot its key) is done.
        if payload.status != "ARCHIVED" or exc.status != 400 or "archived contact" not in str(exc):
            raise
        current = api.contacts_by_id([payload.contact_id])
        if not current or current[0].get("ContactStatus") != "ARCHIVED":
            raise
        written = current[0]
    return _contact_sent(api, written)


def create_invoice(api: Any, payload: CreateInvoice, key: str) -> Sent:
    _need_scope(api, "create_invoice", INVOICE_WRITE_SCOPES)
    element = {"Type": payload.type, **_invoice_element(payload)}
    if payload.currency:
        element["CurrencyCode"] = payload.currency.upper()
    written = api.write("PUT", "Invoices", [element], key, params={"unitdp": "4"})
    return _invoice_sent(api, written)


def find_invoice(api: Any, payload: CreateInvoice, key: str) -> Sent | None:
    """The invoice an earlier attempt made, by the number the CRM gave it (of the same type and contact)."""
    if not payload.invoice_number:
        return None
    for raw in api.invoices_numbered(payload.invoice_number):
        contact = (raw.get("Contact") or {}).get("ContactID", "")
        if (raw.get("InvoiceNumber") == payload.invoice_number and raw.get("Type") == payload.type
                and contact.lower() == payload.contact_id.lower() and raw.get("Status") != "DELETED"):  # fmt: skip
            return Sent(raw, raw["InvoiceID"], (Mirrored("xero_invoices", raw, updated_at(raw)),))
    return None


def update_invoice(api: Any, payload: UpdateInvoice, key: str) -> Sent:
    _need_scope(api, "update_invoice", INVOICE_WRITE_SCOPES)
    element = {"InvoiceID": payload.invoice_id, **_invoice_element(payload)}
    written = api.write("POST", "Invoices", [element], key, record_id=payload.invoice_id, params={"unitdp": "4"})
    return _invoice_sent(api, written)


def void_invoice(api: Any, payload: VoidInvoice, key: str) -> Sent:
    """Void an approved invoice, delete a draft or submitted one; one already voided or deleted is left as it is
    (an earlier attempt may have done it)."""
    _need_scope(api, "void_invoice", INVOICE_WRITE_SCOPES)
    current = api.invoices_by_id([payload.invoice_id])
    if not current:
        raise ProviderError(f"Xero knows no invoice {payload.invoice_id}", provider="xero",
                            connection_id=api.http.connection_id, endpoint="GET /Invoices", status=404)  # fmt: skip
    (raw,) = current
    if raw.get("Status") in DELETED_INVOICE_STATUSES:
        return Sent(raw, raw["InvoiceID"], (Mirrored("xero_invoices", raw, updated_at(raw)),))
    status = "DELETED" if raw.get("Status") in ("DRAFT", "SUBMITTED") else "VOIDED"
    written = api.write("POST", "Invoices", [{"InvoiceID": payload.invoice_id, "Status": status}], key,
                        record_id=payload.invoice_id)  # fmt: skip
    return _invoice_sent(api, written)


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_contact", CreateContact, create_contact, "Create a contact.", find=find_contact,
                   entities=("xero_contacts",)),
        ActionSpec("update_contact", UpdateContact, update_contact, "Change or archive a contact.",
                   entities=("xero_contacts",)),
        ActionSpec("create_invoice", CreateInvoice, create_invoice, "Create a sales invoice or a bill.",
                   find=find_invoice, entities=("xero_invoices",)),
        ActionSpec("update_invoice", UpdateInvoice, update_invoice, "Change, submit or approve an invoice.",
                   entities=("xero_invoices",)),
        ActionSpec("void_invoice", VoidInvoice, void_invoice, "Void an invoice (delete a draft).",
                   entities=("xero_invoices",)),
    )
}  # fmt: skip
