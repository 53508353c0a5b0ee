"""``StripeAccount``: one emulated account's generated objects, the events feed, list, retrieve and search
reads with filters, cursors and expansions, and the mutations (charges, refunds, customers, invoices and their
lifecycle; invoice items through ``items.InvoiceItems``, PaymentIntents through ``payments.PaymentIntents``,
subscriptions and the price catalogue through ``subscriptions.Subscriptions``)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from nextcrm_sandbox.stripe import billing
from nextcrm_sandbox.stripe.data import (
    _CARD_TEMPLATE,
    _CHARGE_TEMPLATE,
    _CHECKS_CVC_FAIL,
    _CHECKS_PASS,
    _CURRENCY_COUNTRIES,
    _DESCRIPTIONS,
    _FAILURES,
    _FIRST,
    _LAST,
    _OUTCOME_OK,
    _OUTCOME_PENDING,
    _PRICE_CATALOG,
    _SUB_STATUS_CUMULATIVE,
    _add_months,
    _address,
    _card,
    _charge_amount,
    _Customer,
    _Ids,
    _period_containing,
    _pick_currency,
    _Rng,
)
from nextcrm_sandbox.stripe.items import InvoiceItems
from nextcrm_sandbox.stripe.model import (
    _DAY,
    _ENDED_STATUSES,
    _LIST_PARAMS,
    _OBJECT_NAMES,
    _ZERO_DECIMAL,
    CUSTOMERS_CAP,
    DEFAULT_LIMIT,
    EVENT_RETENTION_SECONDS,
    MAX_LIMIT,
    SUBSCRIPTION_STATUSES,
    StripeError,
    _missing,
    _unknown_param,
)
from nextcrm_sandbox.stripe.params import (
    _as_bool,
    _as_int,
    _as_list,
    _as_str,
    _check_params,
    _created_bounds,
    _metadata_update,
)
from nextcrm_sandbox.stripe.payments import PaymentIntents
from nextcrm_sandbox.stripe.search import parse_query
from nextcrm_sandbox.stripe.store import Row, _Collection, _dump, _event_blob, _list_envelope
from nextcrm_sandbox.stripe.subscriptions import Subscriptions, catalogue_rows, subscription_item

_ACCOUNT_NAME = "NextCRM Sandbox"


@dataclass(frozen=True, slots=True)
class _RequestInfo:
    request_id: str | None = None
    idempotency_key: str | None = None
    # The request's ``Stripe-Version`` (None: the account's default, the sandbox's own version).
    api_version: str | None = None


class StripeAccount(InvoiceItems, PaymentIntents, Subscriptions):
    """One emulated Stripe account: generated objects, the events feed, and the mutations on them.

    Same arguments → byte-identical objects (ids included). ``now`` anchors generation: objects are
    created uniformly in ``[now - days*86400, now)`` and events exist for object changes in the last 30
    days before ``now``. The API methods take the sandbox clock's ``now`` so that events created by
    mutations and the events retention window follow the shared clock. ``on_event(type, event bytes)``,
    when set, is told of every event a mutation creates (webhook delivery).
    """

    def __init__(
        self,
        api_key: str,
        seed: int = 0,
        charges: int = 1000,
        subscriptions: int = 100,
        customers: int | None = None,
        days: float = 90,
        now: int | None = None,
        invoices: int | None = None,
    ) -> None:
        if charges < 0 or subscriptions < 0:
            raise ValueError("charges and subscriptions must be >= 0")
        if not days * _DAY >= 1:
            raise ValueError("days must be > 0 (fractions of a day are allowed)")
        self.api_key = api_key
        self.seed = seed
        self.days = days
        self.now = int(time.time()) if now is None else int(now)
        self.livemode = api_key.startswith("sk_live_")
        self.on_event: Callable[[str, bytes], None] | None = None
        n_customers = min(CUSTOMERS_CAP, max(10, charges // 20)) if customers is None else customers
        if n_customers < 1:
            raise ValueError("customers must be >= 1")
        self._rng = _Rng(seed)
        self._ids = _Ids(self._rng)
        self.account_id = "acct_1" + self._ids.tag + hashlib.sha256(api_key.encode()).hexdigest()[:5]
        self._prices = self._make_prices()
        rows_cus, rows_ch, rows_re, rows_sub, rows_evt = self._generate(n_customers, charges, subscriptions)
        n_invoices = min(1000, max(10, charges // 20)) if invoices is None else invoices
        if n_invoices < 0:
            raise ValueError("invoices must be >= 0")
        self._billing = billing.InvoiceSeeder(seed, self.now, self.livemode, self.account_id, _ACCOUNT_NAME)
        rows_inv = self._generate_billing(rows_cus, rows_ch, rows_sub, rows_evt, n_invoices)
        self.customers = _Collection("/v1/customers", rows_cus)
        self.invoiceitems = _Collection("/v1/invoiceitems", self._seeded_items(rows_inv, self.livemode))
        self._inline_prices: dict[str, dict[str, Any]] = {}
        self.invoices = _Collection("/v1/invoices", rows_inv)
        self.charges = _Collection("/v1/charges", rows_ch)
        self.refunds = _Collection("/v1/refunds", rows_re)
        self.subscriptions = _Collection("/v1/subscriptions", rows_sub)
        self.events = _Collection("/v1/events", rows_evt)
        self.payment_intents = _Collection("/v1/payment_intents", [])
        self._payment_methods: dict[str, tuple[dict[str, Any], str | None]] = {}
        self._pi_charges: dict[str, list[str]] = {}
        rows_price, rows_product = catalogue_rows(self._prices)
        self.prices = _Collection("/v1/prices", rows_price)
        self.products = _Collection("/v1/products", rows_product)
        self._collections = {
            "charges": self.charges,
            "subscriptions": self.subscriptions,
            "customers": self.customers,
            "refunds": self.refunds,
            "events": self.events,
            "invoices": self.invoices,
            "invoiceitems": self.invoiceitems,
            "payment_intents": self.payment_intents,
            "prices": self.prices,
            "products": self.products,
        }

    # --- generation -------------------------------------------------------------------------------------

    def _make_prices(self) -> list[dict[str, Any]]:
        ids = self._ids
        prices = []
        created = self.now - int((self.days + 365) * _DAY)
        for cur, amount, interval, nickname in _PRICE_CATALOG:
            prices.append(
                {
                    "id": ids.long("price_1"),
                    "object": "price",
                    "active": True,
                    "billing_scheme": "per_unit",
                    "created": created,
                    "currency": cur,
                    "custom_unit_amount": None,
                    "livemode": self.livemode,
                    "lookup_key": None,
                    "metadata": {},
                    "nickname": nickname,
                    "product": ids.short("prod_"),
                    "recurring": {
                        "interval": interval,
                        "interval_count": 1,
                        "meter": None,
                        "trial_period_days": None,
                        "usage_type": "licensed",
                    },
                    "tax_behavior": "unspecified",
                    "tiers_mode": None,
                    "transform_quantity": None,
                    "type": "recurring",
                    "unit_amount": amount,
                    "unit_amount_decimal": str(amount),
                }
            )
        return prices

    def _generate(
        self, n_customers: int, n_charges: int, n_subscriptions: int
    ) -> tuple[list[Row], list[Row], list[Row], list[Row], list[Row]]:
        rng, ids, now, lm = self._rng, self._ids, self.now, self.livemode
        start = now - int(self.days * _DAY)
        horizon = now - EVENT_RETENTION_SECONDS
        year_now = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
        events: list[Row] = []

        def add_event(created: int, type_: str, obj: bytes, previous: dict[str, Any] | None = None) -> None:
            eid = ids.long("evt_3" if type_.startswith(("charge.", "refund.")) else "evt_1")
            with_request = type_.endswith((".created", ".succeeded", ".failed", ".pending", ".refunded"))
            blob = _event_blob(
                event_id=eid,
                created=created,
                type=type_,
                obj=obj,
                livemode=lm,
                previous=previous,
                request_id=ids.short("req_") if with_request else None,
                idempotency_key=ids.rng.text(16) if with_request else None,
            )
            events.append((created, eid, blob, (type_,)))

        # customers
        cus_created = sorted(start + rng.below(now - start) for _ in range(n_customers))
        customers: list[_Customer] = []
        rows_cus: list[Row] = []
        for created in cus_created:
            first, last = rng.pick(_FIRST), rng.pick(_LAST)
            cur = _pick_currency(rng)
            country = rng.pick(_CURRENCY_COUNTRIES[cur])
            email = f"{first.lower()}.{last.lower()}{rng.below(1000)}@example.com"
            phone = f"+1555{rng.digits(7)}" if rng.random() < 0.4 else None
            c = _Customer(
                id=ids.short("cus_"),
                created=created,
                name=f"{first} {last}",
                email=email,
                phone=phone,
                country=country,
                address=_address(rng, country),
                currency=cur,
                card=_card(ids, country, year_now),
            )
            customers.append(c)
            blob = _dump(self._customer_dict(c, rng))
            rows_cus.append((created, c.id, blob, (c.email, False)))
            if created >= horizon:
                add_event(created, "customer.created", blob)

        # charges and their refunds
        rows_ch: list[Row] = []
        rows_re: list[Row] = []
        for _ in range(n_charges):
            created = start + rng.below(now - start)
            k = bisect_right(cus_created, created)
            cust = customers[rng.below(k)] if k else None
            currency = cust.currency if cust is not None and rng.random() < 0.8 else _pick_currency(rng)
            amount = _charge_amount(rng, currency)
            x = rng.random()
            status = "succeeded" if x < 0.90 else ("failed" if x < 0.97 else "pending")
            ch = self._charge_dict(
                ids.suffix(),
                created,
                amount,
                currency,
                status,
                cust,
                year_now,
                description=_DESCRIPTIONS[rng.below(len(_DESCRIPTIONS))],
            )
            blob = _dump(ch)
            refund_at = None
            if status == "succeeded" and rng.random() < 0.05 and created < now - 1:
                refund_at = min(now - 1, created + 60 + int(rng.random() * min(now - created, 21 * _DAY)))
                if rng.random() < 0.6:
                    ramount = amount
                else:
                    step = 10 if currency in _ZERO_DECIMAL else 1
                    ramount = max(step, (rng.below(amount) // step) * step) if amount > step else amount
                refund = self._refund_dict(ids.long("re_3"), ch, ramount, refund_at, rng)
                refund_blob = _dump(refund)
                before = blob
                ch["amount_refunded"] = ramount
                ch["refunded"] = ramount == amount
                blob = _dump(ch)
                rows_re.append((refund_at, refund["id"], refund_blob, (ch["id"],)))
                if created >= horizon:
                    add_event(created, "charge.succeeded", before)
                if refund_at >= horizon:
                    add_event(refund_at, "charge.refunded", blob, {"amount_refunded": 0, "refunded": False})
                    add_event(refund_at, "refund.created", refund_blob)
            elif created >= horizon:
                add_event(created, f"charge.{status}", blob)
            rows_ch.append((created, ch["id"], blob, self._charge_meta(ch)))

        # subscriptions
        rows_sub: list[Row] = []
        for n in range(n_subscriptions):
            created = start + rng.below(now - start)
            if n < len(SUBSCRIPTION_STATUSES):
                status = SUBSCRIPTION_STATUSES[n]
            else:
                x = rng.random()
                status = next(s for s, c in _SUB_STATUS_CUMULATIVE if x < c)
            k = bisect_right(cus_created, created)
            cust = customers[rng.below(k)] if k else customers[0]
            sub, initial = self._subscription_dict(created, status, cust, rng)
            blob = _dump(sub)
            rows_sub.append((created, sub["id"], blob, self._subscription_meta(sub)))
            if created >= horizon:
                add_event(created, "customer.subscription.created", _dump(initial) if initial else blob)
            if status == "canceled" and sub["canceled_at"] >= horizon:
                add_event(sub["canceled_at"], "customer.subscription.deleted", blob)
        return rows_cus, rows_ch, rows_re, rows_sub, events

    def _generate_billing(
        self, rows_cus: list[Row], rows_ch: list[Row], rows_sub: list[Row], events: list[Row], n_invoices: int
    ) -> list[Row]:
        """Invoices (each subscription's latest, then ``n_invoices`` one-off ones), a few customers updated
        and a few deleted, from the billing seed; their events (inside retention) join ``events``.

        ``rows_cus`` is updated in place. A deleted customer had no subscription and nothing after its deletion.
        """
        seeder = self._billing
        rng, ids, now, lm = seeder.rng, seeder.ids, self.now, self.livemode
        horizon = now - EVENT_RETENTION_SECONDS

        def add_event(created: int, type_: str, obj: bytes, previous: dict[str, Any] | None = None) -> None:
            if created < horizon:
                return
            eid = ids.long("evt_1")
            blob = _event_blob(event_id=eid, created=created, type=type_, obj=obj, livemode=lm, previous=previous,
                               request_id=None, idempotency_key=None)  # fmt: skip
            events.append((created, eid, blob, (type_,)))

        customers = {r[1]: orjson.loads(r[2]) for r in rows_cus}
        by_created = sorted(customers.values(), key=lambda c: (c["created"], c["id"]))
        created_at = [c["created"] for c in by_created]
        rows_inv: list[Row] = []
        last_use: dict[str, int] = {}
        for created, _, _, meta in rows_ch:
            cid = meta[5]
            if cid is not None and last_use.get(cid, 0) < created:
                last_use[cid] = created

        def keep(seeded: billing.SeededInvoice) -> None:
            inv = seeded.invoice
            for at, type_, snapshot, previous in seeded.history:
                add_event(at, type_, snapshot, previous)
            last = max(at for at, *_ in seeded.history)
            last_use[inv["customer"]] = max(last_use.get(inv["customer"], 0), last)
            rows_inv.append((inv["created"], inv["id"], _dump(inv), self._invoice_meta(inv, seeded.deleted)))

        subscribed = set()
        for r in rows_sub:
            sub = orjson.loads(r[2])
            subscribed.add(sub["customer"])
            keep(seeder.subscription_invoice(sub, customers[sub["customer"]]))
        start = now - int(self.days * _DAY)
        for _ in range(n_invoices if by_created else 0):
            created = start + rng.below(max(1, now - start))
            k = bisect_right(created_at, created)
            customer = by_created[rng.below(k)] if k else by_created[0]
            keep(seeder.one_off_invoice(customer, max(created, customer["created"])))

        for n, (created, cid, blob, meta) in enumerate(rows_cus):
            x = rng.random()
            if x < 0.05 and created < now - 2:
                # The customer's details change once: a new phone number.
                at = created + 1 + rng.below(now - created - 1)
                c = customers[cid]
                previous = {"phone": c["phone"]}
                c["phone"] = f"+1555{rng.digits(7)}"
                blob = _dump(c)
                add_event(at, "customer.updated", blob, previous)
                rows_cus[n] = (created, cid, blob, meta)
            elif x < 0.08 and cid not in subscribed:
                after = max(created, last_use.get(cid, created)) + 1
                if after < now - 1:
                    add_event(after + rng.below(now - 1 - after), "customer.deleted", blob)
                    rows_cus[n] = (created, cid, blob, (meta[0], True))
        return rows_inv

    def _customer_dict(self, c: _Customer, rng: _Rng) -> dict[str, Any]:
        return {
            "id": c.id,
            "object": "customer",
            "address": c.address,
            "balance": 0,
            "created": c.created,
            "currency": c.currency,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": c.email,
            "invoice_prefix": f"{rng.getrandbits(32):08X}",
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": c.card.payment_method,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": self.livemode,
            "metadata": {},
            "name": c.name,
            "next_invoice_sequence": rng.between(1, 24),
            "phone": c.phone,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }

    def _charge_dict(
        self,
        suffix: str,
        created: int,
        amount: int,
        currency: str,
        status: str,
        cust: _Customer | None,
        year_now: int,
        *,
        description: str | None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        ids = self._ids
        rng = ids.rng
        if cust is not None:
            card = cust.card
            name, email, address = cust.name, cust.email, cust.address
        else:
            country = rng.pick(_CURRENCY_COUNTRIES.get(currency, ("US",)))
            card = _card(ids, country, year_now)
            name = f"{rng.pick(_FIRST)} {rng.pick(_LAST)}"
            email = None
            address = _address(rng, country)
        ok = status == "succeeded"
        failure = _FAILURES[rng.below(len(_FAILURES))] if status == "failed" else None
        if failure is None:
            outcome = _OUTCOME_OK if ok else _OUTCOME_PENDING
        else:
            outcome = {
                "advice_code": None,
                "network_advice_code": None,
                "network_decline_code": failure[2] if failure[3] == "issuer_declined" else None,
                "network_status": failure[4],
                "reason": failure[2],
                "seller_message": failure[5],
                "type": failure[3],
            }
        cid = f"ch_3{suffix}"
        card_details = {
            **_CARD_TEMPLATE,
            "amount_authorized": amount if ok else None,
            "authorization_code": rng.digits(6) if ok else None,
            "brand": card.brand,
            "checks": _CHECKS_CVC_FAIL if failure and failure[0] == "incorrect_cvc" else _CHECKS_PASS,
            "country": card.country,
            "exp_month": card.exp_month,
            "exp_year": card.exp_year,
            "fingerprint": card.fingerprint,
            "funding": card.funding,
            "last4": card.last4,
            "network": card.brand,
            "network_transaction_id": rng.digits(15) if ok else None,
            "overcapture": {"maximum_amount_capturable": amount, "status": "unavailable"},
        }
        return {
            **_CHARGE_TEMPLATE,
            "id": cid,
            "amount": amount,
            "amount_captured": amount if ok else 0,
            "balance_transaction": f"txn_3{suffix}" if ok else None,
            "billing_details": {
                "address": address,
                "email": email,
                "name": name,
                "phone": None,
                "tax_id": None,
            },
            "captured": ok,
            "created": created,
            "currency": currency,
            "customer": cust.id if cust is not None else None,
            "description": description,
            "failure_code": failure[0] if failure else None,
            "failure_message": failure[1] if failure else None,
            "livemode": self.livemode,
            "metadata": metadata if metadata is not None else {},
            "outcome": outcome,
            "paid": ok,
            "payment_intent": f"pi_3{suffix}",
            "payment_method": card.payment_method,
            "payment_method_details": {"card": card_details, "type": "card"},
            "receipt_email": email,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/CAcaFwoV{rng.text(96)}" if ok else None,
            "status": status,
        }

    def _refund_dict(
        self,
        rid: str,
        ch: dict[str, Any],
        amount: int,
        created: int,
        rng: _Rng,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "refund",
            "amount": amount,
            "balance_transaction": "txn_3" + rid[4:],
            "charge": ch["id"],
            "created": created,
            "currency": ch["currency"],
            "customer": ch["customer"],
            "destination_details": {
                "card": {
                    "reference": rng.digits(12),
                    "reference_status": "available",
                    "reference_type": "acquirer_reference_number",
                    "type": "refund",
                },
                "type": "card",
            },
            "metadata": metadata if metadata is not None else {},
            "payment_intent": ch["payment_intent"],
            "payment_method": ch["payment_method"],
            "reason": reason,
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": "succeeded",
            "transfer_reversal": None,
        }

    def _subscription_dict(
        self, created: int, status: str, cust: _Customer, rng: _Rng
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        ids, now = self._ids, self.now
        sid = ids.long("sub_1")
        candidates = [p for p in self._prices if p["currency"] == cust.currency] or self._prices
        price = candidates[rng.below(len(candidates))] if rng.random() < 0.85 else rng.pick(self._prices)
        interval = price["recurring"]["interval"]
        trial_start = trial_end = canceled_at = ended_at = cancel_at = None
        anchor = created
        reason = None
        if status == "trialing":
            trial_start, trial_end = created, max(created + 14 * _DAY, now + rng.between(1, 14) * _DAY)
            anchor = trial_end
        elif status == "paused":
            trial_start = created
            trial_end = created + min(14 * _DAY, max(1, (now - created) // 2))
            anchor = trial_end
        elif status == "canceled":
            canceled_at = created + 60 + int(rng.random() * max(1, now - created - 61))
            canceled_at = ended_at = max(created, min(now - 1, canceled_at))
            reason = "cancellation_requested" if rng.random() < 0.7 else "payment_failed"
        elif status == "incomplete_expired":
            ended_at = max(created, min(created + 23 * 3600, now - 1))
        cancel_at_period_end = status == "active" and rng.random() < 0.1
        if status == "trialing":
            period = (trial_start, trial_end)
        elif status in ("incomplete", "incomplete_expired"):
            period = (created, _add_months(created, 12 if interval == "year" else 1))
        else:
            period = _period_containing(anchor, ended_at if ended_at is not None else now, interval)
        if cancel_at_period_end:
            cancel_at = period[1]
        quantity = 1 if rng.random() < 0.7 else rng.between(2, 25)
        item = subscription_item(ids.short("si_"), sid, price, quantity, created=created + 1, period=period,
                                 livemode=self.livemode)  # fmt: skip
        active_like = status not in ("incomplete", "incomplete_expired")
        sub = self._subscription_object(sid, {"id": cust.id}, [item], created=created, currency=price["currency"],
                                        latest_invoice=ids.long("in_1"), status=status)  # fmt: skip
        sub.update(
            billing_cycle_anchor=anchor,
            cancel_at=cancel_at,
            cancel_at_period_end=cancel_at_period_end,
            canceled_at=canceled_at,
            cancellation_details={"comment": None, "feedback": None, "reason": reason},
            default_payment_method=cust.card.payment_method if active_like else None,
            ended_at=ended_at,
            trial_end=trial_end,
            trial_start=trial_start,
        )
        initial = None
        if status in ("canceled", "incomplete_expired", "paused"):
            initial_status = "trialing" if trial_start else "active"
            if status == "incomplete_expired":
                initial_status = "incomplete"
            initial = {
                **sub,
                "status": initial_status,
                "canceled_at": None,
                "ended_at": None,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            }
        return sub, initial

    @staticmethod
    def _charge_meta(ch: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            ch["amount"],
            ch["amount_refunded"],
            ch["currency"],
            ch["status"],
            ch["refunded"],
            ch["customer"],
        )

    @staticmethod
    def _invoice_meta(inv: Mapping[str, Any], deleted: bool = False) -> tuple[Any, ...]:
        parent = inv.get("parent") or {}
        subscription = (parent.get("subscription_details") or {}).get("subscription")
        return (inv["status"], inv["customer"], subscription, inv["collection_method"], deleted, inv["due_date"])

    @staticmethod
    def _subscription_meta(sub: Mapping[str, Any]) -> tuple[Any, ...]:
        return (
            sub["status"],
            sub["canceled_at"],
            sub["currency"],
            sub["customer"],
            sub["items"]["data"][0]["price"]["id"] if sub["items"]["data"] else None,
        )

    # --- reads ------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of stored objects per resource (events include those past retention)."""
        return {name: len(coll) for name, coll in self._collections.items()}

    def list_page(self, resource: str, params: Mapping[str, Any], *, now: int) -> bytes:
        """``GET /v1/<resource>`` → the serialised list envelope (newest first)."""
        coll = self._collections.get(resource)
        if coll is None:
            raise StripeError(404, f"Unrecognized request URL (GET: /v1/{resource}).")
        _check_params(params, _LIST_PARAMS[resource])
        limit = DEFAULT_LIMIT
        if params.get("limit", "") != "":
            limit = _as_int(params["limit"], "limit", minimum=1, maximum=MAX_LIMIT)
        after_id = params.get("starting_after") or None
        before_id = params.get("ending_before") or None
        if after_id is not None and before_id is not None:
            raise StripeError(
                400,
                "You may only specify one of these parameters: starting_after, ending_before.",
                param="ending_before",
            )
        low, high = _created_bounds(params.get("created"))
        if resource == "events":
            floor = now - EVENT_RETENTION_SECONDS
            low = floor if low is None else max(low, floor)
        after = self._cursor(resource, after_id, "starting_after", now)
        before = self._cursor(resource, before_id, "ending_before", now)
        expand = self._expansions(resource, params, "data.")
        sel = self._selection(resource, coll, params)
        positions, has_more = coll.page(sel, low, high, limit, after, before)
        if expand:
            chunks = [self._expand(resource, coll.blob(i), expand) for i in positions]
        else:
            chunks = [coll.blob(i) for i in positions]
        return _list_envelope(coll.url, chunks, has_more)

    def _cursor(self, resource: str, oid: Any, param: str, now: int) -> int | None:
        if oid is None:
            return None
        coll = self._collections[resource]
        i = coll.pos.get(oid) if isinstance(oid, str) else None
        if i is None or (resource == "events" and coll.created[i] < now - EVENT_RETENTION_SECONDS):
            raise _missing(_OBJECT_NAMES[resource], str(oid), param=param, status=400)
        return i

    def _selection(self, resource: str, coll: _Collection, params: Mapping[str, Any]) -> list[int] | None:
        sel: list[int] | None = None

        def narrow(new: list[int]) -> None:
            nonlocal sel
            if sel is None:
                sel = new
            else:
                keep = set(new)
                sel = [i for i in sel if i in keep]

        if resource == "charges":
            if params.get("customer"):
                narrow(coll.group(5).get(_as_str(params["customer"], "customer"), []))
            if params.get("payment_intent"):
                pi = _as_str(params["payment_intent"], "payment_intent")
                narrow(sorted(coll.pos[cid] for cid in self.charges_of_intent(pi)))
            if params.get("transfer_group"):
                narrow([])
        elif resource == "subscriptions":
            status = params.get("status") or None
            if status is None:
                narrow(coll.view(("status", "default"), lambda m: m[0] not in _ENDED_STATUSES))
            elif status == "ended":
                narrow(coll.view(("status", "ended"), lambda m: m[0] in _ENDED_STATUSES))
            elif status != "all":
                if status not in SUBSCRIPTION_STATUSES:
                    raise StripeError(
                        400,
                        "Invalid status: must be one of " + ", ".join((*SUBSCRIPTION_STATUSES, "all", "ended")),
                        param="status",
                    )
                narrow(coll.view(("status", status), lambda m, s=status: m[0] == s))
            if params.get("customer"):
                narrow(coll.group(3).get(_as_str(params["customer"], "customer"), []))
            if params.get("price"):
                narrow(coll.group(4).get(_as_str(params["price"], "price"), []))
        elif resource == "customers":
            narrow(coll.view(("live",), lambda m: not m[1]))  # deleted customers leave the list
            if params.get("email"):
                narrow(coll.group(0).get(_as_str(params["email"], "email"), []))
        elif resource == "invoices":
            narrow(coll.view(("live",), lambda m: not m[4]))  # so do deleted drafts
            status = params.get("status") or None
            if status is not None:
                if status not in billing.INVOICE_STATUSES:
                    raise StripeError(400, "Invalid status: must be one of " + ", ".join(billing.INVOICE_STATUSES),
                                      param="status")  # fmt: skip
                narrow(coll.view(("status", status), lambda m, s=status: m[0] == s))
            if params.get("customer"):
                narrow(coll.group(1).get(_as_str(params["customer"], "customer"), []))
            if params.get("subscription"):
                narrow(coll.group(2).get(_as_str(params["subscription"], "subscription"), []))
            if params.get("collection_method"):
                method = _as_str(params["collection_method"], "collection_method")
                if method not in ("charge_automatically", "send_invoice"):
                    raise StripeError(400, "Invalid collection_method: must be one of charge_automatically, "
                                      "send_invoice", param="collection_method")  # fmt: skip
                narrow(coll.view(("collection_method", method), lambda m, c=method: m[3] == c))
            if params.get("due_date") not in (None, ""):
                due_low, due_high = _created_bounds(params["due_date"])
                narrow([i for i, m in enumerate(coll.meta) if m[5] is not None and (due_low is None or m[5] >= due_low)
                        and (due_high is None or m[5] <= due_high)])  # fmt: skip
        elif resource == "invoiceitems":
            narrow(self._item_selection(params))
        elif resource == "payment_intents":
            chosen = self._payment_intent_selection(params)
            if chosen is not None:
                narrow(chosen)
        elif resource in ("prices", "products"):
            chosen = self._catalogue_selection(resource, params)
            if chosen is not None:
                narrow(chosen)
        elif resource == "refunds":
            if params.get("charge"):
                narrow(coll.group(0).get(_as_str(params["charge"], "charge"), []))
            if params.get("payment_intent"):
                pi = _as_str(params["payment_intent"], "payment_intent")
                narrow(sorted(i for cid in self.charges_of_intent(pi) for i in coll.group(0).get(cid, [])))
        elif resource == "events":
            type_ = params.get("type") or None
            types = params.get("types") or None
            if type_ is not None and types is not None:
                raise StripeError(400, "You may only specify one of these parameters: type, types.", param="types")
            if type_ is not None:
                pattern = re.compile("^" + re.escape(_as_str(type_, "type")).replace(r"\*", ".*") + "$")
                narrow(coll.view(("type", type_), lambda m, p=pattern: p.match(m[0]) is not None))
            elif types is not None:
                names = _as_list(types, "types")
                if len(names) > 20:
                    raise StripeError(400, "You may pass at most 20 types.", param="types")
                wanted = frozenset(names)
                narrow(coll.view(("types", wanted), lambda m, w=wanted: m[0] in w))
            if "delivery_success" in params and not _as_bool(params["delivery_success"], "delivery_success"):
                narrow([])
        return sel

    _EXPANDABLE = {
        "charges": frozenset({"customer", "refunds"}),
        "customers": frozenset({"sources", "subscriptions"}),
        "subscriptions": frozenset(
            {"customer", "latest_invoice", "plan.tiers", "items.data.plan.tiers", "items.data.price.tiers"}
        ),
        "invoices": frozenset({"customer"}),
        "invoiceitems": frozenset({"customer", "invoice"}),
        "payment_intents": frozenset({"customer", "latest_charge", "payment_method"}),
        "prices": frozenset({"product"}),
        "refunds": frozenset({"charge", "payment_intent"}),
    }

    @classmethod
    def _expansions(cls, resource: str, params: Mapping[str, Any], prefix: str) -> frozenset[str]:
        """Validated ``expand`` paths (``data.``-prefixed on lists); what each resource can expand is in
        ``_EXPANDABLE``."""
        if not params.get("expand"):
            return frozenset()
        wanted = set()
        allowed = cls._EXPANDABLE.get(resource, frozenset())
        for path in _as_list(params["expand"], "expand"):
            name = path[len(prefix) :] if path.startswith(prefix) else None
            if name not in allowed:
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
            wanted.add(name)
        return frozenset(wanted)

    def _customer_json(self, cid: str) -> dict[str, Any] | None:
        """A customer as the API shows it (the deleted stub for a deleted one), None when unknown."""
        i = self.customers.pos.get(cid)
        if i is None:
            return None
        if self.customers.meta[i][1]:
            return {"id": cid, "object": "customer", "deleted": True}
        return orjson.loads(self.customers.blob(i))

    def _expand(self, resource: str, blob: bytes, fields: frozenset[str]) -> bytes:
        if resource == "charges":
            return self._expand_charge(blob, fields)
        obj = orjson.loads(blob)
        if "customer" in fields and isinstance(obj.get("customer"), str):
            obj["customer"] = self._customer_json(obj["customer"]) or obj["customer"]
        if resource == "customers":
            if "sources" in fields:
                # Cards are PaymentMethods here (``invoice_settings.default_payment_method``): no legacy sources.
                obj["sources"] = {"object": "list", "data": [], "has_more": False, "total_count": 0,
                                  "url": f"/v1/customers/{obj['id']}/sources"}  # fmt: skip
            if "subscriptions" in fields:
                subs = self.subscriptions
                positions = [i for i in sorted(subs.group(3).get(obj["id"], []), reverse=True)
                             if subs.meta[i][0] not in _ENDED_STATUSES]  # fmt: skip
                obj["subscriptions"] = {"object": "list", "data": [orjson.loads(subs.blob(i)) for i in positions],
                                        "has_more": False, "total_count": len(positions),
                                        "url": f"/v1/customers/{obj['id']}/subscriptions"}  # fmt: skip
        if resource == "payment_intents":
            if "latest_charge" in fields and isinstance(obj.get("latest_charge"), str):
                obj["latest_charge"] = orjson.loads(self.charges.blob(self.charges.pos[obj["latest_charge"]]))
            if "payment_method" in fields and obj.get("payment_method") in self._payment_methods:
                obj["payment_method"] = self._payment_methods[obj["payment_method"]][0]
        if resource == "refunds":
            if "charge" in fields and isinstance(obj.get("charge"), str) and obj["charge"] in self.charges.pos:
                obj["charge"] = orjson.loads(self.charges.blob(self.charges.pos[obj["charge"]]))
            pi = obj.get("payment_intent")
            if "payment_intent" in fields and isinstance(pi, str) and pi in self.payment_intents.pos:
                obj["payment_intent"] = orjson.loads(self.payment_intents.blob(self.payment_intents.pos[pi]))
        if resource == "prices" and "product" in fields:
            obj["product"] = orjson.loads(self.products.blob(self.products.pos[obj["product"]]))
        if resource == "invoiceitems" and "invoice" in fields and isinstance(obj.get("invoice"), str):
            obj["invoice"] = orjson.loads(self.invoices.blob(self.invoices.pos[obj["invoice"]]))
        if resource == "subscriptions":
            if "latest_invoice" in fields and isinstance(obj.get("latest_invoice"), str):
                i = self.invoices.pos.get(obj["latest_invoice"])
                if i is not None:
                    obj["latest_invoice"] = orjson.loads(self.invoices.blob(i))
            # Per-unit prices have no tiers: the expanded field is there, and null.
            if "plan.tiers" in fields and isinstance(obj.get("plan"), dict):
                obj["plan"]["tiers"] = None
            for item in obj["items"]["data"]:
                if "items.data.plan.tiers" in fields:
                    item["plan"]["tiers"] = None
                if "items.data.price.tiers" in fields:
                    item["price"]["tiers"] = None
        return orjson.dumps(obj)

    def _expand_charge(self, blob: bytes, fields: frozenset[str]) -> bytes:
        obj = orjson.loads(blob)
        cid = obj.get("customer")
        if "customer" in fields and isinstance(cid, str):
            obj["customer"] = self._customer_json(cid) or cid
        if "refunds" in fields:
            refunds = self.refunds
            positions = sorted(refunds.group(0).get(obj["id"], []), reverse=True)
            obj["refunds"] = {
                "object": "list",
                "data": [orjson.loads(refunds.blob(i)) for i in positions],
                "has_more": False,
                "total_count": len(positions),
                "url": f"/v1/charges/{obj['id']}/refunds",
            }
        return orjson.dumps(obj)

    def retrieve(self, resource: str, oid: str, params: Mapping[str, Any], *, now: int) -> bytes:
        """``GET /v1/<resource>/<id>`` → the object's bytes (404 ``resource_missing`` when unknown)."""
        coll = self._collections.get(resource)
        if coll is None:
            raise StripeError(404, f"Unrecognized request URL (GET: /v1/{resource}/{oid}).")
        _check_params(params, frozenset({"expand"}))
        i = coll.pos.get(oid)
        if i is None or (resource == "events" and coll.created[i] < now - EVENT_RETENTION_SECONDS):
            raise _missing(_OBJECT_NAMES[resource], oid)
        if resource == "invoices" and coll.meta[i][4]:
            raise _missing("invoice", oid)  # a deleted draft is gone
        if resource == "invoiceitems" and coll.meta[i][2]:
            raise _missing("invoiceitem", oid)
        if resource == "customers" and coll.meta[i][1]:
            return orjson.dumps({"id": oid, "object": "customer", "deleted": True})
        expand = self._expansions(resource, params, "")
        return self._expand(resource, coll.blob(i), expand) if expand else coll.blob(i)

    def export(self, resource: str) -> list[dict[str, Any]]:
        """Compact ground truth of every object (any status), newest first, for comparing mirrors."""
        if resource == "charges":
            c = self.charges
            return [
                {
                    "id": c.ids[i],
                    "created": c.created[i],
                    "amount": m[0],
                    "amount_refunded": m[1],
                    "currency": m[2],
                    "status": m[3],
                    "refunded": m[4],
                    "customer": m[5],
                }
                for i in range(len(c) - 1, -1, -1)
                for m in (c.meta[i],)
            ]
        if resource == "subscriptions":
            s = self.subscriptions
            return [
                {
                    "id": s.ids[i],
                    "created": s.created[i],
                    "status": m[0],
                    "canceled_at": m[1],
                    "currency": m[2],
                    "customer": m[3],
                    "metadata": obj["metadata"],
                }
                for i in range(len(s) - 1, -1, -1)
                for m, obj in ((s.meta[i], orjson.loads(s.blob(i))),)
            ]
        if resource == "customers":
            c = self.customers
            return [
                {
                    "id": c.ids[i],
                    "created": c.created[i],
                    "deleted": c.meta[i][1],
                    "currency": obj.get("currency"),
                    "email": obj.get("email"),
                    "metadata": obj.get("metadata") or {},
                }
                for i in range(len(c) - 1, -1, -1)
                for obj in (orjson.loads(c.blob(i)),)
            ]
        if resource == "invoices":
            v = self.invoices
            return [
                {
                    "id": v.ids[i],
                    "created": v.created[i],
                    "status": m[0],
                    "customer": m[1],
                    "subscription": m[2],
                    "deleted": m[4],
                    "currency": obj["currency"],
                    "total": obj["total"],
                    "amount_paid": obj["amount_paid"],
                    "amount_due": obj["amount_due"],
                }
                for i in range(len(v) - 1, -1, -1)
                for m, obj in ((v.meta[i], orjson.loads(v.blob(i))),)
            ]
        if resource == "payment_intents":
            p = self.payment_intents
            return [
                {
                    "id": p.ids[i],
                    "created": p.created[i],
                    "customer": m[0],
                    "status": m[1],
                    "amount": obj["amount"],
                    "currency": obj["currency"],
                    "latest_charge": obj["latest_charge"],
                    "metadata": obj["metadata"],
                }
                for i in range(len(p) - 1, -1, -1)
                for m, obj in ((p.meta[i], orjson.loads(p.blob(i))),)
            ]
        if resource == "refunds":
            r = self.refunds
            return [
                {"id": r.ids[i], "created": r.created[i], "charge": obj["charge"], "amount": obj["amount"],
                 "currency": obj["currency"], "status": obj["status"], "metadata": obj["metadata"]}
                for i in range(len(r) - 1, -1, -1)
                for obj in (orjson.loads(r.blob(i)),)
            ]  # fmt: skip
        if resource == "prices":
            return [orjson.loads(self.prices.blob(i)) for i in range(len(self.prices) - 1, -1, -1)]
        if resource == "invoiceitems":
            t = self.invoiceitems
            return [
                {
                    "id": t.ids[i],
                    "created": t.created[i],
                    "customer": m[0],
                    "invoice": m[1],
                    "deleted": m[2],
                    "amount": obj["amount"],
                    "currency": obj["currency"],
                }
                for i in range(len(t) - 1, -1, -1)
                for m, obj in ((t.meta[i], orjson.loads(t.blob(i))),)
            ]
        raise KeyError(resource)

    # --- mutations --------------------------------------------------------------------------------------

    def _emit(
        self,
        created: int,
        type_: str,
        obj: bytes,
        request: _RequestInfo,
        previous: dict[str, Any] | None = None,
    ) -> str:
        prefix = "evt_3" if type_.startswith(("charge.", "refund.")) else "evt_1"
        eid = self._ids.long(prefix)
        blob = _event_blob(
            event_id=eid,
            created=created,
            type=type_,
            obj=obj,
            livemode=self.livemode,
            previous=previous,
            request_id=request.request_id,
            idempotency_key=request.idempotency_key,
        )
        k = self.events.insert(created, eid, blob, (type_,), arrival=True)
        if self.on_event is not None:
            self.on_event(type_, self.events.blob(k))
        return eid

    _CHARGE_CREATE = frozenset(
        {
            "amount",
            "currency",
            "customer",
            "description",
            "metadata",
            "receipt_email",
            "source",
            "statement_descriptor",
            "statement_descriptor_suffix",
            "capture",
            "expand",
            "transfer_group",
        }
    )

    def create_charge(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``POST /v1/charges``: a succeeded card charge created at ``now``; emits ``charge.succeeded``."""
        _check_params(params, self._CHARGE_CREATE)
        if "amount" not in params:
            raise StripeError(400, "Missing required param: amount.", code="parameter_missing", param="amount")
        if "currency" not in params:
            raise StripeError(400, "Missing required param: currency.", code="parameter_missing", param="currency")
        expand = self._expansions("charges", params, "")
        amount = _as_int(params["amount"], "amount", minimum=1, maximum=99_999_999)
        currency = _as_str(params["currency"], "currency").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise StripeError(400, f"Invalid currency: {currency}.", param="currency")
        cust = None
        year_now = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
        if params.get("customer"):
            cid = _as_str(params["customer"], "customer")
            i = self._live_customer(cid, "customer", 400)
            cust = self._customer_from_blob(orjson.loads(self.customers.blob(i)), year_now)
        metadata = _metadata_update({}, params["metadata"]) if "metadata" in params else {}
        description = _as_str(params["description"], "description") if params.get("description") else None
        ch = self._charge_dict(
            self._ids.suffix(),
            now,
            amount,
            currency,
            "succeeded",
            cust,
            year_now,
            description=description,
            metadata=metadata,
        )
        if params.get("receipt_email"):
            ch["receipt_email"] = _as_str(params["receipt_email"], "receipt_email")
        if params.get("source"):
            self._charge_from_token(ch, _as_str(params["source"], "source"))
        blob = _dump(ch)
        self.charges.insert(now, ch["id"], blob, self._charge_meta(ch))
        self._emit(now, "charge.succeeded", blob, request or _RequestInfo())
        return self._expand_charge(blob, expand) if expand else blob

    # Stripe's test tokens: brand, last four digits and funding of the card each one stands for.
    _TEST_TOKENS = {
        "tok_visa": ("visa", "4242", "credit"),
        "tok_visa_debit": ("visa", "5556", "debit"),
        "tok_mastercard": ("mastercard", "4444", "credit"),
        "tok_amex": ("amex", "8431", "credit"),
        "tok_discover": ("discover", "1117", "credit"),
    }

    def _charge_from_token(self, ch: dict[str, Any], token: str) -> None:
        """A charge paid with a card token: the card's own details, and billing details left empty (a token
        made from a card number alone carries no name, email or address, and Stripe invents none)."""
        if token not in self._TEST_TOKENS:
            raise StripeError(400, f"No such token: '{token}'", code="resource_missing", param="source")
        brand, last4, funding = self._TEST_TOKENS[token]
        ch["billing_details"] = {
            "address": dict.fromkeys(("city", "country", "line1", "line2", "postal_code", "state")),
            "email": None,
            "name": None,
            "phone": None,
            "tax_id": None,
        }
        card = ch["payment_method_details"]["card"]
        checks = {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": None}
        card.update(brand=brand, network=brand, last4=last4, funding=funding, country="US", checks=checks)
        ch["payment_method"] = "card_" + self._ids.rng.text(24)

    def _customer_from_blob(self, c: dict[str, Any], year_now: int) -> _Customer:
        address = c.get("address") or _address(self._rng, "US")
        country = address.get("country") or "US"
        pm = (c.get("invoice_settings") or {}).get("default_payment_method")
        card = _card(self._ids, country, year_now)
        if pm:
            card.payment_method = pm
        return _Customer(
            id=c["id"],
            created=c["created"],
            name=c.get("name") or "",
            email=c.get("email") or "",
            phone=c.get("phone"),
            country=country,
            address=address,
            currency=c.get("currency") or "usd",
            card=card,
        )

    _REFUND_CREATE = frozenset({"charge", "payment_intent", "amount", "reason", "metadata", "expand"})
    _REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

    def create_refund(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``POST /v1/refunds``: refund (part of) a charge; emits ``charge.refunded``, ``refund.created``."""
        _check_params(params, self._REFUND_CREATE)
        expand = self._expansions("refunds", params, "")
        if params.get("charge"):
            cid = _as_str(params["charge"], "charge")
            param = "charge"
        elif params.get("payment_intent"):
            pi = _as_str(params["payment_intent"], "payment_intent")
            charges = self.charges_of_intent(pi)  # the intent's successful charge is its last one
            cid, param = charges[-1] if charges else pi, "payment_intent"
        else:
            raise StripeError(
                400,
                "One of the following params should be provided for this request: charge or payment_intent.",
                code="parameter_missing",
                param="charge",
            )
        i = self.charges.pos.get(cid)
        if i is None:
            shown = cid if param == "charge" else params["payment_intent"]
            raise _missing("charge" if param == "charge" else "payment_intent", shown, param=param, status=400)
        ch = orjson.loads(self.charges.blob(i))
        if ch["status"] != "succeeded":
            raise StripeError(
                400,
                f"Charge {cid} has a status of {ch['status']} and cannot be refunded.",
                code="charge_not_refundable",
                param=param,
            )
        remaining = ch["amount"] - ch["amount_refunded"]
        if remaining <= 0:
            raise StripeError(
                400, f"Charge {cid} has already been refunded.", code="charge_already_refunded", param=param
            )
        amount = remaining
        if params.get("amount", "") != "":
            amount = _as_int(params["amount"], "amount", minimum=1)
            if amount > remaining:
                raise StripeError(
                    400,
                    f"Refund amount ({amount} {ch['currency']}) is greater than unrefunded amount on charge "
                    f"({remaining} {ch['currency']})",
                    code="amount_too_large",
                    param="amount",
                )
        reason = params.get("reason") or None
        if reason is not None and reason not in self._REFUND_REASONS:
            raise StripeError(400, f"Invalid reason: {reason}", param="reason")
        metadata = _metadata_update({}, params["metadata"]) if "metadata" in params else {}
        refund = self._refund_dict(self._ids.long("re_3"), ch, amount, now, self._rng, reason, metadata)
        refund_blob = _dump(refund)
        previous = {"amount_refunded": ch["amount_refunded"], "refunded": ch["refunded"]}
        ch["amount_refunded"] += amount
        ch["refunded"] = ch["amount_refunded"] == ch["amount"]
        blob = _dump(ch)
        self.charges.replace(i, blob, self._charge_meta(ch))
        self.refunds.insert(now, refund["id"], refund_blob, (cid,))
        req = request or _RequestInfo()
        self._emit(now, "charge.refunded", blob, req, previous)
        self._emit(now, "refund.created", refund_blob, req)
        return self._expand("refunds", refund_blob, expand) if expand else refund_blob

    # --- customers --------------------------------------------------------------------------------------

    _CUSTOMER_FIELDS = ("name", "email", "phone", "description")
    _CUSTOMER_CREATE = frozenset({*_CUSTOMER_FIELDS, "metadata", "address", "balance", "expand"})

    def _customer_changes(self, cus: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the writable fields in ``params`` to ``cus``; returns ``previous_attributes``."""
        previous: dict[str, Any] = {}

        def change(name: str, value: Any) -> None:
            if cus.get(name) != value:
                previous[name] = cus.get(name)
                cus[name] = value

        for name in self._CUSTOMER_FIELDS:
            if name in params:
                change(name, _as_str(params[name], name) or None)
        if "balance" in params:
            change("balance", _as_int(params["balance"], "balance"))
        if "address" in params:
            address = params["address"]
            if address == "":
                change("address", None)
            elif isinstance(address, dict):
                known = ("city", "country", "line1", "line2", "postal_code", "state")
                unknown = set(address) - set(known)
                if unknown:
                    raise _unknown_param(f"address[{sorted(unknown)[0]}]")
                base = cus.get("address") or dict.fromkeys(known)
                change("address", {k: (address[k] or None) if k in address else base.get(k) for k in known})
            else:
                raise StripeError(400, "Invalid object: address must be a hash", param="address")
        if "metadata" in params:
            change("metadata", _metadata_update(cus.get("metadata") or {}, params["metadata"]))
        return previous

    def create_customer(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``POST /v1/customers``: a customer created at ``now``; emits ``customer.created``."""
        _check_params(params, self._CUSTOMER_CREATE)
        ids, rng = self._billing.ids, self._billing.rng
        cus: dict[str, Any] = {
            "id": ids.short("cus_"),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": now,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "discount": None,
            "email": None,
            "invoice_prefix": f"{rng.getrandbits(32):08X}",
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": self.livemode,
            "metadata": {},
            "name": None,
            "next_invoice_sequence": 1,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._customer_changes(cus, params)
        blob = _dump(cus)
        self.customers.insert(now, cus["id"], blob, (cus["email"], False))
        self._emit(now, "customer.created", blob, request or _RequestInfo())
        return blob

    def _live_customer(self, cid: str, param: str = "id", status: int = 404) -> int:
        i = self.customers.pos.get(cid)
        if i is None or self.customers.meta[i][1]:
            raise _missing("customer", cid, param=param, status=status)
        return i

    def update_customer(
        self, cid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``POST /v1/customers/<id>``: emits ``customer.updated`` with ``previous_attributes`` when something
        changed."""
        _check_params(params, self._CUSTOMER_CREATE)
        i = self._live_customer(cid)
        cus = orjson.loads(self.customers.blob(i))
        previous = self._customer_changes(cus, params)
        if not previous:
            return self.customers.blob(i)
        blob = _dump(cus)
        self.customers.replace(i, blob, (cus["email"], False))
        self._emit(now, "customer.updated", blob, request or _RequestInfo(), previous)
        return blob

    def delete_customer(self, cid: str, *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``DELETE /v1/customers/<id>``: its live subscriptions are canceled first (each emits
        ``customer.subscription.deleted``), then ``customer.deleted`` carries its last state."""
        i = self._live_customer(cid)
        req = request or _RequestInfo()
        subs = self.subscriptions
        for k in list(subs.group(3).get(cid, [])):
            if subs.meta[k][0] not in _ENDED_STATUSES:
                self.cancel_subscription(subs.ids[k], {}, now=now, request=req)
        blob = self.customers.blob(i)
        self.customers.replace(i, blob, (self.customers.meta[i][0], True))
        self._emit(now, "customer.deleted", blob, req)
        return orjson.dumps({"id": cid, "object": "customer", "deleted": True})

    # --- invoices ---------------------------------------------------------------------------------------

    _INVOICE_CREATE = frozenset(
        {"customer", "description", "collection_method", "days_until_due", "metadata", "auto_advance", "currency",
         "pending_invoice_items_behavior", "expand"}
    )  # fmt: skip
    _INVOICE_UPDATE = frozenset({"description", "metadata", "auto_advance", "footer", "expand"})

    def _invoice(self, iid: str) -> tuple[int, dict[str, Any]]:
        i = self.invoices.pos.get(iid)
        if i is None or self.invoices.meta[i][4]:
            raise _missing("invoice", iid)
        return i, orjson.loads(self.invoices.blob(i))

    def _store_invoice(self, i: int, inv: dict[str, Any], steps: list[tuple[str, dict[str, Any] | None]], now: int,
                       request: _RequestInfo | None, deleted: bool = False) -> bytes:  # fmt: skip
        blob = _dump(inv)
        self.invoices.replace(i, blob, self._invoice_meta(inv, deleted))
        for step, previous in steps:
            for event_type in billing.STEP_EVENTS.get(step, (step,)):
                self._emit(now, event_type, blob, request or _RequestInfo(), previous)
        return blob

    def create_invoice(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None,
                       lines: list[tuple[str, int, int]] | None = None) -> bytes:  # fmt: skip
        """``POST /v1/invoices``: a draft for ``customer`` created at ``now``, with the customer's pending invoice
        items in its currency when ``pending_invoice_items_behavior=include`` (``exclude``, the default, leaves
        them pending); emits ``invoice.created``. ``lines`` of (description, unit amount, quantity), for the
        control API, are invoice items created for this draft alone."""
        _check_params(params, self._INVOICE_CREATE)
        if not params.get("customer"):
            raise StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        cid = _as_str(params["customer"], "customer")
        customer = orjson.loads(self.customers.blob(self._live_customer(cid, "customer", 400)))
        method = _as_str(params.get("collection_method") or "charge_automatically", "collection_method")
        if method not in ("charge_automatically", "send_invoice"):
            raise StripeError(400, "Invalid collection_method: must be one of charge_automatically, send_invoice",
                              param="collection_method")  # fmt: skip
        days_until_due = None
        if method == "send_invoice":
            if params.get("days_until_due", "") == "":
                raise StripeError(400, "Missing required param: days_until_due.", code="parameter_missing",
                                  param="days_until_due")  # fmt: skip
            days_until_due = _as_int(params["days_until_due"], "days_until_due", minimum=0, maximum=730)
        elif params.get("days_until_due", "") != "":
            raise StripeError(400, "You may only specify days_until_due when collection_method is send_invoice.",
                              param="days_until_due")  # fmt: skip
        currency = _as_str(params.get("currency") or customer.get("currency") or "usd", "currency").lower()
        behavior = params.get("pending_invoice_items_behavior") or "exclude"
        if behavior not in ("exclude", "include"):
            raise StripeError(400, "Invalid pending_invoice_items_behavior: must be one of exclude or include",
                              param="pending_invoice_items_behavior")  # fmt: skip
        req = request or _RequestInfo()
        seeder = self._billing
        taken = self._pending_items(cid, currency) if behavior == "include" else []
        iid = seeder.ids.long("in_1")
        for desc, unit, qty in lines or []:
            item = billing.invoice_item_dict(seeder.ids.long("ii_1"), cid, created=now, amount=unit * qty,
                                             currency=currency, quantity=qty, unit_amount_decimal=str(unit),
                                             livemode=self.livemode, description=desc)  # fmt: skip
            blob = _dump(item)
            self.invoiceitems.insert(now, item["id"], blob, self._item_meta(item))
            self._emit(now, "invoiceitem.created", blob, req)
            taken.append(item)
        items = self._attach_items(iid, taken)
        inv = billing.invoice_dict(
            iid, customer, created=now, currency=currency, lines=items, livemode=self.livemode,
            account_name=_ACCOUNT_NAME, collection_method=method, days_until_due=days_until_due,
            description=_as_str(params["description"], "description") or None if params.get("description") else None,
            metadata=_metadata_update({}, params["metadata"]) if "metadata" in params else {},
        )  # fmt: skip
        if "auto_advance" in params:
            inv["auto_advance"] = _as_bool(params["auto_advance"], "auto_advance")
        blob = _dump(inv)
        self.invoices.insert(now, iid, blob, self._invoice_meta(inv))
        self._emit(now, "invoice.created", blob, req)
        return blob

    def update_invoice(
        self, iid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``POST /v1/invoices/<id>`` (``description``, ``metadata``, ``auto_advance``, ``footer``): emits
        ``invoice.updated`` with ``previous_attributes`` when something changed."""
        _check_params(params, self._INVOICE_UPDATE)
        i, inv = self._invoice(iid)
        if inv["status"] in ("paid", "void") and set(params) - {"metadata", "expand"}:
            raise StripeError(400, f"You can only update the metadata of a {inv['status']} invoice.",
                              code="invoice_not_editable")  # fmt: skip
        previous: dict[str, Any] = {}
        for name in ("description", "footer"):
            if name in params:
                value = _as_str(params[name], name) or None
                if value != inv[name]:
                    previous[name], inv[name] = inv[name], value
        if "auto_advance" in params:
            flag = _as_bool(params["auto_advance"], "auto_advance")
            if flag != inv["auto_advance"]:
                previous["auto_advance"], inv["auto_advance"] = inv["auto_advance"], flag
        if "metadata" in params:
            metadata = _metadata_update(inv["metadata"], params["metadata"])
            if metadata != inv["metadata"]:
                previous["metadata"], inv["metadata"] = inv["metadata"], metadata
        if not previous:
            return self.invoices.blob(i)
        return self._store_invoice(i, inv, [("invoice.updated", previous)], now, request)

    def _finalize(self, inv: dict[str, Any], now: int) -> list[tuple[str, dict[str, Any] | None]]:
        customer = orjson.loads(self.customers.blob(self.customers.pos[inv["customer"]]))
        i = self.customers.pos[inv["customer"]]
        number = f"{customer.get('invoice_prefix') or 'INV'}-{customer.get('next_invoice_sequence') or 1:04d}"
        customer["next_invoice_sequence"] = (customer.get("next_invoice_sequence") or 1) + 1
        self.customers.replace(i, _dump(customer), self.customers.meta[i])  # no event: Stripe sends none for this
        finalized = billing.finalize(inv, now, number, self.account_id)
        steps: list[tuple[str, dict[str, Any] | None]] = [("finalize", finalized)]
        if inv["amount_due"] == 0:
            steps.append(("pay", billing.pay(inv, now)))
        return steps

    def invoice_action(
        self, iid: str, action: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``POST /v1/invoices/<id>/{finalize,pay,void,mark_uncollectible,send}``, with Stripe's state rules.

        ``pay`` with ``payment_method=pm_card_chargeDeclined`` (or ``source=tok_chargeDeclined``) fails the
        attempt: ``invoice.payment_failed`` is emitted and the answer is Stripe's 402 ``card_declined``.
        """
        allowed = {
            "finalize": {"auto_advance", "expand"},
            "pay": {"payment_method", "source", "paid_out_of_band", "off_session", "forgive", "mandate", "expand"},
            "void": {"expand"},
            "mark_uncollectible": {"expand"},
            "send": {"expand"},
        }
        if action not in allowed:
            raise StripeError(404, f"Unrecognized request URL (POST: /v1/invoices/{iid}/{action}). Please see "
                              "https://stripe.com/docs or we can help at https://support.stripe.com/.")  # fmt: skip
        _check_params(params, frozenset(allowed[action]))
        i, inv = self._invoice(iid)
        status = inv["status"]
        steps: list[tuple[str, dict[str, Any] | None]] = []
        if action == "finalize":
            if status != "draft":
                raise StripeError(400, "This invoice is already finalized, you can't re-finalize a non-draft "
                                  "invoice.", code="invoice_not_editable")  # fmt: skip
            steps = self._finalize(inv, now)
        elif action == "pay":
            if status in ("paid", "void"):
                raise StripeError(400, f"Invoice is already {status}", code="invoice_not_editable")
            if status == "draft":
                steps = self._finalize(inv, now)
            if inv["status"] != "paid":
                method = str(params.get("payment_method") or params.get("source") or "")
                if "chargeDeclined" in method:
                    steps.append(("fail", billing.fail(inv, now)))
                    self._store_invoice(i, inv, steps, now, request)
                    raise StripeError(402, "Your card was declined.", type="card_error", code="card_declined",
                                      param=None)  # fmt: skip
                steps.append(("pay", billing.pay(inv, now)))
        elif action == "void":
            if status not in ("open", "uncollectible"):
                raise StripeError(400, f"You can only void open or uncollectible invoices; this one is {status}.",
                                  code="invoice_not_editable")  # fmt: skip
            steps = [("void", billing.void(inv, now))]
        elif action == "mark_uncollectible":
            if status != "open":
                raise StripeError(400, f"You can only mark open invoices uncollectible; this one is {status}.",
                                  code="invoice_not_editable")  # fmt: skip
            steps = [("uncollectible", billing.uncollectible(inv, now))]
        elif action == "send":
            if status != "open" or inv["collection_method"] != "send_invoice":
                raise StripeError(400, "You can only send open invoices whose collection_method is send_invoice.",
                                  code="invoice_not_editable")  # fmt: skip
            steps = [("invoice.sent", None)]
        return self._store_invoice(i, inv, steps, now, request)

    def delete_invoice(self, iid: str, *, now: int, request: _RequestInfo | None = None) -> bytes:
        """``DELETE /v1/invoices/<id>``: drafts only; emits ``invoice.deleted`` with the draft's last state."""
        i, inv = self._invoice(iid)
        if inv["status"] != "draft":
            raise StripeError(400, "You can only delete draft invoices.", code="invoice_not_editable")
        self._drop_items_of(iid)
        self._store_invoice(i, inv, [("delete", None)], now, request, deleted=True)
        return orjson.dumps({"id": iid, "object": "invoice", "deleted": True})

    # --- the account ------------------------------------------------------------------------------------

    def account_json(self) -> bytes:
        """``GET /v1/account``: the account the key belongs to."""
        return orjson.dumps({
            "id": self.account_id,
            "object": "account",
            "business_profile": {"mcc": None, "name": _ACCOUNT_NAME, "product_description": None,
                                 "support_address": None, "support_email": None, "support_phone": None,
                                 "support_url": None, "url": None},
            "business_type": "company",
            "capabilities": {"card_payments": "active", "transfers": "active"},
            "charges_enabled": True,
            "controller": {"type": "account"},
            "country": "US",
            "created": self.now - int((self.days + 365) * _DAY),
            "default_currency": "usd",
            "details_submitted": True,
            "email": None,
            "metadata": {},
            "payouts_enabled": True,
            "settings": {"dashboard": {"display_name": _ACCOUNT_NAME, "timezone": "Etc/UTC"},
                         "payments": {"statement_descriptor": "NEXTCRM"}},
            "type": "standard",
        })  # fmt: skip

    def retrieve_account(self, account_id: str, key_mask: str) -> bytes:
        """``GET /v1/accounts/<id>``: this key's own account; any other id is one the key cannot reach."""
        if account_id != self.account_id:
            raise StripeError(403, f"The provided key '{key_mask}' does not have access to account '{account_id}' "
                              "(or that account does not exist). Application access may have been revoked.",
                              code="account_invalid")  # fmt: skip
        return self.account_json()

    # --- search -----------------------------------------------------------------------------------------

    def search(self, resource: str, params: Mapping[str, Any]) -> bytes:
        """``GET /v1/<resource>/search``: Stripe's search query language (see ``search.py``), newest first,
        ``limit`` 1-100 (default 10), ``page`` the opaque ``next_page`` of the previous answer."""
        _check_params(params, frozenset({"query", "limit", "page", "expand"}))
        if not params.get("query"):
            raise StripeError(400, "Missing required param: query.", code="parameter_missing", param="query")
        query = parse_query(resource, _as_str(params["query"], "query"))
        limit = DEFAULT_LIMIT
        if params.get("limit", "") != "":
            limit = _as_int(params["limit"], "limit", minimum=1, maximum=MAX_LIMIT)
        offset = 0
        if params.get("page"):
            try:
                offset = int(base64.urlsafe_b64decode(_as_str(params["page"], "page").encode()).decode())
            except (ValueError, UnicodeDecodeError):
                raise StripeError(400, "Invalid page: the page token is not one this API returned.",
                                  param="page") from None  # fmt: skip
        coll = self._collections[resource]
        live = (lambda i: not coll.meta[i][1]) if resource == "customers" else (
            (lambda i: not coll.meta[i][4]) if resource == "invoices" else (lambda i: True))  # fmt: skip
        expand = self._expansions(resource, params, "data.")
        found: list[bytes] = []
        seen = 0
        more = False
        for i in range(len(coll) - 1, -1, -1):
            if not live(i):
                continue
            blob = coll.blob(i)
            if not query.matches(orjson.loads(blob)):
                continue
            seen += 1
            if seen <= offset:
                continue
            if len(found) == limit:
                more = True
                break
            found.append(self._expand(resource, blob, expand) if expand else blob)
        next_page = base64.urlsafe_b64encode(str(offset + limit).encode()).decode() if more else None
        return b"".join((
            b'{"object":"search_result","data":[', b",".join(found), b'],"has_more":',
            b"true" if more else b"false", b',"next_page":', orjson.dumps(next_page),
            b',"url":"', f"/v1/{resource}/search".encode(), b'"}',
        ))  # fmt: skip
