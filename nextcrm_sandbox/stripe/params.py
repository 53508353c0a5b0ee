"""Stripe's form parameters: ``a[b][0]=c`` brackets into nested values, typed reads with Stripe's messages,
``created`` bounds, unknown-parameter checks and ``metadata`` updates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nextcrm_sandbox.stripe.model import StripeError, _unknown_param


def _split_key(key: str) -> list[str]:
    start = key.find("[")
    if start <= 0 or not key.endswith("]"):
        return [key]
    parts = key[start + 1 : -1].split("][")
    if any("[" in p or "]" in p for p in parts) or "" in parts[:-1]:
        return [key]
    return [key[:start], *parts]


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        for k, v in node.items():
            node[k] = _listify(v)
        n = len(node)
        if n and all(k.isdigit() for k in node) and {int(k) for k in node} == set(range(n)):
            return [node[str(i)] for i in range(n)]
        return node
    if isinstance(node, list):
        return [_listify(v) for v in node]
    return node


def parse_bracket_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest Stripe's bracket notation: ``created[gte]=1`` → ``{"created": {"gte": "1"}}``.

    ``expand[]=a&expand[]=b`` and ``expand[0]=a&expand[1]=b`` both give ``{"expand": ["a", "b"]}``;
    ``items[0][price]=p`` gives ``{"items": [{"price": "p"}]}``. A dict whose keys are exactly ``"0".."n-1"``
    becomes a list. Values stay strings; a repeated plain key keeps the last value.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        segs = _split_key(key)
        *parents, leaf = segs
        node: dict[str, Any] = root
        if leaf == "":
            for seg in parents[:-1]:
                child = node.get(seg)
                if not isinstance(child, dict):
                    child = {}
                    node[seg] = child
                node = child
            lst = node.get(parents[-1])
            if not isinstance(lst, list):
                lst = []
                node[parents[-1]] = lst
            lst.append(value)
            continue
        for seg in parents:
            child = node.get(seg)
            if not isinstance(child, dict):
                child = {}
                node[seg] = child
            node = child
        node[leaf] = value
    return _listify(root)


def _as_int(value: Any, param: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise StripeError(400, f"Invalid integer: {value!r}", param=param)
    try:
        n = int(value)
    except ValueError:
        raise StripeError(400, f"Invalid integer: {value}", param=param) from None
    if minimum is not None and n < minimum:
        raise StripeError(400, f"This value must be greater than or equal to {minimum}.", param=param)
    if maximum is not None and n > maximum:
        raise StripeError(400, f"This value must be less than or equal to {maximum}.", param=param)
    return n


def _as_bool(value: Any, param: str) -> bool:
    if value in ("true", True):
        return True
    if value in ("false", False):
        return False
    raise StripeError(400, f"Invalid boolean: {value}", param=param)


def _as_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise StripeError(400, f"Invalid string: {param} must be a string", param=param)
    return value


def _as_list(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise StripeError(400, f"Invalid array: {param}", param=param)


def _created_bounds(value: Any) -> tuple[int | None, int | None]:
    """``created`` as an int or ``{gt, gte, lt, lte}`` → inclusive (low, high) bounds."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        n = _as_int(value, "created")
        return n, n
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid created: must be an integer or a hash", param="created")
    low: int | None = None
    high: int | None = None
    for op, raw in value.items():
        param = f"created[{op}]"
        n = _as_int(raw, param)
        if op == "gt":
            low = n + 1 if low is None else max(low, n + 1)
        elif op == "gte":
            low = n if low is None else max(low, n)
        elif op == "lt":
            high = n - 1 if high is None else min(high, n - 1)
        elif op == "lte":
            high = n if high is None else min(high, n)
        else:
            raise _unknown_param(param)
    return low, high


def _check_params(params: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed:
            raise _unknown_param(name)


def _metadata_update(current: dict[str, str], value: Any) -> dict[str, str]:
    if value == "":
        return {}
    if isinstance(value, list):
        value = {str(i): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        raise StripeError(400, "Invalid object: metadata must be a hash", param="metadata")
    out = dict(current)
    for k, v in value.items():
        if not isinstance(v, str):
            raise StripeError(400, f"Invalid metadata value for key {k}", param=f"metadata[{k}]")
        if v == "":
            out.pop(k, None)
        else:
            out[k] = v
    if len(out) > 50:
        raise StripeError(400, "Metadata can have up to 50 keys.", param="metadata")
    return out
