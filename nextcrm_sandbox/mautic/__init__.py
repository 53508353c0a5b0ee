"""Local emulator of Mautic 5 (self-hosted marketing automation): OAuth 2.0, Basic auth and the REST API reads.

Mautic is self-hosted, so each sandbox account is one installation served under ``/mautic/{account}``: a
connection's base URL is ``{sandbox}/mautic/{account}`` and the real paths follow it (``/api/campaigns``,
``/oauth/v2/authorize``, ``/oauth/v2/token``). What it reproduces (``docs/providers/mautic.md``):

- the installation's switches: API access and HTTP Basic auth (403 ``api_disabled`` / ``access_denied`` on
  every ``/api`` and ``/oauth`` request, a Basic client login at the token endpoint included);
- FOSOAuthServerBundle on the shared ``OAuthServer``: ``authorization_code`` (consent at once, or through
  ``/oauth/v2/authorize_login`` when ``login_form`` is on; redirect URIs matched by prefix), ``refresh_token``
  rotated on every use with the old token gone at once and each new one good for 14 days,
  ``client_credentials`` without a refresh token, grant types per client, ``"scope": null``, and
  oauth2-php's error texts inside Mautic's ``{"errors": [...]}`` envelope;
- bearer tokens in the header, a form body or the ``access_token`` query parameter (one method at a time);
- ``GET /api/campaigns|contacts|segments|emails`` and ``/{id}``: entities keyed by id, ``[]`` (paginated
  entities) or ``{}`` (contacts) when empty, ``total`` an int or a string, ``start``/``limit`` (default 30,
  no maximum, 0 = everything), ``search`` with search commands, ``orderBy``/``orderByDir``/``order[]``,
  ``published`` with PHP truthiness (``publishedOnly`` ignored), ``minimal``, ``select[]``,
  ``where[n][col|expr|val]`` with Doctrine's expressions (unknown ones ignored), ``withContactCounts`` with
  its cache; ``dateModified`` null until the first edit; ISO-8601 dates with an offset;
- ``GET /api/campaigns/{id}/contacts`` (stats rows of strings, a list) and ``/api/contacts/{id}/campaigns``
  and ``/segments`` (``[]`` when empty);
- the optional hourly limiter (429 with noxlogic's body and ``X-RateLimit-*`` headers) and the
  ``Mautic-Version`` header; bodies encoded as PHP's ``json_encode`` writes them.

- contact writes (``POST /api/contacts/new``, which updates the contact holding the same unique identifier,
  email by default (knob ``contact_unique_fields``), answering 200; ``PUT|PATCH /api/contacts/{id}/edit``,
  ``DELETE …/delete``), campaign writes (``POST /api/campaigns/new`` with its events, sources and canvas, a
  repeated one making a second campaign; ``PUT|PATCH /api/campaigns/{id}/edit``), with Mautic's form errors
  (``{"errors": [{"code": 400, "message": "name: A name is required.", "details": {...}}]}``), campaign and
  segment membership (``POST /api/{campaigns|segments}/{id}/contact/{contactId}/add|remove``) and ``GET
  /api/stats/campaign_leads`` (every membership row, manual removals included);
- faults: 5xx, 429, latency, inserts while paging, ignored id filters, and ``lost_answers`` (a write carried out
  whose answer is a 5xx);
- webhooks (``sandbox.mautic.webhooks``): the contact events Mautic sends (identified, updated, points changed,
  deleted; nothing for anonymous visitors' saves, nothing for campaign membership changes) go to the
  installation's webhooks as PHP-encoded bodies signed ``Webhook-Signature``, in immediate mode (no retry) or
  queue mode (batches of ``webhook_limit`` at the cron run, resent only after transport errors).

Installations are generated deterministically from a seed and changed through the control API under
``/_sandbox/mautic`` (``MauticControl`` wraps it for tests).
"""

from nextcrm_sandbox.mautic.api import MauticSandbox
from nextcrm_sandbox.mautic.control import MauticControl
from nextcrm_sandbox.mautic.data import MauticInstallation
from nextcrm_sandbox.mautic.model import (
    ACCESS_TTL,
    CONTROL_PREFIX,
    DEFAULT_PAGE_LIMIT,
    ENTITIES,
    MAUTIC_VERSION,
    PREFIX,
    REFRESH_TTL,
    ApiError,
    parse_datetime,
    php_json,
    php_params,
)
from nextcrm_sandbox.mautic.webhooks import EVENT_TYPES, MauticWebhooks, mautic_signature

__all__ = [
    "ACCESS_TTL",
    "CONTROL_PREFIX",
    "DEFAULT_PAGE_LIMIT",
    "ENTITIES",
    "EVENT_TYPES",
    "MAUTIC_VERSION",
    "PREFIX",
    "REFRESH_TTL",
    "ApiError",
    "MauticControl",
    "MauticInstallation",
    "MauticSandbox",
    "MauticWebhooks",
    "mautic_signature",
    "parse_datetime",
    "php_json",
    "php_params",
]
