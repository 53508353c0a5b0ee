"""The BillionMail sandbox's HTTP side: the ``/api`` endpoints of each installation and the control routes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.billionmail.data import (
    _KNOB_NAMES,
    BillionMailInstall,
    Knobs,
    _ApiKey,
    _apply_knobs,
    _floor,
    _ip_list,
    _provider,
    _Task,
)
from nextcrm_sandbox.billionmail.wire import (
    _DAY,
    CONTROL_PREFIX,
    LOGIN_RETRY_WINDOW,
    PREFIX,
    SESSION_COOKIE,
    SESSION_TTL,
    ApiError,
    _ok,
    _Rule,
    _to_int,
    _to_int_list,
    _to_str,
    _to_str_list,
    _TokenError,
    _validate,
)
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


def _attribute_text(value: Any) -> str:
    """An attribute value as ``EditContacts`` stores it: text, integral numbers without a fraction, JSON otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    return orjson.dumps(value).decode()


def _pct(n: int, of: int) -> float | int:
    """``public.Round(n/of*100, 2)`` as Go encodes a float64: integral values without a fraction."""
    value = round(n / of * 100, 2) if of else 0.0
    return int(value) if value.is_integer() else value


_JSON_HEADERS = {"content-type": "application/json", "server": "nginx"}
# Paths SafePath and the console IP whitelist skip (``cmd.go`` excludesURIs, ``ip_whitelist.go``
# ExcludedPaths), limited to the served ones; the JWT-exempt paths are the endpoints with auth "none"/"apikey".
_GATE_EXEMPT = frozenset({"/api/batch_mail/api/send", "/api/batch_mail/api/batch_send", "/api/languages/get"})


# ---------------------------------------------------------------------------------------------------------
# Faults and the sandbox
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Faults:
    server_errors: int = 0
    latency_ms: float = 0.0
    envelope_errors: int = 0
    envelope_error_code: int = 500
    envelope_error_msg: str = "Unknown error"
    send_failures: int = 0
    # Answers of a reverse proxy's request limit in front of the install (nginx ``limit_req`` with
    # ``limit_req_status 429``): BillionMail itself limits nothing.
    proxy_rate_limited: int = 0
    # Requests the install carries out whose answer the reverse proxy replaces with its 504 (the upstream
    # answered too late): the write happened, the client cannot know.
    gateway_timeouts: int = 0
    # Only requests to this route ("POST /api/batch_mail/task/create") meet the faults; None: every request.
    route: str | None = None

    def active(self) -> bool:
        counts = (self.server_errors, self.envelope_errors, self.send_failures, self.proxy_rate_limited,
                  self.gateway_timeouts)  # fmt: skip
        return bool(self.latency_ms or any(counts))

    def meets(self, route: str | None) -> bool:
        """Whether a request to ``route`` (None: not known) meets these faults."""
        return self.route is None or route is None or self.route == route


_FAULT_FIELDS = frozenset(
    {
        "account",
        "server_errors",
        "rate_limited",
        "latency_ms",
        "envelope_errors",
        "envelope_error_code",
        "envelope_error_msg",
        "send_failures",
        "proxy_rate_limited",
        "gateway_timeouts",
        "route",
    }
)
# What nginx answers when a ``limit_req`` zone refuses a request (with ``limit_req_status 429``).
_NGINX_429 = (
    b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    b"<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
# What nginx answers when the upstream does not answer within ``proxy_read_timeout``.
_NGINX_504 = (
    b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
_control = partial(control_endpoint, bad_request=(TypeError, ValueError))
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_ACCOUNT_FIELDS = frozenset(
    {"id", "username", "password", "api_key", "seed", "campaigns", "contacts", "groups", "days", "knobs", *_KNOB_NAMES}
)
_CHANGE_FIELDS = (
    "creates",
    "edits",
    "deletes",
    "progress",
    "contact_creates",
    "contact_unsubscribes",
    "contact_deletes",
)
_ENTITIES = {
    "campaign": "campaigns",
    "campaigns": "campaigns",
    "task": "campaigns",
    "tasks": "campaigns",
    "contact": "contacts",
    "contacts": "contacts",
    "group": "groups",
    "groups": "groups",
    "api_key": "api_keys",
    "api_keys": "api_keys",
    "api_mail": "api_mails",
    "api_mails": "api_mails",
}


@dataclass(frozen=True, slots=True)
class _Endpoint:
    method: str
    path: str
    auth: str  # "jwt", "none" or "apikey"
    handler: Callable[[BillionMailInstall, dict[str, Any], Request, int], Any]


class BillionMailSandbox:
    """BillionMail API emulator state and routes, on the shared sandbox clock."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.installs: dict[str, BillionMailInstall] = {}
        self._lock = threading.Lock()
        self._faults: dict[str | None, _Faults] = {}
        self.stats: Counter[str] = Counter()
        self.by_route: Counter[str] = Counter()
        self.by_status: Counter[str] = Counter()
        self.by_code: Counter[str] = Counter()
        self._endpoints = {(e.method, e.path): e for e in self._endpoint_table()}

    # --- installs --------------------------------------------------------------------------------------

    def install(self, account_id: str) -> BillionMailInstall | None:
        """The installation with this id, if any."""
        return self.installs.get(account_id)

    @staticmethod
    def normalise_spec(body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate an account spec and fill in the defaults."""
        unknown = set(body) - _ACCOUNT_FIELDS
        if unknown:
            raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
        username = body.get("username", "admin")
        password = body.get("password", "billionmail")
        if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
            raise ControlError(400, "username and password must be non-empty strings")
        api_key = body.get("api_key")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ControlError(400, "api_key must be a non-empty string")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ControlError(400, "seed must be an integer")
        contacts = int_field(body, "contacts", 500)
        groups_default = min(12, max(3, contacts // 400))
        days = number_field(body, "days", 90)
        if days <= 0:
            raise ControlError(400, "days must be > 0")
        if not isinstance(body.get("knobs") or {}, dict):
            raise ControlError(400, "knobs must be an object")
        knob_body = dict(body.get("knobs") or {})
        unknown_knobs = set(knob_body) - set(_KNOB_NAMES)
        if unknown_knobs:
            raise ControlError(400, f"unknown knobs: {sorted(unknown_knobs)}")
        knob_body.update({k: body[k] for k in _KNOB_NAMES if k in body})
        knobs = _apply_knobs(Knobs(), knob_body)
        digest = hashlib.sha256(f"{seed}:{username}:{password}".encode()).hexdigest()[:12]
        account_id = body.get("id") or f"bm{digest}"
        if not isinstance(account_id, str) or "/" in account_id:
            raise ControlError(400, "id must be a string without '/'")
        return {
            "id": account_id,
            "username": username,
            "password": password,
            "api_key": api_key,
            "seed": seed,
            "campaigns": int_field(body, "campaigns", 50),
            "contacts": contacts,
            "groups": int_field(body, "groups", groups_default, 1),
            "days": days,
            "knobs": knobs,
        }

    def add_account(self, body: Mapping[str, Any]) -> BillionMailInstall:
        """Generate an installation from a spec and serve it (replacing one with the same id)."""
        inst = BillionMailInstall(self.normalise_spec(body), now=self.clock())
        with self._lock:
            self.installs[inst.id] = inst
        return inst

    def summary(self, inst: BillionMailInstall) -> dict[str, Any]:
        """What the control API answers about an installation."""
        api = next(iter(inst.api_keys.values()), None)
        return {
            "id": inst.id,
            "base_path": f"{PREFIX}/{inst.id}",
            "username": inst.username,
            "api_key": api.api_key if api else None,
            "counts": inst.counts(),
            "template_ids": sorted(inst.templates),
            "group_ids": sorted(inst.groups),
            "knobs": asdict(inst.knobs),
        }

    # --- routing ----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """API routes under ``/billionmail/{account}/...`` and control routes under ``/_sandbox/billionmail``."""
        control = CONTROL_PREFIX
        methods = list(_METHODS)
        return [
            Route(f"{control}/accounts", self._control_accounts, methods=["GET", "POST"]),
            Route(f"{control}/accounts/{{account}}", self._control_account, methods=["GET", "DELETE"]),
            Route(f"{control}/accounts/{{account}}/changes", self._control_changes, methods=["POST"]),
            Route(f"{control}/accounts/{{account}}/records", self._control_records, methods=["POST"]),
            Route(f"{control}/accounts/{{account}}/export/{{entity}}", self._control_export, methods=["GET"]),
            Route(f"{control}/accounts/{{account}}/expire-tokens", self._control_expire, methods=["POST"]),
            Route(f"{control}/accounts/{{account}}/captchas", self._control_captchas, methods=["GET"]),
            Route(f"{control}/accounts/{{account}}/knobs", self._control_knobs, methods=["POST"]),
            Route(f"{control}/faults", self._control_faults, methods=["POST", "DELETE"]),
            Route(f"{control}/stats", self._control_stats, methods=["GET"]),
            Route(f"{PREFIX}/{{account}}", self._serve, methods=methods),
            Route(f"{PREFIX}/{{account}}/{{rest:path}}", self._serve, methods=methods),
        ]

    def _endpoint_table(self) -> list[_Endpoint]:
        e = _Endpoint
        return [
            e("POST", "/api/login", "none", self._login),
            e("POST", "/api/refresh-token", "none", self._refresh),
            e("GET", "/api/get_validate_code", "none", self._validate_code),
            e("POST", "/api/logout", "jwt", self._logout),
            e("GET", "/api/batch_mail/task/list", "jwt", self._task_list),
            e("GET", "/api/batch_mail/task/find", "jwt", self._task_find),
            e("GET", "/api/batch_mail/task/overview", "jwt", self._task_overview),
            e("GET", "/api/batch_mail/task/stat_chart", "jwt", self._task_stat_chart),
            e("GET", "/api/batch_mail/tracking/logs", "jwt", self._tracking_logs),
            e("POST", "/api/batch_mail/task/create", "jwt", self._task_create),
            e("POST", "/api/batch_mail/task/update", "jwt", self._task_update),
            e("POST", "/api/batch_mail/task/delete", "jwt", self._task_delete),
            e("POST", "/api/batch_mail/task/pause", "jwt", self._task_pause),
            e("POST", "/api/batch_mail/task/resume", "jwt", self._task_resume),
            e("GET", "/api/contact/group/list", "jwt", self._group_list),
            e("GET", "/api/contact/group/all", "jwt", self._group_all),
            e("POST", "/api/contact/group/create", "jwt", self._group_create),
            e("POST", "/api/contact/group/import", "jwt", self._group_import),
            e("GET", "/api/contact/group/info", "jwt", self._group_info),
            e("POST", "/api/contact/group/update", "jwt", self._group_update),
            e("POST", "/api/contact/group/delete", "jwt", self._group_delete),
            e("POST", "/api/contact/group/contact_count", "jwt", self._group_contact_count),
            e("GET", "/api/contact/list", "jwt", self._contact_list),
            e("POST", "/api/contact/edit", "jwt", self._contact_edit),
            e("POST", "/api/contact/delete", "jwt", self._contact_delete),
            e("POST", "/api/batch_mail/api/send", "apikey", self._api_send),
            e("POST", "/api/batch_mail/api/batch_send", "apikey", self._api_batch_send),
        ]

    def _count(self, inst: BillionMailInstall | None, route: str, status: int, code: int | None = None) -> None:
        self.stats["requests"] += 1
        self.by_route[route] += 1
        self.by_status[str(status)] += 1
        if code is not None:
            self.by_code[str(code)] += 1
        if inst is not None:
            inst.stats["requests"] += 1
            if code == 401:
                inst.stats["unauthorized"] += 1

    def _envelope(self, inst: BillionMailInstall, route: str, payload: Mapping[str, Any], **headers: str) -> Response:
        self._count(inst, route, 200, int(payload.get("code", 0)))
        return Response(orjson.dumps(payload), status_code=200, headers={**_JSON_HEADERS, **headers})

    def _plain(
        self, inst: BillionMailInstall | None, route: str, status: int, body: bytes = b"", **headers: str
    ) -> Response:
        self._count(inst, route, status)
        return Response(body, status_code=status, headers={"server": "nginx", **headers})

    def _fault_for(self, account: str, route: str | None = None) -> _Faults | None:
        for key in (account, None):
            f = self._faults.get(key)
            if f is not None and f.active() and f.meets(route):
                return f
        return None

    @staticmethod
    def client_ip(request: Request, inst: BillionMailInstall) -> str:
        """``GetClientIp``: X-Forwarded-For, then X-Real-IP, then the install's view of the peer."""
        forwarded = request.headers.get("x-forwarded-for", "")
        if forwarded.strip():
            return forwarded.split(",")[0].strip()
        real = request.headers.get("x-real-ip", "").strip()
        if real:
            return real
        if inst.knobs.client_ip:
            return inst.knobs.client_ip
        return request.client.host if request.client else "127.0.0.1"

    async def _serve(self, request: Request) -> Response:
        account = request.path_params["account"]
        path = "/" + request.path_params.get("rest", "")
        inst = self.installs.get(account)
        if inst is None:
            return self._plain(None, f"{request.method} (no install)", 404)
        faults = self._fault_for(account, f"{request.method} {path}")
        if faults is not None:
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            if faults.server_errors > 0:
                faults.server_errors -= 1
                return self._plain(
                    inst, f"{request.method} {path}", 500, b"Internal Server Error", **{"content-type": "text/plain"}
                )
            if faults.proxy_rate_limited > 0:
                faults.proxy_rate_limited -= 1
                return self._plain(inst, f"{request.method} {path}", 429, _NGINX_429, **{"content-type": "text/html"})
        now = self.clock()
        knobs = inst.knobs
        base = f"{PREFIX}/{inst.id}"
        is_api = path.startswith("/api/")
        sid = request.cookies.get(SESSION_COOKIE) or request.headers.get(SESSION_COOKIE)
        # HookBeforeServe: SafePath (a visit to it starts the session, then the static handler redirects).
        visited = knobs.safe_path is not None and path == f"/{knobs.safe_path}"
        if visited:
            sid = secrets.token_hex(16)
            inst.sessions[sid] = (True, now + SESSION_TTL)
        elif knobs.safe_path is not None and is_api and path not in _GATE_EXEMPT and not inst.session_passed(sid, now):
            denied = {"success": False, "code": 404, "msg": "access denied", "data": None}
            return self._envelope(inst, f"{request.method} {path}", denied)
        # Global console IP whitelist (the ``s.Use`` middleware, after the hook).
        if knobs.ip_whitelist is not None and path not in _GATE_EXEMPT:
            ip = self.client_ip(request, inst)
            if ip not in {*knobs.ip_whitelist, "127.0.0.1", "::1"}:
                return self._plain(
                    inst, f"{request.method} {path}", 403, b"IP not allowed", **{"content-type": "text/plain"}
                )
        if visited:
            cookie = f"{SESSION_COOKIE}={sid}; Path={base}; Max-Age={SESSION_TTL}; HttpOnly"
            return self._plain(inst, "GET /{safe_path}", 302, location=f"{base}/", **{"set-cookie": cookie})
        if not is_api:
            if knobs.safe_path is not None and not inst.session_passed(sid, now):
                return self._plain(inst, f"{request.method} (static)", 404)
            page = b"<!doctype html><html><head><title>BillionMail</title></head><body><div id=app></div></body></html>"
            return self._plain(
                inst, f"{request.method} (static)", 200, page, **{"content-type": "text/html; charset=utf-8"}
            )
        endpoint = self._endpoints.get((request.method, path))
        if endpoint is None:
            return self._plain(inst, f"{request.method} (unknown)", 404)
        route = f"{endpoint.method} {endpoint.path}"
        if faults is not None and faults.envelope_errors > 0:
            faults.envelope_errors -= 1
            err = ApiError(faults.envelope_error_code, faults.envelope_error_msg)
            return self._envelope(inst, route, err.envelope())
        if endpoint.auth == "jwt":
            header = request.headers.get("authorization", "")
            if not header:
                return self._envelope(
                    inst, route, {"success": False, "code": 401, "msg": "no authorization", "data": None}
                )
            try:
                inst.parse(header, now)
            except _TokenError:
                return self._envelope(inst, route, {"success": False, "code": 401, "msg": "", "data": None})
        try:
            params = await self._params(request)
            result = endpoint.handler(inst, params, request, now)
            if asyncio.iscoroutine(result):
                result = await result
        except ApiError as err:
            result = err.envelope()
        if faults is not None and faults.gateway_timeouts > 0:
            faults.gateway_timeouts -= 1
            return self._plain(inst, route, 504, _NGINX_504, **{"content-type": "text/html"})
        return self._envelope(inst, route, result)

    @staticmethod
    async def _params(request: Request) -> dict[str, Any]:
        """Query parameters merged with a JSON or form body, as GoFrame's request parsing does."""
        params: dict[str, Any] = {}
        for key, value in request.query_params.multi_items():
            if key.endswith("[]"):
                params.setdefault(key[:-2], []).append(value)
            else:
                params[key] = value
        raw = await request.body()
        if raw.strip():
            text = raw.decode("utf-8", "replace").strip()
            if text.startswith("{"):
                try:
                    body = orjson.loads(text)
                except orjson.JSONDecodeError:
                    body = None
                if isinstance(body, dict):
                    params.update(body)
            else:
                for key, value in parse_qsl(text, keep_blank_values=True):
                    if key.endswith("[]"):
                        params.setdefault(key[:-2], []).append(value)
                    else:
                        params[key] = value
        return params

    # --- auth endpoints -----------------------------------------------------------------------------------

    def _login(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(
            p,
            [
                _Rule("username", required=True, message="Username cannot be empty"),
                _Rule("password", required=True, message="Password cannot be empty"),
                _Rule("validate_code_id", min_length=1),
                _Rule("validate_code", min_length=1),
            ],
        )
        knobs = inst.knobs
        ip = self.client_ip(request, inst)
        failures = inst.failures(ip, now)
        retries = failures or 0
        inst.stats["logins"] += 1

        def failed() -> None:
            inst.retries[ip] = (retries + 1, now + LOGIN_RETRY_WINDOW)
            inst.stats["login_failures"] += 1

        if retries >= knobs.max_login_retries > 0:
            release = inst.release.get(ip)
            if release is None or release[1] <= now:
                release = (now + knobs.login_block_seconds, now + knobs.login_block_seconds)
                inst.release[ip] = release
            failed()
            raise ApiError(500, f"Login failed too many times, please try again after {release[0] - now} seconds")
        if failures is not None and knobs.captcha_after_failures and retries >= knobs.captcha_after_failures:
            cid, answer = _to_str(p.get("validate_code_id")), _to_str(p.get("validate_code"))
            if not cid or not answer:
                raise ApiError(500, "Validation code ID and code cannot be empty")
            if not inst.verify_captcha(cid, answer, now):
                raise ApiError(500, "Invalid validation code")
        if _to_str(p.get("username")) != inst.username:
            failed()
            raise ApiError(500, "Invalid username or password: sql: no rows in result set")
        if _to_str(p.get("password")) != inst.password:
            failed()
            raise ApiError(
                500, "Invalid username or password: crypto/bcrypt: hashedPassword is not the hash of the given password"
            )
        inst.retries.pop(ip, None)
        token = inst.issue("access_token", knobs.token_ttl, now, ["admin"])
        refresh = inst.issue("refresh_token", knobs.refresh_ttl, now, None)
        return _ok(
            "Login successful",
            {
                "token": token,
                "refreshToken": refresh,
                "ttl": knobs.token_ttl,
                "accountInfo": {
                    "id": 1,
                    "username": inst.username,
                    "email": f"{inst.username}@{inst.domain}",
                    "status": 1,
                    "lang": "en",
                },
            },
        )

    def _refresh(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("refreshToken", required=True, message="Refresh token cannot be empty")])
        inst.stats["refreshes"] += 1
        old = _to_str(p["refreshToken"])
        try:
            inst.parse(old, now)
        except _TokenError as err:
            inst.stats["refresh_failures"] += 1
            raise ApiError(500, str(err)) from None
        knobs = inst.knobs
        token = inst.issue("access_token", knobs.token_ttl, now, [])
        refresh = inst.issue("refresh_token", knobs.refresh_ttl, now, None) if knobs.refresh_rotates else old
        return _ok("Token refreshed successfully", {"token": token, "refreshToken": refresh, "ttl": knobs.refresh_ttl})

    def _validate_code(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        ip = self.client_ip(request, inst)
        failures = inst.failures(ip, now)
        cid, answer = inst.new_captcha(now)
        image = base64.b64encode(f"captcha:{len(answer)}".encode()).decode()
        must = (
            failures is not None
            and bool(inst.knobs.captcha_after_failures)
            and failures >= inst.knobs.captcha_after_failures
        )
        return _ok(
            "Success",
            {
                "mustValidateCode": must,
                "loginRetries": failures or 0,
                "maxLoginRetries": inst.knobs.max_login_retries,
                "validateCodeBase64": f"data:image/png;base64,{image}",
                "validateCodeId": cid,
            },
        )

    def _logout(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        header = request.headers.get("authorization", "")
        try:
            claims = inst.parse(header, now)
        except _TokenError as err:
            raise ApiError(500, str(err)) from None
        record = inst.tokens.get(str(claims.get("jti")))
        if record is not None:
            record.revoked = True
        return _ok("Logout successful")

    # --- campaign endpoints -----------------------------------------------------------------------------------

    def _task_list(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("page", required=True, min=1), _Rule("page_size", required=True, min=1)])
        page, size = _to_int(p["page"]), _to_int(p["page_size"])
        keyword = _to_str(p.get("keyword"))
        status = _to_int(p.get("status"), -1)
        rows = inst.ordered_tasks(keyword)
        if status != -1:
            rows = [t for t in rows if t.process(now) == status]
        chunk = rows[(page - 1) * size : page * size]
        return _ok(
            "Task list retrieved successfully", {"total": len(rows), "list": [inst.task_detail(t, now) for t in chunk]}
        )

    @staticmethod
    def _task_or_404(inst: BillionMailInstall, task_id: int, data: Any = None) -> _Task:
        task = inst.tasks.get(task_id)
        if task is None:
            raise ApiError(404, f"Task not found: {task_id}", data)
        return task

    def _task_find(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("id", required=True)])
        task = self._task_or_404(inst, _to_int(p["id"]))
        return _ok("Success", inst.task_entity(task, now))

    @staticmethod
    def _window(task: _Task, start: int, upto: int) -> tuple[int, int]:
        """Sends with a log time in ``[start, upto]`` (start 0 = from the first) as (sent before, sent by upto)."""
        lo = task.sent(start - 1) if start > 0 else 0
        return lo, max(lo, task.sent(upto))

    @staticmethod
    def _rates(sends: int, delivered: int, bounced: int, opened: int, clicked: int) -> dict[str, Any]:
        def pct(n: int) -> float:
            return _pct(n, sends)

        return {
            "sends": sends,
            "delivered": delivered,
            "bounced": bounced,
            "opened": opened,
            "clicked": clicked,
            "delivery_rate": pct(delivered),
            "bounce_rate": pct(bounced),
            "open_rate": pct(opened),
            "click_rate": pct(clicked),
        }

    def _task_overview(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        start, end = _to_int(p.get("start_time")), _to_int(p.get("end_time"))
        if start > 0 and end < 0:
            end = now
        sends = delivered = bounced = opened = clicked = 0
        horizon = min(end, now) if end > 0 else now
        for task in inst.tasks.values():
            lo, hi = self._window(task, start, horizon)
            d_lo, b_lo, _ = task.split(lo)
            d_hi, b_hi, _ = task.split(hi)
            sends += hi - lo
            delivered += d_hi - d_lo
            bounced += b_hi - b_lo
            # The opened/clicked queries bound log_time_millis by [start, end] * 1000 even when end is 0.
            if end > 0:
                opened += task.opened(d_hi) - task.opened(d_lo)
                clicked += task.clicked(d_hi) - task.clicked(d_lo)
        return _ok("Success", self._rates(sends, delivered, bounced, opened, clicked))

    def _task_stat_chart(
        self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int
    ) -> dict[str, Any]:
        _validate(
            p, [_Rule("task_id", required=True), _Rule("start_time", required=True), _Rule("end_time", required=True)]
        )
        empty = {
            k: None
            for k in (
                "dashboard",
                "mail_providers",
                "send_mail_chart",
                "bounce_rate_chart",
                "open_rate_chart",
                "click_rate_chart",
            )
        }
        task = self._task_or_404(inst, _to_int(p["task_id"]), empty)
        start, end = _to_int(p["start_time"]), _to_int(p["end_time"])
        if start > 0 and end < 0:
            end = now
        if start > end:
            raise ApiError(500, "end_time must greater than start_time")
        domain = _to_str(p.get("domain"))
        upto = min(end, now) if end > 0 else now
        lo, hi = self._window(task, start, upto)
        ks = [k for k in range(lo, hi) if not domain or task.recipients[k].endswith("@" + domain)]
        cats = Counter(task.category(k) for k in ks)
        delivered, bounced = cats["sent"], cats["bounced"]
        opened, clicked = _floor(delivered * task.open_rate), _floor(delivered * task.click_rate)
        dashboard = self._rates(len(ks), delivered, bounced, opened, clicked)
        providers: dict[str, list[int]] = {}
        for k in ks:
            slot = providers.setdefault(_provider(task.recipients[k])[0], [0, 0, 0])
            slot[0] += 1
            cat = task.category(k)
            slot[1 if cat == "sent" else 2] += cat != "deferred"
        mail_providers = []
        for name, (sends, dlv, bnc) in sorted(providers.items()):
            mail_providers.append(
                {
                    "mail_provider": name,
                    **self._rates(sends, dlv, bnc, _floor(dlv * task.open_rate), _floor(dlv * task.click_rate)),
                }
            )
        hourly = end - start < _DAY
        step = 3600 if hourly else _DAY
        first = start - start % step if hourly else start
        buckets: dict[int, list[int]] = {}
        for k in ks:
            at = int(task.send_time(k))
            x = first + (at - first) // step * step
            slot = buckets.setdefault(x, [0, 0, 0])
            slot[0] += 1
            cat = task.category(k)
            slot[1] += cat == "sent"
            slot[2] += cat == "bounced"
        # Hourly charts have 24 slots from the start hour (25 when the window straddles one); daily ones a slot a day.
        last = max(first + 23 * step, end) if hourly else (end if end > 0 else upto)
        xs = range(first, last + 1, step)
        send_data, bounce_data, open_data, click_data = [], [], [], []
        for x in xs:
            sends, dlv, bnc = buckets.get(x, [0, 0, 0])
            send_data.append({"x": x, "sends": sends, "delivered": dlv, "failed": sends - dlv})
            bounce_data.append({"x": x, "bounce_rate": _pct(bnc, sends)})
            open_data.append({"x": x, "open_rate": _pct(_floor(dlv * task.open_rate), sends)})
            click_data.append({"x": x, "click_rate": _pct(_floor(dlv * task.click_rate), sends)})
        column = "hourly" if hourly else "daily"
        failed = len(ks) - delivered
        send_dashboard = {
            "sends": len(ks),
            "delivered": delivered,
            "failed": failed,
            "delivery_rate": _pct(delivered, len(ks)),
            "failure_rate": _pct(failed, len(ks)),
        }
        return _ok(
            "Task statistics retrieved successfully",
            {
                "dashboard": dashboard,
                "mail_providers": mail_providers,
                "send_mail_chart": {"column_type": column, "dashboard": send_dashboard, "data": send_data},
                "bounce_rate_chart": {"column_type": column, "data": bounce_data},
                "open_rate_chart": {"column_type": column, "data": open_data},
                "click_rate_chart": {"column_type": column, "data": click_data},
            },
        )

    def _tracking_logs(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("task_id", required=True)])
        task = self._task_or_404(inst, _to_int(p["task_id"]), {"total": 0, "list": None})
        # ``status`` has no default: omitted means 0, i.e. bounced rows only; 1 = delivered; anything else = all.
        status = _to_int(p.get("status"), 0)
        domain = _to_str(p.get("domain"))
        page = _to_int(p.get("page")) or 1
        size = _to_int(p.get("page_size")) or 20
        if page <= 0:
            page = 1
        if size <= 0:
            size = 20
        wanted = {1: "sent", 0: "bounced"}.get(status)
        matches: list[int] = []
        for k in range(task.sent(now) - 1, -1, -1):
            if wanted is not None and task.category(k) != wanted:
                continue
            if domain and not task.recipients[k].endswith("@" + domain):
                continue
            matches.append(k)
        chunk = matches[(page - 1) * size : page * size]
        return _ok(
            "Task mail logs retrieved successfully",
            {"total": len(matches), "list": [inst.log_row(task, k) for k in chunk]},
        )

    def _task_create(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        if "group_ids" not in p and "group_id" in p:
            p = {**p, "group_ids": _to_int_list(p["group_id"])}
        _validate(
            p,
            [
                _Rule("addresser", required=True),
                _Rule("subject", required=True),
                _Rule("template_id", required=True),
                _Rule("group_ids", required=True),
                _Rule("is_record", choices=(0, 1)),
                _Rule("unsubscribe", choices=(0, 1)),
                _Rule("threads", min=0),
                _Rule("track_open", choices=(0, 1)),
                _Rule("track_click", choices=(0, 1)),
                _Rule("start_time", required=True),
                _Rule("warmup", choices=(0, 1)),
            ],
        )
        group_ids = [g for g in _to_int_list(p["group_ids"]) if g]
        if not group_ids:
            raise ApiError(500, "Must select a contact group")
        template_id = _to_int(p["template_id"])
        if template_id not in inst.templates:
            raise ApiError(400, "Template not found", {"id": 0})
        # Groups without confirmed subscribers (or that do not exist) give a task without recipients.
        recipients = inst._snapshot(group_ids)
        task = inst.create_task(
            now=now,
            addresser=_to_str(p["addresser"]),
            subject=_to_str(p["subject"]),
            full_name=_to_str(p.get("full_name")),
            template_id=template_id,
            group_ids=group_ids,
            start_time=_to_int(p["start_time"]),
            threads=_to_int(p.get("threads"), 5),
            is_record=_to_int(p.get("is_record"), 1),
            unsubscribe=_to_int(p.get("unsubscribe"), 1),
            track_open=_to_int(p.get("track_open"), 1),
            track_click=_to_int(p.get("track_click"), 1),
            warmup=_to_int(p.get("warmup"), 0),
            remark=_to_str(p.get("remark")),
            recipients=recipients,
        )
        return _ok("Task created successfully", {"id": task.id})

    def _task_update(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("task_id", required=True)])
        task = inst.tasks.get(_to_int(p["task_id"]))
        if task is None:
            raise ApiError(0, "The task does not exist.")
        if task.process(now) == 1 and task.pause == 0:
            raise ApiError(0, "The task is currently running. Please pause the task first.")
        # Unset 0/1 fields read as 0 and are written as such, exactly like the handler does.
        if _to_int(p.get("unsubscribe")) in (0, 1):
            task.unsubscribe = _to_int(p.get("unsubscribe"))
        if _to_int(p.get("warmup")) in (0, 1):
            task.warmup = _to_int(p.get("warmup"))
        for name in ("addresser", "subject", "full_name", "remark"):
            value = _to_str(p.get(name))
            if value:
                setattr(task, name, value)
        if _to_int(p.get("template_id")) > 0:
            task.template_id = _to_int(p["template_id"])
        if _to_int(p.get("threads")) > 0:
            task.threads = _to_int(p["threads"])
        if _to_int(p.get("start_time")) > 0:
            task.start_time = _to_int(p["start_time"])
        inst.edit_task(task, now)
        if not _to_str(p.get("subject")):
            # The handler logs updateData["subject"].(string): without a subject that panics after the update.
            raise ApiError(500, "interface conversion: interface {} is nil, not string")
        return _ok("Task update successful")

    def _task_delete(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("id", required=True)])
        inst.delete_task(_to_int(p["id"]))
        return _ok("Task deleted successfully")

    def _task_pause(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("task_id", required=True)])
        task = self._task_or_404(inst, _to_int(p["task_id"]))
        state = task.process(now)
        if task.pause == 1 and state == 3:
            return _ok("Task is already paused")
        if state != 1:
            text = {0: "not started", 2: "already completed"}.get(state, "in unknown state")
            raise ApiError(400, f"Cannot pause task because it is {text}")
        inst.pause_task(task, now)
        return _ok("Task paused successfully")

    def _task_resume(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("task_id", required=True)])
        task = self._task_or_404(inst, _to_int(p["task_id"]))
        state = task.process(now)
        if state not in (1, 3):
            text = {0: "not started", 2: "already completed"}.get(state, "in unknown state")
            raise ApiError(400, f"Cannot resume task because it is {text}")
        if task.pause == 0:
            return _ok("Task is already running")
        inst.resume_task(task, now)
        return _ok("Task resumed successfully")

    # --- contact endpoints ----------------------------------------------------------------------------------

    def _group_list(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(p, [_Rule("page", required=True, min=1), _Rule("page_size", required=True, min=1)])
        page, size = _to_int(p["page"]), _to_int(p["page_size"])
        keyword = _to_str(p.get("keyword")).strip()
        rows = [g for g in inst.groups.values() if not keyword or keyword in g.name or keyword in g.description]
        rows.sort(key=lambda g: (g.create_time, g.id), reverse=True)
        chunk = rows[(page - 1) * size : page * size]
        return _ok(
            "Group list retrieved successfully", {"total": len(rows), "list": [inst.group_view(g) for g in chunk]}
        )

    def _group_all(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        keyword = _to_str(p.get("keyword")).strip()
        rows = [inst.group_entity(g) for g in inst.groups.values() if not keyword or keyword in g.name]
        return _ok("Success", {"list": rows})

    def _group_info(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        """``GetGroupInfo``: the group with its subscribe link and sender (no counts: the list has those)."""
        _validate(p, [_Rule("group_id", required=True)])
        group = inst.groups.get(_to_int(p["group_id"]))
        if group is None:
            raise ApiError(404, "Group not found")
        host = str(request.base_url).rstrip("/")
        view = inst.group_entity(group)
        defaults = {
            "welcome_subject": "Welcome Aboard!",
            "confirm_subject": "Confirm Your Subscription",
            "success_url": f"{host}/subscribe_success.html",
            "confirm_url": f"{host}/subscribe_confirm.html",
            "already_url": f"{host}/already_subscribed.html",
        }
        view.update({k: v for k, v in defaults.items() if not view.get(k)})
        return _ok(
            "Group info retrieved successfully",
            {
                **view,
                "total_count": 0,
                "active_count": 0,
                "unsubscribe_count": 0,
                "subscribe_link": f"{host}/subscribe_form.html?token={group.token}",
                "sender": f"noreply@{inst.domain}",
            },
        )

    def _group_update(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        """``UpdateGroup``: name and description when given, ``double_optin`` always (0 when absent); a missing
        group is updated without error, as the source does (its lookup error is only ``sql.ErrNoRows``)."""
        _validate(p, [_Rule("group_id", required=True), _Rule("double_optin", choices=(0, 1))])
        gid = _to_int(p["group_id"])
        name = _to_str(p.get("name"))
        changes: dict[str, Any] = {"double_optin": _to_int(p.get("double_optin"))}
        if name:
            if any(g.name == name and g.id != gid for g in inst.groups.values()):
                raise ApiError(
                    500,
                    "Failed to update group: ERROR: duplicate key value violates unique constraint "
                    '"bm_contact_groups_name_key" (SQLSTATE 23505)',
                )
            changes["name"] = name
        if _to_str(p.get("description")):
            changes["description"] = _to_str(p["description"])
        inst.update_group(gid, changes, now)
        return _ok("Group updated successfully")

    def _group_delete(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        """``DeleteGroup``: each group with its contacts; ids that name no group count as failed."""
        _validate(p, [_Rule("group_ids", required=True)])
        done = failed = 0
        for gid in _to_int_list(p["group_ids"]):
            if inst.delete_group(gid):
                done += 1
            else:
                failed += 1
        data = {"success_count": done, "failed_count": failed}
        if not done and not failed:
            raise ApiError(400, "No groups were deleted", data)
        return _ok("Groups deleted successfully", data)

    def _group_contact_count(
        self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int
    ) -> dict[str, Any]:
        """``GetGroupContactCount``: distinct subscribed addresses (``active`` 1, confirmed or not) in the groups."""
        _validate(p, [_Rule("group_ids", required=True)])
        group_ids = set(_to_int_list(p["group_ids"]))
        if not group_ids:
            raise ApiError(400, "Group IDs cannot be empty", {"total": 0})
        emails = {row.email for row in inst.contacts.values() if row.group_id in group_ids and row.active == 1}
        return _ok("Successfully retrieved contact count", {"total": len(emails)})

    def _group_create(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(
            p,
            [
                _Rule("file_type", choices=("csv", "excel", "txt")),
                _Rule("create_type", required=True, choices=(1, 2, 3)),
                _Rule("double_optin", choices=(0, 1)),
            ],
        )
        create_type = _to_int(p["create_type"])
        if create_type in (1, 2):
            name = _to_str(p.get("name"))
            if any(g.name == name for g in inst.groups.values()):
                raise ApiError(400, "The group name already exists")
            group = inst._add_group(name, _to_str(p.get("description")), now)
            group.double_optin = _to_int(p.get("double_optin"))
        else:
            gid = _to_int(p.get("group_id"))
            if gid <= 0:
                raise ApiError(400, "Group ID is required for importing to existing group")
            if gid not in inst.groups:
                raise ApiError(400, f"Group {gid} does not exist")
            group = inst.groups[gid]
        if create_type in (2, 3):
            text = _to_str(p.get("file_data"))
            if not text:
                if create_type == 2:
                    return _ok("Group created successfully")
                raise ApiError(400, "File content cannot be empty")
            if not self._import_lines(inst, [group.id], text, 1, now, count_only=True):
                raise ApiError(400, "No valid contacts found in file")
            self._import_lines(inst, [group.id], text, 1, now)
        message = {
            1: "Group created successfully",
            2: "Group created and contacts imported successfully",
            3: "Contacts imported to existing group successfully",
        }
        return _ok(message[create_type])

    @staticmethod
    def _import_lines(
        inst: BillionMailInstall,
        group_ids: Sequence[int],
        text: str,
        status: int,
        now: int,
        *,
        count_only: bool = False,
    ) -> int:
        """Insert ``email[,status]`` lines into each group, skipping (email, group) pairs that exist."""
        parsed: list[tuple[str, int]] = []
        for line in text.strip().split("\n"):
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            email = parts[0].strip()
            active = 0 if len(parts) > 1 and parts[1].strip() == "0" else 1
            if email:
                parsed.append((email, active))
        if count_only:
            return len(parsed)
        count = 0
        for gid in group_ids:
            for email, active in parsed:
                if any(inst.contacts[r].group_id == gid for r in inst.by_email.get(email, ())):
                    continue
                inst._insert_contact(email, gid, active, status, now, {})
                count += 1
        return count

    def _group_import(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        _validate(
            p,
            [
                _Rule("group_ids", required=True),
                _Rule("import_type", required=True, choices=(1, 2)),
                _Rule("default_active", choices=(0, 1)),
                _Rule("status", choices=(0, 1)),
                _Rule("overwrite", choices=(0, 1)),
            ],
        )
        data = {"imported_count": 0}
        group_ids = _to_int_list(p["group_ids"])
        for gid in group_ids:
            if gid not in inst.groups:
                raise ApiError(400, f"Group {gid} does not exist", data)
        text = _to_str(p.get("file_data") if _to_int(p["import_type"]) == 1 else p.get("contacts"))
        if not text:
            which = "File content" if _to_int(p["import_type"]) == 1 else "Contacts content"
            raise ApiError(400, f"{which} cannot be empty", data)
        if not any(line.split(",")[0].strip() for line in text.strip().split("\n")):
            raise ApiError(400, "No valid contacts found", data)
        count = self._import_lines(inst, group_ids, text, _to_int(p.get("status")), now)
        return _ok(f"Successfully imported {count} contacts", {"imported_count": count})

    def _contact_list(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        rules = [_Rule("page", required=True, min=1), _Rule("page_size", required=True, min=1)]
        rules.append(_Rule("status", required=inst.knobs.contact_status_required, choices=(0, 1)))
        _validate(p, rules)
        page, size = _to_int(p["page"]), _to_int(p["page_size"])
        if size > inst.knobs.contact_max_page_size:
            size = 10
        status = _to_int(p.get("status"), 1)
        rows = inst.ordered_contacts(_to_int(p.get("group_id")), _to_str(p.get("keyword")), status)
        chunk = rows[(page - 1) * size : page * size]
        return _ok(
            "Get contacts list successfully",
            {"total": len(rows), "list": [inst.contact_view(r, status) for r in chunk]},
        )

    def _contact_edit(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        """``EditContacts``: ``emails`` is one address; with ``group_ids`` its rows are created again (new ids)
        with ``active`` (0 when absent) and ``attribs`` (a JSON object as a string; else the old ones)."""
        _validate(p, [_Rule("emails", required=True)])
        attribs: dict[str, str] | None = None
        text = _to_str(p.get("attribs")).strip('"').replace('""', '"')
        if text:
            try:
                parsed = orjson.loads(text)
            except orjson.JSONDecodeError as err:
                raise ApiError(400, f"Invalid attributes format:{err}") from None
            if not isinstance(parsed, dict):
                raise ApiError(400, "Invalid attributes format:json: cannot unmarshal into Go value of type map")
            attribs = {str(k): _attribute_text(v) for k, v in parsed.items()}
        group_ids = _to_int_list(p.get("group_ids"))
        for gid in group_ids:
            if gid not in inst.groups:
                raise ApiError(500, f"Failed to edit contact: Group {gid} not found")
        inst.edit_contact(_to_str(p["emails"]), _to_int(p.get("active")), group_ids, attribs, now)
        return _ok("Contact updated successfully")

    def _contact_delete(
        self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int
    ) -> dict[str, Any]:
        _validate(p, [_Rule("emails", required=True), _Rule("status", required=True, choices=(0, 1))])
        status = _to_int(p["status"])
        deleted = 0
        for email in _to_str_list(p["emails"]):
            deleted += inst.drop_contact_rows(
                [r for r in inst.by_email.get(email, []) if inst.contacts[r].active == status]
            )
        return _ok("Contacts deleted successfully", {"deleted_count": deleted})

    # --- send API (x-api-key) ---------------------------------------------------------------------------

    def _api_key(self, inst: BillionMailInstall, request: Request) -> _ApiKey:
        key = request.headers.get("x-api-key", "")
        api = next((a for a in inst.api_keys.values() if a.api_key == key and a.active == 1), None) if key else None
        if api is None:
            raise ApiError(1001, "API key is invalid")
        ip = self.client_ip(request, inst)
        if api.ip_whitelist and ip not in api.ip_whitelist:
            raise ApiError(1002, "IP not allowed")
        if api.template_id not in inst.templates:
            raise ApiError(1004, "Email template does not exist")
        return api

    def _ensure_contact(self, inst: BillionMailInstall, api: _ApiKey, email: str, now: int) -> None:
        name = f"api_group_{api.id}"
        group = next((g for g in inst.groups.values() if g.name == name), None)
        if group is None:
            group = inst._add_group(name, f"API {api.id} automatically created contact group", now)
        rows = [inst.contacts[r] for r in inst.by_email.get(email, ()) if inst.contacts[r].group_id == group.id]
        if any(r.active == 0 for r in rows):
            raise ValueError("the recipient has unsubscribed from the current group and cannot send")
        if not rows:
            inst._insert_contact(email, group.id, 1, 1, now, {})

    def _queue(
        self, inst: BillionMailInstall, api: _ApiKey, recipient: str, addresser: str, attribs: Any, now: int
    ) -> None:
        message_id = f"{secrets.token_hex(8)}@{addresser.rsplit('@', 1)[-1] or inst.domain}"
        inst.api_mails.append(
            {
                "id": len(inst.api_mails) + 1,
                "api_id": api.id,
                "recipient": recipient,
                "message_id": message_id,
                "addresser": addresser,
                "status": 0,
                "error_message": "",
                "send_time": 0,
                "create_time": now,
                "attribs": attribs if isinstance(attribs, dict) else {},
            }
        )

    def _send_failure(self, inst: BillionMailInstall) -> bool:
        faults = self._fault_for(inst.id)
        if faults is not None and faults.send_failures > 0:
            faults.send_failures -= 1
            return True
        return False

    def _api_send(self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int) -> dict[str, Any]:
        api = self._api_key(inst, request)
        recipient = _to_str(p.get("recipient"))
        if not recipient or "@" not in recipient:
            raise ApiError(1003, "Invalid recipient")
        try:
            self._ensure_contact(inst, api, recipient, now)
        except ValueError as err:
            raise ApiError(1003, f"Failed to process recipient: {err}") from None
        addresser = _to_str(p.get("addresser")) or api.addresser
        if self._send_failure(inst):
            raise ApiError(1005, "Failed to record email log: pq: could not write to api_mail_logs")
        self._queue(inst, api, recipient, addresser, p.get("attribs"), now)
        return _ok("Email sent successfully")

    def _api_batch_send(
        self, inst: BillionMailInstall, p: dict[str, Any], request: Request, now: int
    ) -> dict[str, Any]:
        api = self._api_key(inst, request)
        recipients = _to_str_list(p.get("recipients"))
        if not recipients:
            raise ApiError(1003, "Recipients cannot be empty")
        valid = [r.strip() for r in recipients if r.strip() and "@" in r]
        if not valid:
            raise ApiError(1003, "No valid recipients")
        addresser = _to_str(p.get("addresser")) or api.addresser
        accepted = []
        for recipient in valid:
            try:
                self._ensure_contact(inst, api, recipient, now)
            except ValueError:
                continue
            accepted.append(recipient)
        if not accepted:
            raise ApiError(1003, "No valid recipients to insert")
        if self._send_failure(inst):
            raise ApiError(1005, "Failed to record email log: pq: could not write to api_mail_logs")
        for recipient in accepted:
            self._queue(inst, api, recipient, addresser, p.get("attribs"), now)
        return _ok(f"Batch email send request accepted, {len(accepted)} emails queued")

    # --- control API ------------------------------------------------------------------------------------

    def _inst(self, request: Request) -> BillionMailInstall:
        return lookup(self.installs, request.path_params["account"], "account")

    async def _control_accounts(self, request: Request) -> Response:
        async def handle() -> Any:
            if request.method == "GET":
                return [self.summary(i) for i in self.installs.values()]
            spec = self.normalise_spec(await read_json_object(request))
            now = self.clock()
            started = time.perf_counter()
            inst = await run_in_threadpool(lambda: BillionMailInstall(spec, now=now))
            with self._lock:
                self.installs[inst.id] = inst
            return {**self.summary(inst), "generation_seconds": round(time.perf_counter() - started, 3)}

        return await _control(handle)()

    async def _control_account(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            if request.method == "DELETE":
                with self._lock:
                    self.installs.pop(inst.id, None)
                return {"deleted": inst.id}
            return self.summary(inst)

        return await _control(handle)()

    async def _control_changes(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            body = await read_json_object(request)
            reject_unknown_fields(body, _CHANGE_FIELDS, "change")
            return inst.apply_changes({k: int_field(body, k, 0) for k in _CHANGE_FIELDS}, self.clock())

        return await _control(handle)()

    async def _control_records(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            body = await read_json_object(request)
            entity = _ENTITIES.get(str(body.get("entity", "")).lower())
            if entity is None or entity == "api_mails":
                raise ControlError(400, "entity must be campaign, contact, group or api_key")
            fields_ = body.get("fields") or {}
            if not isinstance(fields_, dict):
                raise ControlError(400, "fields must be an object")
            at = body.get("at")
            if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
                raise ControlError(400, "at must be unix seconds")
            now = self.clock()
            return self._add_record(inst, entity, fields_, now if at is None else at, now)

        return await _control(handle)()

    def _add_record(
        self, inst: BillionMailInstall, entity: str, f: Mapping[str, Any], at: int, now: int
    ) -> dict[str, Any]:
        if entity == "groups":
            group = inst._add_group(
                str(f.get("name") or f"Group {inst.next_group_id}"), str(f.get("description", "")), at
            )
            return inst.group_view(group)
        if entity == "contacts":
            gid = f.get("group_id", next(iter(inst.groups), None))
            if gid not in inst.groups:
                raise ControlError(400, "group_id must name an existing group")
            email = f.get("email") or f"contact{inst.next_contact_id}@example.net"
            if not isinstance(email, str) or "@" not in email:
                raise ControlError(400, "email must be an address")
            if any(inst.contacts[r].group_id == gid for r in inst.by_email.get(email, ())):
                raise ControlError(400, "the email is already in that group")
            attribs = f.get("attribs") or {}
            row = inst._insert_contact(email, gid, int(f.get("active", 1)), int(f.get("status", 1)), at, dict(attribs))
            return inst.contact_view(row, row.active)
        if entity == "api_keys":
            ips = f.get("ip_whitelist", [])
            api = inst._add_api_key(
                str(f.get("api_key") or secrets.token_hex(16)),
                int(f.get("template_id", 1)),
                _ip_list(ips, "ip_whitelist") if ips else [],
                at,
                str(f.get("api_name") or f"API {inst.next_api_id}"),
            )
            api.active = int(f.get("active", 1))
            return inst.api_key_view(api)
        gids = f.get("group_ids") or ([f["group_id"]] if "group_id" in f else [next(iter(inst.groups), 0)])
        if not isinstance(gids, list) or any(g not in inst.groups for g in gids):
            raise ControlError(400, "group_ids must name existing groups")
        recipients = None
        if "recipient_count" in f:
            n = f["recipient_count"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ControlError(400, "recipient_count must be an integer >= 0")
            pool = inst._snapshot(gids)
            recipients = (pool + [f"recipient{i}@example.net" for i in range(max(0, n - len(pool)))])[:n]
        task = inst.create_task(
            now=at,
            addresser=str(f.get("addresser") or f"news@{inst.domain}"),
            subject=str(f.get("subject") or "Sandbox campaign"),
            full_name=str(f.get("full_name", "NextCRM")),
            template_id=int(f.get("template_id", 1)),
            group_ids=gids,
            start_time=int(f.get("start_time", at)),
            threads=int(f.get("threads", 5)),
            remark=str(f.get("remark", "")),
            recipients=recipients,
        )
        if "task_name" in f:
            task.task_name = str(f["task_name"])
            inst.task_version += 1
        if "update_time" in f:
            task.update_time = int(f["update_time"])
        return inst.task_detail(task, now)

    async def _control_export(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            entity = _ENTITIES.get(request.path_params["entity"].lower())
            if entity == "api_keys":
                return {"records": [inst.api_key_view(a) for a in inst.api_keys.values()], "deleted_ids": []}
            return inst.export(entity or "", self.clock())

        return await _control(handle)()

    async def _control_expire(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            body = await read_json_object(request)
            refresh = body.get("refresh", False)
            if not isinstance(refresh, bool):
                raise ControlError(400, "refresh must be a boolean")
            return {"expired": inst.expire_tokens(self.clock(), refresh)}

        return await _control(handle)()

    async def _control_captchas(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            now = self.clock()
            return {"captchas": {cid: answer for cid, (answer, exp) in inst.captchas.items() if exp > now}}

        return await _control(handle)()

    async def _control_knobs(self, request: Request) -> Response:
        async def handle() -> Any:
            inst = self._inst(request)
            body = await read_json_object(request)
            unknown = set(body) - set(_KNOB_NAMES)
            if unknown:
                raise ControlError(400, f"unknown knobs: {sorted(unknown)}")
            inst.knobs = _apply_knobs(inst.knobs, body)
            return asdict(inst.knobs)

        return await _control(handle)()

    async def _control_faults(self, request: Request) -> Response:
        async def handle() -> Any:
            if request.method == "DELETE":
                return clear_scoped_faults(self._faults, request.query_params.get("account"))
            body = await read_json_object(request)
            reject_unknown_fields(body, _FAULT_FIELDS, "fault")
            if body.get("rate_limited"):
                raise ControlError(
                    400, "BillionMail has no rate limiting: use latency_ms, server_errors or proxy_rate_limited"
                )
            account = body.get("account")
            if account is not None and account not in self.installs:
                raise ControlError(404, f"no account {account!r}")
            f = self._faults.setdefault(account, _Faults())
            for name in ("server_errors", "envelope_errors", "send_failures", "proxy_rate_limited", "gateway_timeouts"):
                if name in body:
                    setattr(f, name, int_field(body, name, 0))
            if "route" in body:
                route = body["route"]
                if route is not None and (not isinstance(route, str) or route.split(" ")[0] not in _METHODS):
                    raise ControlError(400, 'route must be "METHOD /api/path" or null')
                f.route = route
            if "envelope_error_code" in body:
                f.envelope_error_code = int_field(body, "envelope_error_code", 500)
            if "envelope_error_msg" in body:
                f.envelope_error_msg = str(body["envelope_error_msg"])
            if "latency_ms" in body:
                f.latency_ms = number_field(body, "latency_ms", 0.0)
            return {"account": account, **asdict(f)}

        return await _control(handle)()

    async def _control_stats(self, request: Request) -> Response:
        async def handle() -> Any:
            return {
                "total": self.stats["requests"],
                "by_route": dict(self.by_route),
                "by_status": dict(self.by_status),
                "by_code": dict(self.by_code),
                "accounts": {aid: dict(inst.stats) for aid, inst in self.installs.items()},
                "faults": {str(k): asdict(f) for k, f in self._faults.items()},
            }

        return await _control(handle)()
