"""The HTTP layer every provider client uses: pooling, pacing, retries, budgets, clear errors.

One pooled `httpx.Client` per provider client; a client-side token bucket at the provider's
published rate; retries with exponential backoff and full jitter on connection errors, 5xx and
429, honouring `Retry-After` and provider hints; a time budget per logical request, so a provider
that keeps failing fails that request instead of hanging while a long, healthy sync is never cut
short; errors that name provider, connection, endpoint and status (never a credential). Counters
feed the sync log and Dagster metadata.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ProviderError(RuntimeError):
    """A provider call failed for good. Carries where it failed; never secrets or bodies with them."""

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
        detail = f" {endpoint}" if endpoint else ""
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


class DailyLimitExhausted(ProviderError):
    """The provider's daily quota is spent; retrying before the reset only burns requests."""


class BudgetExhausted(ProviderError):
    """One request's retries ran out of time (a provider that keeps failing or throttling)."""


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
        self.connection_id = connection_id
        self.retry = retry or DEFAULT_RETRY
        self.stats = stats or RequestStats()
        self.limiter = RateLimiter(requests_per_second)
        # classify(response) names what a provider's answer means beyond its status: "daily_limit"
        # (final until the reset), "rate_limited" (wait and retry, counted), "retry", "fatal" or None.
        self._classify = classify
        # A provider's own wait for a retryable answer without `Retry-After` (QuickBooks: 60 s on 429).
        self._retry_hint = retry_hint
        self._client = httpx.Client(
            base_url=base_url,
            headers=dict(headers or {}),
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
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

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one logical request; retry what is retryable within its budget; raise `ProviderError` on failure."""
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
                if attempt >= self.retry.max_attempts:
                    raise self._error(f"{type(exc).__name__} after {attempt} attempts", endpoint, None) from exc
                self._sleep(backoff_delay(attempt, self.retry), budget, attempt, endpoint, None)
                continue
            verdict = self._classify(response) if self._classify else None
            if verdict == "daily_limit":
                raise self._error(daily_limit_message(response.headers), endpoint, response.status_code,
                                  DailyLimitExhausted)  # fmt: skip
            if response.status_code in (401, 403) and verdict not in ("retry", "rate_limited"):
                raise self._error("credentials refused", endpoint, response.status_code, AuthenticationFailed)
            if response.status_code < 400:
                return response
            retryable = verdict in ("retry", "rate_limited") or (
                verdict != "fatal" and response.status_code in RETRYABLE_STATUSES
            )
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
