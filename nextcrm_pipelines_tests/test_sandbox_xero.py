"""Tests of the Xero emulator in ``nextcrm_sandbox.xero``, over real loopback HTTP.

authlib's OAuth2Client and httpx talk to the sandbox the way the Xero client will: the authorisation
code flow with PKCE, refresh-token rotation with its grace period, ``/connections`` across several
organisations, the tenant and Accept headers, Xero's error bodies, paged and filtered reads of invoices
and contacts, the ``/Date()/`` formats, rate limits with Xero's headers, injected faults and the control
API that changes the generated data.
"""

from __future__ import annotations

import base64
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import OAuth2Client

from nextcrm_sandbox.server import SandboxServer
from nextcrm_sandbox.xero import (
    DEFAULT_SCOPE,
    XeroControl,
    XeroTenant,
    format_msdate,
    parse_if_modified_since,
    parse_where,
)

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
API = "/xero/api/api.xro/2.0"
AUTHORIZE = "/xero/login/identity/connect/authorize"
TOKEN = "/xero/identity/connect/token"
REVOKE = "/xero/identity/connect/revocation"
REDIRECT = "http://127.0.0.1:8765/callback"
READ_SCOPE = "offline_access accounting.invoices.read accounting.contacts.read"
MSDATE = re.compile(r"^/Date\((\d+)\+0000\)/$")


def ms_of(value: str) -> int:
    m = MSDATE.match(value)
    assert m, value
    return int(m.group(1))


def unix_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp()) * 1000  # type: ignore[misc]


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(now=NOW) as srv:
        yield srv


@pytest.fixture(scope="module")
def xero(server: SandboxServer) -> XeroControl:
    return XeroControl(server)


@pytest.fixture(scope="module")
def reader(xero: XeroControl) -> dict[str, Any]:
    """An app with one 120-invoice organisation and a token reaching it (read-only tests share it)."""
    xero.add_client("reader-app", "reader-secret")
    tenant = xero.add_tenant("reader-app", seed=42, invoices=120, contacts=25, days=20, minute_limit=100_000, now=NOW)
    grant = xero.grant("reader-app")
    return {"tenant": tenant["id"], "token": grant["token"]["access_token"], "grant": grant}


@pytest.fixture(scope="module")
def http(server: SandboxServer, reader: dict[str, Any]) -> Iterator[httpx.Client]:
    headers = {
        "Authorization": f"Bearer {reader['token']}",
        "xero-tenant-id": reader["tenant"],
        "Accept": "application/json",
    }
    with httpx.Client(base_url=server.url + API, headers=headers) as client:
        yield client


@pytest.fixture
def own() -> Iterator[tuple[SandboxServer, XeroControl]]:
    """A sandbox of its own for tests that move the clock."""
    with SandboxServer(now=NOW) as srv:
        yield srv, XeroControl(srv)


def api_client(server: SandboxServer, token: str, tenant: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if tenant is not None:
        headers["xero-tenant-id"] = tenant
    return httpx.Client(base_url=server.url + API, headers=headers)


def oauth_client(server: SandboxServer, client_id: str, secret: str, **kwargs: Any) -> OAuth2Client:
    return OAuth2Client(client_id, secret, redirect_uri=REDIRECT, base_url=server.url, **kwargs)


def consent(server: SandboxServer, client: OAuth2Client, **extra: str) -> tuple[dict[str, Any], str]:
    """Run the browser leg: the authorize URL answers 302 to the redirect URI with code and state."""
    verifier = generate_token(48)
    url, state = client.create_authorization_url(server.url + AUTHORIZE, code_verifier=verifier, **extra)
    response = httpx.get(url, follow_redirects=False)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT)
    assert parse_qs(urlsplit(location).query)["state"] == [state]
    token = client.fetch_token(server.url + TOKEN, authorization_response=location, code_verifier=verifier)
    return dict(token), verifier


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def fetch_all(http: httpx.Client, resource: str, page_size: int, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        body = http.get(f"/{resource}", params={**params, "page": page, "pageSize": page_size}).json()
        out += body[resource]
        if page >= body["pagination"]["pageCount"]:
            return out
        page += 1


# --- OAuth ---------------------------------------------------------------------------------------------


def test_authorization_code_flow_with_pkce_basic_auth_and_jwt_access_token(
    server: SandboxServer, xero: XeroControl
) -> None:
    xero.add_client("flow-app", "flow-secret")
    first = xero.add_tenant("flow-app", seed=1, invoices=5, contacts=3, days=5)
    second = xero.add_tenant("flow-app", seed=2, invoices=5, contacts=3, days=5)
    client = oauth_client(server, "flow-app", "flow-secret", scope=DEFAULT_SCOPE, code_challenge_method="S256")
    token, _ = consent(server, client)
    assert token["expires_in"] == 1800 and token["token_type"] == "Bearer"
    assert token["refresh_token"] and token["scope"] == DEFAULT_SCOPE
    claims = jwt_claims(token["access_token"])
    assert claims["client_id"] == "flow-app" and claims["exp"] - claims["nbf"] == 1800
    assert claims["scope"] == DEFAULT_SCOPE.split()
    with api_client(server, token["access_token"], None) as api:
        listed = httpx.get(server.url + "/xero/api/connections", headers=api.headers).json()
        assert {c["tenantId"] for c in listed} == {first["id"], second["id"]}
        assert {c["authEventId"] for c in listed} == {claims["authentication_event_id"]}
    stats = xero.oauth_state()["stats"]
    assert stats["authorization_code"] >= 1


def test_pkce_mismatch_and_reused_code_are_invalid_grant(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("pkce-app", "pkce-secret")
    client = oauth_client(server, "pkce-app", "pkce-secret", scope=READ_SCOPE, code_challenge_method="S256")
    url, _ = client.create_authorization_url(server.url + AUTHORIZE, code_verifier=generate_token(48))
    code = parse_qs(urlsplit(httpx.get(url).headers["location"]).query)["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": "wrong" * 9}
    bad = httpx.post(server.url + TOKEN, data=form, auth=("pkce-app", "pkce-secret"))
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    wrong_secret = httpx.post(server.url + TOKEN, data=form, auth=("pkce-app", "nope"))
    assert wrong_secret.status_code == 401 and wrong_secret.json()["error"] == "invalid_client"


def test_body_client_auth_and_refresh_token_only_with_offline_access(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("body-app", "body-secret")
    xero.add_tenant("body-app", seed=5, invoices=3, contacts=2, days=2)
    client = oauth_client(
        server,
        "body-app",
        "body-secret",
        scope="accounting.invoices.read",
        token_endpoint_auth_method="client_secret_post",
    )
    token, _ = consent(server, client)
    assert "refresh_token" not in token
    client = oauth_client(
        server, "body-app", "body-secret", scope=READ_SCOPE, token_endpoint_auth_method="client_secret_post"
    )
    token, _ = consent(server, client)
    assert token["refresh_token"]


def test_refresh_rotates_and_the_old_token_works_for_30_minutes(own: tuple[SandboxServer, XeroControl]) -> None:
    server, xero = own
    xero.add_client("rot-app", "rot-secret")
    xero.add_tenant("rot-app", seed=1, invoices=2, contacts=1, days=1)
    client = oauth_client(server, "rot-app", "rot-secret", scope=READ_SCOPE)
    token, _ = consent(server, client)
    first = token["refresh_token"]
    refreshed = client.refresh_token(server.url + TOKEN, refresh_token=first)
    second = refreshed["refresh_token"]
    assert second != first and refreshed["expires_in"] == 1800
    retry = client.refresh_token(server.url + TOKEN, refresh_token=first)  # lost response: retry in grace
    assert retry["refresh_token"] == second
    server.advance_clock(1801)
    late = httpx.post(server.url + TOKEN, data={"grant_type": "refresh_token", "refresh_token": first},
                      auth=("rot-app", "rot-secret"))  # fmt: skip
    assert late.status_code == 400 and late.json() == {"error": "invalid_grant"}
    third = client.refresh_token(server.url + TOKEN, refresh_token=second)
    assert third["refresh_token"] not in (first, second)


def test_unused_refresh_token_dies_after_60_days(own: tuple[SandboxServer, XeroControl]) -> None:
    server, xero = own
    xero.add_client("idle-app", "idle-secret")
    xero.add_tenant("idle-app", seed=1, invoices=2, contacts=1, days=1)
    alive = xero.grant("idle-app")["token"]["refresh_token"]
    dead = xero.grant("idle-app")["token"]["refresh_token"]
    server.advance_clock(59 * 86400)
    form = {"grant_type": "refresh_token", "client_id": "idle-app", "client_secret": "idle-secret"}
    assert httpx.post(server.url + TOKEN, data={**form, "refresh_token": alive}).status_code == 200
    server.advance_clock(86400 + 1)
    late = httpx.post(server.url + TOKEN, data={**form, "refresh_token": dead})
    assert late.status_code == 400 and late.json()["error"] == "invalid_grant"


def test_client_credentials_reaches_the_newest_organisation(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("m2m-app", "m2m-secret")
    xero.add_tenant("m2m-app", seed=7, invoices=2, contacts=1, days=1)
    newest = xero.add_tenant("m2m-app", seed=8, invoices=4, contacts=2, days=1)
    response = httpx.post(server.url + TOKEN, data={"grant_type": "client_credentials"}, auth=("m2m-app", "m2m-secret"))
    token = response.json()
    assert response.status_code == 200 and "refresh_token" not in token and token["expires_in"] == 1800
    listed = httpx.get(
        server.url + "/xero/api/connections", headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert [c["tenantId"] for c in listed.json()] == [newest["id"]]
    with api_client(server, token["access_token"], newest["id"]) as api:
        assert len(api.get("/Invoices").json()["Invoices"]) == 4


def test_revocation_removes_every_connection_of_the_grant(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("rev-app", "rev-secret")
    tenant = xero.add_tenant("rev-app", seed=9, invoices=3, contacts=2, days=1)
    token = xero.grant("rev-app", scope=READ_SCOPE)["token"]
    with api_client(server, token["access_token"], tenant["id"]) as api:
        assert api.get("/Invoices").status_code == 200
        unknown = httpx.post(server.url + REVOKE, data={"token": "rt_unknown"}, auth=("rev-app", "rev-secret"))
        assert unknown.status_code == 200
        bad_client = httpx.post(server.url + REVOKE, data={"token": token["refresh_token"]}, auth=("rev-app", "x"))
        assert bad_client.status_code == 400 and bad_client.json() == {"error": "invalid_client"}
        revoked = httpx.post(
            server.url + REVOKE, data={"token": token["refresh_token"]}, auth=("rev-app", "rev-secret")
        )
        assert revoked.status_code == 200
        refused = api.get("/Invoices")
        assert refused.status_code == 403 and refused.json()["Detail"] == "AuthenticationUnsuccessful"
        assert api.get(server.url + "/xero/api/connections").json() == []
    form = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
    refresh = httpx.post(server.url + TOKEN, data=form, auth=("rev-app", "rev-secret"))
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"


# --- connections ---------------------------------------------------------------------------------------


def test_connections_fields_auth_event_filter_and_disconnect(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("conn-app", "conn-secret")
    a = xero.add_tenant("conn-app", seed=11, invoices=3, contacts=2, days=1, name="Alpha Ltd")
    b = xero.add_tenant("conn-app", seed=12, invoices=3, contacts=2, days=1, tenant_type="PRACTICE")
    grant = xero.grant("conn-app")
    headers = {"Authorization": f"Bearer {grant['token']['access_token']}"}
    listed = httpx.get(server.url + "/xero/api/connections", headers=headers).json()
    assert len(listed) == 2
    assert set(listed[0]) == {"id", "authEventId", "tenantId", "tenantType", "tenantName", "createdDateUtc",
                              "updatedDateUtc"}  # fmt: skip
    by_tenant = {c["tenantId"]: c for c in listed}
    assert by_tenant[a["id"]]["tenantName"] == "Alpha Ltd" and by_tenant[a["id"]]["tenantType"] == "ORGANISATION"
    assert by_tenant[b["id"]]["tenantType"] == "PRACTICE"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}$", listed[0]["createdDateUtc"])
    event = grant["auth_event_id"]
    filtered = httpx.get(server.url + "/xero/api/connections", params={"authEventId": event}, headers=headers).json()
    assert len(filtered) == 2
    other = httpx.get(server.url + "/xero/api/connections", params={"authEventId": str(uuid.uuid4())}, headers=headers)
    assert other.json() == []
    url = f"{server.url}/xero/api/connections/{by_tenant[a['id']]['id']}"
    assert httpx.delete(url, headers=headers).status_code == 204
    assert httpx.delete(url, headers=headers).status_code == 404
    with api_client(server, grant["token"]["access_token"], a["id"]) as api:
        assert api.get("/Invoices").status_code == 403
        assert api.get("/Invoices", headers={"xero-tenant-id": b["id"]}).status_code == 200
    assert [c["tenantId"] for c in httpx.get(server.url + "/xero/api/connections", headers=headers).json()] == [b["id"]]


def test_authorize_can_be_limited_to_one_organisation(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("pick-app", "pick-secret")
    xero.add_tenant("pick-app", seed=13, invoices=1, contacts=1, days=1)
    chosen = xero.add_tenant("pick-app", seed=14, invoices=1, contacts=1, days=1)
    client = oauth_client(server, "pick-app", "pick-secret", scope=READ_SCOPE)
    token, _ = consent(server, client, sandbox_tenant=chosen["id"])
    listed = httpx.get(
        server.url + "/xero/api/connections", headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert [c["tenantId"] for c in listed.json()] == [chosen["id"]]


# --- headers and errors --------------------------------------------------------------------------------


def test_tenant_header_is_required_and_must_be_connected(
    server: SandboxServer, xero: XeroControl, reader: dict[str, Any]
) -> None:
    xero.add_client("stranger-app", "s")
    stranger = xero.add_tenant("stranger-app", seed=15, invoices=1, contacts=1, days=1)
    for tenant in (None, str(uuid.uuid4()), stranger["id"], "not-a-guid"):
        with api_client(server, reader["token"], tenant) as api:
            response = api.get("/Invoices")
        body = response.json()
        assert response.status_code == 403
        assert body["Title"] == "Forbidden" and body["Detail"] == "AuthenticationUnsuccessful" and body["Status"] == 403
        assert set(body) == {"Type", "Title", "Status", "Detail", "Instance", "Extensions"}
        assert "x-minlimit-remaining" not in response.headers


def test_accept_header_selects_json_or_the_xml_default(server: SandboxServer, reader: dict[str, Any]) -> None:
    with api_client(server, reader["token"], reader["tenant"]) as api:
        xml = api.get("/Invoices", params={"page": 1, "pageSize": 2}, headers={"Accept": "*/*"})
        plain = api.get("/Contacts", headers={"Accept": "application/xml"})
        js = api.get("/Invoices", params={"page": 1, "pageSize": 2})
    assert xml.headers["content-type"].startswith("text/xml")
    assert xml.text.startswith("<Response ") and "<Invoices><Invoice><Type>" in xml.text
    assert re.search(r"<Date>\d{4}-\d\d-\d\dT00:00:00</Date>", xml.text)
    assert plain.text.startswith("<Response ") and "<Contacts><Contact>" in plain.text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(xml.content)
    assert js.headers["content-type"].startswith("application/json") and js.json()["Status"] == "OK"


def test_expired_and_invalid_tokens_get_xero_401_bodies(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("exp-app", "exp-secret")
    tenant = xero.add_tenant("exp-app", seed=16, invoices=2, contacts=1, days=1)
    grant = xero.grant("exp-app")
    with api_client(server, grant["token"]["access_token"], tenant["id"]) as api:
        assert api.get("/Invoices").status_code == 200
        at = server.clock()
        xero.expire_access(grant["grant_id"])
        expired = api.get("/Invoices")
    body = expired.json()
    assert expired.status_code == 401
    assert set(body) == {"Type", "Title", "Status", "Detail", "Instance", "Extensions"}
    assert (
        body["Type"] is None and body["Title"] == "Unauthorized" and body["Status"] == 401 and body["Extensions"] == {}
    )
    stamp = re.fullmatch(r"TokenExpired: token expired at (\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)", body["Detail"])
    assert stamp, body["Detail"]
    expired_at = datetime.strptime(stamp.group(1), "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC).timestamp()
    assert abs(expired_at - at) <= 2
    uuid.UUID(body["Instance"])
    with api_client(server, "garbage", tenant["id"]) as api:
        invalid = api.get("/Invoices")
    assert invalid.status_code == 401 and invalid.json()["Detail"] == "AuthenticationUnsuccessful"
    no_header = httpx.get(server.url + API + "/Invoices", headers={"xero-tenant-id": tenant["id"]})
    assert no_header.status_code == 401


def test_scopes_gate_invoices_and_contacts(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("scope-app", "scope-secret")
    tenant = xero.add_tenant("scope-app", seed=17, invoices=2, contacts=1, days=1)
    token = xero.grant("scope-app", scope="offline_access accounting.contacts.read")["token"]["access_token"]
    with api_client(server, token, tenant["id"]) as api:
        refused = api.get("/Invoices")
        assert refused.status_code == 401 and refused.json()["Detail"] == "AuthorizationUnsuccessful"
        assert api.get("/Contacts").status_code == 200


# --- reads ---------------------------------------------------------------------------------------------


def test_envelope_and_pagination_block(http: httpx.Client, reader: dict[str, Any]) -> None:
    body = http.get("/Invoices", params={"page": 2, "pageSize": 50}).json()
    assert list(body)[:5] == ["Id", "Status", "ProviderName", "DateTimeUTC", "pagination"]
    uuid.UUID(body["Id"])
    assert body["Status"] == "OK" and body["ProviderName"]
    assert re.fullmatch(r"/Date\(\d{13}\)/", body["DateTimeUTC"])
    assert body["pagination"] == {"page": 2, "pageSize": 50, "pageCount": 3, "itemCount": 120}
    assert len(body["Invoices"]) == 50
    default = http.get("/Invoices", params={"page": 1}).json()
    assert default["pagination"]["pageSize"] == 100 and len(default["Invoices"]) == 100
    clamped = http.get("/Invoices", params={"page": 1, "pageSize": 5000}).json()
    assert clamped["pagination"]["pageSize"] == 1000 and len(clamped["Invoices"]) == 120
    beyond = http.get("/Invoices", params={"page": 9, "pageSize": 50}).json()
    assert beyond["Invoices"] == [] and beyond["pagination"]["itemCount"] == 120
    unpaged = http.get("/Invoices").json()
    assert "pagination" not in unpaged and len(unpaged["Invoices"]) == 120


def test_paging_in_updated_order_returns_exactly_the_export(
    http: httpx.Client, xero: XeroControl, reader: dict[str, Any]
) -> None:
    export = xero.export(reader["tenant"], "invoices")
    assert export["deleted_ids"] == []
    listed = fetch_all(http, "Invoices", 7, order="UpdatedDateUTC ASC")
    assert len(listed) == 120 == len({inv["InvoiceID"] for inv in listed})
    assert sorted(listed, key=lambda i: i["InvoiceID"]) == sorted(export["records"], key=lambda i: i["InvoiceID"])
    stamps = [ms_of(inv["UpdatedDateUTC"]) for inv in listed]
    assert stamps == sorted(stamps)
    desc = fetch_all(http, "Invoices", 50, order="UpdatedDateUTC DESC")
    assert [ms_of(inv["UpdatedDateUTC"]) for inv in desc] == sorted(stamps, reverse=True)


def test_line_items_only_when_page_is_given(http: httpx.Client) -> None:
    unpaged = http.get("/Invoices").json()["Invoices"]
    assert all(inv["LineItems"] == [] for inv in unpaged)
    paged = http.get("/Invoices", params={"page": 1}).json()["Invoices"]
    assert all(len(inv["LineItems"]) >= 1 for inv in paged)
    line = paged[0]["LineItems"][0]
    assert {"LineItemID", "Description", "Quantity", "UnitAmount", "AccountCode", "TaxType", "TaxAmount",
            "LineAmount", "Tracking"} <= set(line)  # fmt: skip
    one = http.get(f"/Invoices/{unpaged[0]['InvoiceID']}").json()
    assert "pagination" not in one and len(one["Invoices"]) == 1 and one["Invoices"][0]["LineItems"]
    assert one["Invoices"][0]["Contact"]["ContactStatus"] in ("ACTIVE", "ARCHIVED")
    summary = http.get("/Invoices", params={"page": 1, "summaryOnly": "true"}).json()["Invoices"]
    assert all("LineItems" not in inv for inv in summary)


def test_if_modified_since_is_inclusive_at_second_precision(
    server: SandboxServer, xero: XeroControl, reader: dict[str, Any]
) -> None:
    xero.add_client("ims-app", "ims-secret")
    tenant = xero.add_tenant("ims-app", seed=18, invoices=0, contacts=1, days=1)
    midnight = NOW - 86400  # 2025-12-31T00:00:00Z
    before = xero.add_record(tenant["id"], "invoice", {"Reference": "before"}, updated_at=midnight - 0.001)
    exact = xero.add_record(tenant["id"], "invoice", {"Reference": "exact"}, updated_at=midnight)
    half = xero.add_record(tenant["id"], "invoice", {"Reference": "half"}, updated_at=midnight + 0.5)
    later = xero.add_record(tenant["id"], "invoice", {"Reference": "later"}, updated_at=midnight + 3600)
    assert ms_of(exact["UpdatedDateUTC"]) == midnight * 1000 and ms_of(half["UpdatedDateUTC"]) == midnight * 1000 + 500
    assert ms_of(before["UpdatedDateUTC"]) == midnight * 1000 - 1
    token = xero.grant("ims-app")["token"]["access_token"]

    def since(value: str) -> list[str]:
        with api_client(server, token, tenant["id"]) as api:
            response = api.get(
                "/Invoices", headers={"If-Modified-Since": value}, params={"order": "UpdatedDateUTC ASC"}
            )
        return [i["Reference"] for i in response.json()["Invoices"]]

    assert since("2025-12-31T00:00:00") == ["exact", "half", "later"]
    assert since("2025-12-31T00:00:00Z") == ["exact", "half", "later"]
    assert since("2025-12-31T00:00:00.999") == ["exact", "half", "later"]  # fractions are ignored
    assert since("2025-12-31T13:00:00+13:00") == ["exact", "half", "later"]
    assert since("2025-12-30T23:59:59") == ["before", "exact", "half", "later"]
    assert since("2025-12-31T00:00:01") == ["later"]
    assert since("Wed, 31 Dec 2025 01:00:00 GMT") == ["later"]
    window = "UpdatedDateUTC>=DateTime(2025,12,30,00,00,00) AND UpdatedDateUTC<DateTime(2025,12,31,00,00,00)"
    with api_client(server, token, tenant["id"]) as api:
        previous_day = api.get("/Invoices", params={"where": window}).json()["Invoices"]
    assert [i["Reference"] for i in previous_day] == ["before"]
    assert later["Reference"] == "later"


def test_where_filters(http: httpx.Client, xero: XeroControl, reader: dict[str, Any]) -> None:
    export = xero.export(reader["tenant"], "invoices")["records"]

    def ids(where: str, **params: str) -> set[str]:
        response = http.get("/Invoices", params={"where": where, **params})
        assert response.status_code == 200, response.text
        return {inv["InvoiceID"] for inv in response.json()["Invoices"]}

    accrec = {i["InvoiceID"] for i in export if i["Type"] == "ACCREC"}
    accpay = {i["InvoiceID"] for i in export if i["Type"] == "ACCPAY"}
    assert accrec and accpay
    assert ids('Type=="ACCREC"') == accrec
    paid_sales = {i["InvoiceID"] for i in export if i["Type"] == "ACCREC" and i["Status"] == "PAID"}
    assert ids('Type=="ACCREC" AND Status=="PAID"') == paid_sales
    assert ids('Type == "ACCREC" && Status == "PAID"') == paid_sales
    either = {i["InvoiceID"] for i in export if i["Status"] in ("AUTHORISED", "PAID")}
    assert ids('(Status=="AUTHORISED" OR Status=="PAID")') == either
    assert ids('Status!="AUTHORISED" AND Status<>"PAID"') == {i["InvoiceID"] for i in export} - either
    stamps = sorted(ms_of(i["UpdatedDateUTC"]) for i in export)
    cut = datetime.fromtimestamp(stamps[60] // 1000, UTC)
    literal = cut.strftime("DateTime(%Y,%m,%d,%H,%M,%S)")
    expected = {i["InvoiceID"] for i in export if ms_of(i["UpdatedDateUTC"]) >= cut.timestamp() * 1000}
    assert ids(f"UpdatedDateUTC>={literal}") == expected
    assert ids(f"UpdatedDateUTC<{literal}") == {i["InvoiceID"] for i in export} - expected
    contact = export[0]["Contact"]["ContactID"]
    assert ids(f'Contact.ContactID==Guid("{contact.upper()}")') == {
        i["InvoiceID"] for i in export if i["Contact"]["ContactID"] == contact
    }
    assert ids("AmountDue > 0") == {i["InvoiceID"] for i in export if i["AmountDue"] > 0}
    assert ids('InvoiceNumber.StartsWith("INV-0000")') == {
        i["InvoiceID"] for i in export if i["InvoiceNumber"].startswith("INV-0000")
    }
    assert ids('Type=="ACCREC"', Statuses="PAID,VOIDED") == {
        i["InvoiceID"] for i in export if i["Type"] == "ACCREC" and i["Status"] in ("PAID", "VOIDED")
    }
    for broken, message in (('Foo=="x"', "No property or field 'Foo'"), ('Type=="ACCREC" AND', "end of expression"),
                            ('Type=="ACCREC', "Syntax error")):  # fmt: skip
        response = http.get("/Invoices", params={"where": broken})
        body = response.json()
        assert response.status_code == 400 and body["ErrorNumber"] == 16 and body["Type"] == "QueryParseException"
        assert message in body["Message"]


def test_statuses_ids_invoice_numbers_and_include_archived(
    http: httpx.Client, xero: XeroControl, reader: dict[str, Any]
) -> None:
    export = xero.export(reader["tenant"], "invoices")["records"]
    drafts = {i["InvoiceID"] for i in export if i["Status"] in ("DRAFT", "DELETED")}
    listed = http.get("/Invoices", params={"Statuses": "DRAFT,DELETED"}).json()["Invoices"]
    assert {i["InvoiceID"] for i in listed} == drafts
    some = [i["InvoiceID"] for i in export[:5]]
    assert {i["InvoiceID"] for i in http.get("/Invoices", params={"IDs": ",".join(some)}).json()["Invoices"]} == set(
        some
    )
    too_many = ",".join(str(uuid.uuid4()) for _ in range(53))
    gateway = http.get("/Invoices", params={"IDs": too_many})
    assert gateway.status_code == 404 and gateway.text == "The resource you're looking for cannot be found"
    numbers = http.get("/Invoices", params={"InvoiceNumbers": "INV-00001,INV-00002"}).json()["Invoices"]
    assert sorted(i["InvoiceNumber"] for i in numbers) == ["INV-00001", "INV-00002"]
    contacts = xero.export(reader["tenant"], "contacts")["records"]
    archived = {c["ContactID"] for c in contacts if c["ContactStatus"] == "ARCHIVED"}
    assert archived
    default = {c["ContactID"] for c in http.get("/Contacts").json()["Contacts"]}
    every = {c["ContactID"] for c in http.get("/Contacts", params={"includeArchived": "true"}).json()["Contacts"]}
    assert every == {c["ContactID"] for c in contacts} and default == every - archived
    customers = http.get("/Contacts", params={"where": "IsCustomer==true", "includeArchived": "true"}).json()[
        "Contacts"
    ]
    assert customers and all(c["IsCustomer"] for c in customers)


def test_dates_money_statuses_and_currencies(http: httpx.Client, xero: XeroControl, reader: dict[str, Any]) -> None:
    invoices = fetch_all(http, "Invoices", 100)
    statuses = {i["Status"] for i in invoices}
    assert {"DRAFT", "AUTHORISED", "PAID", "VOIDED", "DELETED"} <= statuses
    assert {i["Type"] for i in invoices} == {"ACCREC", "ACCPAY"}
    assert len({i["CurrencyCode"] for i in invoices}) >= 2
    for inv in invoices:
        for key in ("Date", "DueDate"):
            assert ms_of(inv[key]) % 86_400_000 == 0
        updated = ms_of(inv["UpdatedDateUTC"])
        assert updated <= NOW * 1000
        assert inv["UpdatedDateUTCString"] == datetime.fromtimestamp(updated // 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        assert inv["DateString"] == datetime.fromtimestamp(ms_of(inv["Date"]) // 1000, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
        cents = {k: round(inv[k] * 100) for k in ("SubTotal", "TotalTax", "Total", "AmountDue", "AmountPaid")}
        for key, value in cents.items():
            assert abs(inv[key] * 100 - value) < 1e-6, (key, inv[key])
        assert cents["SubTotal"] + cents["TotalTax"] == cents["Total"]
        assert sum(round(li["TaxAmount"] * 100) for li in inv["LineItems"]) == cents["TotalTax"]
        if inv["Status"] == "PAID":
            assert cents["AmountDue"] == 0 and cents["AmountPaid"] == cents["Total"] and inv["Payments"]
            assert MSDATE.match(inv["FullyPaidOnDate"])
        if inv["Status"] in ("DRAFT", "SUBMITTED"):
            assert cents["AmountDue"] == cents["Total"]
    contacts = http.get("/Contacts", params={"page": 1, "includeArchived": "true"}).json()["Contacts"]
    assert all(MSDATE.match(c["UpdatedDateUTC"]) and "UpdatedDateUTCString" not in c for c in contacts)
    assert all("Balances" in c for c in contacts)
    assert "Balances" not in http.get("/Contacts").json()["Contacts"][0]


def test_date_knobs_offsetless_dates_and_no_string_field(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("knob-app", "knob-secret")
    tenant = xero.add_tenant("knob-app", seed=19, invoices=3, contacts=2, days=2, msdate_offset=False,
                             updated_date_utc_string=False, contacts_updated_date_utc_string=True)  # fmt: skip
    token = xero.grant("knob-app")["token"]["access_token"]
    with api_client(server, token, tenant["id"]) as api:
        inv = api.get("/Invoices").json()["Invoices"][0]
        contact = api.get("/Contacts").json()["Contacts"][0]
    assert re.fullmatch(r"/Date\(\d+\)/", inv["UpdatedDateUTC"]) and re.fullmatch(r"/Date\(\d+\)/", inv["Date"])
    assert "UpdatedDateUTCString" not in inv
    assert contact["UpdatedDateUTCString"].endswith("Z")


def test_single_lookups_by_id_or_number_and_404(http: httpx.Client, xero: XeroControl, reader: dict[str, Any]) -> None:
    contact = xero.export(reader["tenant"], "contacts")["records"][0]
    by_id = http.get(f"/Contacts/{contact['ContactID'].upper()}").json()["Contacts"]
    assert [c["ContactID"] for c in by_id] == [contact["ContactID"]] and "Balances" in by_id[0]
    by_number = http.get("/Invoices/INV-00003").json()["Invoices"][0]
    assert by_number["InvoiceNumber"] == "INV-00003"
    for path in (f"/Invoices/{uuid.uuid4()}", f"/Contacts/{uuid.uuid4()}", "/Quotes"):
        missing = http.get(path)
        assert missing.status_code == 404 and missing.text == "The resource you're looking for cannot be found"
        assert missing.headers["content-type"].startswith("text/plain")


def test_search_term_unitdp_and_created_by_my_app(http: httpx.Client) -> None:
    found = http.get("/Invoices", params={"searchTerm": "inv-0001"}).json()["Invoices"]
    assert found and all("inv-0001" in i["InvoiceNumber"].lower() for i in found)
    four = http.get("/Invoices", params={"page": 1, "unitdp": 4}).json()["Invoices"]
    two = http.get("/Invoices", params={"page": 1}).json()["Invoices"]
    units4 = [li["UnitAmount"] for inv in four for li in inv["LineItems"]]
    units2 = [li["UnitAmount"] for inv in two for li in inv["LineItems"]]
    assert any(round(u, 2) != u for u in units4) and all(round(u, 2) == u for u in units2)
    assert http.get("/Invoices", params={"createdByMyApp": "true"}).json()["Invoices"] == []


# --- control API: changes and records ------------------------------------------------------------------


def test_changes_move_updated_time_and_statuses(own: tuple[SandboxServer, XeroControl]) -> None:
    server, xero = own
    xero.add_client("chg-app", "chg-secret")
    tenant = xero.add_tenant("chg-app", seed=20, invoices=80, contacts=15, days=10)
    before = {i["InvoiceID"]: i for i in xero.export(tenant["id"], "invoices")["records"]}
    contacts_before = {c["ContactID"]: c for c in xero.export(tenant["id"], "contacts")["records"]}
    server.advance_clock(3600)
    now = server.clock()
    changed = xero.changes(tenant["id"], edits=4, voids=2, deletes=2, creates=3, archives=2)
    assert [len(changed[k]) for k in ("edited", "voided", "deleted", "created", "archived")] == [4, 2, 2, 3, 2]
    after = {i["InvoiceID"]: i for i in xero.export(tenant["id"], "invoices")["records"]}
    assert len(after) == 83 and set(before) <= set(after)
    for iid in changed["voided"]:
        assert before[iid]["Status"] == "AUTHORISED" and after[iid]["Status"] == "VOIDED"
        assert after[iid]["AmountDue"] == 0
    for iid in changed["deleted"]:
        assert before[iid]["Status"] in ("DRAFT", "SUBMITTED") and after[iid]["Status"] == "DELETED"
    for iid in changed["edited"]:
        assert after[iid] != before[iid]
    for iid in changed["edited"] + changed["voided"] + changed["deleted"] + changed["created"]:
        assert now * 1000 <= ms_of(after[iid]["UpdatedDateUTC"]) < (now + 2) * 1000
    contacts = {c["ContactID"]: c for c in xero.export(tenant["id"], "contacts")["records"]}
    for cid in changed["archived"]:
        assert contacts_before[cid]["ContactStatus"] == "ACTIVE" and contacts[cid]["ContactStatus"] == "ARCHIVED"
        assert ms_of(contacts[cid]["UpdatedDateUTC"]) >= now * 1000
    token = xero.grant("chg-app")["token"]["access_token"]
    since = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    with api_client(server, token, tenant["id"]) as api:
        recent = api.get("/Invoices", headers={"If-Modified-Since": since}).json()["Invoices"]
        assert {i["InvoiceID"] for i in recent} == set(changed["edited"] + changed["voided"] + changed["deleted"]
                                                        + changed["created"])  # fmt: skip
        archived = api.get("/Contacts", headers={"If-Modified-Since": since}).json()["Contacts"]
        assert archived == []
        archived = api.get("/Contacts", headers={"If-Modified-Since": since}, params={"includeArchived": "true"})
        assert {c["ContactID"] for c in archived.json()["Contacts"]} == set(changed["archived"])
    assert xero.export(tenant["id"], "invoices")["deleted_ids"] == []


def test_records_control_creates_and_patches_exact_records(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("rec-app", "rec-secret")
    tenant = xero.add_tenant("rec-app", seed=21, invoices=2, contacts=2, days=2)
    contact = xero.add_record(tenant["id"], "contact", {"Name": "Boundary Co", "EmailAddress": "b@example.com"},
                              updated_at=NOW - 100)  # fmt: skip
    assert contact["Name"] == "Boundary Co" and ms_of(contact["UpdatedDateUTC"]) == (NOW - 100) * 1000
    fields = {
        "Type": "ACCPAY",
        "Status": "AUTHORISED",
        "CurrencyCode": "EUR",
        "Date": "2025-12-20",
        "Contact": {"ContactID": contact["ContactID"]},
        "LineAmountTypes": "NoTax",
        "LineItems": [{"Description": "Widget", "Quantity": 3, "UnitAmount": 19.99}],
    }
    created = xero.add_record(tenant["id"], "invoice", fields, updated_at=NOW - 50.25)
    assert created["Type"] == "ACCPAY" and created["CurrencyCode"] == "EUR" and created["Total"] == 59.97
    assert created["Contact"]["ContactID"] == contact["ContactID"]
    assert ms_of(created["Date"]) == unix_ms(2025, 12, 20) and ms_of(created["UpdatedDateUTC"]) == NOW * 1000 - 50250
    patched = xero.update_record(tenant["id"], created["InvoiceID"], {"Status": "PAID"}, updated_at=NOW - 10)
    assert patched["Status"] == "PAID" and patched["AmountDue"] == 0 and patched["AmountPaid"] == 59.97
    assert ms_of(patched["UpdatedDateUTC"]) == (NOW - 10) * 1000
    with pytest.raises(RuntimeError, match="404"):
        xero.update_record(tenant["id"], str(uuid.uuid4()), {"Status": "PAID"})
    with pytest.raises(RuntimeError, match="unsupported invoice fields"):
        xero.add_record(tenant["id"], "invoice", {"Bogus": 1})


def test_same_seed_gives_the_same_records(xero: XeroControl) -> None:
    xero.add_client("twin-a", "a")
    xero.add_client("twin-b", "b")
    a = xero.add_tenant("twin-a", seed=77, invoices=30, contacts=6, days=5, now=NOW)
    b = xero.add_tenant("twin-b", seed=77, invoices=30, contacts=6, days=5, now=NOW)
    c = xero.add_tenant("twin-b", seed=78, invoices=30, contacts=6, days=5, now=NOW)
    assert a["id"] != b["id"]
    records_a = xero.export(a["id"], "invoices")["records"]
    assert records_a == xero.export(b["id"], "invoices")["records"]
    assert records_a != xero.export(c["id"], "invoices")["records"]
    again = xero.add_tenant("twin-a", seed=77, invoices=30, contacts=6, days=5, now=NOW)
    assert again["id"] == a["id"] and again["status"] == "replaced"


def test_twenty_thousand_invoices_generate_in_seconds(xero: XeroControl) -> None:
    xero.add_client("big-app", "big")
    started = time.perf_counter()
    big = xero.add_tenant("big-app", seed=5, invoices=20_000, contacts=1_000, days=365)
    assert big["counts"]["invoices"] == 20_000 and big["counts"]["contacts"] == 1_000
    assert time.perf_counter() - started < 10


# --- rate limits and faults ----------------------------------------------------------------------------


def limited_tenant(xero: XeroControl, app: str, **knobs: Any) -> tuple[str, str]:
    xero.add_client(app, "secret")
    tenant = xero.add_tenant(app, seed=30, invoices=2, contacts=1, days=1, **knobs)
    return tenant["id"], xero.grant(app)["token"]["access_token"]


def test_minute_limit_in_fixed_windows_with_xero_headers(server: SandboxServer, xero: XeroControl) -> None:
    tenant, token = limited_tenant(xero, "minute-app", minute_limit=3, minute_window_seconds=2.5)
    with api_client(server, token, tenant) as api:
        remaining = [api.get("/Invoices").headers["X-MinLimit-Remaining"] for _ in range(3)]
        assert remaining == ["2", "1", "0"]
        refused = api.get("/Invoices")
        assert refused.status_code == 429
        assert refused.headers["X-Rate-Limit-Problem"] == "minute"
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 3
        assert refused.headers["X-MinLimit-Remaining"] == "0" and refused.headers["X-DayLimit-Remaining"] == "4997"
        assert int(refused.headers["X-AppMinLimit-Remaining"]) == 9997
        time.sleep(retry_after)
        again = api.get("/Invoices")
        assert again.status_code == 200 and again.headers["X-MinLimit-Remaining"] == "2"
    assert xero.stats()["tenants"][tenant]["rate_limited"] == {"minute": 1}


def test_day_limit_and_starter_tier(server: SandboxServer, xero: XeroControl) -> None:
    tenant, token = limited_tenant(xero, "day-app", day_limit=2, day_window_seconds=30)
    with api_client(server, token, tenant) as api:
        assert [api.get("/Invoices").status_code for _ in range(2)] == [200, 200]
        refused = api.get("/Invoices")
    assert refused.status_code == 429 and refused.headers["X-Rate-Limit-Problem"] == "day"
    assert refused.headers["X-DayLimit-Remaining"] == "0" and 25 <= int(refused.headers["Retry-After"]) <= 30
    starter, starter_token = limited_tenant(xero, "starter-app", tier="starter")
    with api_client(server, starter_token, starter) as api:
        assert api.get("/Invoices").headers["X-DayLimit-Remaining"] == "999"


def test_app_minute_limit_spans_the_apps_organisations(server: SandboxServer, xero: XeroControl) -> None:
    xero.add_client("appmin-app", "secret")
    one = xero.add_tenant("appmin-app", seed=31, invoices=1, contacts=1, days=1, minute_window_seconds=20)
    two = xero.add_tenant("appmin-app", seed=32, invoices=1, contacts=1, days=1, app_minute_limit=3)
    token = xero.grant("appmin-app")["token"]["access_token"]
    tenants = (one["id"], two["id"], two["id"])
    with api_client(server, token, one["id"]) as api:
        codes = [api.get("/Invoices", headers={"xero-tenant-id": t}).status_code for t in tenants]
        refused = api.get("/Invoices", headers={"xero-tenant-id": one["id"]})
        assert codes == [200, 200, 200]
        assert refused.status_code == 429 and refused.headers["X-Rate-Limit-Problem"] == "appminute"
        assert refused.headers["X-AppMinLimit-Remaining"] == "0" and refused.headers["X-MinLimit-Remaining"] == "59"
        assert 15 <= int(refused.headers["Retry-After"]) <= 20
        xero.configure(two["id"], app_minute_limit=10)
        assert api.get("/Invoices").headers["X-AppMinLimit-Remaining"] == "6"


def test_concurrent_limit(server: SandboxServer, xero: XeroControl) -> None:
    tenant, token = limited_tenant(xero, "conc-app", concurrent_limit=2)
    xero.set_faults(tenant=tenant, latency_ms=800)
    results: list[httpx.Response] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        with api_client(server, token, tenant) as api:
            barrier.wait()
            results.append(api.get("/Invoices"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    xero.clear_faults(tenant)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429]
    assert {r.headers.get("X-Rate-Limit-Problem") for r in results if r.status_code == 429} == {"concurrent"}


def test_server_error_rate_limit_and_day_faults(server: SandboxServer, xero: XeroControl) -> None:
    tenant, token = limited_tenant(xero, "fault-app")
    with api_client(server, token, tenant) as api:
        xero.set_faults(tenant=tenant, server_errors=2)
        first, second, third = api.get("/Invoices"), api.get("/Invoices"), api.get("/Invoices")
        assert [first.status_code, second.status_code, third.status_code] == [500, 500, 200]
        assert first.json()["Title"] == "An error occurred" and "status.developer.xero.com" in first.json()["Detail"]
        xero.set_faults(tenant=tenant, server_errors=1, server_error_status=503)
        assert api.get("/Invoices").status_code == 503
        xero.set_faults(tenant=tenant, rate_limited=1)
        limited = api.get("/Invoices")
        assert limited.status_code == 429 and limited.headers["X-Rate-Limit-Problem"] == "minute"
        assert int(limited.headers["Retry-After"]) >= 1
        assert api.get("/Invoices").status_code == 200
        xero.configure(tenant, app_minute_problem="AppMinute")
        xero.set_faults(tenant=tenant, rate_limited=1, rate_limit_problem="appminute")
        app_limited = api.get("/Invoices")
        assert app_limited.headers["X-Rate-Limit-Problem"] == "AppMinute"
        assert app_limited.headers["X-AppMinLimit-Remaining"] == "0"
        xero.set_faults(tenant=tenant, day_limit_exhausted=True)
        day = [api.get("/Invoices") for _ in range(2)]
        assert all(r.status_code == 429 and r.headers["X-Rate-Limit-Problem"] == "day" for r in day)
        assert all(int(r.headers["Retry-After"]) > 3600 and r.headers["X-DayLimit-Remaining"] == "0" for r in day)
        xero.clear_faults(tenant)
        assert api.get("/Invoices").status_code == 200
        xero.set_faults(latency_ms=150)
        started = time.perf_counter()
        assert api.get("/Invoices").status_code == 200
        assert time.perf_counter() - started >= 0.15
        xero.clear_faults()
    with pytest.raises(RuntimeError, match="unknown fault fields"):
        xero.set_faults(bogus=1)


def test_stats_count_paths_statuses_and_token_calls(server: SandboxServer, xero: XeroControl) -> None:
    tenant, token = limited_tenant(xero, "stats-app")
    before = xero.stats()
    with api_client(server, token, tenant) as api:
        api.get("/Invoices")
        api.get("/Contacts")
        api.get(f"/Invoices/{uuid.uuid4()}")
    after = xero.stats()
    assert after["total"] - before["total"] == 3
    paths = after["by_path"]
    assert (
        paths["GET /xero/api/api.xro/2.0/Invoices/{id}"]
        - before["by_path"].get("GET /xero/api/api.xro/2.0/Invoices/{id}", 0)
        == 1
    )
    assert after["by_status"]["404"] - before["by_status"].get("404", 0) == 1
    assert after["tenants"][tenant]["requests"] == 3
    assert "oauth" in after


# --- units ---------------------------------------------------------------------------------------------


def test_where_parser_and_date_helpers() -> None:
    tenant = XeroTenant({"client_id": "unit", "seed": 3, "invoices": 40, "contacts": 5, "days": 3}, NOW)
    invoices = list(tenant.invoices.values())
    pred = parse_where('type=="ACCPAY" or (Status=="PAID" and not Type=="ACCPAY")', "Invoice", tenant)
    assert [i.id for i in invoices if pred(i)] == [
        i.id for i in invoices if i.type == "ACCPAY" or (i.status == "PAID" and i.type != "ACCPAY")
    ]
    by_name = parse_where('Contact.Name.ToLower().Contains("a")', "Invoice", tenant)
    assert [i.id for i in invoices if by_name(i)] == [
        i.id for i in invoices if "a" in tenant.contacts[i.contact_id].name.lower()
    ]
    dated = parse_where("Date >= DateTime(2025, 12, 30) && Total > -1", "Invoice", tenant)
    assert [i.id for i in invoices if dated(i)] == [i.id for i in invoices if i.date >= unix_ms(2025, 12, 30)]
    assert format_msdate(1539993600000) == "/Date(1539993600000+0000)/"
    assert format_msdate(5, offset=False) == "/Date(5)/"
    assert parse_if_modified_since("2024-01-31T00:00:00.700-08:00") == unix_ms(2024, 1, 31, 8)
    assert parse_if_modified_since("yesterday") is None
