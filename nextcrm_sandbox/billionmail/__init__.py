"""Local emulator of a BillionMail installation's management and send APIs (``core/`` of the Go backend).

The demo and the tests point the real BillionMail client code at this package instead of a self-hosted
install, so it reproduces what that code relies on. Every answer of the GoFrame backend is HTTP 200 with
the envelope ``{success, code, msg, data}``: validation failures are ``code`` 412 with GoFrame's rule
messages, a missing or bad bearer token ``code`` 401, handler errors ``code`` 500 with the Go error text,
a missing task ``code`` 404. Only what never reaches a handler leaves that envelope: an unknown ``/api``
path (HTTP 404, empty body) and the console IP whitelist (HTTP 403 ``IP not allowed``).

Authentication is the backend's own: ``POST /api/login`` returns an HS256 JWT pair with ``ttl``;
``POST /api/refresh-token`` renews it (its ``ttl`` is the refresh lifetime, as in the source); any valid
token of the install works as ``Authorization: Bearer``; logout blacklists a token; failed logins per
client IP turn on the captcha (``GET /api/get_validate_code``) and lock the IP out after five. Optional
SafePath (``billion_mail`` session cookie from ``/<safepath>``, else ``{"code":404,"msg":"access
denied"}``), optional console IP whitelist, and the ``x-api-key`` send endpoints with their per-key IP
whitelist and codes 1001-1005.

Campaigns are batch-mail tasks whose ``task_process`` (0 pending, 1 processing, 2 done, 3 paused) and
counters follow the sandbox clock from ``start_time`` at ``threads`` x 20 mails a second; the list is
ordered ``create_time DESC`` with required ``page``/``page_size``. ``task/create`` freezes the subscribed,
confirmed contacts of its groups as recipients and, taking no idempotency key, makes a second task of a
repeated request; ``task/update`` changes a task that is not running (its ``start_time`` schedules it);
``contact/group/contact_count`` counts the groups' subscribed addresses. Contacts live one row per (email,
group) and list one row per email for the mandatory ``status`` (under its newest row in that status, with
every group it is in with it; at most 100 a page, a bigger ``page_size`` gets 10); groups list with their
subscribed and unsubscribed counts, and are read (``group/info``, ``404`` when gone), updated and deleted
with their contacts; a contact edit with groups creates the address's rows again under new ids. Installs
are generated deterministically from a seed and served under ``/billionmail/{account_id}``; the control API
under ``/_sandbox/billionmail`` creates them, applies changes on the clock, injects faults and reports
statistics. No rate limits and no webhooks: BillionMail has neither (the HTTP 429 of a reverse proxy in
front of an install can be injected, and so can its 504 after the install carried a request out, for one
route or all).

Modules: ``wire`` (envelope, validation, JWT), ``data`` (an installation and its generation), ``api``
(``BillionMailSandbox``: routes, endpoints, control routes) and ``control`` (``BillionMailControl``).
"""

from nextcrm_sandbox.billionmail.api import BillionMailSandbox
from nextcrm_sandbox.billionmail.control import BillionMailControl
from nextcrm_sandbox.billionmail.data import BillionMailInstall, Knobs
from nextcrm_sandbox.billionmail.wire import (
    ACCESS_TTL,
    CONTACT_MAX_PAGE_SIZE,
    CONTROL_PREFIX,
    MAX_LOGIN_RETRIES,
    PREFIX,
    REFRESH_TTL,
    SEND_RATE_PER_THREAD,
    ApiError,
)

__all__ = [
    "ACCESS_TTL",
    "CONTACT_MAX_PAGE_SIZE",
    "CONTROL_PREFIX",
    "MAX_LOGIN_RETRIES",
    "PREFIX",
    "REFRESH_TTL",
    "SEND_RATE_PER_THREAD",
    "ApiError",
    "BillionMailControl",
    "BillionMailInstall",
    "BillionMailSandbox",
    "Knobs",
]
