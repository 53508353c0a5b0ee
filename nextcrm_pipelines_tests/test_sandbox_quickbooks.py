"""Tests of the QuickBooks Online emulator in ``nextcrm_sandbox.quickbooks``, over real loopback HTTP.

Each test drives the emulator the way the sync code will: authlib's OAuth2Client through the authorize
and token endpoints, httpx against ``/v3/company/{realmId}/...`` with Intuit's query language, CDC and
read-one, and the control API through ``QuickBooksControl``. Tests that move the sandbox clock or need
their own limits start a server of their own.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client

from nextcrm_sandbox.quickbooks import (
    CDC_MAX_DAYS,
    REFRESH_HARD_TTL,
    REFRESH_TTL,
    QueryError,
    QuickBooksControl,
    parse_query,
)
from nextcrm_sandbox.server import SandboxServer

NOW = 1_770_000_000  # 2026-02-02T02:40:00Z
CLIENT_ID = "qb-app-1"
CLIENT_SECRET = "qb-secret-1"
REDIRECT = "http://127.0.0.1:8765/callback"
SCOPE = "com.intuit.quickbooks.accounting"
XMLNS = "{http://schema.intuit.com/finance/v3}"


def _day_start(ts: int, offset_hours: int) -> int:
    """Unix time of the company-local midnight on the day of ``ts``."""
    tz = dt.timezone(dt.timedelta(hours=offset_hours))
    local = dt.datetime.fromtimestamp(ts, tz).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(local.timestamp())


class Api:
    """A bearer-authenticated JSON client for one realm."""

    def __init__(self, server: SandboxServer, realm: str, access_token: str) -> None:
        self.base = f"{server.url}/quickbooks/api/v3/company/{realm}"
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"}, timeout=30
        )

    def query(self, sql: str, **params: Any) -> httpx.Response:
        return self.http.get(f"{self.base}/query", params={"query": sql, "minorversion": "75", **params})

    def rows(self, sql: str, entity: str = "Invoice") -> list[dict[str, Any]]:
        resp = self.query(sql)
        assert resp.status_code == 200, resp.text
        return resp.json()["QueryResponse"].get(entity, [])

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(f"{self.base}{path}", params=params)

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def control(server: SandboxServer) -> QuickBooksControl:
    ctl = QuickBooksControl(server)
    ctl.add_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT])
    return ctl


@pytest.fixture(scope="module")
def realm(control: QuickBooksControl) -> str:
    """A read-only company shared by the query tests (no per-second limit, so tests can run fast)."""
    tenant = control.add_tenant(CLIENT_ID, seed=7, invoices=300, customers=40, days=20, requests_per_second=0)
    return tenant["id"]


@pytest.fixture(scope="module")
def api(server: SandboxServer, control: QuickBooksControl, realm: str) -> Iterator[Api]:
    token = control.grant(CLIENT_ID, realm)["token"]
    client = Api(server, realm, token["access_token"])
    yield client
    client.close()


@pytest.fixture
def own() -> Iterator[tuple[SandboxServer, QuickBooksControl]]:
    """A sandbox of its own, for tests that move the clock or mutate data."""
    srv = SandboxServer(now=NOW).start()
    ctl = QuickBooksControl(srv)
    ctl.add_client(CLIENT_ID, CLIENT_SECRET, [REDIRECT])
    try:
        yield srv, ctl
    finally:
        srv.stop()


def _new_tenant(ctl: QuickBooksControl, **spec: Any) -> str:
    base = {"seed": 3, "invoices": 60, "customers": 10, "days": 10, "requests_per_second": 0}
    return ctl.add_tenant(CLIENT_ID, **{**base, **spec})["id"]


def _oauth_client(server: SandboxServer, **kwargs: Any) -> OAuth2Client:
    return OAuth2Client(
        CLIENT_ID,
        CLIENT_SECRET,
        scope=SCOPE,
        redirect_uri=REDIRECT,
        token_endpoint_auth_method="client_secret_basic",
        **kwargs,
    )


def _authorize(server: SandboxServer, client: OAuth2Client, **extra: str) -> tuple[str, dict[str, list[str]]]:
    url, state = client.create_authorization_url(f"{server.url}/quickbooks/appcenter/connect/oauth2", **extra)
    resp = httpx.get(url, follow_redirects=False)
    assert resp.status_code == 302, resp.text
    location = resp.headers["location"]
    params = parse_qs(urlsplit(location).query)
    assert params["state"] == [state]
    return location, params


def _token_url(server: SandboxServer) -> str:
    return f"{server.url}/quickbooks/oauth/oauth2/v1/tokens/bearer"


def _basic() -> str:
    return "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()


# --- OAuth ---------------------------------------------------------------------------------------------


def test_authorize_redirect_appends_realm_id_and_token_has_intuit_fields(
    own: tuple[SandboxServer, QuickBooksControl],
) -> None:
    srv, ctl = own
    first = _new_tenant(ctl, seed=1)
    latest = _new_tenant(ctl, seed=2)
    with _oauth_client(srv) as client:
        location, params = _authorize(srv, client)
        assert params["realmId"] == [latest]  # the most recently added company of the app
        token = client.fetch_token(_token_url(srv), authorization_response=location)
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 3600
    assert token["x_refresh_token_expires_in"] == REFRESH_TTL == 8_726_400
    assert "x_refresh_token_hard_expires_in" not in token
    with _oauth_client(srv) as client:
        _location, params = _authorize(srv, client, sandbox_tenant=first)
    assert params["realmId"] == [first]
    api = Api(srv, latest, token["access_token"])
    assert api.rows("SELECT * FROM Invoice MAXRESULTS 1")
    assert api.query("SELECT * FROM Invoice").status_code == 200
    other = Api(srv, first, token["access_token"])
    denied = other.query("SELECT * FROM Invoice")
    assert denied.status_code == 403  # one authorisation reaches one realm
    assert denied.json()["fault"]["error"][0]["code"] == "3100"
    api.close()
    other.close()


def test_token_endpoint_accepts_credentials_in_basic_or_in_the_form_body(
    own: tuple[SandboxServer, QuickBooksControl],
) -> None:
    srv, ctl = own
    _new_tenant(ctl)

    def code() -> str:
        with _oauth_client(srv) as client:
            _location, params = _authorize(srv, client)
        return params["code"][0]

    # client_secret_post, as Intuit also accepts (and its discovery document lists).
    form = {"grant_type": "authorization_code", "code": code(), "redirect_uri": REDIRECT}
    wrong_body = httpx.post(_token_url(srv), data={**form, "client_id": CLIENT_ID, "client_secret": "nope"})
    assert (wrong_body.status_code, wrong_body.json()["error"]) == (401, "invalid_client")
    in_body = httpx.post(_token_url(srv), data={**form, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    assert in_body.status_code == 200, in_body.text
    assert in_body.json()["access_token"] and in_body.json()["x_refresh_token_expires_in"] == REFRESH_TTL
    refreshed = httpx.post(_token_url(srv), data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                  "client_secret": CLIENT_SECRET,
                                                  "refresh_token": in_body.json()["refresh_token"]})  # fmt: skip
    assert refreshed.status_code == 200, refreshed.text

    # client_secret_basic.
    form = {"grant_type": "authorization_code", "code": code(), "redirect_uri": REDIRECT}
    wrong = httpx.post(_token_url(srv), data=form, auth=(CLIENT_ID, "nope"))
    assert wrong.status_code == 401
    ok = httpx.post(
        _token_url(srv),
        data=form,
        headers={"Authorization": _basic(), "x-include-refresh-token-hard-expires-in": "true"},
    )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["x_refresh_token_hard_expires_in"] == REFRESH_HARD_TTL
    reused = httpx.post(_token_url(srv), data=form, headers={"Authorization": _basic()})
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"


def test_pkce_is_not_enforced(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    _new_tenant(ctl)
    with _oauth_client(srv, code_challenge_method="S256") as client:
        url, _state = client.create_authorization_url(
            f"{srv.url}/quickbooks/appcenter/connect/oauth2", code_verifier="v" * 64
        )
    assert "code_challenge=" in url
    location = httpx.get(url).headers["location"]
    form = {"grant_type": "authorization_code", "code": parse_qs(urlsplit(location).query)["code"][0]}
    form["redirect_uri"] = REDIRECT
    resp = httpx.post(_token_url(srv), data=form, headers={"Authorization": _basic()})
    assert resp.status_code == 200, resp.text  # no code_verifier sent, still accepted


def test_refresh_token_rotates_after_a_day_and_previous_lives_24h(
    own: tuple[SandboxServer, QuickBooksControl],
) -> None:
    srv, ctl = own
    _new_tenant(ctl)
    first = ctl.grant(CLIENT_ID)["token"]

    def refresh(token: str) -> httpx.Response:
        form = {"grant_type": "refresh_token", "refresh_token": token}
        return httpx.post(_token_url(srv), data=form, headers={"Authorization": _basic()})

    same = refresh(first["refresh_token"])
    assert same.status_code == 200
    assert same.json()["refresh_token"] == first["refresh_token"]  # younger than 24 h: value kept
    assert same.json()["access_token"] != first["access_token"]
    srv.advance_clock(86_400)
    rotated = refresh(first["refresh_token"]).json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["x_refresh_token_expires_in"] == REFRESH_TTL
    srv.advance_clock(86_400 - 60)
    retry = refresh(first["refresh_token"])
    assert retry.status_code == 200  # superseded but inside its 24 h
    assert retry.json()["refresh_token"] == rotated["refresh_token"]
    srv.advance_clock(120)
    dead = refresh(first["refresh_token"])
    assert dead.status_code == 400
    assert dead.json()["error"] == "invalid_grant"
    assert refresh(rotated["refresh_token"]).status_code == 200


def test_refresh_token_dies_after_idle_lifetime(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    _new_tenant(ctl)
    token = ctl.grant(CLIENT_ID)["token"]
    srv.advance_clock(REFRESH_TTL)
    form = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    resp = httpx.post(_token_url(srv), data=form, headers={"Authorization": _basic()})
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_grant"


def test_revoke_takes_json_token_with_basic_auth(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl)
    token = ctl.grant(CLIENT_ID, realm)["token"]
    url = f"{srv.url}/quickbooks/developer/v2/oauth2/tokens/revoke"
    assert httpx.post(url, json={"token": token["refresh_token"]}).status_code == 401
    resp = httpx.post(url, json={"token": token["refresh_token"]}, headers={"Authorization": _basic()})
    assert resp.status_code == 200
    api = Api(srv, realm, token["access_token"])
    denied = api.query("SELECT * FROM Invoice")
    assert denied.status_code == 401
    form = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    again = httpx.post(_token_url(srv), data=form, headers={"Authorization": _basic()})
    assert again.json()["error"] == "invalid_grant"
    api.close()


def test_expired_access_token_gets_lowercase_fault_3200(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl)
    grant = ctl.grant(CLIENT_ID, realm)
    api = Api(srv, realm, grant["token"]["access_token"])
    assert api.query("SELECT COUNT(*) FROM Invoice").status_code == 200
    srv.advance_clock(3600)
    resp = api.query("SELECT COUNT(*) FROM Invoice")
    assert resp.status_code == 401
    body = resp.json()
    assert "Fault" not in body
    error = body["fault"]["error"][0]
    assert error["code"] == "3200"
    assert error["message"] == "message=AuthenticationFailed; errorCode=003200; statusCode=401"
    assert error["detail"].startswith("Token expired")
    assert body["fault"]["type"] == "AUTHENTICATION"
    assert "invalid_token" in resp.headers["www-authenticate"]
    with _oauth_client(srv) as client:
        refreshed = client.refresh_token(_token_url(srv), refresh_token=grant["token"]["refresh_token"])
    fresh = Api(srv, realm, refreshed["access_token"])
    assert fresh.query("SELECT COUNT(*) FROM Invoice").status_code == 200
    ctl.expire_access(grant["grant_id"])
    missing = httpx.get(f"{fresh.base}/query", params={"query": "SELECT * FROM Invoice"})
    assert missing.status_code == 401
    assert ctl.oauth_state()["stats"]["refresh_token"] == 1
    api.close()
    fresh.close()


def test_environment_mismatch_is_403_3100(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    ctl.add_client("dev-keys", "s", [REDIRECT], environment="sandbox")
    prod = ctl.add_tenant("dev-keys", seed=5, invoices=5, customers=2, environment="production")
    assert prod["environment"] == "production"
    token = ctl.grant("dev-keys", prod["id"])["token"]
    api = Api(srv, prod["id"], token["access_token"])
    resp = api.query("SELECT * FROM Invoice")
    assert resp.status_code == 403
    error = resp.json()["fault"]["error"][0]
    assert error["code"] == "3100"
    assert "ApplicationAuthorizationFailed" in error["message"]
    sandbox_realm = ctl.add_tenant("dev-keys", seed=6, invoices=5, customers=2)["id"]
    token = ctl.grant("dev-keys", sandbox_realm)["token"]
    ok = Api(srv, sandbox_realm, token["access_token"])
    assert ok.query("SELECT * FROM Invoice").status_code == 200
    api.close()
    ok.close()


# --- query ---------------------------------------------------------------------------------------------


def test_query_envelope_and_post_application_text(api: Api) -> None:
    resp = api.query("SELECT * FROM Invoice STARTPOSITION 1 MAXRESULTS 10")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    block = body["QueryResponse"]
    assert block["startPosition"] == 1
    assert block["maxResults"] == 10 == len(block["Invoice"])
    assert "totalCount" not in block
    assert body["time"].endswith("-07:00")
    assert len(body["time"].split(".")[1]) == len("082-07:00")
    posted = api.http.post(
        f"{api.base}/query",
        params={"minorversion": "75"},
        content="SELECT * FROM Invoice STARTPOSITION 1 MAXRESULTS 10",
        headers={"Content-Type": "application/text"},
    )
    assert posted.status_code == 200
    assert posted.json()["QueryResponse"]["Invoice"] == block["Invoice"]


def test_paging_is_one_based_and_covers_the_export(api: Api, control: QuickBooksControl, realm: str) -> None:
    seen: list[str] = []
    position = 1
    while True:
        page = api.rows(f"select * from Invoice orderby Id startposition {position} maxresults 70")
        seen += [row["Id"] for row in page]
        if len(page) < 70:
            break
        position += 70
    export = control.export(realm, "invoice")
    assert seen == [row["Id"] for row in export["records"]]
    assert len(seen) == 300
    assert all(isinstance(i, str) and i.isdigit() for i in seen)
    assert [int(i) for i in seen] == sorted(int(i) for i in seen)
    default = api.query("SELECT * FROM Invoice").json()["QueryResponse"]
    assert default["maxResults"] == 100  # MAXRESULTS defaults to 100
    past_end = api.query("SELECT * FROM Invoice STARTPOSITION 301 MAXRESULTS 10")
    assert past_end.json()["QueryResponse"] == {}


def test_maxresults_is_capped_at_1000(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=1030, customers=20, deleted_invoices=0)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    page = api.query("SELECT * FROM Invoice MAXRESULTS 5000").json()["QueryResponse"]
    assert page["maxResults"] == 1000 == len(page["Invoice"])
    rest = api.query("SELECT * FROM Invoice STARTPOSITION 1001 MAXRESULTS 1000").json()["QueryResponse"]
    assert len(rest["Invoice"]) == 30
    api.close()


def test_last_updated_window_filters_and_boundaries(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=40, days=5)
    midnight = _day_start(NOW, -7) - 86_400
    at_midnight = ctl.add_record(realm, "invoice", updated_at=midnight)
    just_before = ctl.add_record(realm, "invoice", updated_at=midnight - 0.5)
    assert at_midnight["MetaData"]["LastUpdatedTime"].endswith("T00:00:00-07:00")
    assert just_before["MetaData"]["LastUpdatedTime"].endswith("T23:59:59-07:00")
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    day = dt.datetime.fromtimestamp(midnight, dt.timezone(dt.timedelta(hours=-7))).date()
    start, end = f"{day}T00:00:00-07:00", f"{day + dt.timedelta(days=1)}T00:00:00-07:00"

    def ids(where: str) -> set[str]:
        rows = api.rows(f"SELECT * FROM Invoice WHERE {where} MAXRESULTS 1000")
        return {row["Id"] for row in rows}

    window = ids(f"MetaData.LastUpdatedTime >= '{start}' AND MetaData.LastUpdatedTime < '{end}'")
    assert at_midnight["Id"] in window
    assert just_before["Id"] not in window
    assert ids(f"MetaData.LastUpdatedTime < '{start}'") >= {just_before["Id"]}
    assert at_midnight["Id"] not in ids(f"MetaData.LastUpdatedTime > '{start}'")
    assert just_before["Id"] in ids(f"Metadata.LastUpdatedTime <= '{day - dt.timedelta(days=1)}T23:59:59-07:00'")
    same_in_utc = ids(f"metadata.lastupdatedtime >= '{day}T07:00:00Z' AND METADATA.LASTUPDATEDTIME < '{end}'")
    assert same_in_utc == window
    export = ctl.export(realm, "invoice")["records"]
    expected = {
        r["Id"]
        for r in export
        if start <= r["MetaData"]["LastUpdatedTime"] < end  # all stamps share the -07:00 offset
    }
    assert window == expected
    api.close()


def test_order_by_last_updated_asc_and_desc(api: Api) -> None:
    asc = api.rows("SELECT * FROM Invoice ORDER BY MetaData.LastUpdatedTime ASC MAXRESULTS 1000")
    desc = api.rows("SELECT * FROM Invoice ORDERBY Metadata.LastUpdatedTime DESC MAXRESULTS 1000")
    stamps = [row["MetaData"]["LastUpdatedTime"] for row in asc]
    assert stamps == sorted(stamps)
    assert [row["MetaData"]["LastUpdatedTime"] for row in desc] == sorted(stamps, reverse=True)
    assert len(asc) == 300


def test_customers_default_to_active_only(api: Api, control: QuickBooksControl, realm: str) -> None:
    everyone = control.export(realm, "customer")["records"]
    inactive = [c for c in everyone if not c["Active"]]
    assert inactive, "the generated company has deactivated customers"
    assert all(c["DisplayName"].endswith(" (deleted)") for c in inactive)
    default = api.rows("SELECT * FROM Customer MAXRESULTS 1000", "Customer")
    assert len(default) == len(everyone) - len(inactive)
    assert all(c["Active"] for c in default)
    both = api.rows("SELECT * FROM Customer WHERE Active IN (true, false) MAXRESULTS 1000", "Customer")
    assert len(both) == len(everyone)
    only_inactive = api.rows("SELECT * FROM Customer WHERE Active = false", "Customer")
    assert {c["Id"] for c in only_inactive} == {c["Id"] for c in inactive}
    count = api.query("SELECT COUNT(*) FROM Customer").json()["QueryResponse"]
    assert count == {"totalCount": len(default)}
    count_all = api.query("SELECT COUNT(*) FROM Customer WHERE Active IN (true,false)").json()["QueryResponse"]
    assert count_all == {"totalCount": len(everyone)}


def test_field_list_like_and_id_filters(api: Api, control: QuickBooksControl, realm: str) -> None:
    rows = api.rows("SELECT Id, DocNumber FROM Invoice ORDERBY Id DESC MAXRESULTS 3")
    assert len(rows) == 3
    assert all(set(row) == {"Id", "DocNumber", "domain", "sparse"} for row in rows)
    assert [int(r["Id"]) for r in rows] == sorted((int(r["Id"]) for r in rows), reverse=True)
    customers = control.export(realm, "customer")["records"]
    first = customers[0]["DisplayName"][:2]
    liked = api.rows(
        f"SELECT * FROM Customer WHERE DisplayName LIKE '{first}%' AND Active IN (true, false)", "Customer"
    )
    assert {c["Id"] for c in liked} == {c["Id"] for c in customers if c["DisplayName"].startswith(first)}
    wanted = [customers[1]["Id"], customers[2]["Id"]]
    picked = api.rows(
        f"SELECT * FROM Customer WHERE Id IN ('{wanted[0]}', '{wanted[1]}') AND Active IN (true, false)", "Customer"
    )
    assert sorted(c["Id"] for c in picked) == sorted(wanted)


def test_count_and_empty_result(api: Api) -> None:
    assert api.query("SELECT COUNT(*) FROM Invoice").json()["QueryResponse"] == {"totalCount": 300}
    empty = api.query("SELECT * FROM Invoice WHERE MetaData.LastUpdatedTime > '2030-01-01T00:00:00-07:00'")
    assert empty.status_code == 200
    assert empty.json()["QueryResponse"] == {}
    assert api.query("SELECT * FROM Item").json()["QueryResponse"] == {}


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("", "4000"),
        ("SELECT * FORM Invoice", "4000"),
        ("SELECT * FROM Invoice WHERE Id = '1' OR Id = '2'", "4000"),
        ("SELECT * FROM Invoice MAXRESULTS many", "4000"),
        ("SELECT * FROM Invoice WHERE Nonsense = '1'", "4001"),
        ("SELECT * FROM Invoice WHERE Active = true", "4001"),
        ("SELECT * FROM Invoice WHERE MetaData.LastUpdatedTime >= 'yesterday'", "4001"),
        ("SELECT * FROM Unicorn", "4001"),
    ],
)
def test_invalid_queries_answer_validation_fault(api: Api, sql: str, code: str) -> None:
    resp = api.query(sql)
    assert resp.status_code == 400
    fault = resp.json()["Fault"]
    assert fault["type"] == "ValidationFault"
    assert fault["Error"][0]["code"] == code
    prefix = "QueryParserError" if code == "4000" else "QueryValidationError"
    assert fault["Error"][0]["Detail"].startswith(prefix)


def test_parse_query_reads_the_clauses() -> None:
    q = parse_query(
        "select count(*) from Customer where Metadata.LastUpdatedTime >= '2026-01-01' and Active in (true, false) "
        "order by Id desc maxresults 5 startposition 11"
    )
    assert q.entity == "Customer"
    assert q.count
    assert [c.op for c in q.where] == [">=", "in"]
    assert q.where[1].values == (True, False)
    assert q.order == (("Id", True),)
    assert (q.start, q.max_results) == (11, 5)
    with pytest.raises(QueryError) as err:
        parse_query("SELECT * FROM Invoice ORDER Id")
    assert err.value.code == "4000"


def test_company_utc_offset_is_used_for_times(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, utc_offset="+10:00", invoices=5, customers=2)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    body = api.query("SELECT * FROM Invoice").json()
    assert body["time"].endswith("+10:00")
    assert all(r["MetaData"]["LastUpdatedTime"].endswith("+10:00") for r in body["QueryResponse"]["Invoice"])
    api.close()


def test_minorversion_below_75_is_served_as_75(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=3, customers=2)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    assert api.query("SELECT * FROM Invoice", minorversion="4").status_code == 200
    assert api.query("SELECT * FROM Invoice", minorversion="80").status_code == 200
    assert ctl.stats()["minor_versions"] == {"75": 1, "80": 1}
    api.close()


def test_xml_unless_accept_asks_for_json(api: Api) -> None:
    resp = httpx.get(
        f"{api.base}/query",
        params={"query": "SELECT * FROM Invoice MAXRESULTS 2"},
        headers={"Authorization": api.http.headers["Authorization"]},
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(resp.content)
    assert root.tag == f"{XMLNS}IntuitResponse"
    assert root.get("time", "").endswith("-07:00")
    block = root.find(f"{XMLNS}QueryResponse")
    assert block is not None and block.get("startPosition") == "1" and block.get("maxResults") == "2"
    invoices = block.findall(f"{XMLNS}Invoice")
    assert len(invoices) == 2
    assert invoices[0].get("domain") == "QBO"
    customer_ref = invoices[0].find(f"{XMLNS}CustomerRef")
    assert customer_ref is not None and customer_ref.text and customer_ref.get("name")
    assert invoices[0].findall(f"{XMLNS}Line")
    bad = httpx.get(
        f"{api.base}/query",
        params={"query": "SELECT * FROM Nope"},
        headers={"Authorization": api.http.headers["Authorization"], "Accept": "application/xml"},
    )
    fault = ET.fromstring(bad.content).find(f"{XMLNS}Fault")
    assert bad.status_code == 400 and fault is not None and fault.get("type") == "ValidationFault"


# --- read one ------------------------------------------------------------------------------------------


def test_read_one_invoice_and_customer(api: Api, control: QuickBooksControl, realm: str) -> None:
    invoice = control.export(realm, "invoice")["records"][5]
    resp = api.get(f"/invoice/{invoice['Id']}", minorversion="75")
    assert resp.status_code == 200
    body = resp.json()
    assert body["Invoice"] == invoice
    assert body["time"].endswith("-07:00")
    customer_id = invoice["CustomerRef"]["value"]
    customer = api.get(f"/customer/{customer_id}").json()["Customer"]
    assert customer["Id"] == customer_id
    assert customer["CurrencyRef"]["value"] == invoice["CurrencyRef"]["value"]
    missing = api.get("/invoice/99999999")
    assert missing.status_code == 400
    assert missing.json()["Fault"]["Error"][0]["code"] == "610"
    assert missing.json()["Fault"]["Error"][0]["Message"] == "Object Not Found"


def test_generated_invoices_are_consistent(control: QuickBooksControl, realm: str) -> None:
    invoices = control.export(realm, "invoice")["records"]
    currencies = {inv["CurrencyRef"]["value"] for inv in invoices}
    assert len(currencies) >= 3
    assert any(inv["Balance"] == 0 and inv["TotalAmt"] > 0 for inv in invoices)  # paid
    assert any(0 < inv["Balance"] < inv["TotalAmt"] for inv in invoices)  # partly paid
    assert any(inv["Balance"] == inv["TotalAmt"] > 0 for inv in invoices)  # open
    assert any(inv.get("PrivateNote") == "Voided" for inv in invoices)
    assert any(inv["SyncToken"] != "0" for inv in invoices)
    for inv in invoices:
        items = [line for line in inv["Line"] if line["DetailType"] == "SalesItemLineDetail"]
        subtotal = next(line for line in inv["Line"] if line["DetailType"] == "SubTotalLineDetail")
        discount = sum(line["Amount"] for line in inv["Line"] if line["DetailType"] == "DiscountLineDetail")
        total = subtotal["Amount"] - discount + inv["TxnTaxDetail"]["TotalTax"]
        assert round(sum(line["Amount"] for line in items), 2) == subtotal["Amount"]
        assert round(total, 2) == inv["TotalAmt"]
        for value in (inv["TotalAmt"], inv["Balance"], *(line["Amount"] for line in items)):
            assert round(value, 2) == value
        if inv["CurrencyRef"]["value"] != "USD":
            assert inv["ExchangeRate"] > 0 and "HomeTotalAmt" in inv
        if inv.get("PrivateNote") != "Voided":
            for line in items:
                detail = line["SalesItemLineDetail"]
                assert round(detail["Qty"] * detail["UnitPrice"], 2) == line["Amount"]
        assert inv["MetaData"]["CreateTime"] <= inv["MetaData"]["LastUpdatedTime"]


def test_same_seed_gives_same_company(control: QuickBooksControl) -> None:
    a = control.add_tenant(CLIENT_ID, seed=41, invoices=30, customers=5, days=3, id="5550001")
    b = control.add_tenant(CLIENT_ID, seed=41, invoices=30, customers=5, days=3, id="5550002")
    c = control.add_tenant(CLIENT_ID, seed=42, invoices=30, customers=5, days=3, id="5550003")
    assert control.export(a["id"], "invoice") == control.export(b["id"], "invoice")
    assert control.export(a["id"], "customer") == control.export(b["id"], "customer")
    assert control.export(a["id"], "invoice") != control.export(c["id"], "invoice")
    auto_1 = control.add_tenant(CLIENT_ID, seed=43, invoices=1, customers=1)
    auto_2 = control.add_tenant(CLIENT_ID, seed=43, invoices=1, customers=1)
    assert auto_1["id"] == auto_2["id"] and auto_1["id"].isdigit()
    other_app = control.add_tenant("another-app", seed=43, invoices=1, customers=1)
    assert other_app["id"] != auto_1["id"]  # another app's company does not replace this one
    assert {t["id"] for t in control.tenants()} >= {auto_1["id"], other_app["id"]}


# --- changes, records and CDC ----------------------------------------------------------------------------


def test_changes_edit_void_delete_create_archive(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=80, customers=12, deleted_invoices=0)
    before = {r["Id"]: r for r in ctl.export(realm, "invoice")["records"]}
    srv.advance_clock(3600)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    out = ctl.changes(realm, edits=3, voids=2, deletes=2, creates=2, archives=1)
    assert [len(out[k]) for k in ("edited", "voided", "deleted", "created", "archived")] == [3, 2, 2, 2, 1]
    now_stamp = dt.datetime.fromtimestamp(srv.clock(), dt.timezone(dt.timedelta(hours=-7)))
    for oid in out["edited"]:
        inv = api.get(f"/invoice/{oid}").json()["Invoice"]
        assert int(inv["SyncToken"]) == int(before[oid]["SyncToken"]) + 1
        assert inv["MetaData"]["LastUpdatedTime"][:13] == now_stamp.strftime("%Y-%m-%dT%H")
    for oid in out["voided"]:
        inv = api.get(f"/invoice/{oid}").json()["Invoice"]
        assert inv["TotalAmt"] == 0 and inv["Balance"] == 0
        assert "Voided" in inv["PrivateNote"]
        assert all(line.get("Amount", 0) == 0 for line in inv["Line"])
        assert int(inv["SyncToken"]) == int(before[oid]["SyncToken"]) + 1
    for oid in out["deleted"]:
        gone = api.get(f"/invoice/{oid}")
        assert gone.status_code == 400 and gone.json()["Fault"]["Error"][0]["code"] == "610"
        assert not api.rows(f"SELECT * FROM Invoice WHERE Id = '{oid}'")
    export = ctl.export(realm, "invoice")
    assert set(out["deleted"]) <= set(export["deleted_ids"])
    assert len(export["records"]) == 80 - 2 + 2
    for oid in out["created"]:
        inv = api.get(f"/invoice/{oid}").json()["Invoice"]
        assert inv["SyncToken"] == "0"
        assert inv["MetaData"]["CreateTime"] == inv["MetaData"]["LastUpdatedTime"]
    archived = api.get(f"/customer/{out['archived'][0]}").json()["Customer"]
    assert archived["Active"] is False
    active_ids = {c["Id"] for c in api.rows("SELECT * FROM Customer", "Customer")}
    assert out["archived"][0] not in active_ids
    api.close()


def test_record_controls_set_fields_and_times(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=5, customers=3)
    created = ctl.add_record(realm, "customer", {"DisplayName": "Boundary Co"}, updated_at=NOW - 100)
    assert created["DisplayName"] == "Boundary Co" and created["SyncToken"] == "0"
    invoice = ctl.add_record(realm, "invoice", {"CustomerRef": {"value": created["Id"]}, "DocNumber": "X-1"})
    assert invoice["CustomerRef"]["value"] == created["Id"]
    changed = ctl.update_record(realm, invoice["Id"], {"PrivateNote": "patched"}, updated_at=NOW + 5)
    assert changed["SyncToken"] == "1" and changed["PrivateNote"] == "patched"
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    read = api.get(f"/invoice/{invoice['Id']}").json()["Invoice"]
    assert read == changed
    assert read["MetaData"]["LastUpdatedTime"] == dt.datetime.fromtimestamp(
        NOW + 5, dt.timezone(dt.timedelta(hours=-7))
    ).strftime("%Y-%m-%dT%H:%M:%S-07:00")
    api.close()


def test_cdc_returns_changes_and_deleted_stubs(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=50, customers=8, days=60, deleted_invoices=0)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    srv.advance_clock(600)
    since = dt.datetime.fromtimestamp(srv.clock(), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    srv.advance_clock(60)
    out = ctl.changes(realm, edits=2, deletes=2, archives=1)
    resp = api.get("/cdc", entities="Invoice,Customer", changedSince=since, minorversion="75")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    blocks = body["CDCResponse"][0]["QueryResponse"]
    by_entity = {next(k for k in b if k not in ("startPosition", "maxResults")): b for b in blocks}
    invoices = by_entity["Invoice"]["Invoice"]
    assert by_entity["Invoice"]["maxResults"] == len(invoices) == 4
    stubs = [row for row in invoices if row.get("status") == "Deleted"]
    assert {row["Id"] for row in stubs} == set(out["deleted"])
    assert set(stubs[0]) == {"domain", "status", "Id", "MetaData"}
    full = [row for row in invoices if row.get("status") != "Deleted"]
    assert {row["Id"] for row in full} == set(out["edited"])
    assert all("Line" in row for row in full)
    customers = by_entity["Customer"]["Customer"]
    # The archived customer, and those whose open balance the edits and deletes moved.
    assert set(out["archived"]) <= {c["Id"] for c in customers}
    assert all(c["Active"] is False for c in customers if c["Id"] in out["archived"])
    later = api.get("/cdc", entities="Invoice", changedSince="2030-01-01").json()
    assert later["CDCResponse"][0]["QueryResponse"] == [{}]
    api.close()


def test_cdc_refuses_changed_since_older_than_30_days(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    ok_since = dt.datetime.fromtimestamp(srv.clock() - (CDC_MAX_DAYS * 86_400 - 120), dt.UTC).isoformat()
    assert api.get("/cdc", entities="Invoice", changedSince=ok_since).status_code == 200
    old = dt.datetime.fromtimestamp(srv.clock() - CDC_MAX_DAYS * 86_400 - 60, dt.UTC).isoformat()
    resp = api.get("/cdc", entities="Invoice", changedSince=old)
    assert resp.status_code == 400
    assert "older than" in resp.json()["Fault"]["Error"][0]["Detail"]
    api.close()


def test_cdc_caps_objects_per_response(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, invoices=40, days=5, cdc_max_objects=7)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    since = dt.datetime.fromtimestamp(srv.clock() - 6 * 86_400, dt.UTC).isoformat()
    blocks = api.get("/cdc", entities="Invoice,Customer", changedSince=since).json()["CDCResponse"][0]
    total = sum(b.get("maxResults", 0) for b in blocks["QueryResponse"])
    assert total == 7
    api.close()


# --- limits, faults, stats -----------------------------------------------------------------------------


def _throttle_body_ok(resp: httpx.Response) -> None:
    assert resp.status_code == 429
    assert "retry-after" not in resp.headers
    error = resp.json()["Fault"]["Error"][0]
    assert error["code"] == "3001"
    assert "ThrottleExceeded" in error["Message"]


def test_per_second_and_minute_windows(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, requests_per_second=3, requests_per_minute=5, minute_seconds=1.5)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    statuses = [api.query("SELECT COUNT(*) FROM Invoice").status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    _throttle_body_ok(api.query("SELECT COUNT(*) FROM Invoice"))
    time.sleep(1.05)
    assert api.query("SELECT COUNT(*) FROM Invoice").status_code == 200
    assert api.query("SELECT COUNT(*) FROM Invoice").status_code == 200
    _throttle_body_ok(api.query("SELECT COUNT(*) FROM Invoice"))  # 5 in this 1.5-second "minute"
    time.sleep(0.6)
    assert api.query("SELECT COUNT(*) FROM Invoice").status_code == 200
    assert ctl.stats()["tenants"][realm]["throttled"] >= 2
    api.close()


def test_concurrency_limit(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl, max_concurrent=2)
    token = ctl.grant(CLIENT_ID, realm)["token"]["access_token"]
    ctl.set_faults(tenant=realm, latency_ms=400)
    url = f"{srv.url}/quickbooks/api/v3/company/{realm}/query"

    def call(_: int) -> int:
        resp = httpx.get(
            url,
            params={"query": "SELECT COUNT(*) FROM Invoice"},
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=10,
        )
        return resp.status_code

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        statuses = list(pool.map(call, range(5)))
    assert statuses.count(200) == 2
    assert statuses.count(429) == 3
    assert ctl.stats()["tenants"][realm]["peak_concurrency"] == 2


def test_injected_faults(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    ctl.set_faults(tenant=realm, server_errors=1, rate_limited=1)
    err = api.query("SELECT * FROM Invoice")
    assert err.status_code == 500
    assert err.json()["Fault"]["type"] == "SystemFault"
    _throttle_body_ok(api.query("SELECT * FROM Invoice"))
    assert api.query("SELECT * FROM Invoice").status_code == 200
    ctl.set_faults(server_errors=1, server_error_status=503)
    assert api.query("SELECT * FROM Invoice").status_code == 503
    ctl.set_faults(day_limit_exhausted=True)
    _throttle_body_ok(api.query("SELECT * FROM Invoice"))
    _throttle_body_ok(api.query("SELECT * FROM Invoice"))
    ctl.clear_faults()
    assert api.query("SELECT * FROM Invoice").status_code == 200
    api.close()


def test_unknown_operation_and_stats(own: tuple[SandboxServer, QuickBooksControl]) -> None:
    srv, ctl = own
    realm = _new_tenant(ctl)
    api = Api(srv, realm, ctl.grant(CLIENT_ID, realm)["token"]["access_token"])
    bad = api.get("/invoices")
    assert bad.status_code == 400
    assert bad.json()["Fault"]["Error"][0]["Message"] == "Unsupported Operation"
    v2 = httpx.get(f"{srv.url}/quickbooks/api/v2/company/{realm}/query", headers=dict(api.http.headers))
    assert v2.status_code == 404
    api.query("SELECT * FROM Invoice")
    api.get("/invoice/99999999")
    stats = ctl.stats()
    assert stats["by_route"]["GET /v3/company/{realmId}/query"] == 1
    assert stats["by_route"]["GET /v3/company/{realmId}/invoice/{id}"] == 1
    assert stats["by_status"]["400"] == 2
    assert stats["by_status"]["200"] == 1
    assert stats["requests"] == 4
    assert "oauth" in stats


def test_control_rejects_bad_specs(server: SandboxServer) -> None:
    resp = httpx.post(
        f"{server.url}/_sandbox/quickbooks/tenants", json={"client_id": CLIENT_ID, "invoicez": 5, "seed": 1}
    )
    assert resp.status_code == 400 and "invoicez" in resp.json()["error"]
    resp = httpx.post(f"{server.url}/_sandbox/quickbooks/tenants/nope/changes", json={"edits": 1})
    assert resp.status_code == 404
    resp = httpx.get(f"{server.url}/quickbooks/appcenter/connect/oauth2", params={"client_id": uuid.uuid4().hex})
    assert resp.status_code == 400
