"""Local emulator of QuickBooks Online (Intuit Accounting API v3): OAuth, query, batch, read-one, CDC and writes.

The demo and the tests point the real QuickBooks client code at this package instead of Intuit, so it reproduces
what that code relies on: Intuit's OAuth 2.0 flow (client credentials in HTTP Basic or in the form body, the OpenID
discovery documents intuit-oauth reads, one realm per authorisation, ``realmId`` on the redirect, refresh tokens
that rotate about once a day and keep working for 24 hours after being superseded, ``x_refresh_token_expires_in``),
the SQL-like query endpoint (``SELECT * | COUNT(*) FROM Invoice|Customer|Payment|Account``,
``MetaData.LastUpdatedTime`` windows, ``Active IN (true, false)``, ``ORDERBY``, 1-based ``STARTPOSITION``,
``MAXRESULTS`` capped at 1000, active customers only by default, ``"QueryResponse": {}`` when nothing matches),
read-one by ``Id``, Change Data Capture with its 30-day look-back and 1,000-object cap and ``status: "Deleted"``
stubs for hard-deleted invoices and payments and merged-away customers, ``/batch`` (up to 30 queries), JSON or XML
by ``Accept``, the ``Fault`` error envelope (lower-case ``fault`` for 401/403; also for every route not emulated),
the throttles (500 requests a minute, 10 a second, 10 at once per realm → 429 with fault 3001 and no
``Retry-After``), and the writes (``POST /customer``, ``POST /invoice``, ``POST /invoice?operation=void|delete``
with the current ``SyncToken``, else fault 5010) with Intuit's validation faults and the ``requestid`` replay.

Intuit's hosts are mapped to path prefixes of the sandbox server: ``/quickbooks/appcenter`` (authorize),
``/quickbooks/oauth`` (token, jwks), ``/quickbooks/developer`` (revoke), ``/quickbooks/devsite``
(developer.intuit.com: the discovery documents) and ``/quickbooks/api`` (both the production and the sandbox API
host). Companies (realms) are generated deterministically from a seed; the control API under
``/_sandbox/quickbooks`` creates them, applies edits, voids, hard deletes, merges and deactivations (of invoices,
payments and customers) on the sandbox clock, injects faults and reports statistics.

Webhooks: ``POST /_sandbox/quickbooks/webhooks`` subscribes a receiver URL to an app's realms (``app``, as
Intuit configures one endpoint per app) or to one ``realm``, with the app's ``verifier_token`` and a payload
``format``, ``legacy`` (``eventNotifications``, the default) or ``cloudevents`` (a JSON array). Every
change to the data notifies the subscriptions, the changes of one call in one delivery, ids only, signed
with ``intuit-signature`` and retried on ``WEBHOOK_RETRY_DELAYS`` (see ``sandbox.webhooks`` for
duplicates, holding and reordering).

Modules: ``model`` (paths, token lifetimes, limits, ``QueryError`` and Intuit's faults, time zones), ``query``
(the query language parsed into ``Query``, the fields it may name), ``data`` (``QuickBooksCompany``: generated
realms, their changes, queries and CDC), ``webhooks`` (notification bodies and ``intuit-signature``), ``render``
(XML answers), ``writes`` (creates, voids and deletes from request bodies, with their faults), ``api``
(``QuickBooksSandbox``: throttles, faults, OAuth, API and control routes, the ``requestid`` replay) and ``control``
(``QuickBooksControl``).
"""

from nextcrm_sandbox.quickbooks.api import QuickBooksSandbox
from nextcrm_sandbox.quickbooks.control import QuickBooksControl
from nextcrm_sandbox.quickbooks.data import DataChange, QuickBooksCompany
from nextcrm_sandbox.quickbooks.model import (
    ACCESS_TTL,
    CDC_MAX_DAYS,
    CDC_MAX_OBJECTS,
    MAX_RESULTS_CAP,
    MIN_MINOR_VERSION,
    REFRESH_HARD_TTL,
    REFRESH_TTL,
    QueryError,
)
from nextcrm_sandbox.quickbooks.query import parse_query
from nextcrm_sandbox.quickbooks.render import to_xml
from nextcrm_sandbox.quickbooks.webhooks import CLOUDEVENTS_PER_DELIVERY, WEBHOOK_FORMATS, WEBHOOK_RETRY_DELAYS

__all__ = [
    "ACCESS_TTL",
    "CDC_MAX_DAYS",
    "CDC_MAX_OBJECTS",
    "CLOUDEVENTS_PER_DELIVERY",
    "MAX_RESULTS_CAP",
    "MIN_MINOR_VERSION",
    "REFRESH_HARD_TTL",
    "REFRESH_TTL",
    "WEBHOOK_FORMATS",
    "WEBHOOK_RETRY_DELAYS",
    "DataChange",
    "QueryError",
    "QuickBooksCompany",
    "QuickBooksControl",
    "QuickBooksSandbox",
    "parse_query",
    "to_xml",
]
