"""``QuickBooksCompany``: one realm generated deterministically from a seed (customers, invoices, the payments
that paid them, a chart of accounts, currencies), the control API's changes recorded as ``DataChange``s, and the
query, read-one and Change Data Capture reads."""

from __future__ import annotations

import datetime as dt
import math
import random
import re
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nextcrm_sandbox.quickbooks.model import (
    _DAY,
    _ENTITY_NAMES,
    MAX_RESULTS_CAP,
    _offset_text,
    _parse_offset,
    _parse_when,
    _validation_error,
)
from nextcrm_sandbox.quickbooks.query import _FIELD_KINDS, _OPS, _QUERYABLE, Condition, Query, _project

_CURRENCY_NAMES = {
    "USD": "United States Dollar",
    "EUR": "Euro",
    "GBP": "British Pound Sterling",
    "CAD": "Canadian Dollar",
    "AUD": "Australian Dollar",
}
# Units of the foreign currency per home-currency unit are not modelled; ExchangeRate is home per foreign.
_RATES_E4 = {"USD": 10000, "EUR": 10842, "GBP": 12671, "CAD": 7312, "AUD": 6589}
_ITEMS = (
    ("1", "Services", 7500),
    ("3", "Concrete", 1500),
    ("4", "Design", 7500),
    ("5", "Rock Fountain", 27500),
    ("6", "Gardening", 3500),
    ("8", "Installation", 5000),
    ("9", "Lighting", 1850),
    ("10", "Maintenance & Repair", 6000),
    ("11", "Pest Control", 3500),
    ("13", "Pump", 1575),
    ("15", "Sprinkler Heads", 200),
    ("16", "Sprinkler Pipes", 400),
    ("19", "Hours", 2500),
)
_TERMS = (("1", 15), ("2", 30), ("3", 30), ("3", 30), ("4", 60), ("5", 0))
_GIVEN_TEXT = "Amy Bill Cathy Dylan Grace Jeff John Kate Mark Paulsen Rondonuwu Sonnenschein"
_GIVEN = tuple(_GIVEN_TEXT.split())
_FAMILY = ("Lauterbach", "Lucchini", "Chin", "Rosa", "Pariente", "Chin", "Melton", "Whelan", "Cho", "Medina", "Lee")
_WORDS_TEXT = (
    "Bird Sanctuary Cool Cars Dukes Basketball Camp Freeman Sporting Goods Geeta Kalapatapu Jeff's "
    "Jalopies Red Rock Diner Rago Travel Agency Sushi Shara Barnett Pye's Cakes Video Games Wedding "
    "Planning Weiskopf Consulting Travis Waldron Mack Plumbing"
)
_WORDS = tuple(_WORDS_TEXT.split())
_CITIES = (
    ("Bayshore", "CA", "94326"),
    ("Half Moon Bay", "CA", "94213"),
    ("Middlefield", "CA", "94303"),
    ("Sunnyvale", "CA", "94086"),
    ("Palo Alto", "CA", "94303"),
    ("Tucson", "AZ", "85719"),
    ("Monlo Park", "CA", "94304"),
)
_STREETS = ("Finch St.", "Cypress Rd.", "Maple Ave.", "Oak Dr.", "Main St.", "Hill Ct.", "Lakeside Blvd.")
# A chart of accounts as Intuit's sample companies have it: (Id, Name, Classification, AccountType, AccountSubType).
# Invoice lines credit 79 and 86; payments go to 4 (Undeposited Funds) or 35 (Checking).
_ACCOUNTS = (
    ("1", "Services", "Revenue", "Income", "ServiceFeeIncome"),
    ("2", "Opening Balance Equity", "Equity", "Equity", "OpeningBalanceEquity"),
    ("3", "Retained Earnings", "Equity", "Equity", "RetainedEarnings"),
    ("4", "Undeposited Funds", "Asset", "Other Current Asset", "UndepositedFunds"),
    ("7", "Advertising", "Expense", "Expense", "AdvertisingPromotional"),
    ("33", "Accounts Payable (A/P)", "Liability", "Accounts Payable", "AccountsPayable"),
    ("35", "Checking", "Asset", "Bank", "Checking"),
    ("36", "Savings", "Asset", "Bank", "Savings"),
    ("57", "Office Expenses", "Expense", "Expense", "OfficeGeneralAdministrativeExpenses"),
    ("79", "Sales of Product Income", "Revenue", "Income", "SalesOfProductIncome"),
    ("80", "Cost of Goods Sold", "Expense", "Cost of Goods Sold", "SuppliesMaterialsCogs"),
    ("84", "Accounts Receivable (A/R)", "Asset", "Accounts Receivable", "AccountsReceivable"),
    ("86", "Discounts given", "Revenue", "Income", "DiscountsRefundsGiven"),
    ("89", "Arizona Dept. of Revenue Payable", "Liability", "Other Current Liability", "SalesTaxPayable"),
)
# The entities a company holds records of (each with times, each queryable and in Change Data Capture).
ENTITIES = ("Invoice", "Customer", "Payment", "Account")
_MEMOS = (
    "Thank you for your business and have a great day!",
    "Payment due on receipt. Thanks!",
    "Please include the invoice number with your payment.",
)


_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


class _Rng(random.Random):
    """``random.Random`` with cheaper picks (generation draws a few hundred thousand of them)."""

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def between(self, start: int, stop: int | None = None) -> int:
        """An int in ``[start, stop)`` (or ``[0, start)``), like ``randrange``."""
        if stop is None:
            start, stop = 0, start
        return start + int(self.random() * (stop - start))


def _money(cents: int) -> float:
    return cents / 100


def _cents(value: Any) -> int:
    return round(float(value or 0) * 100)


def _home_cents(cents: int, rate_e4: int) -> int:
    return (cents * rate_e4 + 5000) // 10000


@dataclass(frozen=True)
class DataChange:
    """One change to a company's data, as a webhook reports it: entity, operation, id, time (unix seconds)."""

    entity: str
    operation: str  # Create, Update, Delete, Merge, Void or Emailed
    id: str
    at: float
    deleted_id: str | None = None  # a Merge's merged-away record


class QuickBooksCompany:
    """One QuickBooks company (realm): customers, invoices, payments and accounts in API shape, the log of
    hard-deleted (and merged-away) records per entity, times, knobs.

    Every change made after generation is reported to ``on_change`` (the emulator's webhooks), one list
    per call that made it, as QuickBooks reports the changes of one aggregation window together.
    """

    def __init__(self, spec: Mapping[str, Any], *, now: int) -> None:
        self.spec = dict(spec)
        self.realm_id: str = spec["id"]
        self.name: str = spec["name"]
        self.client_id: str = spec["client_id"]
        self.environment: str = spec["environment"]
        self.seed: int = spec["seed"]
        self.tz = _parse_offset(spec["utc_offset"])
        self.offset = _offset_text(self.tz)
        self._shift = int(self.tz.utcoffset(None).total_seconds())
        self._dates: dict[int, str] = {}
        self.home_currency: str = spec["home_currency"]
        self.created_at = now
        # Id -> API record; times kept apart as floats (created, last updated) in unix seconds.
        self.invoices: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, dict[str, Any]] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        self.times: dict[str, dict[str, list[float]]] = {entity: {} for entity in ENTITIES}
        self.deleted: dict[str, float] = {}  # hard-deleted invoice id -> time of the delete
        # Per entity: ids gone from queries (hard-deleted, or merged away) -> when; Change Data Capture's stubs.
        self.removed: dict[str, dict[str, float]] = {"Invoice": self.deleted, "Customer": {}, "Payment": {},
                                                     "Account": {}}  # fmt: skip
        self.next_id = 1
        self.next_doc = 1001
        self.version = 0
        self._cache: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
        self._rng = _Rng(f"quickbooks-changes:{self.seed}")
        self.on_change: Callable[[QuickBooksCompany, list[DataChange]], None] | None = None
        self._pending: list[DataChange] = []
        self._depth = 0
        self._generate(now)

    # --- helpers ------------------------------------------------------------------------------------------

    def _local_day(self, ts: float) -> tuple[str, int]:
        day, rem = divmod(math.floor(ts) + self._shift, _DAY)
        date = self._dates.get(day)
        if date is None:
            date = self._dates[day] = dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
        return date, rem

    def stamp(self, ts: float) -> str:
        """``MetaData`` time: whole seconds with the company's UTC offset."""
        date, rem = self._local_day(ts)
        return f"{date}T{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}{self.offset}"

    def response_time(self, now: float) -> str:
        """The ``time`` of a response: milliseconds and the company's offset."""
        d = dt.datetime.fromtimestamp(now, self.tz)
        return d.strftime("%Y-%m-%dT%H:%M:%S") + f".{d.microsecond // 1000:03d}" + self.offset

    def _date(self, ts: float) -> str:
        return self._local_day(ts)[0]

    def table(self, entity: str) -> dict[str, dict[str, Any]]:
        """The records of ``Invoice``, ``Customer``, ``Payment`` or ``Account``."""
        return {"Invoice": self.invoices, "Customer": self.customers, "Payment": self.payments,
                "Account": self.accounts}[entity]  # fmt: skip

    def entity_of(self, oid: str) -> str | None:
        """The entity holding record ``oid`` (the emulator never gives two entities one id), if any."""
        for entity in ("Invoice", "Customer", "Payment"):
            if oid in self.table(entity):
                return entity
        return None

    def _alloc_id(self, gap: int = 0) -> str:
        oid = str(self.next_id + gap)
        self.next_id += gap + 1
        return oid

    def _touch(self) -> None:
        self.version += 1
        self._cache.clear()

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        """Collect the changes of one outermost call and report them together when it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending:
                changes, self._pending = self._pending, []
                if self.on_change is not None:
                    self.on_change(self, changes)

    def _record(self, entity: str, operation: str, oid: str, at: float, deleted_id: str | None = None) -> None:
        self._pending.append(DataChange(entity, operation, oid, at, deleted_id))

    def _set_times(self, entity: str, oid: str, created: float, updated: float) -> None:
        rec = self.table(entity)[oid]
        rec["MetaData"] = {"CreateTime": self.stamp(created), "LastUpdatedTime": self.stamp(updated)}
        self.times[entity][oid] = [created, updated]

    def counts(self) -> dict[str, int]:
        """Record counts for the control API."""
        return {
            "invoices": len(self.invoices),
            "customers": len(self.customers),
            "deleted_invoices": len(self.deleted),
            "voided_invoices": sum(1 for r in self.invoices.values() if r.get("PrivateNote") == "Voided"),
            "inactive_customers": sum(1 for r in self.customers.values() if not r.get("Active", True)),
            "merged_customers": len(self.removed["Customer"]),
            "payments": len(self.payments),
            "deleted_payments": len(self.removed["Payment"]),
            "voided_payments": sum(1 for r in self.payments.values() if r.get("PrivateNote") == "Voided"),
            "accounts": len(self.accounts),
        }

    # --- generation -------------------------------------------------------------------------------------

    def _generate(self, now: int) -> None:
        rng = _Rng(f"quickbooks:{self.seed}")
        spec = self.spec
        n_customers = spec["customers"]
        n_invoices = spec["invoices"]
        n_deleted = spec["deleted_invoices"]
        span = max(1.0, spec["days"] * _DAY)
        start = now - span
        currencies = spec["currencies"]
        names: set[str] = set()
        customer_created = sorted(start + rng.random() * span for _ in range(n_customers))
        for created in customer_created:
            self._new_customer(rng, created, currencies, names, now)
        customer_ids = list(self.customers)
        total = n_invoices + n_deleted
        deleted_slots = set(rng.sample(range(total), n_deleted)) if n_deleted else set()
        invoice_created = sorted(start + rng.random() * span for _ in range(total))
        balances: Counter[str] = Counter()
        for k, created in enumerate(invoice_created):
            if not customer_ids:
                break
            # A customer that already existed when the invoice was written.
            upto = max(1, bisect_right(customer_created, created))
            cid = customer_ids[rng.between(upto)]
            created = max(created, self.times["Customer"][cid][0])
            oid = self._new_invoice(rng, cid, created, now, gap=rng.pick((0, 0, 0, 1, 2)))
            if k in deleted_slots:
                self.deleted[oid] = created + rng.random() * (now - created)
                self._orphan_payments(oid, self.deleted[oid])
                self._drop_invoice(oid)
            else:
                balances[cid] += _cents(self.invoices[oid]["Balance"])
        for cid, rec in self.customers.items():
            rec["Balance"] = rec["BalanceWithJobs"] = _money(balances[cid])
        inactive_share = spec["inactive_share"]
        for cid in list(self.customers):
            if rng.random() < inactive_share:
                created, _ = self.times["Customer"][cid]
                self._deactivate(cid, created + rng.random() * (now - created))
        self._generate_accounts(start)
        # Hard-deleted payments, drawn apart so that the invoices and customers stay those of the seed.
        later = _Rng(f"quickbooks-payments:{self.seed}")
        share = spec.get("deleted_payment_share", 0.02)
        for pid in [pid for pid in self.payments if later.random() < share]:
            created = self.times["Payment"][pid][1]
            self._remove_payment(pid, created + later.random() * (now - created))
        self._touch()

    def _generate_accounts(self, at: float) -> None:
        currency = {"value": self.home_currency, "name": _CURRENCY_NAMES[self.home_currency]}
        for oid, name, classification, kind, subtype in _ACCOUNTS:
            self.accounts[oid] = {
                "Name": name, "SubAccount": False, "FullyQualifiedName": name, "Active": True,
                "Classification": classification, "AccountType": kind, "AccountSubType": subtype,
                "CurrentBalance": 0, "CurrentBalanceWithSubAccounts": 0, "CurrencyRef": dict(currency),
                "domain": "QBO", "sparse": False, "Id": oid, "SyncToken": "0", "MetaData": {},
            }  # fmt: skip
            self._set_times("Account", oid, at, at)

    def _new_customer(
        self, rng: _Rng, created: float, currencies: list[str], names: set[str], now: float, *, fresh: bool = False
    ) -> str:
        given, family = rng.pick(_GIVEN), rng.pick(_FAMILY)
        company = " ".join(rng.sample(_WORDS, 2)) if rng.random() < 0.7 else ""
        display = company or f"{given} {family}"
        base, n = display, 2
        while display in names:
            display = f"{base} {n}"
            n += 1
        names.add(display)
        currency = self.home_currency if rng.random() < 0.7 or len(currencies) == 1 else rng.pick(currencies[1:])
        city, state, postal = rng.pick(_CITIES)
        oid = self._alloc_id()
        rec: dict[str, Any] = {
            "Taxable": rng.random() < 0.6,
            "BillAddr": {
                "Id": str(rng.between(2, 500)),
                "Line1": f"{rng.between(10, 9999)} {rng.pick(_STREETS)}",
                "City": city,
                "CountrySubDivisionCode": state,
                "PostalCode": postal,
            },
            "Job": False,
            "BillWithParent": False,
            "Balance": 0.0,
            "BalanceWithJobs": 0.0,
            "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]},
            "PreferredDeliveryMethod": rng.pick(("Print", "Email", "None")),
            "IsProject": False,
            "ClientEntityId": "0",
            "domain": "QBO",
            "sparse": False,
            "Id": oid,
            "SyncToken": "0",
            "MetaData": {},
            "GivenName": given,
            "FamilyName": family,
            "FullyQualifiedName": display,
            "CompanyName": company or None,
            "DisplayName": display,
            "PrintOnCheckName": display,
            "Active": True,
            "PrimaryPhone": {"FreeFormNumber": f"({rng.between(200, 999)}) 555-{rng.between(1000, 9999)}"},
            "PrimaryEmailAddr": {"Address": f"{given.lower()}.{family.lower()}{oid}@example.com"},
        }
        if rec["CompanyName"] is None:
            del rec["CompanyName"]
        self.customers[oid] = rec
        updated = created
        if not fresh and rng.random() < 0.3:
            updated = created + rng.random() * (now - created)
            rec["SyncToken"] = str(rng.between(1, 4))
        self._set_times("Customer", oid, created, updated)
        return oid

    def _lines(self, rng: _Rng, taxable: bool) -> tuple[list[dict[str, Any]], int, int, int]:
        lines: list[dict[str, Any]] = []
        subtotal = taxable_sub = 0
        n = rng.pick((1, 1, 2, 2, 3, 4, 6))
        for i in range(n):
            item_id, item_name, price = rng.pick(_ITEMS)
            qty = rng.between(1, 11)
            amount = qty * price
            line_taxable = taxable and rng.random() < 0.7
            subtotal += amount
            if line_taxable:
                taxable_sub += amount
            lines.append(
                {
                    "Id": str(i + 1),
                    "LineNum": i + 1,
                    "Description": f"{item_name} ({qty} x {_money(price):.2f})",
                    "Amount": _money(amount),
                    "DetailType": "SalesItemLineDetail",
                    "SalesItemLineDetail": {
                        "ItemRef": {"value": item_id, "name": item_name},
                        "UnitPrice": _money(price),
                        "Qty": qty,
                        "ItemAccountRef": {"value": "79", "name": "Sales of Product Income"},
                        "TaxCodeRef": {"value": "TAX" if line_taxable else "NON"},
                    },
                }
            )
        if rng.random() < 0.1:
            lines.append(
                {
                    "Id": str(n + 1),
                    "LineNum": n + 1,
                    "Description": "Thank you for your order",
                    "DetailType": "DescriptionOnly",
                    "DescriptionLineDetail": {},
                }
            )
        lines.append({"Amount": _money(subtotal), "DetailType": "SubTotalLineDetail", "SubTotalLineDetail": {}})
        discount = 0
        if rng.random() < 0.1:
            percent = rng.pick((5, 10, 15))
            discount = (subtotal * percent + 50) // 100
            lines.append(
                {
                    "Amount": _money(discount),
                    "DetailType": "DiscountLineDetail",
                    "DiscountLineDetail": {
                        "PercentBased": True,
                        "DiscountPercent": percent,
                        "DiscountAccountRef": {"value": "86", "name": "Discounts given"},
                    },
                }
            )
        tax = (taxable_sub * 8 + 50) // 100
        return lines, subtotal, discount, tax

    def _new_invoice(
        self,
        rng: _Rng,
        cid: str,
        created: float,
        now: float,
        *,
        gap: int = 0,
        fresh: bool = False,
    ) -> str:
        customer = self.customers[cid]
        currency = customer["CurrencyRef"]["value"]
        lines, _subtotal, discount, tax = self._lines(rng, bool(customer.get("Taxable")))
        total = _subtotal - discount + tax
        oid = self._alloc_id(gap)
        term_id, term_days = rng.pick(_TERMS)
        txn_ts = created - rng.random() * 2 * _DAY if not fresh else created
        rec: dict[str, Any] = {
            "AllowIPNPayment": False,
            "AllowOnlinePayment": False,
            "AllowOnlineCreditCardPayment": False,
            "AllowOnlineACHPayment": False,
            "domain": "QBO",
            "sparse": False,
            "Id": oid,
            "SyncToken": "0",
            "MetaData": {},
            "CustomField": [],
            "DocNumber": str(self.next_doc),
            "TxnDate": self._date(txn_ts),
            "CurrencyRef": {"value": currency, "name": _CURRENCY_NAMES[currency]},
            "LinkedTxn": [],
            "Line": lines,
            "TxnTaxDetail": {"TotalTax": _money(tax)},
            "CustomerRef": {"value": cid, "name": customer["DisplayName"]},
            "CustomerMemo": {"value": rng.pick(_MEMOS)},
            "BillAddr": dict(customer["BillAddr"]),
            "FreeFormAddress": True,
            "SalesTermRef": {"value": term_id},
            "DueDate": self._date(txn_ts + term_days * _DAY),
            "TotalAmt": _money(total),
            "ApplyTaxAfterDiscount": False,
            "PrintStatus": rng.pick(("NotSet", "NeedToPrint")),
            "EmailStatus": rng.pick(("NotSet", "EmailSent", "NeedToSend")),
            "BillEmail": dict(customer["PrimaryEmailAddr"]),
            "Balance": _money(total),
            "Deposit": 0,
        }
        if tax:
            rec["TxnTaxDetail"]["TxnTaxCodeRef"] = {"value": "2"}
        if currency != self.home_currency:
            rate = _RATES_E4[currency] * 10000 // _RATES_E4[self.home_currency]
            rec["ExchangeRate"] = rate / 10000
            rec["HomeTotalAmt"] = _money(_home_cents(total, rate))
            rec["HomeBalance"] = rec["HomeTotalAmt"]
        self.next_doc += 1
        self.invoices[oid] = rec
        updated = created
        if not fresh:
            roll = rng.random()
            later = created + rng.random() * (now - created)
            if roll < 0.45:
                self._pay(rec, total, rng, later)
                updated = later
            elif roll < 0.55:
                self._pay(rec, rng.between(1, max(2, total)), rng, later)
                updated = later
            elif roll < 0.6:
                self._void_record(rec)
                updated = later
            elif roll < 0.7:
                rec["PrivateNote"] = "Reviewed"
                updated = later
            if updated != created:
                rec["SyncToken"] = str(rng.between(1, 4))
        self._set_times("Invoice", oid, created, updated)
        return oid

    def _pay(self, rec: dict[str, Any], cents: int, rng: _Rng, at: float) -> str | None:
        """Receive a payment of ``cents`` (at most the balance) against invoice ``rec`` at ``at``; its id."""
        balance = _cents(rec["Balance"])
        cents = min(cents, balance)
        if cents <= 0:
            return None
        self._set_balance(rec, balance - cents)
        pid = str(self.next_id + rng.between(0, 3))
        rec["LinkedTxn"] = [*rec["LinkedTxn"], {"TxnId": pid, "TxnType": "Payment"}]
        self.next_id += 3
        self._new_payment(pid, rec, cents, at)
        return pid

    def _new_payment(self, pid: str, invoice: Mapping[str, Any], cents: int, at: float) -> None:
        """A received payment applied to one invoice (no draws from the generator: the seed's data stays put)."""
        cid = invoice["CustomerRef"]["value"]
        number = int(pid)
        rec: dict[str, Any] = {
            "CustomerRef": {"value": cid, "name": self.customers[cid]["DisplayName"]},
            "DepositToAccountRef": {"value": "4" if number % 3 else "35"},
            "TotalAmt": _money(cents),
            "UnappliedAmt": 0.0,
            "ProcessPayment": False,
            "domain": "QBO",
            "sparse": False,
            "Id": pid,
            "SyncToken": "0",
            "MetaData": {},
            "TxnDate": self._date(at),
            "CurrencyRef": dict(invoice["CurrencyRef"]),
            "PaymentRefNum": str(4000 + number),
            "Line": [{"Amount": _money(cents), "LinkedTxn": [{"TxnId": invoice["Id"], "TxnType": "Invoice"}]}],
        }
        if "ExchangeRate" in invoice:
            rec["ExchangeRate"] = invoice["ExchangeRate"]
        self.payments[pid] = rec
        self._set_times("Payment", pid, at, at)

    def _invoices_paid_by(self, pid: str) -> list[tuple[str, int]]:
        """(invoice id, cents) of each line of payment ``pid`` applied to an invoice still there."""
        found = []
        for line in self.payments[pid].get("Line") or []:
            for link in line.get("LinkedTxn") or []:
                if link.get("TxnType") == "Invoice" and link.get("TxnId") in self.invoices:
                    found.append((link["TxnId"], _cents(line.get("Amount"))))
        return found

    def _unapply(self, pid: str, at: float) -> list[str]:
        """Give the invoices payment ``pid`` paid their balance back (a payment voided or deleted); their ids."""
        touched = []
        for iid, cents in self._invoices_paid_by(pid):
            invoice = self.invoices[iid]
            self._set_balance(invoice, _cents(invoice["Balance"]) + cents)
            self._adjust_customer(invoice["CustomerRef"]["value"], cents, at)
            invoice["LinkedTxn"] = [t for t in invoice["LinkedTxn"] if t.get("TxnId") != pid]
            invoice["SyncToken"] = str(int(invoice["SyncToken"]) + 1)
            created, updated = self.times["Invoice"][iid]
            self._set_times("Invoice", iid, created, max(updated, at))
            touched.append(iid)
        return touched

    def _remove_payment(self, pid: str, at: float) -> list[str]:
        touched = self._unapply(pid, at)
        del self.payments[pid]
        del self.times["Payment"][pid]
        self.removed["Payment"][pid] = at
        return touched

    def _orphan_payments(self, iid: str, at: float, into: str | None = None) -> list[str]:
        """Payments applied to invoice ``iid``, which is going away: moved to invoice ``into`` (a merge) or
        left unapplied (a delete), each with a new ``SyncToken`` and update time; their ids."""
        changed = []
        for link in self.invoices[iid].get("LinkedTxn") or []:
            pid = link.get("TxnId")
            rec = self.payments.get(pid) if link.get("TxnType") == "Payment" else None
            if rec is None:
                continue
            for line in rec.get("Line") or []:
                if any(t.get("TxnId") == iid for t in line.get("LinkedTxn") or []):
                    if into is None:
                        rec["UnappliedAmt"] = _money(_cents(rec.get("UnappliedAmt")) + _cents(line.get("Amount")))
                        line["LinkedTxn"] = [t for t in line["LinkedTxn"] if t.get("TxnId") != iid]
                    else:
                        line["LinkedTxn"] = [{**t, "TxnId": into} if t.get("TxnId") == iid else t
                                             for t in line["LinkedTxn"]]  # fmt: skip
            rec["Line"] = [line for line in rec["Line"] if line.get("LinkedTxn") or into is not None]
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            created, updated = self.times["Payment"][pid]
            self._set_times("Payment", pid, created, max(updated, at))
            changed.append(pid)
        if into is not None:
            moved = [t for t in self.invoices[iid].get("LinkedTxn") or [] if t.get("TxnType") == "Payment"]
            self.invoices[into]["LinkedTxn"] = [*self.invoices[into]["LinkedTxn"], *moved]
        return changed

    def _set_balance(self, rec: dict[str, Any], cents: int) -> None:
        rec["Balance"] = _money(cents)
        if "ExchangeRate" in rec:
            rec["HomeBalance"] = _money(_home_cents(cents, round(rec["ExchangeRate"] * 10000)))

    @staticmethod
    def _void_record(rec: dict[str, Any]) -> None:
        for line in rec["Line"]:
            if "Amount" in line:
                line["Amount"] = 0.0
            detail = line.get("SalesItemLineDetail")
            if detail is not None:
                detail["Qty"] = 0
        rec["TxnTaxDetail"] = {"TotalTax": 0.0}
        rec["TotalAmt"] = 0.0
        rec["Balance"] = 0.0
        if "ExchangeRate" in rec:
            rec["HomeTotalAmt"] = 0.0
            rec["HomeBalance"] = 0.0
        rec["PrivateNote"] = "Voided"

    def _drop_invoice(self, oid: str) -> None:
        del self.invoices[oid]
        del self.times["Invoice"][oid]

    def _deactivate(self, cid: str, when: float) -> None:
        rec = self.customers[cid]
        rec["Active"] = False
        for key in ("DisplayName", "FullyQualifiedName", "PrintOnCheckName"):
            if not str(rec.get(key, "")).endswith(" (deleted)"):
                rec[key] = f"{rec[key]} (deleted)"
        rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
        self._set_times("Customer", cid, self.times["Customer"][cid][0], when)

    def _adjust_customer(self, cid: str, delta_cents: int, at: float | None = None) -> None:
        """Move a customer's open balance; at ``at`` (after generation) that is a change of the customer: its
        update time moves, and a change being reported reports it too (a balance is a field like any other)."""
        customer = self.customers.get(cid)
        if customer is None or delta_cents == 0:
            return
        value = _money(_cents(customer.get("Balance")) + delta_cents)
        customer["Balance"] = customer["BalanceWithJobs"] = value
        if at is not None:
            created, updated = self.times["Customer"][cid]
            self._set_times("Customer", cid, created, max(updated, at))
            if self._depth:
                self._record("Customer", "Update", cid, at)

    # --- changes (control API) --------------------------------------------------------------------------

    def apply_changes(self, changes: Mapping[str, int], now: float) -> dict[str, list[str]]:
        """Edit, void, hard-delete and create invoices; deactivate, edit, create and merge customers; void and
        hard-delete payments; at ``now``."""
        with self._reporting():
            return self._apply_changes(changes, now)

    def _apply_changes(self, changes: Mapping[str, int], now: float) -> dict[str, list[str]]:
        rng = self._rng
        out: dict[str, list[str]] = {
            "edited": [],
            "voided": [],
            "deleted": [],
            "created": [],
            "archived": [],
            "customers_edited": [],
            "customers_created": [],
            "customers_merged": [],
            "payments_voided": [],
            "payments_deleted": [],
        }
        live = [oid for oid, rec in self.invoices.items() if rec.get("PrivateNote") != "Voided"]
        rng.shuffle(live)
        for oid in live[: changes.get("edits", 0)]:
            self._record("Invoice", self._edit_invoice(oid, now, rng), oid, now)
            out["edited"].append(oid)
        live = live[changes.get("edits", 0) :]
        for oid in live[: changes.get("voids", 0)]:
            self.void_invoice(oid, now)
            out["voided"].append(oid)
        live = live[changes.get("voids", 0) :]
        pool = live + [oid for oid, rec in self.invoices.items() if rec.get("PrivateNote") == "Voided"]
        for oid in pool[: changes.get("deletes", 0)]:
            self.delete_invoice(oid, now)
            out["deleted"].append(oid)
        active = [cid for cid, rec in self.customers.items() if rec.get("Active", True)]
        rng.shuffle(active)
        for cid in active[: changes.get("archives", 0)]:
            self._deactivate(cid, now)
            self._record("Customer", "Update", cid, now)
            out["archived"].append(cid)
        active = [cid for cid in active[changes.get("archives", 0) :]]
        for cid in active[: changes.get("customer_edits", 0)]:
            rec = self.customers[cid]
            rec["PrimaryPhone"] = {"FreeFormNumber": f"({rng.between(200, 999)}) 555-{rng.between(1000, 9999)}"}
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Customer", cid, self.times["Customer"][cid][0], now)
            self._record("Customer", "Update", cid, now)
            out["customers_edited"].append(cid)
        currencies = self.spec["currencies"]
        names = {rec["DisplayName"] for rec in self.customers.values()}
        for _ in range(changes.get("customer_creates", 0)):
            cid = self._new_customer(rng, now, currencies, names, now, fresh=True)
            self._record("Customer", "Create", cid, now)
            out["customers_created"].append(cid)
        targets = [cid for cid, rec in self.customers.items() if rec.get("Active", True)]
        for _ in range(changes.get("creates", 0)):
            if not targets:
                break
            cid = rng.pick(targets)
            oid = self._new_invoice(rng, cid, now, now, fresh=True)
            self._adjust_customer(cid, _cents(self.invoices[oid]["Balance"]), now)
            self._record("Invoice", "Create", oid, now)
            out["created"].append(oid)
        payments = [pid for pid, rec in self.payments.items() if rec.get("PrivateNote") != "Voided"]
        rng.shuffle(payments)
        voids, deletes = changes.get("payment_voids", 0), changes.get("payment_deletes", 0)
        for pid in payments[:voids]:
            self.void_payment(pid, now)
            out["payments_voided"].append(pid)
        for pid in payments[voids : voids + deletes]:
            self.delete_payment(pid, now)
            out["payments_deleted"].append(pid)
        for _ in range(changes.get("customer_merges", 0)):
            active = [cid for cid, rec in self.customers.items() if rec.get("Active", True)]
            if len(active) < 2:
                break
            source, target = rng.sample(active, 2)
            self.merge_customers(source, target, now)
            out["customers_merged"].append(source)
        self._touch()
        return out

    def _edit_invoice(self, oid: str, now: float, rng: _Rng) -> str:
        """Pay, email or annotate an invoice; returns the webhook operation (``Emailed`` or ``Update``)."""
        rec = self.invoices[oid]
        operation = "Update"
        balance = _cents(rec["Balance"])
        roll = rng.random()
        if balance > 0 and roll < 0.5:
            paid = balance if rng.random() < 0.7 else rng.between(1, balance + 1)
            before = balance
            pid = self._pay(rec, paid, rng, now)
            self._adjust_customer(rec["CustomerRef"]["value"], _cents(rec["Balance"]) - before, now)
            if pid is not None:
                self._record("Payment", "Create", pid, now)
        elif roll < 0.75:
            rec["CustomerMemo"] = {"value": rng.pick(_MEMOS)}
            rec["EmailStatus"] = "EmailSent"
            operation = "Emailed"
        else:
            rec["PrivateNote"] = f"Edited {self.stamp(now)}"
        rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
        self._set_times("Invoice", oid, self.times["Invoice"][oid][0], now)
        return operation

    def void_invoice(self, oid: str, now: float) -> None:
        """Void: zero amounts and quantities, ``Voided`` private note, new ``SyncToken`` and update time."""
        with self._reporting():
            rec = self.invoices[oid]
            self._adjust_customer(rec["CustomerRef"]["value"], -_cents(rec["Balance"]), now)
            self._void_record(rec)
            for pid in self._orphan_payments(oid, now):
                self._record("Payment", "Update", pid, now)
            rec["LinkedTxn"] = [t for t in rec["LinkedTxn"] if t.get("TxnType") != "Payment"]
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Invoice", oid, self.times["Invoice"][oid][0], now)
            self._touch()
            self._record("Invoice", "Void", oid, now)

    def delete_invoice(self, oid: str, now: float) -> None:
        """Hard delete: gone from query and read-one, kept as a ``Deleted`` stub for CDC."""
        with self._reporting():
            rec = self.invoices[oid]
            self._adjust_customer(rec["CustomerRef"]["value"], -_cents(rec["Balance"]), now)
            for pid in self._orphan_payments(oid, now):
                self._record("Payment", "Update", pid, now)
            self._drop_invoice(oid)
            self.deleted[oid] = now
            self._touch()
            self._record("Invoice", "Delete", oid, now)

    def merge_invoices(self, source: str, target: str, now: float) -> dict[str, Any]:
        """Merge invoice ``source`` into ``target`` (same currency, neither voided) at ``now``.

        ``target`` takes over ``source``'s lines, tax, total and balance, with a new ``SyncToken`` and
        update time; ``source`` is gone as a hard delete leaves it (a ``Deleted`` stub in CDC).
        """
        if source == target:
            raise ValueError("an invoice cannot be merged into itself")
        for oid in (source, target):
            if oid not in self.invoices:
                raise LookupError(f"no invoice {oid}")
            if self.invoices[oid].get("PrivateNote") == "Voided":
                raise ValueError(f"invoice {oid} is voided")
        old, rec = self.invoices[source], self.invoices[target]
        if old["CurrencyRef"]["value"] != rec["CurrencyRef"]["value"]:
            raise ValueError("only invoices in the same currency can be merged")
        with self._reporting():
            moved = [dict(line) for line in old["Line"] if line.get("DetailType") != "SubTotalLineDetail"]
            lines = [line for line in rec["Line"] if line.get("DetailType") != "SubTotalLineDetail"]
            numbered = [line for line in [*lines, *moved] if "LineNum" in line]
            for n, line in enumerate(numbered, start=1):
                line["Id"], line["LineNum"] = str(n), n
            subtotal = sum(_cents(line.get("Amount")) for line in (old["Line"] + rec["Line"])
                           if line.get("DetailType") == "SubTotalLineDetail")  # fmt: skip
            rec["Line"] = [*lines, *moved, {"Amount": _money(subtotal), "DetailType": "SubTotalLineDetail",
                                            "SubTotalLineDetail": {}}]  # fmt: skip
            tax = _cents(rec["TxnTaxDetail"].get("TotalTax")) + _cents(old["TxnTaxDetail"].get("TotalTax"))
            rec["TxnTaxDetail"]["TotalTax"] = _money(tax)
            total = _cents(rec["TotalAmt"]) + _cents(old["TotalAmt"])
            rec["TotalAmt"] = _money(total)
            if "ExchangeRate" in rec:
                rec["HomeTotalAmt"] = _money(_home_cents(total, round(rec["ExchangeRate"] * 10000)))
            moved_balance = _cents(old["Balance"])
            self._set_balance(rec, _cents(rec["Balance"]) + moved_balance)
            self._adjust_customer(old["CustomerRef"]["value"], -moved_balance, now)
            self._adjust_customer(rec["CustomerRef"]["value"], moved_balance, now)
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Invoice", target, self.times["Invoice"][target][0], now)
            for pid in self._orphan_payments(source, now, into=target):
                self._record("Payment", "Update", pid, now)
            self._drop_invoice(source)
            self.deleted[source] = now
            self._touch()
            self._record("Invoice", "Merge", target, now, deleted_id=source)
        return rec

    def void_payment(self, pid: str, now: float) -> dict[str, Any]:
        """Void: the invoices it paid are owed again; amounts zeroed, ``Voided`` private note, new ``SyncToken``."""
        with self._reporting():
            rec = self.payments[pid]
            for iid in self._unapply(pid, now):
                self._record("Invoice", "Update", iid, now)
            rec["TotalAmt"] = rec["UnappliedAmt"] = 0.0
            for line in rec.get("Line") or []:
                line["Amount"] = 0.0
            rec["PrivateNote"] = "Voided"
            rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
            self._set_times("Payment", pid, self.times["Payment"][pid][0], now)
            self._touch()
            self._record("Payment", "Void", pid, now)
        return rec

    def delete_payment(self, pid: str, now: float) -> None:
        """Hard delete: the invoices it paid are owed again; gone from queries, a ``Deleted`` stub for CDC."""
        with self._reporting():
            for iid in self._remove_payment(pid, now):
                self._record("Invoice", "Update", iid, now)
            self._touch()
            self._record("Payment", "Delete", pid, now)

    def merge_customers(self, source: str, target: str, now: float) -> dict[str, Any]:
        """Merge customer ``source`` into ``target`` at ``now``: its invoices and payments (and balance) move to
        ``target``; ``source`` leaves the queries and Change Data Capture reports it ``Deleted``."""
        if source == target:
            raise ValueError("a customer cannot be merged into itself")
        for cid in (source, target):
            if cid not in self.customers:
                raise LookupError(f"no customer {cid}")
        into = self.customers[target]
        with self._reporting():
            for entity in ("Invoice", "Payment"):
                for oid, rec in self.table(entity).items():
                    if rec["CustomerRef"]["value"] == source:
                        rec["CustomerRef"] = {"value": target, "name": into["DisplayName"]}
                        rec["SyncToken"] = str(int(rec["SyncToken"]) + 1)
                        self._set_times(entity, oid, self.times[entity][oid][0], now)
                        self._record(entity, "Update", oid, now)
            self._adjust_customer(target, _cents(self.customers[source].get("Balance")))
            into["SyncToken"] = str(int(into["SyncToken"]) + 1)
            self._set_times("Customer", target, self.times["Customer"][target][0], now)
            del self.customers[source]
            del self.times["Customer"][source]
            self.removed["Customer"][source] = now
            self._touch()
            self._record("Customer", "Merge", target, now, deleted_id=source)
        return into

    # --- control records --------------------------------------------------------------------------------

    def add_record(self, entity: str, fields: Mapping[str, Any], updated_at: float) -> dict[str, Any]:
        """Create an invoice, customer or payment at ``updated_at`` with ``fields`` overriding the generated values.

        A payment pays an open invoice's whole balance (``{"invoice": id}`` names it, else one is picked)."""
        rng = self._rng
        if entity == "Payment":
            return self._add_payment(fields, updated_at)
        if entity == "Customer":
            names = {rec["DisplayName"] for rec in self.customers.values()}
            currencies = self.spec["currencies"]
            oid = self._new_customer(rng, updated_at, currencies, names, updated_at, fresh=True)
        else:
            ref = fields.get("CustomerRef")
            cid = str(ref.get("value")) if isinstance(ref, Mapping) else None
            if cid is None:
                active = [c for c, rec in self.customers.items() if rec.get("Active", True)]
                if not active:
                    raise ValueError("the company has no active customer to invoice")
                cid = rng.pick(active)
            elif cid not in self.customers:
                raise ValueError(f"no customer {cid}")
            oid = self._new_invoice(rng, cid, updated_at, updated_at, fresh=True)
        rec = self.table(entity)[oid]
        rec.update({k: v for k, v in fields.items() if k not in ("Id", "MetaData")})
        self._set_times(entity, oid, updated_at, updated_at)
        with self._reporting():
            self._record(entity, "Create", oid, updated_at)
            if entity == "Invoice":
                self._adjust_customer(rec["CustomerRef"]["value"], _cents(rec["Balance"]), updated_at)
        self._touch()
        return rec

    def _add_payment(self, fields: Mapping[str, Any], updated_at: float) -> dict[str, Any]:
        iid = fields.get("invoice")
        if iid is None:
            owed = [i for i, rec in self.invoices.items() if _cents(rec["Balance"]) > 0]
            if not owed:
                raise ValueError("the company has no open invoice to pay")
            iid = self._rng.pick(owed)
        invoice = self.invoices.get(str(iid))
        if invoice is None or _cents(invoice["Balance"]) <= 0:
            raise ValueError(f"no open invoice {iid}")
        with self._reporting():
            cents = _cents(invoice["Balance"])
            pid = self._pay(invoice, cents, self._rng, updated_at)
            assert pid is not None
            self._adjust_customer(invoice["CustomerRef"]["value"], -cents, updated_at)
            invoice["SyncToken"] = str(int(invoice["SyncToken"]) + 1)
            self._set_times("Invoice", invoice["Id"], self.times["Invoice"][invoice["Id"]][0], updated_at)
            rec = self.payments[pid]
            rec.update({k: v for k, v in fields.items() if k not in ("Id", "MetaData", "invoice")})
            self._touch()
            self._record("Payment", "Create", pid, updated_at)
            self._record("Invoice", "Update", invoice["Id"], updated_at)
        return rec

    def update_record(self, entity: str, oid: str, fields: Mapping[str, Any], updated_at: float) -> dict[str, Any]:
        """Merge ``fields`` into a record, bump ``SyncToken`` and set its update time."""
        rec = self.table(entity)[oid]
        sync = str(int(rec["SyncToken"]) + 1)
        rec.update({k: v for k, v in fields.items() if k not in ("Id", "MetaData")})
        if "SyncToken" not in fields:
            rec["SyncToken"] = sync
        self._set_times(entity, oid, self.times[entity][oid][0], updated_at)
        self._touch()
        with self._reporting():
            self._record(entity, "Update", oid, updated_at)
        return rec

    def export(self, entity: str) -> dict[str, Any]:
        """Every current record (full API shape) and the ids hard-deleted (or merged away) so far."""
        table = self.table(entity)
        records = [table[oid] for oid in sorted(table, key=int)]
        deleted = sorted(self.removed[entity], key=int)
        return {"records": records, "deleted_ids": deleted}

    def company_info(self) -> dict[str, Any]:
        """The ``CompanyInfo`` entity of this realm."""
        stamp = self.stamp(self.created_at)
        return {
            "CompanyName": self.name,
            "LegalName": self.name,
            "CompanyAddr": {"Id": "1", "Line1": "123 Sierra Way", "City": "San Pablo", "PostalCode": "87999"},
            "Country": "US",
            "SupportedLanguages": "en",
            "DefaultTimeZone": f"UTC{self.offset}",
            "domain": "QBO",
            "sparse": False,
            "Id": "1",
            "SyncToken": "0",
            "MetaData": {"CreateTime": stamp, "LastUpdatedTime": stamp},
            "NameValue": [{"Name": "HomeCurrency", "Value": self.home_currency}],
        }

    # --- query ------------------------------------------------------------------------------------------

    def _field_value(self, entity: str, oid: str, rec: Mapping[str, Any], name: str) -> Any:
        if name == "metadata.lastupdatedtime":
            return math.floor(self.times[entity][oid][1])
        if name == "metadata.createtime":
            return math.floor(self.times[entity][oid][0])
        if name == "id":
            return int(oid)
        if name == "active":
            return bool(rec.get("Active", True))
        if name == "customerref":
            return int(rec["CustomerRef"]["value"])
        if name == "totalamt" or name == "balance":
            return _cents(rec.get("TotalAmt" if name == "totalamt" else "Balance"))
        key = _QUERYABLE[entity][name]
        return rec.get(key)

    def _predicate(self, entity: str, cond: Condition) -> Callable[[str, Mapping[str, Any]], bool]:
        name = cond.field.lower()
        if name not in _QUERYABLE[entity]:
            raise _validation_error(f"property '{cond.field}' is not queryable")
        kind = _FIELD_KINDS.get(name, "string")
        values = [self._coerce(kind, cond.field, v) for v in cond.values]
        op = cond.op
        if (op == "like" and kind != "string") or (kind == "bool" and op not in ("=", "!=", "in")):
            raise _validation_error(f"operator '{op.upper()}' is not supported for property '{cond.field}'")
        if op == "like":
            pattern = re.compile(
                "^" + ".*".join(re.escape(p) for p in str(values[0]).split("%")) + "$", re.IGNORECASE | re.DOTALL
            )

            def like(oid: str, rec: Mapping[str, Any]) -> bool:
                value = self._field_value(entity, oid, rec, name)
                return value is not None and pattern.match(str(value)) is not None

            return like
        if op == "in":
            wanted = set(values)
            return lambda oid, rec: self._field_value(entity, oid, rec, name) in wanted
        target = values[0]
        compare = _OPS[op]

        def test(oid: str, rec: Mapping[str, Any]) -> bool:
            value = self._field_value(entity, oid, rec, name)
            return value is not None and compare(value, target)

        return test

    def _coerce(self, kind: str, name: str, value: Any) -> Any:
        try:
            if kind == "datetime":
                if isinstance(value, bool):
                    raise ValueError
                return _parse_when(str(value), self.tz)
            if kind == "int":
                return int(str(value))
            if kind == "money":
                return round(float(str(value)) * 100)
            if kind == "bool":
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("true", "false"):
                    return str(value).lower() == "true"
                raise ValueError
        except ValueError:
            raise _validation_error(f"Invalid value '{value}' for property '{name}'") from None
        return value if isinstance(value, str) else str(value)

    def _sort_key(self, entity: str, name: str) -> Callable[[str], Any]:
        lname = name.lower()
        if lname not in _QUERYABLE[entity]:
            raise _validation_error(f"property '{name}' is not queryable")
        table = self.table(entity)
        if lname in ("metadata.lastupdatedtime", "metadata.createtime"):
            slot = 1 if lname == "metadata.lastupdatedtime" else 0
            times = self.times[entity]
            return lambda oid: math.floor(times[oid][slot])
        if lname in ("id", "customerref", "totalamt", "balance", "active"):
            return lambda oid: self._field_value(entity, oid, table[oid], lname)
        return lambda oid: str(self._field_value(entity, oid, table[oid], lname) or "").lower()

    def select(self, q: Query) -> list[str]:
        """Ids matching ``q`` in its order (cached per data version, so paging costs one slice)."""
        key = (q.entity, q.where, q.order, self.version)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        table = self.table(q.entity)
        preds = [self._predicate(q.entity, c) for c in q.where]
        if q.entity in ("Customer", "Account") and not any(c.field.lower() == "active" for c in q.where):
            preds.append(lambda oid, rec: bool(rec.get("Active", True)))
        ids = sorted(table, key=int)
        if preds:
            ids = [oid for oid in ids if all(p(oid, table[oid]) for p in preds)]
        for name, desc in reversed(q.order):
            ids.sort(key=self._sort_key(q.entity, name), reverse=desc)
        self._cache[key] = ids
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return ids

    def query(self, q: Query) -> dict[str, Any]:
        """The ``QueryResponse`` object for a parsed query."""
        entity = _ENTITY_NAMES.get(q.entity.lower())
        if entity is None:
            raise _validation_error(f"Invalid entity name: {q.entity}")
        q = Query(entity, q.count, q.fields, q.where, q.order, q.start, q.max_results)
        if entity not in ENTITIES:
            if entity == "CompanyInfo" and not q.where:
                rows = [self.company_info()]
                if q.count:
                    return {"totalCount": 1}
                if q.start > 1:
                    return {}
                return {entity: rows, "startPosition": q.start, "maxResults": 1}
            return {"totalCount": 0} if q.count else {}
        ids = self.select(q)
        if q.count:
            return {"totalCount": len(ids)}
        limit = min(q.max_results, MAX_RESULTS_CAP)
        page = ids[q.start - 1 : q.start - 1 + limit]
        if not page:
            return {}
        table = self.table(entity)
        rows = [table[oid] for oid in page]
        if q.fields is not None:
            rows = [_project(rec, q.fields) for rec in rows]
        return {entity: rows, "startPosition": q.start, "maxResults": len(rows)}

    # --- change data capture ----------------------------------------------------------------------------

    def cdc(self, entities: list[str], since: float, cap: int) -> list[dict[str, Any]]:
        """CDC blocks: per entity the changed records (full) and deleted stubs, oldest first, ``cap`` overall."""
        found: list[tuple[float, int, str, dict[str, Any]]] = []
        for entity in entities:
            if entity not in ENTITIES:
                continue
            table = self.table(entity)
            for oid, (_created, updated) in self.times[entity].items():
                if math.floor(updated) >= since:
                    found.append((math.floor(updated), int(oid), entity, table[oid]))
            for oid, when in self.removed[entity].items():
                if math.floor(when) >= since:
                    stub = {
                        "domain": "QBO",
                        "status": "Deleted",
                        "Id": oid,
                        "MetaData": {"LastUpdatedTime": self.stamp(when)},
                    }
                    found.append((math.floor(when), int(oid), entity, stub))
        found.sort(key=lambda row: (row[0], row[1]))
        found = found[:cap]
        blocks: list[dict[str, Any]] = []
        for entity in entities:
            rows = [row[3] for row in found if row[2] == entity]
            if rows:
                blocks.append({entity: rows, "startPosition": 1, "maxResults": len(rows)})
        return blocks or [{}]
