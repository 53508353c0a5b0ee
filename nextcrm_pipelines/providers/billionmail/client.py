"""BillionMail client: the management API of a self-hosted install, as its Go source defines it.

Every answer is HTTP 200 with `{success, code, msg, data}`; an error inside that envelope becomes a
`ProviderError` naming BillionMail's code and message (code 401 means the login token is no longer
valid: the client renews it with the refresh token, or logs in again, once, then gives up with
`AuthenticationFailed`; a refused login, which BillionMail also answers with code 500, is told apart
from a server error by its message). The JWT comes from `POST /api/login` with the install's admin user. When the
install hides its API behind a SafePath, the client first visits it to get the gate cookie.
Campaigns (batch-mail tasks) are read whole on every run: the list has no updated-since filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, ProviderError
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow

PAGE_SIZE = 100
NOT_FOUND = 404


class EnvelopeError(ProviderError):
    """BillionMail answered `success: false` (inside an HTTP 200)."""

    def __init__(self, code: Any, msg: str, **where: Any) -> None:
        super().__init__(f"BillionMail answered code {code}: {msg or 'no message'}", **where)
        self.code = code


class BillionMailApi:
    """One BillionMail install's campaigns."""

    def __init__(self, ctx: ClientContext) -> None:
        connection = ctx.connection
        if not connection.base_url:
            raise ProviderError("the connection has no BillionMail base URL", provider="billionmail",
                                connection_id=connection.id)  # fmt: skip
        settings = connection.settings or {}
        self.http = HttpClient(
            provider="billionmail",
            name="BillionMail",
            connection_id=connection.id,
            base_url=connection.base_url.rstrip("/"),
            headers={"Accept": "application/json"},
            requests_per_second=float(settings.get("requests_per_second", 0)),
            stats=ctx.stats,
        )
        self._username = ctx.secrets.reveal().get("username", "")
        self._password = ctx.secrets.reveal().get("password", "")
        self._safe_path = str(settings.get("safe_path") or "").strip("/")
        self._token: str | None = None
        self._refresh: str | None = None
        self.logins = 0

    def __enter__(self) -> BillionMailApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _envelope(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.send(method, path, **kwargs)
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise ProviderError("BillionMail answered something that is not JSON", provider="billionmail",
                                connection_id=self.http.connection_id, endpoint=f"{method} {path}",
                                status=response.status_code) from None  # fmt: skip
        if not isinstance(body, dict):
            body = {}
        return body

    def _fail(self, body: dict[str, Any], method: str, path: str, cls: type[ProviderError] = EnvelopeError) -> Any:
        where = {"provider": "billionmail", "connection_id": self.http.connection_id, "endpoint": f"{method} {path}"}
        if cls is EnvelopeError:
            return EnvelopeError(body.get("code"), str(body.get("msg") or ""), **where)
        return cls(f"BillionMail answered code {body.get('code')}: {body.get('msg') or 'no message'}", **where)

    def _login(self) -> None:
        if self._safe_path:
            self.http.send("GET", f"/{self._safe_path}")
        body = self._envelope("POST", "/api/login", json={"username": self._username, "password": self._password})
        self.logins += 1
        if not body.get("success"):
            # Login refusals come back as code 500 like any server error; only the message tells them apart.
            refused = body.get("code") in (401, 403) or any(
                word in str(body.get("msg", "")).lower() for word in ("password", "username", "validation code")
            )
            raise self._fail(body, "POST", "/api/login", AuthenticationFailed if refused else EnvelopeError)
        data = body.get("data") or {}
        self._token, self._refresh = data.get("token"), data.get("refreshToken")

    def _renew(self) -> None:
        if self._refresh:
            body = self._envelope("POST", "/api/refresh-token", json={"refreshToken": self._refresh})
            if body.get("success") and (body.get("data") or {}).get("token"):
                data = body["data"]
                self._token, self._refresh = data["token"], data.get("refreshToken") or self._refresh
                return
        self._login()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The `data` of one API call; renews an expired login token once."""
        if self._token is None:
            self._login()
        for attempt in (1, 2):
            body = self._envelope(method, path, headers={"Authorization": f"Bearer {self._token}"}, **kwargs)
            if body.get("success"):
                return body.get("data")
            if body.get("code") == 401 and attempt == 1:
                self._renew()
                continue
            cls = AuthenticationFailed if body.get("code") == 401 else EnvelopeError
            raise self._fail(body, method, path, cls)
        raise AssertionError("unreachable")

    def _tasks(self) -> Iterator[list[dict[str, Any]]]:
        """Every task once, page by page (newest first; new tasks shift pages, so ids are deduplicated)."""
        seen: set[Any] = set()
        page = 1
        while True:
            data = self.call("GET", "/api/batch_mail/task/list",
                             params={"page": page, "page_size": PAGE_SIZE, "status": -1}) or {}  # fmt: skip
            items = [t for t in data.get("list") or [] if t.get("id") not in seen]
            seen.update(t.get("id") for t in items)
            if items:
                yield items
            if not data.get("list") or page * PAGE_SIZE >= int(data.get("total") or 0):
                return
            page += 1

    def campaigns(self, window: SyncWindow) -> Iterator[list[Record]]:
        """The whole campaign list as of now, each with its opens and clicks."""
        for tasks in self._tasks():
            now = datetime.now(UTC)
            batch = []
            for task in tasks:
                start, end = int(task.get("start_time") or task.get("create_time") or 0), int(now.timestamp())
                stats: dict[str, Any] = {}
                if 0 < start < end:  # a task scheduled for later has sent nothing yet
                    params = {"task_id": task["id"], "start_time": start, "end_time": end}
                    chart = self.call("GET", "/api/batch_mail/task/stat_chart", params=params) or {}
                    stats = chart.get("dashboard") or {}
                batch.append(({**task, "stats": stats}, now))
            yield batch

    def campaign_ids(self) -> Iterator[list[str]]:
        for tasks in self._tasks():
            yield [str(t["id"]) for t in tasks]

    def campaign_gone(self, campaign_id: str, stored: dict[str, Any]) -> bool:
        """Whether BillionMail answers "not found" for the task."""
        try:
            self.call("GET", "/api/batch_mail/task/find", params={"id": campaign_id})
        except EnvelopeError as exc:
            if exc.code == NOT_FOUND:
                return True
            raise
        return False
