"""Stripe's search query language for ``GET /v1/{charges,customers,invoices,payment_intents,prices,products,
subscriptions}/search``: clauses ``field:value`` (exact, case-insensitive), ``field~"sub"`` (substring, 3
characters or more), ``field>n`` ``<`` ``>=`` ``<=`` on numbers, ``metadata["key"]:"value"``, ``-`` to negate,
``null`` for a missing value, joined by ``AND`` or by ``OR`` (not both), at most 10 clauses; each resource searches
its own fields."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nextcrm_sandbox.stripe.model import StripeError

# The fields each resource can be searched by (https://docs.stripe.com/search#query-fields), as paths into
# the object; ``True`` marks a numeric field (compared as a number, the only kind ``>``/``<`` accept).
SEARCH_FIELDS: dict[str, dict[str, tuple[tuple[str, ...], bool]]] = {
    "charges": {
        "amount": (("amount",), True),
        "billing_details.address.postal_code": (("billing_details", "address", "postal_code"), False),
        "created": (("created",), True),
        "currency": (("currency",), False),
        "customer": (("customer",), False),
        "disputed": (("disputed",), False),
        "payment_method_details.card.brand": (("payment_method_details", "card", "brand"), False),
        "payment_method_details.card.last4": (("payment_method_details", "card", "last4"), False),
        "refunded": (("refunded",), False),
        "status": (("status",), False),
    },
    "customers": {
        "created": (("created",), True),
        "email": (("email",), False),
        "name": (("name",), False),
        "phone": (("phone",), False),
    },
    "invoices": {
        "created": (("created",), True),
        "currency": (("currency",), False),
        "customer": (("customer",), False),
        "number": (("number",), False),
        "status": (("status",), False),
        "subscription": (("parent", "subscription_details", "subscription"), False),
        "total": (("total",), True),
    },
    "payment_intents": {
        "amount": (("amount",), True),
        "created": (("created",), True),
        "currency": (("currency",), False),
        "customer": (("customer",), False),
        "status": (("status",), False),
    },
    "prices": {
        "active": (("active",), False),
        "currency": (("currency",), False),
        "lookup_key": (("lookup_key",), False),
        "product": (("product",), False),
        "type": (("type",), False),
    },
    "products": {
        "active": (("active",), False),
        "description": (("description",), False),
        "name": (("name",), False),
        "shippable": (("shippable",), False),
        "url": (("url",), False),
    },
    "subscriptions": {
        "created": (("created",), True),
        "status": (("status",), False),
    },
}
SEARCHABLE = frozenset(SEARCH_FIELDS)
_MAX_CLAUSES = 10
_CLAUSE = re.compile(
    r"""\s*(?P<neg>-)?(?P<field>metadata\[(?:'[^']*'|"[^"]*")\]|[a-z_][a-z0-9_.]*)\s*(?P<op>:|~|>=|<=|>|<)\s*"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|null|true|false)\s*"""
)
_JOIN = re.compile(r"\s+(AND|OR)\s+")
_PARSE_ERROR = (
    'We were unable to parse your search query. Try using the format `metadata["key"]:"value"` to query '
    'for metadata or `key:"value"` to query for other fields.'
)


def _bad(message: str) -> StripeError:
    return StripeError(400, message, param="query")


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


@dataclass(frozen=True)
class _Clause:
    getter: Callable[[dict[str, Any]], Any]
    op: str
    value: Any
    numeric: bool
    negated: bool

    def matches(self, obj: dict[str, Any]) -> bool:
        found = self.getter(obj)
        return self._test(found) != self.negated

    def _test(self, found: Any) -> bool:
        if self.value is None:
            return found is None
        if found is None:
            return False
        if self.numeric:
            if isinstance(found, bool) or not isinstance(found, (int, float)):
                return False
            return {":": found == self.value, ">": found > self.value, "<": found < self.value,
                    ">=": found >= self.value, "<=": found <= self.value}[self.op]  # fmt: skip
        text = str(found).lower() if not isinstance(found, bool) else ("true" if found else "false")
        if self.op == "~":
            return self.value in text
        return text == self.value


@dataclass(frozen=True)
class Query:
    """A parsed search query: its clauses, all of which (AND) or any of which (OR) must match."""

    clauses: tuple[_Clause, ...]
    any_of: bool

    def matches(self, obj: dict[str, Any]) -> bool:
        results = (c.matches(obj) for c in self.clauses)
        return any(results) if self.any_of else all(results)


def parse_query(resource: str, text: str) -> Query:
    """Parse ``text`` for ``resource``; Stripe's 400 (``param: query``) for what it would refuse."""
    fields = SEARCH_FIELDS[resource]
    joins = _JOIN.findall(text)
    if "AND" in joins and "OR" in joins:
        raise _bad("Queries cannot mix AND and OR; use one of them throughout.")
    parts = _JOIN.split(text)[::2]
    if len(parts) > _MAX_CLAUSES:
        raise _bad(f"A query can have at most {_MAX_CLAUSES} clauses.")
    clauses = []
    for part in parts:
        m = _CLAUSE.fullmatch(part)
        if m is None:
            raise _bad(_PARSE_ERROR)
        name, op, raw = m["field"], m["op"], m["value"]
        if name.startswith("metadata["):
            key = name[10:-2]
            getter: Callable[[dict[str, Any]], Any] = lambda obj, k=key: (obj.get("metadata") or {}).get(k)  # noqa: E731
            numeric = False
        elif name in fields:
            path, numeric = fields[name]
            getter = lambda obj, p=path: _dig(obj, p)  # noqa: E731
        else:
            raise _bad(f"Field `{name}` is an unsupported search field for resource `{resource}`. See http://stripe"
                       f".com/docs/search#query-fields-for-{resource} for a list of supported fields.")  # fmt: skip
        value: Any
        if raw == "null":
            value = None
        elif raw[0] in "'\"":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        else:
            value = raw
        if op in (">", "<", ">=", "<=") and not numeric:
            raise _bad(f"Field `{name}` does not support the `{op}` operator; only numeric fields do.")
        if op == "~" and (numeric or value is None or len(str(value)) < 3):
            raise _bad("The `~` operator needs a quoted value of at least 3 characters on a text field.")
        if value is not None:
            if numeric:
                try:
                    value = float(value) if "." in str(value) else int(value)
                except ValueError:
                    raise _bad(f"Field `{name}` expects a number.") from None
            else:
                value = str(value).lower()
        clauses.append(_Clause(getter, op, value, numeric, bool(m["neg"])))
    return Query(tuple(clauses), any_of="OR" in joins)
