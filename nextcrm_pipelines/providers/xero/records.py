"""Xero JSON -> rows of `xero_invoices` (sales and bills, with a type column) and `xero_contacts`.

Xero never hard-deletes either: an invoice becomes VOIDED or DELETED and a contact ARCHIVED (or
GDPRREQUEST when erased), each with a new `UpdatedDateUTC`; those rows are flagged `deleted`. Dates
come in the .NET form `/Date(<ms since epoch>[+hhmm])/`; the milliseconds are UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

from nextcrm_pipelines.core.money import decimal_amount
from nextcrm_pipelines.core.upsert import Row, TableSpec

DELETED_INVOICE_STATUSES = frozenset({"VOIDED", "DELETED"})
DELETED_CONTACT_STATUSES = frozenset({"ARCHIVED", "GDPRREQUEST"})
_MSDATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")

INVOICES_TABLE = TableSpec(
    "xero_invoices",
    (
        ("invoice_number", "text"), ("type", "text"), ("status", "text"), ("contact_id", "text"),
        ("contact_name", "text"), ("reference", "text"), ("issue_date", "date"), ("due_date", "date"),
        ("currency", "text"), ("subtotal", "numeric"), ("total_tax", "numeric"), ("total", "numeric"),
        ("amount_due", "numeric"), ("amount_paid", "numeric"), ("amount_credited", "numeric"),
        ("line_items", "int4"),
    ),
)  # fmt: skip

CONTACTS_TABLE = TableSpec(
    "xero_contacts",
    (
        ("name", "text"), ("first_name", "text"), ("last_name", "text"), ("email", "text"),
        ("contact_number", "text"), ("account_number", "text"), ("status", "text"), ("is_customer", "bool"),
        ("is_supplier", "bool"), ("default_currency", "text"), ("tax_number", "text"),
        ("merged_to_contact_id", "text"),
    ),
)  # fmt: skip


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
        (
            raw.get("InvoiceNumber"),
            raw["Type"],
            status,
            contact.get("ContactID"),
            contact.get("Name"),
            raw.get("Reference"),
            parse_day(raw.get("Date")),
            parse_day(raw.get("DueDate")),
            raw.get("CurrencyCode"),
            decimal_amount(raw.get("SubTotal")),
            decimal_amount(raw.get("TotalTax")),
            decimal_amount(raw.get("Total")),
            decimal_amount(raw.get("AmountDue")),
            decimal_amount(raw.get("AmountPaid")),
            decimal_amount(raw.get("AmountCredited")),
            len(raw["LineItems"]) if isinstance(raw.get("LineItems"), list) else None,
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
        (
            raw.get("Name"),
            raw.get("FirstName"),
            raw.get("LastName"),
            raw.get("EmailAddress"),
            raw.get("ContactNumber"),
            raw.get("AccountNumber"),
            status,
            raw.get("IsCustomer"),
            raw.get("IsSupplier"),
            raw.get("DefaultCurrency"),
            raw.get("TaxNumber"),
            raw.get("MergedToContactID"),
        ),
        created_at=None,
        version=version,
        deleted=status in DELETED_CONTACT_STATUSES,
        raw=raw,
    )
