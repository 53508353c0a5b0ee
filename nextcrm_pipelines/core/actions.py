"""What an action a provider performs for NextCRM is: its payload (a pydantic model, checked before
anything is sent), how it is sent, how an earlier attempt's object is found where the provider takes no
idempotency key, and what the provider's answer puts in the mirror.

Money in a payload is a decimal string with a currency (`{"amount": "12.50", "currency": "EUR"}`); each
provider's action converts it to what its API takes (`minor_units` for Stripe's integers, where JPY has
no minor unit), refusing an amount with more decimals than its currency has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_extra_types.currency_code import ISO4217

from nextcrm_pipelines.core.http import AuthenticationFailed, NoAnswer, ProviderError, ProviderUnreachable
from nextcrm_pipelines.core.money import currency_exponent


def _no_float(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError('give amounts as decimal strings ("12.50"), not as floating-point numbers')
    return value


# An amount of money: a decimal string (or an integer), never a float, which would already be rounded.
Amount = Annotated[Decimal, BeforeValidator(_no_float), Field(gt=0, allow_inf_nan=False)]
Currency = ISO4217


class Payload(BaseModel):
    """An action's payload: unknown fields are refused (a typo must not be dropped silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Money(Payload):
    """An amount with its currency."""

    amount: Amount
    currency: Currency


def minor_units(amount: Decimal, currency: str) -> int:
    """`amount` in the currency's minor units (cents; JPY has none, KWD three); refuses finer amounts."""
    scaled = amount.scaleb(currency_exponent(currency))
    if scaled != scaled.to_integral_value():
        digits = currency_exponent(currency)
        raise ValueError(f"{currency.upper()} amounts have {digits} decimal place{'s' if digits != 1 else ''}, "
                         f"got {amount}")  # fmt: skip
    return int(scaled)


@dataclass(frozen=True)
class Mirrored:
    """A provider object to upsert into an entity's table (read your writes), at its version."""

    entity: str
    raw: dict[str, Any]
    version: datetime


@dataclass(frozen=True)
class Sent:
    """What an action made or changed at the provider: the object (kept as the outbox row's result), its
    id, and the objects the mirror gets from it."""

    result: dict[str, Any]
    result_id: str
    mirrored: tuple[Mirrored, ...] = ()


# send(client, payload, idempotency key) -> Sent; raises `ProviderError` (its `status` says which kind).
Send = Callable[[Any, Any, str], Sent]
# find(client, payload, idempotency key) -> the object an earlier attempt made, or None.
Find = Callable[[Any, Any, str], "Sent | None"]


@dataclass(frozen=True)
class ActionSpec:
    """One action of a provider.

    `find` is for providers that take no idempotency key: before re-sending an action whose outcome is
    unknown, it looks the object up by a reference the action set (an invoice number, a marker in the
    campaign or contact, derived from the idempotency key) and the outbox adopts it if it exists."""

    name: str
    payload: type[Payload]
    send: Send
    description: str
    find: Find | None = None
    # The entities whose tables the answer updates (the run materialises their changed partitions).
    entities: tuple[str, ...] = field(default_factory=tuple)


class ActionInvalid(ValueError):
    """A payload or action refused before anything was sent; the message names the field."""


def validate_payload(spec: ActionSpec, payload: Any) -> Payload:
    """The payload as the action's model, or `ActionInvalid` naming each bad field (values left out: they
    may be personal data)."""
    if not isinstance(payload, dict):
        raise ActionInvalid(f"{spec.name}: the payload must be a JSON object")
    try:
        return spec.payload.model_validate(payload)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "payload"
            problems.append(f"{where}: {error['msg']}")
        raise ActionInvalid(f"{spec.name}: " + "; ".join(problems)) from None


# What became of an attempt, by what the provider answered.
REFUSED = "refused"  # a 4xx: the provider will refuse it again, final
NOT_SENT = "not_sent"  # the request never reached the provider, or was turned away unread (429): send again
MAYBE_SENT = "maybe_sent"  # no answer, or a 5xx: the provider may have acted
HOLD = "hold"  # the connection's credentials were refused: wait for it to be re-authorised


def outcome_of(error: BaseException) -> str:
    """Which kind of failure `error` is, for the outbox's next step."""
    if isinstance(error, AuthenticationFailed):
        # 403 on a write: this action is not allowed (a restricted key, a record the API user may not see),
        # which waiting will not change; 401 (or none): the credentials are refused, the connection waits.
        return REFUSED if error.status == 403 else HOLD
    if isinstance(error, ProviderUnreachable):
        return NOT_SENT
    if isinstance(error, NoAnswer):
        return MAYBE_SENT
    if isinstance(error, ProviderError):
        status = error.status
        if status == 429:
            return NOT_SENT
        if status is not None and 400 <= status < 500 and status != 408:
            return REFUSED
        return MAYBE_SENT
    return MAYBE_SENT
