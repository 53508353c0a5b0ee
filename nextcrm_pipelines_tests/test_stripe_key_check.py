"""A Stripe key checked before it is stored: `GET /v1/account` against the sandbox (or a scripted server for the
answers the sandbox does not give), over real HTTP. A good key names its account, a wrong one is refused in
Stripe's words with no key in the message, a platform key is refused for a connected account it cannot act on,
a restricted key passes on charges it may read, and a Stripe that cannot be reached is not a refusal."""

from __future__ import annotations

import socket
import uuid

import orjson
import pytest
import stripe

from nextcrm_pipelines.core.http import AuthenticationFailed, ProviderError, ProviderUnreachable, RetryPolicy
from nextcrm_pipelines.providers.stripe.keys import check_credentials
from nextcrm_pipelines_tests.test_stripe_public_api import Scripted, http_response, scripted  # noqa: F401
from nextcrm_sandbox.server import SandboxServer

QUICK = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.05, budget_seconds=5)
NO_ACCESS = orjson.dumps({"error": {"type": "invalid_request_error", "code": "secret_key_required",
                                    "message": "The provided key 'rk_test_***' does not have the required "
                                    "permissions for this endpoint."}})  # fmt: skip
ONE_CHARGE = b'{"object": "list", "data": [{"id": "ch_1"}], "has_more": true, "url": "/v1/charges"}'


@pytest.fixture
def key(sandbox: SandboxServer) -> str:
    api_key = f"sk_test_{uuid.uuid4().hex}"
    sandbox.add_stripe_account(api_key=api_key, seed=3, charges=20, subscriptions=2, days=1, requests_per_second=0)
    return api_key


def test_a_good_key_names_the_account_it_reaches(sandbox, key):
    account = stripe.StripeClient(key, base_addresses={"api": sandbox.url}).v1.accounts.retrieve_current()
    assert check_credentials({"api_key": key}, base_url=sandbox.url) == account.id
    assert check_credentials({"api_key": key}, base_url=sandbox.url, tenant=account.id) == account.id


def test_a_wrong_key_is_refused_in_stripes_words_without_the_key(sandbox, key):
    wrong = key[:-6] + "abcdef"
    with pytest.raises(AuthenticationFailed) as refused:
        check_credentials({"api_key": wrong}, base_url=sandbox.url)
    message = str(refused.value)
    assert "Stripe refused the API key" in message and "Invalid API Key provided" in message
    assert refused.value.status == 401
    for part in (wrong, wrong[8:], wrong[-4:]):
        assert part not in message


def test_a_platform_key_is_refused_for_a_connected_account_it_cannot_act_on(sandbox, key):
    with pytest.raises(AuthenticationFailed) as refused:
        check_credentials({"api_key": key}, base_url=sandbox.url, tenant="acct_1NotConnected0000")
    assert refused.value.status == 403 and "acct_1NotConnected0000" in str(refused.value)
    assert key[8:] not in str(refused.value)


def test_a_restricted_key_passes_on_the_charges_it_may_read(scripted):  # noqa: F811
    def answer(_connection: int, _request: int, request: bytes) -> bytes:
        if request.startswith(b"GET /v1/account"):
            return http_response(NO_ACCESS, 403)
        return http_response(ONE_CHARGE)

    server = scripted(answer)
    assert check_credentials({"api_key": "rk_test_readsync"}, base_url=server.url, retry=QUICK) is None
    assert [r.split(b" ")[1].split(b"?")[0] for _, r in server.requests] == [b"/v1/account", b"/v1/charges"]


def test_a_restricted_key_that_may_not_read_charges_is_refused(scripted):  # noqa: F811
    server = scripted(lambda _c, _r, _request: http_response(NO_ACCESS, 403))
    with pytest.raises(AuthenticationFailed) as refused:
        check_credentials({"api_key": "rk_test_nothing"}, base_url=server.url, retry=QUICK)
    assert refused.value.status == 403 and "required permissions" in str(refused.value)


def test_a_stripe_that_cannot_be_reached_is_not_a_refusal():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ProviderError) as failed:
        check_credentials({"api_key": "sk_test_unreachable"}, base_url=closed, retry=QUICK)
    assert isinstance(failed.value, ProviderUnreachable) and not isinstance(failed.value, AuthenticationFailed)
    assert "could not reach Stripe" in str(failed.value) and "sk_test_unreachable" not in str(failed.value)
