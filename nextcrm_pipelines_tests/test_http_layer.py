"""The generic HTTP layer against a live loopback server: retries, pacing, budget, clear errors."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nextcrm_pipelines.core.http import (
    AuthenticationFailed,
    BudgetExhausted,
    DailyLimitExhausted,
    HttpClient,
    ProviderError,
    RequestStats,
    RetryPolicy,
)


class Script:
    """Responses to hand out in order, then 200s."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict[str, str]]] = []
        self.hits = 0


SCRIPT = Script()


async def endpoint(request: Request) -> JSONResponse:
    SCRIPT.hits += 1
    if SCRIPT.queue:
        status, headers = SCRIPT.queue.pop(0)
        return JSONResponse({"error": "scripted"}, status_code=status, headers=headers)
    return JSONResponse({"ok": True, "hit": SCRIPT.hits})


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    app = Starlette(routes=[Route("/thing", endpoint, methods=["GET", "POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def reset_script():
    SCRIPT.queue.clear()
    SCRIPT.hits = 0


def client(url: str, **kwargs) -> HttpClient:
    retry = kwargs.pop("retry", RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, budget_seconds=10))
    return HttpClient(provider="acme", connection_id="acme-main", base_url=url, retry=retry, **kwargs)


def test_5xx_and_429_are_retried_and_counted(server_url):
    SCRIPT.queue += [(503, {}), (429, {"Retry-After": "0"}), (502, {})]
    with client(server_url) as http:
        assert http.get_json("/thing")["ok"] is True
        assert http.stats.requests == 4 and http.stats.retries == 3 and http.stats.rate_limit_waits == 1


def test_retry_after_is_honoured(server_url):
    SCRIPT.queue += [(429, {"Retry-After": "1"})]
    with client(server_url) as http:
        started = time.monotonic()
        http.get_json("/thing")
        assert time.monotonic() - started >= 0.95


def test_errors_name_provider_connection_endpoint_and_status(server_url):
    SCRIPT.queue += [(404, {})]
    with client(server_url) as http, pytest.raises(ProviderError) as failure:
        http.get_json("/thing")
    assert str(failure.value).startswith("acme connection 'acme-main' GET /thing -> HTTP 404")


def test_401_is_an_authentication_failure_not_retried(server_url):
    SCRIPT.queue += [(401, {}), (401, {})]
    with client(server_url) as http, pytest.raises(AuthenticationFailed):
        http.get_json("/thing")
    assert SCRIPT.hits == 1


def test_a_provider_that_keeps_failing_hits_the_budget(server_url):
    SCRIPT.queue += [(503, {"Retry-After": "2"})] * 10
    retry = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05, budget_seconds=1)
    with client(server_url, retry=retry) as http, pytest.raises(BudgetExhausted, match="budget"):
        http.get_json("/thing")


def test_a_daily_limit_is_reported_as_such_and_not_retried(server_url):
    SCRIPT.queue += [(429, {"X-Rate-Limit-Problem": "day"})]
    classify = lambda r: "daily_limit" if r.headers.get("x-rate-limit-problem") == "day" else None  # noqa: E731
    with client(server_url, classify=classify) as http, pytest.raises(DailyLimitExhausted, match="daily"):
        http.get_json("/thing")
    assert SCRIPT.hits == 1


def test_the_client_side_limiter_paces_requests(server_url):
    with client(server_url, requests_per_second=20) as http:
        started = time.monotonic()
        for _ in range(30):
            http.get_json("/thing")
        elapsed = time.monotonic() - started
    # 20 tokens of burst, then 10 more at 20/s: at least ~0.5 s.
    assert elapsed >= 0.45 and http.stats.throttle_seconds > 0


def test_errors_and_counters_cross_to_the_process_that_started_a_sync_helper():
    """A helper process of a backfill sends its results and errors back pickled: class, message and
    where it failed survive (bad credentials stay `AuthenticationFailed`), the provider's response does not."""
    error = AuthenticationFailed("key refused", provider="stripe", connection_id="stripe-acme",
                                 endpoint="GET /v1/charges", status=401)  # fmt: skip
    error.response = object()
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is AuthenticationFailed and str(back) == str(error)
    assert (back.provider, back.connection_id, back.endpoint, back.status) == ("stripe", "stripe-acme",
                                                                                "GET /v1/charges", 401)  # fmt: skip
    assert back.response is None
    stats = RequestStats()
    stats.add(requests=3, retries=1, throttle_seconds=0.5)
    copied = pickle.loads(pickle.dumps(stats))
    copied.add(requests=1)
    assert copied.as_dict() == {"requests": 4, "retries": 1, "rate_limit_waits": 0, "throttle_seconds": 0.5}


def test_a_paced_sync_longer_than_the_budget_completes(server_url):
    """The budget bounds one request's retries, not the client's life: a healthy paced sync runs past it,
    and a 503 met after that is still retried."""
    retry = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, budget_seconds=0.5)
    with client(server_url, retry=retry, requests_per_second=20) as http:
        started = time.monotonic()
        answers = [http.get_json("/thing") for _ in range(50)]  # 20 at once, then 30 at 20/s: ~1.5 s
        assert time.monotonic() - started >= 2 * retry.budget_seconds
        SCRIPT.queue += [(503, {})]
        answers.append(http.get_json("/thing"))
    assert [a["ok"] for a in answers] == [True] * 51
    assert SCRIPT.hits == 52 and http.stats.retries == 1


def test_pacing_waits_do_not_count_against_a_requests_budget(server_url):
    """A request that first waits its turn at the limiter for longer than the budget still gets its retries."""
    retry = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, budget_seconds=0.3)
    with client(server_url, retry=retry, requests_per_second=2) as http:
        http.get_json("/thing")
        http.get_json("/thing")
        SCRIPT.queue += [(503, {}), (502, {})]
        started = time.monotonic()
        assert http.get_json("/thing")["ok"] is True
        assert time.monotonic() - started >= 0.45  # the limiter held it back ~0.5 s
    assert http.stats.retries == 2 and http.stats.throttle_seconds >= 0.45


def test_a_provider_that_keeps_answering_503_gives_up_within_the_budget(server_url):
    SCRIPT.queue += [(503, {})] * 500
    retry = RetryPolicy(max_attempts=1000, base_delay=0.05, max_delay=0.1, budget_seconds=0.8)
    with client(server_url, retry=retry) as http, pytest.raises(BudgetExhausted) as failure:
        started = time.monotonic()
        try:
            http.get_json("/thing")
        finally:
            elapsed = time.monotonic() - started
    # It kept trying until the next wait no longer fitted (waits are at most 0.1 s), then stopped in time.
    assert retry.budget_seconds - 0.15 <= elapsed <= retry.budget_seconds + 0.4
    message = str(failure.value)
    assert message.startswith("acme connection 'acme-main' GET /thing -> HTTP 503: ")
    assert "0.8s budget" in message and f"after {SCRIPT.hits} attempts" in message
    assert failure.value.endpoint == "GET /thing" and failure.value.status == 503


@pytest.mark.parametrize(
    "value", ["soon", "Mon, 99 Foo 2026 25:61:00 GMT", "Thu, 01 Jan 1970", "inf", "nan", "", " 1 2"]
)
def test_an_unreadable_retry_after_is_treated_as_absent(server_url, value):
    """A malformed `Retry-After` falls back to the backoff: the request is retried promptly and succeeds."""
    SCRIPT.queue += [(429, {"Retry-After": value}), (503, {"Retry-After": value})]
    with client(server_url) as http:
        started = time.monotonic()
        assert http.get_json("/thing")["ok"] is True
        assert time.monotonic() - started < 1.0  # the backoff (at most 0.05 s here), not a parsed wait
    assert SCRIPT.hits == 3 and http.stats.retries == 2 and http.stats.rate_limit_waits == 1


def test_a_request_url_never_reaches_the_logs_even_at_debug_level(server_url, caplog):
    """Query strings carry personal data (a BillionMail contact search by address) and, for some providers,
    tokens: httpx's own request log lines would print them, so they stay off whatever the log level."""
    import logging

    caplog.set_level(logging.DEBUG)
    with client(server_url) as http:
        http.get_json("/thing", params={"keyword": "jane.doe@example.com"})
    assert "jane.doe" not in caplog.text and "example.com" not in caplog.text, caplog.text


def test_a_write_sent_once_is_repeated_only_when_it_surely_did_not_reach_the_provider(server_url):
    from nextcrm_pipelines.core.actions import MAYBE_SENT, outcome_of

    SCRIPT.queue += [(503, {})]
    with client(server_url) as http, pytest.raises(ProviderError) as raised:
        http.send("POST", "/thing", once=True)
    # A 5xx may have been acted on: not repeated here (the outbox looks the object up first).
    assert SCRIPT.hits == 1 and raised.value.status == 503 and outcome_of(raised.value) == MAYBE_SENT
    SCRIPT.queue += [(429, {"Retry-After": "0"})]
    with client(server_url) as http:
        assert http.send("POST", "/thing", once=True).status_code == 200  # turned away unread: sent again
    assert SCRIPT.hits == 3
