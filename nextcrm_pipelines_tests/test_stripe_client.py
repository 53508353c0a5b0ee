"""The Stripe client on the SDK's public surface: no private SDK attribute, customers' details out of
the SDK's logs, the Connect account on every request, and a success without a JSON object refused.

Pages come from the sandbox emulator or from a small local HTTP server, over real HTTP.
"""

from __future__ import annotations

import ast
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import ProviderError, RetryPolicy
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.stripe import client as stripe_client
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_pipelines.sandbox.server import SandboxServer

RETRY = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05, budget_seconds=5)


def _api(url: str, key: str, tenant: str | None = None) -> StripeApi:
    connection = Connection(id="stripe-client", provider="stripe", display_name="Client", base_url=url,
                            external_tenant=tenant, settings={"requests_per_second": 0})  # fmt: skip
    return StripeApi(connection, Secrets({"api_key": key}), retry=RETRY)


class Stub:
    """What the local server answers to `/v1/charges`, and the headers of every request it got."""

    status = 200
    body = b'{"object": "list", "data": [], "has_more": false}'
    headers: list[dict[str, str]] = []


async def _charges(request: Request) -> Response:
    Stub.headers.append(dict(request.headers))
    return Response(Stub.body, status_code=Stub.status, media_type="application/json")


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/charges", _charges)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def stub(stub_url: str) -> Iterator[str]:
    Stub.status, Stub.body, Stub.headers = 200, b'{"object": "list", "data": [], "has_more": false}', []
    yield stub_url


def test_the_client_touches_no_private_attribute_of_the_sdk():
    """Only `self`'s own underscored attributes are used: anything else private may change in any SDK release."""
    source = Path(stripe_client.__file__).read_text()
    private = [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not (node.attr.startswith("__") and node.attr.endswith("__"))
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []


@pytest.mark.timeout(30)
def test_the_sdks_debug_log_carries_no_customer_details(sandbox: SandboxServer, caplog):
    key = f"sk_test_{uuid.uuid4().hex}"
    sandbox.add_stripe_account(api_key=key, seed=5, charges=40, subscriptions=0, days=1, requests_per_second=0)
    caplog.set_level(logging.DEBUG, logger="stripe")
    with _api(sandbox.url, key) as api:
        charges = [charge for data, _ in api.list_pages("/v1/charges", {}) for charge in data]
    names = {charge["billing_details"]["name"] for charge in charges if charge["billing_details"]["name"]}
    assert len(charges) >= 40 and names
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("stripe"))
    assert "API response body" in logged  # the SDK did log, at debug level
    assert [name for name in names if name in logged] == []
    assert not any(charge["id"] in logged for charge in charges)


@pytest.mark.timeout(20)
def test_a_connect_account_is_sent_with_every_page(stub):
    Stub.body = b'{"object": "list", "data": [{"id": "ch_1"}], "has_more": false}'
    with _api(stub, "sk_test_connect", tenant="acct_1Connected") as api:
        read = [obj["id"] for data, _ in api.list_pages("/v1/charges", {}) for obj in data]
    assert read == ["ch_1"]
    assert [h.get("stripe-account") for h in Stub.headers] == ["acct_1Connected"]
    assert Stub.headers[0]["authorization"] == "Bearer sk_test_connect"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("body", [b"<html>jane.doe@example.com</html>", b'["jane.doe@example.com"]', b""])
def test_a_success_without_a_json_object_is_a_provider_error_that_leaves_the_body_out(stub, body):
    Stub.body = body
    with _api(stub, "sk_test_garbled") as api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 100})
    message = str(failure.value)
    assert "GET /v1/charges" in message and "not a JSON object" in message
    assert "jane.doe" not in message and "sk_test_garbled" not in message


@pytest.mark.timeout(20)
def test_an_error_answer_still_raises_the_sdks_typed_error_through_the_client(stub):
    Stub.status = 400
    Stub.body = b'{"error": {"type": "invalid_request_error", "message": "No such charge"}}'
    with _api(stub, "sk_test_bad_request") as api, pytest.raises(ProviderError) as failure:
        api.get("/v1/charges", {"limit": 100})
    assert failure.value.status == 400 and "No such charge" in str(failure.value)
    assert len(Stub.headers) == 1
