"""Tests of the BillionMail emulator in ``nextcrm_sandbox.billionmail``, over real loopback HTTP.

Each test drives an installation the way the sync code will: httpx against ``{sandbox}/billionmail/{id}``
with the backend's paths (``/api/login``, ``/api/batch_mail/task/list``, ...), the JWT pair from the login
as ``Authorization: Bearer``, the ``x-api-key`` send endpoints, and the control API through
``BillionMailControl``. Every answer of a handler is HTTP 200 with ``{success, code, msg, data}``, so the
helpers assert the HTTP status and the tests assert on the envelope.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from nextcrm_sandbox.billionmail import ACCESS_TTL, REFRESH_TTL, BillionMailControl
from nextcrm_sandbox.server import SandboxServer

NOW = 1_770_000_000  # 2026-02-02T02:40:00Z
USER, PASSWORD = "admin", "s3cret-pass"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def control(server: SandboxServer) -> BillionMailControl:
    return BillionMailControl(server)


_seq = iter(range(1, 10_000))


def _account(control: BillionMailControl, **spec: Any) -> dict[str, Any]:
    """A fresh installation with a unique id (small by default)."""
    base = {"username": USER, "password": PASSWORD, "seed": 5, "campaigns": 12, "contacts": 120, "days": 20}
    return control.add_account(**{"id": f"bm-test-{next(_seq)}", **base, **spec})


class Api:
    """An httpx client for one installation that asserts BillionMail's HTTP 200 on every answer."""

    def __init__(self, server: SandboxServer, account: dict[str, Any], **client_kwargs: Any) -> None:
        self.base = f"{server.url}{account['base_path']}"
        self.http = httpx.Client(base_url=self.base, timeout=30, **client_kwargs)
        self.token: str | None = None
        self.refresh_token: str | None = None

    def login(self, username: str = USER, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
        body = self.post("/api/login", {"username": username, "password": password, **extra}, auth=False)
        if body["success"]:
            self.token = body["data"]["token"]
            self.refresh_token = body["data"]["refreshToken"]
        return body

    def _headers(self, auth: bool, headers: dict[str, str] | None) -> dict[str, str]:
        out = dict(headers or {})
        if auth and self.token:
            out.setdefault("Authorization", f"Bearer {self.token}")
        return out

    def get(self, path: str, auth: bool = True, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
        resp = self.http.get(path, params=params, headers=self._headers(auth, headers))
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "application/json"
        return resp.json()

    def post(
        self, path: str, body: dict[str, Any], auth: bool = True, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        resp = self.http.post(path, json=body, headers=self._headers(auth, headers))
        assert resp.status_code == 200, resp.text
        return resp.json()

    def all_tasks(self, page_size: int = 7, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.get("/api/batch_mail/task/list", page=page, page_size=page_size, **params)["data"]
            out.extend(data["list"])
            if page * page_size >= data["total"]:
                return out
            page += 1

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def api_for(server: SandboxServer) -> Iterator[Any]:
    """Factory of logged-out clients, closed after the test."""
    made: list[Api] = []

    def make(account: dict[str, Any], **client_kwargs: Any) -> Api:
        client = Api(server, account, **client_kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _jwt_claims(token: str) -> dict[str, Any]:
    header, payload, _sig = token.split(".")
    assert orjson.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --- auth -----------------------------------------------------------------------------------------------


def test_login_returns_jwt_pair_with_ttl_and_account_info(server, control, api_for):
    acc = _account(control)
    api = api_for(acc)
    body = api.login()
    assert body["success"] is True and body["code"] == 0 and body["msg"] == "Login successful"
    data = body["data"]
    assert set(data) == {"token", "refreshToken", "ttl", "accountInfo"}
    assert data["ttl"] == ACCESS_TTL == 86_400
    assert data["accountInfo"]["username"] == USER and data["accountInfo"]["status"] == 1
    access, refresh = _jwt_claims(data["token"]), _jwt_claims(data["refreshToken"])
    assert access["sub"] == "access_token" and refresh["sub"] == "refresh_token"
    assert access["exp"] - access["iat"] == ACCESS_TTL
    assert refresh["exp"] - refresh["iat"] == REFRESH_TTL
    assert abs(access["iat"] - server.clock()) <= 5
    assert api.get("/api/batch_mail/task/list", page=1, page_size=5)["success"] is True


def test_bearer_required_and_auth_failures_are_http_200_code_401(control, api_for):
    api = api_for(_account(control))
    assert api.get("/api/batch_mail/task/list", auth=False, page=1, page_size=5) == {
        "success": False,
        "code": 401,
        "msg": "no authorization",
        "data": None,
    }
    bad = api.get("/api/batch_mail/task/list", headers={"Authorization": "Bearer not.a.jwt"}, page=1, page_size=5)
    assert bad == {"success": False, "code": 401, "msg": "", "data": None}
    other = api_for(_account(control))
    other.login()
    foreign = api.get("/api/contact/group/all", headers={"Authorization": f"Bearer {other.token}"})
    assert foreign["code"] == 401
    body = api.login(password="wrong")
    assert body["success"] is False and body["code"] == 500
    assert body["msg"].startswith("Invalid username or password: ")


def test_refresh_renews_the_pair_and_reports_the_refresh_lifetime(control, api_for):
    api = api_for(_account(control))
    api.login()
    first_refresh = api.refresh_token
    body = api.post("/api/refresh-token", {"refreshToken": first_refresh}, auth=False)
    assert body["success"] is True and body["msg"] == "Token refreshed successfully"
    assert body["data"]["ttl"] == REFRESH_TTL
    assert body["data"]["refreshToken"] != first_refresh
    api.token = body["data"]["token"]
    assert api.get("/api/contact/group/all")["success"] is True
    # ParseToken never looks at ``sub``: a refresh token is accepted as a bearer token too.
    as_bearer = api.get("/api/contact/group/all", headers={"Authorization": f"Bearer {first_refresh}"})
    assert as_bearer["success"] is True
    missing = api.post("/api/refresh-token", {}, auth=False)
    assert missing == {"success": False, "code": 412, "msg": "Refresh token cannot be empty", "data": None}
    garbage = api.post("/api/refresh-token", {"refreshToken": "abc"}, auth=False)
    assert garbage["code"] == 500 and garbage["msg"].startswith("token is malformed")


def test_short_token_ttl_expires_on_the_clock_and_refresh_recovers(server, control, api_for):
    api = api_for(_account(control, knobs={"token_ttl": 60, "refresh_ttl": 600}))
    assert api.login()["data"]["ttl"] == 60
    assert api.get("/api/contact/group/all")["success"] is True
    server.advance_clock(61)
    assert api.get("/api/contact/group/all")["code"] == 401
    renewed = api.post("/api/refresh-token", {"refreshToken": api.refresh_token}, auth=False)
    assert renewed["success"] is True and renewed["data"]["ttl"] == 600
    api.token = renewed["data"]["token"]
    assert api.get("/api/contact/group/all")["success"] is True
    server.advance_clock(601)
    dead = api.post("/api/refresh-token", {"refreshToken": renewed["data"]["refreshToken"]}, auth=False)
    assert dead == {"success": False, "code": 500, "msg": "token has invalid claims: token is expired", "data": None}


def test_expire_tokens_control_route(control, api_for):
    acc = _account(control)
    api = api_for(acc)
    api.login()
    assert control.expire_tokens(acc["id"]) == {"expired": 1}
    assert api.get("/api/contact/group/all")["code"] == 401
    renewed = api.post("/api/refresh-token", {"refreshToken": api.refresh_token}, auth=False)
    assert renewed["success"] is True
    assert control.expire_tokens(acc["id"], refresh=True)["expired"] >= 2
    again = api.post("/api/refresh-token", {"refreshToken": renewed["data"]["refreshToken"]}, auth=False)
    assert again["msg"] == "token has invalid claims: token is expired"


def test_logout_blacklists_the_token(control, api_for):
    api = api_for(_account(control))
    api.login()
    assert api.post("/api/logout", {})["msg"] == "Logout successful"
    assert api.get("/api/contact/group/all") == {"success": False, "code": 401, "msg": "", "data": None}


def test_captcha_required_after_a_failed_login_then_lockout(control, api_for):
    acc = _account(control)
    api = api_for(acc)
    fresh = api.get("/api/get_validate_code", auth=False)["data"]
    assert fresh["mustValidateCode"] is False and fresh["loginRetries"] == 0 and fresh["maxLoginRetries"] == 5
    assert api.login(password="nope")["code"] == 500
    info = api.get("/api/get_validate_code", auth=False)["data"]
    assert info["mustValidateCode"] is True and info["loginRetries"] == 1
    assert info["validateCodeBase64"].startswith("data:image/png;base64,")
    assert api.login()["msg"] == "Validation code ID and code cannot be empty"
    wrong = api.login(validate_code_id=info["validateCodeId"], validate_code="zzzz")
    assert wrong["msg"] == "Invalid validation code"
    info = api.get("/api/get_validate_code", auth=False)["data"]
    answer = control.captchas(acc["id"])[info["validateCodeId"]]
    ok = api.login(validate_code_id=info["validateCodeId"], validate_code=answer)
    assert ok["success"] is True
    assert api.get("/api/get_validate_code", auth=False)["data"]["mustValidateCode"] is False
    # Five failures lock the IP out; the captcha gate comes after the lockout check.
    for _ in range(5):
        code = api.get("/api/get_validate_code", auth=False)["data"]["validateCodeId"]
        answer = control.captchas(acc["id"]).get(code, "")
        api.login(password="nope", validate_code_id=code, validate_code=answer)
    locked = api.login()
    assert locked["code"] == 500 and locked["msg"].startswith("Login failed too many times, please try again after ")


def test_captcha_knob_off_and_validation_of_login(control, api_for):
    api = api_for(_account(control, captcha_after_failures=0))
    api.login(password="nope")
    assert api.login()["success"] is True
    later = api_for(_account(control, knobs={"captcha_after_failures": 2}))
    later.login(password="nope")
    assert later.get("/api/get_validate_code", auth=False)["data"]["mustValidateCode"] is False
    later.login(password="nope")
    assert later.get("/api/get_validate_code", auth=False)["data"]["mustValidateCode"] is True
    assert later.login()["msg"] == "Validation code ID and code cannot be empty"
    assert api.post("/api/login", {"password": "x"}, auth=False) == {
        "success": False,
        "code": 412,
        "msg": "Username cannot be empty",
        "data": None,
    }


# --- gates ----------------------------------------------------------------------------------------------


def test_safe_path_cookie_gate(server, control, api_for):
    acc = _account(control, api_key="sp-key", knobs={"safe_path": "entry42"})
    outsider = api_for(acc)
    denied = outsider.post("/api/login", {"username": USER, "password": PASSWORD}, auth=False)
    assert denied == {"success": False, "code": 404, "msg": "access denied", "data": None}
    assert outsider.http.get("/").status_code == 404
    sent = outsider.post("/api/batch_mail/api/send", {"recipient": "a@example.org"}, headers={"x-api-key": "sp-key"})
    assert sent["success"] is True  # the send API is exempt
    insider = api_for(acc)
    visit = insider.http.get("/entry42")
    assert visit.status_code == 302 and visit.headers["location"] == f"{acc['base_path']}/"
    assert "billion_mail" in insider.http.cookies
    assert insider.login()["success"] is True
    assert insider.get("/api/batch_mail/task/list", page=1, page_size=3)["success"] is True
    assert insider.http.get("/").status_code == 200


def test_console_ip_whitelist(control, api_for):
    acc = _account(control, api_key="ip-key", knobs={"ip_whitelist": ["10.0.0.5"], "client_ip": "203.0.113.7"})
    api = api_for(acc)
    blocked = api.http.post("/api/login", json={"username": USER, "password": PASSWORD})
    assert blocked.status_code == 403 and blocked.text == "IP not allowed"
    allowed = api.post("/api/login", {"username": USER, "password": PASSWORD}, headers={"X-Forwarded-For": "10.0.0.5"})
    assert allowed["success"] is True
    send = api.post("/api/batch_mail/api/send", {"recipient": "b@example.org"}, headers={"x-api-key": "ip-key"})
    assert send["success"] is True  # excluded path


def test_unknown_paths_leave_the_envelope(server, control, api_for):
    api = api_for(_account(control))
    api.login()
    resp = api.http.get("/api/batch_mail/task/nope", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 404 and resp.content == b""
    assert api.http.get("/api/login").status_code == 404  # login is POST only
    assert httpx.get(f"{server.url}/billionmail/no-such-install/api/login").status_code == 404


# --- campaigns ------------------------------------------------------------------------------------------


def test_task_list_validation_order_paging_and_filters(control, api_for):
    api = api_for(_account(control, campaigns=30, contacts=200))
    api.login()
    assert api.get("/api/batch_mail/task/list", page_size=5)["msg"] == "The page field is required"
    assert api.get("/api/batch_mail/task/list", page=1)["msg"] == "The page_size field is required"
    zero = api.get("/api/batch_mail/task/list", page=0, page_size=5)
    assert zero == {
        "success": False,
        "code": 412,
        "msg": "The page value `0` must be equal or greater than 1",
        "data": None,
    }
    first = api.get("/api/batch_mail/task/list", page=1, page_size=7)
    assert first["msg"] == "Task list retrieved successfully" and first["data"]["total"] == 30
    rows = api.all_tasks(page_size=7)
    assert sorted(r["id"] for r in rows) == list(range(1, 31))
    keys = [(r["create_time"], r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    assert api.get("/api/batch_mail/task/list", page=99, page_size=7)["data"] == {"total": 30, "list": []}
    row = rows[0]
    for name in ("task_name", "addresser", "subject", "full_name", "template_id", "template_name", "recipient_count"):
        assert name in row
    assert {"sent_count", "unsent_count", "progress", "success_count", "error_count", "deferred", "groups"} <= set(row)
    assert {"opened", "clicked"}.isdisjoint(row)
    states = Counter(r["task_process"] for r in rows)
    assert set(states) == {0, 1, 2, 3}
    for state, n in states.items():
        assert api.get("/api/batch_mail/task/list", page=1, page_size=50, status=state)["data"]["total"] == n
    assert api.get("/api/batch_mail/task/list", page=1, page_size=50, status=-1)["data"]["total"] == 30
    word = rows[3]["subject"].split()[-1]
    hits = api.all_tasks(keyword=word)
    assert hits and all(word in r["subject"] or word in r["task_name"] for r in hits)
    assert len(hits) == sum(1 for r in rows if word in r["subject"] or word in r["task_name"])
    for r in rows:
        assert r["sent_count"] + r["unsent_count"] == r["recipient_count"]
        assert r["success_count"] + r["error_count"] == r["sent_count"]
        if r["task_process"] == 0:
            assert r["sent_count"] == 0 and r["start_time"] > r["create_time"]
        if r["task_process"] == 2:
            assert r["progress"] == 100 or r["recipient_count"] == 0


def test_created_task_runs_on_the_clock(server, control, api_for):
    acc = _account(control, contacts=60, groups=1, campaigns=0, send_rate_per_thread=1.0)
    api = api_for(acc)
    api.login()
    now = server.clock()
    missing = api.post(
        "/api/batch_mail/task/create",
        {"addresser": "a@x.io", "subject": "s", "template_id": 1, "group_ids": [1]},
    )
    assert missing == {"success": False, "code": 412, "msg": "The start_time field is required", "data": None}
    no_template = api.post(
        "/api/batch_mail/task/create",
        {"addresser": "a@x.io", "subject": "s", "template_id": 99, "group_ids": [1], "start_time": now},
    )
    assert no_template == {"success": False, "code": 400, "msg": "Template not found", "data": {"id": 0}}
    created = api.post(
        "/api/batch_mail/task/create",
        {
            "addresser": "news@x.io",
            "subject": "Launch day",
            "template_id": 2,
            "group_ids": [1],
            "start_time": now + 100,
            "threads": 1,
        },
    )
    assert created["success"] is True and created["msg"] == "Task created successfully"
    tid = created["data"]["id"]
    task = api.get("/api/batch_mail/task/find", id=tid)["data"]
    assert task["task_process"] == 0 and task["task_name"] == f"task_{task['create_time']}"
    assert task["recipient_count"] > 20
    total = task["recipient_count"]
    server.advance_clock(110)
    row = next(r for r in api.all_tasks(page_size=50) if r["id"] == tid)
    assert row["task_process"] == 1
    assert 9 <= row["sent_count"] <= 20 and row["unsent_count"] == total - row["sent_count"]
    assert row["progress"] == int(row["sent_count"] / total * 100)
    server.advance_clock(total + 5)
    done = api.get("/api/batch_mail/task/find", id=tid)["data"]
    assert done["task_process"] == 2 and done["update_time"] == task["update_time"]
    row = next(r for r in api.all_tasks(page_size=50) if r["id"] == tid)
    assert row["sent_count"] == total and row["progress"] == 100


def test_pause_resume_and_delete(server, control, api_for):
    acc = _account(control, contacts=80, groups=1, campaigns=0, send_rate_per_thread=1.0)
    api = api_for(acc)
    api.login()
    now = server.clock()
    body = {"addresser": "n@x.io", "subject": "Pause me", "template_id": 1, "group_ids": [1], "threads": 1}
    tid = api.post("/api/batch_mail/task/create", {**body, "start_time": now})["data"]["id"]
    later = api.post("/api/batch_mail/task/create", {**body, "start_time": now + 10_000})["data"]["id"]
    refused = api.post("/api/batch_mail/task/pause", {"task_id": later})
    assert refused == {
        "success": False,
        "code": 400,
        "msg": "Cannot pause task because it is not started",
        "data": None,
    }
    server.advance_clock(10)
    assert api.post("/api/batch_mail/task/pause", {"task_id": tid})["msg"] == "Task paused successfully"
    paused = api.get("/api/batch_mail/task/find", id=tid)["data"]
    assert paused["task_process"] == 3 and paused["pause"] == 1
    frozen = next(r for r in api.all_tasks(page_size=50) if r["id"] == tid)["sent_count"]
    server.advance_clock(30)
    assert next(r for r in api.all_tasks(page_size=50) if r["id"] == tid)["sent_count"] == frozen
    assert api.post("/api/batch_mail/task/resume", {"task_id": tid})["msg"] == "Task resumed successfully"
    assert api.get("/api/batch_mail/task/find", id=tid)["data"]["task_process"] == 1
    server.advance_clock(10)
    assert next(r for r in api.all_tasks(page_size=50) if r["id"] == tid)["sent_count"] >= frozen + 9
    missing = api.post("/api/batch_mail/task/pause", {"task_id": 999})
    assert missing == {"success": False, "code": 404, "msg": "Task not found: 999", "data": None}
    assert api.post("/api/batch_mail/task/delete", {"id": later})["msg"] == "Task deleted successfully"
    assert [r["id"] for r in api.all_tasks(page_size=50)] == [tid]
    assert api.get("/api/batch_mail/task/find", id=later) == {
        "success": False,
        "code": 404,
        "msg": f"Task not found: {later}",
        "data": None,
    }


def test_task_find_entity_and_validation(control, api_for):
    api = api_for(_account(control))
    api.login()
    row = api.all_tasks()[0]
    found = api.get("/api/batch_mail/task/find", id=row["id"])
    assert found["msg"] == "Success"
    entity = found["data"]
    assert {k: row[k] for k in entity if k != "warmup"} == {k: entity[k] for k in entity if k != "warmup"}
    assert "groups" not in entity and "sent_count" not in entity and entity["etypes"]
    assert api.get("/api/batch_mail/task/find")["msg"] == "The id field is required"


def test_overview_sums_the_sends(server, control, api_for):
    api = api_for(_account(control, campaigns=3, contacts=300))
    api.login()
    rows = api.all_tasks()
    assert all(r["task_process"] == 2 for r in rows)
    sends = sum(r["sent_count"] for r in rows)
    delivered = sum(r["success_count"] for r in rows)
    bounced = sum(r["error_count"] - r["deferred"] for r in rows)
    assert sends > 0
    open_ended = api.get("/api/batch_mail/task/overview")["data"]
    assert (open_ended["sends"], open_ended["delivered"], open_ended["bounced"]) == (sends, delivered, bounced)
    assert open_ended["opened"] == 0 and open_ended["clicked"] == 0  # the source bounds opens by end_time*1000
    bounded = api.get("/api/batch_mail/task/overview", start_time=0, end_time=server.clock() + 60)["data"]
    assert bounded["sends"] == sends and 0 < bounded["clicked"] < bounded["opened"] < delivered
    assert bounded["delivery_rate"] == round(delivered / sends * 100, 2)
    assert set(bounded) == {
        "sends",
        "delivered",
        "bounced",
        "opened",
        "clicked",
        "delivery_rate",
        "bounce_rate",
        "open_rate",
        "click_rate",
    }
    later = {"start_time": server.clock() + 1000, "end_time": server.clock() + 2000}
    nothing = api.http.get(
        "/api/batch_mail/task/overview", params=later, headers={"Authorization": f"Bearer {api.token}"}
    )
    assert nothing.json()["data"]["sends"] == 0
    assert b'"delivery_rate":0,' in nothing.content  # a Go float64 zero is written as 0


def test_stat_chart_and_tracking_logs(server, control, api_for):
    api = api_for(_account(control, campaigns=3, contacts=300))
    api.login()
    row = max(api.all_tasks(), key=lambda r: r["sent_count"])
    tid = row["id"]
    everything = api.get("/api/batch_mail/tracking/logs", task_id=tid, status=-1, page=1, page_size=500)["data"]
    assert everything["total"] == row["sent_count"]
    statuses = Counter(r["status"] for r in everything["list"])
    assert statuses["sent"] == row["success_count"] and statuses["deferred"] == row["deferred"]
    assert statuses["bounced"] == row["error_count"] - row["deferred"]
    times = [r["log_time"] for r in everything["list"]]
    assert times == sorted(times, reverse=True) and times[-1] >= row["start_time"]
    sample = everything["list"][0]
    assert set(sample) == {
        "postfix_message_id",
        "status",
        "recipient",
        "mail_provider",
        "delay",
        "delays",
        "dsn",
        "relay",
        "description",
        "log_time",
    }
    assert all(r["dsn"].startswith("2.") for r in everything["list"] if r["status"] == "sent")
    default = api.get("/api/batch_mail/tracking/logs", task_id=tid)["data"]  # no status = 0 = bounced only
    assert default["total"] == statuses["bounced"] and len(default["list"]) == min(20, statuses["bounced"])
    delivered = api.get("/api/batch_mail/tracking/logs", task_id=tid, status=1, page=2, page_size=10)["data"]
    assert delivered["total"] == statuses["sent"] and all(r["status"] == "sent" for r in delivered["list"])
    domain = everything["list"][0]["recipient"].split("@")[1]
    by_domain = api.get("/api/batch_mail/tracking/logs", task_id=tid, status=-1, domain=domain, page_size=500)["data"]
    assert by_domain["total"] == sum(1 for r in everything["list"] if r["recipient"].endswith("@" + domain))
    missing = api.get("/api/batch_mail/tracking/logs", task_id=9999)
    assert missing == {"success": False, "code": 404, "msg": "Task not found: 9999", "data": {"total": 0, "list": None}}
    start = row["start_time"] - 10
    chart = api.get("/api/batch_mail/task/stat_chart", task_id=tid, start_time=start, end_time=server.clock())
    assert chart["msg"] == "Task statistics retrieved successfully"
    data = chart["data"]
    assert data["dashboard"]["sends"] == row["sent_count"] and data["dashboard"]["delivered"] == row["success_count"]
    assert sum(p["sends"] for p in data["mail_providers"]) == row["sent_count"]
    assert data["send_mail_chart"]["column_type"] in ("daily", "hourly")
    assert sum(x["sends"] for x in data["send_mail_chart"]["data"]) == row["sent_count"]
    assert set(data) == {
        "dashboard",
        "mail_providers",
        "send_mail_chart",
        "bounce_rate_chart",
        "open_rate_chart",
        "click_rate_chart",
    }
    assert api.get("/api/batch_mail/task/stat_chart", task_id=tid, start_time=0)["code"] == 412
    assert api.get("/api/batch_mail/task/stat_chart", task_id=9999, start_time=0, end_time=1)["code"] == 404


def test_task_update_keeps_update_time_unless_the_knob_says_otherwise(server, control, api_for):
    acc = _account(control, campaigns=3)
    api = api_for(acc)
    api.login()
    row = api.all_tasks()[0]
    updated = api.post("/api/batch_mail/task/update", {"task_id": row["id"], "subject": "New subject"})
    assert updated == {"success": True, "code": 0, "msg": "Task update successful", "data": None}
    found = api.get("/api/batch_mail/task/find", id=row["id"])["data"]
    assert found["subject"] == "New subject" and found["update_time"] == row["update_time"]
    assert found["unsubscribe"] == 0  # an omitted 0/1 field is written as 0, like the handler does
    no_subject = api.post("/api/batch_mail/task/update", {"task_id": row["id"], "remark": "x"})
    assert no_subject["code"] == 500 and "interface conversion" in no_subject["msg"]
    assert api.get("/api/batch_mail/task/find", id=row["id"])["data"]["remark"] == "x"
    control.set_knobs(acc["id"], edit_touches_update_time=True)
    server.advance_clock(5)
    api.post("/api/batch_mail/task/update", {"task_id": row["id"], "subject": "Again"})
    assert api.get("/api/batch_mail/task/find", id=row["id"])["data"]["update_time"] > row["update_time"]
    gone = api.post("/api/batch_mail/task/update", {"task_id": 777, "subject": "x"})
    assert gone == {"success": False, "code": 0, "msg": "The task does not exist.", "data": None}


# --- contacts -------------------------------------------------------------------------------------------


def _sweep_contacts(api: Api, status: int, page_size: int = 100, **params: Any) -> tuple[int, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    page = 1
    while True:
        data = api.get("/api/contact/list", page=page, page_size=page_size, status=status, **params)["data"]
        rows.extend(data["list"])
        if page * page_size >= data["total"]:
            return data["total"], rows
        page += 1


def test_contact_list_needs_status_and_partitions_by_it(control, api_for):
    acc = _account(control, contacts=260, groups=4)
    api = api_for(acc)
    api.login()
    assert api.get("/api/contact/list", page=1, page_size=10)["msg"] == "The status field is required"
    bad = api.get("/api/contact/list", page=1, page_size=10, status=2)
    assert bad["code"] == 412 and bad["msg"] == "The status value `2` is not in acceptable range: 0,1"
    total_on, subscribed = _sweep_contacts(api, 1)
    total_off, unsubscribed = _sweep_contacts(api, 0)
    assert total_on == len(subscribed) and total_off == len(unsubscribed)
    assert total_on + total_off == 260 and total_off > 0
    assert all(r["active"] == 1 for r in subscribed) and all(r["active"] == 0 for r in unsubscribed)
    emails = {r["email"] for r in subscribed} | {r["email"] for r in unsubscribed}
    assert len(emails) == 260
    keys = [(r["create_time"], r["id"]) for r in subscribed]
    assert keys == sorted(keys, reverse=True)
    assert set(subscribed[0]) >= {"id", "email", "group_id", "active", "task_id", "create_time", "groups", "status"}
    assert {"group_name", "attribs"} <= set(subscribed[0])
    assert any(len(r["groups"]) == 2 for r in subscribed)
    exported = control.export(acc["id"], "contacts")
    assert sorted(r["id"] for r in exported["records"]) == sorted(r["id"] for r in subscribed + unsubscribed)
    capped = api.get("/api/contact/list", page=1, page_size=500, status=1)["data"]
    assert len(capped["list"]) == 10  # above 100 the handler falls back to 10
    gid = subscribed[0]["group_id"]
    in_group = _sweep_contacts(api, 1, group_id=gid)[1]
    assert in_group and all(gid in [g["id"] for g in r["groups"]] for r in in_group)
    needle = subscribed[5]["email"].split("@")[0]
    assert [r["email"] for r in _sweep_contacts(api, 1, keyword=needle)[1]] == [subscribed[5]["email"]]
    relaxed = api_for(_account(control, contacts=30, contact_status_required=False))
    relaxed.login()
    assert relaxed.get("/api/contact/list", page=1, page_size=10)["success"] is True


def test_groups_list_all_and_import(control, api_for):
    acc = _account(control, contacts=100, groups=3)
    api = api_for(acc)
    api.login()
    listed = api.get("/api/contact/group/list", page=1, page_size=10)["data"]
    assert listed["total"] == 3
    group = listed["list"][0]
    assert group["total_count"] == group["active_count"] + group["unsubscribe_count"]
    assert sum(g["total_count"] for g in listed["list"]) == acc["counts"]["contact_rows"]
    assert api.get("/api/contact/group/list", page=1)["msg"] == "The page_size field is required"
    all_groups = api.get("/api/contact/group/all")["data"]["list"]
    assert sorted(g["id"] for g in all_groups) == [1, 2, 3] and "token" in all_groups[0]
    existing = _sweep_contacts(api, 1, group_id=group["id"])[1][0]["email"]
    text = f"new.one@example.org\nnew.two@example.org,0\n{existing}\n\n"
    imported = api.post("/api/contact/group/import", {"group_ids": [group["id"]], "import_type": 2, "contacts": text})
    assert imported == {
        "success": True,
        "code": 0,
        "msg": "Successfully imported 2 contacts",
        "data": {"imported_count": 2},
    }
    again = api.post("/api/contact/group/import", {"group_ids": [group["id"]], "import_type": 2, "contacts": text})
    assert again["data"]["imported_count"] == 0
    assert any(r["email"] == "new.two@example.org" for r in _sweep_contacts(api, 0)[1])
    missing = api.post("/api/contact/group/import", {"group_ids": [99], "import_type": 2, "contacts": "a@b.c"})
    assert missing == {"success": False, "code": 400, "msg": "Group 99 does not exist", "data": {"imported_count": 0}}
    assert api.post("/api/contact/group/import", {"group_ids": [1]})["msg"] == "The import_type field is required"
    created = api.post("/api/contact/group/create", {"create_type": 1, "name": "Fresh"})
    assert created["msg"] == "Group created successfully"
    assert api.get("/api/contact/group/list", page=1, page_size=10)["data"]["total"] == 4
    deleted = api.post("/api/contact/delete", {"emails": ["new.one@example.org"], "status": 1})
    assert deleted["data"] == {"deleted_count": 1}


def test_an_email_is_listed_under_its_newest_row_in_each_status(control, api_for):
    acc = _account(control, contacts=40, groups=3)
    api = api_for(acc)
    api.login()
    first = next(r for r in _sweep_contacts(api, 1)[1] if len(r["groups"]) == 1)
    other = next(g for g in (1, 2, 3) if g != first["group_id"])
    added = control.add_record(acc["id"], "contact", {"email": first["email"], "group_id": other})
    assert added["id"] > first["id"] and added["create_time"] > first["create_time"]
    (listed,) = [r for r in _sweep_contacts(api, 1)[1] if r["email"] == first["email"]]
    assert listed["id"] == added["id"] and listed["group_id"] == other
    assert [g["id"] for g in listed["groups"]] == sorted([first["group_id"], other])
    assert listed == _sweep_contacts(api, 1)[1][0]  # the newest row: first by create_time DESC
    found = api.get("/api/contact/list", page=1, page_size=10, status=1, keyword=first["email"])["data"]
    assert found["total"] == 1 and found["list"][0]["id"] == added["id"]
    assert api.get("/api/contact/list", page=1, page_size=10, status=0, keyword=first["email"])["data"] == {
        "total": 0,
        "list": [],
    }


def test_group_info_update_and_delete(server, control, api_for):
    acc = _account(control, contacts=80, groups=3)
    api = api_for(acc)
    api.login()
    info = api.get("/api/contact/group/info", group_id=2)
    assert info["success"] is True and info["msg"] == "Group info retrieved successfully"
    assert info["data"]["id"] == 2 and info["data"]["subscribe_link"].endswith(f"token={info['data']['token']}")
    assert info["data"]["total_count"] == 0 and info["data"]["welcome_subject"] == "Welcome Aboard!"
    assert api.get("/api/contact/group/info")["msg"] == "The group_id field is required"
    assert api.get("/api/contact/group/info", group_id=99) == {
        "success": False,
        "code": 404,
        "msg": "Group not found",
        "data": None,
    }
    server.advance_clock(30)
    updated = api.post("/api/contact/group/update", {"group_id": 2, "name": "Renamed", "double_optin": 1})
    assert updated == {"success": True, "code": 0, "msg": "Group updated successfully", "data": None}
    listed = {g["id"]: g for g in api.get("/api/contact/group/list", page=1, page_size=10)["data"]["list"]}
    assert listed[2]["name"] == "Renamed" and listed[2]["double_optin"] == 1
    assert listed[2]["update_time"] > listed[2]["create_time"] and listed[1]["update_time"] == listed[1]["create_time"]
    clash = api.post("/api/contact/group/update", {"group_id": 1, "name": "Renamed"})
    assert clash["code"] == 500 and "duplicate key value" in clash["msg"]
    assert api.post("/api/contact/group/update", {"group_id": 99, "name": "Nobody"})["success"] is True
    members = {r["email"] for r in _sweep_contacts(api, 1, group_id=3)[1] + _sweep_contacts(api, 0, group_id=3)[1]}
    before = _sweep_contacts(api, 1)[0] + _sweep_contacts(api, 0)[0]
    deleted = api.post("/api/contact/group/delete", {"group_ids": [3, 99]})
    assert deleted == {
        "success": True,
        "code": 0,
        "msg": "Groups deleted successfully",
        "data": {"success_count": 1, "failed_count": 1},
    }
    assert api.get("/api/contact/group/info", group_id=3)["code"] == 404
    assert api.get("/api/contact/group/list", page=1, page_size=10)["data"]["total"] == 2
    left = _sweep_contacts(api, 1)[1] + _sweep_contacts(api, 0)[1]
    assert members and before > len(left) and all(3 not in [g["id"] for g in r["groups"]] for r in left)
    assert control.export(acc["id"], "groups")["deleted_ids"] == [3]
    assert api.post("/api/contact/group/delete", {"group_ids": []})["msg"] == "The group_ids field is required"


def test_a_contact_edit_with_groups_creates_its_rows_again(server, control, api_for):
    acc = _account(control, contacts=40, groups=3)
    api = api_for(acc)
    api.login()
    old = _sweep_contacts(api, 1)[1][-1]
    server.advance_clock(10)
    body = {"emails": old["email"], "active": 1, "group_ids": [1, 3], "attribs": '{"first_name": "Ada", "n": 2}'}
    assert api.post("/api/contact/edit", body)["msg"] == "Contact updated successfully"
    (new,) = [r for r in _sweep_contacts(api, 1)[1] if r["email"] == old["email"]]
    assert new["id"] > old["id"] and new["create_time"] > old["create_time"]
    assert [g["id"] for g in new["groups"]] == [1, 3] and new["attribs"] == {"first_name": "Ada", "n": "2"}
    assert new["status"] == old["status"]
    assert set(control.export(acc["id"], "contacts")["deleted_ids"]) >= {old["id"]}
    kept = api.post("/api/contact/edit", {"emails": old["email"], "attribs": '{"first_name": "Grace"}'})
    assert kept["success"] is True  # without groups nothing is written
    assert [r for r in _sweep_contacts(api, 1)[1] if r["email"] == old["email"]] == [new]
    bad = api.post("/api/contact/edit", {"emails": old["email"], "group_ids": [1], "attribs": "{nope"})
    assert bad["code"] == 400 and bad["msg"].startswith("Invalid attributes format:")
    missing = api.post("/api/contact/edit", {"emails": old["email"], "group_ids": [9]})
    assert missing == {"success": False, "code": 500, "msg": "Failed to edit contact: Group 9 not found", "data": None}
    off = api.post("/api/contact/edit", {"emails": old["email"], "group_ids": [2]})  # `active` absent: 0
    assert off["success"] is True
    assert [r["groups"] for r in _sweep_contacts(api, 0)[1] if r["email"] == old["email"]] == [
        [{"id": 2, "name": "Customers"}]
    ]


def test_a_reverse_proxys_429_can_be_injected(control, api_for):
    acc = _account(control)
    api = api_for(acc)
    api.login()
    control.set_faults(acc["id"], proxy_rate_limited=2)
    try:
        for _ in range(2):
            response = api.http.get("/api/contact/group/all", headers={"Authorization": f"Bearer {api.token}"})
            assert response.status_code == 429 and response.headers["content-type"] == "text/html"
            assert b"<title>429 Too Many Requests</title>" in response.content and b"nginx" in response.content
        assert api.get("/api/contact/group/all")["success"] is True
    finally:
        control.clear_faults(acc["id"])


def test_an_install_can_be_removed(control, api_for):
    acc = _account(control, contacts=10)
    assert control.delete_account(acc["id"]) == {"deleted": acc["id"]}
    assert acc["id"] not in {a["id"] for a in control.accounts()}
    response = api_for(acc).http.post("/api/login", json={"username": USER, "password": PASSWORD})
    assert response.status_code == 404
    with pytest.raises(RuntimeError, match="404"):
        control.delete_account(acc["id"])


# --- send API -------------------------------------------------------------------------------------------


def test_send_api_with_key_codes(control, api_for):
    acc = _account(control, api_key="send-key-1")
    aid = acc["id"]
    api = api_for(acc)
    ok = api.post("/api/batch_mail/api/send", {"recipient": "x@example.org"}, headers={"x-api-key": "send-key-1"})
    assert ok == {"success": True, "code": 0, "msg": "Email sent successfully", "data": None}
    assert api.post("/api/batch_mail/api/send", {"recipient": "x@example.org"})["code"] == 1001
    wrong = api.post("/api/batch_mail/api/send", {"recipient": "x@example.org"}, headers={"x-api-key": "nope"})
    assert wrong == {"success": False, "code": 1001, "msg": "API key is invalid", "data": None}
    bad = api.post("/api/batch_mail/api/send", {"recipient": "not-an-address"}, headers={"x-api-key": "send-key-1"})
    assert bad["code"] == 1003 and bad["msg"] == "Invalid recipient"
    control.add_record(aid, "api_key", {"api_key": "fenced", "ip_whitelist": ["10.9.9.9"]})
    fenced = api.post("/api/batch_mail/api/send", {"recipient": "y@example.org"}, headers={"x-api-key": "fenced"})
    assert fenced == {"success": False, "code": 1002, "msg": "IP not allowed", "data": None}
    through = api.post(
        "/api/batch_mail/api/send",
        {"recipient": "y@example.org"},
        headers={"x-api-key": "fenced", "X-Forwarded-For": "10.9.9.9"},
    )
    assert through["success"] is True
    control.add_record(aid, "api_key", {"api_key": "orphan", "template_id": 99})
    orphan = api.post("/api/batch_mail/api/send", {"recipient": "z@example.org"}, headers={"x-api-key": "orphan"})
    assert orphan == {"success": False, "code": 1004, "msg": "Email template does not exist", "data": None}
    control.set_faults(aid, send_failures=1)
    failed = api.post("/api/batch_mail/api/send", {"recipient": "q@example.org"}, headers={"x-api-key": "send-key-1"})
    assert failed["code"] == 1005 and failed["msg"].startswith("Failed to record email log")
    batch = api.post(
        "/api/batch_mail/api/batch_send",
        {"recipients": ["a@example.org", "junk", " b@example.org "], "attribs": {"name": "A"}},
        headers={"x-api-key": "send-key-1"},
    )
    assert batch["msg"] == "Batch email send request accepted, 2 emails queued"
    empty = api.post("/api/batch_mail/api/batch_send", {"recipients": []}, headers={"x-api-key": "send-key-1"})
    assert empty["code"] == 1003 and empty["msg"] == "Recipients cannot be empty"
    queued = control.export(aid, "api_mails")["records"]
    assert [m["recipient"] for m in queued] == ["x@example.org", "y@example.org", "a@example.org", "b@example.org"]
    assert queued[2]["attribs"] == {"name": "A"}


# --- control API ----------------------------------------------------------------------------------------


def test_accounts_are_deterministic_and_fast(control):
    spec = {"username": "u1", "password": "p1", "seed": 42, "campaigns": 40, "contacts": 500, "days": 30}
    a = control.add_account(**spec)
    b = control.add_account(**spec)
    assert a["id"] == b["id"] and a["id"].startswith("bm")
    assert a["base_path"] == f"/billionmail/{a['id']}"
    c = control.add_account(**{**spec, "id": "bm-det-copy"})
    d = control.add_account(**{**spec, "seed": 43})
    assert d["id"] != a["id"]
    same = ("subject", "recipient_count", "groups", "template_id", "threads", "task_process")
    first = [{k: r[k] for k in same} for r in control.export(a["id"], "campaigns")["records"]]
    copy = [{k: r[k] for k in same} for r in control.export(c["id"], "campaigns")["records"]]
    assert first == copy
    emails = [r["email"] for r in control.export(a["id"], "contacts")["records"]]
    assert emails == [r["email"] for r in control.export(c["id"], "contacts")["records"]]
    assert emails != [r["email"] for r in control.export(d["id"], "contacts")["records"]]
    assert a["counts"]["campaigns"] == 40 and a["counts"]["contacts"] == 500
    big = control.add_account(id="bm-big", seed=1, campaigns=200, contacts=20_000, days=90)
    assert big["counts"]["contacts"] == 20_000 and big["generation_seconds"] < 5
    with pytest.raises(RuntimeError, match="unknown account fields"):
        control.add_account(colour="blue")
    with pytest.raises(RuntimeError, match="404"):
        control.account("bm-missing")
    assert control.account(a["id"])["counts"] == a["counts"]


def test_changes_create_edit_delete_progress(server, control, api_for):
    acc = _account(control, campaigns=20, contacts=200)
    aid = acc["id"]
    api = api_for(acc)
    api.login()
    before = {r["id"]: r for r in api.all_tasks(page_size=50)}
    now = server.clock()
    out = control.changes(aid, creates=2, edits=3, deletes=2, progress=2, contact_creates=2, contact_unsubscribes=1)
    assert len(out["created"]) == 2 and len(out["edited"]) == 3 and len(out["deleted"]) == 2
    assert len(out["progressed"]) == 2 and len(out["contacts_created"]) == 2 and len(out["contacts_unsubscribed"]) == 1
    after = api.all_tasks(page_size=50)
    ids = [r["id"] for r in after]
    assert ids[:2] == sorted(out["created"], reverse=True)
    assert not set(out["deleted"]) & set(ids) and len(after) == 20
    for tid in out["created"]:
        row = next(r for r in after if r["id"] == tid)
        assert abs(row["create_time"] - now) <= 5 and row["update_time"] == row["create_time"]
    for tid in out["edited"]:
        row = next(r for r in after if r["id"] == tid)
        old = before[tid]
        assert (row["subject"], row["remark"]) != (old["subject"], old["remark"])
        assert row["update_time"] == old["update_time"]
    for tid in out["progressed"]:
        row = next(r for r in after if r["id"] == tid)
        was = before[tid]["task_process"]
        assert was in (0, 1, 3)
        assert row["task_process"] == 2 if was == 1 else row["task_process"] in (1, 2)
        assert row["pause"] == 0
    exported = control.export(aid, "campaigns")
    assert exported["deleted_ids"] == out["deleted"]
    assert sorted(r["id"] for r in exported["records"]) == sorted(ids)
    unsub = out["contacts_unsubscribed"][0]
    assert any(r["id"] == unsub for r in _sweep_contacts(api, 0)[1])
    with pytest.raises(RuntimeError, match="unknown change fields"):
        control.changes(aid, explode=1)


def test_records_at_a_given_time(server, control, api_for):
    acc = _account(control, campaigns=5, contacts=100)
    aid = acc["id"]
    api = api_for(acc)
    api.login()
    at = server.clock() - 3600
    made = control.add_record(aid, "campaign", {"subject": "Boundary", "recipient_count": 30}, at=at)
    assert made["create_time"] == at and made["recipient_count"] == 30 and made["task_process"] == 2
    listed = next(r for r in api.all_tasks(page_size=50) if r["id"] == made["id"])
    assert listed == made
    contact = control.add_record(aid, "contact", {"email": "edge@example.org", "group_id": 1}, at=at)
    assert contact["create_time"] == at and contact["email"] == "edge@example.org"
    group = control.add_record(aid, "group", {"name": "Edge group"}, at=at)
    assert group["create_time"] == at and group["total_count"] == 0
    with pytest.raises(RuntimeError, match="entity must be"):
        control.add_record(aid, "invoice", {})


def test_faults_server_errors_envelope_errors_latency(control, api_for):
    acc = _account(control)
    aid = acc["id"]
    api = api_for(acc)
    api.login()
    control.set_faults(aid, server_errors=1)
    resp = api.http.get("/api/contact/group/all", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 500
    assert api.get("/api/contact/group/all")["success"] is True
    control.set_faults(aid, envelope_errors=2, envelope_error_code=500, envelope_error_msg="pq: connection refused")
    for _ in range(2):
        assert api.get("/api/contact/group/all") == {
            "success": False,
            "code": 500,
            "msg": "pq: connection refused",
            "data": None,
        }
    assert api.get("/api/contact/group/all")["success"] is True
    control.set_faults(aid, latency_ms=150)
    started = time.perf_counter()
    api.get("/api/contact/group/all")
    assert time.perf_counter() - started >= 0.15
    control.clear_faults(aid)
    started = time.perf_counter()
    api.get("/api/contact/group/all")
    assert time.perf_counter() - started < 0.15
    with pytest.raises(RuntimeError, match="no rate limiting"):
        control.set_faults(aid, rate_limited=3)


def test_no_rate_limit_and_stats(control, api_for):
    acc = _account(control)
    api = api_for(acc)
    api.login()
    before = control.stats()
    for _ in range(40):
        assert api.get("/api/batch_mail/task/list", page=1, page_size=5)["success"] is True
    api.get("/api/batch_mail/task/list", auth=False, page=1, page_size=5)
    stats = control.stats()
    route = "GET /api/batch_mail/task/list"
    assert stats["by_route"][route] - before["by_route"].get(route, 0) == 41
    assert stats["by_code"]["401"] - before["by_code"].get("401", 0) == 1
    assert stats["by_status"]["200"] - before["by_status"].get("200", 0) == 41
    assert stats["accounts"][acc["id"]]["requests"] == 42 and stats["accounts"][acc["id"]]["logins"] == 1
    assert stats["total"] - before["total"] == 41
