"""Stripe PaymentIntents for the sandbox: ``POST /v1/payment_intents`` (``confirm=true`` confirms at once),
``POST /v1/payment_intents/<id>/confirm`` and ``/cancel``, ``GET`` one, the list and the search.

A PaymentIntent is paid with a PaymentMethod: one of Stripe's test methods (``pm_card_visa`` and the other card
brands succeed; ``pm_card_chargeDeclined`` and its variants are declined), a card a customer has saved
(``invoice_settings.default_payment_method``), or a method an earlier request made from a test method. A test
method given to a request becomes a PaymentMethod of its own (``pm_1...``), as at Stripe.

Confirming creates a charge visible in ``/v1/charges`` (the first one ``ch_3`` + the PaymentIntent's own
suffix). A success emits ``charge.succeeded`` and ``payment_intent.succeeded``. A decline emits ``charge.failed``
and ``payment_intent.payment_failed``, leaves the PaymentIntent ``requires_payment_method`` with its
``last_payment_error``, and answers Stripe's 402 ``card_error`` (``decline_code``, ``charge``, the PaymentIntent
and the PaymentMethod in the error). A PaymentIntent that takes the payment methods enabled in the dashboard
(``automatic_payment_methods``, the default) is confirmed only with a ``return_url``, unless it was created with
``automatic_payment_methods[allow_redirects]=never``: redirect-based methods need somewhere to come back to.

The PaymentIntents behind generated charges are not stored: ``GET /v1/payment_intents/<id>`` renders one from its
charge (and a write to it stores it first); the list and the search hold the ones created through the API. Manual
capture is not emulated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from nextcrm_sandbox.stripe.data import _card, _Customer, _Ids, _Rng
from nextcrm_sandbox.stripe.model import _ZERO_DECIMAL, StripeError, _missing
from nextcrm_sandbox.stripe.params import _as_bool, _as_int, _as_list, _as_str, _check_params, _metadata_update
from nextcrm_sandbox.stripe.store import _Collection, _dump

if TYPE_CHECKING:
    from nextcrm_sandbox.stripe.account import _RequestInfo

# Stripe's test PaymentMethods: brand, last four digits, funding, and the decline each stands for (None: paid).
TEST_METHODS: dict[str, tuple[str, str, str, str | None]] = {
    "pm_card_visa": ("visa", "4242", "credit", None),
    "pm_card_visa_debit": ("visa", "5556", "debit", None),
    "pm_card_mastercard": ("mastercard", "4444", "credit", None),
    "pm_card_amex": ("amex", "8431", "credit", None),
    "pm_card_discover": ("discover", "1117", "credit", None),
    "pm_card_chargeDeclined": ("visa", "0002", "credit", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("visa", "9995", "credit", "insufficient_funds"),
    "pm_card_chargeDeclinedExpiredCard": ("visa", "0069", "credit", "expired_card"),
    "pm_card_chargeDeclinedIncorrectCvc": ("visa", "0127", "credit", "incorrect_cvc"),
    "pm_card_chargeDeclinedFraudulent": ("visa", "0019", "credit", "fraudulent"),
}
# decline code -> (the error's code, its message, the charge outcome's seller message)
DECLINES = {
    "generic_decline": ("card_declined", "Your card was declined.",
                        "The bank did not return any further details with this decline."),
    "insufficient_funds": ("card_declined", "Your card has insufficient funds.",
                           "The bank returned the decline code `insufficient_funds`."),
    "expired_card": ("expired_card", "Your card has expired.", "The bank returned the decline code `expired_card`."),
    "incorrect_cvc": ("incorrect_cvc", "Your card's security code is incorrect.",
                      "The bank returned the decline code `incorrect_cvc`."),
    "fraudulent": ("card_declined", "Your card was declined.", "The bank returned the decline code `fraudulent`."),
}  # fmt: skip
# The smallest amount Stripe charges, in minor units (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts).
_MINIMUM = {"usd": 50, "eur": 50, "gbp": 30, "jpy": 50, "cad": 50, "aud": 50, "chf": 50, "nzd": 50, "sek": 300}
_CONFIRMABLE = ("requires_payment_method", "requires_confirmation", "requires_action")
_CANCELABLE = ("requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing")
_CANCEL_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})
_CREATE = frozenset({"amount", "currency", "customer", "description", "metadata", "payment_method",
                     "payment_method_types", "automatic_payment_methods", "confirm", "capture_method",
                     "confirmation_method", "receipt_email", "return_url", "setup_future_usage", "statement_descriptor",
                     "statement_descriptor_suffix", "off_session", "error_on_requires_action", "transfer_group",
                     "expand"})  # fmt: skip
_CONFIRM = frozenset({"payment_method", "return_url", "receipt_email", "off_session", "error_on_requires_action",
                      "capture_method", "setup_future_usage", "expand"})  # fmt: skip
_RETURN_URL_NEEDED = (
    "A `return_url` must be specified because this Payment Intent is configured to automatically accept the payment "
    "methods enabled in the Dashboard, some of which may require a full page redirect to succeed. If you do not want "
    "to accept redirect-based payment methods, set `automatic_payment_methods[enabled]` to `true` and "
    "`automatic_payment_methods[allow_redirects]` to `never` when creating Setup Intents and Payment Intents."
)
_NO_ADDRESS = dict.fromkeys(("city", "country", "line1", "line2", "postal_code", "state"))


def _unexpected_state(verb: str, status: str, allowed: tuple[str, ...]) -> StripeError:
    return StripeError(400, f"You cannot {verb} this PaymentIntent because it has a status of {status}. Only a "
                       f"PaymentIntent with one of the following statuses may be {verb}ed: {', '.join(allowed)}.",
                       code="payment_intent_unexpected_state")  # fmt: skip


def _minimum_text(minimum: int, currency: str) -> str:
    return str(minimum) if currency in _ZERO_DECIMAL else f"{minimum / 100:.2f}"


class PaymentIntents:
    """The PaymentIntents and PaymentMethods of a ``StripeAccount`` (mixed into it: it uses the account's charges,
    customers, ids and events feed)."""

    payment_intents: _Collection
    charges: _Collection
    customers: _Collection
    livemode: bool
    _ids: _Ids
    _rng: _Rng
    # PaymentMethod id -> (its object, the decline it stands for)
    _payment_methods: dict[str, tuple[dict[str, Any], str | None]]
    # PaymentIntent id -> its charges, oldest first (those of generated charges share their suffix instead)
    _pi_charges: dict[str, list[str]]
    _emit: Callable[..., str]
    _live_customer: Callable[..., int]
    _charge_dict: Callable[..., dict[str, Any]]
    _charge_meta: Callable[..., tuple[Any, ...]]
    _customer_from_blob: Callable[..., _Customer]
    _expansions: Callable[..., frozenset[str]]
    _expand: Callable[..., bytes]

    # --- reads ----------------------------------------------------------------------------------------------

    def retrieve_payment_intent(self, pid: str, params: Mapping[str, Any]) -> bytes:
        """``GET /v1/payment_intents/<id>``: a stored one, or the one behind a generated charge."""
        _check_params(params, frozenset({"expand", "client_secret"}))
        expand = self._expansions("payment_intents", params, "")
        i = self.payment_intents.pos.get(pid)
        if i is not None:
            blob = self.payment_intents.blob(i)
        else:
            charge = self._generated_charge(pid)
            if charge is None:
                raise _missing("payment_intent", pid)
            blob = _dump(self._intent_of_charge(charge))
        return self._expand("payment_intents", blob, expand) if expand else blob

    def charges_of_intent(self, pid: str) -> list[str]:
        """The ids of a PaymentIntent's charges (``GET /v1/charges?payment_intent=``), oldest first."""
        if pid in self._pi_charges:
            return list(self._pi_charges[pid])
        return ["ch_" + pid[3:]] if pid.startswith("pi_") and "ch_" + pid[3:] in self.charges.pos else []

    def _payment_intent_selection(self, params: Mapping[str, Any]) -> list[int] | None:
        if not params.get("customer"):
            return None
        return self.payment_intents.group(0).get(_as_str(params["customer"], "customer"), [])

    def _generated_charge(self, pid: str) -> dict[str, Any] | None:
        k = self.charges.pos.get("ch_" + pid[3:]) if pid.startswith("pi_3") else None
        if k is None:
            return None
        charge = orjson.loads(self.charges.blob(k))
        return charge if charge.get("payment_intent") == pid else None

    def _intent_of_charge(self, ch: dict[str, Any]) -> dict[str, Any]:
        """The PaymentIntent a generated charge was made by, in the state the charge left it."""
        pi = self._intent(ch["payment_intent"], created=ch["created"], amount=ch["amount"], currency=ch["currency"],
                          customer=ch["customer"], description=ch["description"], metadata=dict(ch["metadata"]),
                          automatic=None, receipt_email=ch.get("receipt_email"))  # fmt: skip
        pi["latest_charge"] = ch["id"]
        if ch["status"] == "failed":
            details = ch["payment_method_details"]["card"]
            card = {"brand": details["brand"], "last4": details["last4"]}
            pi["last_payment_error"] = {"charge": ch["id"], "code": ch["failure_code"],
                                        "decline_code": ch["outcome"]["reason"], "message": ch["failure_message"],
                                        "payment_method": {"id": ch["payment_method"], "object": "payment_method",
                                                           "card": card, "type": "card"},
                                        "type": "card_error"}  # fmt: skip
        else:
            pi["payment_method"] = ch["payment_method"]
            pi["status"] = "succeeded" if ch["status"] == "succeeded" else "processing"
            pi["amount_received"] = ch["amount"] if ch["status"] == "succeeded" else 0
        return pi

    def _intent(self, pid: str, *, created: int, amount: int, currency: str, customer: str | None,
                description: str | None, metadata: dict[str, str], automatic: dict[str, Any] | None,
                receipt_email: str | None = None, types: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
        """A PaymentIntent awaiting its payment method, as Stripe renders one at the sandbox's API version."""
        secret = hashlib.sha256(f"{self.livemode}:{pid}".encode()).hexdigest()[:25]
        return {
            "id": pid,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_details": {"tip": {}},
            "amount_received": 0,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": automatic,
            "canceled_at": None,
            "cancellation_reason": None,
            "capture_method": "automatic_async",
            "client_secret": f"{pid}_secret_{secret}",
            "confirmation_method": "automatic",
            "created": created,
            "currency": currency,
            "customer": customer,
            "customer_account": None,
            "description": description,
            "excluded_payment_method_types": None,
            "last_payment_error": None,
            "latest_charge": None,
            "livemode": self.livemode,
            "metadata": metadata,
            "next_action": None,
            "on_behalf_of": None,
            "payment_method": None,
            "payment_method_configuration_details": {"id": "pmc_" + secret[:24], "parent": None} if automatic else None,
            "payment_method_options": {"card": {"installments": None, "mandate_options": None, "network": None,
                                                "request_three_d_secure": "automatic"}},
            "payment_method_types": types or ["card"],
            "processing": None,
            "receipt_email": receipt_email,
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "source": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": "requires_payment_method",
            "transfer_data": None,
            "transfer_group": None,
        }  # fmt: skip

    # --- writes ---------------------------------------------------------------------------------------------

    def create_payment_intent(self, params: Mapping[str, Any], *, now: int, request: _RequestInfo) -> bytes:
        """``POST /v1/payment_intents``: emits ``payment_intent.created``; with ``confirm=true`` it is confirmed at
        once (see the module)."""
        _check_params(params, _CREATE)
        expand = self._expansions("payment_intents", params, "")
        for name in ("amount", "currency"):
            if params.get(name, "") == "":
                raise StripeError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)
        currency = _as_str(params["currency"], "currency").lower()
        if len(currency) != 3 or not currency.isalpha():
            raise StripeError(400, f"Invalid currency: {currency}.", param="currency")
        amount = _as_int(params["amount"], "amount", minimum=1, maximum=99_999_999)
        minimum = _MINIMUM.get(currency, 50)
        if amount < minimum:
            raise StripeError(400, f"Amount must be at least {_minimum_text(minimum, currency)} {currency}",
                              code="amount_too_small", param="amount")  # fmt: skip
        customer = None
        if params.get("customer"):
            customer = _as_str(params["customer"], "customer")
            self._live_customer(customer, "customer", 400)
        capture = _as_str(params.get("capture_method") or "automatic_async", "capture_method")
        if capture not in ("automatic", "automatic_async"):
            raise StripeError(400, "The sandbox does not emulate manual capture: capture_method must be automatic or "
                              "automatic_async.", param="capture_method")  # fmt: skip
        automatic, types = self._accepted_methods(params)
        confirm = _as_bool(params["confirm"], "confirm") if params.get("confirm", "") != "" else False
        if params.get("return_url") and not confirm:
            raise StripeError(400, "You can only specify `return_url` when `confirm` is true.", param="return_url")
        pi = self._intent(
            "pi_3" + self._ids.suffix(), created=now, amount=amount, currency=currency, customer=customer,
            description=_as_str(params["description"], "description") or None if params.get("description") else None,
            metadata=_metadata_update({}, params["metadata"]) if "metadata" in params else {}, automatic=automatic,
            receipt_email=_as_str(params["receipt_email"], "receipt_email") if params.get("receipt_email") else None,
            types=types,
        )  # fmt: skip
        pi["capture_method"] = capture
        if params.get("payment_method"):
            pi["payment_method"] = self._resolve_method(_as_str(params["payment_method"], "payment_method"), now)
            pi["status"] = "requires_confirmation"
        confirming = {k: v for k, v in params.items() if k in ("return_url", "off_session")}
        if confirm:
            self._check_confirmable(pi, confirming)  # a request refused as a whole creates nothing
        blob = _dump(pi)
        self.payment_intents.insert(now, pi["id"], blob, self._intent_meta(pi))
        self._emit(now, "payment_intent.created", blob, request)
        if confirm:
            self._confirm(pi, confirming, now, request)
        return self._answer(pi["id"], expand)

    def confirm_payment_intent(self, pid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo) -> bytes:
        """``POST /v1/payment_intents/<id>/confirm`` (see the module)."""
        _check_params(params, _CONFIRM)
        expand = self._expansions("payment_intents", params, "")
        pi = self._stored_intent(pid)
        if params.get("capture_method") not in (None, "", "automatic", "automatic_async"):
            raise StripeError(400, "The sandbox does not emulate manual capture: capture_method must be automatic or "
                              "automatic_async.", param="capture_method")  # fmt: skip
        if params.get("receipt_email"):
            pi["receipt_email"] = _as_str(params["receipt_email"], "receipt_email")
        self._confirm(pi, params, now, request)
        return self._answer(pid, expand)

    def cancel_payment_intent(self, pid: str, params: Mapping[str, Any], *, now: int, request: _RequestInfo) -> bytes:
        """``POST /v1/payment_intents/<id>/cancel``: emits ``payment_intent.canceled``."""
        _check_params(params, frozenset({"cancellation_reason", "expand"}))
        expand = self._expansions("payment_intents", params, "")
        pi = self._stored_intent(pid)
        if pi["status"] not in _CANCELABLE:
            raise _unexpected_state("cancel", pi["status"], _CANCELABLE)
        reason = params.get("cancellation_reason") or None
        if reason is not None and reason not in _CANCEL_REASONS:
            raise StripeError(400, "Invalid cancellation_reason: must be one of " + ", ".join(sorted(_CANCEL_REASONS)),
                              param="cancellation_reason")  # fmt: skip
        pi.update(status="canceled", canceled_at=now, cancellation_reason=reason)
        self._emit(now, "payment_intent.canceled", self._store_intent(pi), request)
        return self._answer(pid, expand)

    def pay_with(self, method: str, *, customer: str, amount: int, currency: str, description: str, now: int,
                 request: _RequestInfo) -> tuple[dict[str, Any], StripeError | None]:  # fmt: skip
        """Charge ``customer``'s PaymentMethod ``method`` off-session (an invoice's payment): a confirmed
        PaymentIntent with its events; returns it and, when the card was declined, the error Stripe answers."""
        pi = self._intent("pi_3" + self._ids.suffix(), created=now, amount=amount, currency=currency,
                          customer=customer, description=description, metadata={}, automatic=None)  # fmt: skip
        pi["payment_method"] = self._resolve_method(method, now)
        pi["status"] = "requires_confirmation"
        blob = _dump(pi)
        self.payment_intents.insert(now, pi["id"], blob, self._intent_meta(pi))
        self._emit(now, "payment_intent.created", blob, request)
        try:
            self._confirm(pi, {"off_session": "true"}, now, request)
        except StripeError as declined:
            return pi, declined
        return pi, None

    def _confirm(self, pi: dict[str, Any], params: Mapping[str, Any], now: int, request: _RequestInfo) -> None:
        """Pay ``pi`` (stored, its events emitted); a decline raises Stripe's 402 after storing what it did."""
        if pi["status"] not in _CONFIRMABLE:
            raise _unexpected_state("confirm", pi["status"], _CONFIRMABLE)
        if params.get("payment_method"):
            pi["payment_method"] = self._resolve_method(_as_str(params["payment_method"], "payment_method"), now)
        self._check_confirmable(pi, params)
        method, decline = self._payment_methods[pi["payment_method"]]
        charge = self._charge_for(pi, method, decline, now)
        self._pi_charges.setdefault(pi["id"], []).append(charge["id"])
        charge_blob = _dump(charge)
        self.charges.insert(now, charge["id"], charge_blob, self._charge_meta(charge))
        pi["latest_charge"] = charge["id"]
        if decline is None:
            pi.update(status="succeeded", amount_received=pi["amount"], last_payment_error=None)
            self._emit(now, "charge.succeeded", charge_blob, request)
            self._emit(now, "payment_intent.succeeded", self._store_intent(pi), request)
            return
        code, message, _ = DECLINES[decline]
        pi["last_payment_error"] = {"charge": charge["id"], "code": code, "decline_code": decline,
                                    "doc_url": f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}",
                                    "message": message, "payment_method": method, "type": "card_error"}  # fmt: skip
        pi.update(status="requires_payment_method", payment_method=None)
        self._emit(now, "charge.failed", charge_blob, request)
        self._emit(now, "payment_intent.payment_failed", self._store_intent(pi), request)
        raise StripeError(402, message, type="card_error", code=code,
                          extra={"charge": charge["id"], "decline_code": decline, "payment_intent": pi,
                                 "payment_method": method})  # fmt: skip

    @staticmethod
    def _check_confirmable(pi: dict[str, Any], params: Mapping[str, Any]) -> None:
        """Stripe's 400s for a confirmation that cannot start: no payment method, or no ``return_url`` where
        redirect-based methods are accepted."""
        if not pi["payment_method"]:
            whose = (f" To confirm the PaymentIntent with {pi['customer']}, specify a payment method attached to this "
                     "customer along with the customer ID." if pi["customer"] else
                     " You can either update the PaymentIntent with a payment method and then confirm it again, or "
                     "confirm it again directly with a payment method.")  # fmt: skip
            raise StripeError(400, "You cannot confirm this PaymentIntent because it's missing a payment method."
                              + whose, code="payment_intent_unexpected_state")  # fmt: skip
        automatic = pi["automatic_payment_methods"] or {}
        if automatic.get("enabled") and automatic.get("allow_redirects") != "never" and not params.get("return_url"):
            raise StripeError(400, _RETURN_URL_NEEDED, param="return_url")

    def _charge_for(self, pi: dict[str, Any], method: dict[str, Any], decline: str | None, now: int) -> dict[str, Any]:
        """The charge a confirmation makes with ``method``: paid, or failed with ``decline``."""
        suffix = pi["id"][4:] if "ch_3" + pi["id"][4:] not in self.charges.pos else self._ids.suffix()
        year_now = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
        cust = None
        if pi["customer"]:
            k = self._live_customer(pi["customer"], "customer", 400)
            cust = self._customer_from_blob(orjson.loads(self.customers.blob(k)), year_now)
        ch = self._charge_dict(suffix, now, pi["amount"], pi["currency"], "failed" if decline else "succeeded", cust,
                               year_now, description=pi["description"], metadata=dict(pi["metadata"]))  # fmt: skip
        card = method["card"]
        details = ch["payment_method_details"]["card"]
        checks = {"address_line1_check": None, "address_postal_code_check": None,
                  "cvc_check": "fail" if decline == "incorrect_cvc" else "pass"}  # fmt: skip
        details.update(brand=card["brand"], network=card["brand"], last4=card["last4"], funding=card["funding"],
                       country=card["country"], exp_month=card["exp_month"], exp_year=card["exp_year"],
                       fingerprint=card["fingerprint"], checks=checks)  # fmt: skip
        ch.update(payment_intent=pi["id"], payment_method=method["id"], billing_details=method["billing_details"],
                  receipt_email=pi["receipt_email"])  # fmt: skip
        if decline is not None:
            code, message, seller = DECLINES[decline]
            ch.update(failure_code=code, failure_message=message,
                      outcome={"advice_code": None, "network_advice_code": None, "network_decline_code": None,
                               "network_status": "declined_by_network", "reason": decline, "seller_message": seller,
                               "type": "issuer_declined"})  # fmt: skip
        return ch

    def _resolve_method(self, given: str, now: int) -> str:
        """The id of the PaymentMethod ``given`` names: a test method becomes a PaymentMethod of its own; a
        customer's saved card is looked up; anything else is Stripe's ``resource_missing``."""
        if given in TEST_METHODS:
            brand, last4, funding, decline = TEST_METHODS[given]
            year = dt.datetime.fromtimestamp(now, tz=dt.UTC).year
            pm_id = self._ids.long("pm_1")
            fingerprint = hashlib.sha256(f"{self.livemode}:{given}".encode()).hexdigest()[:16]
            card = {"brand": brand, "country": "US", "exp_month": 12, "exp_year": year + 3, "fingerprint": fingerprint,
                    "funding": funding, "last4": last4}  # fmt: skip
            self._payment_methods[pm_id] = (self._method_object(pm_id, card, None, now, None), decline)
            return pm_id
        if given in self._payment_methods:
            return given
        saved = self._saved_card(given)
        if saved is None:
            raise StripeError(400, f"No such PaymentMethod: '{given}'", code="resource_missing", param="payment_method")
        customer, card, created, billing = saved
        self._payment_methods[given] = (self._method_object(given, card, customer, created, billing), None)
        return given

    def _saved_card(self, pm_id: str) -> tuple[str, dict[str, Any], int, dict[str, Any]] | None:
        """(customer, card, created, billing details) of a customer's saved card, from the charges it paid."""
        for k in range(len(self.customers) - 1, -1, -1):
            if self.customers.meta[k][1]:
                continue
            cus = orjson.loads(self.customers.blob(k))
            if (cus.get("invoice_settings") or {}).get("default_payment_method") != pm_id:
                continue
            billing = {"address": cus.get("address") or dict(_NO_ADDRESS), "email": cus.get("email"),
                       "name": cus.get("name"), "phone": None, "tax_id": None}  # fmt: skip
            for j in self.charges.group(5).get(cus["id"], []):
                charge = orjson.loads(self.charges.blob(j))
                if charge["payment_method"] == pm_id:
                    d = charge["payment_method_details"]["card"]
                    card = {name: d[name] for name in ("brand", "country", "exp_month", "exp_year", "fingerprint",
                                                       "funding", "last4")}  # fmt: skip
                    return cus["id"], card, cus["created"], billing
            country = (cus.get("address") or {}).get("country") or "US"
            made = _card(self._ids, country, dt.datetime.fromtimestamp(cus["created"], tz=dt.UTC).year)
            card = {"brand": made.brand, "country": made.country, "exp_month": made.exp_month,
                    "exp_year": made.exp_year, "fingerprint": made.fingerprint, "funding": made.funding,
                    "last4": made.last4}  # fmt: skip
            return cus["id"], card, cus["created"], billing
        return None

    def _method_object(self, pm_id: str, card: dict[str, Any], customer: str | None, created: int,
                       billing: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        return {
            "id": pm_id,
            "object": "payment_method",
            "allow_redisplay": "unspecified",
            "billing_details": billing or {"address": dict(_NO_ADDRESS), "email": None, "name": None, "phone": None,
                                           "tax_id": None},
            "card": {**card, "checks": {"address_line1_check": None, "address_postal_code_check": None,
                                        "cvc_check": "unchecked"},
                     "display_brand": card["brand"], "generated_from": None,
                     "networks": {"available": [card["brand"]], "preferred": None}, "regulated_status": "unregulated",
                     "three_d_secure_usage": {"supported": True}, "wallet": None},
            "created": created,
            "customer": customer,
            "customer_account": None,
            "livemode": self.livemode,
            "metadata": {},
            "type": "card",
        }  # fmt: skip

    def _accepted_methods(self, params: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str] | None]:
        """(``automatic_payment_methods``, ``payment_method_types``): the dashboard's methods unless types are given."""
        if "payment_method_types" in params and "automatic_payment_methods" in params:
            raise StripeError(400, "You may only specify one of these parameters: automatic_payment_methods, "
                              "payment_method_types.", param="payment_method_types")  # fmt: skip
        if "payment_method_types" in params:
            types = _as_list(params["payment_method_types"], "payment_method_types")
            for n, name in enumerate(types):
                if name not in ("card", "link"):
                    raise StripeError(400, f"The payment method type \"{name}\" is invalid or is not emulated by the "
                                      "sandbox (card and link are).", param=f"payment_method_types[{n}]")  # fmt: skip
            return None, types
        raw = params.get("automatic_payment_methods")
        if raw is None:
            return {"allow_redirects": "always", "enabled": True}, None
        if not isinstance(raw, dict) or set(raw) - {"enabled", "allow_redirects"} or "enabled" not in raw:
            raise StripeError(400, "Invalid automatic_payment_methods: give enabled (and allow_redirects).",
                              param="automatic_payment_methods")  # fmt: skip
        redirects = raw.get("allow_redirects") or "always"
        if redirects not in ("always", "never"):
            raise StripeError(400, "Invalid allow_redirects: must be one of always or never",
                              param="automatic_payment_methods[allow_redirects]")  # fmt: skip
        if not _as_bool(raw["enabled"], "automatic_payment_methods[enabled]"):
            return None, None
        return {"allow_redirects": redirects, "enabled": True}, None

    def _stored_intent(self, pid: str) -> dict[str, Any]:
        """A PaymentIntent to change: a stored one, or the one behind a generated charge, stored from now on."""
        i = self.payment_intents.pos.get(pid)
        if i is not None:
            return orjson.loads(self.payment_intents.blob(i))
        charge = self._generated_charge(pid)
        if charge is None:
            raise _missing("payment_intent", pid)
        pi = self._intent_of_charge(charge)
        self.payment_intents.insert(pi["created"], pid, _dump(pi), self._intent_meta(pi))
        self._pi_charges[pid] = [charge["id"]]
        return pi

    def _store_intent(self, pi: dict[str, Any]) -> bytes:
        blob = _dump(pi)
        self.payment_intents.replace(self.payment_intents.pos[pi["id"]], blob, self._intent_meta(pi))
        return blob

    def _answer(self, pid: str, expand: frozenset[str]) -> bytes:
        blob = self.payment_intents.blob(self.payment_intents.pos[pid])
        return self._expand("payment_intents", blob, expand) if expand else blob

    @staticmethod
    def _intent_meta(pi: Mapping[str, Any]) -> tuple[Any, ...]:
        return (pi["customer"], pi["status"])
