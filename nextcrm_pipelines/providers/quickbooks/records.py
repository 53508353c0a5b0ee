"""QuickBooks Online JSON -> rows of `quickbooks_invoices`, `quickbooks_customers` and `quickbooks_payments`.

QuickBooks has no invoice status field, so `status` is derived: `deleted` for a Change Data Capture
stub (`"status": "Deleted"`; a hard delete, kept as a tombstone), `voided` for a voided invoice
(QuickBooks zeroes its totals and writes "Voided" into `PrivateNote`), `paid` when the balance is
zero, else `open`. Voided and deleted invoices are flagged `deleted`. A customer is `active`, `inactive`
(`Active: false`, which is how QuickBooks deletes a customer: flagged `deleted`) or `deleted` (a CDC
stub: merged into another customer). A payment is `applied`, `unapplied` (part of it pays no invoice),
`voided` (zeroed, "Voided" in `PrivateNote`) or `deleted` (a CDC stub); its `invoice_ids` are the
invoices its lines' `LinkedTxn` name. Times carry the company's UTC offset; the never-regress version
is `MetaData.LastUpdatedTime`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from nextcrm_pipelines.core.money import decimal_amount
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.quickbooks import tables

INVOICES_TABLE = table_spec(tables.INVOICES)
CUSTOMERS_TABLE = table_spec(tables.CUSTOMERS)
PAYMENTS_TABLE = table_spec(tables.PAYMENTS)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time with the company's offset (e.g. `2014-09-19T13:16:17-07:00`) as aware UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def updated_at(raw: dict[str, Any]) -> datetime:
    moment = parse_time((raw.get("MetaData") or {}).get("LastUpdatedTime"))
    if moment is None:
        raise ValueError("record has no MetaData.LastUpdatedTime")
    return moment


def is_deleted_stub(raw: dict[str, Any]) -> bool:
    return str(raw.get("status", "")).lower() == "deleted"


def invoice_status(raw: dict[str, Any]) -> str:
    if is_deleted_stub(raw):
        return "deleted"
    total = decimal_amount(raw.get("TotalAmt")) or Decimal(0)
    balance = decimal_amount(raw.get("Balance")) or Decimal(0)
    if total == 0 and "voided" in str(raw.get("PrivateNote") or "").lower():
        return "voided"
    return "paid" if balance == 0 else "open"


def _subtotal(raw: dict[str, Any]) -> Decimal | None:
    for line in raw.get("Line") or []:
        if line.get("DetailType") == "SubTotalLineDetail":
            return decimal_amount(line.get("Amount"))
    total, tax = decimal_amount(raw.get("TotalAmt")), decimal_amount((raw.get("TxnTaxDetail") or {}).get("TotalTax"))
    return None if total is None else total - (tax or 0)


def _day(value: Any) -> date | None:
    return date.fromisoformat(value) if value else None


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    status = invoice_status(raw)
    customer = raw.get("CustomerRef") or {}
    return Row.build(
        str(raw["Id"]),
        INVOICES_TABLE.values(
            doc_number=raw.get("DocNumber"),
            status=status,
            customer_id=customer.get("value"),
            customer_name=customer.get("name"),
            txn_date=_day(raw.get("TxnDate")),
            due_date=_day(raw.get("DueDate")),
            currency=(raw.get("CurrencyRef") or {}).get("value"),
            subtotal=_subtotal(raw),
            total_tax=decimal_amount((raw.get("TxnTaxDetail") or {}).get("TotalTax")),
            total=decimal_amount(raw.get("TotalAmt")),
            balance=decimal_amount(raw.get("Balance")),
            sync_token=raw.get("SyncToken"),
        ),
        created_at=parse_time((raw.get("MetaData") or {}).get("CreateTime")),
        version=version,
        deleted=status in ("voided", "deleted"),
        raw=raw,
        tombstone=status == "deleted",
    )


def _voided(raw: dict[str, Any]) -> bool:
    total = decimal_amount(raw.get("TotalAmt")) or Decimal(0)
    return total == 0 and "voided" in str(raw.get("PrivateNote") or "").lower()


def customer_status(raw: dict[str, Any]) -> str:
    if is_deleted_stub(raw):
        return "deleted"
    return "active" if raw.get("Active", True) else "inactive"


def customer_row(raw: dict[str, Any], version: datetime) -> Row:
    status = customer_status(raw)
    address = raw.get("BillAddr") or {}
    return Row.build(
        str(raw["Id"]),
        CUSTOMERS_TABLE.values(
            display_name=raw.get("DisplayName"),
            company_name=raw.get("CompanyName"),
            given_name=raw.get("GivenName"),
            family_name=raw.get("FamilyName"),
            email=(raw.get("PrimaryEmailAddr") or {}).get("Address"),
            phone=(raw.get("PrimaryPhone") or {}).get("FreeFormNumber"),
            address_line1=address.get("Line1"),
            city=address.get("City"),
            region=address.get("CountrySubDivisionCode"),
            postal_code=address.get("PostalCode"),
            country=address.get("Country"),
            status=status,
            parent_id=(raw.get("ParentRef") or {}).get("value"),
            currency=(raw.get("CurrencyRef") or {}).get("value"),
            balance=decimal_amount(raw.get("Balance")),
            balance_with_jobs=decimal_amount(raw.get("BalanceWithJobs")),
            sync_token=raw.get("SyncToken"),
        ),
        created_at=parse_time((raw.get("MetaData") or {}).get("CreateTime")),
        version=version,
        deleted=status != "active",
        raw=raw,
        tombstone=status == "deleted",
    )


def paid_invoice_ids(raw: dict[str, Any]) -> list[str]:
    """The invoices a payment's lines apply to (`LinkedTxn` of type Invoice), each once, in line order."""
    found: list[str] = []
    for line in raw.get("Line") or []:
        for link in line.get("LinkedTxn") or [] if isinstance(line, dict) else []:
            txn = str(link.get("TxnId")) if isinstance(link, dict) and link.get("TxnType") == "Invoice" else None
            if txn and txn not in found:
                found.append(txn)
    return found


def payment_status(raw: dict[str, Any]) -> str:
    if is_deleted_stub(raw):
        return "deleted"
    if _voided(raw):
        return "voided"
    return "unapplied" if (decimal_amount(raw.get("UnappliedAmt")) or 0) > 0 else "applied"


def payment_row(raw: dict[str, Any], version: datetime) -> Row:
    status = payment_status(raw)
    customer = raw.get("CustomerRef") or {}
    return Row.build(
        str(raw["Id"]),
        PAYMENTS_TABLE.values(
            payment_ref_num=raw.get("PaymentRefNum"),
            status=status,
            customer_id=customer.get("value"),
            customer_name=customer.get("name"),
            invoice_ids=paid_invoice_ids(raw),
            txn_date=_day(raw.get("TxnDate")),
            currency=(raw.get("CurrencyRef") or {}).get("value"),
            exchange_rate=decimal_amount(raw.get("ExchangeRate")),
            total=decimal_amount(raw.get("TotalAmt")),
            unapplied=decimal_amount(raw.get("UnappliedAmt")),
            deposit_account_id=(raw.get("DepositToAccountRef") or {}).get("value"),
            sync_token=raw.get("SyncToken"),
        ),
        created_at=parse_time((raw.get("MetaData") or {}).get("CreateTime")),
        version=version,
        deleted=status in ("voided", "deleted"),
        raw=raw,
        tombstone=status == "deleted",
    )
