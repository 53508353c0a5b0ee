"""Stripe's webhooks from the sandbox: retry delays, the subscription fields and the ``Stripe-Signature`` header
(``t=`` then one ``v1=`` HMAC-SHA256 per secret) signed afresh at each attempt."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from functools import partial

from nextcrm_sandbox.webhooks import Signer

# Stripe sandboxes retry a failed webhook "3 times over a few hours" (live mode: up to 3 days).
WEBHOOK_RETRY_DELAYS = (3600.0, 7200.0, 10800.0)
# The shared subscription fields (see ``sandbox.webhooks``) plus the account, its secret(s), the event filter
# and a shift of the signed timestamp (negative: stale signatures, to exercise the receiver's tolerance).
_WEBHOOK_FIELDS = frozenset(
    {"url", "duplicate_rate", "hold", "retry_delays", "api_key", "secret", "enabled_events", "timestamp_offset"}
)


def stripe_signature(body: bytes, at: int, secrets: Sequence[str]) -> str:
    """The ``Stripe-Signature`` of ``body`` signed at ``at``: ``t=`` then one ``v1=`` per secret (two while
    a secret is rolled), each the hex HMAC-SHA256 of ``"{t}.{body}"`` (``docs/providers/stripe.md``, Webhooks)."""
    signed = b"%d." % at + body
    v1 = (hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets)
    return ",".join([f"t={at}", *(f"v1={digest}" for digest in v1)])


def _sign(secrets: tuple[str, ...], offset: int, body: bytes, now: int) -> dict[str, str]:
    return {"Stripe-Signature": stripe_signature(body, now + offset, secrets)}


def _signer(secrets: tuple[str, ...], offset: int) -> Signer:
    # A partial of a module function, not a closure: subscriptions are saved with the sandbox's state.
    return partial(_sign, secrets, offset)
