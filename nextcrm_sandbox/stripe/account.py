"""``StripeAccount``: one emulated account's generated objects, the events feed, list and retrieve reads with
filters, cursors and expansions, and the mutations (charges, refunds, subscription updates and cancels)."""

from __future__ import annotations

import datetime as dt
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

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
from nextcrm_sandbox.stripe.store import Row, _Collection, _dump, _event_blob, _list_envelope


@dataclass(frozen=True, slots=True)
class _RequestInfo:
    request_id: str | None = None
    idempotency_key: str | None = None


class StripeAccount:
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
        self._prices = self._make_prices()
        rows_cus, rows_ch, rows_re, rows_sub, rows_evt = self._generate(n_customers, charges, subscriptions)
        self.customers = _Collection("/v1/customers", rows_cus)
        self.charges = _Collection("/v1/charges", rows_ch)
        self.refunds = _Collection("/v1/refunds", rows_re)
        self.subscriptions = _Collection("/v1/subscriptions", rows_sub)
        self.events = _Collection("/v1/events", rows_evt)
        self._collections = {
            "charges": self.charges,
            "subscriptions": self.subscriptions,
            "customers": self.customers,
            "refunds": self.refunds,
            "events": self.events,
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
            rows_cus.append((created, c.id, blob, (c.email,)))
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
        plan = {
            "id": price["id"],
            "object": "plan",
            "active": True,
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": "per_unit",
            "created": price["created"],
            "currency": price["currency"],
            "interval": interval,
            "interval_count": 1,
            "livemode": self.livemode,
            "metadata": {},
            "meter": None,
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }
        quantity = 1 if rng.random() < 0.7 else rng.between(2, 25)
        item = {
            "id": ids.short("si_"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": created + 1,
            "current_period_end": period[1],
            "current_period_start": period[0],
            "discounts": [],
            "metadata": {},
            "plan": plan,
            "price": price,
            "quantity": quantity,
            "subscription": sid,
            "tax_rates": [],
        }
        active_like = status not in ("incomplete", "incomplete_expired")
        sub = {
            "id": sid,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": anchor,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"type": "classic"},
            "billing_thresholds": None,
            "cancel_at": cancel_at,
            "cancel_at_period_end": cancel_at_period_end,
            "canceled_at": canceled_at,
            "cancellation_details": {"comment": None, "feedback": None, "reason": reason},
            "collection_method": "charge_automatically",
            "created": created,
            "currency": price["currency"],
            "customer": cust.id,
            "customer_account": None,
            "days_until_due": None,
            "default_payment_method": cust.card.payment_method if active_like else None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "ended_at": ended_at,
            "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": {
                "object": "list",
                "data": [item],
                "has_more": False,
                "total_count": 1,
                "url": f"/v1/subscription_items?subscription={sid}",
            },
            "latest_invoice": ids.long("in_1"),
            "livemode": self.livemode,
            "metadata": {},
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "plan": plan,
            "quantity": quantity,
            "schedule": None,
            "start_date": created,
            "status": status,
            "test_clock": None,
            "transfer_data": None,
            "trial_end": trial_end,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": trial_start,
        }
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
            chunks = [self._expand_charge(coll.blob(i), expand) for i in positions]
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
                i = coll.pos.get("ch_" + pi[3:]) if pi.startswith("pi_") else None
                narrow([] if i is None else [i])
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
            if params.get("email"):
                narrow(coll.group(0).get(_as_str(params["email"], "email"), []))
        elif resource == "refunds":
            if params.get("charge"):
                narrow(coll.group(0).get(_as_str(params["charge"], "charge"), []))
            if params.get("payment_intent"):
                pi = _as_str(params["payment_intent"], "payment_intent")
                narrow(coll.group(0).get("ch_" + pi[3:], []) if pi.startswith("pi_") else [])
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

    @staticmethod
    def _expansions(resource: str, params: Mapping[str, Any], prefix: str) -> frozenset[str]:
        """Validated ``expand`` paths; charges can expand ``customer`` and ``refunds``, nothing else can."""
        if not params.get("expand"):
            return frozenset()
        wanted = set()
        for path in _as_list(params["expand"], "expand"):
            name = path[len(prefix) :] if path.startswith(prefix) else None
            if resource != "charges" or name not in ("customer", "refunds"):
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
            wanted.add(name)
        return frozenset(wanted)

    def _expand_charge(self, blob: bytes, fields: frozenset[str]) -> bytes:
        obj = orjson.loads(blob)
        cid = obj.get("customer")
        if "customer" in fields and isinstance(cid, str):
            i = self.customers.pos.get(cid)
            if i is not None:
                obj["customer"] = orjson.loads(self.customers.blob(i))
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
        expand = self._expansions(resource, params, "")
        return self._expand_charge(coll.blob(i), expand) if expand else coll.blob(i)

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
                }
                for i in range(len(s) - 1, -1, -1)
                for m in (s.meta[i],)
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
        k = self.events.insert(created, eid, blob, (type_,))
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
            i = self.customers.pos.get(cid)
            if i is None:
                raise _missing("customer", cid, param="customer", status=400)
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
        blob = _dump(ch)
        self.charges.insert(now, ch["id"], blob, self._charge_meta(ch))
        self._emit(now, "charge.succeeded", blob, request or _RequestInfo())
        return self._expand_charge(blob, expand) if expand else blob

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
        if params.get("expand"):
            raise StripeError(400, "This property cannot be expanded.", param="expand")
        if params.get("charge"):
            cid = _as_str(params["charge"], "charge")
            param = "charge"
        elif params.get("payment_intent"):
            pi = _as_str(params["payment_intent"], "payment_intent")
            cid, param = "ch_" + pi[3:] if pi.startswith("pi_") else pi, "payment_intent"
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
        return refund_blob

    def cancel_subscription(
        self, sid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``DELETE /v1/subscriptions/<id>``: cancel now; emits ``customer.subscription.deleted``.

        Like Stripe, an already ended subscription answers 404 ``No such subscription``.
        """
        _check_params(params, frozenset({"invoice_now", "prorate", "cancellation_details", "expand"}))
        i = self.subscriptions.pos.get(sid)
        if i is None or self.subscriptions.meta[i][0] in _ENDED_STATUSES:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        details = params.get("cancellation_details")
        sub["status"] = "canceled"
        sub["canceled_at"] = sub["ended_at"] = now
        sub["cancel_at_period_end"] = False
        sub["cancellation_details"] = {
            "comment": details.get("comment") if isinstance(details, dict) else None,
            "feedback": details.get("feedback") if isinstance(details, dict) else None,
            "reason": "cancellation_requested",
        }
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.deleted", blob, request or _RequestInfo())
        return blob

    def update_subscription(
        self, sid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo | None = None
    ) -> bytes:
        """``POST /v1/subscriptions/<id>`` (``cancel_at_period_end``, ``metadata``, ``description``).

        Emits ``customer.subscription.updated`` with ``previous_attributes`` when something changed.
        """
        _check_params(params, frozenset({"cancel_at_period_end", "metadata", "description", "expand"}))
        i = self.subscriptions.pos.get(sid)
        if i is None:
            raise _missing("subscription", sid)
        sub = orjson.loads(self.subscriptions.blob(i))
        previous: dict[str, Any] = {}
        if "cancel_at_period_end" in params:
            flag = _as_bool(params["cancel_at_period_end"], "cancel_at_period_end")
            if sub["status"] in _ENDED_STATUSES:
                raise StripeError(
                    400,
                    "A canceled subscription can only update its cancellation_details and metadata.",
                    param="cancel_at_period_end",
                )
            if flag != sub["cancel_at_period_end"]:
                previous["cancel_at_period_end"] = sub["cancel_at_period_end"]
                previous["cancel_at"] = sub["cancel_at"]
                sub["cancel_at_period_end"] = flag
                sub["cancel_at"] = sub["items"]["data"][0]["current_period_end"] if flag else None
        if "metadata" in params:
            new_md = _metadata_update(sub["metadata"], params["metadata"])
            if new_md != sub["metadata"]:
                previous["metadata"] = sub["metadata"]
                sub["metadata"] = new_md
        if "description" in params:
            desc = _as_str(params["description"], "description") or None
            if desc != sub["description"]:
                previous["description"] = sub["description"]
                sub["description"] = desc
        if not previous:
            return self.subscriptions.blob(i)
        blob = _dump(sub)
        self.subscriptions.replace(i, blob, self._subscription_meta(sub))
        self._emit(now, "customer.subscription.updated", blob, request or _RequestInfo(), previous)
        return blob
