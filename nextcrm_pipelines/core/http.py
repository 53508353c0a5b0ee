"""The HTTP layer every provider client uses: pooling, pacing, retries, budgets, clear errors.

One pooled `httpx.Client` per provider client; a client-side token bucket at the provider's
published rate; retries with exponential backoff and full jitter on connection errors, 5xx and
429, honouring `Retry-After` and provider hints; a time budget per logical request, so a provider
that keeps failing fails that request instead of hanging while a long, healthy sync is never cut
short; errors that name provider, connection, endpoint and status (never a credential). A request
that gets no answer names the URL (without its query) and a plain cause ("connection refused", "name
not resolved", "timed out waiting for an answer after 30 s"); a host that cannot be connected to at all
is tried only `connect_attempts` times, so a provider that is down fails a sync in seconds. Counters
feed the sync log and Dagster metadata.
"""

from __future__ import annotations

import email.utils
import errno
import http.client
import logging
import math
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

# httpx and httpcore log each request with its full URL (query strings carry contact searches and, for some
# providers, tokens). Our own errors and logs name URLs without their query; theirs stay quiet at any level.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class ProviderError(RuntimeError):
    """A provider call failed for good. Carries where it failed; never secrets or bodies with them."""

    # Whether the message repeats the endpoint after the connection (an unreachable error names its URL instead).
    names_endpoint = True

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        connection_id: str | None = None,
        endpoint: str | None = None,
        status: int | None = None,
    ):
        self.provider = provider
        self.connection_id = connection_id
        self.endpoint = endpoint
        self.status = status
        # The provider's answer, for callers that read its error body (never part of the message).
        self.response: httpx.Response | None = None
        where = f"{provider} connection {connection_id!r}" if connection_id else provider
        detail = f" {endpoint}" if endpoint and self.names_endpoint else ""
        code = f" -> HTTP {status}" if status is not None else ""
        super().__init__(f"{where}{detail}{code}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as built (the keyword-only arguments would not survive the default), minus the response."""
        return _restore_provider_error, (type(self), self.args, {**self.__dict__, "response": None})


def _restore_provider_error(cls: type[ProviderError], args: tuple[Any, ...], state: dict[str, Any]) -> ProviderError:
    error = cls.__new__(cls)
    RuntimeError.__init__(error, *args)
    error.__dict__.update(state)
    return error


class AuthenticationFailed(ProviderError):
    """The provider refused the credentials: the connection needs re-authorisation."""


class NotGranted(ProviderError):
    """The connection's grant does not cover what was asked (it was authorised without that scope): what needs it
    fails until the connection is re-authorised with it, and the connection's other entities go on."""


class DailyLimitExhausted(ProviderError):
    """The provider's daily quota is spent; retrying before the reset only burns requests."""


class BudgetExhausted(ProviderError):
    """One request's retries ran out of time (a provider that keeps failing or throttling)."""


class NoAnswer(ProviderError):
    """A request got no answer (timed out, connection reset or closed) however often it was tried; the
    message names its URL and the cause."""

    names_endpoint = False


class ProviderUnreachable(NoAnswer):
    """No connection to the provider could be opened (refused, name not resolved, connect timeout, TLS
    handshake): the request never reached it. The sync stops trying the connection's other days, since
    each would wait the same way; the Dagster step's retry comes back later."""


def safe_url(url: str | httpx.URL) -> str:
    """A URL as scheme://host[:port]/path: no query string (it may carry ids or tokens), no user or password."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<an unreadable URL>"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host  # an IPv6 address
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"


# errno values that name a cause in plain words.
_ERRNO_CAUSES = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed while sending",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host down",
    errno.ENETDOWN: "network down",
    errno.EADDRNOTAVAIL: "address not available",
}
# Exceptions raised while opening a connection: nothing was sent, the host is not answering at all.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions behind it (causes, then contexts), outermost first, each once."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in seen) and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_connect_failure(exc: BaseException) -> bool:
    """Whether a transport error happened while opening the connection (refused, name not resolved,
    connect timeout, TLS handshake): the provider never saw the request."""
    return isinstance(exc, _CONNECT_ERRORS)


def transport_cause(exc: BaseException, *, connect_timeout: float | None = None, read_timeout: float | None = None,
                    connecting: bool | None = None) -> str:  # fmt: skip
    """A transport error's cause in plain words ("connection refused", "timed out waiting for an answer
    after 30 s", "name not resolved", "TLS handshake failed: ...", "connection reset"), read from the
    exception chain's types and errno; else the innermost message. `connecting` says whether the error
    came while opening the connection (default: read from httpx's exception types). Never a URL's query
    or a credential: messages of socket and TLS errors carry neither."""
    chain = _chain(exc)
    if connecting is None:
        connecting = any(is_connect_failure(e) for e in chain)
    for error in chain:
        if isinstance(error, socket.gaierror):
            return "name not resolved"
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS handshake failed: {error.verify_message or 'certificate not trusted'}"
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake failed: {error.reason or error.strerror or 'protocol error'}"
        if isinstance(error, (httpx.TimeoutException, TimeoutError)):
            limit = connect_timeout if connecting else read_timeout
            what = "connecting timed out" if connecting else "timed out waiting for an answer"
            return f"{what} after {limit:g} s" if limit else what
        if isinstance(error, http.client.RemoteDisconnected) or (
            isinstance(error, httpx.RemoteProtocolError) and "without sending" in str(error)
        ):
            return "connection closed without an answer"
        if isinstance(error, OSError) and error.errno in _ERRNO_CAUSES:
            return _ERRNO_CAUSES[error.errno]
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, ConnectionResetError):
            return "connection reset"
    innermost = chain[-1]
    text = str(innermost).strip()
    return f"{type(innermost).__name__}: {text}"[:300] if text else type(innermost).__name__


@dataclass
class RequestStats:
    """Counters for one sync: what the provider cost us."""

    requests: int = 0
    retries: int = 0
    rate_limit_waits: int = 0
    throttle_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """The counters without the lock, so results cross process boundaries."""
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "rate_limit_waits": self.rate_limit_waits,
            "throttle_seconds": round(self.throttle_seconds, 3),
        }


class RateLimiter:
    """A thread-safe token bucket: at most `rate` requests per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until one is free; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
        return wait


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one logical request: attempts, backoff shape and a time budget.

    `budget_seconds` bounds one request's attempts and the waits between them (client-side pacing
    waits excluded); it never limits how long a sync of many requests may run.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    budget_seconds: float = 600.0
    # Attempts when no connection could be opened at all (refused, name not resolved, connect timeout):
    # a host that is down does not come back within seconds, and the step's own retry comes back later.
    connect_attempts: int = 3


DEFAULT_RETRY = RetryPolicy()


def backoff_delay(attempt: int, policy: RetryPolicy) -> float:
    """Exponential backoff with jitter for retry number `attempt` (1-based): between half and all
    of `base * 2**(attempt-1)`, capped at `max_delay`."""
    ceiling = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), or None when absent or unreadable,
    so a malformed header falls back to the backoff instead of failing the request."""
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if parsed.tzinfo is None:  # "-0000": a time in UTC from a source that does not say its zone
            parsed = parsed.replace(tzinfo=UTC)
        seconds = parsed.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def daily_limit_message(headers: Mapping[str, str]) -> str:
    """ "Daily limit reached, resets at <UTC time>" from `Retry-After`, or say the reset time is unknown."""
    wait = retry_after_seconds(headers)
    if wait is None:
        return "daily request limit reached; the provider did not say when it resets, so retrying now is pointless"
    reset = datetime.fromtimestamp(time.time() + wait, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"daily request limit reached, resets at {reset} (in {wait / 3600:.1f} h); not retrying before then"


class Budget:
    """The time one logical request may spend on its attempts and retry waits, started when the
    request is; waits for the client-side rate limiter are excluded, being pacing, not failure."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._started = clock()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a pacing wait) out of the time spent."""
        self._excluded += seconds

    def spent(self) -> float:
        """Seconds spent on the request so far, pacing waits excluded."""
        return self._clock() - self._started - self._excluded

    def remaining(self) -> float:
        return self.seconds - self.spent()

    def exhausted(self, attempts: int, next_wait: float) -> str:
        """Why a request gives up: attempts made, time spent, the wait that no longer fits and the budget."""
        return (
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} over {self.spent():.1f}s: the next "
            f"retry would wait {next_wait:.1f}s, past the {self.seconds:g}s budget for one request"
        )


class HttpClient:
    """A provider's pooled HTTP client with pacing, retries and a time budget per request."""

    def __init__(
        self,
        *,
        provider: str,
        connection_id: str | None,
        base_url: str,
        name: str | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        requests_per_second: float = 0,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        stats: RequestStats | None = None,
        classify: Callable[[httpx.Response], str | None] | None = None,
        retry_hint: Callable[[httpx.Response], float | None] | None = None,
    ):
        self.provider = provider
        # The provider as people write it ("QuickBooks"), for messages.
        self.name = name or provider
        self.connection_id = connection_id
        self.retry = retry or DEFAULT_RETRY
        self._timeouts = (min(10.0, timeout), timeout)
        self.stats = stats or RequestStats()
        self.limiter = RateLimiter(requests_per_second)
        # classify(response) names what a provider's answer means beyond its status: "daily_limit"
        # (final until the reset), "rate_limited" (wait and retry, counted), "retry", "fatal", "not_granted" (a
        # scope the connection was authorised without: `NotGranted`) or None.
        self._classify = classify
        # A provider's own wait for a retryable answer without `Retry-After` (QuickBooks: 60 s on 429).
        self._retry_hint = retry_hint
        self._client = httpx.Client(
            base_url=base_url,
            headers=dict(headers or {}),
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=self._timeouts[0]),
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=10),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, message: str, endpoint: str, status: int | None, cls: type[ProviderError] = ProviderError):
        return cls(message, provider=self.provider, connection_id=self.connection_id, endpoint=endpoint, status=status)

    def _sleep(self, seconds: float, budget: Budget, attempt: int, endpoint: str, status: int | None) -> None:
        if seconds > budget.remaining():
            raise self._error(budget.exhausted(attempt, seconds), endpoint, status, BudgetExhausted)
        time.sleep(seconds)

    def _unreachable(self, exc: httpx.TransportError, endpoint: str, path: str, attempt: int, budget: Budget,
                     next_wait: float | None = None) -> ProviderError:  # fmt: skip
        """The error of a request that got no answer: where it went, why, and how long it was tried."""
        try:
            url = safe_url(exc.request.url)
        except RuntimeError:  # an error raised before a request was built
            url = safe_url(str(self._client.base_url).rstrip("/") + "/" + path.lstrip("/"))
        connect_timeout, read_timeout = self._timeouts
        cause = transport_cause(exc, connect_timeout=connect_timeout, read_timeout=read_timeout)
        message = f"could not reach {self.name} at {url}: {cause}"
        if next_wait is None:
            message += f" ({attempt} attempt{'s' if attempt != 1 else ''} over {budget.spent():.1f} s)"
            cls: type[ProviderError] = ProviderUnreachable if is_connect_failure(exc) else NoAnswer
        else:
            message += f"; {budget.exhausted(attempt, next_wait)}"
            cls = ProviderUnreachable if is_connect_failure(exc) else BudgetExhausted
        return self._error(message, endpoint, None, cls)

    def send(self, method: str, path: str, *, once: bool = False, **kwargs: Any) -> httpx.Response:
        """Send one logical request; retry what is retryable within its budget; raise `ProviderError` on failure.

        `once=True` is for a write the provider has no idempotency key for: it is repeated only when it surely
        did not reach the provider (no connection could be opened, or a 429 turned it away unread); a timeout,
        a dropped connection or a 5xx is raised at once, since the provider may have acted (the outbox looks
        the object up before any re-send)."""
        endpoint = f"{method.upper()} {path}"
        budget = Budget(self.retry.budget_seconds)
        attempt = 0
        while True:
            attempt += 1
            waited = self.limiter.acquire()
            budget.exclude(waited)
            self.stats.add(requests=1, throttle_seconds=waited, retries=1 if attempt > 1 else 0)
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # A host that refuses or cannot be found is tried a few times only (`connect_attempts`).
                limit = self.retry.connect_attempts if is_connect_failure(exc) else self.retry.max_attempts
                if once and not is_connect_failure(exc):
                    limit = 1
                if attempt >= min(limit, self.retry.max_attempts):
                    raise self._unreachable(exc, endpoint, path, attempt, budget) from exc
                delay = backoff_delay(attempt, self.retry)
                if delay > budget.remaining():
                    raise self._unreachable(exc, endpoint, path, attempt, budget, delay) from exc
                time.sleep(delay)
                continue
            verdict = self._classify(response) if self._classify else None
            if verdict == "daily_limit":
                raise self._error(daily_limit_message(response.headers), endpoint, response.status_code,
                                  DailyLimitExhausted)  # fmt: skip
            if verdict == "not_granted":
                raise self._error("the connection's grant does not cover this (it was authorised without the scope "
                                  "it needs)", endpoint, response.status_code, NotGranted)  # fmt: skip
            if response.status_code in (401, 403) and verdict not in ("retry", "rate_limited"):
                raise self._error("credentials refused", endpoint, response.status_code, AuthenticationFailed)
            if response.status_code < 400:
                return response
            retryable = verdict in ("retry", "rate_limited") or (
                verdict != "fatal" and response.status_code in RETRYABLE_STATUSES
            )
            if once and response.status_code != 429 and verdict != "rate_limited":
                retryable = False
            if not retryable or attempt >= self.retry.max_attempts:
                error = self._error(f"request failed after {attempt} attempt(s)", endpoint, response.status_code)
                error.response = response
                raise error
            if response.status_code == 429 or verdict == "rate_limited":
                self.stats.add(rate_limit_waits=1)
            hinted = retry_after_seconds(response.headers)
            if hinted is None and self._retry_hint is not None:
                hinted = self._retry_hint(response)
            delay = hinted if hinted is not None else backoff_delay(attempt, self.retry)
            self._sleep(delay, budget, attempt, endpoint, response.status_code)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        import orjson

        return orjson.loads(self.send("GET", path, **kwargs).content)
