"""``GET /v1/reporting/balances`` in the sandbox: the account's balance in each currency it holds as of a time
(default, and at most, its last refresh), from the same rows Transaction Search shows."""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nextcrm_sandbox.paypal.errors import _bad_request, _not_available
from nextcrm_sandbox.paypal.model import _money, _years_before, parse_time, stamp

if TYPE_CHECKING:
    from nextcrm_sandbox.paypal.account import PayPalAccount
    from nextcrm_sandbox.paypal.data import _Txn

_CURRENCY = re.compile(r"^[A-Z]{3}$")


def balances(account: PayPalAccount, params: Mapping[str, str], now: int) -> dict[str, Any]:
    """``{balances: [{currency, primary, total_balance, available_balance, withheld_balance}], account_id,
    as_of_time, last_refresh_time}``: per currency, the balance after its last row at or before ``as_of_time``
    (pending funds are withheld); the primary currency first. Callers hold the account's lock."""
    refreshed = account.last_refreshed(now)
    as_of = refreshed
    raw = params.get("as_of_time")
    if raw:
        try:
            wanted = parse_time(raw)
        except ValueError:
            raise _bad_request("as_of_time", raw, "Invalid date format") from None
        if wanted < _years_before(now, account.knobs["history_years"]):
            raise _not_available()
        as_of = int(min(wanted, refreshed))
    currency = params.get("currency_code")
    if currency is not None and not _CURRENCY.match(currency):
        raise _bad_request("currency_code", currency, "Invalid currency code")
    account._refresh_balances()
    last: dict[str, _Txn] = {}
    for row in account.rows[: bisect_right(account.times, as_of)]:
        if row.balance:
            last[row.currency] = row
    primary = account.currencies[0]
    held = sorted(last, key=lambda c: (c != primary, c))
    out = []
    for code in held:
        if currency is not None and code != currency:
            continue
        row = last[code]
        out.append({"currency": code, "primary": code == primary, "total_balance": _money(row.ending, code),
                    "available_balance": _money(row.available, code),
                    "withheld_balance": _money(row.ending - row.available, code)})  # fmt: skip
    return {"balances": out, "account_id": account.id, "as_of_time": stamp(as_of),
            "last_refresh_time": stamp(refreshed)}  # fmt: skip
