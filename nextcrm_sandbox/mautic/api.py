"""``MauticSandbox``: the installations' OAuth and API routes, with Mautic's request pipeline (API and Basic
switches, faults, authentication, the hourly limiter), the control API under ``/_sandbox/mautic``, and the
webhooks that contact changes send (``sandbox.mautic.webhooks``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.control import (
    ControlError,
    clear_scoped_faults,
    control_endpoint,
    int_field,
    lookup,
    number_field,
    read_json_object,
    reject_unknown_fields,
)
from nextcrm_sandbox.mautic.data import (
    _ACCOUNT_FIELDS,
    _CHANGE_FIELDS,
    _KNOB_DEFAULTS,
    MauticInstallation,
    _Bucket,
    _normalise_knobs,
)
from nextcrm_sandbox.mautic.model import (
    _CONTACT_FIELDS,
    CONTROL_PREFIX,
    ENTITIES,
    MSG_ACCESS_DENIED,
    MSG_API_DISABLED,
    MSG_BASIC_DISABLED,
    MSG_BASIC_INVALID,
    MSG_EVENTS_REQUIRED,
    MSG_NAME_REQUIRED,
    MSG_NOT_FOUND,
    MSG_NOT_VALID,
    MSG_ONE_METHOD,
    MSG_SOURCES_REQUIRED,
    MSG_TOKEN_EXPIRED,
    MSG_TOKEN_INVALID,
    PREFIX,
    SESSION_COOKIE,
    ApiError,
    _entity_of,
    _generic_message,
    _unix_field,
    _values,
    parse_datetime,
    php_json,
    php_params,
)
from nextcrm_sandbox.mautic.webhooks import MauticWebhooks
from nextcrm_sandbox.oauth import AccessDenied, OAuthError

# API writes: route kind -> the status a success answers with.
_WRITES = {
    "campaign_new": 201,
    "campaign_edit": 200,
    "contact_new": 201,
    "contact_edit": 200,
    "contact_delete": 200,
    "campaign_member": 200,
    "segment_member": 200,
}
_NUMBER_FIELDS = frozenset(alias for _id, alias, _label, kind, _group in _CONTACT_FIELDS if kind == "number")
_DATE_FIELDS = frozenset(alias for _id, alias, _label, kind, _group in _CONTACT_FIELDS if kind == "datetime")
_TEXT_FIELDS = frozenset(alias for _id, alias, _label, _kind, _group in _CONTACT_FIELDS) - _NUMBER_FIELDS


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        php_json(payload), status_code=status, headers={"content-type": "application/json", **(headers or {})}
    )


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    latency_ms: float = 0.0
    insert_during_paging: int = 0
    # List requests answered as if their `where[]` clauses on `id` were absent (a proxy or plugin that drops
    # them): paging by id then gets the same page again.
    repeat_pages: int = 0
    # Writes carried out whose answer is lost (a proxy's 5xx after Mautic committed): the client cannot tell.
    lost_answers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "latency_ms": self.latency_ms,
            "insert_during_paging": self.insert_during_paging,
            "repeat_pages": self.repeat_pages,
            "lost_answers": self.lost_answers,
        }

    def active(self) -> bool:
        return bool(
            self.server_errors or self.rate_limited or self.latency_ms or self.insert_during_paging or self.repeat_pages
            or self.lost_answers
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The sandbox: routes, request pipeline, OAuth endpoints, control API
# ---------------------------------------------------------------------------------------------------------


class _RateLimited(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__("rate limited")
        self.response = response


def _oauth_error(error: str, description: str, status: int = 400) -> ApiError:
    return ApiError(status, description, kind="kernel", error_type=error)


def _token_body(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A token response in FOSOAuthServerBundle's field order, ``scope`` null when none was granted."""
    out: dict[str, Any] = {
        "access_token": raw["access_token"],
        "expires_in": int(raw["expires_in"]),
        "token_type": "bearer",
        "scope": raw.get("scope") or None,
    }
    if raw.get("refresh_token"):
        out["refresh_token"] = raw["refresh_token"]
    return out


def _basic_credentials(header: str) -> tuple[str, str] | None:
    try:
        user, sep, password = base64.b64decode(header.split(None, 1)[1].strip()).decode().partition(":")
    except (IndexError, binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


async def _form_of(request: Request) -> dict[str, str]:
    """Request parameters as Mautic reads them: the query for GET, a form or (FOSRest body listener) JSON body else."""
    if request.method == "GET":
        return dict(request.query_params)
    raw = await request.body()
    if "json" in request.headers.get("content-type", ""):
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            return {}
        return {str(k): str(v) for k, v in body.items()} if isinstance(body, dict) else {}
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


async def _contact_fields(request: Request) -> dict[str, Any]:
    """The contact fields of a write, by alias, from a JSON or form body; numbers as ints, dates checked; other
    keys ignored."""
    raw = await request.body()
    if "json" in request.headers.get("content-type", ""):
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            raise ApiError(400, "Request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be an object of contact fields.")
    else:
        body = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    fields: dict[str, Any] = {}
    for key, value in body.items():
        if key in _NUMBER_FIELDS:
            try:
                fields[key] = None if value in (None, "") else int(value)
            except (TypeError, ValueError):
                raise ApiError(400, f"{key}: This value is not valid.") from None
        elif key in _DATE_FIELDS:
            text = None if value in (None, "") else str(value)
            if text is not None and parse_datetime(text) is None:
                raise ApiError(400, f"{key}: This value is not a valid datetime.")
            fields[key] = text
        elif key in _TEXT_FIELDS:
            fields[key] = None if value is None else str(value)
    return fields


async def _write_params(request: Request) -> dict[str, Any]:
    """A write's parameters as FOSRest's body listener hands them over: a JSON object, or a form folded into PHP's
    nested arrays (``events[0][name]=...``)."""
    raw = await request.body()
    if "json" in request.headers.get("content-type", ""):
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            raise ApiError(400, "Request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Request body must be an object.")
        return body
    return php_params(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def _flag(value: Any, field: str) -> bool:
    """A yes/no form field: true/false, 1/0 (as numbers or text); anything else is refused."""
    if isinstance(value, bool):
        return value
    text = "" if value is None else str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false", ""):
        return False
    raise ApiError.invalid(field, MSG_NOT_VALID)


def _campaign_fields(params: Mapping[str, Any], *, whole: bool) -> dict[str, Any]:
    """The campaign form's fields a write gives (others are ignored, as ``allow_extra_fields`` does): a blank name is
    refused where the write sets one (always for POST and PUT), dates are read as MySQL reads them."""
    fields: dict[str, Any] = {}
    if whole or "name" in params:
        name = params.get("name")
        if isinstance(name, bool | dict | list) or name is None or not str(name).strip():
            raise ApiError.invalid("name", MSG_NAME_REQUIRED)
        fields["name"] = str(name).strip()
    if "description" in params:
        value = params["description"]
        fields["description"] = None if value in (None, "") else str(value)
    for key in ("isPublished", "allowRestart"):
        if key in params:
            fields[key] = _flag(params[key], key)
    for key in ("publishUp", "publishDown"):
        if key in params:
            value = params[key]
            moment = None if value in (None, "") else parse_datetime(str(value))
            if value not in (None, "") and moment is None:
                raise ApiError.invalid(key, MSG_NOT_VALID)
            fields[key] = moment
    return fields


def _source_ids(params: Mapping[str, Any], key: str) -> list[int]:
    """The ids of a campaign's sources (``lists`` or ``forms``): ``[{"id": 3}, ...]`` or bare ids; a malformed one
    fails as Doctrine would (500)."""
    ids = []
    for item in _values(params.get(key)):
        value = item.get("id") if isinstance(item, dict) else item
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ApiError(500, _generic_message(500), kind="kernel")
        ids.append(int(str(value).strip()))
    return ids


def _location(request: Request, inst: MauticInstallation, entity: str, rid: int) -> dict[str, str]:
    """The ``Location`` header of a created entity: its ``GET /api/{entity}/{id}`` URL."""
    return {"location": f"{str(request.base_url).rstrip('/')}{inst.base_path}/api/{entity}/{rid}"}


class MauticSandbox:
    """Mautic installations with their OAuth, API and control routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.installations: dict[str, MauticInstallation] = {}
        self._faults: dict[str | None, _Faults] = {}
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.total = 0
        self.webhooks = MauticWebhooks(clock, self._known_account)

    def _known_account(self, account: str) -> bool:
        # A method, not a lambda: the webhooks keep it and are saved with the sandbox's state.
        return account in self.installations

    # --- installations ------------------------------------------------------------------------------------

    @staticmethod
    def normalise_spec(body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate an account spec and fill in the defaults."""
        unknown = set(body) - _ACCOUNT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ControlError(400, "seed must be an integer")
        days = number_field(body, "days", 30.0)
        if days <= 0:
            raise ControlError(400, "days must be > 0")
        counts = {
            name: int_field(body, name, default)
            for name, default in (("campaigns", 20), ("contacts", 100), ("segments", 5), ("emails", 10))
        }
        clients = body.get("clients", [])
        if not isinstance(clients, list) or not all(isinstance(c, dict) for c in clients):
            raise ControlError(
                400, "clients must be a list of {client_id, client_secret, grant_types?, redirect_uris?}"
            )
        users = body.get("users") or [{"username": "admin", "password": "mautic"}]
        if not isinstance(users, list) or not all(
            isinstance(u, dict)
            and isinstance(u.get("username"), str)
            and u["username"]
            and isinstance(u.get("password"), str)
            for u in users
        ):
            raise ControlError(400, "users must be a list of {username, password, firstName?, lastName?}")
        users = [
            {
                "username": u["username"],
                "password": u["password"],
                "firstName": str(u.get("firstName") or u["username"].title()),
                "lastName": str(u.get("lastName") or "User"),
            }
            for u in users
        ]
        knobs = _normalise_knobs(body, _KNOB_DEFAULTS)
        account_id = body.get("id")
        if account_id is None:
            material = (
                f"{seed}|{','.join(str(c.get('client_id')) for c in clients)}|{','.join(u['username'] for u in users)}"
            )
            account_id = "m" + hashlib.sha256(material.encode()).hexdigest()[:12]
        if not isinstance(account_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", account_id):
            raise ControlError(400, "id must be 1-64 letters, digits, '-' or '_'")
        return {
            "id": account_id,
            "seed": seed,
            "days": days,
            **counts,
            "clients": clients,
            "users": users,
            "knobs": knobs,
        }

    def add_account(self, body: Mapping[str, Any]) -> MauticInstallation:
        """Generate an installation from a spec and install it (replacing one with the same id)."""
        inst = MauticInstallation(self.normalise_spec(body), self.clock)
        self._install(inst)
        return inst

    def _install(self, inst: MauticInstallation) -> None:
        inst.on_contact_event = partial(self.webhooks.contact_event, inst.id)
        self.installations[inst.id] = inst

    def close(self) -> None:
        """Stop the webhook delivery thread."""
        self.webhooks.close()

    def installation(self, account_id: str) -> MauticInstallation | None:
        """The installation with this id, if any."""
        return self.installations.get(account_id)

    def _inst(self, account_id: str) -> MauticInstallation:
        return lookup(self.installations, account_id, "account")

    # --- routes -------------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """Installation routes under ``/mautic/{account}/...`` and the control API under ``/_sandbox/mautic``."""
        base = f"{PREFIX}/{{account}}"
        c = CONTROL_PREFIX
        a = f"{c}/accounts/{{account}}"
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        return [
            Route(f"{base}/oauth/v2/authorize", self._authorize, methods=["GET", "POST"]),
            Route(f"{base}/oauth/v2/authorize_login", self._login_form, methods=["GET"]),
            Route(f"{base}/oauth/v2/authorize_login_check", self._login_check, methods=["GET", "POST"]),
            Route(f"{base}/oauth/v2/token", self._token, methods=["GET", "POST"]),
            Route(f"{base}/api/campaigns/{{rid:int}}/contacts", self._api("campaign_contacts"), methods=["GET"]),
            Route(f"{base}/api/contacts/{{rid:int}}/campaigns", self._api("contact_campaigns"), methods=["GET"]),
            Route(f"{base}/api/contacts/{{rid:int}}/segments", self._api("contact_segments"), methods=["GET"]),
            Route(f"{base}/api/stats/{{table}}", self._api("stats"), methods=["GET"]),
            Route(f"{base}/api/campaigns/new", self._api("campaign_new"), methods=["POST"]),
            Route(f"{base}/api/campaigns/{{rid:int}}/edit", self._api("campaign_edit"), methods=["PUT", "PATCH"]),
            Route(f"{base}/api/contacts/new", self._api("contact_new"), methods=["POST"]),
            Route(f"{base}/api/contacts/{{rid:int}}/edit", self._api("contact_edit"), methods=["PUT", "PATCH"]),
            Route(f"{base}/api/contacts/{{rid:int}}/delete", self._api("contact_delete"), methods=["DELETE"]),
            Route(
                f"{base}/api/campaigns/{{rid:int}}/contact/{{lead:int}}/{{action:str}}",
                self._api("campaign_member"),
                methods=["POST"],
            ),
            Route(
                f"{base}/api/segments/{{rid:int}}/contact/{{lead:int}}/{{action:str}}",
                self._api("segment_member"),
                methods=["POST"],
            ),
            Route(f"{base}/api/{{entity}}/{{rid:int}}", self._api("one"), methods=["GET"]),
            Route(f"{base}/api/{{entity}}", self._api("list"), methods=["GET"]),
            Route(f"{base}/api/{{rest:path}}", self._api("unknown"), methods=every),
            Route(f"{c}/accounts", control_endpoint(self._control_accounts), methods=["GET", "POST"]),
            Route(a, control_endpoint(self._control_account), methods=["GET", "PATCH", "DELETE"]),
            Route(f"{a}/clients", control_endpoint(self._control_clients), methods=["POST"]),
            Route(f"{a}/oauth", control_endpoint(self._control_oauth_state), methods=["GET"]),
            Route(f"{a}/oauth/clients", control_endpoint(self._control_clients), methods=["POST"]),
            Route(f"{a}/oauth/grants", control_endpoint(self._control_grant), methods=["POST"]),
            Route(
                f"{a}/oauth/grants/{{grant_id}}/{{action}}",
                control_endpoint(self._control_grant_action),
                methods=["POST"],
            ),
            Route(f"{a}/changes", control_endpoint(self._control_changes), methods=["POST"]),
            Route(f"{a}/records", control_endpoint(self._control_add_record), methods=["POST"]),
            Route(
                f"{a}/records/{{entity}}/{{rid:int}}",
                control_endpoint(self._control_record),
                methods=["PATCH", "DELETE"],
            ),
            Route(f"{a}/export/{{entity}}", control_endpoint(self._control_export), methods=["GET"]),
            Route(
                f"{a}/campaigns/{{rid:int}}/contacts/{{lead:int}}/{{action:str}}",
                control_endpoint(self._control_membership),
                methods=["POST"],
            ),
            Route(
                f"{a}/segments/{{rid:int}}/contacts/{{lead:int}}/{{action:str}}",
                control_endpoint(self._control_membership),
                methods=["POST"],
            ),
            *self.webhooks.routes(c),
            Route(f"{c}/faults", control_endpoint(self._control_faults), methods=["POST", "DELETE"]),
            Route(f"{c}/stats", control_endpoint(self._control_stats), methods=["GET"]),
        ]

    def _count(self, inst: MauticInstallation | None, pattern: str, status: int) -> None:
        self.total += 1
        self.by_route[pattern] += 1
        self.by_status[str(status)] += 1
        if inst is not None:
            inst.requests += 1

    @staticmethod
    def _no_installation() -> Response:
        return Response(b"Not Found", status_code=404, headers={"content-type": "text/plain; charset=UTF-8"})

    def _fault_for(self, account_id: str) -> _Faults | None:
        for key in (account_id, None):
            faults = self._faults.get(key)
            if faults is not None and faults.active():
                return faults
        return None

    # --- the API ------------------------------------------------------------------------------------------

    def _api(self, kind: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            inst = self.installations.get(request.path_params["account"])
            entity = request.path_params.get("entity")
            route_kind = "unknown" if kind in ("list", "one") and entity not in ENTITIES else kind
            pattern = {
                "list": f"/api/{entity}",
                "one": f"/api/{entity}/{{id}}",
                "campaign_contacts": "/api/campaigns/{id}/contacts",
                "contact_campaigns": "/api/contacts/{id}/campaigns",
                "contact_segments": "/api/contacts/{id}/segments",
                "stats": "/api/stats/{table}",
                "campaign_new": "/api/campaigns/new",
                "campaign_edit": "/api/campaigns/{id}/edit",
                "contact_new": "/api/contacts/new",
                "contact_edit": "/api/contacts/{id}/edit",
                "contact_delete": "/api/contacts/{id}/delete",
                "campaign_member": "/api/campaigns/{id}/contact/{contactId}/{action}",
                "segment_member": "/api/segments/{id}/contact/{contactId}/{action}",
                "unknown": "/api/(unknown)",
            }[route_kind]
            if inst is None:
                self._count(None, f"{request.method} {pattern}", 404)
                return self._no_installation()
            response = await self._serve_api(request, inst, route_kind, entity)
            self._count(inst, f"{request.method} {pattern}", response.status_code)
            return response

        endpoint.__name__ = f"mautic_{kind}"
        return endpoint

    def _gate(self, request: Request, inst: MauticInstallation) -> None:
        """``ApiSubscriber``: the API switch, then the Basic auth switch, for every ``/api`` and ``/oauth`` request."""
        if not inst.knobs["api_enabled"]:
            raise ApiError(403, MSG_API_DISABLED, kind="kernel", error_type="api_disabled")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic") and not inst.knobs["basic_auth"]:
            raise ApiError(403, MSG_BASIC_DISABLED, kind="kernel", error_type="access_denied")

    async def _serve_api(self, request: Request, inst: MauticInstallation, kind: str, entity: str | None) -> Response:
        version = {"Mautic-Version": inst.knobs["mautic_version"]}
        rate_headers: dict[str, str] = {}
        try:
            self._gate(request, inst)
            if kind == "unknown":
                path = request.url.path[len(inst.base_path) :]
                raise ApiError(404, f"Requested URL not found: {path}", kind="kernel")
            faults = self._fault_for(inst.id)
            if faults is not None and faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            if faults is not None and faults.server_errors > 0:
                faults.server_errors -= 1
                status = faults.server_error_status
                raise ApiError(status, _generic_message(status), kind="kernel")
            user, key = self._authenticate(request, inst)
            rate_headers = self._rate_limit(inst, key, faults)
            if kind in _WRITES:
                status, payload, headers = await self._write(request, inst, kind, user)
                if faults is not None and faults.lost_answers > 0:
                    faults.lost_answers -= 1
                    status = faults.server_error_status
                    raise ApiError(status, _generic_message(status), kind="kernel")
                return _json(status, payload, {**version, **rate_headers, **headers})
            payload = self._dispatch(request, inst, kind, entity, user, faults)
            return _json(200, payload, {**version, **rate_headers})
        except _RateLimited as limited:
            return limited.response
        except ApiError as err:
            headers = dict(version) if err.kind == "controller" else {}
            return _json(err.status, err.body(), {**headers, **rate_headers})

    def _dispatch(
        self,
        request: Request,
        inst: MauticInstallation,
        kind: str,
        entity: str | None,
        user: Mapping[str, Any] | None,
        faults: _Faults | None,
    ) -> dict[str, Any]:
        rid = request.path_params.get("rid")
        params = php_params(request.query_params.multi_items())
        if kind == "list":
            assert entity is not None
            inserts = inst.knobs["insert_during_paging"] + (faults.insert_during_paging if faults else 0)
            for _ in range(inserts):
                inst.create(entity, self.clock())
            if faults is not None and faults.repeat_pages > 0 and isinstance(params.get("where"), dict):
                faults.repeat_pages -= 1
                where = {k: c for k, c in params["where"].items() if not (isinstance(c, dict) and c.get("col") == "id")}
                params = {**params, "where": where}
            return inst.list_entities(entity, params, user["id"] if user else None)
        if kind == "one":
            assert entity is not None
            return inst.get_entity(entity, rid)
        if kind == "campaign_contacts":
            return inst.campaign_contacts(rid, params)
        if kind == "contact_campaigns":
            return inst.contact_campaigns(rid)
        if kind == "stats":
            return inst.stats(request.path_params["table"], params)
        return inst.contact_segments(rid)

    async def _write(self, request: Request, inst: MauticInstallation, kind: str,
                     user: Mapping[str, Any] | None) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
        """The campaign, contact and membership writes (as Mautic serves them): ``/new`` 201 with a ``Location``, PATCH
        404s on a missing entity while PUT creates it, membership add/remove ``{"success": 1}``. A new contact whose
        unique identifier (email) a contact already has updates that one (200). Contact changes send their webhooks;
        campaign and membership changes none (this emulator sends no segment-membership event)."""
        rid = request.path_params.get("rid")
        now = self.clock()
        user_id = user["id"] if user else None
        contacts = inst.tables["contacts"]
        if kind in ("campaign_new", "campaign_edit"):
            return self._write_campaign(request, inst, kind, await _write_params(request), now, user_id)
        if kind == "campaign_member":
            action, lead = request.path_params["action"], request.path_params["lead"]
            if action not in ("add", "remove"):
                path = request.url.path[len(inst.base_path) :]
                raise ApiError(404, f"Requested URL not found: {path}", kind="kernel")
            if rid not in inst.tables["campaigns"] or lead not in contacts:
                raise ApiError(404, MSG_NOT_FOUND)
            (inst.join if action == "add" else inst.leave)(rid, lead, now)
            return _WRITES[kind], {"success": 1}, {}
        if kind == "segment_member":
            action, lead = request.path_params["action"], request.path_params["lead"]
            if action not in ("add", "remove"):
                path = request.url.path[len(inst.base_path) :]
                raise ApiError(404, f"Requested URL not found: {path}", kind="kernel")
            if rid not in inst.tables["segments"] or lead not in contacts:
                raise ApiError(404, MSG_NOT_FOUND)
            (inst.segment_join if action == "add" else inst.segment_leave)(rid, lead, now)
            return _WRITES[kind], {"success": 1}, {}
        if kind == "contact_delete":
            if rid not in contacts:
                raise ApiError(404, MSG_NOT_FOUND)
            view = {**inst.render("contacts", contacts[rid]), "id": None}
            inst.delete("contacts", rid, now)
            return _WRITES[kind], {"contact": view}, {}
        fields = await _contact_fields(request)
        if kind == "contact_new":
            existing = inst.duplicate_contact(fields)
            if existing is not None:  # `getNewEntity` found it: the form edits it, answered 200
                return 200, {"contact": inst.render("contacts", inst.update("contacts", existing.id, fields, now))}, {}
        if kind == "contact_new" or (rid not in contacts and request.method == "PUT"):
            created = inst.api_create_contact(fields, now, user_id)
            return 201, {"contact": inst.render("contacts", created)}, _location(request, inst, "contacts", created.id)
        if rid not in contacts:
            raise ApiError(404, MSG_NOT_FOUND)
        if request.method == "PUT":  # PUT replaces: the fields it does not name are emptied
            fields = {**dict.fromkeys(_TEXT_FIELDS | _NUMBER_FIELDS), **fields}
        return _WRITES[kind], {"contact": inst.render("contacts", inst.update("contacts", rid, fields, now))}, {}

    def _write_campaign(self, request: Request, inst: MauticInstallation, kind: str, params: Mapping[str, Any],
                        now: int, user_id: int | None) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
        """``POST /api/campaigns/new`` and ``PUT|PATCH /api/campaigns/{id}/edit`` in ``processForm``'s order: the form
        (a blank name is refused), then ``preSaveEntity``: POST and PUT need events and a source (segments or
        forms); a source the installation does not have fails as its foreign key would (500)."""
        rid = request.path_params.get("rid")
        campaigns = inst.tables["campaigns"]
        exists = kind == "campaign_edit" and rid in campaigns
        if kind == "campaign_edit" and not exists and request.method == "PATCH":
            raise ApiError(404, MSG_NOT_FOUND)
        whole = request.method in ("POST", "PUT")
        fields = _campaign_fields(params, whole=whole)
        lists = _source_ids(params, "lists") if whole or "lists" in params else None
        if whole:
            events = _values(params.get("events"))
            if not events:
                raise ApiError(400, MSG_EVENTS_REQUIRED)
            if not lists and not _source_ids(params, "forms"):
                raise ApiError(400, MSG_SOURCES_REQUIRED)
            if _source_ids(params, "forms"):  # the emulator keeps no forms
                raise ApiError(500, _generic_message(500), kind="kernel")
        else:
            events = None
        if lists and any(sid not in inst.tables["segments"] for sid in lists):
            raise ApiError(500, _generic_message(500), kind="kernel")
        canvas = params.get("canvasSettings") if isinstance(params.get("canvasSettings"), dict) else None
        if not exists:
            created = inst.api_create_campaign(fields, lists or [], events or [], canvas, now, user_id)
            headers = _location(request, inst, "campaigns", created.id)
            return 201, {"campaign": inst.render("campaigns", created)}, headers
        if request.method == "PUT":  # PUT clears what it does not give
            fields = {"description": None, "isPublished": False, "publishUp": None, "publishDown": None,
                      "allowRestart": False, **fields}  # fmt: skip
        edited = inst.api_edit_campaign(rid, fields, now, user_id, lists=lists, events=events, canvas=canvas,
                                        replace=request.method == "PUT")  # fmt: skip
        return 200, {"campaign": inst.render("campaigns", edited)}, {}

    def _authenticate(self, request: Request, inst: MauticInstallation) -> tuple[dict[str, Any] | None, str]:
        """The API user and the limiter's key: a bearer token (header or ``access_token``) or Basic credentials."""
        header = request.headers.get("authorization", "")
        tokens = []
        bearer = re.search(r"Bearer\s(\S+)", header)
        if bearer:
            tokens.append(bearer.group(1))
        if request.query_params.get("access_token"):
            tokens.append(request.query_params["access_token"])
        if len(tokens) > 1:
            raise _oauth_error("invalid_request", MSG_ONE_METHOD)
        if tokens:
            try:
                grant = inst.oauth.check_access(f"Bearer {tokens[0]}")
            except AccessDenied as denied:
                message = MSG_TOKEN_EXPIRED if denied.reason == "expired" else MSG_TOKEN_INVALID
                raise _oauth_error("invalid_grant", message, 401) from None
            return inst.users.get(str(grant.subject.get("username", ""))), f"oauth:{tokens[0]}"
        if header.lower().startswith("basic"):
            creds = _basic_credentials(header)
            user = inst.users.get(creds[0]) if creds else None
            if (
                creds is None
                or user is None
                or not secrets.compare_digest(creds[1].encode(), user["password"].encode())
            ):
                raise _oauth_error("access_denied", MSG_BASIC_INVALID, 401)
            return user, "site"
        raise _oauth_error("access_denied", MSG_ACCESS_DENIED, 401)

    def _rate_limit(self, inst: MauticInstallation, key: str, faults: _Faults | None) -> dict[str, str]:
        """noxlogic's path limit on ``/api``: N calls per period per key (an OAuth token, else the site)."""
        limit = inst.knobs["rate_limit"]
        period = inst.knobs["rate_limit_period"]
        now = self.clock()
        if faults is not None and faults.rate_limited > 0:
            faults.rate_limited -= 1
            shown = limit or 1000
            headers = {"X-RateLimit-Limit": str(shown), "X-RateLimit-Remaining": "0"}
            headers["X-RateLimit-Reset"] = str(int(now + period))
            inst.throttled += 1
            raise _RateLimited(self._too_many(inst, shown, headers))
        if not limit:
            return {}
        bucket = inst.buckets.get(key)
        if bucket is None or now >= bucket.reset_at:
            bucket = inst.buckets[key] = _Bucket(0, now + period)
        bucket.calls += 1
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - bucket.calls)),
            "X-RateLimit-Reset": str(int(bucket.reset_at)),
        }
        if bucket.calls > limit:
            inst.throttled += 1
            raise _RateLimited(self._too_many(inst, limit, headers))
        return headers

    @staticmethod
    def _too_many(inst: MauticInstallation, limit: int, headers: Mapping[str, str]) -> Response:
        body = (
            '{ "errors": [ { "code": 429, "message": "You exceeded the rate limit of '
            f'{limit} API calls per hour.", "details": [] }} ]}}'
        )
        return Response(
            body.encode(),
            status_code=429,
            headers={"content-type": inst.knobs["rate_limit_content_type"], **headers},
        )

    # --- OAuth --------------------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        inst = self.installations.get(request.path_params["account"])
        pattern = f"{request.method} /oauth/v2/token"
        if inst is None:
            self._count(None, pattern, 404)
            return self._no_installation()
        form = await _form_of(request)
        try:
            self._gate(request, inst)
            body = self._grant_token(inst, form, request.headers.get("authorization", ""))
            response = _json(200, body, {"cache-control": "no-store", "pragma": "no-cache"})
        except ApiError as err:
            response = _json(err.status, err.body(), {"cache-control": "no-store"})
        self._count(inst, pattern, response.status_code)
        return response

    def _grant_token(self, inst: MauticInstallation, form: Mapping[str, str], header: str) -> dict[str, Any]:
        """oauth2-php's ``grantAccessToken`` order and texts, with the shared server doing the token work."""
        grant_type = form.get("grant_type") or ""
        if not re.fullmatch(
            r"authorization_code|token|password|client_credentials|refresh_token|\S+://\S+|urn:\S+", grant_type
        ):
            raise _oauth_error("invalid_request", "Invalid grant_type parameter or parameter missing")
        creds = _basic_credentials(header) if header.lower().startswith("basic") else None
        if creds and creds[0]:
            client_id, secret = creds
        elif form.get("client_id"):
            client_id, secret = form["client_id"], form.get("client_secret", "")
        else:
            raise _oauth_error("invalid_client", "Client id was not found in the headers or body")
        client = inst.clients.get(client_id)
        if client is None or not secrets.compare_digest(secret.encode(), client.client_secret.encode()):
            raise _oauth_error("invalid_client", "The client credentials are invalid")
        if grant_type not in client.grant_types:
            raise _oauth_error("unauthorized_client", "The grant type is unauthorized for this client_id")
        request_form = {"grant_type": grant_type, "client_id": client_id, "client_secret": secret}
        refresh_message = "Invalid refresh token"
        if grant_type == "authorization_code":
            code = form.get("code") or ""
            if not code:
                raise _oauth_error("invalid_request", 'Missing parameter. "code" is required')
            redirect = form.get("redirect_uri") or ""
            stored = inst.codes.get(code)
            if stored is not None and (not redirect or redirect.lower().startswith(stored.lower())):
                redirect = stored
            request_form.update(code=code, redirect_uri=redirect)
        elif grant_type == "refresh_token":
            token = form.get("refresh_token") or ""
            if not token:
                raise _oauth_error("invalid_request", 'No "refresh_token" parameter found')
            grant = inst.oauth.grant_of_refresh_token(token)
            if grant is not None and grant.client_id == client_id and not grant.revoked and grant.head == token:
                refresh_message = "Refresh token has expired"
            request_form["refresh_token"] = token
        elif not secret:
            raise _oauth_error(
                "invalid_client", 'The client_secret is mandatory for the "client_credentials" grant type'
            )
        try:
            raw = inst.oauth.token(request_form, None)
        except OAuthError as err:
            if err.error != "invalid_grant":
                raise _oauth_error("invalid_request", "Invalid grant_type parameter or parameter missing") from None
            if grant_type == "refresh_token":
                raise _oauth_error("invalid_grant", refresh_message) from None
            if "redirect_uri" in err.description:
                raise _oauth_error("redirect_uri_mismatch", "The redirect URI is missing or do not match") from None
            if "expired" in err.description:
                raise _oauth_error("invalid_grant", "The authorization code has expired") from None
            raise _oauth_error("invalid_grant", "Code doesn't exist or is invalid for the client") from None
        if grant_type == "authorization_code":
            inst.codes.pop(request_form["code"], None)
        return _token_body(raw)

    async def _authorize(self, request: Request) -> Response:
        inst = self.installations.get(request.path_params["account"])
        pattern = f"{request.method} /oauth/v2/authorize"
        if inst is None:
            self._count(None, pattern, 404)
            return self._no_installation()
        try:
            self._gate(request, inst)
            response = await self._authorize_response(request, inst)
        except ApiError as err:
            response = _json(err.status, err.body())
        self._count(inst, pattern, response.status_code)
        return response

    async def _authorize_response(self, request: Request, inst: MauticInstallation) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":
            params.update(await _form_of(request))
        if inst.knobs["login_form"]:
            sid = request.cookies.get(SESSION_COOKIE, "")
            session = inst.sessions.get(sid)
            if session is None or not session.get("user"):
                if session is None:
                    sid = secrets.token_urlsafe(16)
                    session = inst.sessions[sid] = {}
                query = request.url.query
                session["target"] = request.url.path + (f"?{query}" if query else "")
                response = Response(status_code=302, headers={"location": f"{inst.base_path}/oauth/v2/authorize_login"})
                response.set_cookie(SESSION_COOKIE, sid, path=inst.base_path, httponly=True, samesite="lax")
                return response
            username = str(session["user"])
        else:
            username = params.get("sandbox_user") or next(iter(inst.users))
        user = inst.users.get(username)
        if user is None:
            raise _oauth_error("invalid_request", f"No Mautic user {username!r} in this installation")
        if not params.get("client_id"):
            raise _oauth_error("invalid_request", "No client id supplied")
        client = inst.clients.get(params["client_id"])
        if client is None:
            raise _oauth_error("invalid_client", "Unknown client")
        redirect = params.get("redirect_uri") or ""
        if not redirect:
            if not client.redirect_uris:
                raise _oauth_error("redirect_uri_mismatch", "No redirect URL was supplied or registered.")
            if len(client.redirect_uris) > 1:
                raise _oauth_error(
                    "redirect_uri_mismatch", "No redirect URL was supplied and more than one is registered."
                )
            redirect = client.redirect_uris[0]
        params["redirect_uri"] = redirect
        try:
            location = inst.oauth.authorize(params, {"user_id": user["id"], "username": username})
        except OAuthError:
            raise _oauth_error(
                "redirect_uri_mismatch", "The redirect URI provided does not match registered URI(s)."
            ) from None
        code = dict(parse_qsl(urlsplit(location).query)).get("code")
        if code:
            inst.codes[code] = redirect
            while len(inst.codes) > 1000:
                inst.codes.popitem(last=False)
        return Response(status_code=302, headers={"location": location})

    async def _login_form(self, request: Request) -> Response:
        inst = self.installations.get(request.path_params["account"])
        if inst is None:
            return self._no_installation()
        error = (
            '<div class="alert alert-danger">Invalid credentials.</div>' if request.query_params.get("error") else ""
        )
        page = (
            "<!DOCTYPE html><html><head><title>Mautic</title></head><body>"
            f'<form class="form-group login-form" name="login" method="post" '
            f'action="{inst.base_path}/oauth/v2/authorize_login_check">{error}'
            '<input type="text" id="username" name="_username" required>'
            '<input type="password" id="password" name="_password" required>'
            '<button type="submit">Login</button></form></body></html>'
        )
        self._count(inst, "GET /oauth/v2/authorize_login", 200)
        return Response(page.encode(), status_code=200, headers={"content-type": "text/html; charset=UTF-8"})

    async def _login_check(self, request: Request) -> Response:
        inst = self.installations.get(request.path_params["account"])
        if inst is None:
            return self._no_installation()
        form = await _form_of(request)
        sid = request.cookies.get(SESSION_COOKIE, "")
        session = inst.sessions.get(sid)
        if session is None:
            sid = secrets.token_urlsafe(16)
            session = inst.sessions[sid] = {}
        user = inst.users.get(form.get("_username", ""))
        password = form.get("_password", "")
        if user is None or not secrets.compare_digest(password.encode(), user["password"].encode()):
            location = f"{inst.base_path}/oauth/v2/authorize_login?error=1"
        else:
            session["user"] = user["username"]
            location = session.pop("target", f"{inst.base_path}/oauth/v2/authorize")
        response = Response(status_code=302, headers={"location": location})
        response.set_cookie(SESSION_COOKIE, sid, path=inst.base_path, httponly=True, samesite="lax")
        self._count(inst, f"{request.method} /oauth/v2/authorize_login_check", 302)
        return response

    # --- control API --------------------------------------------------------------------------------------

    async def _control_accounts(self, request: Request) -> Any:
        if request.method == "GET":
            return [inst.summary() for inst in self.installations.values()]
        spec = self.normalise_spec(await read_json_object(request))
        started = time.perf_counter()
        inst = await run_in_threadpool(MauticInstallation, spec, self.clock)
        self._install(inst)
        return {**inst.summary(), "generation_seconds": round(time.perf_counter() - started, 3)}

    async def _control_account(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        if request.method == "PATCH":
            inst.configure(await read_json_object(request))
        elif request.method == "DELETE":
            del self.installations[inst.id]
            return {"deleted": inst.id}
        return inst.summary()

    async def _control_clients(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        return inst.add_client(await read_json_object(request)).summary()

    async def _control_oauth_state(self, request: Request) -> Any:
        return self._inst(request.path_params["account"]).oauth.control_state()

    async def _control_grant(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        body = await read_json_object(request)
        client_id = str(body.get("client_id", ""))
        if client_id not in inst.clients:
            raise ControlError(404, f"no client {client_id!r}")
        username = str(body.get("user") or next(iter(inst.users)))
        user = inst.users.get(username)
        if user is None:
            raise ControlError(404, f"no user {username!r}")
        grant, raw = inst.oauth.create_grant(
            client_id, str(body.get("scope") or ""), {"user_id": user["id"], "username": username}
        )
        return {"grant_id": grant.id, "token": _token_body(raw)}

    async def _control_grant_action(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        grant_id, action = request.path_params["grant_id"], request.path_params["action"]
        if grant_id not in inst.oauth.grants:
            raise ControlError(404, f"no grant {grant_id!r}")
        if action == "revoke":
            inst.oauth.revoke_grant(grant_id)
            return {"grant_id": grant_id, "result": None}
        if action == "expire-access":
            return {"grant_id": grant_id, "result": inst.oauth.expire_access_tokens(grant_id)}
        raise ControlError(404, f"unknown grant action {action!r}")

    async def _control_changes(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        body = await read_json_object(request)
        reject_unknown_fields(body, _CHANGE_FIELDS, "change")
        return inst.apply_changes({k: int_field(body, k, 0) for k in _CHANGE_FIELDS}, self.clock())

    async def _control_add_record(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        body = await read_json_object(request)
        entity = _entity_of(body.get("entity"))
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        at = _unix_field(body.get("at"), "at")
        rec = inst.create(entity, self.clock() if at is None else at, fields)
        return inst.render(entity, rec)

    async def _control_record(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        entity = _entity_of(request.path_params["entity"])
        rid = request.path_params["rid"]
        body = await read_json_object(request)
        at = _unix_field(body.get("at"), "at")
        when = self.clock() if at is None else at
        if request.method == "DELETE":
            if rid not in inst.tables[entity]:
                raise ControlError(404, f"no {entity} record {rid}")
            inst.delete(entity, rid, when)
            return {"deleted": rid}
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise ControlError(400, "fields must be an object")
        return inst.render(entity, inst.update(entity, rid, fields, when))

    async def _control_membership(self, request: Request) -> Any:
        """Add a contact to a campaign or segment or remove it, as a user would in Mautic (no webhook is sent: there
        is none)."""
        inst = self._inst(request.path_params["account"])
        rid, lead, action = request.path_params["rid"], request.path_params["lead"], request.path_params["action"]
        entity = "segments" if request.url.path.split("/")[-5] == "segments" else "campaigns"
        if action not in ("add", "remove"):
            raise ControlError(404, f"unknown membership action {action!r}: add or remove")
        if rid not in inst.tables[entity]:
            raise ControlError(404, f"no {entity} record {rid}")
        if lead not in inst.tables["contacts"]:
            raise ControlError(404, f"no contacts record {lead}")
        if entity == "segments":
            changed = (inst.segment_join if action == "add" else inst.segment_leave)(rid, lead, self.clock())
            return {"segment": rid, "contact": lead, "action": action, "changed": changed}
        changed = (inst.join if action == "add" else inst.leave)(rid, lead, self.clock())
        return {"campaign": rid, "contact": lead, "action": action, "changed": changed}

    async def _control_export(self, request: Request) -> Any:
        inst = self._inst(request.path_params["account"])
        return await run_in_threadpool(inst.export, request.path_params["entity"])

    async def _control_faults(self, request: Request) -> Any:
        if request.method == "DELETE":
            return clear_scoped_faults(self._faults, request.query_params.get("account"))
        body = await read_json_object(request)
        reject_unknown_fields(body, {"account", *_Faults().as_dict()}, "fault")
        account = body.get("account")
        if account is not None:
            account = self._inst(str(account)).id
        faults = self._faults.setdefault(account, _Faults())
        for name in ("server_errors", "rate_limited", "insert_during_paging", "repeat_pages", "lost_answers"):
            if name in body:
                setattr(faults, name, int_field(body, name, 0))
        if "server_error_status" in body:
            if body["server_error_status"] not in (500, 502, 503, 504):
                raise ControlError(400, "server_error_status must be 500, 502, 503 or 504")
            faults.server_error_status = body["server_error_status"]
        if "latency_ms" in body:
            faults.latency_ms = number_field(body, "latency_ms", 0.0)
        return {"account": account, **faults.as_dict()}

    async def _control_stats(self, request: Request) -> Any:
        return {
            "total": self.total,
            "by_route": dict(self.by_route),
            "by_status": dict(self.by_status),
            "by_account": {
                aid: {"requests": inst.requests, "throttled": inst.throttled, "oauth": dict(inst.oauth.stats)}
                for aid, inst in self.installations.items()
            },
            "faults": {str(k): f.as_dict() for k, f in self._faults.items()},
        }
