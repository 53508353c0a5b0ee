"""PayPal's webhooks from the sandbox: the retry schedule, the events payments, subscriptions, plans and invoices
send, one app's webhooks and their subscription fields, and the verify-webhook-signature request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nextcrm_sandbox.paypal import invoicing, plans
from nextcrm_sandbox.paypal.errors import PayPalError


def _retry_delays() -> tuple[float, ...]:
    """PayPal retries a failed delivery up to 25 times over 3 days; it publishes no spacing, so: doubling
    from a minute for nine retries, then equal gaps to fill the three days."""
    first = [60.0 * 2**i for i in range(9)]
    rest = (3 * 86_400 - sum(first)) / 16
    return (*first, *([rest] * 16))


WEBHOOK_RETRY_DELAYS = _retry_delays()
EVENTS_KEPT = 10_000  # per app, for GET /v1/notifications/webhooks-events and resend
# Webhooks announce Checkout captures (Transaction Search code T0006, "PayPal Checkout APIs") and subscription
# sales (T0002); the other codes are classic products that notify by IPN, not REST webhooks.
_PAYMENT_EVENTS = {"T0006": ("PAYMENT.CAPTURE", "capture"), "T0002": ("PAYMENT.SALE", "sale")}
_SUBSCRIPTION_EVENTS = {
    "ACTIVE": "BILLING.SUBSCRIPTION.ACTIVATED",
    "SUSPENDED": "BILLING.SUBSCRIPTION.SUSPENDED",
    "CANCELLED": "BILLING.SUBSCRIPTION.CANCELLED",
    "EXPIRED": "BILLING.SUBSCRIPTION.EXPIRED",
}
# action -> (statuses it applies to, the status it sets, the event it sends)
_SUBSCRIPTION_ACTIONS = {
    "suspend": (frozenset({"ACTIVE"}), "SUSPENDED", "BILLING.SUBSCRIPTION.SUSPENDED"),
    "activate": (frozenset({"SUSPENDED", "APPROVED"}), "ACTIVE", "BILLING.SUBSCRIPTION.ACTIVATED"),
    "cancel": (frozenset({"ACTIVE", "SUSPENDED", "APPROVED"}), "CANCELLED", "BILLING.SUBSCRIPTION.CANCELLED"),
}
# The shared subscription fields (see ``sandbox.webhooks``) plus the account, its webhook id, the event filter
# and a minted certificate to sign with.
_WEBHOOK_FIELDS = frozenset(
    {"url", "duplicate_rate", "hold", "retry_delays", "account", "webhook_id", "event_types", "cert"}
)
_VERIFY_FIELDS = ("auth_algo", "cert_url", "transmission_id", "transmission_sig", "transmission_time", "webhook_id",
                  "webhook_event")  # fmt: skip
_EVENT_SUMMARIES = {
    "PAYMENT.CAPTURE.COMPLETED": "Payment completed",
    "PAYMENT.CAPTURE.PENDING": "Payment pending",
    "PAYMENT.CAPTURE.DENIED": "Payment denied",
    "PAYMENT.CAPTURE.REFUNDED": "A payment capture was refunded",
    "PAYMENT.SALE.COMPLETED": "Payment completed",
    "PAYMENT.SALE.PENDING": "Payment pending",
    "PAYMENT.SALE.DENIED": "Payment denied",
    "PAYMENT.SALE.REFUNDED": "A sale was refunded",
    "BILLING.SUBSCRIPTION.CREATED": "Subscription created",
    "BILLING.SUBSCRIPTION.ACTIVATED": "Subscription activated",
    "BILLING.SUBSCRIPTION.UPDATED": "Subscription updated",
    "BILLING.SUBSCRIPTION.SUSPENDED": "Subscription suspended",
    "BILLING.SUBSCRIPTION.CANCELLED": "Subscription cancelled",
    "BILLING.SUBSCRIPTION.EXPIRED": "Subscription expired",
    "CHECKOUT.ORDER.APPROVED": "An order has been approved by buyer",
    **plans.EVENT_SUMMARIES,
    **invoicing.EVENT_SUMMARIES,
}


@dataclass(frozen=True)
class _Hook:
    """One webhook of an app: where its events go, which types it takes (None: all) and the cert it signs with."""

    webhook_id: str
    account: str
    url: str
    event_types: frozenset[str] | None
    cert: str | None = None

    @property
    def key(self) -> str:
        return f"{self.account}/{self.webhook_id}"

    def wants(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


def _verify_request(body: dict[str, Any]) -> dict[str, Any]:
    """A verify-webhook-signature body with every field (strings, and the event as an object); 400 otherwise."""
    problems = [(name, "MISSING_REQUIRED_PARAMETER") for name in _VERIFY_FIELDS if name not in body]
    problems += [
        (name, "INVALID_PARAMETER_VALUE")
        for name in _VERIFY_FIELDS
        if name in body and not isinstance(body[name], dict if name == "webhook_event" else str)
    ]
    if problems:
        details = [{"field": f"/{name}", "location": "body", "issue": issue} for name, issue in problems]
        raise PayPalError(400, "VALIDATION_ERROR", "Invalid request - see details.", details)
    return body
