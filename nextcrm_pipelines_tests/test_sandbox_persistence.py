"""A sandbox started with a state directory keeps its accounts across a restart and a crash (``kill -9``).

Each test runs the sandbox as its own process (``SandboxServer(subprocess=True, state_dir=...)``), changes it
through the real clients and HTTP APIs, stops or kills it, starts a new process on the same directory and
reads the change back over HTTP: a Stripe refund (and the webhook subscription that announces the next one),
a Xero grant whose tokens keep working and refreshing, PayPal and Mautic accounts with their records. A state
file the code cannot use is moved aside and the sandbox starts empty; ``serve --help`` names what it serves.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import stripe
from click.testing import CliRunner

from nextcrm_sandbox.mautic import MauticControl
from nextcrm_sandbox.paypal import PayPalControl
from nextcrm_sandbox.server import SandboxServer, build_app, serve_command
from nextcrm_sandbox.stripe import StripeControl
from nextcrm_sandbox.xero import XeroControl

NOW = 1_770_000_000
XERO_TOKEN = "/xero/identity/connect/token"
XERO_API = "/xero/api"


def _saves(server: SandboxServer) -> int:
    """Save now (the changes so far) and return how many saves the server made."""
    return int(server.control("POST", "/_sandbox/state/save")["saves"])


def _wait_for_saved(server: SandboxServer, part: str, after: int, timeout: float = 10.0) -> None:
    """Wait until the server saved ``part`` on its own (in a save after the ``after``-th one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.control("GET", "/_sandbox/state")["part_saves"].get(part, 0) > after:
            return
        time.sleep(0.05)
    raise AssertionError(f"the sandbox did not save {part} within {timeout} s")


def _records(exports: dict[str, Any], url: str) -> Any:
    """The records and deleted ids of control-API exports, the server's base URL in their links replaced by a
    placeholder (a restarted process listens on another port)."""
    kept = {entity: {"records": e["records"], "deleted_ids": e["deleted_ids"]} for entity, e in exports.items()}
    return orjson.loads(orjson.dumps(kept).replace(url.encode(), b"http://sandbox"))


def _crash(server: SandboxServer) -> None:
    """``kill -9`` the sandbox process: no shutdown, no last save."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop()


class _Receiver:
    """A webhook receiver on loopback that answers 200 and keeps every delivery (headers and body)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.deliveries) >= count, f"{len(self.deliveries)} of {count} webhook deliveries arrived"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    hook = _Receiver()
    yield hook
    hook.close()


# --- Stripe: a refund survives a crash, and the webhook subscription keeps announcing refunds ---------------


def test_a_stripe_refund_survives_a_crash_and_its_webhook_subscription_keeps_working(
    tmp_path: Path, receiver: _Receiver
) -> None:
    key = f"sk_test_{uuid.uuid4().hex}"
    secret = "whsec_persisted_0000000000000000"
    spec = {"api_key": key, "seed": 3, "charges": 60, "subscriptions": 5, "days": 5, "requests_per_second": 0,
            "now": NOW}  # fmt: skip
    first = SandboxServer([spec], now=NOW, subprocess=True, state_dir=tmp_path).start()
    try:
        client = stripe.StripeClient(key, base_addresses={"api": first.url}, max_network_retries=0)
        charges = [c for c in client.v1.charges.list({"limit": 100}) if c.paid and not c.refunded]
        charge, later = charges[0], charges[1]
        hook = StripeControl(first).subscribe_webhooks(key, receiver.url, secret, enabled_events=["charge.refunded"])
        saved = _saves(first)
        refund = client.v1.refunds.create({"charge": charge.id, "amount": 150})
        receiver.wait(1)
        _wait_for_saved(first, "stripe", after=saved)
        _crash(first)
    finally:
        first.stop()

    # The same account spec again: a restored identical account is kept, not generated afresh.
    second = SandboxServer([spec], subprocess=True, state_dir=tmp_path).start()
    try:
        assert abs(second.clock() - NOW) < 300, "the clock kept its offset (the sandbox was started at NOW)"
        client = stripe.StripeClient(key, base_addresses={"api": second.url}, max_network_retries=0)
        again = client.v1.charges.retrieve(charge.id)
        assert again.amount_refunded == 150
        assert [r.id for r in client.v1.refunds.list({"charge": charge.id})] == [refund.id]
        events = client.v1.events.list({"type": "charge.refunded", "limit": 100})
        assert charge.id in {e.data.object["id"] for e in events}

        listing = second.control("GET", "/_sandbox/accounts")
        assert listing["restored"] is True
        assert listing["stripe"]["accounts"] == [{"id": key}]
        assert [h["id"] for h in listing["stripe"]["webhooks"]] == [hook["id"]]

        client.v1.refunds.create({"charge": later.id})
        receiver.wait(2)
        headers, body = receiver.deliveries[-1]
        # Signed at sandbox time (NOW and on), hence no tolerance against this machine's clock.
        event = stripe.Webhook.construct_event(body, headers["stripe-signature"], secret, tolerance=None)
        assert event.type == "charge.refunded" and event.data.object["id"] == later.id
    finally:
        second.stop()


# --- Xero: tokens issued before a restart work after it, and refresh -------------------------------------


def test_xero_tokens_and_connections_survive_a_clean_restart(tmp_path: Path) -> None:
    client_id, secret = f"app-{uuid.uuid4().hex[:8]}", "persisted-secret"
    first = SandboxServer(subprocess=True, state_dir=tmp_path).start()
    try:
        xero = XeroControl(first)
        xero.add_client(client_id, secret)
        tenant = xero.add_tenant(client_id, seed=4, invoices=25, contacts=6, days=5)
        token = xero.grant(client_id)["token"]
        bearer = {"authorization": f"Bearer {token['access_token']}"}
        # Connection ids are made when first listed (a read): saved by the shutdown, well within the 5 s a read waits.
        before = httpx.get(f"{first.url}{XERO_API}/connections", headers=bearer).json()
    finally:
        first.stop()  # SIGTERM: uvicorn shuts down and the sandbox saves

    second = SandboxServer(subprocess=True, state_dir=tmp_path).start()
    try:
        after = httpx.get(f"{second.url}{XERO_API}/connections", headers=bearer)
        assert after.status_code == 200 and after.json() == before
        json_from = {**bearer, "xero-tenant-id": tenant["id"], "accept": "application/json"}
        invoices = httpx.get(f"{second.url}{XERO_API}/api.xro/2.0/Invoices", headers=json_from)
        assert invoices.status_code == 200
        assert len(invoices.json()["Invoices"]) == 25

        form = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"]}
        refreshed = httpx.post(f"{second.url}{XERO_TOKEN}", auth=(client_id, secret), data=form)
        assert refreshed.status_code == 200, refreshed.text
        fresh = refreshed.json()
        assert fresh["refresh_token"] != token["refresh_token"]
        again = httpx.get(f"{second.url}{XERO_API}/connections",
                          headers={"authorization": f"Bearer {fresh['access_token']}"})  # fmt: skip
        assert again.status_code == 200 and again.json() == before
        assert second.control("GET", "/_sandbox/accounts")["xero"]["tenants"] == [
            {"id": tenant["id"], "name": tenant["name"], "client_id": client_id}
        ]
    finally:
        second.stop()


def test_a_restart_opens_the_rate_limit_windows_afresh(tmp_path: Path) -> None:
    """Rate-limit windows run on the machine's monotonic clock, which a restored process may not share (a reboot
    restarts it): they come back closed, while the data and tokens are kept."""
    client_id = f"app-{uuid.uuid4().hex[:8]}"
    with SandboxServer(state_dir=tmp_path) as first:
        xero = XeroControl(first)
        xero.add_client(client_id, "secret")
        tenant = xero.add_tenant(client_id, seed=2, invoices=3, contacts=2, days=2, minute_limit=2)
        token = xero.grant(client_id)["token"]["access_token"]
        headers = {"authorization": f"Bearer {token}", "xero-tenant-id": tenant["id"], "accept": "application/json"}
        url = f"{first.url}{XERO_API}/api.xro/2.0/Invoices"
        assert [httpx.get(url, headers=headers).status_code for _ in range(3)] == [200, 200, 429]

    with SandboxServer(state_dir=tmp_path) as second:
        response = httpx.get(f"{second.url}{XERO_API}/api.xro/2.0/Invoices", headers=headers)
        assert response.status_code == 200 and len(response.json()["Invoices"]) == 3


# --- PayPal and Mautic: accounts and records survive a crash ---------------------------------------------


def test_paypal_and_mautic_accounts_and_records_survive_a_crash(tmp_path: Path) -> None:
    first = SandboxServer(subprocess=True, state_dir=tmp_path).start()
    try:
        paypal = PayPalControl(first)
        pp_client, pp_secret = f"pp-{uuid.uuid4().hex[:8]}", "pp-secret"
        account = paypal.add_account(pp_client, pp_secret, seed=5, transactions=80, subscriptions=4, days=5,
                                     requests_per_minute=0)  # fmt: skip
        paypal.changes(account["id"], transactions=3, refunds=2, cancels=1)
        pp_token = httpx.post(f"{first.url}/paypal/api/v1/oauth2/token", auth=(pp_client, pp_secret),
                              data={"grant_type": "client_credentials"}).json()["access_token"]  # fmt: skip
        ca = paypal.webhook_ca()

        mautic = MauticControl(first)
        m_client = f"mautic-{uuid.uuid4().hex[:8]}"
        install = mautic.add_account(seed=8, campaigns=6, contacts=12, days=5,
                                     clients=[{"client_id": m_client, "client_secret": "m-secret"}])  # fmt: skip
        m_token = mautic.grant(install["id"], m_client)["token"]["access_token"]
        created = httpx.post(f"{first.url}{install['base_path']}/api/contacts/new",
                             headers={"authorization": f"Bearer {m_token}"},
                             json={"firstname": "Persisted", "email": "persisted@example.invalid"})  # fmt: skip
        assert created.status_code == 201, created.text
        contact_id = created.json()["contact"]["id"]

        saved = _saves(first)
        mautic.changes(install["id"], contact_edits=2)
        paypal.add_record(account["id"], "transaction", {"amount": "12.34"})
        _wait_for_saved(first, "paypal", after=saved)
        _wait_for_saved(first, "mautic", after=saved)
        mautic_records = {e: mautic.export(install["id"], e) for e in ("campaigns", "contacts")}
        paypal_records = {e: paypal.export(account["id"], e) for e in ("transactions", "subscriptions", "plans")}
        _crash(first)
    finally:
        first.stop()

    second = SandboxServer(subprocess=True, state_dir=tmp_path).start()
    try:
        paypal, mautic = PayPalControl(second), MauticControl(second)
        paypal_after = {e: paypal.export(account["id"], e) for e in paypal_records}
        assert _records(paypal_after, second.url) == _records(paypal_records, first.url)
        assert len(paypal_records["transactions"]["records"]) > 80
        assert paypal.webhook_ca() == ca, "a connection that trusts this CA keeps verifying deliveries"
        plans = httpx.get(f"{second.url}/paypal/api/v1/billing/plans",
                          headers={"authorization": f"Bearer {pp_token}"})  # fmt: skip
        assert plans.status_code == 200

        mautic_after = {e: mautic.export(install["id"], e) for e in mautic_records}
        assert _records(mautic_after, second.url) == _records(mautic_records, first.url)
        contact = httpx.get(f"{second.url}{install['base_path']}/api/contacts/{contact_id}",
                            headers={"authorization": f"Bearer {m_token}"})  # fmt: skip
        assert contact.status_code == 200
        assert contact.json()["contact"]["fields"]["all"]["firstname"] == "Persisted"

        listing = second.control("GET", "/_sandbox/accounts")
        assert listing["paypal"]["accounts"] == [{"id": account["id"], "client_id": pp_client}]
        assert [a["id"] for a in listing["mautic"]["accounts"]] == [install["id"]]
        assert listing["mautic"]["accounts"][0]["clients"] == [m_client]
    finally:
        second.stop()


# --- a state the code cannot use ---------------------------------------------------------------------------


def _saved_state(directory: Path) -> dict[str, bytes]:
    """Files of a sandbox with one Stripe account, saved at its clean stop (in-process server)."""
    spec = {"api_key": "sk_test_aside", "seed": 1, "charges": 5, "subscriptions": 1, "requests_per_second": 0}
    with SandboxServer([spec], state_dir=directory):
        pass
    files = {p.name: p.read_bytes() for p in directory.glob("*.state")}
    assert {"clock.state", "stripe.state"} <= set(files)
    return files


def _damage(directory: Path) -> str:
    path = directory / "stripe.state"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    return "is damaged"


def _other_code(directory: Path) -> str:
    path = directory / "stripe.state"
    head, _, payload = path.read_bytes().partition(b"\n")
    magic, _, header = head.partition(b" ")
    changed = {**orjson.loads(header), "code": "0" * 64}
    path.write_bytes(magic + b" " + orjson.dumps(changed) + b"\n" + payload)
    return "was written by another version of the sandbox code"


def _garbage(directory: Path) -> str:
    (directory / "clock.state").write_bytes(b"not a sandbox state at all")
    return "is not a sandbox state"


@pytest.mark.parametrize("spoil", [_damage, _other_code, _garbage])
def test_a_state_the_code_cannot_use_is_moved_aside_and_the_sandbox_starts_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spoil: Any
) -> None:
    _saved_state(tmp_path)
    problem = spoil(tmp_path)
    spoiled = {p.name: p.read_bytes() for p in tmp_path.glob("*.state")}
    capsys.readouterr()

    app = build_app(state_dir=tmp_path)

    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "started a fresh sandbox" in lines[0]
    assert app.state.stripe.accounts() == []
    assert list(tmp_path.glob("*.state")) == []
    (aside,) = tmp_path.glob("set-aside-*")
    assert str(aside) in lines[0] and str(app.state.set_aside.moved_to) == str(aside)
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == spoiled, "the old files are kept, unchanged"


def test_without_a_state_directory_the_sandbox_lives_in_memory() -> None:
    with SandboxServer() as server:
        assert server.control("GET", "/_sandbox/state") == {"state_dir": None}
        response = httpx.post(f"{server.url}/_sandbox/state/save")
        assert response.status_code == 409
        assert server.control("GET", "/_sandbox/accounts")["restored"] is False


# --- serve --help ----------------------------------------------------------------------------------------


def test_serve_help_names_the_options_and_the_providers() -> None:
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    for option in ("--host", "--port", "--state-dir", "--stripe-account", "--now", "--announce"):
        assert option in text
    for provider in ("Stripe", "Xero", "QuickBooks", "MYOB", "PayPal", "BillionMail", "Mautic"):
        assert provider in text
    assert "loopback" in text
    refused = CliRunner().invoke(serve_command, ["--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "loopback" in refused.output
