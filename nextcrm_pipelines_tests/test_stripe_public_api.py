"""The Stripe client on the SDK's public surface, and its transport.

No private SDK name is reached (a scan of the source), customers' details stay out of the SDK's logs
(success and error bodies alike), and the keep-alive transport under `StripeClient.raw_request` reuses
its connection, replaces one the server closed without spending a retry, and gives up on a silent server.
Pages come from the sandbox emulator or from a small scripted HTTP server, over real sockets.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import stripe

import nextcrm_pipelines
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import AuthenticationFailed, ProviderError, RetryPolicy
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.stripe import client as stripe_client
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_sandbox.server import SandboxServer

# One attempt: the SDK retries nothing, so a request counted twice is the transport's doing.
ONE_ATTEMPT = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05, budget_seconds=5)
LAST_PAGE = b'{"object": "list", "data": [{"id": "ch_1"}], "has_more": false}'
FIRST_PAGE = b'{"object": "list", "data": [{"id": "ch_2"}], "has_more": true}'


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _sdk_names(dotted: str) -> set[str]:
    """Every name an SDK class holds, its instances' attributes included when it builds without arguments."""
    found: object = stripe
    for part in dotted.split(".")[1:]:
        found = getattr(found, part)
    names = set(dir(found))
    with contextlib.suppress(Exception):  # a class that needs arguments: its class-level names must do
        names |= set(vars(found()))  # type: ignore[operator]
    return names


def private_sdk_reach(source: str) -> list[str]:
    """Where `source` depends on a private part of the stripe SDK: a private module or name imported,
    an underscored attribute of anything but `self`/`cls`, `getattr` of an underscored name, and in a
    class built on an SDK class, an underscored name the SDK class already has (read, set or overridden)."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stripe":
            names = [*(node.module or "").split("."), *(alias.name for alias in node.names)]
            found += [f"line {node.lineno}: imports {name}" for name in names if _private(name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "stripe" and any(map(_private, parts)):
                    found.append(f"line {node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("getattr", "setattr", "hasattr", "delattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                found.append(f"line {node.lineno}: {_dotted(node.func)}(..., {name.value!r})")
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        sdk = set().union(*(_sdk_names(_dotted(b)) for b in cls.bases if _dotted(b).startswith("stripe.")))
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and _dotted(node.value) in ("self", "cls") and node.attr in sdk:
                found += [f"line {node.lineno}: self.{node.attr} (the SDK's own)"] if _private(node.attr) else []
            elif isinstance(node, ast.FunctionDef) and _private(node.name) and node.name in sdk:
                found.append(f"line {node.lineno}: overrides {node.name} (the SDK's own)")
    return found


def _modules_on_the_sdk() -> list[Path]:
    """The Stripe provider's modules and any other module of the package that imports stripe."""
    package = Path(nextcrm_pipelines.__file__).parent
    on_sdk = [path for path in package.rglob("*.py") if "import stripe" in path.read_text()]
    return sorted({*Path(stripe_client.__file__).parent.glob("*.py"), *on_sdk})


def test_the_stripe_client_reaches_no_private_part_of_the_sdk():
    modules = _modules_on_the_sdk()
    assert Path(stripe_client.__file__) in modules
    reach = {path.name: private_sdk_reach(path.read_text()) for path in modules}
    assert {name: lines for name, lines in reach.items() if lines} == {}


def test_the_scan_finds_each_way_of_reaching_into_the_sdk():
    source = """
import stripe
import stripe._util
from stripe._api_requestor import _APIRequestor
from stripe import _encode

class Transport(stripe.HTTPClient):
    def __init__(self):
        super().__init__()
        self._pool = None

    def _should_retry(self, *args):
        return self._thread_local

def get(client):
    requestor = client._requestor
    requestor._interpret_response(b"{}", 200, {}, "V1")
    return getattr(client, "_requestor")
"""
    reach = private_sdk_reach(source)
    for expected in ("imports stripe._util", "imports _api_requestor", "imports _APIRequestor", "imports _encode",
                     "overrides _should_retry", "self._thread_local", "._requestor", "._interpret_response",
                     "getattr(..., '_requestor')"):  # fmt: skip
        assert any(expected in line for line in reach), (expected, reach)
    assert not any("_pool" in line for line in reach)  # the subclass's own state is its business


class Scripted:
    """A small HTTP/1.1 server on loopback: `answer(connection_no, request_no, request)` gives the raw
    response, or None to close the connection without one. Keeps every request it read, in order."""

    def __init__(self, answer: Callable[[int, int, bytes], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[tuple[int, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self._serve, args=(len(self.connections) - 1, sock), daemon=True).start()

    def _serve(self, number: int, sock: socket.socket) -> None:
        buffered, served = b"", 0
        with sock, contextlib.suppress(OSError):  # OSError: closed by `close`
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                request, buffered = buffered.split(b"\r\n\r\n", 1)
                self.requests.append((number, request))
                response = self.answer(number, served, request)
                served += 1
                if response is None:
                    return
                sock.sendall(response)

    def close(self) -> None:
        self.listener.close()
        for sock in self.connections:
            sock.close()


def http_response(body: bytes, status: int = 200, headers: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


def pages(_connection: int, _request: int, request: bytes) -> bytes:
    """Two pages of charges: the first without `starting_after`, the second after it."""
    return http_response(LAST_PAGE if b"starting_after=ch_2" in request else FIRST_PAGE)


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[int, int, bytes], bytes | None]], Scripted]]:
    servers: list[Scripted] = []

    def start(answer: Callable[[int, int, bytes], bytes | None]) -> Scripted:
        servers.append(Scripted(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _api(url: str, key: str, *, tenant: str | None = None, timeout: float = 30.0) -> StripeApi:
    connection = Connection(id="stripe-public", provider="stripe", display_name="Public", base_url=url,
                            external_tenant=tenant, settings={"requests_per_second": 0})  # fmt: skip
    return StripeApi(connection, Secrets({"api_key": key}), retry=ONE_ATTEMPT, timeout=timeout)


def _read_all(api: StripeApi) -> list[str]:
    return [obj["id"] for data, _ in api.list_pages("/v1/charges", {}) for obj in data]


@pytest.fixture
def sdk_logs(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], monkeypatch) -> Callable[[], str]:
    """Everything the SDK logs at debug level, through `logging` and its own console output."""
    caplog.set_level(logging.DEBUG, logger="stripe")
    monkeypatch.setattr(stripe, "log", "debug")

    def logged() -> str:
        records = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("stripe"))
        return records + "\n" + capfd.readouterr().err

    return logged


@pytest.mark.timeout(60)
def test_the_sdks_debug_log_never_sees_a_charge(sandbox: SandboxServer, sdk_logs):
    key = f"sk_test_{uuid.uuid4().hex}"
    sandbox.add_stripe_account(api_key=key, seed=5, charges=150, subscriptions=0, days=1, requests_per_second=0)
    with _api(sandbox.url, key) as api:
        pages_read = [data for data, _ in api.list_pages("/v1/charges", {})]
    charges = [charge for data in pages_read for charge in data]
    emails = {c["billing_details"]["email"] for c in charges if c["billing_details"].get("email")}
    assert len(charges) >= 150 and emails and api.stats.requests == len(pages_read) >= 2
    logged = sdk_logs()
    assert "API response body" in logged  # the SDK did log each answer, at debug level
    assert [email for email in emails if email in logged] == []
    # The only charges named are the cursors of the requests themselves.
    assert {c["id"] for c in charges if c["id"] in logged} == {data[-1]["id"] for data in pages_read[:-1]}
    assert key not in logged


@pytest.mark.timeout(30)
def test_an_error_answer_raises_its_typed_error_and_keeps_its_details_from_the_sdks_log(scripted, sdk_logs):
    declined = {"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined.",
                          "payment_intent": {"id": "pi_1", "receipt_email": "jane.doe@example.com"}}}  # fmt: skip
    server = scripted(lambda *_: http_response(orjson.dumps(declined), 402))
    with _api(server.url, "sk_test_declined") as api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 100})
    assert failure.value.status == 402 and "Your card was declined." in str(failure.value)
    logged = sdk_logs()
    assert "card_declined" in logged and "jane.doe" not in logged and "pi_1" not in logged


@pytest.mark.timeout(30)
def test_a_refused_key_is_an_authentication_failure_that_names_no_key(scripted):
    refused = b'{"error": {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****9xyz"}}'
    server = scripted(lambda *_: http_response(refused, 401))
    with _api(server.url, "sk_test_refused9xyz") as api, pytest.raises(AuthenticationFailed) as failure:
        api.get("/v1/charges", {"limit": 100})
    assert failure.value.status == 401 and "Invalid API Key provided" in str(failure.value)
    assert "sk_test_refused9xyz" not in str(failure.value) and "9xyz" not in str(failure.value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [200, 502])
@pytest.mark.parametrize("body", [b"<html>jane.doe@example.com</html>", b'["jane.doe@example.com"]', b""])
def test_an_answer_that_is_not_stripes_json_is_a_provider_error_without_its_body(scripted, status, body):
    server = scripted(lambda *_: http_response(body, status))
    with _api(server.url, "sk_test_garbled") as api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 100})
    message = str(failure.value)
    assert "GET /v1/charges" in message and "jane.doe" not in message and "sk_test_garbled" not in message
    assert failure.value.status == (None if status == 200 else status)


@pytest.mark.timeout(30)
def test_every_page_carries_the_key_and_connect_account_over_one_kept_alive_connection(scripted):
    server = scripted(pages)
    with _api(server.url, "sk_test_connect", tenant="acct_1Connected") as api:
        assert _read_all(api) == ["ch_2", "ch_1"]
    assert [number for number, _ in server.requests] == [0, 0]
    for _, request in server.requests:
        assert b"\r\nAuthorization: Bearer sk_test_connect" in request
        assert b"\r\nStripe-Account: acct_1Connected" in request
    assert server.requests[1][1].startswith(b"GET /v1/charges?limit=100&starting_after=ch_2 HTTP/1.1")


@pytest.mark.timeout(30)
def test_a_connection_the_server_closed_after_answering_is_replaced_before_the_next_page(scripted):
    server = scripted(pages)
    with _api(server.url, "sk_test_closing") as api:
        first = api.get("/v1/charges", {"limit": 100})
        server.connections[0].shutdown(socket.SHUT_RDWR)  # the server drops the idle connection
        time.sleep(0.1)
        second = api.get("/v1/charges", {"limit": 100, "starting_after": "ch_2"})
    assert [first["data"], second["data"]] == [[{"id": "ch_2"}], [{"id": "ch_1"}]]
    assert [number for number, _ in server.requests] == [0, 1]
    assert (api.stats.requests, api.stats.retries) == (2, 0)


@pytest.mark.timeout(30)
def test_a_reused_connection_closed_as_the_request_arrives_is_sent_once_more_without_a_retry(scripted):
    def close_on_second_request(_connection: int, served: int, request: bytes) -> bytes | None:
        return None if served == 1 else pages(_connection, served, request)

    server = scripted(close_on_second_request)
    with _api(server.url, "sk_test_race") as api:
        assert _read_all(api) == ["ch_2", "ch_1"]
    # The second page was asked on the kept-alive connection, which closed unanswered, then on a new one.
    assert [number for number, _ in server.requests] == [0, 0, 1]
    assert (api.stats.requests, api.stats.retries) == (2, 0)


@pytest.mark.timeout(30)
def test_a_server_that_never_answers_fails_the_request_after_the_read_timeout(scripted):
    server = scripted(lambda *_: time.sleep(10))  # type: ignore[func-returns-value]
    started = time.monotonic()
    with _api(server.url, "sk_test_silent", timeout=0.5) as api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 100})
    assert time.monotonic() - started < 5
    assert "could not reach Stripe" in str(failure.value) and len(server.requests) == 1
