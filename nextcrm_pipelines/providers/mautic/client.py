"""Mautic client: OAuth 2.0 (authorisation code or client credentials) against a self-hosted install.

A day's window is read in two passes, both in a stable order by id and paged by id (`where id gt
<last id>`, `start=0`), so campaigns created while the list is read are neither skipped nor read
twice: campaigns whose `dateModified` falls in the window, then never-modified ones (null
`dateModified`) whose `dateAdded` does. The list envelope is parsed in all its shapes: entities keyed
by id in an object, `[]` or `{}` when empty. Paging by id never needs `total`, which Mautic sends as
a string or a number and may serve stale from its count cache.

A campaign's `contactCount` is its live member count, one `GET /api/campaigns/{id}/contacts?limit=1`
per campaign read (its `total`, counted by the stats API at each request). The listing's
`withContactCounts` figure is served from a cache Mautic keeps for hours, so it is not asked for: a
re-run partition and a webhook refresh store the same figure for the same state, each as it was when
read, at the same version (`dateModified`, else `dateAdded`), so the later write stands.

Contacts and segments are read the same way, by day and by id. A contact carries the ids of the
segments it is in (`segmentIds`): one `GET /api/stats/lead_lists_leads` per page of contacts, its
memberships not manually removed. A segment carries its live member count (`memberCount`): the
`total` of the same stats table for that segment. Neither a membership change nor a count is a
change of the record in Mautic: they are current as of the record's last read (its day's sync, a
webhook about the contact, the hourly segments run, or for memberships the daily sweep, which lists
them all, `segment_memberships`, and reads the contacts whose stored segment ids differ again).

A provider that answers a page it already gave (an id filter it ignores) stops the read with a
`ProviderError` rather than looping (`core.paging.PageCursors`).

Webhook events are thin, so their apply reads by id: campaigns and contacts by id as the sync lists them,
a single campaign (404: gone), and the campaigns contacts belong to or have left (`/api/stats/campaign_leads`).

Writes (the outbox's actions, `providers.mautic.actions`) go out once each (`write`): Mautic takes no
idempotency key, so an answer that may hide a change it made is not repeated here; the outbox looks the
object up (`contacts_with_email`, `campaigns_describing`) before sending again. A refusal carries Mautic's
own message (`errors[0].message`), email addresses masked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from nextcrm_pipelines.core.connect import Tenant, TenantContext
from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, ProviderError
from nextcrm_pipelines.core.oauth import BearerAuth, OAuthSpec
from nextcrm_pipelines.core.paging import PageCursors
from nextcrm_pipelines.core.provider import ClientContext
from nextcrm_pipelines.core.sync import Record, SyncWindow
from nextcrm_pipelines.providers.mautic.records import changed_at, parse_time

PAGE_SIZE = 100
# Ids per page when the sweep lists every id of an entity (minimal records: cheap to serve).
ID_PAGE_SIZE = 1000

OAUTH = OAuthSpec(
    provider="mautic",
    hosts={},
    authorize=("instance", "/oauth/v2/authorize"),
    token=("instance", "/oauth/v2/token"),
    scopes=(),
    env_prefix="MAUTIC",
    client_auth="client_secret_post",  # Mautic refuses HTTP Basic unless its Basic auth is switched on
    self_hosted=True,
)


def entities(body: Any, key: str) -> list[dict[str, Any]]:
    """The records of a list answer: `{key: {"<id>": {...}}}`, `{key: [...]}`, or `[]`/`{}` when empty."""
    if not isinstance(body, dict):
        return []
    found = body.get(key)
    if isinstance(found, dict):
        return [value for value in found.values() if isinstance(value, dict)]
    if isinstance(found, list):
        return [value for value in found if isinstance(value, dict)]
    return []


_EMAIL = re.compile(r"[^\s@<>\"']+@[^\s@<>\"']+")


def refusal(error: ProviderError) -> ProviderError:
    """A refused write (4xx) as a `ProviderError` naming Mautic's own message (`{"errors": [{"message"}]}`), with
    any email address masked (a message must not carry a contact's data); other errors as they are."""
    status, response = error.status, error.response
    if response is None or status is None or not 400 <= status < 500 or isinstance(error, AuthenticationFailed):
        return error
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return error
    found = body.get("errors") if isinstance(body, dict) else None
    found = found if isinstance(found, list) else []
    messages = [str(e["message"]) for e in found if isinstance(e, dict) and e.get("message")]
    if not messages:
        return error
    text = _EMAIL.sub("<email>", "; ".join(messages))[:500]
    return ProviderError(f"Mautic refused it: {text}", provider=error.provider, connection_id=error.connection_id,
                         endpoint=error.endpoint, status=status)  # fmt: skip


def discover_tenants(ctx: TenantContext) -> list[Tenant]:
    """A Mautic install is its own tenant: its base URL."""
    if not ctx.base_url:
        return []
    parts = urlsplit(ctx.base_url)
    return [Tenant(external_id=ctx.base_url.rstrip("/"), name=f"Mautic {parts.hostname}{parts.path}".rstrip("/"))]


def _id_order(value: str) -> tuple[int, str]:
    return len(value), value


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _where_params(where: list[tuple[str, str, str]]) -> dict[str, str]:
    """`where[n][col|expr|val]` query parameters of (column, expression, value) clauses, as Mautic's lists take them."""
    params: dict[str, str] = {}
    for n, (col, expr, val) in enumerate(where):
        params.update({f"where[{n}][col]": col, f"where[{n}][expr]": expr, f"where[{n}][val]": val})
    return params


class MauticApi:
    """One Mautic install's campaigns, contacts and segments."""

    def __init__(self, ctx: ClientContext) -> None:
        if ctx.tokens is None:
            raise ValueError("the Mautic client needs the connection's token manager")
        connection = ctx.connection
        if not connection.base_url:
            raise ProviderError("the connection has no Mautic base URL", provider="mautic", connection_id=connection.id)
        settings = connection.settings or {}
        self.http = HttpClient(
            provider="mautic",
            name="Mautic",
            connection_id=connection.id,
            base_url=connection.base_url.rstrip("/"),
            headers={"Accept": "application/json"},
            auth=BearerAuth(ctx.tokens),
            requests_per_second=float(settings.get("requests_per_second", 0)),
            stats=ctx.stats,
        )
        self.page_size = int(settings.get("page_size", PAGE_SIZE))
        # Rows per page when the sweep lists every segment membership (a setting, so small pages can be tested).
        self.id_page_size = int(settings.get("id_page_size", max(self.page_size, ID_PAGE_SIZE)))

    def __enter__(self) -> MauticApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _by_id(self, where: list[tuple[str, str, str]], **extra: str) -> Iterator[list[dict[str, Any]]]:
        """Campaigns matching `where`, in id order, paged by id."""
        return self._pages("/api/campaigns", "campaigns", where, **extra)

    def _pages(self, path: str, key: str, where: list[tuple[str, str, str]], page_size: int | None = None,
               **extra: str) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
        """The records of list `path` (under `key`) matching `where`, in id order, paged by id.

        A page that says more follow (a full one) but ends with an id an earlier page ended with means
        the provider ignored the id filter: `ProviderError`, not an endless loop.
        """
        size = page_size or self.page_size
        cursors = PageCursors("mautic", name=f"Mautic {path}", connection_id=self.http.connection_id, endpoint=path)
        last = 0
        while True:
            params: dict[str, str] = {"start": "0", "limit": str(size), "orderBy": "id", "orderByDir": "ASC", **extra,
                                      **_where_params([*where, ("id", "gt", str(last))])}  # fmt: skip
            items = entities(self.http.get_json(path, params=params), key)
            items.sort(key=lambda raw: int(raw["id"]))
            fresh = [raw for raw in items if int(raw["id"]) > last]
            if fresh:
                yield fresh
            if len(items) < size:
                return
            last = int(cursors.advance(str(items[-1]["id"]) if items else None))

    def _changed(
        self, path: str, key: str, window: SyncWindow, columns: tuple[str, str]
    ) -> Iterator[list[dict[str, Any]]]:
        """Records of `path` changed in the window: modified in it, then never modified and added in it."""
        modified_col, added_col = columns
        start, end = _stamp(window.start), _stamp(window.end)
        yield from self._pages(path, key, [(modified_col, "gte", start), (modified_col, "lt", end)])
        for page in self._pages(path, key, [(added_col, "gte", start), (added_col, "lt", end)]):
            never_modified = [raw for raw in page if parse_time(raw.get("dateModified")) is None]
            if never_modified:
                yield never_modified

    def campaigns(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Campaigns changed in the window (or, never changed, added in it), each with its live member count."""
        start, end = _stamp(window.start), _stamp(window.end)
        modified = [("dateModified", "gte", start), ("dateModified", "lt", end)]
        for page in self._by_id(modified):
            if counted := self.with_member_counts(page):
                yield [(raw, changed_at(raw)) for raw in counted]
        added = [("dateAdded", "gte", start), ("dateAdded", "lt", end)]
        for page in self._by_id(added):
            never_modified = [raw for raw in page if parse_time(raw.get("dateModified")) is None]
            if counted := self.with_member_counts(never_modified):
                yield [(raw, changed_at(raw)) for raw in counted]

    def with_member_counts(self, campaigns: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The campaigns with `contactCount` set to their live member count; those deleted meanwhile (404) left out."""
        counted = []
        for raw in campaigns:
            count = self.campaign_member_count(str(raw["id"]))
            if count is not None:
                counted.append({**raw, "contactCount": count})
        return counted

    def contacts(self, window: SyncWindow) -> Iterator[list[Record]]:
        """Contacts changed in the window (or, never changed, added in it), each with its segment ids."""
        for page in self._changed("/api/contacts", "contacts", window, ("date_modified", "date_added")):
            yield [(raw, changed_at(raw)) for raw in self.with_segment_ids(page)]

    def with_segment_ids(self, contacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The contacts with `segmentIds` set to the segments they are in now (not manually removed)."""
        found = self.segments_of_contacts([str(raw["id"]) for raw in contacts])
        return [{**raw, "segmentIds": sorted(found.get(str(raw["id"]), ()), key=_id_order)} for raw in contacts]

    def segments_of_contacts(self, contact_ids: Collection[str]) -> dict[str, set[str]]:
        """Contact id -> ids of the segments it is in (`lead_lists_leads` rows not manually removed, paged)."""
        found: dict[str, set[str]] = {}
        ordered = sorted(contact_ids, key=_id_order)
        for start in range(0, len(ordered), self.page_size):
            chunk = ",".join(ordered[start : start + self.page_size])
            offset, limit = 0, max(self.page_size, 100)
            while True:
                params = {"start": str(offset), "limit": str(limit), "order[0][col]": "lead_id", "order[0][dir]": "ASC",
                          "order[1][col]": "leadlist_id", "order[1][dir]": "ASC",
                          **_where_params([("lead_id", "in", chunk), ("manually_removed", "eq", "0")])}  # fmt: skip
                rows = entities(self.http.get_json("/api/stats/lead_lists_leads", params=params), "stats")
                for row in rows:
                    found.setdefault(str(row["lead_id"]), set()).add(str(row["leadlist_id"]))
                if len(rows) < limit:
                    break
                offset += len(rows)
        return found

    def contacts_by_id(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The contacts with these ids, as the sync reads them (with segment ids); absent ids are left out."""
        return self._listed_by_ids("/api/contacts", "contacts", ids, self.with_segment_ids)

    def contact_ids(self) -> Iterator[list[str]]:
        """Every contact id, in pages (the deletion sweep)."""
        for page in self._pages("/api/contacts", "contacts", [], page_size=max(self.page_size, ID_PAGE_SIZE),
                                minimal="true"):  # fmt: skip
            yield [str(raw["id"]) for raw in page]

    def contact_gone(self, contact_id: str, stored: dict[str, Any]) -> bool:
        """Whether Mautic answers 404 for the contact."""
        return self._gone(f"/api/contacts/{contact_id}")

    def segments(self) -> Iterator[list[Record]]:
        """Every segment, each with its live member count: the whole list, since a contact joining or leaving a
        segment changes its count but not its `dateModified`."""
        for page in self._pages("/api/segments", "lists", []):
            yield [(raw, changed_at(raw)) for raw in self.with_member_totals(page)]

    def with_member_totals(self, segments: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The segments with `memberCount` set to their live member count."""
        return [{**raw, "memberCount": self.segment_member_count(str(raw["id"]))} for raw in segments]

    def segment_member_count(self, segment_id: str) -> int:
        """How many contacts the segment has now (`lead_lists_leads` rows not manually removed)."""
        params = {"start": "0", "limit": "1",
                  **_where_params([("leadlist_id", "eq", segment_id), ("manually_removed", "eq", "0")])}  # fmt: skip
        body = self.http.get_json("/api/stats/lead_lists_leads", params=params)
        return int(body.get("total") or 0) if isinstance(body, dict) else 0

    def segments_by_id(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The segments with these ids, as the sync reads them (with member counts); absent ids are left out."""
        return self._listed_by_ids("/api/segments", "lists", ids, self.with_member_totals)

    def segment_ids(self) -> Iterator[list[str]]:
        """Every segment id, in pages (the deletion sweep)."""
        for page in self._pages("/api/segments", "lists", [], minimal="true"):
            yield [str(raw["id"]) for raw in page]

    def segment_memberships(self) -> Iterator[list[tuple[str, str]]]:
        """Every (contact id, segment id) membership not manually removed, segment by segment in pages by contact
        id (the daily sweep's check of the contacts' `segment_ids`, which joins and leaves do not date)."""
        size = self.id_page_size
        for segments in self.segment_ids():
            for segment in segments:
                last = 0
                while True:
                    where = [("leadlist_id", "eq", segment), ("manually_removed", "eq", "0"),
                             ("lead_id", "gt", str(last))]  # fmt: skip
                    params = {"start": "0", "limit": str(size), "order[0][col]": "lead_id", "order[0][dir]": "ASC",
                              **_where_params(where)}  # fmt: skip
                    rows = entities(self.http.get_json("/api/stats/lead_lists_leads", params=params), "stats")
                    leads = sorted(int(row["lead_id"]) for row in rows)
                    yield [(str(lead), segment) for lead in leads if lead > last]
                    if len(rows) < size or not leads or leads[-1] <= last:
                        break
                    last = leads[-1]

    def contacts_read_again(self, ids: list[str]) -> list[Record]:
        """These contacts as the sync reads them (with segment ids), at their versions; absent ids are left out."""
        return [(raw, changed_at(raw)) for raw in self.contacts_by_id(ids).values()]

    def segment_gone(self, segment_id: str, stored: dict[str, Any]) -> bool:
        """Whether Mautic answers 404 for the segment."""
        return self._gone(f"/api/segments/{segment_id}")

    def _gone(self, path: str) -> bool:
        try:
            self.http.send("GET", path)
        except ProviderError as exc:
            if exc.status == 404:
                return True
            raise
        return False

    def campaign_ids(self) -> Iterator[list[str]]:
        for page in self._by_id([], minimal="true"):
            yield [str(raw["id"]) for raw in page]

    def campaigns_by_id(self, ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The campaigns with these ids, as the sync lists them (without member counts); absent ids are left out."""
        return self._listed_by_ids("/api/campaigns", "campaigns", ids)

    def _listed_by_ids(
        self, path: str, key: str, ids: Collection[str],
        complete: Callable[[list[dict[str, Any]]], Iterable[dict[str, Any]]] | None = None,
    ) -> dict[str, dict[str, Any]]:  # fmt: skip
        """The records of a list endpoint with these ids (`where id in`, a page of ids per request), each page
        passed through `complete` (what the sync adds to them); absent ids are left out."""
        found: dict[str, dict[str, Any]] = {}
        ordered = sorted(ids, key=_id_order)
        for start in range(0, len(ordered), self.page_size):
            chunk = ordered[start : start + self.page_size]
            params = {"start": "0", "limit": str(len(chunk)), "orderBy": "id", "orderByDir": "ASC",
                      "where[0][col]": "id", "where[0][expr]": "in", "where[0][val]": ",".join(chunk)}  # fmt: skip
            page = entities(self.http.get_json(path, params=params), key)
            for raw in complete(page) if complete is not None else page:
                found[str(raw["id"])] = raw
        return found

    def campaign(self, campaign_id: str) -> dict[str, Any] | None:
        """One campaign (`GET /api/campaigns/{id}`), or None when Mautic answers 404."""
        body = self._get_or_none(f"/api/campaigns/{campaign_id}")
        return body.get("campaign") if isinstance(body, dict) else None

    def campaign_member_count(self, campaign_id: str) -> int | None:
        """How many contacts the campaign has now (not manually removed), or None when it is gone (404)."""
        body = self._get_or_none(f"/api/campaigns/{campaign_id}/contacts", params={"start": "0", "limit": "1"})
        if not isinstance(body, dict):
            return None
        return int(body.get("total") or 0)

    def campaigns_of_contacts(self, contact_ids: Collection[str]) -> set[str]:
        """Ids of the campaigns these contacts are in or were removed from (`campaign_leads` rows, paged)."""
        campaigns: set[str] = set()
        ordered = sorted(contact_ids, key=_id_order)
        for start in range(0, len(ordered), self.page_size):
            chunk = ",".join(ordered[start : start + self.page_size])
            offset = 0
            while True:
                params = {"start": str(offset), "limit": str(self.page_size), "where[0][col]": "lead_id",
                          "where[0][expr]": "in", "where[0][val]": chunk, "order[0][col]": "campaign_id",
                          "order[0][dir]": "ASC", "order[1][col]": "lead_id", "order[1][dir]": "ASC"}  # fmt: skip
                rows = entities(self.http.get_json("/api/stats/campaign_leads", params=params), "stats")
                campaigns.update(str(row["campaign_id"]) for row in rows)
                if len(rows) < self.page_size:
                    break
                offset += len(rows)
        return campaigns

    def _get_or_none(self, path: str, **kwargs: Any) -> Any:
        try:
            return self.http.get_json(path, **kwargs)
        except ProviderError as exc:
            if exc.status == 404:
                return None
            raise

    def campaign_gone(self, campaign_id: str, stored: dict[str, Any]) -> bool:
        """Whether Mautic answers 404 for the campaign."""
        return self._gone(f"/api/campaigns/{campaign_id}")

    # --- writes (the outbox's actions) ---------------------------------------------------------------------

    def write(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """One write, sent once (`HttpClient.send(once=True)`): a timeout, a dropped connection or a 5xx is raised at
        once, since Mautic may have acted and takes no idempotency key; a refusal (4xx) raises a `ProviderError`
        with Mautic's message (`refusal`). Returns the status and the answer (a JSON object)."""
        options: dict[str, Any] = {"json": body} if body is not None else {}
        try:
            response = self.http.send(method, path, once=True, **options)
        except ProviderError as exc:
            raise refusal(exc) from None
        answer = orjson.loads(response.content) if response.content else {}
        if not isinstance(answer, dict):
            raise ProviderError("Mautic answered the write with something other than a JSON object",
                                provider="mautic", connection_id=self.http.connection_id,
                                endpoint=f"{method} {path}", status=response.status_code)  # fmt: skip
        return response.status_code, answer

    def contacts_with_email(self, email: str) -> list[dict[str, Any]]:
        """The contacts whose email is `email` (Mautic compares it case-insensitively), as the sync lists them, oldest
        first."""
        params = {"start": "0", "limit": "20", "orderBy": "id", "orderByDir": "ASC", "where[0][col]": "email",
                  "where[0][expr]": "eq", "where[0][val]": email}  # fmt: skip
        found = entities(self.http.get_json("/api/contacts", params=params), "contacts")
        return sorted(found, key=lambda raw: int(raw["id"]))

    def campaigns_describing(self, text: str) -> list[dict[str, Any]]:
        """The campaigns whose description contains `text` (`where description like %text%`), as the sync lists them
        (without member counts), oldest first."""
        params = {"start": "0", "limit": "20", "orderBy": "id", "orderByDir": "ASC", "where[0][col]": "description",
                  "where[0][expr]": "like", "where[0][val]": f"%{text}%"}  # fmt: skip
        found = entities(self.http.get_json("/api/campaigns", params=params), "campaigns")
        return sorted(found, key=lambda raw: int(raw["id"]))

    def segments_listed(self, ids: Collection[str]) -> set[str]:
        """Which of these segment ids Mautic has."""
        return set(self._listed_by_ids("/api/segments", "lists", ids))
