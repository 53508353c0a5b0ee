"""``PayPalAccount``: one merchant's REST app with its generated transactions, subscriptions, plans and invoices
(``invoicing``), the Transaction Search, Subscriptions, Plans and Payments reads and writes, the control API's
changes and the webhook events they announce."""

from __future__ import annotations

import datetime as dt
import re
import threading
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any
from urllib.parse import urlencode

from nextcrm_sandbox.paypal.data import (
    _GIVEN,
    _INSTRUMENTS,
    _INTERVALS,
    _ITEMS,
    _PLACES,
    _PLAN_NAMES,
    _PLAN_PRICES,
    _PROTECTION,
    _SALE_CODES,
    _STATE_OF_SALE,
    _STATUS_OF_CAPTURE,
    _STREETS,
    _SUB_STATUSES,
    _SUBJECTS,
    _SURNAMES,
    _Payer,
    _Rng,
    _Txn,
)
from nextcrm_sandbox.paypal.errors import (
    PayPalError,
    _bad_request,
    _not_available,
    _not_found,
    _payment_not_found,
    _schema_error,
    _unprocessable,
)
from nextcrm_sandbox.paypal.invoicing import Invoicing
from nextcrm_sandbox.paypal.model import (
    _DAY,
    _EMPTY,
    _FIXED_FEE,
    _PAYER_ALPHABET,
    _add_interval,
    _derived_id,
    _fee,
    _money,
    _money_text,
    _price,
    _years_before,
    parse_time,
    stamp,
)
from nextcrm_sandbox.paypal.orders import Checkout, money_minor
from nextcrm_sandbox.paypal.params import (
    _AFTER_BALANCE,
    _AMOUNT_RE,
    _OPTIONAL_FILTERS,
    _SECTIONS,
    _fields,
    _id_list,
    _in_range,
    _int_param,
    _minor,
    _page_links,
    _schema_int,
    _time_param,
)
from nextcrm_sandbox.paypal.plans import announce_plan, change_plans
from nextcrm_sandbox.paypal.webhooks import _PAYMENT_EVENTS, _SUBSCRIPTION_ACTIONS, _SUBSCRIPTION_EVENTS


class PayPalAccount:
    """One merchant's REST app: credentials, knobs, transactions, subscriptions, plans and invoices."""

    def __init__(self, spec: Mapping[str, Any], *, now: int) -> None:
        self.spec = dict(spec)
        self.id: str = spec["id"]
        self.client_id: str = spec["client_id"]
        self.client_secret: str = spec["client_secret"]
        self.app_id: str = spec["app_id"]
        self.seed: int = spec["seed"]
        self.knobs: dict[str, Any] = dict(spec["knobs"])
        self.currencies: list[str] = list(spec["currencies"])
        self.created_at = now
        self.rows: list[_Txn] = []
        self.times: list[int] = []
        self.plans: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.sub_meta: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._balances_dirty = True
        self._invoice = 1000
        self.lock = threading.RLock()
        self.by_txn: dict[str, _Txn] = {}  # balance-affecting rows by transaction id (captures, sales, refunds)
        self.refunded: dict[str, int] = {}  # minor units refunded so far, by the refunded row's transaction id
        self.refund_requests: dict[str, tuple[str, dict[str, Any]]] = {}  # PayPal-Request-Id -> (capture, refund)
        # Told of each change webhooks announce: (event type, resource type, resource builder taking the API base).
        self.on_event: Callable[[str, str, Callable[[str], dict[str, Any]]], None] | None = None
        self._rng = _Rng(f"paypal-changes:{self.client_id}:{self.seed}")
        rng = _Rng(f"paypal:{self.client_id}:{self.seed}")
        self.payers = [self._new_payer(rng) for _ in range(max(20, min(2000, spec["transactions"] // 5)))]
        self._generate(rng, now)
        # Invoices draw on a random stream of their own: the rest of the account is as it was without them.
        self.invoicing = Invoicing(self, spec.get("invoices", 0), now)
        self.checkout = Checkout(self)

    # --- generation -------------------------------------------------------------------------------------

    @staticmethod
    def _new_payer(rng: _Rng) -> _Payer:
        given, surname = rng.pick(_GIVEN), rng.pick(_SURNAMES)
        account = rng.account_id()
        return _Payer(
            account_id=account,
            given=given,
            surname=surname,
            email=f"{given.lower()}.{surname.lower()}.{account[:4].lower()}@example.com",
            phone=f"{rng.between(200, 999)}{rng.between(1000000, 9999999)}",
            place=rng.pick(_PLACES),
            street=f"{rng.between(1, 9999)} {rng.pick(_STREETS)}",
            payer_status=rng.pick(("Y", "Y", "N")),
            address_status=rng.pick(("Y", "N")),
        )

    def _currency(self, rng: _Rng) -> str:
        if len(self.currencies) == 1 or rng.random() < 0.6:
            return self.currencies[0]
        return rng.pick(self.currencies[1:])

    def _generate(self, rng: _Rng, now: int) -> None:
        spec = self.spec
        span = max(1.0, spec["days"] * _DAY)
        start = now - span
        for _ in range(spec["plans"]):
            self._new_plan(rng, start + rng.random() * span * 0.2)
        plan_ids = list(self.plans)
        budget = spec["transactions"]
        sub_created = sorted(start + rng.random() * span for _ in range(spec["subscriptions"]))
        for created in sub_created:
            sid = self._new_subscription(rng, rng.pick(plan_ids), int(created), now)
            budget -= self._history(rng, sid, now, budget)
        times = sorted(int(start + rng.random() * span) for _ in range(max(0, budget)))
        made = 0
        new_rows: list[_Txn] = []
        for t in times:
            if made >= budget:
                break
            roll = rng.random()
            if roll < 0.02:
                new_rows.append(self._withdrawal(rng, t))
                made += 1
                continue
            sale = self._sale(rng, t)
            new_rows.append(sale)
            made += 1
            if made < budget and sale.code in ("T0006", "T0005") and rng.random() < 0.06:
                new_rows.append(self._authorization(sale))
                made += 1
            if made < budget and sale.status == "S" and rng.random() < 0.07:
                when = int(t + rng.random() * (now - t))
                partial = rng.random() < 0.3
                new_rows.append(self._refund(rng, sale, when, partial=partial))
                made += 1
        self._insert(new_rows)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _new_plan(self, rng: _Rng, created: float, fields: Mapping[str, Any] | None = None) -> str:
        pid = "P-" + rng.chars(_PAYER_ALPHABET, 24)
        currency = self._currency(rng)
        unit = rng.pick(_INTERVALS)
        price = _price(rng.pick(_PLAN_PRICES) * (10 if unit == "YEAR" else 1), currency)
        when = stamp(created)
        cycles: list[dict[str, Any]] = []
        if rng.random() < 0.3:
            cycles.append(
                {
                    "frequency": {"interval_unit": unit, "interval_count": 1},
                    "tenure_type": "TRIAL",
                    "sequence": 1,
                    "total_cycles": 1,
                }
            )
        cycles.append(
            {
                "pricing_scheme": {
                    "version": 1,
                    "fixed_price": _money(price, currency),
                    "create_time": when,
                    "update_time": when,
                },
                "frequency": {"interval_unit": unit, "interval_count": 1},
                "tenure_type": "REGULAR",
                "sequence": len(cycles) + 1,
                "total_cycles": rng.pick((0, 0, 0, 12, 24)),
            }
        )
        name = f"{rng.pick(_PLAN_NAMES)} {unit.lower()}ly plan".replace("dayly", "daily")
        plan: dict[str, Any] = {
            "id": pid,
            "product_id": "PROD-" + rng.chars(_PAYER_ALPHABET, 17),
            "name": name,
            "status": "ACTIVE" if rng.random() < 0.85 else rng.pick(("INACTIVE", "CREATED")),
            "description": f"{name} ({currency})",
            "usage_type": "LICENSED",
            "billing_cycles": cycles,
            "payment_preferences": {
                "auto_bill_outstanding": True,
                "setup_fee": _money(0, currency),
                "setup_fee_failure_action": "CONTINUE",
                "payment_failure_threshold": 3,
            },
            "taxes": {"percentage": rng.pick(("0", "10", "20")), "inclusive": False},
            "quantity_supported": False,
            "create_time": when,
            "update_time": when,
        }
        for key, value in (fields or {}).items():
            if key not in ("id", "links"):
                plan[key] = value
        self.plans[pid] = plan
        return pid

    def _regular_cycle(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        return next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")

    def _new_subscription(self, rng: _Rng, plan_id: str, created: int, now: int, status: str | None = None) -> str:
        plan = self.plans[plan_id]
        sid = "I-" + rng.chars(_PAYER_ALPHABET, 12)
        payer = rng.pick(self.payers)
        regular = self._regular_cycle(plan)
        currency = regular["pricing_scheme"]["fixed_price"]["currency_code"]
        if status is None:
            roll, acc = rng.random(), 0.0
            status = "ACTIVE"
            for name, share in _SUB_STATUSES:
                acc += share
                if roll < acc:
                    status = name
                    break
        start_time = created + rng.between(60, 3600)
        country, city, state, postal = payer.place
        address: dict[str, Any] = {"address_line_1": payer.street, "admin_area_2": city}
        if state:
            address["admin_area_1"] = state
        address.update({"postal_code": postal, "country_code": country})
        sub: dict[str, Any] = {
            "status": status,
            "status_update_time": stamp(created),
            "id": sid,
            "plan_id": plan_id,
            "start_time": stamp(start_time),
            "quantity": "1",
            "shipping_amount": _money(0, currency),
            "subscriber": {
                "email_address": payer.email,
                "payer_id": payer.account_id,
                "name": {"given_name": payer.given, "surname": payer.surname},
                "shipping_address": {
                    "name": {"full_name": f"{payer.given} {payer.surname}"},
                    "address": address,
                },
            },
            "billing_info": {
                "outstanding_balance": _money(0, currency),
                "cycle_executions": [
                    {
                        "tenure_type": c["tenure_type"],
                        "sequence": c["sequence"],
                        "cycles_completed": 0,
                        "cycles_remaining": c.get("total_cycles", 1),
                        "current_pricing_scheme_version": 1,
                        "total_cycles": c.get("total_cycles", 1),
                    }
                    for c in plan["billing_cycles"]
                ],
                "failed_payments_count": 0,
            },
            "create_time": stamp(created),
            "update_time": stamp(created),
            "plan_overridden": False,
        }
        if rng.random() < 0.5:
            sub["custom_id"] = f"cust-{rng.between(10000, 99999)}"
        self.subscriptions[sid] = sub
        self.sub_meta[sid] = {
            "payer": payer,
            "created": created,
            "start": start_time,
            "updated": created,
            "status_time": created,
            "payments": [],
            "currency": currency,
            "price": _minor(regular["pricing_scheme"]["fixed_price"]["value"], currency),
            "unit": regular["frequency"]["interval_unit"],
            "trial": plan["billing_cycles"][0]["tenure_type"] == "TRIAL",
        }
        return sid

    def _history(self, rng: _Rng, sid: str, now: int, budget: int) -> int:
        """Payments and status changes of a generated subscription up to ``now``; returns rows made."""
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        status = sub["status"]
        if status in ("APPROVAL_PENDING", "APPROVED"):
            return 0
        end = now
        if status != "ACTIVE":
            end = int(meta["start"] + rng.random() * (now - meta["start"]))
        t = meta["start"]
        if meta["trial"]:
            self._complete_cycle(sid, 0)
            t = _add_interval(t, meta["unit"])
        rows: list[_Txn] = []
        while t <= end and len(rows) < budget and self._cycles_left(sid) != 0:
            rows.append(self._subscription_payment(rng, sid, int(t)))
            t = _add_interval(t, meta["unit"])
        self._insert(rows)
        if status == "ACTIVE" and self._cycles_left(sid) == 0:
            self._set_status(sid, "EXPIRED", rows[-1].time if rows else meta["start"])
        elif status != "ACTIVE":
            self._set_status(sid, status, max(end, meta["start"]))
        self._refresh_billing(sid)
        return len(rows)

    def _cycles_left(self, sid: str) -> int | None:
        """Regular billing cycles still to run (None: the plan bills until cancelled)."""
        cycle = self.subscriptions[sid]["billing_info"]["cycle_executions"][-1]
        return cycle["cycles_remaining"] if cycle["total_cycles"] else None

    def _complete_cycle(self, sid: str, index: int) -> None:
        cycles = self.subscriptions[sid]["billing_info"]["cycle_executions"]
        if index < len(cycles):
            cycle = cycles[index]
            cycle["cycles_completed"] += 1
            if cycle["total_cycles"]:
                cycle["cycles_remaining"] = max(0, cycle["total_cycles"] - cycle["cycles_completed"])

    def _set_status(self, sid: str, status: str, when: float, note: str | None = None) -> None:
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        sub["status"] = status
        sub["status_update_time"] = stamp(when)
        meta["status_time"] = when
        if note:
            sub["status_change_note"] = note
        self._touch_sub(sid, when)

    def _touch_sub(self, sid: str, when: float) -> None:
        meta = self.sub_meta[sid]
        meta["updated"] = max(meta["updated"], when)
        self.subscriptions[sid]["update_time"] = stamp(meta["updated"])

    def _refresh_billing(self, sid: str) -> None:
        sub, meta = self.subscriptions[sid], self.sub_meta[sid]
        billing = sub["billing_info"]
        payments = [r for r in meta["payments"] if r.status != "D"]
        if payments:
            last = payments[-1]
            billing["last_payment"] = {"amount": _money(last.amount, last.currency), "time": stamp(last.time)}
        if sub["status"] == "ACTIVE":
            base = payments[-1].time if payments else meta["start"]
            nxt = _add_interval(base, meta["unit"]) if payments else base
            billing["next_billing_time"] = stamp(nxt)
        else:
            billing.pop("next_billing_time", None)

    def _subscription_payment(self, rng: _Rng, sid: str, t: int) -> _Txn:
        meta = self.sub_meta[sid]
        row = self._sale(rng, t, code="T0002", payer=meta["payer"], currency=meta["currency"], amount=meta["price"])
        info = row.infos[-1][1]
        info["paypal_reference_id"] = sid
        info["paypal_reference_id_type"] = "SUB"
        row.subscription = sid
        meta["payments"].append(row)
        index = 1 if meta["trial"] else 0
        self._complete_cycle(sid, index)
        self._touch_sub(sid, t)
        return row

    def _sale(
        self,
        rng: _Rng,
        t: int,
        *,
        code: str | None = None,
        payer: _Payer | None = None,
        currency: str | None = None,
        amount: int | None = None,
    ) -> _Txn:
        style = self.knobs["date_style"]
        code = code or rng.pick(_SALE_CODES)
        payer = payer or rng.pick(self.payers)
        currency = currency or self._currency(rng)
        item_code, item_name, base = rng.pick(_ITEMS)
        quantity = 1 if code in ("T0002", "T0013") or rng.random() < 0.7 else rng.between(2, 5)
        unit = _price(base, currency)
        if amount is None:
            amount = unit * quantity
        else:
            unit, quantity = amount, 1
        roll = rng.random()
        status = "S" if roll < 0.93 else "P" if roll < 0.97 else "D"
        fee = 0 if status == "D" else _fee(amount, currency)
        category, instrument_type, instrument_sub = rng.pick(_INSTRUMENTS)
        when = stamp(t, style)
        txn_id = rng.txn_id()
        self._invoice += 1
        subject = _SUBJECTS.get(code, "Payment") if code != "T0002" else f"{item_name} subscription"
        info: dict[str, Any] = {
            "paypal_account_id": payer.account_id,
            "transaction_id": txn_id,
            "transaction_event_code": code,
            "transaction_initiation_date": when,
            "transaction_updated_date": when,
            "transaction_amount": _money(amount, currency),
        }
        if fee:
            info["fee_amount"] = _money(fee, currency)
        info["transaction_status"] = status
        info["transaction_subject"] = subject
        if rng.random() < 0.1:
            info["transaction_note"] = "Thanks, see you soon"
        info["invoice_id"] = f"INV-{self._invoice:07d}"
        if rng.random() < 0.3:
            info["custom_field"] = f"order-{self._invoice}"
        info["protection_eligibility"] = rng.pick(("01", "02", "02", "03"))
        info["instrument_type"] = instrument_type
        info["instrument_sub_type"] = instrument_sub
        shipping = payer.shipping_info if code not in ("T0013", "T0002") and rng.random() < 0.7 else _EMPTY
        item: dict[str, Any] = {
            "item_code": item_code,
            "item_name": item_name,
            "item_description": item_name,
            "item_quantity": str(quantity),
            "item_unit_price": _money(unit, currency),
            "item_amount": _money(unit * quantity, currency),
            "total_item_amount": _money(amount, currency),
            "invoice_number": info["invoice_id"],
        }
        store: dict[str, Any] = _EMPTY
        if code == "T0011":
            store = {"store_id": f"STORE{rng.between(1, 4)}", "terminal_id": f"T{rng.between(1, 9)}"}
        row = _Txn(
            time=t,
            seq=self._next_seq(),
            txn_id=txn_id,
            code=code,
            balance=True,
            currency=currency,
            amount=amount,
            fee=fee,
            instrument=category,
            infos=[(t, info)],
            sections={
                "payer_info": payer.payer_info,
                "shipping_info": shipping,
                "cart_info": {"item_details": [item]},
                "store_info": store,
                "auction_info": _EMPTY,
                "incentive_info": _EMPTY,
            },
            payer_name=payer.name,
            payer_email=payer.email,
        )
        return row

    def invoice_capture(self, payer: _Payer, currency: str, amount: int, invoice_number: str, now: int) -> _Txn:
        """A completed Checkout capture (T0006) of ``amount`` minor units from ``payer`` paying an invoice: it
        carries the invoice's number, as Transaction Search shows it; stored and announced."""
        row = self._sale(self._rng, now, code="T0006", payer=payer, currency=currency, amount=amount)
        when, info = row.infos[-1]
        fee = _fee(amount, currency)
        rebuilt: dict[str, Any] = {}
        for key, value in info.items():
            if key == "transaction_status":
                rebuilt["fee_amount"] = _money(fee, currency)
                rebuilt[key] = "S"
            elif key == "invoice_id":
                rebuilt[key] = invoice_number
            elif key != "fee_amount":
                rebuilt[key] = value
        row.infos[-1] = (when, rebuilt)
        row.fee = fee
        row.sections["cart_info"]["item_details"][0]["invoice_number"] = invoice_number
        self._insert([row])
        self._announce_payment(row)
        return row

    def _authorization(self, sale: _Txn) -> _Txn:
        """A non-balance-affecting authorization row sharing the sale's ``transaction_id``."""
        info = dict(sale.infos[0][1])
        info["transaction_event_code"] = "T1301"
        info.pop("fee_amount", None)
        info["transaction_status"] = "S"
        info["transaction_subject"] = "Authorization"
        return _Txn(
            time=sale.time,
            seq=self._next_seq(),
            txn_id=sale.txn_id,
            code="T1301",
            balance=False,
            currency=sale.currency,
            amount=sale.amount,
            fee=0,
            instrument=sale.instrument,
            infos=[(sale.time, info)],
            sections={**sale.sections},
            payer_name=sale.payer_name,
            payer_email=sale.payer_email,
        )

    def _withdrawal(self, rng: _Rng, t: int) -> _Txn:
        currency = self._currency(rng)
        amount = -_price(rng.between(5000, 200000), currency)
        when = stamp(t, self.knobs["date_style"])
        txn_id = rng.txn_id()
        info: dict[str, Any] = {
            "transaction_id": txn_id,
            "transaction_event_code": "T0403",
            "transaction_initiation_date": when,
            "transaction_updated_date": when,
            "transaction_amount": _money(amount, currency),
            "transaction_status": "S",
            "bank_reference_id": str(rng.between(10**12, 10**13 - 1)),
            "protection_eligibility": "02",
            "instrument_type": "PayPal",
            "instrument_sub_type": "PayPal Wallet",
        }
        return _Txn(
            time=t,
            seq=self._next_seq(),
            txn_id=txn_id,
            code="T0403",
            balance=True,
            currency=currency,
            amount=amount,
            fee=0,
            instrument="PAYPAL",
            infos=[(t, info)],
            sections={
                "payer_info": {"address_status": "N", "payer_name": {}},
                "shipping_info": {},
                "cart_info": {},
                "store_info": {},
                "auction_info": {},
                "incentive_info": {},
            },
        )

    def _refund(self, rng: _Rng, sale: _Txn, when: int, *, partial: bool, back: int | None = None) -> _Txn:
        """A ``T1107`` refund row at ``when`` (of ``back`` minor units, else all or a random part); the sale
        becomes ``V`` once refunded in full, ``F`` before."""
        style = self.knobs["date_style"]
        if back is None:
            back = sale.amount if not partial else max(1, int(sale.amount * (0.2 + rng.random() * 0.6)))
        percent_fee = (abs(sale.fee) - _FIXED_FEE.get(sale.currency, 30)) if sale.fee else 0
        fee_back = (percent_fee * back) // sale.amount if sale.amount else 0
        txn_id = rng.txn_id()
        stamp_when = stamp(when, style)
        source = sale.infos[-1][1]
        info: dict[str, Any] = {
            "paypal_account_id": source.get("paypal_account_id"),
            "transaction_id": txn_id,
            "paypal_reference_id": sale.txn_id,
            "paypal_reference_id_type": "TXN",
            "transaction_event_code": "T1107",
            "transaction_initiation_date": stamp_when,
            "transaction_updated_date": stamp_when,
            "transaction_amount": _money(-back, sale.currency),
        }
        if fee_back:
            info["fee_amount"] = _money(fee_back, sale.currency)
        info["transaction_status"] = "S"
        info["transaction_subject"] = "Refund"
        for key in ("invoice_id", "custom_field", "protection_eligibility", "instrument_type", "instrument_sub_type"):
            if key in source:
                info[key] = source[key]
        if info["paypal_account_id"] is None:
            del info["paypal_account_id"]
        row = _Txn(
            time=when,
            seq=self._next_seq(),
            txn_id=txn_id,
            code="T1107",
            balance=True,
            currency=sale.currency,
            amount=-back,
            fee=fee_back,
            instrument=sale.instrument,
            infos=[(when, info)],
            sections={**sale.sections, "shipping_info": {}, "store_info": {}},
            subscription=sale.subscription,
            payer_name=sale.payer_name,
            payer_email=sale.payer_email,
        )
        refunded = self.refunded.get(sale.txn_id, 0) + back
        self.refunded[sale.txn_id] = refunded
        self._new_version(sale, when, {"transaction_status": "V" if refunded >= sale.amount else "F"})
        return row

    def _new_version(self, row: _Txn, when: int, changes: Mapping[str, Any]) -> None:
        info = {**row.infos[-1][1], **changes}
        info["transaction_updated_date"] = stamp(when, self.knobs["date_style"])
        row.infos.append((when, info))
        row.infos.sort(key=lambda v: v[0])
        self._balances_dirty = True

    def _insert(self, rows: Iterable[_Txn]) -> None:
        rows = list(rows)
        if not rows:
            return
        for row in rows:
            if row.balance:
                self.by_txn[row.txn_id] = row
        if len(rows) == 1 and (not self.rows or (rows[0].time, rows[0].seq) >= (self.rows[-1].time, 0)):
            self.rows.append(rows[0])
            self.times.append(rows[0].time)
        else:
            self.rows.extend(rows)
            self.rows.sort(key=lambda r: (r.time, r.seq))
            self.times = [r.time for r in self.rows]
        self._balances_dirty = True

    # --- balances, visibility -----------------------------------------------------------------------------

    def _refresh_balances(self) -> None:
        if not self._balances_dirty:
            return
        ending: Counter[str] = Counter()
        pending: Counter[str] = Counter()
        for row in self.rows:
            if row.balance:
                status = row.status
                if status != "D":
                    ending[row.currency] += row.amount + row.fee
                    if status == "P":
                        pending[row.currency] += row.amount + row.fee
            row.ending = ending[row.currency]
            row.available = ending[row.currency] - pending[row.currency]
        self._balances_dirty = False

    def last_refreshed(self, now: float) -> int:
        """The time Transaction Search's data ends at (``last_refreshed_datetime``)."""
        lag = self.knobs["visibility_lag_seconds"]
        interval = self.knobs["refresh_interval_seconds"]
        edge = int(now) - lag
        if interval:
            return (edge // interval) * interval - 1
        return edge

    # --- Transaction Search -------------------------------------------------------------------------------

    def search(self, params: Mapping[str, str], now: int, base_url: str) -> dict[str, Any]:
        """Answer ``GET /v1/reporting/transactions``; raises ``PayPalError`` as PayPal would."""
        knobs = self.knobs
        raw_start, raw_end = params.get("start_date"), params.get("end_date")
        if not raw_start:
            raise _bad_request("start_date", raw_start, "start_date is required")
        if not raw_end:
            raise _bad_request("end_date", raw_end, "end_date is required")
        try:
            start = parse_time(raw_start)
        except ValueError:
            raise _bad_request("start_date", raw_start, "Invalid date format") from None
        try:
            end = parse_time(raw_end)
        except ValueError:
            raise _bad_request("end_date", raw_end, "Invalid date format") from None
        if end < start:
            raise _bad_request("end_date", raw_end, "End date should be greater than start date")
        if end - start > knobs["max_window_days"] * _DAY:
            raise _bad_request("end_date", raw_end, f"Date range is greater than {knobs['max_window_days']} days")
        refreshed = self.last_refreshed(now)
        if start < _years_before(now, knobs["history_years"]):
            raise _not_available(raw_start)
        min_age = knobs["min_start_age_seconds"]
        if start > refreshed or (min_age is not None and start > now - min_age):
            raise _not_available()
        page_size = _int_param(params, "page_size", 100, 1, knobs["page_size_max"])
        page = _int_param(params, "page", 1, 1, 2_147_483_647)
        sections = _fields(params.get("fields"))
        balance_only = params.get("balance_affecting_records_only", "Y").upper()
        if balance_only not in ("Y", "N"):
            raise _bad_request("balance_affecting_records_only", params.get("balance_affecting_records_only"), "Y or N")
        filters = {k: params[k] for k in _OPTIONAL_FILTERS if params.get(k)}
        match = self._matcher(filters, refreshed)
        with self.lock:
            self._refresh_balances()
            lo = bisect_left(self.times, start)
            hi = bisect_right(self.times, min(end, refreshed))
            hits = [r for r in self.rows[lo:hi] if (r.balance or balance_only == "N") and (match is None or match(r))]
            total = len(hits)
            if total > knobs["result_cap"]:
                raise PayPalError(
                    400,
                    "RESULTSET_TOO_LARGE",
                    "Result set size is greater than the maximum limit. Change the filter criteria and try again.",
                    extra={"total_items": total, "maximum_items": knobs["result_cap"]},
                )
            page_rows = hits[(page - 1) * page_size : page * page_size]
            details = [self.render(r, sections, refreshed, balances=not filters) for r in page_rows]
        total_pages = (total + page_size - 1) // page_size
        style = knobs["date_style"]
        body: dict[str, Any] = {
            "transaction_details": details,
            "account_number": self.id,
            "start_date": stamp(start, style),
            "end_date": stamp(end, style),
            "last_refreshed_datetime": stamp(refreshed, style),
            "page": page,
            "total_items": total,
            "total_pages": total_pages,
            "links": _page_links(f"{base_url}/v1/reporting/transactions", params, page, total_pages),
        }
        return body

    def _matcher(self, filters: Mapping[str, str], cutoff: int) -> Callable[[_Txn], bool] | None:
        if not filters:
            return None
        tests: list[Callable[[_Txn], bool]] = []
        if "transaction_id" in filters:
            wanted = filters["transaction_id"]
            if not 17 <= len(wanted) <= 19:
                raise _bad_request("transaction_id", wanted, "Invalid transaction_id length")
            tests.append(lambda r: r.txn_id == wanted)
        if "transaction_type" in filters:
            code = filters["transaction_type"].upper()
            tests.append(lambda r: r.code == code)
        if "transaction_status" in filters:
            status = filters["transaction_status"].upper()
            if status not in ("S", "P", "V", "F", "D"):
                raise _bad_request("transaction_status", filters["transaction_status"], "Invalid transaction status")
            tests.append(lambda r: r.info_at(cutoff)["transaction_status"] == status)
        if "transaction_amount" in filters:
            m = _AMOUNT_RE.match(filters["transaction_amount"])
            if m is None:
                raise _bad_request("transaction_amount", filters["transaction_amount"], "Invalid amount range")
            low, high = int(m.group(1)), int(m.group(2))
            tests.append(lambda r: low <= r.amount <= high)
        if "transaction_currency" in filters:
            currency = filters["transaction_currency"].upper()
            tests.append(lambda r: r.currency == currency)
        if "payment_instrument_type" in filters:
            kind = filters["payment_instrument_type"].upper().replace("_", "")
            tests.append(lambda r: r.instrument == kind)
        if "store_id" in filters:
            store = filters["store_id"]
            tests.append(lambda r: r.sections["store_info"].get("store_id") == store)
        if "terminal_id" in filters:
            terminal = filters["terminal_id"]
            tests.append(lambda r: r.sections["store_info"].get("terminal_id") == terminal)
        return lambda r: all(test(r) for test in tests)

    def render(
        self, row: _Txn, sections: Sequence[str], cutoff: float | None, *, balances: bool = True
    ) -> dict[str, Any]:
        """One ``transaction_details`` entry with the asked sections."""
        out: dict[str, Any] = {}
        for section in sections:
            if section != "transaction_info":
                out[section] = row.sections[section]
                continue
            info = row.info_at(cutoff)
            if not row.balance:
                out[section] = info
                continue
            rendered: dict[str, Any] = {}
            placed = False
            for key, value in info.items():
                if not placed and key in _AFTER_BALANCE:
                    self._place_balances(rendered, row, balances)
                    placed = True
                rendered[key] = value
            if not placed:
                self._place_balances(rendered, row, balances)
            out[section] = rendered
        return out

    @staticmethod
    def _place_balances(target: dict[str, Any], row: _Txn, with_ending: bool) -> None:
        if with_ending:
            target["ending_balance"] = _money(row.ending, row.currency)
        target["available_balance"] = _money(row.available, row.currency)

    # --- Subscriptions and plans --------------------------------------------------------------------------

    def subscription(self, sid: str, base_url: str, fields: str | None = None) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions/{id}`` (``fields=plan,last_failed_payment`` add those parts)."""
        sub = self.subscriptions.get(sid)
        if sub is None:
            raise _not_found("subscriptions")
        wanted = {f.strip() for f in (fields or "").split(",") if f.strip()}
        out = dict(sub)
        billing = dict(sub["billing_info"])
        if "last_failed_payment" not in wanted:
            billing.pop("last_failed_payment", None)
        out["billing_info"] = billing
        if "plan" in wanted:
            out["plan"] = self.plan(sub["plan_id"], base_url)
        href = f"{base_url}/v1/billing/subscriptions/{sid}"
        links = [{"href": href, "rel": "self", "method": "GET"}, {"href": href, "rel": "edit", "method": "PATCH"}]
        if sub["status"] in ("ACTIVE", "SUSPENDED"):
            links += [
                {"href": f"{href}/cancel", "rel": "cancel", "method": "POST"},
                {"href": f"{href}/capture", "rel": "capture", "method": "POST"},
            ]
            action = "suspend" if sub["status"] == "ACTIVE" else "activate"
            links.append({"href": f"{href}/{action}", "rel": action, "method": "POST"})
        out["links"] = links
        return out

    def subscription_transactions(self, sid: str, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions/{id}/transactions?start_time&end_time``."""
        if sid not in self.subscriptions:
            raise _not_found("subscriptions")
        bounds: list[float] = []
        for name in ("start_time", "end_time"):
            raw = params.get(name)
            if not raw:
                raise _schema_error(
                    name, None, "MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing."
                )
            try:
                bounds.append(parse_time(raw))
            except ValueError:
                raise _schema_error(
                    name,
                    raw,
                    "INVALID_PARAMETER_SYNTAX",
                    "The value of a field does not conform to the expected format.",
                ) from None
        start, end = bounds
        if end < start:
            raise _schema_error(
                "end_time", params.get("end_time"), "INVALID_PARAMETER_VALUE", "The value of a field is invalid."
            )
        items = []
        for row in self.sub_meta[sid]["payments"]:
            if start <= row.time <= end:
                gross = row.amount
                fee = -row.fee
                item: dict[str, Any] = {
                    "status": _STATUS_OF_CAPTURE[row.status],
                    "id": row.txn_id,
                    "amount_with_breakdown": {
                        "gross_amount": _money(gross, row.currency),
                        "fee_amount": _money(fee, row.currency),
                        "net_amount": _money(gross - fee, row.currency),
                    },
                    "payer_name": dict(row.payer_name or {}),
                    "payer_email": row.payer_email,
                    "time": stamp(row.time),
                }
                items.append(item)
        href = f"{base_url}/v1/billing/subscriptions/{sid}/transactions?" + urlencode(
            {"start_time": params["start_time"], "end_time": params["end_time"]}
        )
        return {
            "transactions": items,
            "total_items": len(items),
            "total_pages": 1,
            "links": [{"href": href, "rel": "SELF", "method": "GET"}],
        }

    def list_subscriptions(self, params: Mapping[str, str], base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/subscriptions`` (the list endpoint of the newer server SDK)."""
        page_size = _schema_int(params, "page_size", 10, 1, 20)
        page = _schema_int(params, "page", 1, 1, 10_000_000)
        plan_ids = _id_list(params.get("plan_ids"), "plan_ids", 70)
        statuses = None
        if params.get("statuses"):
            raw = params["statuses"]
            if not re.fullmatch(r"[A-Z_,]+", raw):
                raise _schema_error("statuses", raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.")
            statuses = set(raw.split(","))
        ranges: dict[str, tuple[float | None, float | None]] = {}
        for key in ("created", "status_updated"):
            low = _time_param(params, f"{key}_after")
            high = _time_param(params, f"{key}_before")
            ranges[key] = (low, high)
        hits = []
        for sid, sub in self.subscriptions.items():
            meta = self.sub_meta[sid]
            if plan_ids is not None and sub["plan_id"] not in plan_ids:
                continue
            if statuses is not None and sub["status"] not in statuses:
                continue
            if not _in_range(meta["created"], ranges["created"]):
                continue
            if not _in_range(meta["status_time"], ranges["status_updated"]):
                continue
            hits.append((meta["created"], sid))
        hits.sort()
        chosen = hits[(page - 1) * page_size : page * page_size]
        subs = [self.subscription(sid, base_url) for _, sid in chosen]
        total_pages = (len(hits) + page_size - 1) // page_size
        return {
            "subscriptions": subs,
            "links": _page_links(f"{base_url}/v1/billing/subscriptions", params, page, total_pages),
        }

    def plan(self, pid: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/plans/{id}``: the full plan."""
        plan = self.plans.get(pid)
        if plan is None:
            raise _not_found("plans")
        href = f"{base_url}/v1/billing/plans/{pid}"
        action = "deactivate" if plan["status"] == "ACTIVE" else "activate"
        links = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": href, "rel": "edit", "method": "PATCH"},
            {"href": f"{href}/{action}", "rel": action, "method": "POST"},
        ]
        return {**plan, "links": links}

    def list_plans(self, params: Mapping[str, str], prefer: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/billing/plans`` (minimal items unless ``Prefer: return=representation``)."""
        page_size = _schema_int(params, "page_size", 10, 1, 20)
        page = _schema_int(params, "page", 1, 1, 100_000)
        product = params.get("product_id")
        if product is not None and not 6 <= len(product) <= 50:
            raise _schema_error("product_id", product, "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
        plan_ids = _id_list(params.get("plan_ids"), "plan_ids", 10)
        total_required = params.get("total_required", "false").lower() == "true"
        hits = [
            p
            for p in sorted(self.plans.values(), key=lambda p: (p["create_time"], p["id"]))
            if (product is None or p["product_id"] == product) and (plan_ids is None or p["id"] in plan_ids)
        ]
        chosen = hits[(page - 1) * page_size : page * page_size]
        full = "return=representation" in prefer.replace(" ", "").lower()
        plans = []
        for plan in chosen:
            if full:
                plans.append(self.plan(plan["id"], base_url))
                continue
            item = {k: plan[k] for k in ("id", "product_id", "name", "status", "description", "usage_type")}
            item["create_time"] = plan["create_time"]
            item["links"] = [{"href": f"{base_url}/v1/billing/plans/{plan['id']}", "rel": "self", "method": "GET"}]
            plans.append(item)
        total_pages = (len(hits) + page_size - 1) // page_size
        body: dict[str, Any] = {"plans": plans}
        if total_required:
            body["total_items"] = len(hits)
            body["total_pages"] = total_pages
        body["links"] = _page_links(
            f"{base_url}/v1/billing/plans", params, page, total_pages if total_required else None
        )
        return body

    # --- changes (control API) ----------------------------------------------------------------------------

    def apply_changes(self, changes: Mapping[str, int], now: int) -> dict[str, list[str]]:
        """New transactions, refunds, subscription updates and cancellations, then plan updates and new, paid
        and cancelled invoices, all at ``now``."""
        rng = self._rng
        out: dict[str, list[str]] = {
            "created": [],
            "edited": [],
            "deleted": [],
            "refunds": [],
            "subscriptions_updated": [],
            "subscriptions_cancelled": [],
        }
        with self.lock:
            rows: list[_Txn] = []
            announce: list[Callable[[], None]] = []
            for _ in range(changes.get("transactions", 0)):
                sale = self._sale(rng, now)
                rows.append(sale)
                out["created"].append(sale.txn_id)
                announce.append(partial(self._announce_payment, sale))
            refundable = [
                r
                for r in self.rows
                if r.balance and r.status == "S" and r.code.startswith("T00") and r.amount > 0 and r.code != "T0403"
            ]
            rng.shuffle(refundable)
            for sale in refundable[: changes.get("refunds", 0)]:
                refund = self._refund(rng, sale, now, partial=rng.random() < 0.3)
                rows.append(refund)
                out["refunds"].append(refund.txn_id)
                out["created"].append(refund.txn_id)
                out["edited"].append(sale.txn_id)
                announce.append(partial(self._announce_refund, refund, sale))
                announce.append(partial(self.invoicing.capture_refunded, sale, refund))
                if sale.subscription:
                    self._touch_sub(sale.subscription, now)
            live = [sid for sid, s in self.subscriptions.items() if s["status"] not in ("CANCELLED", "EXPIRED")]
            rng.shuffle(live)
            n_updates = changes.get("subscription_updates", 0)
            for sid in live[:n_updates]:
                before = (self.subscriptions[sid]["status"], self.subscriptions[sid]["quantity"])
                row = self._update_subscription(rng, sid, now)
                if row is not None:
                    rows.append(row)
                    out["created"].append(row.txn_id)
                    announce.append(partial(self._announce_payment, row))
                kind = self._subscription_change(sid, *before)
                if kind is not None:
                    announce.append(partial(self._announce_subscription, sid, kind))
                out["subscriptions_updated"].append(sid)
            for sid in live[n_updates : n_updates + changes.get("cancels", 0)]:
                self._set_status(sid, "CANCELLED", now, note="Cancelled by the subscriber")
                self._refresh_billing(sid)
                out["subscriptions_cancelled"].append(sid)
                announce.append(partial(self._announce_subscription, sid, "BILLING.SUBSCRIPTION.CANCELLED"))
            self._insert(rows)
            for call in announce:
                call()
            if changes.get("plan_updates", 0):
                out["plans_updated"] = change_plans(self, rng, changes["plan_updates"], now)
            invoices = [changes.get(k, 0) for k in ("invoices", "invoice_payments", "invoice_cancels")]
            if any(invoices):
                out.update(self.invoicing.apply_changes(*invoices, now))
        return out

    # --- webhook announcements ----------------------------------------------------------------------------

    def _subscription_change(self, sid: str, status: str, quantity: str) -> str | None:
        """The ``BILLING.SUBSCRIPTION.*`` event a change from (status, quantity) makes, if any."""
        sub = self.subscriptions[sid]
        if sub["status"] != status:
            return _SUBSCRIPTION_EVENTS.get(sub["status"], "BILLING.SUBSCRIPTION.UPDATED")
        return "BILLING.SUBSCRIPTION.UPDATED" if sub["quantity"] != quantity else None

    def _announce_payment(self, row: _Txn) -> None:
        """``PAYMENT.CAPTURE.*`` for a Checkout capture (T0006), ``PAYMENT.SALE.*`` for a subscription sale (T0002)."""
        kind = _PAYMENT_EVENTS.get(row.code)
        word = {"S": "COMPLETED", "P": "PENDING", "D": "DENIED"}.get(row.status)
        if self.on_event is None or kind is None or word is None or not row.balance:
            return
        prefix, resource_type = kind
        build = partial(self.capture_resource if row.code == "T0006" else self.sale_resource, row)
        self.on_event(f"{prefix}.{word}", resource_type, build)

    def _announce_refund(self, refund: _Txn, sale: _Txn) -> None:
        """``PAYMENT.CAPTURE.REFUNDED`` (a v2 refund) or ``PAYMENT.SALE.REFUNDED`` (a v1 refund)."""
        kind = _PAYMENT_EVENTS.get(sale.code)
        if self.on_event is None or kind is None:
            return
        total = self.refunded.get(sale.txn_id, 0)
        build = partial(self.refund_resource, refund, sale, total)
        self.on_event(f"{kind[0]}.REFUNDED", "refund", build)

    def _announce_subscription(self, sid: str, event_type: str) -> None:
        if self.on_event is not None:
            self.on_event(event_type, "subscription", lambda base: self.subscription(sid, base))

    # --- payment resources (Payments v2 captures and refunds, v1 sales and refunds) ---------------------------

    def capture_resource(self, row: _Txn, base_url: str) -> dict[str, Any]:
        """A Checkout capture as ``GET /v2/payments/captures/{id}`` shows it now."""
        info, currency = row.infos[-1][1], row.currency
        href = f"{base_url}/v2/payments/captures/{row.txn_id}"
        breakdown: dict[str, Any] = {"gross_amount": _money(row.amount, currency)}
        if row.fee:
            breakdown["paypal_fee"] = _money(-row.fee, currency)
        breakdown["net_amount"] = _money(row.amount + row.fee, currency)
        out: dict[str, Any] = {
            "id": row.txn_id,
            "amount": _money(row.amount, currency),
            "final_capture": True,
            "seller_protection": _PROTECTION.get(info.get("protection_eligibility"), _PROTECTION["02"]),
            "seller_receivable_breakdown": breakdown,
            "status": _STATUS_OF_CAPTURE[row.status],
        }
        if info.get("invoice_id"):
            out["invoice_id"] = info["invoice_id"]
        if info.get("custom_field"):
            out["custom_id"] = info["custom_field"]
        order_id = self.checkout.order_of(row.txn_id) or _derived_id("order", row.txn_id)
        out["supplementary_data"] = {"related_ids": {"order_id": order_id}}
        out["payee"] = {"merchant_id": self.id}
        out["create_time"] = stamp(row.time)
        out["update_time"] = stamp(row.infos[-1][0])
        out["links"] = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": f"{href}/refund", "rel": "refund", "method": "POST"},
            {"href": f"{base_url}/v2/checkout/orders/{order_id}", "rel": "up", "method": "GET"},
        ]  # fmt: skip
        return out

    def sale_resource(self, row: _Txn, base_url: str) -> dict[str, Any]:
        """A subscription payment as ``GET /v1/payments/sale/{id}`` shows it now."""
        info, currency = row.infos[-1][1], row.currency
        total = _money_text(row.amount, currency)
        href = f"{base_url}/v1/payments/sale/{row.txn_id}"
        out: dict[str, Any] = {
            "id": row.txn_id,
            "state": _STATE_OF_SALE[row.status],
            "amount": {"total": total, "currency": currency, "details": {"subtotal": total}},
            "payment_mode": "INSTANT_TRANSFER",
            "protection_eligibility": _PROTECTION.get(info.get("protection_eligibility"), _PROTECTION["02"])["status"],
        }
        if row.fee:
            out["transaction_fee"] = {"value": _money_text(-row.fee, currency), "currency": currency}
        if row.subscription:
            out["billing_agreement_id"] = row.subscription
        if info.get("invoice_id"):
            out["invoice_number"] = info["invoice_id"]
        if info.get("custom_field"):
            out["custom"] = info["custom_field"]
        out["create_time"] = stamp(row.time)
        out["update_time"] = stamp(row.infos[-1][0])
        out["links"] = [
            {"href": href, "rel": "self", "method": "GET"},
            {"href": f"{href}/refund", "rel": "refund", "method": "POST"},
        ]
        return out

    def refund_resource(self, refund: _Txn, sale: _Txn, refunded: int, base_url: str) -> dict[str, Any]:
        """The refund of a capture (Payments v2 shape) or of a sale (v1 shape), ``refunded`` in all so far."""
        info, currency = refund.infos[-1][1], refund.currency
        back, fee_back = -refund.amount, refund.fee
        when, updated = stamp(refund.time), stamp(refund.infos[-1][0])
        if sale.code == "T0006":
            breakdown: dict[str, Any] = {"gross_amount": _money(back, currency)}
            if fee_back:
                breakdown["paypal_fee"] = _money(fee_back, currency)
            breakdown["net_amount"] = _money(back - fee_back, currency)
            breakdown["total_refunded_amount"] = _money(refunded, currency)
            out: dict[str, Any] = {"id": refund.txn_id, "amount": _money(back, currency),
                                   "seller_payable_breakdown": breakdown}  # fmt: skip
            if info.get("invoice_id"):
                out["invoice_id"] = info["invoice_id"]
            if info.get("custom_field"):
                out["custom_id"] = info["custom_field"]
            out.update({"status": "COMPLETED", "create_time": when, "update_time": updated})
            out["links"] = [
                {"href": f"{base_url}/v2/payments/refunds/{refund.txn_id}", "rel": "self", "method": "GET"},
                {"href": f"{base_url}/v2/payments/captures/{sale.txn_id}", "rel": "up", "method": "GET"},
            ]
            return out
        payment = _derived_id("PAYID-", sale.txn_id)
        out = {"id": refund.txn_id, "state": "completed",
               "amount": {"total": _money_text(back, currency), "currency": currency}}  # fmt: skip
        if fee_back:
            out["refund_from_transaction_fee"] = {"currency": currency, "value": _money_text(fee_back, currency)}
        out["total_refunded_amount"] = {"currency": currency, "value": _money_text(refunded, currency)}
        out["refund_from_received_amount"] = {"currency": currency, "value": _money_text(back - fee_back, currency)}
        out["sale_id"] = sale.txn_id
        out["parent_payment"] = payment
        if info.get("invoice_id"):
            out["invoice_number"] = info["invoice_id"]
        out.update({"create_time": when, "update_time": updated})
        out["links"] = [
            {"href": f"{base_url}/v1/payments/refund/{refund.txn_id}", "rel": "self", "method": "GET"},
            {"href": f"{base_url}/v1/payments/payment/{payment}", "rel": "parent_payment", "method": "GET"},
            {"href": f"{base_url}/v1/payments/sale/{sale.txn_id}", "rel": "sale", "method": "GET"},
        ]
        return out

    def capture(self, capture_id: str, base_url: str) -> dict[str, Any]:
        """``GET /v2/payments/captures/{id}``: Checkout captures (T0006) only."""
        row = self.by_txn.get(capture_id)
        if row is None or row.code != "T0006":
            raise _payment_not_found("captures")
        return self.capture_resource(row, base_url)

    def sale(self, sale_id: str, base_url: str) -> dict[str, Any]:
        """``GET /v1/payments/sale/{id}``: subscription sales (T0002) only."""
        row = self.by_txn.get(sale_id)
        if row is None or row.code != "T0002":
            raise PayPalError(404, "INVALID_RESOURCE_ID", "Requested resource ID was not found.",
                              link="https://developer.paypal.com/docs/api/payments/#errors")  # fmt: skip
        return self.sale_resource(row, base_url)

    def refund_capture(self, capture_id: str, body: Mapping[str, Any], request_id: str | None, now: int,
                       base_url: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """``POST /v2/payments/captures/{id}/refund``: all that is left, or ``amount``; a replayed
        ``PayPal-Request-Id`` answers the first refund again (200 instead of 201)."""
        if request_id and request_id in self.refund_requests:
            first_capture, first = self.refund_requests[request_id]
            if first_capture == capture_id:
                return 200, first
        row = self.by_txn.get(capture_id)
        if row is None or row.code != "T0006":
            raise _payment_not_found("captures")
        left = row.amount - self.refunded.get(capture_id, 0)
        if row.status not in ("S", "F") or left <= 0:
            raise _unprocessable("CAPTURE_FULLY_REFUNDED", "The capture has already been fully refunded.")
        back = left
        amount = body.get("amount")
        if amount is not None:
            if not isinstance(amount, dict) or amount.get("currency_code") != row.currency:
                raise _unprocessable("REFUND_CURRENCY_MISMATCH", "Refund must be in the currency of the capture.")
            back, _ = money_minor(amount, "/amount")  # the value's syntax and the currency's decimals
            if back > left:
                raise _unprocessable("REFUND_AMOUNT_EXCEEDED", "The refund amount must be at most what is left.")
        refund = self._refund(self._rng, row, now, partial=back < row.amount, back=back)
        self._insert([refund])
        self._announce_refund(refund, row)
        self.invoicing.capture_refunded(row, refund)
        out = self.refund_resource(refund, row, self.refunded[capture_id], base_url)
        if request_id:
            self.refund_requests[request_id] = (capture_id, out)
        return 201, out

    def subscription_action(self, sid: str, action: str, reason: str | None, now: int) -> None:
        """``POST /v1/billing/subscriptions/{id}/suspend|activate|cancel`` (204 on success)."""
        sub = self.subscriptions.get(sid)
        if sub is None:
            raise _not_found("subscriptions")
        allowed, target, event = _SUBSCRIPTION_ACTIONS[action]
        if sub["status"] not in allowed:
            raise _unprocessable(
                "SUBSCRIPTION_STATUS_INVALID",
                f"Invalid subscription status for {action} action; subscription status should be "
                + " or ".join(s.lower() for s in sorted(allowed))
                + ".",
            )
        self._set_status(sid, target, now, note=reason)
        self._refresh_billing(sid)
        self._announce_subscription(sid, event)

    def _update_subscription(self, rng: _Rng, sid: str, now: int) -> _Txn | None:
        sub = self.subscriptions[sid]
        status = sub["status"]
        row = None
        if status == "APPROVAL_PENDING":
            self._set_status(sid, "APPROVED", now)
        elif status in ("APPROVED", "SUSPENDED"):
            self._set_status(sid, "ACTIVE", now)
        else:
            roll = rng.random()
            if roll < 0.6 and self._cycles_left(sid) == 0:
                self._set_status(sid, "EXPIRED", now)
            elif roll < 0.6:
                row = self._subscription_payment(rng, sid, now)
            elif roll < 0.8:
                self._set_status(sid, "SUSPENDED", now, note="Suspended by the merchant")
            else:
                sub["quantity"] = str(int(sub["quantity"]) + 1)
                self._touch_sub(sid, now)
        self._touch_sub(sid, now)
        self._refresh_billing(sid)
        return row

    def bulk(self, day: str, count: int) -> dict[str, Any]:
        """``count`` sales spread over one UTC day (for days above the result cap)."""
        try:
            start = int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
        except ValueError:
            raise ValueError("day must look like YYYY-MM-DD") from None
        rng = _Rng(f"paypal-bulk:{self.client_id}:{self.seed}:{day}:{len(self.rows)}")
        times = sorted(start + int(rng.random() * _DAY) for _ in range(count))
        with self.lock:
            rows = [self._sale(rng, t) for t in times]
            self._insert(rows)
        return {
            "day": day,
            "created": len(rows),
            "first": stamp(times[0]) if times else None,
            "last": stamp(times[-1]) if times else None,
            "counts": self.counts(),
        }

    def add_record(self, entity: str, fields: Mapping[str, Any], at: int, now: int, base_url: str) -> dict[str, Any]:
        """Create one transaction, subscription, plan or invoice at ``at`` with ``fields`` over the generated values."""
        rng = self._rng
        with self.lock:
            if entity == "transaction":
                row = self._add_transaction(rng, dict(fields), at)
                self._announce_payment(row)
                return self.render(row, _SECTIONS, None)
            if entity == "subscription":
                plan_id = fields.get("plan_id")
                if plan_id is None:
                    if not self.plans:
                        raise ValueError("the account has no plan to subscribe to")
                    plan_id = rng.pick(list(self.plans))
                elif plan_id not in self.plans:
                    raise ValueError(f"no plan {plan_id}")
                sid = self._new_subscription(rng, str(plan_id), at, now, status=str(fields.get("status", "ACTIVE")))
                sub = self.subscriptions[sid]
                for key, value in fields.items():
                    if key not in ("id", "links", "status", "plan_id"):
                        sub[key] = value
                self._refresh_billing(sid)
                self._announce_subscription(sid, "BILLING.SUBSCRIPTION.CREATED")
                return self.subscription(sid, base_url)
            if entity == "plan":
                pid = self._new_plan(rng, at, fields)
                announce_plan(self, pid, "BILLING.PLAN.CREATED")
                return self.plan(pid, base_url)
            if entity == "invoice":
                return self.invoicing.add(fields, at, base_url)
        raise ValueError("entity must be transaction, subscription, plan or invoice")

    def _add_transaction(self, rng: _Rng, fields: dict[str, Any], at: int) -> _Txn:
        balance = fields.pop("balance_affecting", True)
        sid = fields.pop("subscription_id", None)
        info_fields = dict(fields.pop("transaction_info", {}) or {})
        sections = {k: fields.pop(k) for k in list(fields) if k in _SECTIONS}
        info_fields.update(fields)
        if sid is not None:
            if sid not in self.subscriptions:
                raise ValueError(f"no subscription {sid}")
            row = self._subscription_payment(rng, sid, at)
            self._refresh_billing(sid)
        else:
            row = self._sale(rng, at, code=info_fields.get("transaction_event_code"))
        info = row.infos[-1][1]
        for key, value in info_fields.items():
            info[key] = value
        if "transaction_amount" in info_fields:
            money = info_fields["transaction_amount"]
            row.currency = money["currency_code"]
            row.amount = _minor(money["value"], row.currency)
            if "fee_amount" not in info_fields:
                row.fee = _fee(row.amount, row.currency) if row.amount > 0 else 0
                if row.fee:
                    info["fee_amount"] = _money(row.fee, row.currency)
                else:
                    info.pop("fee_amount", None)
        if "fee_amount" in info_fields:
            row.fee = _minor(info_fields["fee_amount"]["value"], row.currency)
        row.txn_id = info["transaction_id"]
        row.code = info["transaction_event_code"]
        row.balance = bool(balance)
        for name, value in sections.items():
            row.sections[name] = value
        self._insert([row])
        self._refresh_balances()
        return row

    # --- export -------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Record counts for the control API."""
        return {
            "transactions": len(self.rows),
            "balance_affecting": sum(1 for r in self.rows if r.balance),
            "subscriptions": len(self.subscriptions),
            "plans": len(self.plans),
        }

    def export(self, entity: str, now: int, base_url: str, visible: bool = False) -> dict[str, Any]:
        """Every current record (full API shape); ``visible`` keeps what Transaction Search shows now."""
        with self.lock:
            if entity == "transactions":
                self._refresh_balances()
                refreshed = self.last_refreshed(now)
                rows = [r for r in self.rows if not visible or r.time <= refreshed]
                cutoff = refreshed if visible else None
                return {
                    "records": [self.render(r, _SECTIONS, cutoff) for r in rows],
                    "deleted_ids": [],
                    "last_refreshed_datetime": stamp(refreshed, self.knobs["date_style"]),
                }
            if entity == "subscriptions":
                return {
                    "records": [self.subscription(sid, base_url, "last_failed_payment") for sid in self.subscriptions],
                    "deleted_ids": [],
                }
            if entity == "plans":
                return {"records": [self.plan(pid, base_url) for pid in self.plans], "deleted_ids": []}
            if entity == "invoices":
                return self.invoicing.export(base_url)
            if entity == "orders":
                return self.checkout.export(base_url)
        raise ValueError("entity must be transactions, subscriptions, plans, invoices or orders")
