"""Local emulator of the MYOB Business (AccountRight Live) API v2: company files, sale invoices, customer cards and
customer payments.

The MYOB sync needs an API that behaves like ``api.myob.com/accountright`` and ``secure.myob.com``:
OAuth 2.0 with the API key as ``client_id`` (credentials in the form body, ``expires_in`` as a string,
a ``user`` object), two generations of API keys (before 12 Mar 2025: ``CompanyFile`` scope and a
company-file list; after: granular ``sme-*`` scopes, the file's ``businessId`` only on the consent
redirect), the ``x-myobapi-key`` / ``x-myobapi-version`` / ``x-myobapi-cftoken`` headers, OData v3
paging (``$top`` default 400, max 1000, ``$skip``, ``$orderby``, ``$filter``) in ``{Items,
NextPageLink, Count}`` envelopes, zone-less ``LastModified`` stamps with fractional seconds, ETags,
hard deletes without tombstones, and per-API-key limits (8 calls/s, a daily cap) answered with
``403 RateLimitError``.

Host layout: ``secure.myob.com`` is served under ``/myob/secure`` and ``api.myob.com`` under
``/myob/api``; URIs in answers (``Uri``, ``URI``, ``NextPageLink``) are built from the request's own
origin so they point back at the sandbox. Control routes live under ``/_sandbox/myob``.

Knobs, where MYOB does not document the behaviour or a test needs it shorter. Per API key (control
``clients`` body or a tenant spec): ``key_mode`` ``new``/``legacy``, ``requests_per_second`` 8,
``second_window_seconds`` 1, ``daily_limit`` 1,000,000, ``day_window_seconds`` 86400,
``per_second_status`` 403 or 429. Per company file (tenant spec): ``cftoken_required`` true with
``username``/``password`` (``Administrator``/empty), ``default_top`` 400, ``max_top`` 1000,
``utc_offset_minutes`` 0 (the zone of ``LastModified`` is undocumented), ``generic_invoice_lines``
false, ``unknown_path_status`` 401 (MYOB answers unknown resources with ``OAuthTokenIsInvalid``),
``location_origin`` none (the origin of a create's ``Location``: MYOB's regional hosts; default the request's).
OAuth (control ``settings``, any ``OAuthPolicy`` field): access 1200 s, code 300 s, rotation on every
refresh with no grace for the old token, no refresh-token expiry, no PKCE, ``expires_in`` as a string,
client credentials only in the form body.

Company files are generated deterministically from a seed (same seed, same UIDs and content;
times are spread over the last ``days`` days up to the sandbox clock). Every invoice paid in part or in
full was paid by a customer payment (``/Sale/CustomerPayment``; a customer's invoices paid the same day
may share one), and an invoice paid later through the control API gets its payment then; deleting a
payment makes its amounts owing again. Records are plain dicts; nested links to customers are shared
objects, so renaming a customer (control API) shows on its invoices and payments without touching their
``LastModified``.

Writes (``writes``): ``POST /Contact/Customer`` and ``POST /Sale/Invoice/Service`` answer ``201 Created`` with a
``Location`` and no body (``?returnBody=true`` adds it), refusals ``400`` with every problem in ``Errors``; MYOB
takes no idempotency key, so a repeated POST makes a second record. Other writes answer ``501``.

Modules: ``model`` (constants, ``MyobError``, time stamps and money, each record type's fields), ``query``
(OData ``$filter``/``$orderby`` over records), ``data`` (company files and their generated records), ``apps``
(per-API-key limits, injected faults), ``wire`` (how answers are written: origins, ETags, gzip, MYOB's error
answers), ``writes`` (the POSTs that create cards and service invoices), ``api`` (``MyobSandbox``: OAuth hooks,
the API and control routes) and ``control`` (``MyobControl``).
"""

from nextcrm_sandbox.myob.api import MyobSandbox
from nextcrm_sandbox.myob.control import MyobControl
from nextcrm_sandbox.myob.model import (
    DEFAULT_SCOPES,
    LAYOUTS,
    LEGACY_SCOPE,
    MyobError,
    format_myob_datetime,
    parse_myob_datetime,
)

__all__ = [
    "DEFAULT_SCOPES",
    "LAYOUTS",
    "LEGACY_SCOPE",
    "MyobControl",
    "MyobError",
    "MyobSandbox",
    "format_myob_datetime",
    "parse_myob_datetime",
]
