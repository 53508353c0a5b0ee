"""MYOB Business (AccountRight) JSON -> rows of `myob_invoices`, `myob_customers` and `myob_customer_payments`.

Invoices are read from their layout's endpoint (`/Sale/Invoice/Item`, `/Service`, ...), the only one
that carries their `Lines`; those answers have no `InvoiceType`, so the layout is read from the
record's `URI` (`.../Sale/Invoice/{Layout}/{UID}`). MYOB timestamps carry no zone and are read as
UTC. A foreign-currency invoice or payment is stored in its own currency (the `...Foreign` amounts);
otherwise amounts are in the company file's currency, which the API does not name (`currency` is
null). A customer card is `Active` or `Inactive` (`IsActive: false`, flagged `deleted`). MYOB
hard-deletes invoices, cards and payments and keeps no tombstone: the id sweep flags rows whose
record is gone.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from nextcrm_pipelines.core.money import decimal_amount
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.myob import tables

INVOICES_TABLE = table_spec(tables.INVOICES)
CUSTOMERS_TABLE = table_spec(tables.CUSTOMERS)
CUSTOMER_PAYMENTS_TABLE = table_spec(tables.CUSTOMER_PAYMENTS)

LAYOUTS = ("Service", "Item", "Professional", "TimeBilling", "Miscellaneous")
_LAYOUT_BY_LOWER = {name.lower(): name for name in LAYOUTS}


def parse_time(value: Any) -> datetime | None:
    """`2015-03-29T03:31:57.19` (no zone; UTC) as an aware datetime."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def updated_at(raw: dict[str, Any]) -> datetime:
    """The record's `LastModified` (the never-regress version)."""
    moment = parse_time(raw.get("LastModified"))
    if moment is None:
        raise ValueError("record has no LastModified")
    return moment


def _day(value: Any) -> date | None:
    moment = parse_time(value)
    return moment.date() if moment else None


def invoice_layout(raw: dict[str, Any]) -> str | None:
    """The invoice's layout: `InvoiceType` (on `/Sale/Invoice`), else the layout segment of its `URI`."""
    if raw.get("InvoiceType"):
        return str(raw["InvoiceType"])
    parts = str(raw.get("URI") or "").split("/")
    for index, part in enumerate(parts[:-1]):
        if part.lower() == "invoice" and index and parts[index - 1].lower() == "sale":
            return _LAYOUT_BY_LOWER.get(parts[index + 1].lower())
    return None


def _foreign(raw: dict[str, Any]) -> dict[str, Any] | None:
    foreign = raw.get("ForeignCurrency")
    return foreign if isinstance(foreign, dict) and foreign else None


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    customer = raw.get("Customer") or {}
    foreign = _foreign(raw)
    suffix = "Foreign" if foreign else ""
    lines = raw.get("Lines")
    return Row.build(
        str(raw["UID"]),
        INVOICES_TABLE.values(
            number=raw.get("Number"),
            invoice_type=invoice_layout(raw),
            status=raw["Status"],
            customer_id=customer.get("UID"),
            customer_name=customer.get("Name"),
            issue_date=_day(raw.get("Date")),
            due_date=_day((raw.get("Terms") or {}).get("DueDate")),
            currency=foreign.get("Code") if foreign else None,
            subtotal=decimal_amount(raw.get(f"Subtotal{suffix}")),
            total_tax=decimal_amount(raw.get(f"TotalTax{suffix}")),
            total=decimal_amount(raw.get(f"TotalAmount{suffix}")),
            balance_due=decimal_amount(raw.get(f"BalanceDueAmount{suffix}")),
            row_version=raw.get("RowVersion"),
            line_items=len(lines) if isinstance(lines, list) else None,
        ),
        created_at=parse_time(raw.get("Created")),
        version=version,
        deleted=False,
        raw=raw,
    )


def customer_row(raw: dict[str, Any], version: datetime) -> Row:
    """A customer card; its email, phone and postal address come from its first address."""
    addresses = [a for a in raw.get("Addresses") or [] if isinstance(a, dict)]
    address = addresses[0] if addresses else {}
    foreign = _foreign(raw)
    active = raw.get("IsActive", True) is not False
    return Row.build(
        str(raw["UID"]),
        CUSTOMERS_TABLE.values(
            display_id=raw.get("DisplayID"),
            company_name=raw.get("CompanyName"),
            first_name=raw.get("FirstName"),
            last_name=raw.get("LastName"),
            is_individual=raw.get("IsIndividual"),
            status="Active" if active else "Inactive",
            email=address.get("Email"),
            phone=address.get("Phone1"),
            street=address.get("Street"),
            city=address.get("City"),
            state=address.get("State"),
            postcode=address.get("PostCode"),
            country=address.get("Country"),
            currency=foreign.get("Code") if foreign else None,
            current_balance=decimal_amount(raw.get("CurrentBalance")),
            row_version=raw.get("RowVersion"),
        ),
        created_at=parse_time(raw.get("Created")),
        version=version,
        deleted=not active,
        raw=raw,
    )


def paid_invoice_ids(raw: dict[str, Any]) -> list[str]:
    """The invoices a payment applies to (its `Invoices` lines of type Invoice), each once, in line order."""
    found: list[str] = []
    for line in raw.get("Invoices") or []:
        if not isinstance(line, dict) or line.get("Type", "Invoice") != "Invoice" or not line.get("UID"):
            continue
        uid = str(line["UID"])
        if uid not in found:
            found.append(uid)
    return found


def payment_row(raw: dict[str, Any], version: datetime) -> Row:
    customer = raw.get("Customer") or {}
    account = raw.get("Account") or {}
    foreign = _foreign(raw)
    return Row.build(
        str(raw["UID"]),
        CUSTOMER_PAYMENTS_TABLE.values(
            receipt_number=raw.get("ReceiptNumber"),
            customer_id=customer.get("UID"),
            customer_name=customer.get("Name"),
            invoice_ids=paid_invoice_ids(raw),
            payment_date=_day(raw.get("Date")),
            currency=foreign.get("Code") if foreign else None,
            exchange_rate=decimal_amount(raw.get("CurrencyExchangeRate")) if foreign else None,
            amount=decimal_amount(raw.get("AmountReceivedForeign" if foreign else "AmountReceived")),
            payment_method=raw.get("PaymentMethod"),
            memo=raw.get("Memo"),
            deposit_to=raw.get("DepositTo"),
            deposit_account_id=account.get("UID"),
            deposit_account_name=account.get("Name"),
            row_version=raw.get("RowVersion"),
        ),
        created_at=parse_time(raw.get("Created")),
        version=version,
        deleted=False,
        raw=raw,
    )
