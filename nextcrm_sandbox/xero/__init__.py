"""Local emulator of Xero: login/identity OAuth 2.0, ``/connections`` and the Accounting API 2.0 reads.

The demo and the tests point the real Xero client (httpx + authlib) at this package's routes instead of
Xero's three hosts, each mapped to a path prefix on the sandbox server: ``login.xero.com`` →
``/xero/login``, ``identity.xero.com`` → ``/xero/identity``, ``api.xero.com`` → ``/xero/api``.

What it reproduces (the facts are in ``docs/providers/xero.md``): the shared OAuth server with Xero's policy
(30-minute JWT-shaped access tokens, a refresh token only with ``offline_access``, rotated on every
refresh with a 30-minute grace for the previous one, dead after 60 days unused, revocation removing the
user's connections); multi-tenant grants listed by ``GET /connections``; the ``xero-tenant-id`` and
``Accept`` rules (XML unless JSON is asked for); Xero's error bodies (401 ``TokenExpired``, 403
``AuthenticationUnsuccessful``, 400 ``QueryParseException``, and its plain-text 404 for unknown ids and
for every path or method it does not serve); ``GET /Invoices``, ``/Contacts`` and ``/Payments`` with
``page``/``pageSize``, ``If-Modified-Since``, ``where`` (a Dynamic-LINQ subset), ``order``, ``Statuses``,
``IDs``, ``includeArchived``; payments of paid and part-paid invoices (deleted ones kept as ``DELETED``);
``GET /Organisation`` and ``/Currencies``; writes (``PUT``/``POST /Contacts``, ``POST /Contacts/{id}``,
``PUT``/``POST /Invoices``, ``POST /Invoices/{id}``: ``writes.py``) with exact decimals, Xero's validation errors
and its ``Idempotency-Key`` (the first answer replayed for six minutes, another request under the key refused);
scopes per resource and per read or write (broad and granular); client-credentials
tokens carrying the organisation's custom-connection scopes; .NET ``/Date(ms+0000)/`` dates; line items
only when paged; per-tenant and per-app rate limits in fixed real-time windows with Xero's headers; signed
webhooks per app (``XeroWebhooks``: intent-to-receive on subscribe, thin CREATE/UPDATE events whenever an
invoice or contact changes, a payment being an UPDATE of its invoice, retries over about 24 hours).

Organisations are generated deterministically from a seed (``XeroTenant``) and changed through the
control API under ``/_sandbox/xero`` (``XeroControl`` wraps it for tests).
"""

from nextcrm_sandbox.xero.api import (
    ACCOUNTING_PREFIX,
    API_PREFIX,
    CONTROL_PREFIX,
    DEFAULT_SCOPE,
    IDENTITY_PREFIX,
    LOGIN_PREFIX,
    XeroSandbox,
)
from nextcrm_sandbox.xero.control import XeroControl
from nextcrm_sandbox.xero.data import XeroTenant, format_msdate, parse_if_modified_since
from nextcrm_sandbox.xero.query import parse_where, to_xml
from nextcrm_sandbox.xero.webhooks import XERO_RETRY_DELAYS, XeroWebhooks, xero_signature

__all__ = [
    "ACCOUNTING_PREFIX",
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DEFAULT_SCOPE",
    "IDENTITY_PREFIX",
    "LOGIN_PREFIX",
    "XERO_RETRY_DELAYS",
    "XeroControl",
    "XeroSandbox",
    "XeroTenant",
    "XeroWebhooks",
    "format_msdate",
    "parse_if_modified_since",
    "parse_where",
    "to_xml",
    "xero_signature",
]
