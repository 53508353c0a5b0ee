"""PayPal sandbox accounts as the control API takes them: the knobs with their defaults (facts PayPal leaves
undocumented) and the validation of account specs."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from nextcrm_sandbox.control import ControlError, int_field, number_field
from nextcrm_sandbox.paypal.data import _Rng
from nextcrm_sandbox.paypal.model import _PRICE_FACTOR, DEFAULT_SCOPES

# Knobs of an account, with their defaults (facts PayPal leaves undocumented are knobs too).
DEFAULT_KNOBS: dict[str, Any] = {
    "result_cap": 10_000,  # RESULTSET_TOO_LARGE above this many matching rows
    "visibility_lag_seconds": 10_800,  # a row reaches Transaction Search this long after it happens
    "refresh_interval_seconds": 0,  # 0: continuous; N: data refreshed in N-second batches (last refresh ends :59:59)
    "max_window_days": 31,
    "history_years": 3,
    "min_start_age_seconds": None,  # None: a start is refused only after last_refreshed_datetime (36 h: 129600)
    "page_size_max": 500,
    "token_ttl": 32_400,
    "requests_per_minute": 50,  # per app, token calls included; 0 = unlimited
    "minute_seconds": 60.0,  # length of the rate-limit window
    "list_subscriptions": False,  # GET /v1/billing/subscriptions (limited release)
    "expired_token_error": "invalid_token",  # or AUTHENTICATION_FAILURE
    "date_style": "Z",  # Transaction Search times: "Z" (2025-03-01T15:40:49Z) or "+0000"
    "scopes": list(DEFAULT_SCOPES),
    "request_id_ttl_seconds": 21_600,  # how long a PayPal-Request-Id answers with its first result (6 h)
}


_ACCOUNT_FIELDS = frozenset(
    {
        "id",
        "client_id",
        "client_secret",
        "seed",
        "transactions",
        "subscriptions",
        "plans",
        "invoices",
        "days",
        "currencies",
        "knobs",
    }
)
_CURRENCIES = tuple(_PRICE_FACTOR)


_int_field = partial(int_field, nullable=True)


def normalise_knobs(raw: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate knob values over ``base`` (the defaults when None)."""
    knobs = dict(base or DEFAULT_KNOBS)
    unknown = set(raw) - set(DEFAULT_KNOBS)
    if unknown:
        raise ControlError(400, f"unknown knobs: {sorted(unknown)}")
    for name in ("result_cap", "max_window_days", "page_size_max", "token_ttl", "history_years"):
        if name in raw:
            knobs[name] = _int_field(raw, name, None, 1)
    for name in ("visibility_lag_seconds", "refresh_interval_seconds", "requests_per_minute", "request_id_ttl_seconds"):
        if name in raw:
            knobs[name] = _int_field(raw, name, None, 0)
    if "min_start_age_seconds" in raw:
        knobs["min_start_age_seconds"] = _int_field(raw, "min_start_age_seconds", None, 0)
    if "minute_seconds" in raw:
        knobs["minute_seconds"] = number_field(raw, "minute_seconds", 60.0, 0.001)
    if "list_subscriptions" in raw:
        knobs["list_subscriptions"] = bool(raw["list_subscriptions"])
    if "expired_token_error" in raw:
        if raw["expired_token_error"] not in ("invalid_token", "AUTHENTICATION_FAILURE"):
            raise ControlError(400, "expired_token_error must be invalid_token or AUTHENTICATION_FAILURE")
        knobs["expired_token_error"] = raw["expired_token_error"]
    if "date_style" in raw:
        if raw["date_style"] not in ("Z", "+0000"):
            raise ControlError(400, 'date_style must be "Z" or "+0000"')
        knobs["date_style"] = raw["date_style"]
    if "scopes" in raw:
        scopes = raw["scopes"]
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ControlError(400, "scopes must be a list of strings")
        knobs["scopes"] = list(scopes)
    return knobs


def normalise_spec(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an account spec and fill in the defaults (knobs may sit at the top level or under ``knobs``)."""
    knob_raw = {k: v for k, v in body.items() if k in DEFAULT_KNOBS}
    nested = body.get("knobs") or {}
    if not isinstance(nested, dict):
        raise ControlError(400, "knobs must be an object")
    knob_raw.update(nested)
    unknown = set(body) - _ACCOUNT_FIELDS - set(DEFAULT_KNOBS)
    if unknown:
        raise ControlError(400, f"unknown account fields: {sorted(unknown)}")
    client_id, secret = body.get("client_id"), body.get("client_secret")
    if not isinstance(client_id, str) or not client_id or not isinstance(secret, str) or not secret:
        raise ControlError(400, "client_id and client_secret are required strings")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ControlError(400, "seed must be an integer")
    currencies = body.get("currencies", ["USD", "EUR", "GBP", "CAD", "AUD", "JPY"])
    if not isinstance(currencies, list) or not currencies or any(c not in _CURRENCIES for c in currencies):
        raise ControlError(400, f"currencies must be a non-empty list among {sorted(_CURRENCIES)}")
    transactions = _int_field(body, "transactions", 200)
    subscriptions = _int_field(body, "subscriptions", 20)
    plans = _int_field(body, "plans", 3)
    invoices = _int_field(body, "invoices", 40)
    assert transactions is not None and subscriptions is not None and plans is not None and invoices is not None
    if subscriptions and not plans:
        raise ControlError(400, "subscriptions need at least one plan")
    days = number_field(body, "days", 30)
    if days <= 0:
        raise ControlError(400, "days must be > 0")
    rng = _Rng(f"paypal-account:{client_id}:{seed}")
    account_id = body.get("id") or rng.account_id()
    return {
        "id": str(account_id),
        "client_id": client_id,
        "client_secret": secret,
        "app_id": "APP-" + rng.chars("0123456789" * 2 + "ABCDEFGHJKLMNPRSTUVWXY", 17),
        "seed": seed,
        "transactions": transactions,
        "subscriptions": subscriptions,
        "plans": plans,
        "invoices": invoices,
        "days": days,
        "currencies": list(dict.fromkeys(currencies)),
        "knobs": normalise_knobs(knob_raw),
    }
