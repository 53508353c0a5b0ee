"""What NextCRM asks QuickBooks Online to do, through the outbox (`core.outbox`): create a customer, create an
invoice, void an invoice.

Every request carries a `requestid` made from the outbox row's key (`client.request_id`): QuickBooks answers a
repeated one with its first answer instead of acting again, so a retry after a timeout, a 5xx or a crash never
makes a second customer or invoice. Amounts are decimal strings with their currency, sent as JSON numbers digit
for digit (QuickBooks takes decimal amounts, never minor units). What QuickBooks answers goes into the mirror in
the same run, re-read with the query the sync uses, as are the records the write changed with it (an invoice's
customer, whose balance moved; the payments a void left unapplied).
"""

from __future__ import annotations

from datetime import date
from typing import Any

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
from nextcrm_pipelines.providers.quickbooks.client import QuickBooksApi, request_id
from nextcrm_pipelines.providers.quickbooks.records import updated_at

# QuickBooks ids are numeric strings.
ID = r"^[0-9]{1,20}$"
# A customer's display name: unique in the company, no colon (it separates a sub-customer from its parent), tab
# or line break.
DISPLAY_NAME = r"^[^:\t\r\n]+$"
EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
MAX_LINES = 750


class Address(Payload):
    """A billing address (`BillAddr`)."""

    line1: str | None = Field(default=None, max_length=500)
    line2: str | None = Field(default=None, max_length=500)
    city: str | None = Field(default=None, max_length=255)
    region: str | None = Field(default=None, max_length=255, description="State or province (CountrySubDivisionCode)")
    postal_code: str | None = Field(default=None, max_length=30)
    country: str | None = Field(default=None, max_length=255)


class CreateCustomer(Payload):
    """A new customer. `display_name` is required and must be unused in the company (QuickBooks refuses a
    duplicate with fault 6240); `currency` defaults to the company's home currency."""

    display_name: str = Field(min_length=1, max_length=500, pattern=DISPLAY_NAME)
    given_name: str | None = Field(default=None, max_length=100)
    family_name: str | None = Field(default=None, max_length=100)
    company_name: str | None = Field(default=None, max_length=100)
    email: str | None = Field(default=None, max_length=100, pattern=EMAIL)
    phone: str | None = Field(default=None, max_length=30)
    address: Address | None = None
    currency: Currency | None = None
    notes: str | None = Field(default=None, max_length=2000)


class InvoiceLine(Payload):
    """One line of an invoice: what it sells (an Item id, as QuickBooks' products and services are) and for how much."""

    amount: Amount
    item_id: str = Field(pattern=ID, description="The product or service (QuickBooks Item id) the line sells")
    description: str | None = Field(default=None, max_length=4000)


class CreateInvoice(Payload):
    """A new invoice to a customer, in the customer's currency (refused before sending otherwise)."""

    customer_id: str = Field(pattern=ID)
    currency: Currency
    lines: list[InvoiceLine] = Field(min_length=1, max_length=MAX_LINES)
    doc_number: str | None = Field(default=None, max_length=21, description="QuickBooks numbers it if left out")
    txn_date: date | None = None
    due_date: date | None = None
    memo: str | None = Field(default=None, max_length=1000, description="The message to the customer")
    private_note: str | None = Field(default=None, max_length=4000)

    @model_validator(mode="after")
    def _check(self) -> CreateInvoice:
        for n, line in enumerate(self.lines):
            try:
                minor_units(line.amount, self.currency)  # refuses more decimals than the currency has
            except ValueError as exc:
                raise ValueError(f"lines.{n}.amount: {exc}") from None
        if self.txn_date and self.due_date and self.due_date < self.txn_date:
            raise ValueError("due_date is before txn_date")
        return self


class VoidInvoice(Payload):
    """Void an invoice: QuickBooks zeroes it and keeps it. With `sync_token` (the invoice's version as the CRM
    last saw it) QuickBooks refuses the void if the invoice changed since (5010 Stale Object Error); without it
    the current version is read first."""

    invoice_id: str = Field(pattern=ID)
    sync_token: str | None = Field(default=None, pattern=r"^[0-9]{1,10}$")


def _compact(values: dict[str, Any]) -> dict[str, Any]:
    """Leave out what is unset (QuickBooks keeps its defaults for absent fields)."""
    return {key: value for key, value in values.items() if value not in (None, {}, [], "")}


def _one(api: QuickBooksApi, entity: str, record_id: str) -> dict[str, Any] | None:
    """The record as the sync reads it (the query, inactive customers included), or None when it is not there."""
    found = api.records_by_id(entity, [record_id])
    return found[0] if found else None


def _mirrored(entity: str, raw: dict[str, Any]) -> Mirrored:
    return Mirrored(entity, raw, updated_at(raw))


def create_customer(api: QuickBooksApi, payload: CreateCustomer, key: str) -> Sent:
    """POST /customer; the mirror gets the customer as the sync's query shows it."""
    address = payload.address
    body = _compact({
        "DisplayName": payload.display_name,
        "GivenName": payload.given_name,
        "FamilyName": payload.family_name,
        "CompanyName": payload.company_name,
        "PrimaryEmailAddr": _compact({"Address": payload.email}),
        "PrimaryPhone": _compact({"FreeFormNumber": payload.phone}),
        "BillAddr": _compact({"Line1": address.line1, "Line2": address.line2, "City": address.city,
                              "CountrySubDivisionCode": address.region, "PostalCode": address.postal_code,
                              "Country": address.country}) if address else None,
        "CurrencyRef": {"value": payload.currency.upper()} if payload.currency else None,
        "Notes": payload.notes,
    })  # fmt: skip
    customer = api.write("Customer", body, request_id=request_id(key))
    current = _one(api, "Customer", str(customer["Id"])) or customer
    return Sent(customer, str(customer["Id"]), (_mirrored("quickbooks_customers", current),))


def create_invoice(api: QuickBooksApi, payload: CreateInvoice, key: str) -> Sent:
    """Check the customer's currency, POST /invoice, then mirror the invoice and the customer it is owed by."""
    customer = _one(api, "Customer", payload.customer_id)
    if customer is None:
        raise ActionInvalid(f"create_invoice: customer_id: no customer {payload.customer_id} in this company: "
                            "nothing was sent")  # fmt: skip
    theirs = str((customer.get("CurrencyRef") or {}).get("value") or "").upper()
    if theirs and theirs != payload.currency.upper():
        raise ActionInvalid(f"create_invoice: currency: {payload.currency.upper()} is not customer "
                            f"{payload.customer_id}'s currency ({theirs}): nothing was sent")  # fmt: skip
    lines = [
        _compact({"Amount": line.amount, "DetailType": "SalesItemLineDetail", "Description": line.description,
                  "SalesItemLineDetail": {"ItemRef": {"value": line.item_id}}})
        for line in payload.lines
    ]  # fmt: skip
    body = _compact({
        "CustomerRef": {"value": payload.customer_id},
        "CurrencyRef": {"value": payload.currency.upper()},
        "Line": lines,
        "DocNumber": payload.doc_number,
        "TxnDate": payload.txn_date.isoformat() if payload.txn_date else None,
        "DueDate": payload.due_date.isoformat() if payload.due_date else None,
        "CustomerMemo": {"value": payload.memo} if payload.memo else None,
        "PrivateNote": payload.private_note,
    })  # fmt: skip
    invoice = api.write("Invoice", body, request_id=request_id(key))
    mirrored = [_mirrored("quickbooks_invoices", _one(api, "Invoice", str(invoice["Id"])) or invoice)]
    owner = _one(api, "Customer", str((invoice.get("CustomerRef") or {}).get("value") or payload.customer_id))
    if owner is not None:
        mirrored.append(_mirrored("quickbooks_customers", owner))
    return Sent(invoice, str(invoice["Id"]), tuple(mirrored))


def void_invoice(api: QuickBooksApi, payload: VoidInvoice, key: str) -> Sent:
    """POST /invoice?operation=void with the invoice's SyncToken (the payload's, else the current one), then
    mirror the voided invoice, its customer and the payments that were applied to it."""
    before = _one(api, "Invoice", payload.invoice_id)
    if before is None:
        raise ActionInvalid(f"void_invoice: invoice_id: no invoice {payload.invoice_id} in this company (deleted?): "
                            "nothing was sent")  # fmt: skip
    token = payload.sync_token if payload.sync_token is not None else str(before["SyncToken"])
    voided = api.write("Invoice", {"Id": payload.invoice_id, "SyncToken": token}, request_id=request_id(key),
                       operation="void")  # fmt: skip
    mirrored = [_mirrored("quickbooks_invoices", _one(api, "Invoice", payload.invoice_id) or voided)]
    customer_id = (voided.get("CustomerRef") or before.get("CustomerRef") or {}).get("value")
    customer = _one(api, "Customer", str(customer_id)) if customer_id else None
    if customer is not None:
        mirrored.append(_mirrored("quickbooks_customers", customer))
    links = [link for link in before.get("LinkedTxn") or [] if isinstance(link, dict)]
    paid_by = sorted({str(link["TxnId"]) for link in links if link.get("TxnType") == "Payment" and link.get("TxnId")})
    if paid_by:
        mirrored.extend(_mirrored("quickbooks_payments", raw) for raw in api.records_by_id("Payment", paid_by))
    return Sent(voided, payload.invoice_id, tuple(mirrored))


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_customer", CreateCustomer, create_customer, "Create a customer.",
                   entities=("quickbooks_customers",)),
        ActionSpec("create_invoice", CreateInvoice, create_invoice, "Create an invoice to a customer.",
                   entities=("quickbooks_invoices", "quickbooks_customers")),
        ActionSpec("void_invoice", VoidInvoice, void_invoice, "Void an invoice (zeroed, kept, flagged deleted).",
                   entities=("quickbooks_invoices", "quickbooks_customers", "quickbooks_payments")),
    )
}  # fmt: skip
