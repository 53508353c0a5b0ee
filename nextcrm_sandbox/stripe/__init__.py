"""Local emulator of the Stripe API v1: charges, payment intents, subscriptions, prices and products, customers,
refunds, invoices, invoice items and the events feed.

The demo, the test-suite and the sync benchmark need a Stripe that behaves like the real one (cursor
pagination newest first, ``created`` windows, subscriptions hidden when canceled, a 30-day events feed,
rate limits, idempotency keys, injected faults) without network access and at 200,000-charge scale.

Accounts are generated deterministically from a seed (``StripeAccount``). Every object is kept as
pre-serialised orjson bytes next to small index arrays (``created``, ids, a compact metadata tuple), so a
page of 100 charges is a ``bytes`` join, not 100 serialisations. Objects are parsed back into dicts only
while a request mutates them. ``StripeSandbox`` holds the accounts plus their per-key runtime state
(token bucket, faults, statistics, idempotency records) and exposes Starlette routes for the API
(``/v1/...``) and for the loopback-only control API (``/_sandbox/stripe/...``).

Webhooks: ``POST /_sandbox/stripe/webhooks`` subscribes a receiver URL to an account (``api_key``) with
the endpoint's signing ``secret``; every Event a runtime mutation creates is then delivered as the exact
bytes ``GET /v1/events/{id}`` returns, signed ``Stripe-Signature: t=<now>,v1=<HMAC-SHA256 hex>`` afresh
at each attempt, retried like a Stripe sandbox (3 times over a few hours, or the subscription's
``retry_delays``). An account nobody subscribed to pays one attribute check per event.

Modules: ``model`` (constants, ``StripeError``), ``params`` (form parameters and their checks), ``store``
(sorted arrays of pre-serialised objects, list envelopes, event bytes), ``data`` (deterministic generation),
``billing`` (invoices and their lifecycle), ``items`` (invoice items), ``payments`` (payment intents and test
payment methods), ``subscriptions`` (the price catalogue, subscriptions created, changed and canceled),
``search``, ``account`` (``StripeAccount``), ``webhooks`` (``Stripe-Signature``), ``api`` (``StripeSandbox``:
per-key runtime, API and control routes) and ``control`` (``StripeControl``).
"""

from nextcrm_sandbox.stripe.account import StripeAccount
from nextcrm_sandbox.stripe.api import StripeSandbox
from nextcrm_sandbox.stripe.control import StripeControl
from nextcrm_sandbox.stripe.model import API_VERSION, EVENT_RETENTION_SECONDS, StripeError, mask_api_key
from nextcrm_sandbox.stripe.params import parse_bracket_params
from nextcrm_sandbox.stripe.webhooks import WEBHOOK_RETRY_DELAYS, stripe_signature

__all__ = [
    "API_VERSION",
    "EVENT_RETENTION_SECONDS",
    "WEBHOOK_RETRY_DELAYS",
    "StripeAccount",
    "StripeControl",
    "StripeError",
    "StripeSandbox",
    "mask_api_key",
    "parse_bracket_params",
    "stripe_signature",
]
