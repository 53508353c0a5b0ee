"""Billing plans in the sandbox: ``POST /v1/billing/plans`` (a new plan), ``POST /v1/billing/plans/{id}/activate|
deactivate``, ``…/update-pricing-schemes``, ``PATCH /v1/billing/plans/{id}``, the control API's plan updates, and
the ``BILLING.PLAN.*`` event each change announces (the plan as ``GET /v1/billing/plans/{id}`` shows it then)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nextcrm_sandbox.paypal.data import _Rng
from nextcrm_sandbox.paypal.errors import PayPalError, _not_found
from nextcrm_sandbox.paypal.model import _PAYER_ALPHABET, _money, stamp
from nextcrm_sandbox.paypal.orders import money_minor
from nextcrm_sandbox.paypal.params import _minor

if TYPE_CHECKING:
    from nextcrm_sandbox.paypal.account import PayPalAccount

# action -> (statuses it applies to, the status it sets, the event it sends)
PLAN_ACTIONS = {
    "activate": (frozenset({"CREATED", "INACTIVE"}), "ACTIVE", "BILLING.PLAN.ACTIVATED"),
    "deactivate": (frozenset({"ACTIVE"}), "INACTIVE", "BILLING.PLAN.DEACTIVATED"),
}
EVENT_SUMMARIES = {
    "BILLING.PLAN.CREATED": "A billing plan was created",
    "BILLING.PLAN.UPDATED": "A billing plan was updated",
    "BILLING.PLAN.ACTIVATED": "A billing plan was activated",
    "BILLING.PLAN.DEACTIVATED": "A billing plan was deactivated",
    "BILLING.PLAN.PRICING-CHANGE.ACTIVATED": "A billing plan pricing change was activated",
}
# PATCH paths PayPal lets a merchant replace: path -> (section, key); a section of None is the plan itself.
_PATCHABLE = {
    "/name": (None, "name"),
    "/description": (None, "description"),
    "/payment_preferences/auto_bill_outstanding": ("payment_preferences", "auto_bill_outstanding"),
    "/payment_preferences/payment_failure_threshold": ("payment_preferences", "payment_failure_threshold"),
    "/payment_preferences/setup_fee": ("payment_preferences", "setup_fee"),
    "/payment_preferences/setup_fee_failure_action": ("payment_preferences", "setup_fee_failure_action"),
    "/taxes/percentage": ("taxes", "percentage"),
}
_DOCS = "https://developer.paypal.com/docs/api/subscriptions/v1/"


def _unprocessable(issue: str, description: str) -> PayPalError:
    return PayPalError(422, "UNPROCESSABLE_ENTITY", "The requested action could not be performed, semantically "
                       "incorrect, or failed business validation.", [{"issue": issue, "description": description}],
                       link=f"{_DOCS}#error-{issue}")  # fmt: skip


def _invalid(path: str, issue: str, description: str) -> PayPalError:
    return PayPalError(400, "INVALID_REQUEST", "Request is not well-formed, syntactically incorrect, or violates "
                       "schema.", [{"field": path, "location": "body", "issue": issue, "description": description}],
                       link=f"{_DOCS}#error-{issue}")  # fmt: skip


def announce_plan(account: PayPalAccount, pid: str, event_type: str) -> None:
    """Send ``event_type`` with the plan as it is now."""
    if account.on_event is not None:
        account.on_event(event_type, "plan", lambda base: account.plan(pid, base))


def _plan(account: PayPalAccount, pid: str) -> dict[str, Any]:
    plan = account.plans.get(pid)
    if plan is None:
        raise _not_found("plans")
    return plan


def plan_action(account: PayPalAccount, pid: str, action: str, now: int) -> None:
    """``POST /v1/billing/plans/{id}/activate|deactivate`` (204 on success)."""
    plan = _plan(account, pid)
    allowed, target, event = PLAN_ACTIONS[action]
    if plan["status"] not in allowed:
        wanted = " or ".join(s.lower() for s in sorted(allowed))
        raise _unprocessable("PLAN_STATUS_INVALID", f"Invalid plan status for {action} action; plan status should "
                             f"be {wanted}.")  # fmt: skip
    plan["status"] = target
    plan["update_time"] = stamp(now)
    announce_plan(account, pid, event)


def update_pricing(account: PayPalAccount, pid: str, body: Mapping[str, Any], now: int) -> None:
    """``POST /v1/billing/plans/{id}/update-pricing-schemes``: new fixed prices for billing cycles by sequence."""
    plan = _plan(account, pid)
    schemes = body.get("pricing_schemes")
    if not isinstance(schemes, list) or not schemes:
        raise _invalid("/pricing_schemes", "MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.")
    cycles = {c["sequence"]: c for c in plan["billing_cycles"]}
    if plan["status"] != "ACTIVE":
        raise _unprocessable("PLAN_STATUS_INVALID", "Invalid plan status for update pricing action; plan status "
                             "should be active.")  # fmt: skip
    changes = []
    for n, entry in enumerate(schemes):
        cycle = cycles.get(entry.get("billing_cycle_sequence")) if isinstance(entry, dict) else None
        price = ((entry.get("pricing_scheme") or {}).get("fixed_price") or {}) if isinstance(entry, dict) else {}
        if cycle is None:
            raise _unprocessable("BILLING_CYCLE_SEQUENCE_INVALID", "The billing cycle sequence does not exist.")
        current = (cycle.get("pricing_scheme") or {}).get("fixed_price") or {}
        currency = price.get("currency_code")
        if currency != current.get("currency_code", currency):
            raise _unprocessable("CURRENCY_MISMATCH", "The currency code is different from the plan's currency.")
        try:
            minor = _minor(price.get("value"), str(currency))
        except (TypeError, ValueError):
            raise _invalid(f"/pricing_schemes/{n}/pricing_scheme/fixed_price/value", "INVALID_PARAMETER_SYNTAX",
                           "The value of a field does not conform to the expected format.") from None  # fmt: skip
        changes.append((cycle, minor, str(currency)))
    when = stamp(now)
    for cycle, minor, currency in changes:
        scheme = cycle.setdefault("pricing_scheme", {"version": 0, "create_time": when})
        scheme["version"] = int(scheme.get("version", 0)) + 1
        scheme["fixed_price"] = _money(minor, currency)
        scheme["update_time"] = when
    plan["update_time"] = when
    announce_plan(account, pid, "BILLING.PLAN.PRICING-CHANGE.ACTIVATED")


def patch_plan(account: PayPalAccount, pid: str, operations: Sequence[Any], now: int) -> None:
    """``PATCH /v1/billing/plans/{id}``: JSON Patch ``replace`` of the fields PayPal lets change (204)."""
    plan = _plan(account, pid)
    if not isinstance(operations, list) or not operations:
        raise _invalid("/", "MALFORMED_REQUEST_JSON", "The request JSON is not well formed.")
    for n, op in enumerate(operations):
        if not isinstance(op, dict) or op.get("op") not in ("replace", "add"):
            raise _invalid(f"/{n}/op", "INVALID_PARAMETER_VALUE", "The value of a field is invalid.")
        target = _PATCHABLE.get(str(op.get("path")))
        if target is None:
            raise _unprocessable("PATCH_PATH_NOT_SUPPORTED", f"The path {op.get('path')} cannot be changed.")
    for op in operations:
        section, key = _PATCHABLE[op["path"]]
        (plan.setdefault(section, {}) if section else plan)[key] = op.get("value")
    plan["update_time"] = stamp(now)
    announce_plan(account, pid, "BILLING.PLAN.UPDATED")


def change_plans(account: PayPalAccount, rng: _Rng, count: int, now: int) -> list[str]:
    """``count`` plans changed at ``now`` as a merchant would: an inactive or new plan activated; an active one
    deactivated, repriced (about a tenth dearer) or described anew."""
    ids = list(account.plans)
    rng.shuffle(ids)
    for pid in ids[:count]:
        plan = account.plans[pid]
        roll = rng.random()
        if plan["status"] != "ACTIVE":
            plan_action(account, pid, "activate", now)
        elif roll < 0.3:
            plan_action(account, pid, "deactivate", now)
        elif roll < 0.7:
            regular = next(c for c in plan["billing_cycles"] if c["tenure_type"] == "REGULAR")
            price = regular["pricing_scheme"]["fixed_price"]
            currency = price["currency_code"]
            current = _minor(price["value"], currency)
            dearer = max(current + 1, current * 11 // 10)
            body = {"pricing_schemes": [{"billing_cycle_sequence": regular["sequence"],
                                         "pricing_scheme": {"fixed_price": _money(dearer, currency)}}]}  # fmt: skip
            update_pricing(account, pid, body, now)
        else:
            patch_plan(account, pid, [{"op": "replace", "path": "/description", "value": f"{plan['name']} (revised)"}],
                       now)  # fmt: skip
    return ids[:count]


_TENURES = ("REGULAR", "TRIAL")
_UNITS = {"DAY": 365, "WEEK": 52, "MONTH": 12, "YEAR": 1}  # the longest interval_count of each unit
_SYNTAX = "The value of a field does not conform to the expected format."
_MISSING = "A required field is missing."
_VALUE = "The value of a field is invalid."


def _string(body: Mapping[str, Any], name: str, path: str, low: int, high: int, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _invalid(f"{path}/{name}", "MISSING_REQUIRED_PARAMETER", _MISSING)
        return None
    if not isinstance(value, str):
        raise _invalid(f"{path}/{name}", "INVALID_PARAMETER_SYNTAX", _SYNTAX)
    if len(value) < low:
        raise _invalid(f"{path}/{name}", "INVALID_STRING_MIN_LENGTH", "The value of a field is too short.")
    if len(value) > high:
        raise _invalid(f"{path}/{name}", "INVALID_STRING_MAX_LENGTH", "The value of a field is too long.")
    return value


def _integer(body: Mapping[str, Any], name: str, path: str, low: int, high: int, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{path}/{name}", "INVALID_PARAMETER_SYNTAX", _SYNTAX)
    if value < low:
        raise _invalid(f"{path}/{name}", "INVALID_INTEGER_MIN_VALUE", "The integer value of a field is too small.")
    if value > high:
        raise _invalid(f"{path}/{name}", "INVALID_INTEGER_MAX_VALUE", "The integer value of a field is too large.")
    return value


def _price(money: Any, path: str, currencies: set[str]) -> dict[str, str]:
    """A plan's money (a price, the setup fee): the currency's decimals, at least zero; one currency a plan."""
    try:
        minor, currency = money_minor(money, path, positive=False)
    except PayPalError as err:
        raise _invalid(err.details[0].get("field", path), "INVALID_PARAMETER_VALUE", _VALUE) from None
    if minor < 0:
        raise _invalid(f"{path}/value", "INVALID_PARAMETER_VALUE", _VALUE)
    currencies.add(currency)
    if len(currencies) > 1:
        raise _unprocessable("CURRENCY_MISMATCH", "The currency code is different from the plan's currency.")
    return _money(minor, currency)


def _cycle(raw: Any, n: int, when: str, currencies: set[str]) -> dict[str, Any]:
    path = f"/billing_cycles/{n}"
    if not isinstance(raw, dict):
        raise _invalid(path, "INVALID_PARAMETER_SYNTAX", _SYNTAX)
    frequency = raw.get("frequency")
    if not isinstance(frequency, dict):
        raise _invalid(f"{path}/frequency", "MISSING_REQUIRED_PARAMETER", _MISSING)
    unit = frequency.get("interval_unit")
    if unit not in _UNITS:
        issue = "MISSING_REQUIRED_PARAMETER" if unit is None else "INVALID_PARAMETER_VALUE"
        raise _invalid(f"{path}/frequency/interval_unit", issue, _MISSING if unit is None else _VALUE)
    count = _integer(frequency, "interval_count", f"{path}/frequency", 1, _UNITS[unit], 1)
    tenure = raw.get("tenure_type")
    if tenure not in _TENURES:
        issue = "MISSING_REQUIRED_PARAMETER" if tenure is None else "INVALID_PARAMETER_VALUE"
        raise _invalid(f"{path}/tenure_type", issue, _MISSING if tenure is None else _VALUE)
    if raw.get("sequence") is None:
        raise _invalid(f"{path}/sequence", "MISSING_REQUIRED_PARAMETER", _MISSING)
    sequence = _integer(raw, "sequence", path, 1, 99, 1)
    cycle: dict[str, Any] = {}
    scheme = raw.get("pricing_scheme")
    if scheme is not None:
        if not isinstance(scheme, dict) or "fixed_price" not in scheme:
            raise _invalid(f"{path}/pricing_scheme/fixed_price", "MISSING_REQUIRED_PARAMETER", _MISSING)
        price = _price(scheme["fixed_price"], f"{path}/pricing_scheme/fixed_price", currencies)
        cycle["pricing_scheme"] = {"version": 1, "fixed_price": price, "create_time": when, "update_time": when}
    elif tenure == "REGULAR":
        raise _invalid(f"{path}/pricing_scheme", "MISSING_REQUIRED_PARAMETER", _MISSING)
    cycle["frequency"] = {"interval_unit": unit, "interval_count": count}
    cycle["tenure_type"] = tenure
    cycle["sequence"] = sequence
    cycle["total_cycles"] = _integer(raw, "total_cycles", path, 0, 999, 1)
    return cycle


def create_plan(account: PayPalAccount, body: Mapping[str, Any], now: int) -> str:
    """``POST /v1/billing/plans``: a plan of a catalog product, checked as PayPal checks it (its billing cycles:
    one regular cycle with a fixed price, up to two trials before it, sequences from 1 in order, one currency),
    announced as ``BILLING.PLAN.CREATED``; returns its id."""
    product = _string(body, "product_id", "", 6, 50, required=True)
    name = _string(body, "name", "", 1, 127, required=True)
    description = _string(body, "description", "", 1, 127)
    status = body.get("status", "ACTIVE")
    if status not in ("CREATED", "ACTIVE"):
        raise _invalid("/status", "INVALID_PARAMETER_VALUE", _VALUE)
    cycles = body.get("billing_cycles")
    if cycles is None:
        raise _invalid("/billing_cycles", "MISSING_REQUIRED_PARAMETER", _MISSING)
    if not isinstance(cycles, list) or not 1 <= len(cycles) <= 12:
        raise _invalid("/billing_cycles", "INVALID_PARAMETER_VALUE", _VALUE)
    preferences = body.get("payment_preferences")
    if not isinstance(preferences, dict):
        raise _invalid("/payment_preferences", "MISSING_REQUIRED_PARAMETER", _MISSING)
    when = stamp(now)
    currencies: set[str] = set()
    made = sorted((_cycle(raw, n, when, currencies) for n, raw in enumerate(cycles)), key=lambda c: c["sequence"])
    tenures = [c["tenure_type"] for c in made]
    if tenures.count("REGULAR") != 1 or tenures[-1] != "REGULAR" or tenures.count("TRIAL") > 2:
        raise _unprocessable("INVALID_BILLING_CYCLE_SEQUENCE", "A plan has one regular billing cycle, after at most "
                             "two trial cycles.")  # fmt: skip
    if [c["sequence"] for c in made] != list(range(1, len(made) + 1)):
        raise _unprocessable("INVALID_BILLING_CYCLE_SEQUENCE", "Billing cycle sequences must start at 1 and follow "
                             "one another.")  # fmt: skip
    auto_bill = preferences.get("auto_bill_outstanding", True)
    failure_action = preferences.get("setup_fee_failure_action", "CANCEL")
    if not isinstance(auto_bill, bool):
        raise _invalid("/payment_preferences/auto_bill_outstanding", "INVALID_PARAMETER_SYNTAX", _SYNTAX)
    if failure_action not in ("CONTINUE", "CANCEL"):
        raise _invalid("/payment_preferences/setup_fee_failure_action", "INVALID_PARAMETER_VALUE", _VALUE)
    payment = {"auto_bill_outstanding": auto_bill}
    if preferences.get("setup_fee") is not None:
        payment["setup_fee"] = _price(preferences["setup_fee"], "/payment_preferences/setup_fee", currencies)
    payment["setup_fee_failure_action"] = failure_action
    payment["payment_failure_threshold"] = _integer(preferences, "payment_failure_threshold", "/payment_preferences",
                                                    0, 999, 0)  # fmt: skip
    plan: dict[str, Any] = {"id": "", "product_id": product, "name": name, "status": status}
    if description is not None:
        plan["description"] = description
    plan.update({"usage_type": "LICENSED", "billing_cycles": made, "payment_preferences": payment})
    taxes = body.get("taxes")
    if taxes is not None:
        percentage = taxes.get("percentage") if isinstance(taxes, dict) else None
        if not isinstance(percentage, str) or not re.fullmatch(r"((-?[0-9]+)|(-?([0-9]+)?[.][0-9]+))", percentage):
            raise _invalid("/taxes/percentage", "INVALID_PARAMETER_SYNTAX", _SYNTAX)
        plan["taxes"] = {"percentage": percentage, "inclusive": bool(taxes.get("inclusive", True))}
    quantity = body.get("quantity_supported", False)
    if not isinstance(quantity, bool):
        raise _invalid("/quantity_supported", "INVALID_PARAMETER_SYNTAX", _SYNTAX)
    plan["quantity_supported"] = quantity
    plan["create_time"] = plan["update_time"] = when
    rng = account.checkout._rng
    pid = "P-" + rng.chars(_PAYER_ALPHABET, 24)
    while pid in account.plans:
        pid = "P-" + rng.chars(_PAYER_ALPHABET, 24)
    plan["id"] = pid
    account.plans[pid] = plan
    announce_plan(account, pid, "BILLING.PLAN.CREATED")
    return pid


def plan_summary(account: PayPalAccount, pid: str, base_url: str) -> dict[str, Any]:
    """A plan as a write answers it by default (``Prefer: return=minimal``)."""
    plan = account.plan(pid, base_url)
    out = {k: plan[k] for k in ("id", "product_id", "name", "status", "description", "usage_type") if k in plan}
    out["create_time"] = plan["create_time"]
    out["links"] = plan["links"]
    return out
