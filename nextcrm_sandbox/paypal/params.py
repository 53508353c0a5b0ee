"""Transaction Search's request parameters: the optional filters and ``fields`` sections, typed reads with
PayPal's validation errors, time ranges, and the ``links`` of a page."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from nextcrm_sandbox.paypal.errors import _bad_request, _schema_error
from nextcrm_sandbox.paypal.model import _DECIMALS, parse_time

_OPTIONAL_FILTERS = (
    "transaction_id",
    "transaction_type",
    "transaction_status",
    "transaction_amount",
    "transaction_currency",
    "payment_instrument_type",
    "store_id",
    "terminal_id",
)
_SECTIONS = (
    "transaction_info",
    "payer_info",
    "shipping_info",
    "cart_info",
    "store_info",
    "auction_info",
    "incentive_info",
)
_AFTER_BALANCE = frozenset(
    {"invoice_id", "custom_field", "protection_eligibility", "instrument_type", "instrument_sub_type"}
)
_AMOUNT_RE = re.compile(r"^\[\s*(-?\d+)\s+TO\s+(-?\d+)\s*\]$")


def _int_param(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(name, raw, f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _bad_request(name, raw, f"{name} should be between {low} and {high}")
    return value


def _schema_int(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _schema_error(name, raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.") from None
    if not low <= value <= high:
        raise _schema_error(name, raw, "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
    return value


def _id_list(raw: str | None, name: str, limit: int) -> set[str] | None:
    if not raw:
        return None
    ids = [p.strip() for p in raw.split(",") if p.strip()]
    if len(ids) > limit:
        raise _schema_error(name, raw, "INVALID_PARAMETER_VALUE", f"A maximum of {limit} ids are allowed.")
    return set(ids)


def _time_param(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise _schema_error(name, raw, "INVALID_PARAMETER_SYNTAX", "The value of a field is invalid.") from None


def _in_range(value: float, bounds: tuple[float | None, float | None]) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def _fields(raw: str | None) -> tuple[str, ...]:
    if not raw:
        return ("transaction_info",)
    names = [p.strip().lower() for p in raw.split(",") if p.strip()]
    if "all" in names:
        return _SECTIONS
    for name in names:
        if name not in _SECTIONS:
            raise _bad_request("fields", raw, "Invalid fields value")
    return tuple(s for s in _SECTIONS if s in names)


def _minor(value: Any, currency: str) -> int:
    text = str(value)
    if _DECIMALS.get(currency, 2) == 0:
        return int(float(text))
    return round(float(text) * 100)


def _page_links(base: str, params: Mapping[str, str], page: int, total_pages: int | None) -> list[dict[str, str]]:
    def href(p: int) -> str:
        query = {k: v for k, v in params.items() if k != "page"}
        query["page"] = str(p)
        return f"{base}?{urlencode(query)}"

    links = [{"href": href(page), "rel": "self", "method": "GET"}]
    if total_pages is None:
        return links
    if page > 1:
        links.append({"href": href(1), "rel": "first", "method": "GET"})
        links.append({"href": href(min(page - 1, max(total_pages, 1))), "rel": "prev", "method": "GET"})
    if page < total_pages:
        links.append({"href": href(page + 1), "rel": "next", "method": "GET"})
    if total_pages > 1:
        links.append({"href": href(total_pages), "rel": "last", "method": "GET"})
    return links
