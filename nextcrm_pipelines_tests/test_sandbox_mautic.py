"""Tests of the Mautic emulator in ``nextcrm_sandbox.mautic``, over real loopback HTTP.

Each test drives an installation under ``/mautic/{account}`` the way the sync code will: authlib's
OAuth2Client through ``/oauth/v2/authorize`` and ``/oauth/v2/token``, httpx against ``/api/...`` with
Mautic's list parameters, and the control API through ``MauticControl``. Tests that move the sandbox
clock start a server of their own.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client

from nextcrm_sandbox.mautic import (
    MAUTIC_VERSION,
    REFRESH_TTL,
    MauticControl,
    parse_datetime,
    php_json,
    php_params,
)
from nextcrm_sandbox.server import SandboxServer

NOW = 1_770_000_000  # 2026-02-02T02:40:00Z
CLIENT_ID = "1_3bcbxd9e24g0gk4swg0kwgcwg4o8k8g4g4cc4ckssc0sk8g8"
CLIENT_SECRET = "4ok2x70rlfokc8g0wws8c8kwcokw80k44sg48goc0ok4w0so0k"
REDIRECT = "http://127.0.0.1:8765/mautic/callback"
ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
CLIENTS = [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [REDIRECT]}]


class Api:
    """A JSON client for one installation, authenticated by bearer token, Basic credentials or nothing."""

    def __init__(
        self, server: SandboxServer, account: str, token: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.base = f"{server.url}/mautic/{account}"
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(headers={**auth, **(headers or {})}, timeout=30)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(f"{self.base}/api{path}", params=params)

    def ok(self, path: str, **params: Any) -> dict[str, Any]:
        resp = self.get(path, **params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def control(server: SandboxServer) -> MauticControl:
    return MauticControl(server)


@pytest.fixture(scope="module")
def account(control: MauticControl) -> str:
    """A read-only installation shared by the query tests."""
    spec = {"seed": 7, "days": 20, "campaigns": 40, "contacts": 120, "segments": 6, "emails": 12}
    return control.add_account(id="shared", clients=CLIENTS, **spec)["id"]


@pytest.fixture(scope="module")
def api(server: SandboxServer, control: MauticControl, account: str) -> Iterator[Api]:
    client = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    yield client
    client.close()


@pytest.fixture
def own() -> Iterator[tuple[SandboxServer, MauticControl]]:
    """A sandbox of its own, for tests that move the clock."""
    srv = SandboxServer(now=NOW).start()
    try:
        yield srv, MauticControl(srv)
    finally:
        srv.stop()


def _small(control: MauticControl, account_id: str, **spec: Any) -> str:
    base = {"seed": 3, "days": 10, "campaigns": 8, "contacts": 20, "segments": 3, "emails": 3, "clients": CLIENTS}
    return control.add_account(id=account_id, **{**base, **spec})["id"]


def _oauth(server: SandboxServer, **kwargs: Any) -> OAuth2Client:
    return OAuth2Client(
        CLIENT_ID,
        CLIENT_SECRET,
        redirect_uri=REDIRECT,
        token_endpoint_auth_method="client_secret_post",
        **kwargs,
    )


def _authorize(server: SandboxServer, account: str, client: OAuth2Client, **extra: str) -> str:
    url, state = client.create_authorization_url(f"{server.url}/mautic/{account}/oauth/v2/authorize", **extra)
    resp = httpx.get(url, follow_redirects=False)
    assert resp.status_code == 302, resp.text
    location = resp.headers["location"]
    assert parse_qs(urlsplit(location).query)["state"] == [state]
    return location


def _token_url(server: SandboxServer, account: str) -> str:
    return f"{server.url}/mautic/{account}/oauth/v2/token"


def _error(resp: httpx.Response) -> dict[str, Any]:
    errors = resp.json()["errors"]
    assert len(errors) == 1
    return errors[0]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- OAuth ---------------------------------------------------------------------------------------------


def test_authorization_code_flow_issues_bearer_tokens_with_null_scope(
    server: SandboxServer, control: MauticControl
) -> None:
    users = [{"username": "admin", "password": "a"}, {"username": "ops", "password": "b"}]
    account = _small(control, "oauth-code", users=users)
    with _oauth(server) as client:
        location = _authorize(server, account, client)
        assert location.startswith(REDIRECT + "?")
        token = client.fetch_token(_token_url(server, account), authorization_response=location)
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 3600
    assert token["scope"] is None
    assert token["refresh_token"]
    api = Api(server, account, token["access_token"])
    resp = api.get("/campaigns")
    assert resp.status_code == 200
    assert resp.headers["Mautic-Version"] == MAUTIC_VERSION
    assert resp.json()["total"] == 8
    api.close()
    with _oauth(server) as client:
        location = _authorize(server, account, client, sandbox_user="ops")
        client.fetch_token(_token_url(server, account), authorization_response=location)
    state = control.oauth_state(account)
    assert state["stats"]["authorization_code"] == 2
    assert [g["subject"]["username"] for g in state["grants"]] == ["admin", "ops"]


def test_token_endpoint_speaks_oauth2_php_inside_the_errors_envelope(
    server: SandboxServer, control: MauticControl
) -> None:
    account = _small(control, "oauth-errors")
    control.add_client(account, "2_nocc", "secret-2", grant_types=["authorization_code", "refresh_token"])
    url = _token_url(server, account)
    missing = httpx.post(url, data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    assert missing.status_code == 400
    assert _error(missing) == {
        "message": "Invalid grant_type parameter or parameter missing",
        "code": 400,
        "type": "invalid_request",
    }
    wrong = httpx.post(url, data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "x"})
    assert wrong.status_code == 400
    assert _error(wrong)["type"] == "invalid_client"
    assert _error(wrong)["message"] == "The client credentials are invalid"
    narrow = httpx.post(
        url, data={"grant_type": "client_credentials", "client_id": "2_nocc", "client_secret": "secret-2"}
    )
    assert _error(narrow)["type"] == "unauthorized_client"
    with _oauth(server) as client:
        location = _authorize(server, account, client)
    code = parse_qs(urlsplit(location).query)["code"][0]
    form = {"grant_type": "authorization_code", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "code": code}
    mismatch = httpx.post(url, data={**form, "redirect_uri": "http://127.0.0.1:9/elsewhere"})
    assert _error(mismatch)["type"] == "redirect_uri_mismatch"
    without_redirect = httpx.post(url, data=form)  # optional at the token step, as in oauth2-php
    assert without_redirect.status_code == 200, without_redirect.text
    reused = httpx.post(url, data={**form, "redirect_uri": REDIRECT})
    assert reused.status_code == 400
    assert _error(reused)["message"] == "Code doesn't exist or is invalid for the client"
    unknown = httpx.get(f"{server.url}/mautic/{account}/oauth/v2/authorize", params={"client_id": "9_nobody"})
    assert unknown.status_code == 400
    assert _error(unknown) == {"message": "Unknown client", "code": 400, "type": "invalid_client"}


def test_refresh_rotates_once_and_access_and_refresh_tokens_expire(
    own: tuple[SandboxServer, MauticControl],
) -> None:
    srv, ctl = own
    account = _small(ctl, "rotate")
    with _oauth(srv) as client:
        token = client.fetch_token(_token_url(srv, account), authorization_response=_authorize(srv, account, client))
        first = token["refresh_token"]
        renewed = client.refresh_token(_token_url(srv, account), refresh_token=first)
    assert renewed["refresh_token"] != first
    form = {"grant_type": "refresh_token", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    old = httpx.post(_token_url(srv, account), data={**form, "refresh_token": first})
    assert old.status_code == 400  # the superseded token is deleted at once: no grace period
    assert _error(old) == {"message": "Invalid refresh token", "code": 400, "type": "invalid_grant"}
    api = Api(srv, account, renewed["access_token"])
    assert api.get("/campaigns").status_code == 200
    srv.advance_clock(3601)
    expired = api.get("/campaigns")
    assert expired.status_code == 401
    assert _error(expired) == {
        "message": "The access token provided has expired.",
        "code": 401,
        "type": "invalid_grant",
    }
    api.close()
    srv.advance_clock(REFRESH_TTL)
    dead = httpx.post(_token_url(srv, account), data={**form, "refresh_token": renewed["refresh_token"]})
    assert dead.status_code == 400
    assert _error(dead)["message"] == "Refresh token has expired"


def test_client_credentials_gets_an_hour_and_no_refresh_token(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "machine")
    with _oauth(server) as client:
        token = client.fetch_token(_token_url(server, account), grant_type="client_credentials")
    assert token["expires_in"] == 3600
    assert "refresh_token" not in token
    api = Api(server, account, token["access_token"])
    assert api.get("/contacts").status_code == 200
    api.close()


def test_login_form_signs_the_user_in_before_the_code(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "login", login_form=True, users=[{"username": "marta", "password": "pw-1"}])
    base = f"{server.url}/mautic/{account}/oauth/v2"
    with _oauth(server) as client:
        url, state = client.create_authorization_url(f"{base}/authorize")
    with httpx.Client(follow_redirects=False) as browser:
        first = browser.get(url)
        assert first.status_code == 302
        assert first.headers["location"].endswith("/oauth/v2/authorize_login")
        page = browser.get(f"{base}/authorize_login")
        assert 'name="_username"' in page.text and "authorize_login_check" in page.text
        bad = browser.post(f"{base}/authorize_login_check", data={"_username": "marta", "_password": "nope"})
        assert "error=1" in bad.headers["location"]
        good = browser.post(f"{base}/authorize_login_check", data={"_username": "marta", "_password": "pw-1"})
        assert good.status_code == 302
        back = browser.get(f"{server.url}{good.headers['location']}")
    assert back.status_code == 302
    params = parse_qs(urlsplit(back.headers["location"]).query)
    assert params["state"] == [state] and params["code"]
    assert control.oauth_state(account)["grants"] == []  # no token yet: the code is still to be exchanged


# --- switches and credentials -------------------------------------------------------------------------


def test_api_and_basic_auth_switches(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "switches", users=[{"username": "api", "password": "s3cret"}])
    basic = Api(server, account, headers={"Authorization": _basic("api", "s3cret")})
    off = basic.get("/campaigns")
    assert off.status_code == 403
    assert _error(off)["type"] == "access_denied"
    assert "Basic Auth disabled" in _error(off)["message"]
    client_basic = httpx.post(
        _token_url(server, account),
        data={"grant_type": "client_credentials"},
        headers={"Authorization": _basic(CLIENT_ID, CLIENT_SECRET)},
    )
    assert client_basic.status_code == 403  # ApiSubscriber also guards /oauth
    control.configure(account, basic_auth=True)
    assert basic.ok("/campaigns")["total"] == 8
    wrong = Api(server, account, headers={"Authorization": _basic("api", "wrong")})
    assert wrong.get("/campaigns").status_code == 401
    control.configure(account, api_enabled=False)
    disabled = basic.get("/campaigns")
    assert disabled.status_code == 403
    assert _error(disabled) == {
        "message": "API disabled. You need to enable the API in the API settings page of your Mautic account.",
        "code": 403,
        "type": "api_disabled",
    }
    assert httpx.post(_token_url(server, account), data={"grant_type": "client_credentials"}).status_code == 403
    basic.close()
    wrong.close()


def test_bearer_in_header_or_query_one_method_at_a_time(
    server: SandboxServer, control: MauticControl, account: str
) -> None:
    token = control.grant(account, CLIENT_ID)["token"]["access_token"]
    anonymous = Api(server, account)
    assert anonymous.ok("/campaigns", access_token=token)["total"] == 40
    nobody = anonymous.get("/campaigns")
    assert nobody.status_code == 401
    assert _error(nobody) == {"message": "API authorization denied.", "code": 401, "type": "access_denied"}
    invalid = anonymous.get("/campaigns", access_token="not-a-token")
    assert _error(invalid) == {"message": "The access token provided is invalid.", "code": 401, "type": "invalid_grant"}
    anonymous.close()
    both = Api(server, account, token)
    twice = both.get("/campaigns", access_token=token)
    assert twice.status_code == 400
    assert _error(twice)["type"] == "invalid_request"
    both.close()


def test_expired_and_revoked_grants_stop_working(server: SandboxServer, control: MauticControl, account: str) -> None:
    first = control.grant(account, CLIENT_ID)
    early = Api(server, account, first["token"]["access_token"])
    assert early.get("/emails").status_code == 200
    assert control.expire_access(account, first["grant_id"])["result"] == 1
    assert _error(early.get("/emails"))["message"] == "The access token provided has expired."
    early.close()
    granted = control.grant(account, CLIENT_ID)
    api = Api(server, account, granted["token"]["access_token"])
    assert api.get("/emails").status_code == 200
    control.revoke_grant(account, granted["grant_id"])
    assert _error(api.get("/emails"))["message"] == "The access token provided is invalid."
    api.close()


# --- lists ---------------------------------------------------------------------------------------------


def test_lists_are_keyed_by_id_with_totals_typed_per_entity(api: Api) -> None:
    campaigns = api.ok("/campaigns")
    assert campaigns["total"] == 40
    assert len(campaigns["campaigns"]) == 30  # default_pagelimit
    assert all(key == str(item["id"]) for key, item in campaigns["campaigns"].items())
    contacts = api.ok("/contacts", limit=5)
    assert contacts["total"] == "120"
    assert len(contacts["contacts"]) == 5
    segments = api.ok("/segments")
    assert set(segments) == {"total", "lists"} and segments["total"] == 6
    emails = api.ok("/emails")
    assert emails["total"] == 12 and len(emails["emails"]) == 12
    items = list(api.ok("/campaigns", limit=0)["campaigns"].values())
    for item in items:
        assert ISO_RE.match(item["dateAdded"])
        if item["dateModified"] is None:
            assert item["modifiedBy"] is None and item["modifiedByUser"] is None
        else:
            assert ISO_RE.match(item["dateModified"]) and item["modifiedByUser"] == "Admin User"
    assert any(i["dateModified"] is None for i in items) and any(i["dateModified"] for i in items)


def test_empty_lists_are_arrays_for_paginated_entities_and_objects_for_contacts(api: Api) -> None:
    assert api.ok("/campaigns", search="no-such-campaign-anywhere") == {"total": 0, "campaigns": []}
    assert api.ok("/contacts", search="no-such-contact-anywhere") == {"total": "0", "contacts": {}}
    beyond = api.ok("/segments", start=100)
    assert beyond == {"total": 6, "lists": []}


def test_limit_has_no_maximum_and_zero_means_everything(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "big", campaigns=5, contacts=700)
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    assert len(api.ok("/contacts", limit=600)["contacts"]) == 600
    assert len(api.ok("/contacts", limit=0)["contacts"]) == 700
    api.close()


def test_order_by_order_array_and_default_contact_order(api: Api) -> None:
    names = [c["name"] for c in api.ok("/campaigns", limit=0, orderBy="name", orderByDir="DESC")["campaigns"].values()]
    assert names == sorted(names, key=str.casefold, reverse=True)
    modified = [c["dateModified"] for c in api.ok("/campaigns", limit=0, orderBy="dateModified")["campaigns"].values()]
    nulls = modified.count(None)
    assert modified[:nulls] == [None] * nulls  # NULL sorts first ascending, as in MySQL
    assert modified[nulls:] == sorted(modified[nulls:])
    ids = [int(k) for k in api.ok("/campaigns", **{"order[0][col]": "id", "order[0][dir]": "desc"})["campaigns"]]
    assert ids == sorted(ids, reverse=True)
    active = [c["lastActive"] for c in api.ok("/contacts", limit=0)["contacts"].values()]
    dated = [a for a in active if a]
    assert active[: len(dated)] == sorted(dated, reverse=True)  # default order: last_active DESC, NULLs last
    bad = api.get("/campaigns", orderBy="date_modified")  # campaigns are ORM entities: properties only
    assert bad.status_code == 500
    assert _error(bad)["code"] == 500


def test_where_clauses_filter_like_doctrine(api: Api) -> None:
    everything = api.ok("/campaigns", limit=0)["campaigns"]
    keyset = api.ok(
        "/campaigns",
        orderBy="id",
        **{"where[0][col]": "id", "where[0][expr]": "gt", "where[0][val]": "25"},
    )
    assert [int(k) for k in keyset["campaigns"]] == list(range(26, 41))
    watermark = sorted(c["dateModified"] for c in everything.values() if c["dateModified"])[3]
    changed = api.ok(
        "/campaigns",
        limit=0,
        **{"where[0][col]": "dateModified", "where[0][expr]": "gte", "where[0][val]": watermark},
    )["campaigns"]
    expected = {k for k, c in everything.items() if c["dateModified"] and c["dateModified"] >= watermark}
    assert set(changed) == expected  # never-modified rows (NULL) never match
    naive = watermark[:19].replace("T", " ")
    same = api.ok(
        "/campaigns", limit=0, **{"where[0][col]": "c.dateModified", "where[0][expr]": "gte", "where[0][val]": naive}
    )
    assert set(same["campaigns"]) == expected
    some = api.ok("/campaigns", **{"where[0][col]": "id", "where[0][expr]": "in", "where[0][val]": "3,5,8"})
    assert set(some["campaigns"]) == {"3", "5", "8"}
    either = api.ok(
        "/campaigns",
        **{
            "where[0][expr]": "orX",
            "where[0][val][0][col]": "id",
            "where[0][val][0][expr]": "eq",
            "where[0][val][0][val]": "2",
            "where[0][val][1][col]": "id",
            "where[0][val][1][expr]": "eq",
            "where[0][val][1][val]": "4",
        },
    )
    assert set(either["campaigns"]) == {"2", "4"}
    ignored = api.ok("/campaigns", **{"where[0][col]": "id", "where[0][expr]": "regexp", "where[0][val]": "1"})
    assert ignored["total"] == 40  # an expression Doctrine lacks is silently ignored
    contacts = api.ok(
        "/contacts", limit=0, **{"where[0][col]": "dateAdded", "where[0][expr]": "lt", "where[0][val]": "2000-01-01"}
    )
    assert contacts == {"total": "0", "contacts": {}}  # contacts take properties or columns (date_added)


def test_id_paging_in_id_order_matches_the_same_filter_in_any_order(api: Api) -> None:
    """Paging by id in id order is served from an index (a slice of the ids matching the rest); it answers
    exactly what the same clauses give in another order, totals included."""
    everything = api.ok("/contacts", limit=0)["contacts"]
    watermark = sorted(c["dateAdded"] for c in everything.values())[len(everything) // 3]
    for expr, bound in (("gt", "7"), ("gte", "7"), ("gt", "0"), ("gte", "100000")):
        clauses = {"where[0][col]": "dateAdded", "where[0][expr]": "gte", "where[0][val]": watermark,
                   "where[1][col]": "id", "where[1][expr]": expr, "where[1][val]": bound}  # fmt: skip
        indexed = api.ok("/contacts", limit=5, orderBy="id", **clauses)
        scanned = api.ok("/contacts", limit=0, orderBy="id", orderByDir="DESC", **clauses)
        expected = sorted(int(k) for k in scanned["contacts"])
        assert [int(k) for k in indexed["contacts"]] == expected[:5]
        assert indexed["total"] == scanned["total"] and int(scanned["total"]) == len(expected)
        low = int(bound) + (expr == "gt")
        assert expected == sorted(int(k) for k, c in everything.items()
                                  if int(k) >= low and c["dateAdded"] >= watermark)  # fmt: skip
    word = {"where[0][col]": "id", "where[0][expr]": "gt", "where[0][val]": "x"}  # not an integer: compared as before
    assert set(api.ok("/campaigns", limit=0, orderBy="id", **word)["campaigns"]) == set(
        api.ok("/campaigns", limit=0, orderBy="id", orderByDir="DESC", **word)["campaigns"]
    )


def test_segment_memberships_by_contact_or_segment_are_those_of_the_whole_table(api: Api) -> None:
    """`lead_lists_leads` looked up by `lead_id in (...)` or `leadlist_id eq` (as a primary key would be) answers
    exactly the rows of the whole table that match, in the order asked, with their total."""
    table = api.ok("/stats/lead_lists_leads", limit=100000)["stats"]
    kept = [r for r in table if r["manually_removed"] == "0"]
    assert len({r["leadlist_id"] for r in kept}) > 1
    leads = [*sorted({int(r["lead_id"]) for r in table})[::3][:40], 999999]
    ask = {"where[0][col]": "lead_id", "where[0][expr]": "in", "where[0][val]": ",".join(map(str, leads)),
           "where[1][col]": "manually_removed", "where[1][expr]": "eq", "where[1][val]": "0",
           "order[0][col]": "lead_id", "order[0][dir]": "ASC", "order[1][col]": "leadlist_id"}  # fmt: skip
    found = api.ok("/stats/lead_lists_leads", limit=100000, **ask)
    expected = sorted((r for r in kept if int(r["lead_id"]) in leads),
                      key=lambda r: (int(r["lead_id"]), int(r["leadlist_id"])))  # fmt: skip
    assert found["stats"] == expected and found["total"] == str(len(expected))
    page = api.ok("/stats/lead_lists_leads", start=3, limit=5, **ask)
    assert page["stats"] == expected[3:8] and page["total"] == str(len(expected))
    segment = kept[0]["leadlist_id"]
    counted = api.ok("/stats/lead_lists_leads", limit=1, **{
        "where[0][col]": "leadlist_id", "where[0][expr]": "eq", "where[0][val]": segment,
        "where[1][col]": "manually_removed", "where[1][expr]": "eq", "where[1][val]": "0"})  # fmt: skip
    assert counted["total"] == str(sum(r["leadlist_id"] == segment for r in kept))
    both = api.ok("/stats/lead_lists_leads", limit=100000, **{
        "where[0][col]": "leadlist_id", "where[0][expr]": "in", "where[0][val]": f"{segment},{segment}",
        "where[1][col]": "lead_id", "where[1][expr]": "eq", "where[1][val]": kept[0]["lead_id"]})  # fmt: skip
    assert both["stats"] == [r for r in table if (r["leadlist_id"], r["lead_id"]) == (segment, kept[0]["lead_id"])]


def test_keyset_paging_neither_skips_nor_duplicates_while_campaigns_arrive(
    server: SandboxServer, control: MauticControl
) -> None:
    account = _small(control, "paging", campaigns=25)
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    before = {r["id"] for r in control.export(account, "campaigns")["records"]}
    control.set_faults(account, insert_during_paging=2)
    seen: list[int] = []
    last = 0
    for _ in range(20):
        page = api.ok(
            "/campaigns",
            limit=7,
            orderBy="id",
            **{"where[0][col]": "id", "where[0][expr]": "gt", "where[0][val]": str(last)},
        )["campaigns"]
        seen.extend(int(k) for k in page)
        if len(page) < 7:
            break
        last = int(list(page)[-1])
    assert len(seen) == len(set(seen))
    assert before <= set(seen)
    offset: list[int] = []
    for start in range(0, 35, 7):
        page = api.ok("/campaigns", start=start, limit=7, orderBy="dateAdded", orderByDir="DESC")["campaigns"]
        offset.extend(int(k) for k in page)
    assert len(offset) != len(set(offset))  # offset paging over newest-first rows repeats itself
    control.clear_faults(account)
    api.close()


def test_published_is_php_truthy_and_published_only_is_ignored(api: Api) -> None:
    everything = api.ok("/campaigns", limit=0)["campaigns"]
    published = {k for k, c in everything.items() if c["isPublished"]}
    assert 0 < len(published) < 40
    assert set(api.ok("/campaigns", limit=0, published=1)["campaigns"]) == published
    assert set(api.ok("/campaigns", limit=0, published="false")["campaigns"]) == published  # "false" is truthy in PHP
    assert api.ok("/campaigns", limit=0, published=0)["total"] == 40
    assert api.ok("/campaigns", limit=0, publishedOnly=1)["total"] == 40


def test_search_words_and_commands(api: Api) -> None:
    everything = api.ok("/campaigns", limit=0)["campaigns"]
    published = {k for k, c in everything.items() if c["isPublished"]}
    assert set(api.ok("/campaigns", limit=0, search="is:published")["campaigns"]) == published
    assert set(api.ok("/campaigns", limit=0, search="!is:published")["campaigns"]) == set(everything) - published
    assert set(api.ok("/campaigns", search="ids:1,2,3")["campaigns"]) == {"1", "2", "3"}
    word = next(iter(everything.values()))["name"].split()[0]
    hits = api.ok("/campaigns", limit=0, search=word)["campaigns"]
    assert hits and all(word.lower() in (c["name"] + (c["description"] or "")).lower() for c in hits.values())
    contact = next(iter(api.ok("/contacts", limit=1, search="email:%example.com")["contacts"].values()))
    email = contact["fields"]["all"]["email"]
    found = api.ok("/contacts", search=f"email:{email}")
    assert found["total"] == "1" and str(contact["id"]) in found["contacts"]


def test_minimal_select_and_read_one(api: Api, control: MauticControl, account: str) -> None:
    minimal = next(iter(api.ok("/campaigns", limit=1, minimal=1)["campaigns"].values()))
    assert "events" not in minimal and {"id", "name", "category", "isPublished"} <= set(minimal)
    selected = api.ok("/campaigns", limit=3, **{"select[]": "name"})["campaigns"]
    assert all(set(c) == {"id", "name"} for c in selected.values())
    exported = {r["id"]: r for r in control.export(account, "campaigns")["records"]}
    one = api.ok("/campaigns/3")
    assert one == {"campaign": exported[3]}
    assert "contactCount" not in one["campaign"]
    assert set(api.ok("/segments/2")) == {"list"}
    assert set(api.ok("/contacts/2")) == {"contact"}
    missing = api.get("/campaigns/99999")
    assert missing.status_code == 404
    assert missing.json() == {"errors": [{"code": 404, "message": "Item was not found.", "details": [], "type": None}]}
    assert missing.headers["Mautic-Version"] == MAUTIC_VERSION
    route = api.http.post(f"{api.base}/api/emails/new", json={"name": "x"})
    assert route.status_code == 404
    assert _error(route)["message"] == "Requested URL not found: /api/emails/new"


def test_campaign_and_contact_membership_lists(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "members", campaigns=6, contacts=40)
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    rows = control.export(account, "campaign_contacts")["records"]
    by_campaign: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_campaign.setdefault(row["campaign_id"], []).append(row)
    cid, members = max(by_campaign.items(), key=lambda kv: len(kv[1]))
    listed = api.ok(f"/campaigns/{cid}/contacts")
    assert listed["total"] == str(len(members))
    assert listed["contacts"] == members
    assert set(members[0]) >= {"campaign_id", "lead_id", "date_added", "manually_removed", "manually_added"}
    assert all(isinstance(v, str) for v in members[0].values() if v is not None)
    page = api.ok(f"/campaigns/{cid}/contacts", start=1, limit=1)
    assert page["contacts"] == members[1:2]
    empty_campaign = control.add_record(account, "campaigns", {"name": "Nobody yet"})["id"]
    assert api.ok(f"/campaigns/{empty_campaign}/contacts") == {"total": "0", "contacts": []}
    loner = control.add_record(account, "contacts", {"firstname": "Solo"})["id"]
    assert api.ok(f"/contacts/{loner}/campaigns") == {"total": 0, "campaigns": []}
    assert api.ok(f"/contacts/{loner}/segments") == {"total": 0, "segments": []}
    now = server.clock()

    def live(r: dict[str, Any]) -> bool:
        up, down = r["publishUp"], r["publishDown"]
        in_window = (up is None or parse_datetime(up) <= now) and (down is None or parse_datetime(down) >= now)
        return bool(r["isPublished"]) and in_window

    published = {r["id"] for r in control.export(account, "campaigns")["records"] if live(r)}
    lead = members[0]["lead_id"]
    mine = {r["campaign_id"] for r in rows if r["lead_id"] == lead}
    joined = api.ok(f"/contacts/{lead}/campaigns")
    assert set(joined["campaigns"]) == {c for c in mine if int(c) in published}  # published right now only
    assert joined["total"] == len(joined["campaigns"])
    for key, item in joined["campaigns"].items():
        assert key == str(item["id"]) and ISO_RE.match(item["dateAdded"])
        assert isinstance(item["manuallyAdded"], bool) and item["manuallyRemoved"] is False
    api.close()


def test_contact_counts_are_cached_for_twelve_hours(own: tuple[SandboxServer, MauticControl]) -> None:
    srv, ctl = own
    account = _small(ctl, "counts")
    api = Api(srv, account, ctl.grant(account, CLIENT_ID)["token"]["access_token"])
    first = api.ok("/campaigns", limit=0, withContactCounts="true")["campaigns"]
    exported = ctl.export(account, "campaign_contacts")["records"]
    for cid, campaign in first.items():
        assert campaign["contactCount"] == sum(1 for r in exported if r["campaign_id"] == cid)
        assert ISO_RE.match(campaign["contactCountFetchedAt"])
    ctl.changes(account, joins=15)
    stale = api.ok("/campaigns", limit=0, withContactCounts="true")["campaigns"]
    assert {k: c["contactCount"] for k, c in stale.items()} == {k: c["contactCount"] for k, c in first.items()}
    srv.advance_clock(12 * 3600)
    api.close()
    api = Api(srv, account, ctl.grant(account, CLIENT_ID)["token"]["access_token"])
    fresh = api.ok("/campaigns", limit=0, withContactCounts="true")["campaigns"]
    exported = ctl.export(account, "campaign_contacts")["records"]
    for cid, campaign in fresh.items():
        assert campaign["contactCount"] == sum(1 for r in exported if r["campaign_id"] == cid)
    assert fresh != stale
    api.close()


# --- changes, records, exports -------------------------------------------------------------------------


def test_date_modified_stays_null_until_the_first_edit(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "edits")
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    created = control.add_record(account, "campaign", {"name": "Spring launch", "isPublished": False}, at=NOW - 3600)
    assert created["dateModified"] is None and created["dateAdded"] == "2026-02-02T01:40:00+00:00"
    assert api.ok(f"/campaigns/{created['id']}")["campaign"]["name"] == "Spring launch"
    edited = control.update_record(account, "campaigns", created["id"], {"description": "now with events"}, at=NOW)
    assert edited["dateModified"] == "2026-02-02T02:40:00+00:00"
    assert edited["modifiedByUser"] == "Admin User"
    result = control.changes(account, creates=2, edits=1, deletes=1, publishes=1, unpublishes=1)
    assert len(result["created"]) == 2 and len(result["deleted"]) == 1
    gone = result["deleted"][0]
    assert api.get(f"/campaigns/{gone}").status_code == 404
    assert gone in control.export(account, "campaigns")["deleted_ids"]
    for rid in result["published"]:
        assert api.ok(f"/campaigns/{rid}")["campaign"]["isPublished"] is True
    for rid in result["unpublished"]:
        assert api.ok(f"/campaigns/{rid}")["campaign"]["isPublished"] is False
    for rid in result["created"]:
        assert api.ok(f"/campaigns/{rid}")["campaign"]["dateModified"] is None
    assert api.ok("/campaigns")["total"] == 8 + 1 + 2 - 1
    api.close()


def test_generation_is_deterministic_and_handles_twenty_thousand_records(control: MauticControl) -> None:
    one = control.add_account(id="det-a", seed=42, campaigns=5, contacts=30)
    two = control.add_account(id="det-b", seed=42, campaigns=5, contacts=30)
    assert one["counts"] == two["counts"]

    def names(account: str) -> list[Any]:
        return [(r["id"], r["fields"]["all"].get("email")) for r in control.export(account, "contacts")["records"]]

    assert names("det-a") == names("det-b")
    assert control.add_account(seed=42, campaigns=1, contacts=1)["id"] == control.add_account(seed=42)["id"]
    big = control.add_account(id="bulk", seed=9, campaigns=200, contacts=19_800, segments=10, emails=20)
    assert big["counts"]["contacts"] == 19_800
    assert big["generation_seconds"] < 10
    control.delete_account("bulk")


def test_offset_and_time_formats_follow_the_installation(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "offset", utc_offset="-05:00")
    record = control.add_record(account, "contacts", {"firstname": "Zoë", "email": "zoe@example.com"}, at=NOW)
    assert record["dateAdded"] == "2026-02-01T21:40:00-05:00"
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    raw = api.get(f"/contacts/{record['id']}").content
    assert b'"Zo\\u00eb"' in raw  # PHP's json_encode escapes non-ASCII ...
    assert b"zoe@example.com" in raw
    emails = api.get("/emails", limit=1).content
    assert b"<\\/h1>" in emails  # ... and slashes
    api.close()


# --- limits, faults, statistics ------------------------------------------------------------------------


def test_hourly_rate_limit_answers_429_with_headers(own: tuple[SandboxServer, MauticControl]) -> None:
    srv, ctl = own
    account = _small(ctl, "limited", rate_limit=3, rate_limit_period=600)
    token = ctl.grant(account, CLIENT_ID)["token"]["access_token"]
    api = Api(srv, account, token)
    remaining = [api.get("/segments").headers["X-RateLimit-Remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    over = api.get("/segments")
    assert over.status_code == 429
    assert over.json() == {
        "errors": [{"code": 429, "message": "You exceeded the rate limit of 3 API calls per hour.", "details": []}]
    }
    assert over.headers["X-RateLimit-Limit"] == "3"
    assert int(over.headers["X-RateLimit-Reset"]) >= NOW + 600
    other = Api(srv, account, ctl.grant(account, CLIENT_ID)["token"]["access_token"])
    assert other.get("/segments").status_code == 200  # the key holds the OAuth token
    srv.advance_clock(600)
    assert api.get("/segments").headers["X-RateLimit-Remaining"] == "2"
    assert ctl.stats()["by_account"][account]["throttled"] == 1
    api.close()
    other.close()


def test_faults_and_statistics(server: SandboxServer, control: MauticControl) -> None:
    account = _small(control, "faulty")
    api = Api(server, account, control.grant(account, CLIENT_ID)["token"]["access_token"])
    before = control.stats()
    control.set_faults(account, server_errors=1, server_error_status=503)
    failed = api.get("/emails")
    assert failed.status_code == 503
    assert _error(failed)["code"] == 503
    assert api.get("/emails").status_code == 200
    control.set_faults(account, rate_limited=1)
    limited = api.get("/emails")
    assert limited.status_code == 429 and limited.headers["X-RateLimit-Remaining"] == "0"
    control.set_faults(account, latency_ms=200)
    slow = api.get("/emails")
    assert slow.status_code == 200 and slow.elapsed.total_seconds() >= 0.2
    control.clear_faults(account)
    assert api.get("/emails").status_code == 200
    after = control.stats()
    assert after["total"] - before["total"] == 5
    assert after["by_route"]["GET /api/emails"] - before["by_route"].get("GET /api/emails", 0) == 5
    assert after["by_status"]["503"] - before["by_status"].get("503", 0) == 1
    assert after["by_account"][account]["requests"] == 5
    api.close()


def test_total_count_cache_can_make_contact_totals_stale(own: tuple[SandboxServer, MauticControl]) -> None:
    srv, ctl = own
    account = _small(ctl, "stale", total_count_ttl=600)
    api = Api(srv, account, ctl.grant(account, CLIENT_ID)["token"]["access_token"])
    assert api.ok("/contacts")["total"] == "20"
    ctl.changes(account, contact_creates=3)
    stale = api.ok("/contacts", limit=50)
    assert stale["total"] == "20" and len(stale["contacts"]) == 23
    srv.advance_clock(600)
    assert api.ok("/contacts")["total"] == "23"
    api.close()


# --- helpers -------------------------------------------------------------------------------------------


def test_php_helpers() -> None:
    assert php_params([("where[0][col]", "id"), ("where[0][val][]", "1"), ("where[0][val][]", "2"), ("a", "b")]) == {
        "where": {"0": {"col": "id", "val": {"0": "1", "1": "2"}}},
        "a": "b",
    }
    assert php_json({"h": "</p>", "n": "Müller"}) == b'{"h":"<\\/p>","n":"M\\u00fcller"}'
    assert parse_datetime("2026-02-02T02:40:00+01:00") == NOW - 3600
    assert parse_datetime("2026-02-02 02:40:00") == NOW
    assert parse_datetime("yesterday") is None
