"""BillionMail client: the management API of a self-hosted install, as its Go source defines it.

Every answer is HTTP 200 with `{success, code, msg, data}`; an error inside that envelope becomes a
`ProviderError` naming BillionMail's code and message (code 401 means the login token is no longer
valid: the client renews it with the refresh token, or logs in again, once, then gives up with
`AuthenticationFailed`; a refused login, which BillionMail also answers with code 500, is told apart
from a server error by its message). The JWT comes from `POST /api/login` with the install's admin user. When the
install hides its API behind a SafePath, the client first visits it to get the gate cookie.
Campaigns (batch-mail tasks), contacts and contact groups are read whole on every run: no list has an
updated-since filter. Every list pages by offset (`page` from 1, `page_size`, `data: {total, list}`),
newest first: the contact list (`GET /api/contact/list`) demands `status` (1 subscribed, 0 unsubscribed)
and is read once for each, at most 100 a page (BillionMail answers a bigger `page_size` with 10 a page);
it shows each address once per status, under the id of its newest membership row in that status, with
every group it is in with that status. The group list (`GET /api/contact/group/list`) carries each
group's counts of subscribed and unsubscribed contacts. The outbox's writes (`actions.py`) go through `post`,
sent once: BillionMail takes no idempotency key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, ProviderError
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow

PAGE_SIZE = 100
# `contact/list` serves at most 100 a page: a bigger `page_size` silently gets 10 a page.
CONTACT_MAX_PAGE_SIZE = 100
# The contact list's two lists: the mandatory `status` parameter (1 subscribed, 0 unsubscribed).
CONTACT_STATUSES = (1, 0)
# Rows already read that new rows push onto later pages are recognised against the ids of this many pages.
RECENT_PAGES = 10
NOT_FOUND = 404


class EnvelopeError(ProviderError):
    """BillionMail answered `success: false` (inside an HTTP 200).

    A refusal (a 4xx code, or code 0: a handler that refused before writing anything, such as "The task is
    currently running") carries its code as `status`, 400 for code 0, so an action it answers ends failed;
    code 500 is a server error that may have acted."""

    def __init__(self, code: Any, msg: str, **where: Any) -> None:
        super().__init__(f"BillionMail answered code {code}: {msg or 'no message'}", **where)
        self.code = code
        if isinstance(code, int) and (code == 0 or 400 <= code < 500):
            self.status = code or 400


class BillionMailApi:
    """One BillionMail install's campaigns, contacts and contact groups."""

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
        self.page_size = max(1, int(settings.get("page_size") or PAGE_SIZE))
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

    def _list(self, path: str, params: dict[str, Any], page_size: int) -> Iterator[list[dict[str, Any]]]:
        """Every row of an offset-paged list once, page by page, as it is read (bounded memory at any size).

        The lists are newest first, so rows added during the read push rows already read onto later pages:
        they are recognised by id against the last pages read and dropped. Paging ends at an empty page or
        once the pages cover `total`, counted in the page size BillionMail actually serves.
        """
        recent: deque[set[Any]] = deque(maxlen=RECENT_PAGES)
        page, served = 1, 0
        while True:
            data = self.call("GET", path, params={**params, "page": page, "page_size": page_size}) or {}
            listed = [row for row in data.get("list") or [] if isinstance(row, dict)]
            served = max(served, len(listed))
            fresh = [row for row in listed if not any(row.get("id") in ids for ids in recent)]
            recent.append({row.get("id") for row in listed})
            if fresh:
                yield fresh
            if not listed or page * served >= int(data.get("total") or 0):
                return
            page += 1

    def post(self, path: str, body: dict[str, Any], *, once: bool = True) -> Any:
        """The `data` of a POST. `once` (a write: BillionMail takes no idempotency key) repeats it only when it
        surely did not reach the install; a refusal raises `EnvelopeError` with the code as `status`."""
        return self.call("POST", path, json=body, once=once)

    def _tasks(self, keyword: str = "") -> Iterator[list[dict[str, Any]]]:
        """Every task once (whose name or subject holds `keyword`, if given), page by page (`status=-1`: all)."""
        params: dict[str, Any] = {"status": -1, **({"keyword": keyword} if keyword else {})}
        return self._list("/api/batch_mail/task/list", params, self.page_size)

    def _with_stats(self, task: dict[str, Any], now: datetime) -> dict[str, Any]:
        """A `task/list` row with its opens and clicks under `stats` (the shape the campaign rows are made of)."""
        start, end = int(task.get("start_time") or task.get("create_time") or 0), int(now.timestamp())
        stats: dict[str, Any] = {}
        if 0 < start < end:  # a task scheduled for later has sent nothing yet
            params = {"task_id": task["id"], "start_time": start, "end_time": end}
            chart = self.call("GET", "/api/batch_mail/task/stat_chart", params=params) or {}
            stats = chart.get("dashboard") or {}
        return {**task, "stats": stats}

    def campaigns(self, window: SyncWindow) -> Iterator[list[Record]]:
        """The whole campaign list as of now, each with its opens and clicks."""
        for tasks in self._tasks():
            now = datetime.now(UTC)
            yield [(self._with_stats(task, now), now) for task in tasks]

    def campaign(self, task_id: int | str) -> Record | None:
        """One campaign as the sync reads it (its `task/list` row, found by its generated name, with its stats),
        or None when BillionMail has no such task."""
        try:
            task = self.call("GET", "/api/batch_mail/task/find", params={"id": task_id}) or {}
        except EnvelopeError as exc:
            if exc.code == NOT_FOUND:
                return None
            raise
        for tasks in self._tasks(str(task.get("task_name") or "")):
            for row in tasks:
                if str(row.get("id")) == str(task_id):
                    now = datetime.now(UTC)
                    return self._with_stats(row, now), now
        return None

    def campaign_marked(self, marker: str) -> Record | None:
        """The newest campaign whose remark holds `marker`, as the sync reads it, or None. The list cannot be
        searched by remark, so it is read from the newest task until one matches."""
        for tasks in self._tasks():
            for row in tasks:
                if marker in str(row.get("remark") or ""):
                    now = datetime.now(UTC)
                    return self._with_stats(row, now), now
        return None

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

    def _contacts(self, **params: Any) -> Iterator[list[dict[str, Any]]]:
        """Every entry of the subscribed list, then of the unsubscribed one, page by page."""
        size = min(self.page_size, CONTACT_MAX_PAGE_SIZE)
        for status in CONTACT_STATUSES:
            yield from self._list("/api/contact/list", {**params, "status": status}, size)

    def contacts(self, window: SyncWindow) -> Iterator[list[Record]]:
        """The whole subscriber list as of now, subscribed and unsubscribed entries, each with its groups in id
        order (BillionMail lists them in no set order: the same groups must make the same row)."""
        for rows in self._contacts():
            now = datetime.now(UTC)
            yield [(_groups_in_order(row), now) for row in rows]

    def contact_ids(self) -> Iterator[list[str]]:
        """The ids every entry of both lists is listed under, page by page (the id sweep's listing)."""
        for rows in self._contacts():
            yield [str(row["id"]) for row in rows]

    def contact_gone(self, contact_id: str, stored: dict[str, Any]) -> bool:
        """Whether BillionMail no longer lists the entry: its address, searched in both lists, shows under
        other ids or not at all (an entry whose stored copy has no address is left as it is)."""
        email = stored.get("email")
        if not email:
            return False
        listed = (str(row.get("id")) for rows in self._contacts(keyword=email) for row in rows)
        return contact_id not in listed

    def _groups(self) -> Iterator[list[dict[str, Any]]]:
        """Every contact group once, page by page."""
        return self._list("/api/contact/group/list", {}, self.page_size)

    def groups(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Every contact group as of now, with its counts of subscribed and unsubscribed contacts."""
        for rows in self._groups():
            now = datetime.now(UTC)
            yield [(row, now) for row in rows]

    def group_ids(self) -> Iterator[list[str]]:
        """Every group's id, page by page (the id sweep's listing)."""
        for rows in self._groups():
            yield [str(row["id"]) for row in rows]

    def group_gone(self, group_id: str, stored: dict[str, Any]) -> bool:
        """Whether BillionMail answers "not found" for the group."""
        try:
            self.call("GET", "/api/contact/group/info", params={"group_id": group_id})
        except EnvelopeError as exc:
            if exc.code == NOT_FOUND:
                return True
            raise
        return False


def _groups_in_order(row: dict[str, Any]) -> dict[str, Any]:
    """A contact entry with its `groups` by id: the same groups make the same raw JSON, so an unchanged entry
    stays unchanged."""
    groups = row.get("groups")
    if not isinstance(groups, list) or len(groups) < 2:
        return row
    return {**row, "groups": sorted(groups, key=lambda g: int(g.get("id") or 0) if isinstance(g, dict) else 0)}
