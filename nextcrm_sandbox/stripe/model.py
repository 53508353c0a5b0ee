"""Stripe's vocabulary for the sandbox: API version, limits, resources and their list parameters, ``StripeError``
with Stripe's error envelope, and API keys as Stripe's errors print them."""

from __future__ import annotations

import re
from typing import Any

import orjson

API_VERSION = "2026-10-28.endive"
EVENT_RETENTION_SECONDS = 30 * 86400
IDEMPOTENCY_TTL_SECONDS = 86400
MAX_LIMIT = 100
DEFAULT_LIMIT = 10
CUSTOMERS_CAP = 5000

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DAY = 86400

RESOURCES = (
    "charges",
    "subscriptions",
    "customers",
    "refunds",
    "events",
    "invoices",
    "invoiceitems",
    "payment_intents",
    "prices",
    "products",
)
_OBJECT_NAMES = {
    "charges": "charge",
    "subscriptions": "subscription",
    "customers": "customer",
    "refunds": "refund",
    "events": "event",
    "invoices": "invoice",
    "invoiceitems": "invoiceitem",
    "payment_intents": "payment_intent",
    "prices": "price",
    "products": "product",
}
SUBSCRIPTION_STATUSES = (
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
)
_ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
_COMMON_LIST_PARAMS = frozenset({"limit", "starting_after", "ending_before", "created", "expand"})
_LIST_PARAMS = {
    "charges": _COMMON_LIST_PARAMS | {"customer", "payment_intent", "transfer_group"},
    "subscriptions": _COMMON_LIST_PARAMS | {"customer", "price", "status"},
    "customers": _COMMON_LIST_PARAMS | {"email"},
    "refunds": _COMMON_LIST_PARAMS | {"charge", "payment_intent"},
    "events": _COMMON_LIST_PARAMS | {"type", "types", "delivery_success"},
    "invoices": _COMMON_LIST_PARAMS | {"customer", "subscription", "status", "collection_method", "due_date"},
    "invoiceitems": _COMMON_LIST_PARAMS | {"customer", "invoice", "pending"},
    "payment_intents": _COMMON_LIST_PARAMS | {"customer"},
    "prices": _COMMON_LIST_PARAMS | {"active", "currency", "lookup_keys", "product", "recurring", "type"},
    "products": _COMMON_LIST_PARAMS | {"active", "ids", "shippable", "url"},
}
_ZERO_DECIMAL = frozenset({"jpy", "krw", "vnd", "clp", "pyg", "xaf", "xof", "ugx", "bif", "djf", "gnf"})


class StripeError(Exception):
    """An API error rendered with Stripe's envelope ``{"error": {"type", "code", "message", "param"}}``; ``extra``
    adds what a card error carries besides (``decline_code``, ``charge``, ``payment_intent``, ``payment_method``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.extra = extra or {}

    def body(self) -> bytes:
        """The JSON error envelope."""
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            err["param"] = self.param
        err.update(self.extra)
        return orjson.dumps({"error": err})


def _missing(kind: str, object_id: str, param: str | None = "id", status: int = 404) -> StripeError:
    return StripeError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def _unknown_param(name: str) -> StripeError:
    return StripeError(400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name)


def mask_api_key(key: str) -> str:
    """Redact a key for error messages: ``sk_test_****abcd`` (the last four shown only for long keys)."""
    m = re.match(r"^([a-z]{2,4}_(?:test|live)_)", key)
    prefix = m.group(1) if m else ""
    tail = key[-4:] if len(key) >= len(prefix) + 12 else ""
    return f"{prefix}****{tail}"
