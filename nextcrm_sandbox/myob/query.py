"""OData v3 as MYOB reads it: ``$filter`` tokenised and compiled into predicates (comparisons, ``and``/``or``/``not``,
string and date functions), ``$orderby`` keys, and the field getters of invoices, customers and customer payments
they run on."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from nextcrm_sandbox.myob.data import _CompanyFile, _Row
from nextcrm_sandbox.myob.model import (
    _CUSTOMER_KEYS,
    _EPOCH,
    _INVOICE_KEYS,
    _PAYMENT_KEYS,
    _bad_query,
    _When,
    format_myob_datetime,
    parse_myob_datetime,
)

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<typed>(?:datetime|guid|datetimeoffset)'(?:[^']|'')*')"
    r"|(?P<str>'(?:[^']|'')*')"
    r"|(?P<num>-?\d+(?:\.\d+)?[mMdDfFlL]?)"
    r"|(?P<punc>[(),])"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*))"
)
_COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
_KEYWORDS = frozenset({"and", "or", "not", "true", "false", "null"}) | _COMPARISONS
_STRING_FUNCTIONS = frozenset({"startswith", "endswith", "substringof", "tolower", "toupper", "trim", "length"})
_DATE_FUNCTIONS = frozenset({"year", "month", "day"})

Getter = Callable[[Any], Any]


def _tokenize(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None or match.end() == pos:
            raise _bad_query(f"Syntax error at position {pos} in $filter")
        pos = match.end()
        kind = match.lastgroup
        value = match.group(kind or "")
        if kind == "typed":
            prefix, _, rest = value.partition("'")
            literal = rest[:-1].replace("''", "'")
            if prefix == "guid":
                out.append(("lit", literal.lower()))
            else:
                try:
                    out.append(("lit", _When(parse_myob_datetime(literal))))
                except ValueError:
                    raise _bad_query(f"Unrecognized datetime literal '{literal}' in $filter") from None
        elif kind == "str":
            out.append(("lit", value[1:-1].replace("''", "'")))
        elif kind == "num":
            digits = value.rstrip("mMdDfFlL")
            out.append(("lit", float(digits) if "." in digits else int(digits)))
        elif kind == "punc":
            out.append(("punc", value))
        else:
            lower = value.lower()
            out.append(("kw", lower) if lower in _KEYWORDS else ("name", value))
    return out


def _coerce(a: Any, b: Any) -> tuple[Any, Any]:
    if isinstance(a, _When) and isinstance(b, str):
        try:
            return a, _When(parse_myob_datetime(b))
        except ValueError:
            return str(a), b
    if isinstance(b, _When) and isinstance(a, str):
        try:
            return _When(parse_myob_datetime(a)), b
        except ValueError:
            return a, str(b)
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold(), b.casefold()
    return a, b


def _compare(op: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        if op == "eq":
            return a is None and b is None
        if op == "ne":
            return (a is None) != (b is None)
        return False
    a, b = _coerce(a, b)
    try:
        if op == "eq":
            return bool(a == b)
        if op == "ne":
            return bool(a != b)
        if op == "gt":
            return bool(a > b)
        if op == "ge":
            return bool(a >= b)
        if op == "lt":
            return bool(a < b)
        return bool(a <= b)
    except TypeError:
        return False


class _FilterParser:
    """Recursive-descent parser of the OData v3 ``$filter`` subset MYOB clients use, into closures."""

    def __init__(self, text: str, resolve: Callable[[str], Getter]) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.resolve = resolve

    def parse(self) -> Getter:
        if not self.tokens:
            raise _bad_query("$filter is empty")
        node = self._or()
        if self.pos != len(self.tokens):
            raise _bad_query(f"Unexpected token {self.tokens[self.pos][1]!r} in $filter")
        return node

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, kind: str, value: Any = None) -> Any:
        token = self._peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            want = value if value is not None else kind
            raise _bad_query(f"Expected {want!r} in $filter")
        self.pos += 1
        return token[1]

    def _is(self, kind: str, value: Any) -> bool:
        token = self._peek()
        return token is not None and token[0] == kind and token[1] == value

    def _or(self) -> Getter:
        left = self._and()
        while self._is("kw", "or"):
            self.pos += 1
            right = self._and()
            left = (lambda lf, rf: lambda row: bool(lf(row)) or bool(rf(row)))(left, right)
        return left

    def _and(self) -> Getter:
        left = self._unary()
        while self._is("kw", "and"):
            self.pos += 1
            right = self._unary()
            left = (lambda lf, rf: lambda row: bool(lf(row)) and bool(rf(row)))(left, right)
        return left

    def _unary(self) -> Getter:
        if self._is("kw", "not"):
            self.pos += 1
            inner = self._unary()
            return lambda row: not inner(row)
        return self._comparison()

    def _comparison(self) -> Getter:
        left = self._primary()
        token = self._peek()
        if token is not None and token[0] == "kw" and token[1] in _COMPARISONS:
            self.pos += 1
            right = self._primary()
            op = token[1]
            return lambda row: _compare(op, left(row), right(row))
        return left

    def _primary(self) -> Getter:
        token = self._peek()
        if token is None:
            raise _bad_query("Unexpected end of $filter")
        kind, value = token
        if kind == "punc" and value == "(":
            self.pos += 1
            node = self._or()
            self._take("punc", ")")
            return node
        if kind == "lit":
            self.pos += 1
            return lambda row: value
        if kind == "kw" and value in ("true", "false", "null"):
            self.pos += 1
            constant = {"true": True, "false": False, "null": None}[value]
            return lambda row: constant
        if kind == "name":
            self.pos += 1
            if self._is("punc", "("):
                return self._function(value)
            return self.resolve(value)
        raise _bad_query(f"Unexpected token {value!r} in $filter")

    def _function(self, name: str) -> Getter:
        lower = name.lower()
        if lower not in _STRING_FUNCTIONS and lower not in _DATE_FUNCTIONS:
            raise _bad_query(f"Unknown function '{name}' in $filter")
        self._take("punc", "(")
        args = [self._or()]
        while self._is("punc", ","):
            self.pos += 1
            args.append(self._or())
        self._take("punc", ")")
        arity = 2 if lower in ("startswith", "endswith", "substringof") else 1
        if len(args) != arity:
            raise _bad_query(f"Function '{name}' takes {arity} argument(s)")
        return _function_node(lower, args)


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    return format_myob_datetime(value) if isinstance(value, _When) else str(value)


def _function_node(name: str, args: list[Getter]) -> Getter:
    first = args[0]
    if name in ("startswith", "endswith", "substringof"):
        second = args[1]

        def test(row: Any) -> bool:
            a, b = _as_text(first(row)), _as_text(second(row))
            if a is None or b is None:
                return False
            a, b = a.casefold(), b.casefold()
            if name == "startswith":
                return a.startswith(b)
            if name == "endswith":
                return a.endswith(b)
            return a in b

        return test
    if name in _DATE_FUNCTIONS:

        def part(row: Any) -> int | None:
            value = first(row)
            if isinstance(value, str):
                try:
                    value = parse_myob_datetime(value)
                except ValueError:
                    return None
            if not isinstance(value, int):
                return None
            moment = _EPOCH + dt.timedelta(microseconds=value)
            return getattr(moment, name)

        return part

    def transform(row: Any) -> Any:
        text = _as_text(first(row))
        if text is None:
            return None
        if name == "tolower":
            return text.lower()
        if name == "toupper":
            return text.upper()
        if name == "trim":
            return text.strip()
        return len(text)

    return transform


def _orderby_keys(text: str) -> list[tuple[str, bool]]:
    keys: list[tuple[str, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2:
            raise _bad_query(f"Invalid $orderby clause '{part.strip()}'")
        direction = words[1].lower() if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise _bad_query(f"Invalid $orderby direction '{words[1]}'")
        keys.append((words[0], direction == "desc"))
    return keys


def _sort_key(getter: Getter) -> Callable[[Any], tuple[int, Any]]:
    def key(row: Any) -> tuple[int, Any]:
        value = getter(row)
        if value is None:
            return (0, 0)
        if isinstance(value, str):
            return (1, value.casefold())
        if isinstance(value, (dict, list)):
            raise _bad_query("$orderby needs a property of a primitive type")
        return (1, value)

    return key


def _field_getter(tenant: _CompanyFile, keys: frozenset[str], entity: str) -> Callable[[str], Getter]:
    offset = tenant.offset_us

    def resolve(path: str) -> Getter:
        parts = path.split("/")
        head = next((k for k in keys if k.lower() == parts[0].lower()), None)
        if head is None:
            raise _bad_query(f"Could not find a property named '{parts[0]}' on type '{entity}'")
        if len(parts) == 1:
            if head == "LastModified":
                return lambda row: _When(row.lm_us + offset)
            if head == "Created":
                return lambda row: _When(row.created_us + offset)
            if head == "UID":
                return lambda row: row.uid
            if head == "InvoiceType":
                return lambda row: row.layout
            return lambda row: row.rec.get(head)
        tail = parts[1:]

        def nested(row: _Row) -> Any:
            value: Any = row.rec.get(head)
            for part in tail:
                if not isinstance(value, dict):
                    return None
                value = next((v for k, v in value.items() if k.lower() == part.lower()), None)
            return value

        return nested

    return resolve


def _invoice_getter(tenant: _CompanyFile) -> Callable[[str], Getter]:
    return _field_getter(tenant, _INVOICE_KEYS, "MYOB.Sale.Invoice")


def _customer_getter(tenant: _CompanyFile) -> Callable[[str], Getter]:
    return _field_getter(tenant, _CUSTOMER_KEYS, "MYOB.Contact.Customer")


def _payment_getter(tenant: _CompanyFile) -> Callable[[str], Getter]:
    return _field_getter(tenant, _PAYMENT_KEYS, "MYOB.Sale.CustomerPayment")
