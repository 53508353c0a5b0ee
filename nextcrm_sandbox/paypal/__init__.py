"""Local emulator of PayPal's REST APIs: OAuth client credentials, Transaction Search and balances, Subscriptions
and Plans, Payments, Invoicing v2 and signed webhooks.

The demo and the tests point the real PayPal client code at this package instead of PayPal, so it
reproduces what that code relies on: ``POST /v1/oauth2/token`` (HTTP Basic ``client_id:secret``,
``grant_type=client_credentials``; ``scope``, ``access_token``, ``token_type``, ``app_id``, ``expires_in``,
``nonce``; ``invalid_client`` for bad credentials; 401 for unknown or expired tokens), Transaction Search
``GET /v1/reporting/transactions`` (required RFC 3339 ``start_date``/``end_date``, a 31-day window, three
years of history, "Data for the given start date is not available." for starts after the last refresh,
rows visible only three hours after they happen, ``last_refreshed_datetime``, ``page``/``page_size`` up
to 500, ``total_items``/``total_pages``, ``RESULTSET_TOO_LARGE`` above 10,000 rows with ``total_items`` and
``maximum_items``, ``balance_affecting_records_only``, ``fields``, the optional filters, rows sharing a
``transaction_id``, decimal-string money, ``ending_balance`` left out when a filter is set), Subscriptions
(``GET /v1/billing/subscriptions/{id}``, ``/{id}/transactions``, the list endpoint behind a knob) and
Plans (``GET /v1/billing/plans`` with ``page_size`` up to 20, minimal items unless ``Prefer:
return=representation``, ``GET``/``PATCH /v1/billing/plans/{id}``, ``…/activate``, ``…/deactivate``,
``…/update-pricing-schemes``), balances (``GET /v1/reporting/balances`` with ``as_of_time`` and
``currency_code``), Invoicing v2 (``POST /v2/invoicing/search-invoices`` with PayPal's search criteria,
``page_size`` up to 100 and 1,000 pages, summaries as items; ``GET /v2/invoicing/invoices``, ``GET``/``DELETE
…/{id}``, ``POST …/{id}/send|remind|cancel|payments|refunds``), PayPal's error envelope ``{name, message, debug_id,
details[], links[]}`` with a ``Paypal-Debug-Id`` header, and 429 ``RATE_LIMIT_REACHED`` with ``Retry-After``.

Both PayPal hosts (``api-m.paypal.com`` and ``api-m.sandbox.paypal.com``) are served under
``/paypal/api``. An account is one merchant's REST app: its client credentials, its merchant account
number and its data, generated deterministically from a seed. Transaction Search lists rows in ascending
``transaction_initiation_date`` order (rows of the same second in the order PayPal recorded them) and
filters on that date. The control API under ``/_sandbox/paypal`` creates accounts, applies changes on the
sandbox clock, adds single records or a whole busy day, exports data, injects faults and reports
statistics.

Orders v2: ``POST /v2/checkout/orders`` (checked as PayPal checks it: currencies and their decimals, breakdowns,
items), ``GET …/{id}``, the payer's approval on the order's approve link (``/paypal/checkoutnow?token=<id>``, or
``POST /_sandbox/paypal/accounts/{id}/orders/{order}/approve``) and ``POST …/{id}/capture``, which makes a Checkout
capture per purchase unit; ``POST /v1/billing/plans`` makes a plan. Order and plan creation, captures and refunds
answer a repeated ``PayPal-Request-Id`` with their first result (200) for ``request_id_ttl_seconds`` (six hours).

Payments and webhooks: Checkout captures (code T0006) are read and refunded through Payments v2 (``GET
/v2/payments/captures/{id}``, ``POST …/refund`` with ``PayPal-Request-Id`` replay), subscription sales (T0002)
through ``GET /v1/payments/sale/{id}``; subscriptions are suspended, activated and cancelled through ``POST
/v1/billing/subscriptions/{id}/{action}``. Invoices paid through PayPal are Checkout captures carrying the
invoice's number, and refunding such a capture refunds its invoice. Each change made through the API or the
control API is announced to the app's webhooks (``POST /v1/notifications/webhooks`` or ``POST
/_sandbox/paypal/webhooks`` with ``account`` and ``webhook_id``) as PayPal's events (``PAYMENT.CAPTURE.*``,
``PAYMENT.SALE.*``, ``BILLING.SUBSCRIPTION.*``, ``BILLING.PLAN.*``, ``INVOICING.INVOICE.*``,
``CHECKOUT.ORDER.APPROVED``), delivered with
PayPal's retries (25 over three days) and signed as PayPal signs them: SHA256withRSA over
``transmission_id|transmission_time|webhook_id|crc32``, by a certificate for
``messageverificationcerts.sandbox.paypal.com`` served at ``/v1/notifications/certs/<name>`` and issued by the
sandbox's own CA (``GET /_sandbox/paypal/webhook-ca``, the trust root a sandbox connection is configured
with). ``POST /v1/notifications/verify-webhook-signature`` checks a delivery as PayPal does, over the event
serialised again; the events are listed and resent under ``/v1/notifications/webhooks-events``. For tests,
``/_sandbox/paypal/webhook-certs`` mints expired, misnamed or untrusted certificates and
``/_sandbox/paypal/webhook-signatures`` signs any body.

Modules: ``model`` (paths, scopes, ids, times and money), ``errors`` (``PayPalError`` and PayPal's error
bodies), ``data`` (generation tables, payers and transactions), ``params`` (Transaction Search parameters),
``account`` (``PayPalAccount``), ``invoicing`` (``Invoicing``: one app's invoices), ``orders`` (``Checkout``: one
app's orders, and the request-id replays), ``plans`` (new plans and plan changes),
``balances`` (the balances answer), ``webhooks`` (event types, subscriptions, retries, the verify request),
``certs`` (``MessageCerts``: the sandbox's signing certificates), ``knobs`` (account specs and knobs), ``api``
(``PayPalSandbox``: limits, faults, OAuth, API, webhook and control routes) and ``control`` (``PayPalControl``).
"""

from nextcrm_sandbox.paypal.account import PayPalAccount
from nextcrm_sandbox.paypal.api import PayPalSandbox
from nextcrm_sandbox.paypal.certs import AUTH_ALGO, MESSAGE_CERT_CN, MessageCerts, signed_message
from nextcrm_sandbox.paypal.control import PayPalControl
from nextcrm_sandbox.paypal.errors import PayPalError
from nextcrm_sandbox.paypal.knobs import DEFAULT_KNOBS
from nextcrm_sandbox.paypal.model import (
    API_PREFIX,
    CONTROL_PREFIX,
    SCOPE_REPORTING,
    SCOPE_SUBSCRIPTIONS,
    SCOPE_VERIFY_WEBHOOKS,
    TOKEN_PATH,
    parse_time,
    stamp,
)
from nextcrm_sandbox.paypal.webhooks import WEBHOOK_RETRY_DELAYS

__all__ = [
    "API_PREFIX",
    "AUTH_ALGO",
    "CONTROL_PREFIX",
    "DEFAULT_KNOBS",
    "MESSAGE_CERT_CN",
    "SCOPE_REPORTING",
    "SCOPE_SUBSCRIPTIONS",
    "SCOPE_VERIFY_WEBHOOKS",
    "TOKEN_PATH",
    "WEBHOOK_RETRY_DELAYS",
    "MessageCerts",
    "PayPalAccount",
    "PayPalControl",
    "PayPalError",
    "PayPalSandbox",
    "parse_time",
    "signed_message",
    "stamp",
]
