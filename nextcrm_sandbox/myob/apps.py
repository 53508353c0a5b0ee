"""Per-API-key state of the MYOB sandbox: the key's generation and its per-second and daily limits in fixed
real-time windows, and the faults a test injects per company file."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nextcrm_sandbox.myob.model import _APP_LIMIT_FIELDS


@dataclass
class _App:
    """One MYOB API key (= OAuth ``client_id``): its key generation and its rate limits."""

    client_id: str
    key_mode: str = "new"
    username: str = "sandbox.user@example.com"
    uid: str = ""
    requests_per_second: int = 8
    second_window_seconds: float = 1.0
    daily_limit: int = 1_000_000
    day_window_seconds: float = 86400.0
    per_second_status: int = 403
    second_started: float = 0.0
    second_count: int = 0
    day_started: float = 0.0
    day_count: int = 0
    tenants: list[str] = field(default_factory=list)

    def limits(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _APP_LIMIT_FIELDS}

    def __getstate__(self) -> dict[str, Any]:
        # Saved with the sandbox's state (``sandbox.state``) with both windows closed: they are on this boot's
        # monotonic clock, which a restored process (perhaps after a reboot) does not share.
        return {**self.__dict__, "second_started": 0.0, "second_count": 0, "day_started": 0.0, "day_count": 0}

    def take(self) -> str | None:
        """Count one call in fixed real-time windows; ``"day"``/``"second"`` when a limit refuses it."""
        now = time.monotonic()
        if now - self.day_started >= self.day_window_seconds:
            self.day_started, self.day_count = now, 0
        if self.daily_limit >= 0 and self.day_count >= self.daily_limit:
            return "day"
        if now - self.second_started >= self.second_window_seconds:
            self.second_started, self.second_count = now, 0
        if self.requests_per_second > 0 and self.second_count >= self.requests_per_second:
            return "second"
        self.second_count += 1
        self.day_count += 1
        return None


@dataclass
class _Faults:
    server_errors: int = 0
    server_error_status: int = 500
    rate_limited: int = 0
    gateway_timeouts: int = 0
    day_limit_exhausted: bool = False
    latency_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "server_errors": self.server_errors,
            "server_error_status": self.server_error_status,
            "rate_limited": self.rate_limited,
            "gateway_timeouts": self.gateway_timeouts,
            "day_limit_exhausted": self.day_limit_exhausted,
            "latency_ms": self.latency_ms,
        }
