"""Xero organisations for the sandbox: deterministic contacts, invoices and payments, their changes and dates.

``XeroTenant`` generates an organisation from a seed and applies the control API's changes and records;
the date helpers give Xero's ``/Date(ms+0000)/`` form and read ``If-Modified-Since``. A payment is a record
of its own (``GET /Payments``) as well as an entry of its invoice's ``Payments``: deleting one leaves it
readable with status ``DELETED`` and reopens its invoice.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nextcrm_sandbox.control import ControlError

_DAY_MS = 86_400_000
_INVOICE_STATUSES = ("DRAFT", "SUBMITTED", "AUTHORISED", "PAID", "VOIDED", "DELETED")


@dataclass(slots=True)
class _Settings:
    """Per-tenant knobs (see ``XeroSandbox.normalise_spec``)."""

    minute_limit: int = 60
    day_limit: int = 5000
    concurrent_limit: int = 5
    app_minute_limit: int = 10_000
    minute_window_seconds: float = 60.0
    day_window_seconds: float = 86_400.0
    updated_date_utc_string: bool = True
    contacts_updated_date_utc_string: bool = False
    msdate_offset: bool = True
    default_page_size: int = 100
    max_page_size: int = 1000
    max_ids: int = 52
    unpaged_limit: int | None = None
    provider_name: str = "NextCRM Sandbox"
    # X-Rate-Limit-Problem values seen only as "minute" and "day"; these two are unverified.
    concurrent_problem: str = "concurrent"
    app_minute_problem: str = "appminute"
    # The scopes of the organisation's custom connection: what a client_credentials token carries.
    custom_connection_scope: str = "accounting.transactions accounting.contacts accounting.settings"
    # How long (sandbox seconds) a write's `Idempotency-Key` is remembered: Xero keeps one 6 minutes.
    idempotency_window_seconds: float = 360.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------
# Dates
# ---------------------------------------------------------------------------------------------------------


def format_msdate(ms: int, offset: bool = True) -> str:
    """Xero's .NET JSON date: ``/Date(1539993600000+0000)/`` (or ``/Date(1539993600000)/`` without offset)."""
    return f"/Date({ms}+0000)/" if offset else f"/Date({ms})/"


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _iso_seconds(ms: int) -> str:
    return _utc(ms).strftime("%Y-%m-%dT%H:%M:%S")


def _iso_connection(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0"


def _midnight(ms: int) -> int:
    return ms - ms % _DAY_MS


def parse_if_modified_since(value: str) -> int | None:
    """The ``If-Modified-Since`` header as unix milliseconds at whole-second precision, or None if unreadable.

    ISO 8601 is Xero's format (``2024-01-31T00:00:00``, optional ``Z``/offset, fractions dropped; no zone
    means UTC); an RFC 7231 HTTP-date is read too. Records with ``UpdatedDateUTC`` at or after that second
    are returned, so a record updated exactly at midnight belongs to the request for the day it opens.
    """
    text = value.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp()) * 1000


_MSDATE_RE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")


def _parse_date_field(value: Any, name: str) -> int:
    """A control-API date: ``YYYY-MM-DD``, an ISO date-time, ``/Date(ms)/`` or unix milliseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _MSDATE_RE.match(value)
        if m:
            return int(m.group(1))
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return int(moment.timestamp() * 1000)
    raise ControlError(400, f"{name} must be YYYY-MM-DD, an ISO date-time, /Date(ms)/ or milliseconds")


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


def _round_div(num: int, den: int) -> int:
    """Integer division rounding half away from zero."""
    q, r = divmod(abs(num), den)
    if 2 * r >= den:
        q += 1
    return q if num >= 0 else -q


def _money(cents: int) -> float:
    return cents / 100


@dataclass(slots=True)
class _Line:
    id: str
    description: str
    quantity: int  # ten-thousandths
    unit: int  # unit amount in ten-thousandths of the currency unit
    account_code: str
    tax_type: str
    item_code: str | None = None
    amount: int = 0  # cents
    tax: int = 0  # cents


@dataclass(slots=True)
class _Payment:
    """A payment against an invoice (ACCRECPAYMENT or ACCPAYPAYMENT), AUTHORISED or DELETED."""

    seq: int
    id: str
    invoice_id: str
    date: int  # ms, midnight UTC of the day paid
    amount: int  # cents, in the invoice's currency
    rate: int  # millionths: the invoice's currency rate when paid
    account: int  # index into the organisation's bank accounts
    reconciled: bool
    created: int
    updated: int
    reference: str = ""
    status: str = "AUTHORISED"


@dataclass(slots=True)
class _Invoice:
    seq: int
    id: str
    type: str
    number: str
    reference: str
    contact_id: str
    date: int
    due: int
    status: str
    line_amount_types: str
    lines: list[_Line]
    currency: str
    rate: int  # millionths
    created: int
    updated: int
    paid: int = 0
    payments: list[_Payment] = field(default_factory=list)  # the AUTHORISED ones, oldest first
    sent: bool = False
    fully_paid_on: int | None = None
    sub_total: int = 0
    total_tax: int = 0
    total: int = 0

    @property
    def amount_due(self) -> int:
        if self.status in ("VOIDED", "DELETED"):
            return 0
        return max(0, self.total - self.paid)


@dataclass(slots=True)
class _Contact:
    seq: int
    id: str
    name: str
    first_name: str
    last_name: str
    email: str
    status: str
    currency: str
    created: int
    updated: int
    number: str | None = None
    account_number: str | None = None
    tax_number: str = ""
    addresses: list[dict[str, Any]] = field(default_factory=list)
    phones: list[dict[str, Any]] = field(default_factory=list)
    persons: list[dict[str, Any]] = field(default_factory=list)


_TAX = {  # base currency -> (sales tax type, purchases tax type, rate in basis points)
    "NZD": ("OUTPUT2", "INPUT2", 1500),
    "AUD": ("OUTPUT", "INPUT", 1000),
    "GBP": ("OUTPUT2", "INPUT2", 2000),
    "USD": ("OUTPUT", "INPUT", 750),
}
_CURRENCIES = ("NZD", "AUD", "GBP", "USD", "EUR", "CAD")
_RATES = {"NZD": 1.0, "AUD": 0.92, "GBP": 0.48, "USD": 0.60, "EUR": 0.55, "CAD": 0.82}
_FIRST = (
    "Aroha", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hemi", "Isla", "Jack", "Kiri", "Liam", "Mia",
    "Noah", "Olivia", "Priya", "Quinn", "Ruby", "Sam", "Tama", "Uma", "Vera", "Will", "Xin", "Yara", "Zoe",
)  # fmt: skip
_LAST = (
    "Anderson", "Brown", "Chen", "Davies", "Evans", "Fletcher", "Gray", "Harris", "Ito", "Jones", "King",
    "Lee", "Martin", "Ngata", "O'Brien", "Patel", "Rangi", "Smith", "Taylor", "Walker", "Wilson", "Young",
)  # fmt: skip
_COMPANY_A = (
    "Bayside", "Kauri", "Harbour", "Summit", "Southern", "Pacific", "Tui", "Aurora", "Coastal", "Redwood",
    "Ironbark", "Silverfern", "Northshore", "Riverbend", "Highland", "Kowhai", "Matai", "Totara",
)  # fmt: skip
_COMPANY_B = (
    "Plumbing", "Design", "Consulting", "Electrical", "Bakery", "Builders", "Logistics", "Motors",
    "Landscaping", "Print", "Studio", "Supplies", "Catering", "Dental", "Legal", "Software",
)  # fmt: skip
_COMPANY_C = ("Ltd", "Limited", "& Co", "Group", "Partners", "Holdings", "Co")
_CITIES = {
    "NZD": (("Wellington", "Wellington", "6011", "New Zealand"), ("Auckland", "Auckland", "1010", "New Zealand"),
            ("Christchurch", "Canterbury", "8011", "New Zealand")),
    "AUD": (("Sydney", "NSW", "2000", "Australia"), ("Melbourne", "VIC", "3000", "Australia"),
            ("Brisbane", "QLD", "4000", "Australia")),
    "GBP": (("London", "", "EC1A 1BB", "United Kingdom"), ("Manchester", "", "M1 1AE", "United Kingdom"),
            ("Leeds", "", "LS1 4AP", "United Kingdom")),
    "USD": (("Oakland", "CA", "94612", "United States"), ("Austin", "TX", "78701", "United States"),
            ("Denver", "CO", "80202", "United States")),
}  # fmt: skip
_STREETS = ("Queen Street", "High Street", "Main Road", "Victoria Avenue", "Church Lane", "Station Road")
_PRODUCTS_SALES = (
    ("Consulting services (hourly)", None, 9000, 25000),
    ("Website design", "WD-01", 50000, 400000),
    ("Monthly support retainer", "SUP-M", 30000, 150000),
    ("Training workshop", "TRN-1", 40000, 200000),
    ("Software licence (annual)", "LIC-A", 20000, 120000),
    ("Installation and setup", None, 15000, 90000),
    ("Travel expenses", None, 2000, 40000),
)
_PRODUCTS_PURCHASES = (
    ("Office supplies", None, 500, 20000),
    ("Cloud hosting", "HOST", 5000, 80000),
    ("Subcontractor services", None, 20000, 300000),
    ("Courier and freight", None, 1500, 15000),
    ("Equipment hire", "HIRE", 10000, 120000),
)
_SALES_ACCOUNT = "200"
_PURCHASE_ACCOUNTS = ("400", "429", "453", "461")
_BANK_ACCOUNTS = (("090", "Business Bank Account"), ("091", "Business Savings Account"))
_PAYMENT_REFERENCES = ("", "", "", "Direct credit", "Online payment", "Card payment", "Cheque")
# Share of paid invoices that also carry a payment entered by mistake and deleted (status DELETED).
_DELETED_PAYMENT_SHARE = 0.08


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _weighted(rng: random.Random, choices: tuple[tuple[str, float], ...]) -> str:
    x = rng.random()
    acc = 0.0
    for value, weight in choices:
        acc += weight
        if x < acc:
            return value
    return choices[-1][0]


_STATUS_WEIGHTS = (
    ("DRAFT", 0.10), ("SUBMITTED", 0.05), ("AUTHORISED", 0.35), ("PAID", 0.40), ("VOIDED", 0.05), ("DELETED", 0.05),
)  # fmt: skip
_LINE_AMOUNT_WEIGHTS = (("Exclusive", 0.7), ("Inclusive", 0.2), ("NoTax", 0.1))


class XeroTenant:
    """One emulated Xero organisation: deterministic contacts and invoices plus their mutations.

    Same seed and counts → the same records and ids; ``now`` (unix seconds) anchors the created and
    updated times, spread over the ``days`` before it.
    """

    def __init__(self, spec: Mapping[str, Any], now: int) -> None:
        self.spec = dict(spec)
        self.client_id: str = spec["client_id"]
        self.seed: int = spec["seed"]
        rng = random.Random(f"xero:{self.seed}")
        generated_id = _uuid(rng)
        self.id: str = spec.get("id") or _uuid(random.Random(f"xero-tenant:{self.client_id}:{generated_id}"))
        self.base_currency: str = spec.get("base_currency") or rng.choice(tuple(_TAX))
        self.name: str = spec.get("name") or f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)} ({self.base_currency})"
        self.tenant_type: str = spec.get("tenant_type", "ORGANISATION")
        self.created_at = now
        self.contacts: dict[str, _Contact] = {}
        self.contact_list: list[_Contact] = []
        self.invoices: dict[str, _Invoice] = {}
        self.by_number: dict[str, str] = {}
        self.contact_by_number: dict[str, str] = {}
        self.names: set[str] = set()
        self.next_invoice_number = 1
        self.change_batches = 0
        self.purged_invoices: set[str] = set()
        self.purged_contacts: set[str] = set()
        self.payments: dict[str, _Payment] = {}
        self.purged_payments: set[str] = set()
        # The bank accounts payments are made into or from: (AccountID, Code, Name).
        banks = random.Random(f"xero-banks:{self.id}")
        self.bank_accounts = tuple((_uuid(banks), code, name) for code, name in _BANK_ACCOUNTS)
        self.rng = rng
        self._generate(spec["contacts"], spec["invoices"], now * 1000, int(spec["days"] * _DAY_MS))
        self._generate_deleted_payments(now * 1000)

    # --- generation -------------------------------------------------------------------------------------

    def _unique_name(self, name: str) -> str:
        base, n = name, 1
        while name in self.names:
            n += 1
            name = f"{base} ({n})"
        self.names.add(name)
        return name

    def _new_contact(self, rng: random.Random, created: int, updated: int, status: str) -> _Contact:
        seq = len(self.contacts)
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        company = rng.random() < 0.65
        if company:
            name = f"{rng.choice(_COMPANY_A)} {rng.choice(_COMPANY_B)} {rng.choice(_COMPANY_C)}"
        else:
            name = f"{first} {last}"
        name = self._unique_name(name)
        slug = re.sub(r"[^a-z0-9]+", "", name.lower())[:20] or "contact"
        currency = self.base_currency if rng.random() < 0.85 else rng.choice(_CURRENCIES)
        city, region, postal, country = rng.choice(_CITIES[self.base_currency])
        street = f"{rng.randint(1, 400)} {rng.choice(_STREETS)}"
        contact = _Contact(
            seq=seq,
            id=_uuid(rng),
            name=name,
            first_name=first,
            last_name=last,
            email=f"{first.lower().replace(chr(39), '')}@{slug}.example.com",
            status=status,
            currency=currency,
            created=created,
            updated=updated,
            number=f"C{seq + 1:05d}" if rng.random() < 0.3 else None,
            account_number=f"AC-{rng.randint(1000, 9999)}" if rng.random() < 0.2 else None,
            tax_number=f"{rng.randint(10, 99)}-{rng.randint(100, 999)}-{rng.randint(100, 999)}"
            if rng.random() < 0.3
            else "",
            addresses=[
                {"AddressType": "POBOX", "AddressLine1": street, "City": city, "Region": region,
                 "PostalCode": postal, "Country": country, "AttentionTo": ""},
                {"AddressType": "STREET", "City": "", "Region": "", "PostalCode": "", "Country": "", "AttentionTo": ""},
            ],
            phones=[
                {"PhoneType": "DEFAULT", "PhoneNumber": f"{rng.randint(200, 999)}-{rng.randint(1000, 9999)}",
                 "PhoneAreaCode": f"{rng.randint(2, 9)}", "PhoneCountryCode": ""},
                {"PhoneType": "DDI", "PhoneNumber": "", "PhoneAreaCode": "", "PhoneCountryCode": ""},
                {"PhoneType": "FAX", "PhoneNumber": "", "PhoneAreaCode": "", "PhoneCountryCode": ""},
                {"PhoneType": "MOBILE", "PhoneNumber": "", "PhoneAreaCode": "", "PhoneCountryCode": ""},
            ],
            persons=[{"FirstName": rng.choice(_FIRST), "LastName": last, "EmailAddress": f"accounts@{slug}.example.com",
                      "IncludeInEmails": True}] if company and rng.random() < 0.4 else [],
        )  # fmt: skip
        self.contacts[contact.id] = contact
        self.contact_list.append(contact)
        if contact.number:
            self.contact_by_number[contact.number.lower()] = contact.id
        return contact

    def _new_lines(self, rng: random.Random, inv_type: str, lat: str) -> list[_Line]:
        sales = inv_type == "ACCREC"
        products = _PRODUCTS_SALES if sales else _PRODUCTS_PURCHASES
        sales_tax, purchase_tax, rate = _TAX[self.base_currency]
        lines = []
        for _ in range(1 + int(rng.random() ** 2 * 4)):
            description, code, low, high = rng.choice(products)
            cents = rng.randint(low // 100, high // 100) * 100 if rng.random() < 0.5 else rng.randint(low, high)
            unit = cents * 100
            if rng.random() < 0.1:
                unit += rng.randint(1, 99)  # a 4-decimal unit price (shown only with unitdp=4)
            quantity = rng.choice((1, 1, 1, 2, 3, 5, 10)) * 10000
            if rng.random() < 0.1:
                quantity = rng.randint(1, 40) * 2500  # quarter units
            tax_type = "NONE" if lat == "NoTax" or rate == 0 else (sales_tax if sales else purchase_tax)
            lines.append(
                _Line(
                    id=_uuid(rng),
                    description=description,
                    quantity=quantity,
                    unit=unit,
                    account_code=_SALES_ACCOUNT if sales else rng.choice(_PURCHASE_ACCOUNTS),
                    tax_type=tax_type,
                    item_code=code,
                )
            )
        return lines

    def _recompute(self, inv: _Invoice, at: int | None = None) -> None:
        rate = _TAX[self.base_currency][2]
        sub = tax_total = gross = 0
        for line in inv.lines:
            line.amount = _round_div(line.quantity * line.unit, 1_000_000)
            if line.tax_type == "NONE" or inv.line_amount_types == "NoTax":
                line.tax = 0
            elif inv.line_amount_types == "Inclusive":
                line.tax = _round_div(line.amount * rate, 10_000 + rate)
            else:
                line.tax = _round_div(line.amount * rate, 10_000)
            gross += line.amount
            tax_total += line.tax
        if inv.line_amount_types == "Inclusive":
            sub = gross - tax_total
            total = gross
        else:
            sub = gross
            total = gross + tax_total
        inv.sub_total, inv.total_tax, inv.total = sub, tax_total, total
        if inv.status == "PAID":
            inv.paid = total
            if inv.payments:
                last = inv.payments[-1]
                amount = total - sum(p.amount for p in inv.payments[:-1])
                if amount != last.amount:
                    last.amount = amount
                    last.updated = max(last.updated, inv.updated if at is None else at)
        inv.paid = min(inv.paid, total)

    def _payment(self, rng: random.Random, inv: _Invoice, paid_ms: int, cents: int, at: int | None = None) -> _Payment:
        """A new AUTHORISED payment of ``cents`` on ``inv``, dated the day of ``paid_ms``, entered at ``at``.

        Only its id comes from ``rng`` (the organisation's generation stays as it was); its account,
        reconciliation and reference come from a generator of its own.
        """
        pid = _uuid(rng)
        own = random.Random(f"xero-payment:{pid}")
        payment = _Payment(
            seq=len(self.payments),
            id=pid,
            invoice_id=inv.id,
            date=_midnight(paid_ms),
            amount=cents,
            rate=inv.rate,
            account=own.randrange(len(_BANK_ACCOUNTS)),
            reconciled=own.random() < 0.6,
            created=paid_ms if at is None else at,
            updated=paid_ms if at is None else at,
            reference=own.choice(_PAYMENT_REFERENCES),
        )
        self.payments[pid] = payment
        return payment

    def _forget_payments(self, inv: _Invoice) -> None:
        """Drop payments that never happened (made while generating a record that then had none)."""
        for payment in inv.payments:
            self.payments.pop(payment.id, None)
        inv.payments, inv.paid = [], 0

    def delete_payment(self, payment: _Payment, at: int) -> None:
        """Xero's delete of a payment: it stays readable as DELETED and its invoice owes that amount again."""
        if payment.status == "DELETED":
            return
        payment.status = "DELETED"
        payment.updated = at
        inv = self.invoices.get(payment.invoice_id)
        if inv is None:
            return
        inv.payments = [p for p in inv.payments if p.id != payment.id]
        inv.paid = max(0, inv.paid - payment.amount)
        if inv.status == "PAID" and inv.paid < inv.total:
            inv.status = "AUTHORISED"
            inv.fully_paid_on = None
        inv.updated = max(inv.updated, at)

    def pay(self, rng: random.Random, inv: _Invoice, cents: int, at: int, date_ms: int | None = None) -> _Payment:
        """A payment of ``cents`` on an AUTHORISED invoice at ``at``; the invoice is PAID once nothing is due."""
        payment = self._payment(rng, inv, at if date_ms is None else date_ms, cents, at)
        inv.payments.append(payment)
        inv.paid += cents
        if inv.paid >= inv.total:
            inv.status = "PAID"
            inv.fully_paid_on = _midnight(at if date_ms is None else date_ms)
        inv.updated = max(inv.updated, at)
        return payment

    def _generate_deleted_payments(self, now_ms: int) -> None:
        """Some paid invoices also carry a payment entered by mistake and deleted before the real one."""
        rng = random.Random(f"xero:{self.seed}:deleted-payments")
        for inv in list(self.invoices.values()):
            if inv.status != "PAID" or not inv.payments or rng.random() >= _DELETED_PAYMENT_SHARE:
                continue
            first = inv.payments[0]
            entered = inv.created + int(rng.random() * max(0, first.created - inv.created))
            mistake = self._payment(rng, inv, entered, inv.total, entered)
            mistake.status = "DELETED"
            mistake.updated = entered + int(rng.random() * max(0, min(first.created, now_ms - 1) - entered))

    def _invoice_number(self, rng: random.Random, inv_type: str) -> str:
        if inv_type == "ACCREC":
            number = f"INV-{self.next_invoice_number:05d}"
            self.next_invoice_number += 1
            return number
        return rng.choice(("BILL-", "SI", "RPT", "")) + str(rng.randint(1000, 99999))

    def _new_invoice(
        self,
        rng: random.Random,
        created: int,
        now_ms: int,
        *,
        status: str | None = None,
        inv_type: str | None = None,
        updated: int | None = None,
    ) -> _Invoice:
        inv_type = inv_type or ("ACCREC" if rng.random() < 0.7 else "ACCPAY")
        status = status or _weighted(rng, _STATUS_WEIGHTS)
        lat = _weighted(rng, _LINE_AMOUNT_WEIGHTS)
        contacts = self.contact_list
        n = len(contacts)
        if n:
            if inv_type == "ACCREC":
                contact = contacts[rng.randrange(max(1, int(n * 0.8)))]
            else:
                contact = contacts[n // 3 + rng.randrange(n - n // 3)]
        else:
            contact = self._new_contact(rng, created, created, "ACTIVE")
        currency = contact.currency if rng.random() < 0.9 else rng.choice(_CURRENCIES)
        if currency == self.base_currency:
            rate = 1_000_000
        else:
            rate = int(_RATES[currency] / _RATES.get(self.base_currency, 1.0) * 1_000_000 * rng.uniform(0.97, 1.03))
        date = _midnight(created) - rng.choice((0, 0, 0, _DAY_MS, 2 * _DAY_MS))
        inv = _Invoice(
            seq=len(self.invoices),
            id=_uuid(rng),
            type=inv_type,
            number=self._invoice_number(rng, inv_type),
            reference=rng.choice(("", "", "PO-" + str(rng.randint(100, 9999)), "Order " + str(rng.randint(1, 999)))),
            contact_id=contact.id,
            date=date,
            due=date + rng.choice((7, 14, 20, 30)) * _DAY_MS,
            status=status,
            line_amount_types=lat,
            lines=self._new_lines(rng, inv_type, lat),
            currency=currency,
            rate=rate,
            created=created,
            updated=created,
        )
        self._recompute(inv)
        later = created + int(rng.random() ** 2 * max(0, now_ms - 1 - created))
        if status == "PAID":
            inv.paid = inv.total
            inv.payments = [self._payment(rng, inv, later, inv.total)]
            inv.fully_paid_on = _midnight(later)
            inv.updated = later
        elif status == "AUTHORISED" and rng.random() < 0.25 and inv.total > 100:
            part = _round_div(inv.total * rng.randint(10, 90), 100)
            inv.paid = part
            inv.payments = [self._payment(rng, inv, later, part)]
            inv.updated = later
        elif status in ("VOIDED", "DELETED", "AUTHORISED", "SUBMITTED"):
            inv.updated = later
        else:
            inv.updated = created + int(rng.random() ** 4 * max(0, now_ms - 1 - created))
        inv.sent = inv_type == "ACCREC" and status in ("AUTHORISED", "PAID") and rng.random() < 0.8
        if updated is not None:
            inv.updated = updated
        self.invoices[inv.id] = inv
        self.by_number.setdefault(inv.number.lower(), inv.id)
        return inv

    def _generate(self, n_contacts: int, n_invoices: int, now_ms: int, span: int) -> None:
        rng = self.rng
        created = sorted(now_ms - 1 - int(rng.random() * span) for _ in range(n_contacts))
        for c in created:
            status = "ARCHIVED" if rng.random() < 0.1 else "ACTIVE"
            updated = c + int(rng.random() ** 3 * max(0, now_ms - 1 - c))
            self._new_contact(rng, c, updated, status)
        for c in sorted(now_ms - 1 - int(rng.random() * span) for _ in range(n_invoices)):
            self._new_invoice(rng, c, now_ms)

    # --- derived facts ----------------------------------------------------------------------------------

    def roles(self) -> tuple[set[str], set[str]]:
        """Contact ids with sales invoices (customers) and with bills (suppliers)."""
        customers: set[str] = set()
        suppliers: set[str] = set()
        for inv in self.invoices.values():
            (customers if inv.type == "ACCREC" else suppliers).add(inv.contact_id)
        return customers, suppliers

    def balances(self, now_ms: int) -> dict[str, tuple[int, int, int, int]]:
        """Per contact: receivable outstanding/overdue and payable outstanding/overdue, in cents."""
        out: dict[str, list[int]] = {}
        for inv in self.invoices.values():
            if inv.status != "AUTHORISED":
                continue
            row = out.setdefault(inv.contact_id, [0, 0, 0, 0])
            due = inv.amount_due
            k = 0 if inv.type == "ACCREC" else 2
            row[k] += due
            if inv.due < now_ms:
                row[k + 1] += due
        return {cid: (a, b, c, d) for cid, (a, b, c, d) in out.items()}

    def counts(self) -> dict[str, Any]:
        """Record counts for the control API."""
        return {
            "invoices": len(self.invoices),
            "contacts": len(self.contacts),
            "invoices_by_status": dict(Counter(inv.status for inv in self.invoices.values())),
            "invoices_by_type": dict(Counter(inv.type for inv in self.invoices.values())),
            "contacts_by_status": dict(Counter(c.status for c in self.contacts.values())),
            "payments": len(self.payments),
            "payments_by_status": dict(Counter(p.status for p in self.payments.values())),
        }

    # --- lookups ----------------------------------------------------------------------------------------

    def find_invoice(self, key: str) -> _Invoice | None:
        """By InvoiceID (any case) or InvoiceNumber, as ``GET /Invoices/{InvoiceID|InvoiceNumber}`` does."""
        inv = self.invoices.get(key.lower())
        if inv is None:
            iid = self.by_number.get(key.lower())
            inv = self.invoices.get(iid) if iid else None
        return inv

    def find_contact(self, key: str) -> _Contact | None:
        """By ContactID (any case) or ContactNumber."""
        contact = self.contacts.get(key.lower())
        if contact is None:
            cid = self.contact_by_number.get(key.lower())
            contact = self.contacts.get(cid) if cid else None
        return contact

    # --- changes ----------------------------------------------------------------------------------------

    def apply_changes(self, counts: Mapping[str, int], now: int) -> dict[str, list[str]]:
        """Edits, voids, deletes and creates of invoices, archives/edits/creates of contacts, new and deleted
        payments, all at ``now``."""
        self.change_batches += 1
        rng = random.Random(f"xero:{self.seed}:changes:{self.change_batches}")
        now_ms = now * 1000

        def stamp() -> int:
            return now_ms + rng.randrange(1000)

        def pick(pool: list[Any], n: int) -> list[Any]:
            return rng.sample(pool, min(n, len(pool)))

        invoices = list(self.invoices.values())
        out: dict[str, list[str]] = {"edited": [], "voided": [], "deleted": [], "created": [], "archived": []}
        taken: set[str] = set()
        voidable = [i for i in invoices if i.status == "AUTHORISED" and i.paid == 0]
        for inv in pick(voidable, counts.get("voids", 0)):
            inv.status = "VOIDED"
            inv.updated = stamp()
            taken.add(inv.id)
            out["voided"].append(inv.id)
        deletable = [i for i in invoices if i.status in ("DRAFT", "SUBMITTED")]
        for inv in pick(deletable, counts.get("deletes", 0)):
            inv.status = "DELETED"
            inv.updated = stamp()
            taken.add(inv.id)
            out["deleted"].append(inv.id)
        editable = [
            i for i in invoices if i.status in ("DRAFT", "SUBMITTED", "AUTHORISED", "PAID") and i.id not in taken
        ]
        for inv in pick(editable, counts.get("edits", 0)):
            self._edit_invoice(rng, inv, now_ms)
            inv.updated = stamp()
            out["edited"].append(inv.id)
        for _ in range(counts.get("creates", 0)):
            created = stamp()
            inv = self._new_invoice(
                rng, created, now_ms + 1000, status=rng.choice(("DRAFT", "AUTHORISED", "AUTHORISED")), updated=created
            )
            self._forget_payments(inv)
            out["created"].append(inv.id)
        active = [c for c in self.contacts.values() if c.status == "ACTIVE"]
        for contact in pick(active, counts.get("archives", 0)):
            contact.status = "ARCHIVED"
            contact.updated = stamp()
            out["archived"].append(contact.id)
        if counts.get("contact_edits", 0):
            out["contacts_edited"] = []
            for contact in pick([c for c in self.contacts.values() if c.id not in out["archived"]],
                                counts["contact_edits"]):  # fmt: skip
                contact.email = f"billing{rng.randint(1, 999)}@{contact.email.split('@', 1)[1]}"
                contact.updated = stamp()
                out["contacts_edited"].append(contact.id)
        if counts.get("contact_creates", 0):
            out["contacts_created"] = []
            for _ in range(counts["contact_creates"]):
                created = stamp()
                out["contacts_created"].append(self._new_contact(rng, created, created, "ACTIVE").id)
        if counts.get("payments", 0):
            out["payments_created"] = []
            payable = [i for i in self.invoices.values() if i.status == "AUTHORISED" and i.amount_due > 0]
            for inv in pick(payable, counts["payments"]):
                remaining = inv.amount_due
                cents = remaining if rng.random() < 0.6 or remaining < 200 else _round_div(remaining, 2)
                out["payments_created"].append(self.pay(rng, inv, cents, stamp()).id)
        if counts.get("payment_deletes", 0):
            out["payments_deleted"] = []
            made_now = set(out.get("payments_created", ()))
            live = [p for p in self.payments.values() if p.status == "AUTHORISED" and p.id not in made_now]
            for payment in pick(live, counts["payment_deletes"]):
                self.delete_payment(payment, stamp())
                out["payments_deleted"].append(payment.id)
        return out

    def _edit_invoice(self, rng: random.Random, inv: _Invoice, now_ms: int) -> None:
        if inv.status in ("DRAFT", "SUBMITTED"):
            if rng.random() < 0.5:
                line = rng.choice(inv.lines)
                line.quantity += 10000
                self._recompute(inv)
            else:
                inv.status = "AUTHORISED"
        elif inv.status == "AUTHORISED":
            remaining = inv.total - inv.paid
            cents = remaining if rng.random() < 0.6 or remaining < 200 else _round_div(remaining, 2)
            self.pay(rng, inv, cents, now_ms)
        else:
            inv.reference = f"{inv.reference} (updated)".strip()

    # --- control-API records ----------------------------------------------------------------------------

    def add_record(self, entity: str, fields: Mapping[str, Any], updated: int) -> _Invoice | _Contact | _Payment:
        """A new invoice, contact or payment with ``fields`` applied, created and updated at ``updated`` (ms)."""
        rng = random.Random(f"xero:{self.seed}:record:{len(self.invoices)}:{len(self.contacts)}:{len(self.payments)}")
        if entity == "payment":
            return self._add_payment(rng, fields, updated)
        if entity == "contact":
            status = str(fields.get("ContactStatus", "ACTIVE"))
            new_id = str(fields["ContactID"]).lower() if "ContactID" in fields else None
            if new_id is not None and new_id in self.contacts:
                raise ControlError(409, f"contact {new_id} exists")
            contact = self._new_contact(rng, updated, updated, status)
            if new_id is not None:
                self.contacts[new_id] = self.contacts.pop(contact.id)
                contact.id = new_id
                if contact.number:
                    self.contact_by_number[contact.number.lower()] = new_id
            self._apply_contact_fields(contact, fields)
            return contact
        inv_type = str(fields.get("Type", "ACCREC"))
        status = str(fields.get("Status", "AUTHORISED"))
        new_id = str(fields["InvoiceID"]).lower() if "InvoiceID" in fields else None
        if new_id is not None and new_id in self.invoices:
            raise ControlError(409, f"invoice {new_id} exists")
        inv = self._new_invoice(rng, updated, updated + 1, status=status, inv_type=inv_type, updated=updated)
        if status != "PAID":
            self._forget_payments(inv)
            inv.fully_paid_on = None
        if new_id is not None:
            self.invoices[new_id] = self.invoices.pop(inv.id)
            inv.id = new_id
            self.by_number[inv.number.lower()] = new_id
            for payment in inv.payments:
                payment.invoice_id = new_id
        self._apply_invoice_fields(inv, fields, rng, updated)
        return inv

    def _add_payment(self, rng: random.Random, fields: Mapping[str, Any], updated: int) -> _Payment:
        """A payment on ``Invoice.InvoiceID`` (default: the oldest invoice with something due, or a new one)."""
        unknown = set(fields) - _PAYMENT_FIELDS
        if unknown:
            raise ControlError(400, f"unsupported payment fields: {sorted(unknown)}")
        wanted = str((fields.get("Invoice") or {}).get("InvoiceID", "")).lower()
        if wanted:
            inv = self.invoices.get(wanted)
            if inv is None:
                raise ControlError(400, f"unknown Invoice.InvoiceID {wanted!r}")
        else:
            due = [i for i in self.invoices.values() if i.status == "AUTHORISED" and i.amount_due > 0]
            inv = min(due, key=lambda i: i.seq) if due else None
            if inv is None:
                inv = self._new_invoice(rng, updated, updated + 1, status="AUTHORISED", inv_type="ACCREC",
                                        updated=updated)  # fmt: skip
                self._forget_payments(inv)
        if inv.status != "AUTHORISED" or inv.amount_due <= 0:
            raise ControlError(409, f"invoice {inv.id} is {inv.status} with nothing due: it takes no payment")
        cents = round(float(fields["Amount"]) * 100) if "Amount" in fields else inv.amount_due
        if not 0 < cents <= inv.amount_due:
            raise ControlError(400, "Amount must be more than 0 and at most what the invoice still owes")
        date = _midnight(_parse_date_field(fields["Date"], "Date")) if "Date" in fields else updated
        payment = self.pay(rng, inv, cents, updated, date)
        self._apply_payment_fields(payment, fields, updated)
        return payment

    def _apply_payment_fields(self, payment: _Payment, fields: Mapping[str, Any], updated: int) -> None:
        unknown = set(fields) - _PAYMENT_FIELDS
        if unknown:
            raise ControlError(400, f"unsupported payment fields: {sorted(unknown)}")
        if "Reference" in fields:
            payment.reference = str(fields["Reference"])
        if "IsReconciled" in fields:
            payment.reconciled = bool(fields["IsReconciled"])
        if "Status" in fields:
            if fields["Status"] not in ("AUTHORISED", "DELETED"):
                raise ControlError(400, "a payment's Status can only be AUTHORISED or DELETED")
            if fields["Status"] == "DELETED":
                self.delete_payment(payment, updated)
            elif payment.status == "DELETED":
                raise ControlError(409, "a deleted payment cannot be restored (Xero makes a new one)")
        payment.updated = updated

    def update_record(self, record_id: str, fields: Mapping[str, Any], updated: int) -> _Invoice | _Contact | _Payment:
        """Apply ``fields`` to an existing invoice, contact or payment and set its updated time (ms)."""
        rng = random.Random(f"xero:{self.seed}:patch:{record_id}:{updated}")
        inv = self.invoices.get(record_id.lower())
        if inv is not None:
            self._apply_invoice_fields(inv, fields, rng, updated)
            inv.updated = updated
            return inv
        payment = self.payments.get(record_id.lower())
        if payment is not None:
            self._apply_payment_fields(payment, fields, updated)
            return payment
        contact = self.contacts.get(record_id.lower())
        if contact is not None:
            self._apply_contact_fields(contact, fields)
            contact.updated = updated
            return contact
        raise ControlError(404, f"no invoice, contact or payment {record_id!r} in tenant {self.id}")

    def purge_record(self, record_id: str) -> _Invoice | _Contact:
        """Remove an invoice or contact outright, so reads of it answer 404.

        Xero itself never does this (it voids, deletes and archives); it stands for a record a consumer can no
        longer resolve. A contact that invoices still name cannot be purged.
        """
        key = record_id.lower()
        inv = self.invoices.pop(key, None)
        if inv is not None:
            self.by_number.pop(inv.number.lower(), None)
            self.purged_invoices.add(inv.id)
            # Its payments (deleted ones too) go with it.
            for payment in [p for p in self.payments.values() if p.invoice_id == inv.id]:
                del self.payments[payment.id]
                self.purged_payments.add(payment.id)
            return inv
        contact = self.contacts.get(key)
        if contact is None:
            raise ControlError(404, f"no invoice or contact {record_id!r} in tenant {self.id}")
        if any(i.contact_id == contact.id for i in self.invoices.values()):
            raise ControlError(409, f"contact {record_id!r} is named by invoices; purge those first")
        del self.contacts[key]
        self.contact_list.remove(contact)
        self.names.discard(contact.name)
        if contact.number:
            self.contact_by_number.pop(contact.number.lower(), None)
        self.purged_contacts.add(contact.id)
        return contact

    def _apply_invoice_fields(
        self, inv: _Invoice, fields: Mapping[str, Any], rng: random.Random, at: int | None = None
    ) -> None:
        unknown = set(fields) - _INVOICE_FIELDS
        if unknown:
            raise ControlError(400, f"unsupported invoice fields: {sorted(unknown)}")
        if "Type" in fields:
            if fields["Type"] not in ("ACCREC", "ACCPAY"):
                raise ControlError(400, "Type must be ACCREC or ACCPAY")
            inv.type = fields["Type"]
        if "Status" in fields:
            if fields["Status"] not in _INVOICE_STATUSES:
                raise ControlError(400, f"Status must be one of {list(_INVOICE_STATUSES)}")
            inv.status = fields["Status"]
        if "InvoiceNumber" in fields:
            self.by_number.pop(inv.number.lower(), None)
            inv.number = str(fields["InvoiceNumber"])
            self.by_number[inv.number.lower()] = inv.id
        if "Reference" in fields:
            inv.reference = str(fields["Reference"])
        if "CurrencyCode" in fields:
            inv.currency = str(fields["CurrencyCode"])
            if "CurrencyRate" not in fields and inv.currency == self.base_currency:
                inv.rate = 1_000_000
        if "CurrencyRate" in fields:
            inv.rate = round(float(fields["CurrencyRate"]) * 1_000_000)
        if "LineAmountTypes" in fields:
            if fields["LineAmountTypes"] not in ("Exclusive", "Inclusive", "NoTax"):
                raise ControlError(400, "LineAmountTypes must be Exclusive, Inclusive or NoTax")
            inv.line_amount_types = fields["LineAmountTypes"]
        if "Date" in fields:
            inv.date = _midnight(_parse_date_field(fields["Date"], "Date"))
        if "DueDate" in fields:
            inv.due = _midnight(_parse_date_field(fields["DueDate"], "DueDate"))
        if "Contact" in fields:
            cid = str((fields["Contact"] or {}).get("ContactID", "")).lower()
            if cid not in self.contacts:
                raise ControlError(400, f"unknown Contact.ContactID {cid!r}")
            inv.contact_id = cid
        if "SentToContact" in fields:
            inv.sent = bool(fields["SentToContact"])
        if "LineItems" in fields:
            inv.lines = [self._line_from(rng, inv, raw) for raw in fields["LineItems"] or []]
        self._recompute(inv, at)
        if "AmountPaid" in fields:
            # The payments so far are deleted and one payment of that amount takes their place.
            for payment in inv.payments:
                payment.status, payment.updated = "DELETED", inv.updated if at is None else at
            cents = round(float(fields["AmountPaid"]) * 100)
            inv.paid = min(cents, inv.total)
            inv.payments = [self._payment(rng, inv, inv.date, inv.paid, at)] if inv.paid else []
        if inv.status == "PAID":
            if not inv.payments:
                inv.payments = [self._payment(rng, inv, inv.date, inv.total, at)]
            inv.paid = inv.total
            inv.fully_paid_on = inv.fully_paid_on or inv.date
        if "FullyPaidOnDate" in fields:
            inv.fully_paid_on = _midnight(_parse_date_field(fields["FullyPaidOnDate"], "FullyPaidOnDate"))

    def _line_from(self, rng: random.Random, inv: _Invoice, raw: Mapping[str, Any]) -> _Line:
        if not isinstance(raw, Mapping):
            raise ControlError(400, "LineItems must be objects")
        sales_tax, purchase_tax, _ = _TAX[self.base_currency]
        default_tax = (
            "NONE" if inv.line_amount_types == "NoTax" else sales_tax if inv.type == "ACCREC" else purchase_tax
        )
        return _Line(
            id=str(raw.get("LineItemID") or _uuid(rng)),
            description=str(raw.get("Description", "Item")),
            quantity=round(float(raw.get("Quantity", 1)) * 10000),
            unit=round(float(raw.get("UnitAmount", 0)) * 10000),
            account_code=str(raw.get("AccountCode", _SALES_ACCOUNT if inv.type == "ACCREC" else "400")),
            tax_type=str(raw.get("TaxType", default_tax)),
            item_code=raw.get("ItemCode"),
        )

    def _apply_contact_fields(self, contact: _Contact, fields: Mapping[str, Any]) -> None:
        unknown = set(fields) - _CONTACT_FIELDS
        if unknown:
            raise ControlError(400, f"unsupported contact fields: {sorted(unknown)}")
        if "Name" in fields:
            self.names.discard(contact.name)
            contact.name = str(fields["Name"])
            self.names.add(contact.name)
        if "ContactStatus" in fields:
            if fields["ContactStatus"] not in ("ACTIVE", "ARCHIVED", "GDPRREQUEST"):
                raise ControlError(400, "ContactStatus must be ACTIVE, ARCHIVED or GDPRREQUEST")
            contact.status = fields["ContactStatus"]
        if "ContactNumber" in fields:
            if contact.number:
                self.contact_by_number.pop(contact.number.lower(), None)
            contact.number = fields["ContactNumber"]
            if contact.number:
                self.contact_by_number[str(contact.number).lower()] = contact.id
        simple = {
            "FirstName": "first_name",
            "LastName": "last_name",
            "EmailAddress": "email",
            "DefaultCurrency": "currency",
            "TaxNumber": "tax_number",
            "AccountNumber": "account_number",
        }
        for key, attr in simple.items():
            if key in fields:
                setattr(contact, attr, fields[key])


_INVOICE_FIELDS = frozenset(
    {
        "InvoiceID", "Type", "Status", "InvoiceNumber", "Reference", "CurrencyCode", "CurrencyRate",
        "LineAmountTypes", "Date", "DueDate", "Contact", "LineItems", "AmountPaid", "SentToContact",
        "FullyPaidOnDate",
    }
)  # fmt: skip
_PAYMENT_FIELDS = frozenset({"Invoice", "Amount", "Date", "Reference", "IsReconciled", "Status"})
_CONTACT_FIELDS = frozenset(
    {
        "ContactID", "Name", "FirstName", "LastName", "EmailAddress", "ContactStatus", "ContactNumber",
        "AccountNumber", "DefaultCurrency", "TaxNumber",
    }
)  # fmt: skip
