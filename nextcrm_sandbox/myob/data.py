"""MYOB company files for the sandbox: deterministic customers and sale invoices of every layout, their reference
data, and the changes the control API applies (edits, voids, deletes, creates, renames)."""

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
        self.deleted_invoice_ids: list[str] = []
        self.deleted_customer_ids: list[str] = []
        rng = _Rng(seed)
        self._rv = 6_000_000_000_000_000_000 + rng.getrandbits(48)
        self._rv_rng = _Rng(seed ^ 0x5A5A)
        self.change_rng = _Rng(seed ^ 0xC4A4)
        self.next_number = 1
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
        rec: dict[str, Any] = {
            "UID": uid,
            "CompanyName": company,
            "LastName": last,
            "FirstName": first,
            "IsIndividual": individual,
            "DisplayID": display,
            "IsActive": rng.random() >= 0.08,
            "Addresses": [
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
            "Notes": "",
            "Identifiers": [],
            "CustomList1": None,
            "CustomList2": None,
            "CustomList3": None,
            "CustomField1": None,
            "CustomField2": None,
            "CustomField3": None,
            "CurrentBalance": 0.0,
            "SellingDetails": {
                "SaleLayout": rng.pick(("Service", "Item", "Professional")),
                "PrintedForm": "Pre-printed Invoice",
                "InvoiceDelivery": rng.pick(("Print", "Email", "PrintAndEmail")),
                "ItemPriceLevel": "Base Selling Price",
                "IncomeAccount": None,
                "ReceiptMemo": None,
                "SalesPerson": None,
                "SaleComment": None,
                "ShippingMethod": None,
                "HourlyBillingRate": 0.0,
                "ABN": f"{rng.randrange(10, 99)} {rng.randrange(100, 999)} {rng.randrange(100, 999)} "
                f"{rng.randrange(100, 999)}",
                "ABNBranch": None,
                "TaxCode": self.tax_gst,
                "FreightTaxCode": self.tax_gst,
                "UseCustomerTaxCode": False,
                "Terms": {
                    "PaymentIsDue": "InAGivenNumberOfDays",
                    "DiscountDate": 0,
                    "BalanceDueDate": terms_days,
                    "DiscountForEarlyPayment": 0.0,
                    "MonthlyChargeForLatePayment": 0.0,
                    "VolumeDiscount": 0.0,
                },
                "Credit": {"Limit": 0.0, "Available": 0.0, "PastDue": 0.0, "OnHold": False},
                "TaxIdNumber": None,
                "Memo": None,
            },
            "PaymentDetails": {
                "Method": rng.pick(("Cash", "Cheque", "Electronic")),
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
        if balance != total:
            paid_us = created + int(rng.random() * max(0, modified - created)) + self.offset_us
            paid_on = format_myob_datetime(paid_us - paid_us % (_DAY * _US))
        due_days = customer.rec["SellingDetails"]["Terms"]["BalanceDueDate"] if customer else 30
        due_us = date_us - date_us % (_DAY * _US) + due_days * _DAY * _US
        link = self.customer_links[customer.uid] if customer else None
        name = link["Name"] if link else "Cash Sales"
        fx = rate is not None
        rec: dict[str, Any] = {
            "UID": uid,
            "Number": f"{self.next_number:08d}",
            "Date": date_stamp,
            "CustomerPurchaseOrderNumber": f"PO{rng.randrange(1000, 99999)}" if rng.random() < 0.3 else "",
            "Customer": link,
            "PromisedDate": None,
            "BalanceDueAmount": _money(balance_local),
            "BalanceDueAmountForeign": _money(balance) if fx else None,
            "Status": status,
            "InvoiceType": layout,
            "Lines": lines,
            "ShipToAddress": f"{name}\r\n{customer.rec['Addresses'][0]['Street']}" if customer else None,
            "Terms": {
                "PaymentIsDue": "InAGivenNumberOfDays",
                "DiscountDate": 0,
                "BalanceDueDate": due_days,
                "DiscountForEarlyPayment": 0.0,
                "MonthlyChargeForLatePayment": 0.0,
                "DiscountExpiryDate": date_stamp,
                "Discount": 0.0,
                "DiscountForeign": 0.0 if fx else None,
                "DueDate": format_myob_datetime(due_us),
                "FinanceCharge": 0.0,
                "FinanceChargeForeign": 0.0 if fx else None,
            },
            "IsTaxInclusive": inclusive,
            "Subtotal": _money(subtotal_local),
            "SubtotalForeign": _money(subtotal) if fx else None,
            "Freight": _money(freight_local),
            "FreightForeign": _money(freight) if fx else None,
            "FreightTaxCode": self.tax_gst if layout in _HAS_FREIGHT else None,
            "TotalTax": _money(tax_local),
            "TotalTaxForeign": _money(tax) if fx else None,
            "TotalAmount": _money(total_local),
            "TotalAmountForeign": _money(total) if fx else None,
            "Category": None,
            "Salesperson": None,
            "Comment": "Thank you for your business." if layout != "Miscellaneous" else None,
            "ShippingMethod": None,
            "JournalMemo": f"Sale; {name}",
            "ReferralSource": None,
            "InvoiceDeliveryStatus": rng.pick(("Print", "Email", "Nothing")) if layout != "Miscellaneous" else None,
            "LastPaymentDate": paid_on,
            "CanApplySurcharge": False,
            "Order": None,
            "OnlinePaymentMethod": "All",
            "ForeignCurrency": currency_link,
            "CurrencyExchangeRate": rate if fx else 1.0,
            "Created": self.stamp(created),
            "LastModified": self.stamp(modified),
            "URI": f"{self.cf_path}/Sale/Invoice/{layout}/{uid}",
            "RowVersion": self.row_version(),
        }
        self.next_number += 1
        row = _Row(uid, rec, created, modified, layout)
        self.invoices[uid] = row
        return row

    # --- mutation helpers -------------------------------------------------------------------------------

    def touch(self, row: _Row, us: int) -> None:
        """Record a change at ``us``: new ``LastModified`` and ``RowVersion``."""
        row.lm_us = us
        row.rec["LastModified"] = self.stamp(us)
        row.rec["RowVersion"] = self.row_version()

    def apply_changes(self, counts: Mapping[str, int], now_us: int) -> dict[str, list[str]]:
        """Edit, reverse, hard-delete and create invoices; deactivate, edit and create customers, at ``now_us``."""
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
            )
        }
        picked = counts["edits"] + counts["voids"] + counts["deletes"]
        if picked > len(self.invoices):
            raise ControlError(400, f"edits + voids + deletes ({picked}) exceed the {len(self.invoices)} invoices")
        chosen = rng.sample(list(self.invoices), picked)
        edits, voids = chosen[: counts["edits"]], chosen[counts["edits"] : counts["edits"] + counts["voids"]]
        deletes = chosen[counts["edits"] + counts["voids"] :]
        active = [uid for uid, row in self.customers.items() if row.rec["IsActive"]]
        if counts["archives"] > len(active):
            raise ControlError(400, f"archives ({counts['archives']}) exceed the {len(active)} active customers")
        if counts["customer_edits"] > len(self.customers):
            raise ControlError(400, "customer_edits exceed the number of customers")
        for uid in edits:
            self._edit_invoice(self.invoices[uid], rng, now_us)
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
            if not isinstance(uid, str) or uid.lower() in self.invoices or uid.lower() in self.customers:
                raise ControlError(400, "UID must be a new GUID string")
            uid = uid.lower()
        if entity == "customer":
            row = self._add_customer(rng, at_us, at_us, uid=uid)
        else:
            layout = overrides.pop("InvoiceType", None)
            if layout is not None and layout not in LAYOUTS:
                raise ControlError(400, f"InvoiceType must be one of {list(LAYOUTS)}")
            customer = self._customer_of(overrides)
            if customer is None:
                active = [r for r in self.customers.values() if r.rec["IsActive"]]
                customer = rng.pick(active) if active else None
            row = self._add_invoice(rng, at_us, at_us, customer, layout=layout, uid=uid)
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

    def override(self, row: _Row, overrides: dict[str, Any]) -> None:
        """Lay control-API field values over a record (customer links resolved, card names kept in sync)."""
        keys = _CUSTOMER_KEYS if row.layout is None else _INVOICE_KEYS
        unknown = set(overrides) - keys
        if unknown:
            raise ControlError(400, f"unknown fields: {sorted(unknown)}")
        for fixed in ("UID", "URI", "RowVersion", "LastModified", "Created", "InvoiceType"):
            if fixed in overrides:
                raise ControlError(400, f"{fixed} is managed by the sandbox (use updated_at for the time)")
        if row.layout is not None:
            customer = self._customer_of(overrides)
            if customer is not None:
                row.rec["Customer"] = self.customer_links[customer.uid]
        row.rec.update(overrides)
        if row.layout is None:
            rec, link = row.rec, self.customer_links[row.uid]
            name = rec["CompanyName"] or ", ".join(p for p in (rec["LastName"], rec["FirstName"]) if p)
            link["Name"], link["DisplayID"] = name, rec["DisplayID"]

    def counts(self) -> dict[str, Any]:
        """Record counts for the control API."""
        layouts = Counter(row.layout for row in self.invoices.values())
        return {
            "invoices": len(self.invoices),
            "customers": len(self.customers),
            "layouts": {name: layouts.get(name, 0) for name in LAYOUTS},
        }


def _clone(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))
