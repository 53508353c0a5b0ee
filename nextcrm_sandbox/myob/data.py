"""MYOB company files for the sandbox: deterministic customers, sale invoices of every layout and the customer
payments that paid them, their reference data, and the changes the control API applies (edits and payments,
voids, deletes, creates, renames)."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from nextcrm_sandbox.control import ControlError
from nextcrm_sandbox.myob.model import (
    _BASE,
    _CUSTOMER_KEYS,
    _DAY,
    _HAS_FREIGHT,
    _INVOICE_KEYS,
    _PAYMENT_KEYS,
    _US,
    LAYOUTS,
    _day_stamp,
    _money,
    _ms,
    _round_div,
    _words,
    format_myob_datetime,
)


class _Rng(random.Random):
    def uid(self) -> str:
        return str(uuid.UUID(int=self.getrandbits(128), version=4))

    def pick(self, seq: list[Any] | tuple[Any, ...]) -> Any:
        return seq[int(self.random() * len(seq))]


@dataclass(slots=True)
class _Row:
    """One record: its API dict plus the stamps kept as integers (UTC microseconds) for filters."""

    uid: str
    rec: dict[str, Any]
    created_us: int
    lm_us: int
    layout: str | None = None


_COMPANY_WORDS = _words("Acacia Banksia Coastal Dingo Eucalypt Harbour Kookaburra Outback Southern Wattle Granite")
_COMPANY_KINDS = _words("Plumbing Electrical Landscaping Consulting Bakery Joinery Logistics Design Cleaning Motors")
_FIRST_NAMES = _words("Olivia Jack Charlotte William Amelia Noah Isla Thomas Mia Liam Grace Lachlan Chloe Oliver Ruby")
_LAST_NAMES = _words("Smith Jones Williams Brown Wilson Taylor Nguyen Anderson Martin Thompson White Walker Kelly Ryan")
_CITIES = [
    tuple(city.split(":"))
    for city in _words(
        "Sydney:NSW:2000 Melbourne:VIC:3000 Brisbane:QLD:4000 Perth:WA:6000 Adelaide:SA:5000 "
        "Hobart:TAS:7000 Canberra:ACT:2600 Darwin:NT:0800"
    )
]
_STREETS = ("George St", "Collins St", "Queen St", "Hay St", "King William St", "Elizabeth St", "Smith St")
_SERVICES = ("Consulting services", "Site inspection", "Monthly maintenance", "Installation labour", "Repairs")
# Foreign currency units per 1 AUD (the file's local currency), roughly.
_CURRENCIES = (("USD", "US Dollar", 0.65), ("NZD", "New Zealand Dollar", 1.09), ("GBP", "Pound Sterling", 0.52))
_LAYOUT_WEIGHTS = tuple(zip(LAYOUTS, (0.45, 0.30, 0.15, 0.05, 0.05), strict=True))
# The bank accounts payments are deposited to (DepositTo "Account"); the rest go to undeposited funds.
_BANK_ACCOUNTS = (("Cheque Account", "1-1110"), ("Business Savings", "1-1120"))
_UNDEPOSITED_SHARE = 0.2
# Chance that a customer's payment also pays the customer's other invoice paid the same day.
_SHARED_PAYMENT_SHARE = 0.5


@dataclass
class _TenantKnobs:
    cftoken_required: bool = True
    username: str = "Administrator"
    password: str = ""
    generic_invoice_lines: bool = False
    default_top: int = 400
    max_top: int = 1000
    utc_offset_minutes: int = 0
    unknown_path_status: int = 401
    # The scheme://host[:port] of a create's ``Location`` (MYOB answers on regional hosts such as
    # ``arl2.api.myob.com``); None: the request's own.
    location_origin: str | None = None


class _CompanyFile:
    """One AccountRight company file: reference data, customers and sale invoices, generated from a seed."""

    def __init__(
        self,
        business_id: str,
        name: str,
        client_id: str,
        *,
        seed: int,
        invoices: int,
        customers: int,
        days: float,
        now: int,
        knobs: _TenantKnobs,
    ) -> None:
        self.id = business_id
        self.name = name
        self.client_id = client_id
        self.seed = seed
        self.knobs = knobs
        self.offset_us = knobs.utc_offset_minutes * 60 * _US
        self.cf_path = f"{_BASE}/accountright/{business_id}"
        self.invoices: dict[str, _Row] = {}
        self.customers: dict[str, _Row] = {}
        self.customer_links: dict[str, dict[str, Any]] = {}
        self.payments: dict[str, _Row] = {}
        self.deleted_invoice_ids: list[str] = []
        self.deleted_customer_ids: list[str] = []
        self.deleted_payment_ids: list[str] = []
        # Invoice payments not yet recorded as customer payments: (invoice, local cents, foreign cents, UTC us).
        self._unrecorded: list[tuple[_Row, int, int | None, int]] = []
        rng = _Rng(seed)
        self._rv = 6_000_000_000_000_000_000 + rng.getrandbits(48)
        self._rv_rng = _Rng(seed ^ 0x5A5A)
        self.change_rng = _Rng(seed ^ 0xC4A4)
        # Payments draw from their own generator, so invoices and customers stay as they were before payments.
        self.payment_rng = _Rng(seed ^ 0x9A7E)
        self.next_number = 1
        self.next_receipt = 1
        self.next_card = 1
        self.serial = f"{rng.getrandbits(40):012d}"[:12]
        self.launcher_id = rng.uid()
        self._make_reference_data(rng)
        started = now * _US - int(days * _DAY * _US)
        self._generate(rng, invoices, customers, started, now * _US)

    # --- reference data ---------------------------------------------------------------------------------

    def _link(self, kind: str, uid: str, **attrs: Any) -> dict[str, Any]:
        return {"UID": uid, **attrs, "URI": f"{self.cf_path}/{kind}/{uid}"}

    def _make_reference_data(self, rng: _Rng) -> None:
        self.tax_gst = self._link("GeneralLedger/TaxCode", rng.uid(), Code="GST")
        self.tax_fre = self._link("GeneralLedger/TaxCode", rng.uid(), Code="FRE")
        self.accounts = [
            self._link("GeneralLedger/Account", rng.uid(), Name=name, DisplayID=display)
            for name, display in (("Sales", "4-1000"), ("Consulting Income", "4-2000"), ("Service Income", "4-3000"))
        ]
        self.items = [
            self._link("Inventory/Item", rng.uid(), Number=f"ITM{i:04d}", Name=name)
            for i, name in enumerate(
                ("Copper fitting", "Garden hose 20m", "LED downlight", "Timber panel", "Paint 10L", "Cable 100m"),
                start=1,
            )
        ]
        self.activities = [
            self._link("TimeBilling/Activity", rng.uid(), Name=name, DisplayID=f"ACT{i:03d}")
            for i, name in enumerate(("Consulting hour", "Travel time", "On-site labour"), start=1)
        ]
        self.currencies = {
            code: (self._link("GeneralLedger/Currency", rng.uid(), Code=code, CurrencyName=name), rate)
            for code, name, rate in _CURRENCIES
        }
        self.bank_accounts = [
            self._link("GeneralLedger/Account", self.payment_rng.uid(), Name=name, DisplayID=display)
            for name, display in _BANK_ACCOUNTS
        ]

    def row_version(self) -> str:
        """A fresh ``RowVersion``: a signed 64-bit integer string that grows with every change."""
        self._rv += 1 + self._rv_rng.getrandbits(16)
        return str(self._rv)

    def stamp(self, us: int) -> str:
        """The file-local zone-less rendering of a UTC instant."""
        return format_myob_datetime(us + self.offset_us)

    # --- generation -------------------------------------------------------------------------------------

    def _generate(self, rng: _Rng, n_invoices: int, n_customers: int, start_us: int, now_us: int) -> None:
        span = max(1, now_us - start_us)
        customer_times = sorted(_ms(start_us + int(rng.random() * span)) for _ in range(n_customers))
        for created in customer_times:
            self._add_customer(rng, created, self._later(rng, created, now_us))
        customer_rows = list(self.customers.values())
        invoice_times = sorted(_ms(start_us + int(rng.random() * span)) for _ in range(n_invoices))
        for created in invoice_times:
            customer = rng.pick(customer_rows) if customer_rows else None
            self._add_invoice(rng, created, self._later(rng, created, now_us), customer)
        balances: Counter[str] = Counter()
        for row in self.invoices.values():
            balances[row.rec["Customer"]["UID"]] += round(row.rec["BalanceDueAmount"] * 100)
        for row in customer_rows:
            row.rec["CurrentBalance"] = _money(balances[row.uid])
        self.record_payments()

    @staticmethod
    def _later(rng: _Rng, created: int, now_us: int) -> int:
        if rng.random() < 0.35:
            return _ms(created + int(rng.random() * max(0, now_us - created)))
        return min(now_us, _ms(created + rng.randrange(0, 5_000_000)))

    def _add_customer(self, rng: _Rng, created: int, modified: int, uid: str | None = None) -> _Row:
        uid = uid or rng.uid()
        individual = rng.random() < 0.3
        city, state, postcode = rng.pick(_CITIES)
        if individual:
            first, last = rng.pick(_FIRST_NAMES), rng.pick(_LAST_NAMES)
            company, name = None, f"{last}, {first}"
            email = f"{first}.{last}{rng.randrange(100)}@example.com".lower()
        else:
            first = last = None
            company = name = f"{rng.pick(_COMPANY_WORDS)} {rng.pick(_COMPANY_KINDS)} Pty Ltd"
            email = f"accounts@{company.split()[0].lower()}{rng.randrange(1000)}.example.com.au"
        display = f"CUS{self.next_card:06d}"
        self.next_card += 1
        currency = None
        if rng.random() < 0.25:
            currency = self.currencies[rng.pick(_CURRENCIES)[0]][0]
        terms_days = rng.pick((7, 14, 30, 30, 30))
        return self.add_card(
            uid,
            name,
            created,
            modified,
            company=company,
            last=last,
            first=first,
            individual=individual,
            display=display,
            active=rng.random() >= 0.08,
            addresses=[
                {
                    "Location": 1,
                    "Street": f"{rng.randrange(1, 400)} {rng.pick(_STREETS)}",
                    "City": city,
                    "State": state,
                    "PostCode": postcode,
                    "Country": "Australia",
                    "Phone1": f"0{rng.randrange(2, 9)} {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}",
                    "Phone2": None,
                    "Phone3": None,
                    "Fax": None,
                    "Email": email,
                    "Website": None,
                    "ContactName": None if individual else f"{rng.pick(_FIRST_NAMES)} {rng.pick(_LAST_NAMES)}",
                    "Salutation": None,
                }
            ],
            notes="",
            layout=rng.pick(("Service", "Item", "Professional")),
            delivery=rng.pick(("Print", "Email", "PrintAndEmail")),
            income=None,
            abn=f"{rng.randrange(10, 99)} {rng.randrange(100, 999)} {rng.randrange(100, 999)} "
            f"{rng.randrange(100, 999)}",
            tax=self.tax_gst,
            freight_tax=self.tax_gst,
            due="InAGivenNumberOfDays",
            due_days=terms_days,
            method=rng.pick(("Cash", "Cheque", "Electronic")),
            currency=currency,
        )

    def add_card(self, uid: str, name: str, created: int, modified: int, *, company: str | None, last: str | None,
                 first: str | None, individual: bool, display: str, active: bool, addresses: list[dict[str, Any]],
                 notes: str, layout: str, delivery: str, income: dict[str, Any] | None, abn: str | None,
                 tax: dict[str, Any], freight_tax: dict[str, Any], due: str, due_days: int, method: str,
                 currency: dict[str, Any] | None) -> _Row:  # fmt: skip
        """Hold a customer card as ``Contact/Customer`` serves it, listed in its links as ``name``, and return its
        row: the fields that tell cards apart as given (``layout``, ``delivery``, ``income``, ``abn``, ``tax`` and
        ``freight_tax`` are its ``SellingDetails``, ``due`` and ``due_days`` their ``Terms``, ``method`` its
        ``PaymentDetails``), every other one as MYOB fills it on a card nobody set it on."""
        rec: dict[str, Any] = {
            "UID": uid,
            "CompanyName": company,
            "LastName": last,
            "FirstName": first,
            "IsIndividual": individual,
            "DisplayID": display,
            "IsActive": active,
            "Addresses": addresses,
            "Notes": notes,
            "Identifiers": [],
            "CustomList1": None,
            "CustomList2": None,
            "CustomList3": None,
            "CustomField1": None,
            "CustomField2": None,
            "CustomField3": None,
            "CurrentBalance": 0.0,
            "SellingDetails": {
                "SaleLayout": layout,
                "PrintedForm": "Pre-printed Invoice",
                "InvoiceDelivery": delivery,
                "ItemPriceLevel": "Base Selling Price",
                "IncomeAccount": income,
                "ReceiptMemo": None,
                "SalesPerson": None,
                "SaleComment": None,
                "ShippingMethod": None,
                "HourlyBillingRate": 0.0,
                "ABN": abn,
                "ABNBranch": None,
                "TaxCode": tax,
                "FreightTaxCode": freight_tax,
                "UseCustomerTaxCode": False,
                "Terms": {
                    "PaymentIsDue": due,
                    "DiscountDate": 0,
                    "BalanceDueDate": due_days,
                    "DiscountForEarlyPayment": 0.0,
                    "MonthlyChargeForLatePayment": 0.0,
                    "VolumeDiscount": 0.0,
                },
                "Credit": {"Limit": 0.0, "Available": 0.0, "PastDue": 0.0, "OnHold": False},
                "TaxIdNumber": None,
                "Memo": None,
            },
            "PaymentDetails": {
                "Method": method,
                "CardNumber": None,
                "NameOnCard": None,
                "BSBNumber": None,
                "BankAccountNumber": None,
                "BankAccountName": None,
                "Notes": None,
            },
            "PhotoURI": None,
            "ForeignCurrency": currency,
            "Created": self.stamp(created),
            "LastModified": self.stamp(modified),
            "URI": f"{self.cf_path}/Contact/Customer/{uid}",
            "RowVersion": self.row_version(),
        }
        self.customer_links[uid] = {"UID": uid, "Name": name, "DisplayID": display, "URI": rec["URI"]}
        row = _Row(uid, rec, created, modified)
        self.customers[uid] = row
        return row

    def _lines(
        self, rng: _Rng, layout: str, date_stamp: str, sign: int, rate: float | None
    ) -> tuple[list[dict[str, Any]], list[tuple[int, int, bool]]]:
        """Lines in the invoice's currency, and per line (amount cents, local cents, GST?)."""
        lines: list[dict[str, Any]] = []
        amounts: list[tuple[int, int, bool]] = []
        for row_id in range(1, 1 + rng.choice((1, 1, 2, 2, 3, 4))):
            gst = rng.random() < 0.85
            tax = self.tax_gst if gst else self.tax_fre
            line: dict[str, Any] = {"RowID": row_id, "Type": "Transaction"}
            if layout == "Item":
                item = rng.pick(self.items)
                qty = rng.randrange(1, 11)
                unit = rng.randrange(500, 50_000)
                cents = sign * qty * unit
                line.update(
                    Description=item["Name"],
                    ShipQuantity=float(qty),
                    UnitPrice=_money(unit),
                    UnitPriceForeign=_money(unit) if rate else None,
                    DiscountPercent=0.0,
                )
            elif layout == "TimeBilling":
                activity = rng.pick(self.activities)
                hours = rng.randrange(1, 17) / 2
                hourly = rng.randrange(8_000, 25_000)
                cents = sign * round(hours * hourly)
                line.update(
                    Date=date_stamp, Hours=hours, Activity=activity, Rate=_money(hourly), Description=activity["Name"]
                )
            else:
                cents = sign * rng.randrange(1_000, 500_000)
                line["Description"] = rng.pick(_SERVICES)
                if layout == "Professional":
                    line["Date"] = date_stamp
                line["Account"] = rng.pick(self.accounts)
            local = _round_div(cents, rate) if rate else cents
            line.update(Total=_money(local), TotalForeign=_money(cents) if rate else None, Job=None, TaxCode=tax)
            if layout == "Item":
                line["Item"] = item
                line["Location"] = None
            line["RowVersion"] = self.row_version()
            lines.append(line)
            amounts.append((cents, local, gst))
        return lines, amounts

    def _add_invoice(
        self,
        rng: _Rng,
        created: int,
        modified: int,
        customer: _Row | None,
        *,
        layout: str | None = None,
        uid: str | None = None,
        status_roll: float | None = None,
    ) -> _Row:
        uid = uid or rng.uid()
        if layout is None:
            roll, layout = rng.random(), LAYOUTS[-1]
            for name, weight in _LAYOUT_WEIGHTS:
                if roll < weight:
                    layout = name
                    break
                roll -= weight
        roll = rng.random() if status_roll is None else status_roll
        status = "Credit" if roll < 0.08 else "Closed" if roll < 0.55 else "Open"
        sign = -1 if status == "Credit" else 1
        currency_link = customer.rec["ForeignCurrency"] if customer else None
        rate: float | None = None
        if currency_link is not None:
            base_rate = self.currencies[currency_link["Code"]][1]
            rate = round(base_rate * (0.98 + rng.random() * 0.04), 6)
        date_us = created + self.offset_us
        date_stamp = format_myob_datetime(date_us - date_us % (_DAY * _US))
        lines, amounts = self._lines(rng, layout, date_stamp, sign, rate)
        inclusive = rng.random() < 0.6
        freight = 0
        if layout in _HAS_FREIGHT and rng.random() < 0.3:
            freight = sign * rng.randrange(1_000, 3_000)
        freight_local = _round_div(freight, rate) if rate else freight

        def tax_of(cents: int, gst: bool) -> int:
            if not gst:
                return 0
            return _round_div(cents, 11) if inclusive else _round_div(cents, 10)

        subtotal = sum(a for a, _, _ in amounts)
        subtotal_local = sum(loc for _, loc, _ in amounts)
        tax = sum(tax_of(a, gst) for a, _, gst in amounts) + tax_of(freight, True)
        tax_local = sum(tax_of(loc, gst) for _, loc, gst in amounts) + tax_of(freight_local, True)
        total = subtotal + freight + (0 if inclusive else tax)
        total_local = subtotal_local + freight_local + (0 if inclusive else tax_local)
        if status == "Closed":
            balance = balance_local = 0
        elif status == "Open" and rng.random() < 0.25:
            balance = total - _round_div(total * rng.randrange(10, 90), 100)
            balance_local = _round_div(balance, rate) if rate else balance
        else:
            balance, balance_local = total, total_local
        paid_on = None
        paid_us = 0
        if balance != total:
            paid_us = created + int(rng.random() * max(0, modified - created)) + self.offset_us
            paid_on = format_myob_datetime(paid_us - paid_us % (_DAY * _US))
        due_days = customer.rec["SellingDetails"]["Terms"]["BalanceDueDate"] if customer else 30
        link = self.customer_links[customer.uid] if customer else None
        name = link["Name"] if link else "Cash Sales"
        row = self.add_sale_invoice(
            uid,
            layout,
            created,
            modified,
            number=f"{self.next_number:08d}",
            date=date_stamp,
            purchase_order=f"PO{rng.randrange(1000, 99999)}" if rng.random() < 0.3 else "",
            customer=link,
            promised=None,
            balance=(balance_local, balance),
            status=status,
            lines=lines,
            ship_to=f"{name}\r\n{customer.rec['Addresses'][0]['Street']}" if customer else None,
            day_us=date_us - date_us % (_DAY * _US),
            due_days=due_days,
            inclusive=inclusive,
            subtotal=(subtotal_local, subtotal),
            freight=(freight_local, freight),
            freight_tax=self.tax_gst if layout in _HAS_FREIGHT else None,
            tax=(tax_local, tax),
            total=(total_local, total),
            comment="Thank you for your business." if layout != "Miscellaneous" else None,
            memo=f"Sale; {name}",
            delivery_status=rng.pick(("Print", "Email", "Nothing")) if layout != "Miscellaneous" else None,
            last_payment=paid_on,
            currency=currency_link,
            rate=rate,
        )
        self.next_number += 1
        fx = rate is not None
        if paid_on is not None and customer is not None:
            self._unrecorded.append((row, total_local - balance_local, total - balance if fx else None,
                                     _ms(paid_us - self.offset_us)))  # fmt: skip
        return row

    def add_sale_invoice(self, uid: str, layout: str, created: int, modified: int, *, number: str, date: str,
                         purchase_order: str, customer: dict[str, Any] | None, promised: str | None,
                         balance: tuple[int, int], status: str, lines: list[dict[str, Any]], ship_to: str | None,
                         day_us: int, due_days: int, inclusive: bool, subtotal: tuple[int, int],
                         freight: tuple[int, int], freight_tax: dict[str, Any] | None, tax: tuple[int, int],
                         total: tuple[int, int], comment: str | None, memo: str, delivery_status: str | None,
                         last_payment: str | None, currency: dict[str, Any] | None,
                         rate: float | None) -> _Row:  # fmt: skip
        """Hold a sale invoice of ``layout`` as ``Sale/Invoice/{layout}`` serves it and return its row. Amounts are
        (local, foreign) cents, the foreign ones shown only for a sale in a foreign ``currency`` (at ``rate``); its
        terms run ``due_days`` from the start of its day (``day_us``, file-local); the fields nobody sets are as
        MYOB fills them."""
        fx = rate is not None
        rec: dict[str, Any] = {
            "UID": uid,
            "Number": number,
            "Date": date,
            "CustomerPurchaseOrderNumber": purchase_order,
            "Customer": customer,
            "PromisedDate": promised,
            "BalanceDueAmount": _money(balance[0]),
            "BalanceDueAmountForeign": _money(balance[1]) if fx else None,
            "Status": status,
            "InvoiceType": layout,
            "Lines": lines,
            "ShipToAddress": ship_to,
            "Terms": {
                "PaymentIsDue": "InAGivenNumberOfDays",
                "DiscountDate": 0,
                "BalanceDueDate": due_days,
                "DiscountForEarlyPayment": 0.0,
                "MonthlyChargeForLatePayment": 0.0,
                "DiscountExpiryDate": format_myob_datetime(day_us),
                "Discount": 0.0,
                "DiscountForeign": 0.0 if fx else None,
                "DueDate": format_myob_datetime(day_us + due_days * _DAY * _US),
                "FinanceCharge": 0.0,
                "FinanceChargeForeign": 0.0 if fx else None,
            },
            "IsTaxInclusive": inclusive,
            "Subtotal": _money(subtotal[0]),
            "SubtotalForeign": _money(subtotal[1]) if fx else None,
            "Freight": _money(freight[0]),
            "FreightForeign": _money(freight[1]) if fx else None,
            "FreightTaxCode": freight_tax,
            "TotalTax": _money(tax[0]),
            "TotalTaxForeign": _money(tax[1]) if fx else None,
            "TotalAmount": _money(total[0]),
            "TotalAmountForeign": _money(total[1]) if fx else None,
            "Category": None,
            "Salesperson": None,
            "Comment": comment,
            "ShippingMethod": None,
            "JournalMemo": memo,
            "ReferralSource": None,
            "InvoiceDeliveryStatus": delivery_status,
            "LastPaymentDate": last_payment,
            "CanApplySurcharge": False,
            "Order": None,
            "OnlinePaymentMethod": "All",
            "ForeignCurrency": currency,
            "CurrencyExchangeRate": rate if fx else 1.0,
            "Created": self.stamp(created),
            "LastModified": self.stamp(modified),
            "URI": f"{self.cf_path}/Sale/Invoice/{layout}/{uid}",
            "RowVersion": self.row_version(),
        }
        row = _Row(uid, rec, created, modified, layout)
        self.invoices[uid] = row
        return row

    # --- customer payments ------------------------------------------------------------------------------

    def record_payments(self) -> list[str]:
        """Record the invoice payments made since the last call as customer payments, in time order.

        A customer's invoices paid on the same (file-local) day may share one payment, as when a customer
        settles several invoices at once; the payment is then dated at the later one.
        """
        pending, self._unrecorded = sorted(self._unrecorded, key=lambda p: (p[3], p[0].uid)), []
        rng = self.payment_rng
        groups: list[list[tuple[_Row, int, int | None, int]]] = []
        open_group: dict[str, list[tuple[_Row, int, int | None, int]]] = {}
        for item in pending:
            customer = item[0].rec["Customer"]["UID"]
            day = (item[3] + self.offset_us) // (_DAY * _US)
            group = open_group.get(customer)
            same_day = group is not None and (group[-1][3] + self.offset_us) // (_DAY * _US) == day
            if group is not None and same_day and rng.random() < _SHARED_PAYMENT_SHARE:
                group.append(item)
                continue
            group = [item]
            groups.append(group)
            open_group[customer] = group
        return [self._add_payment(group).uid for group in groups]

    def _add_payment(self, applied: list[tuple[_Row, int, int | None, int]]) -> _Row:
        """A customer payment of ``applied`` (invoice, local cents, foreign cents, UTC us), at the latest time."""
        rng = self.payment_rng
        at_us = max(item[3] for item in applied)
        first = applied[0][0].rec
        link = first["Customer"]
        card = self.customers.get(link["UID"])
        fx = first["ForeignCurrency"] is not None
        local = sum(item[1] for item in applied)
        foreign = sum(item[2] or 0 for item in applied)
        undeposited = rng.random() < _UNDEPOSITED_SHARE
        uid = rng.uid()
        lines = [
            {
                "RowID": row_id,
                "Number": row.rec["Number"],
                "UID": row.uid,
                "AmountApplied": _money(cents),
                "AmountAppliedForeign": _money(foreign_cents or 0) if fx else None,
                "GainOrLoss": 0.0 if fx else None,
                "Type": "Invoice",
                "URI": row.rec["URI"],
            }
            for row_id, (row, cents, foreign_cents, _) in enumerate(applied, start=1)
        ]
        date_us = at_us + self.offset_us
        rec: dict[str, Any] = {
            "UID": uid,
            "DepositTo": "UndepositedFunds" if undeposited else "Account",
            "Account": None if undeposited else rng.pick(self.bank_accounts),
            "Customer": link,
            "TransactionUID": rng.uid(),
            "ReceiptNumber": f"{self.next_receipt:08d}",
            "Date": format_myob_datetime(date_us - date_us % (_DAY * _US)),
            "AmountReceived": _money(local),
            "AmountReceivedForeign": _money(foreign) if fx else None,
            "ForeignCurrency": first["ForeignCurrency"],
            "CurrencyExchangeRate": first["CurrencyExchangeRate"] if fx else 1.0,
            "PaymentMethod": card.rec["PaymentDetails"]["Method"] if card else "Cash",
            "Memo": f"Payment; {link['Name']}",
            "Invoices": lines,
            "Created": self.stamp(at_us),
            "LastModified": self.stamp(at_us),
            "URI": f"{self.cf_path}/Sale/CustomerPayment/{uid}",
            "RowVersion": self.row_version(),
        }
        self.next_receipt += 1
        row = _Row(uid, rec, at_us, at_us)
        self.payments[uid] = row
        return row

    def pay_open_invoice(self, at_us: int, invoice_uid: str | None = None) -> _Row:
        """Pay the whole balance of an open invoice (``invoice_uid``, or one created by ``at_us``) at ``at_us``."""
        if invoice_uid is not None:
            row = self.invoices.get(invoice_uid.lower())
            if row is None or row.rec["BalanceDueAmount"] <= 0 or row.rec["Customer"] is None:
                raise ControlError(400, f"invoice {invoice_uid!r} has no balance to pay")
        else:
            open_rows = sorted(
                (r for r in self.invoices.values()
                 if r.rec["BalanceDueAmount"] > 0 and r.rec["Customer"] is not None and r.created_us <= at_us),
                key=lambda r: r.uid,
            )  # fmt: skip
            if not open_rows:
                raise ControlError(400, "no open invoice with a balance to pay")
            row = self.payment_rng.pick(open_rows)
        rec = row.rec
        local = round(rec["BalanceDueAmount"] * 100)
        foreign = round(rec["BalanceDueAmountForeign"] * 100) if rec["BalanceDueAmountForeign"] is not None else None
        rec["BalanceDueAmount"] = 0.0
        if foreign is not None:
            rec["BalanceDueAmountForeign"] = 0.0
        rec["Status"] = "Closed"
        rec["LastPaymentDate"] = _day_stamp(at_us + self.offset_us)
        self.touch(row, max(at_us, row.lm_us))
        return self._add_payment([(row, local, foreign, at_us)])

    def delete_payment(self, uid: str, now_us: int) -> None:
        """Hard-delete a customer payment: the amounts it applied are owed again on the invoices still there."""
        row = self.payments.pop(uid)
        self.deleted_payment_ids.append(uid)
        for line in row.rec["Invoices"]:
            invoice = self.invoices.get(line["UID"])
            if invoice is None:
                continue
            rec = invoice.rec
            rec["BalanceDueAmount"] = _money(round(rec["BalanceDueAmount"] * 100) + round(line["AmountApplied"] * 100))
            if rec["BalanceDueAmountForeign"] is not None and line["AmountAppliedForeign"] is not None:
                rec["BalanceDueAmountForeign"] = _money(
                    round(rec["BalanceDueAmountForeign"] * 100) + round(line["AmountAppliedForeign"] * 100)
                )
            if rec["Status"] == "Closed" and rec["BalanceDueAmount"] > 0:
                rec["Status"] = "Open"
            self.touch(invoice, now_us)

    def _customers_without_transactions(self) -> list[str]:
        used = {row.rec["Customer"]["UID"] for row in self.invoices.values() if row.rec["Customer"]}
        used |= {row.rec["Customer"]["UID"] for row in self.payments.values()}
        return sorted(uid for uid in self.customers if uid not in used)

    # --- mutation helpers -------------------------------------------------------------------------------

    def touch(self, row: _Row, us: int) -> None:
        """Record a change at ``us``: new ``LastModified`` and ``RowVersion``."""
        row.lm_us = us
        row.rec["LastModified"] = self.stamp(us)
        row.rec["RowVersion"] = self.row_version()

    def apply_changes(self, counts: Mapping[str, int], now_us: int) -> dict[str, list[str]]:
        """Edit (an edit may pay), reverse, hard-delete and create invoices; deactivate, edit, create and delete
        customers; delete payments; and record the payments the changes made, at ``now_us``."""
        rng = self.change_rng
        out: dict[str, list[str]] = {
            name: []
            for name in (
                "edited",
                "voided",
                "deleted",
                "created",
                "archived",
                "reversals",
                "customers_edited",
                "customers_created",
                "customers_deleted",
                "payments_created",
                "payments_deleted",
            )
        }
        picked = counts["edits"] + counts["voids"] + counts["deletes"]
        if picked > len(self.invoices):
            raise ControlError(400, f"edits + voids + deletes ({picked}) exceed the {len(self.invoices)} invoices")
        chosen = rng.sample(list(self.invoices), picked)
        edits, voids = chosen[: counts["edits"]], chosen[counts["edits"] : counts["edits"] + counts["voids"]]
        deletes = chosen[counts["edits"] + counts["voids"] :]
        # MYOB deletes a card only while no transaction uses it.
        unused = self._customers_without_transactions() if counts["customer_deletes"] else []
        if counts["customer_deletes"] > len(unused):
            raise ControlError(400, f"customer_deletes ({counts['customer_deletes']}) exceed the {len(unused)} "
                               "customers without transactions")  # fmt: skip
        doomed = self.payment_rng.sample(unused, counts["customer_deletes"])
        active = [uid for uid, row in self.customers.items() if row.rec["IsActive"] and uid not in doomed]
        if counts["archives"] > len(active):
            raise ControlError(400, f"archives ({counts['archives']}) exceed the {len(active)} active customers")
        if counts["customer_edits"] > len(self.customers) - len(doomed):
            raise ControlError(400, "customer_edits exceed the number of customers")
        if counts["payment_deletes"] > len(self.payments):
            raise ControlError(400, f"payment_deletes ({counts['payment_deletes']}) exceed the {len(self.payments)} "
                               "payments")  # fmt: skip
        for uid in doomed:
            del self.customers[uid]
            del self.customer_links[uid]
            self.deleted_customer_ids.append(uid)
            out["customers_deleted"].append(uid)
        for uid in self.payment_rng.sample(sorted(self.payments), counts["payment_deletes"]):
            self.delete_payment(uid, now_us)
            out["payments_deleted"].append(uid)
        for uid in edits:
            row = self.invoices[uid]
            owed = round(row.rec["BalanceDueAmount"] * 100)
            owed_foreign = row.rec["BalanceDueAmountForeign"]
            self._edit_invoice(row, rng, now_us)
            paid = owed - round(row.rec["BalanceDueAmount"] * 100)
            if paid > 0 and row.rec["Customer"] is not None:
                foreign = None
                if owed_foreign is not None:
                    foreign = round(owed_foreign * 100) - round(row.rec["BalanceDueAmountForeign"] * 100)
                self._unrecorded.append((row, paid, foreign, now_us))
            out["edited"].append(uid)
        for uid in voids:
            out["reversals"].append(self._reverse_invoice(self.invoices[uid], rng, now_us).uid)
            out["voided"].append(uid)
        for uid in deletes:
            del self.invoices[uid]
            self.deleted_invoice_ids.append(uid)
            out["deleted"].append(uid)
        for uid in rng.sample(active, counts["archives"]):
            row = self.customers[uid]
            row.rec["IsActive"] = False
            self.touch(row, now_us)
            out["archived"].append(uid)
        for uid in rng.sample(list(self.customers), counts["customer_edits"]):
            row = self.customers[uid]
            row.rec["Notes"] = f"Updated {self.stamp(now_us)}; ref {rng.randrange(10_000, 99_999)}"
            address = dict(row.rec["Addresses"][0])
            address["Phone1"] = f"0{rng.randrange(2, 9)} {rng.randrange(1000, 9999)} {rng.randrange(1000, 9999)}"
            row.rec["Addresses"] = [address, *row.rec["Addresses"][1:]]
            self.touch(row, now_us)
            out["customers_edited"].append(uid)
        for _ in range(counts["customer_creates"]):
            out["customers_created"].append(self._add_customer(rng, now_us, now_us).uid)
        customers = [self.customers[uid] for uid in self.customers if self.customers[uid].rec["IsActive"]]
        for _ in range(counts["creates"]):
            customer = rng.pick(customers) if customers else None
            out["created"].append(self._add_invoice(rng, now_us, now_us, customer).uid)
        out["payments_created"] = self.record_payments()
        return out

    def _edit_invoice(self, row: _Row, rng: _Rng, now_us: int) -> None:
        rec = row.rec
        today = _day_stamp(now_us + self.offset_us)
        if rec["Status"] == "Open" and rng.random() < 0.6:
            balance = round(rec["BalanceDueAmount"] * 100)
            paid = balance if rng.random() < 0.6 else _round_div(balance * rng.randrange(10, 90), 100)
            rest = balance - paid
            rec["BalanceDueAmount"] = _money(rest)
            if rec["BalanceDueAmountForeign"] is not None:
                rate = rec["CurrencyExchangeRate"] or 1.0
                rec["BalanceDueAmountForeign"] = _money(round(rest * rate)) if rest else 0.0
            rec["LastPaymentDate"] = today
            if rest == 0:
                rec["Status"] = "Closed"
        else:
            rec["JournalMemo"] = f"{rec['JournalMemo'].split(' [')[0]} [rev {rng.randrange(1000, 9999)}]"
            rec["CustomerPurchaseOrderNumber"] = f"PO{rng.randrange(1000, 99999)}"
        self.touch(row, now_us)

    def _reverse_invoice(self, row: _Row, rng: _Rng, now_us: int) -> _Row:
        """MYOB has no void: "Reverse Sale" closes the sale and adds an applied sale of the opposite sign."""
        original = row.rec
        today = _day_stamp(now_us + self.offset_us)
        original["BalanceDueAmount"] = 0.0
        if original["BalanceDueAmountForeign"] is not None:
            original["BalanceDueAmountForeign"] = 0.0
        original["Status"] = "Closed"
        original["LastPaymentDate"] = today
        self.touch(row, now_us)
        rec = _clone(original)
        uid = rng.uid()
        for key in (
            "Subtotal",
            "SubtotalForeign",
            "Freight",
            "FreightForeign",
            "TotalTax",
            "TotalTaxForeign",
            "TotalAmount",
            "TotalAmountForeign",
        ):
            if rec[key] is not None:
                rec[key] = -rec[key] or 0.0
        for line in rec["Lines"]:
            for key in ("Total", "TotalForeign"):
                if line.get(key) is not None:
                    line[key] = -line[key] or 0.0
            if "ShipQuantity" in line:
                line["ShipQuantity"] = -line["ShipQuantity"] or 0.0
            line["RowVersion"] = self.row_version()
        rec.update(
            UID=uid,
            Number=f"{self.next_number:08d}",
            Date=today,
            Customer=original["Customer"],
            ForeignCurrency=original["ForeignCurrency"],
            FreightTaxCode=original["FreightTaxCode"],
            JournalMemo=f"Reversal; {original['JournalMemo']}",
            Created=self.stamp(now_us),
            LastModified=self.stamp(now_us),
            URI=f"{self.cf_path}/Sale/Invoice/{row.layout}/{uid}",
            RowVersion=self.row_version(),
        )
        self.next_number += 1
        reversal = _Row(uid, rec, now_us, now_us, row.layout)
        self.invoices[uid] = reversal
        return reversal

    def add_record(self, entity: str, fields: Mapping[str, Any], at_us: int) -> _Row:
        """A new invoice or customer stamped ``at_us`` with ``fields`` laid over the generated values."""
        rng = self.change_rng
        overrides = dict(fields)
        uid = overrides.pop("UID", None)
        if uid is not None:
            taken = (self.invoices, self.customers, self.payments)
            if not isinstance(uid, str) or any(uid.lower() in records for records in taken):
                raise ControlError(400, "UID must be a new GUID string")
            uid = uid.lower()
        if entity == "customer":
            row = self._add_customer(rng, at_us, at_us, uid=uid)
        elif entity == "payment":
            target = overrides.pop("Invoice", None)
            row = self.pay_open_invoice(at_us, target.get("UID") if isinstance(target, dict) else None)
            if uid is not None:
                self.payments[uid] = self.payments.pop(row.uid)
                row.uid = row.rec["UID"] = uid
                row.rec["URI"] = f"{self.cf_path}/Sale/CustomerPayment/{uid}"
        else:
            layout = overrides.pop("InvoiceType", None)
            if layout is not None and layout not in LAYOUTS:
                raise ControlError(400, f"InvoiceType must be one of {list(LAYOUTS)}")
            customer = self._customer_of(overrides)
            if customer is None:
                active = [r for r in self.customers.values() if r.rec["IsActive"]]
                customer = rng.pick(active) if active else None
            row = self._add_invoice(rng, at_us, at_us, customer, layout=layout, uid=uid)
            self.record_payments()
        self.override(row, overrides)
        return row

    def _customer_of(self, overrides: dict[str, Any]) -> _Row | None:
        link = overrides.pop("Customer", None)
        if link is None:
            return None
        uid = link.get("UID") if isinstance(link, dict) else None
        row = self.customers.get(str(uid).lower()) if uid else None
        if row is None:
            raise ControlError(404, f"no customer {uid!r} in this company file")
        return row

    def is_payment(self, row: _Row) -> bool:
        return self.payments.get(row.uid) is row

    def override(self, row: _Row, overrides: dict[str, Any]) -> None:
        """Lay control-API field values over a record (customer links resolved, card names kept in sync)."""
        payment = self.is_payment(row)
        keys = _PAYMENT_KEYS if payment else _CUSTOMER_KEYS if row.layout is None else _INVOICE_KEYS
        unknown = set(overrides) - keys
        if unknown:
            raise ControlError(400, f"unknown fields: {sorted(unknown)}")
        for fixed in ("UID", "URI", "RowVersion", "LastModified", "Created", "InvoiceType"):
            if fixed in overrides:
                raise ControlError(400, f"{fixed} is managed by the sandbox (use updated_at for the time)")
        if row.layout is not None or payment:
            customer = self._customer_of(overrides)
            if customer is not None:
                row.rec["Customer"] = self.customer_links[customer.uid]
        row.rec.update(overrides)
        if row.layout is None and not payment:
            rec, link = row.rec, self.customer_links[row.uid]
            name = rec["CompanyName"] or ", ".join(p for p in (rec["LastName"], rec["FirstName"]) if p)
            link["Name"], link["DisplayID"] = name, rec["DisplayID"]

    def counts(self) -> dict[str, Any]:
        """Record counts for the control API."""
        layouts = Counter(row.layout for row in self.invoices.values())
        return {
            "invoices": len(self.invoices),
            "customers": len(self.customers),
            "payments": len(self.payments),
            "layouts": {name: layouts.get(name, 0) for name in LAYOUTS},
        }


def _clone(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))
