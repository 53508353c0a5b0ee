"""QuickBooks' SQL-like query language: tokens, ``parse_query`` into a ``Query`` of ``Condition``s (``WHERE``,
``ORDERBY``, ``STARTPOSITION``, ``MAXRESULTS``), and the fields each entity lets a query name with their kinds
and comparisons."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nextcrm_sandbox.quickbooks.model import DEFAULT_MAX_RESULTS, QueryError, _parser_error, _validation_error

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),*])
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset(
    {"select", "from", "where", "and", "or", "in", "like", "order", "orderby", "by", "asc", "desc", "count"}
    | {"startposition", "maxresults", "true", "false"}
)


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # ident, keyword, string, number, op, punct, eof
    text: str
    col: int


def _tokenize(sql: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(sql):
        m = _TOKEN_RE.match(sql, pos)
        if m is None:
            raise _parser_error(f'Lexical error at line 1, column {pos + 1}.  Encountered: "{sql[pos]}"')
        kind = m.lastgroup or ""
        text = m.group()
        if kind != "ws":
            if kind == "ident" and text.lower() in _KEYWORDS:
                kind = "keyword"
            out.append(_Tok(kind, text, pos + 1))
        pos = m.end()
    out.append(_Tok("eof", "", len(sql) + 1))
    return out


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``WHERE`` term: ``field op value`` (``values`` holds the list of an ``IN``)."""

    field: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed QuickBooks query."""

    entity: str
    count: bool
    fields: tuple[str, ...] | None
    where: tuple[Condition, ...]
    order: tuple[tuple[str, bool], ...]  # (field, descending)
    start: int
    max_results: int


class _Parser:
    def __init__(self, sql: str) -> None:
        self.toks = _tokenize(sql)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, expected: Iterable[str]) -> QueryError:
        tok = self.peek()
        if tok.kind == "eof":
            found = '"<EOF>"'
        else:
            kind = {"ident": "IDENTIFIER", "string": "STRING", "number": "INTEGER"}.get(tok.kind)
            found = f'" <{kind}> "{tok.text} ""' if kind else f'" "{tok.text}" "{tok.text} ""'
        wanted = "\n".join(f"    {e} ..." for e in expected)
        return _parser_error(f"Encountered {found} at line 1, column {tok.col}.\nWas expecting one of:\n{wanted}\n")

    def keyword(self, *words: str) -> str | None:
        tok = self.peek()
        if tok.kind == "keyword" and tok.text.lower() in words:
            self.i += 1
            return tok.text.lower()
        return None

    def expect_keyword(self, word: str) -> None:
        if self.keyword(word) is None:
            raise self.fail([f'"{word}"'])

    def expect_punct(self, char: str) -> None:
        tok = self.peek()
        if tok.kind != "punct" or tok.text != char:
            raise self.fail([f'"{char}"'])
        self.i += 1

    def ident(self) -> str:
        tok = self.peek()
        if tok.kind != "ident":
            raise self.fail(["<IDENTIFIER>"])
        self.i += 1
        return tok.text

    def integer(self) -> int:
        tok = self.peek()
        if tok.kind != "number" or not tok.text.lstrip("-").isdigit():
            raise self.fail(["<INTEGER>"])
        self.i += 1
        return int(tok.text)

    def value(self) -> Any:
        tok = self.next()
        if tok.kind == "string":
            return re.sub(r"\\(.)", r"\1", tok.text[1:-1])
        if tok.kind == "number":
            return tok.text
        if tok.kind == "keyword" and tok.text.lower() in ("true", "false"):
            return tok.text.lower() == "true"
        self.i -= 1
        raise self.fail(["<STRING>", "<INTEGER>", '"true"', '"false"'])

    def parse(self) -> Query:
        if self.peek().kind == "eof":
            raise _parser_error('Encountered "<EOF>" at line 0, column 0.\nWas expecting:\n    "select" ...\n')
        self.expect_keyword("select")
        count = False
        fields: tuple[str, ...] | None = None
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "*":
            self.i += 1
        elif self.keyword("count"):
            self.expect_punct("(")
            self.expect_punct("*")
            self.expect_punct(")")
            count = True
        else:
            names = [self.ident()]
            while self.peek().kind == "punct" and self.peek().text == ",":
                self.i += 1
                names.append(self.ident())
            fields = tuple(names)
        self.expect_keyword("from")
        entity = self.ident()
        where: list[Condition] = []
        if self.keyword("where"):
            where.append(self.condition())
            while self.keyword("and"):
                where.append(self.condition())
        order: list[tuple[str, bool]] = []
        kw = self.keyword("order", "orderby")
        if kw:
            if kw == "order":
                self.expect_keyword("by")
            while True:
                name = self.ident()
                direction = self.keyword("asc", "desc")
                order.append((name, direction == "desc"))
                if self.peek().kind == "punct" and self.peek().text == ",":
                    self.i += 1
                    continue
                break
        start: int | None = None
        max_results: int | None = None
        while True:
            kw = self.keyword("startposition", "maxresults")
            if kw is None:
                break
            if kw == "startposition" and start is None:
                start = self.integer()
            elif kw == "maxresults" and max_results is None:
                max_results = self.integer()
            else:
                self.i -= 1
                raise self.fail(["<EOF>"])
        if self.peek().kind != "eof":
            raise self.fail(['"and"', '"orderby"', '"startposition"', '"maxresults"', "<EOF>"])
        if max_results is not None and max_results < 1:
            raise _validation_error(f"MAXRESULTS must be greater than 0, supplied value: {max_results}")
        return Query(
            entity=entity,
            count=count,
            fields=fields,
            where=tuple(where),
            order=tuple(order),
            start=max(1, start or 1),
            max_results=DEFAULT_MAX_RESULTS if max_results is None else max_results,
        )

    def condition(self) -> Condition:
        name = self.ident()
        if self.keyword("in"):
            self.expect_punct("(")
            values = [self.value()]
            while self.peek().kind == "punct" and self.peek().text == ",":
                self.i += 1
                values.append(self.value())
            self.expect_punct(")")
            return Condition(name, "in", tuple(values))
        if self.keyword("like"):
            return Condition(name, "like", (self.value(),))
        tok = self.peek()
        if tok.kind != "op":
            raise self.fail(['"="', '"<"', '">"', '"<="', '">="', '"in"', '"like"'])
        self.i += 1
        op = "!=" if tok.text == "<>" else tok.text
        return Condition(name, op, (self.value(),))


def parse_query(sql: str) -> Query:
    """Parse QuickBooks' query language; raises ``QueryError`` (4000 parser / 4001 validation) on bad input."""
    return _Parser(sql).parse()


def _project(rec: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    wanted = {f.split(".")[0].lower() for f in fields}
    out = {k: v for k, v in rec.items() if k.lower() in wanted}
    out.update({"domain": rec.get("domain", "QBO"), "sparse": True})
    return out


_QUERYABLE: dict[str, dict[str, str]] = {
    "Invoice": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "docnumber": "DocNumber",
        "txndate": "TxnDate",
        "duedate": "DueDate",
        "customerref": "CustomerRef",
        "totalamt": "TotalAmt",
        "balance": "Balance",
    },
    "Customer": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "active": "Active",
        "displayname": "DisplayName",
        "givenname": "GivenName",
        "familyname": "FamilyName",
        "companyname": "CompanyName",
        "fullyqualifiedname": "FullyQualifiedName",
        "balance": "Balance",
    },
    "Payment": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "txndate": "TxnDate",
        "customerref": "CustomerRef",
        "paymentrefnum": "PaymentRefNum",
        "totalamt": "TotalAmt",
    },
    "Account": {
        "id": "Id",
        "metadata.lastupdatedtime": "MetaData.LastUpdatedTime",
        "metadata.createtime": "MetaData.CreateTime",
        "active": "Active",
        "name": "Name",
        "fullyqualifiedname": "FullyQualifiedName",
        "accounttype": "AccountType",
        "accountsubtype": "AccountSubType",
        "classification": "Classification",
    },
}
_FIELD_KINDS = {
    "metadata.lastupdatedtime": "datetime",
    "metadata.createtime": "datetime",
    "id": "int",
    "customerref": "int",
    "active": "bool",
    "totalamt": "money",
    "balance": "money",
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}
