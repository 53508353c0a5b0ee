"""MYOB Business (AccountRight) JSON -> rows of `myob_invoices`.

`/Sale/Invoice` lists every layout (Item, Service, Professional, TimeBilling, Miscellaneous); the
layout is kept as `invoice_type`. MYOB timestamps carry no zone and are read as UTC. A foreign
currency invoice is stored in its own currency (the `...Foreign` amounts); otherwise amounts are in
the company file's currency, which the API does not name on the invoice (`currency` is null). MYOB
hard-deletes invoices and keeps no tombstone: the id sweep flags rows whose invoice is gone.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from nextcrm_pipelines.core.money import decimal_amount
from nextcrm_pipelines.core.tables import table_spec
from nextcrm_pipelines.core.upsert import Row
from nextcrm_pipelines.providers.myob import tables

INVOICES_TABLE = table_spec(tables.INVOICES)


def parse_time(value: Any) -> datetime | None:
    """`2015-03-29T03:31:57.19` (no zone; UTC) as an aware datetime."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def updated_at(raw: dict[str, Any]) -> datetime:
    moment = parse_time(raw.get("LastModified"))
    if moment is None:
        raise ValueError("record has no LastModified")
    return moment


def _day(value: Any) -> date | None:
    moment = parse_time(value)
    return moment.date() if moment else None


def invoice_row(raw: dict[str, Any], version: datetime) -> Row:
    customer = raw.get("Customer") or {}
    foreign = raw.get("ForeignCurrency") or None
    suffix = "Foreign" if foreign else ""
    return Row.build(
        str(raw["UID"]),
        INVOICES_TABLE.values(
            number=raw.get("Number"),
            invoice_type=raw.get("InvoiceType"),
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
        ),
        created_at=parse_time(raw.get("Created")),
        version=version,
        deleted=False,
        raw=raw,
    )
