"""What NextCRM asks MYOB to do, through the outbox (`core.outbox`): create a customer card, create a service sale
invoice.

MYOB takes no idempotency key, so each write is POSTed once (`MyobApi.create`: never repeated when MYOB may have
acted) and carries a reference derived from the outbox row's key: a customer its card ID (`DisplayID`, 15
characters), an invoice its `Number` (13). Before an action whose outcome is unknown is sent again, `find` looks the
record up by that reference with an OData `$filter` and the outbox adopts it, so a retry after a timeout or a crash
never makes a second card or invoice. MYOB answers a create with `201 Created`, a `Location` and no body; the record
is read back from there and goes into the mirror at its `LastModified`, the version the sync gives it, so a later
sync of the unchanged record changes nothing.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from datetime import date as Date
from typing import Any
from uuid import UUID

from pydantic import Field, model_validator

from nextcrm_pipelines.core.actions import (
    ActionInvalid,
    ActionSpec,
    Amount,
    Currency,
    Mirrored,
    Payload,
    Sent,
    minor_units,
)
from nextcrm_pipelines.providers.myob.client import MyobApi
from nextcrm_pipelines.providers.myob.records import updated_at

# MYOB's limits: a card ID has at most 15 characters, an invoice number 13.
DISPLAY_ID_LENGTH = 15
NUMBER_LENGTH = 13
REFERENCE_PREFIX = "CRM"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"


def reference(key: str, length: int) -> str:
    """The reference an action derived from the outbox row's idempotency key puts on its record: `CRM` and the
    key's SHA-256 in upper-case hex, `length` characters in all (same key, same reference)."""
    return REFERENCE_PREFIX + hashlib.sha256(key.encode()).hexdigest().upper()[: length - len(REFERENCE_PREFIX)]


def _quoted(text: str) -> str:
    """A string literal for an OData `$filter`."""
    return "'" + text.replace("'", "''") + "'"


class CreateCustomer(Payload):
    """A new customer card: a company (`company_name`) or a person (`last_name`, `first_name`), with its email,
    phone and postal address, and the tax codes its sales use (MYOB requires both; their UIDs are those of
    `myob_customers.raw->'SellingDetails'->'TaxCode'`). `display_id` is the card ID; without one it is derived
    from the idempotency key."""

    company_name: str | None = Field(default=None, min_length=1, max_length=50)
    first_name: str | None = Field(default=None, min_length=1, max_length=20)
    last_name: str | None = Field(default=None, min_length=1, max_length=30)
    display_id: str | None = Field(default=None, min_length=1, max_length=DISPLAY_ID_LENGTH)
    email: str | None = Field(default=None, max_length=255, pattern=EMAIL_PATTERN)
    phone: str | None = Field(default=None, min_length=1, max_length=21)
    street: str | None = Field(default=None, min_length=1, max_length=255)
    city: str | None = Field(default=None, min_length=1, max_length=255)
    state: str | None = Field(default=None, min_length=1, max_length=255)
    postcode: str | None = Field(default=None, min_length=1, max_length=11)
    country: str | None = Field(default=None, min_length=1, max_length=255)
    notes: str | None = Field(default=None, max_length=255)
    tax_code: UUID = Field(description="The UID of the tax code of the customer's sales (e.g. GST)")
    freight_tax_code: UUID | None = Field(default=None, description="The freight's tax code; default tax_code")

    @model_validator(mode="after")
    def _check(self) -> CreateCustomer:
        if self.company_name is None and self.last_name is None:
            raise ValueError("give company_name for a company, or last_name (and first_name) for a person")
        if self.company_name is not None and (self.last_name is not None or self.first_name is not None):
            raise ValueError("give company_name for a company or first_name/last_name for a person, not both")
        return self

    def card_id(self, key: str) -> str:
        """The card ID the card gets and `find` looks it up by."""
        return self.display_id or reference(key, DISPLAY_ID_LENGTH)


class InvoiceLine(Payload):
    """One line of a service invoice: what was done and its amount in the invoice's currency, booked to an income
    account (default: the customer card's income account) with a tax code (default: the card's)."""

    description: str = Field(min_length=1, max_length=1000)
    amount: Amount
    account: UUID | None = Field(default=None, description="The UID of the income account")
    tax_code: UUID | None = Field(default=None, description="The UID of the line's tax code")


class CreateServiceInvoice(Payload):
    """A new service sale invoice for a customer card, in the company file's currency (AUD or NZD). `number` is the
    invoice number; without one it is derived from the idempotency key. `date` defaults to today (UTC)."""

    customer: UUID = Field(description="The UID of the customer card (myob_customers.id)")
    currency: Currency
    lines: list[InvoiceLine] = Field(min_length=1, max_length=200)
    number: str | None = Field(default=None, min_length=1, max_length=NUMBER_LENGTH)
    date: Date | None = None
    tax_inclusive: bool = False
    purchase_order: str | None = Field(default=None, max_length=255)
    journal_memo: str | None = Field(default=None, max_length=255)
    comment: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _check(self) -> CreateServiceInvoice:
        for index, line in enumerate(self.lines):
            try:
                minor_units(line.amount, self.currency)  # refuses more decimals than the currency has
            except ValueError as exc:
                raise ValueError(f"lines.{index}.amount: {exc}") from None
        return self

    def invoice_number(self, key: str) -> str:
        """The number the invoice gets and `find` looks it up by."""
        return self.number or reference(key, NUMBER_LENGTH)


def _mirrored(entity: str, raw: dict[str, Any]) -> Sent:
    """A record MYOB serves, as the action's result and as the mirror's row at its `LastModified`."""
    return Sent(raw, str(raw["UID"]), (Mirrored(entity, raw, updated_at(raw)),))


def create_customer(api: MyobApi, payload: CreateCustomer, key: str) -> Sent:
    """POST the card with its card ID (the reference `find_customer` looks for) and read it back."""
    address = {"Location": 1, "Street": payload.street, "City": payload.city, "State": payload.state,
               "PostCode": payload.postcode, "Country": payload.country, "Phone1": payload.phone,
               "Email": payload.email}  # fmt: skip
    person = payload.company_name is None
    body: dict[str, Any] = {
        "IsIndividual": person,
        "CompanyName": payload.company_name,
        "LastName": payload.last_name,
        "FirstName": payload.first_name,
        "DisplayID": payload.card_id(key),
        "IsActive": True,
        "Notes": payload.notes,
        "SellingDetails": {
            "TaxCode": {"UID": str(payload.tax_code)},
            "FreightTaxCode": {"UID": str(payload.freight_tax_code or payload.tax_code)},
        },
    }
    if any(value is not None for name, value in address.items() if name != "Location"):
        body["Addresses"] = [address]
    body = {name: value for name, value in body.items() if value is not None}
    return _mirrored("myob_customers", api.create("/Contact/Customer", body))


def find_customer(api: MyobApi, payload: CreateCustomer, key: str) -> Sent | None:
    """The card an earlier attempt made: its card ID, and the name it was given (a card ID the CRM chose may
    already belong to another card)."""
    for card in api.matching("/Contact/Customer", f"DisplayID eq {_quoted(payload.card_id(key))}"):
        if (card.get("CompanyName"), card.get("LastName"), card.get("FirstName")) == (
            payload.company_name,
            payload.last_name,
            payload.first_name,
        ):
            return _mirrored("myob_customers", card)
    return None


def _link_uid(link: Any) -> str | None:
    return str(link["UID"]) if isinstance(link, dict) and link.get("UID") else None


def create_service_invoice(api: MyobApi, payload: CreateServiceInvoice, key: str) -> Sent:
    """Read the customer card (its currency, default income account and tax codes), check the currency, then
    POST the invoice; refusals found on the way end the action before anything is written."""
    card = api.record(f"/Contact/Customer/{payload.customer}")
    currency = payload.currency.upper()
    foreign = card.get("ForeignCurrency")
    if isinstance(foreign, dict) and foreign:
        raise ActionInvalid(f"create_service_invoice: currency: customer {payload.customer} is billed in "
                            f"{foreign.get('Code')}; invoices in a foreign currency are not supported: nothing was "
                            "sent")  # fmt: skip
    own = api.file_currency()
    if own is None:
        raise ActionInvalid("create_service_invoice: currency: MYOB does not say the company file's currency: "
                            "nothing was sent")  # fmt: skip
    if currency != own:
        raise ActionInvalid(f"create_service_invoice: currency: {currency} is not the company file's ({own}): "
                            "nothing was sent")  # fmt: skip
    selling = card.get("SellingDetails") or {}
    lines = []
    for index, line in enumerate(payload.lines):
        account = str(line.account) if line.account else _link_uid(selling.get("IncomeAccount"))
        tax = str(line.tax_code) if line.tax_code else _link_uid(selling.get("TaxCode"))
        for field, value in (("account", account), ("tax_code", tax)):
            if value is None:
                raise ActionInvalid(f"create_service_invoice: lines.{index}.{field}: the customer card has no "
                                    "default; give one: nothing was sent")  # fmt: skip
        lines.append({"Type": "Transaction", "Description": line.description, "Total": line.amount,
                      "Account": {"UID": account}, "TaxCode": {"UID": tax}})  # fmt: skip
    freight_tax = _link_uid(selling.get("FreightTaxCode")) or lines[0]["TaxCode"]["UID"]
    day = payload.date or datetime.now(UTC).date()
    body: dict[str, Any] = {
        "Number": payload.invoice_number(key),
        "Date": f"{day:%Y-%m-%d}T00:00:00",
        "Customer": {"UID": str(payload.customer)},
        "IsTaxInclusive": payload.tax_inclusive,
        "Lines": lines,
        "FreightTaxCode": {"UID": freight_tax},
        "CustomerPurchaseOrderNumber": payload.purchase_order,
        "JournalMemo": payload.journal_memo,
        "Comment": payload.comment,
    }
    body = {name: value for name, value in body.items() if value is not None}
    return _mirrored("myob_invoices", api.create("/Sale/Invoice/Service", body))


def find_service_invoice(api: MyobApi, payload: CreateServiceInvoice, key: str) -> Sent | None:
    """The invoice an earlier attempt made: its number and customer. A number of digits only is matched whatever
    its zero padding (MYOB's padding of invoice numbers has changed between versions)."""
    number = payload.invoice_number(key)
    customer = f"Customer/UID eq guid'{payload.customer}'"
    if number.isdigit():
        wanted = number.lstrip("0") or "0"
        found = api.matching("/Sale/Invoice/Service", f"endswith(Number, {_quoted(wanted)}) and {customer}")
        found = [i for i in found if (str(i.get("Number") or "").lstrip("0") or "0") == wanted]
    else:
        found = api.matching("/Sale/Invoice/Service", f"Number eq {_quoted(number)} and {customer}")
    return _mirrored("myob_invoices", found[0]) if found else None


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_customer", CreateCustomer, create_customer,
                   "Create a customer card (a company or a person), referenced by its card ID.",
                   find=find_customer, entities=("myob_customers",)),
        ActionSpec("create_service_invoice", CreateServiceInvoice, create_service_invoice,
                   "Create a service sale invoice for a customer card, referenced by its number.",
                   find=find_service_invoice, entities=("myob_invoices",)),
    )
}  # fmt: skip
