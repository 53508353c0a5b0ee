"""Xero JSON -> rows of `xero_invoices` (sales and bills, with a type column), `xero_contacts` and
`xero_payments`.

Xero never hard-deletes any of them: an invoice becomes VOIDED or DELETED, a contact ARCHIVED (or
GDPRREQUEST when erased) and a payment DELETED, each with a new `UpdatedDateUTC`; those rows are flagged
`deleted`. Dates come in the .NET form `/Date(<ms since epoch>[+hhmm])/`; the milliseconds are UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

from nextcrm_pipelines.core.money import decimal_amount
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.xero import tables

DELETED_INVOICE_STATUSES = frozenset({"VOIDED", "DELETED"})
DELETED_CONTACT_STATUSES = frozenset({"ARCHIVED", "GDPRREQUEST"})
DELETED_PAYMENT_STATUSES = frozenset({"DELETED"})
_MSDATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")

INVOICES_TABLE = table_spec(tables.INVOICES)
CONTACTS_TABLE = table_spec(tables.CONTACTS)
PAYMENTS_TABLE = table_spec(tables.PAYMENTS)


def parse_msdate(value: Any) -> datetime | None:
    """`/Date(1541176290160+0000)/` (offset optional) or an ISO 8601 string, as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a Xero date, got {value!r}")
    match = _MSDATE.match(value)
    if match:
        return datetime.fromtimestamp(int(match.group(1)) / 1000, UTC)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_day(value: Any) -> date | None:
    """A Xero date field (`Date`, `DueDate`: midnight UTC of the organisation's local date)."""
    moment = parse_msdate(value)
    return moment.date() if moment else None


def updated_at(raw: dict[str, Any]) -> datetime:
    """The record's `UpdatedDateUTC` (the never-regress version)."""
    moment = parse_msdate(raw.get("UpdatedDateUTC")) or parse_msdate(raw.get("UpdatedDateUTCString"))
    if moment is None:
        raise ValueError("record has no UpdatedDateUTC")
    return moment


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    status = raw["Status"]
    contact = raw.get("Contact") or {}
    return Row.build(
        raw["InvoiceID"],
        INVOICES_TABLE.values(
            invoice_number=raw.get("InvoiceNumber"),
            type=raw["Type"],
            status=status,
            contact_id=contact.get("ContactID"),
            contact_name=contact.get("Name"),
            reference=raw.get("Reference"),
            issue_date=parse_day(raw.get("Date")),
            due_date=parse_day(raw.get("DueDate")),
            currency=raw.get("CurrencyCode"),
            subtotal=decimal_amount(raw.get("SubTotal")),
            total_tax=decimal_amount(raw.get("TotalTax")),
            total=decimal_amount(raw.get("Total")),
            amount_due=decimal_amount(raw.get("AmountDue")),
            amount_paid=decimal_amount(raw.get("AmountPaid")),
            amount_credited=decimal_amount(raw.get("AmountCredited")),
            line_items=len(raw["LineItems"]) if isinstance(raw.get("LineItems"), list) else None,
        ),
        created_at=None,
        version=version,
        deleted=status in DELETED_INVOICE_STATUSES,
        raw=raw,
    )


def contact_row(raw: dict[str, Any], version: datetime) -> Row:
    status = raw.get("ContactStatus") or "ACTIVE"
    return Row.build(
        raw["ContactID"],
        CONTACTS_TABLE.values(
            name=raw.get("Name"),
            first_name=raw.get("FirstName"),
            last_name=raw.get("LastName"),
            email=raw.get("EmailAddress"),
            contact_number=raw.get("ContactNumber"),
            account_number=raw.get("AccountNumber"),
            status=status,
            is_customer=raw.get("IsCustomer"),
            is_supplier=raw.get("IsSupplier"),
            default_currency=raw.get("DefaultCurrency"),
            tax_number=raw.get("TaxNumber"),
            merged_to_contact_id=raw.get("MergedToContactID"),
        ),
        created_at=None,
        version=version,
        deleted=status in DELETED_CONTACT_STATUSES,
        raw=raw,
    )


def payment_row(raw: dict[str, Any], version: datetime) -> Row:
    """A payment with the invoice (or credit note) it pays, that document's contact and currency, and its bank
    account; Xero gives the currency only on the document paid."""
    status = raw["Status"]
    document = raw.get("Invoice") or raw.get("CreditNote") or {}
    document_id = document.get("InvoiceID") or document.get("CreditNoteID")
    number = document.get("InvoiceNumber") or document.get("CreditNoteNumber")
    account = raw.get("Account") or {}
    return Row.build(
        raw["PaymentID"],
        PAYMENTS_TABLE.values(
            payment_type=raw["PaymentType"],
            status=status,
            payment_date=parse_day(raw.get("Date")),
            amount=decimal_amount(raw.get("Amount")),
            currency=document.get("CurrencyCode"),
            currency_rate=decimal_amount(raw.get("CurrencyRate")),
            bank_amount=decimal_amount(raw.get("BankAmount")),
            reference=raw.get("Reference"),
            invoice_id=document_id,
            invoice_number=number or raw.get("InvoiceNumber") or raw.get("CreditNoteNumber"),
            invoice_type=document.get("Type"),
            contact_id=(document.get("Contact") or {}).get("ContactID"),
            account_id=account.get("AccountID"),
            account_code=account.get("Code"),
            is_reconciled=raw.get("IsReconciled"),
            batch_payment_id=raw.get("BatchPaymentID"),
        ),
        created_at=None,
        version=version,
        deleted=status in DELETED_PAYMENT_STATUSES,
        raw=raw,
    )
