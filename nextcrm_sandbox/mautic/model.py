"""Mautic's vocabulary for the sandbox: constants and messages, the error shapes, PHP-style JSON and query
parameters, dates as MySQL reads them, records, the columns ``where[]``/``orderBy``/``order[]`` may name and
Doctrine's comparison expressions over them."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from nextcrm_sandbox.control import ControlError

if TYPE_CHECKING:
    from nextcrm_sandbox.mautic.data import MauticInstallation


PREFIX = "/mautic"
CONTROL_PREFIX = "/_sandbox/mautic"
MAUTIC_VERSION = "5.1.0"
ACCESS_TTL = 3600
REFRESH_TTL = 14 * 86_400
CODE_TTL = 30
DEFAULT_PAGE_LIMIT = 30
CAMPAIGN_CONTACTS_LIMIT = 100
RATE_PERIOD = 3600
CONTACT_COUNT_TTL = 43_200
ENTITIES = ("campaigns", "contacts", "segments", "emails")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
SESSION_COOKIE = "mautic_sandbox_session"

_DAY = 86_400
_ONE = {"campaigns": "campaign", "contacts": "contact", "segments": "list", "emails": "email"}
_MULTI = {"campaigns": "campaigns", "contacts": "contacts", "segments": "lists", "emails": "emails"}
_ALIASES = {"campaigns": "c", "contacts": "l", "segments": "l", "emails": "e"}
_CATEGORY_ALIASES = {"campaigns": "cat", "emails": "c", "segments": "cat"}
_ORM_ONLY = frozenset({"campaigns", "emails"})  # camelCase properties only; contacts and segments take columns too

MSG_API_DISABLED = "API disabled. You need to enable the API in the API settings page of your Mautic account."
MSG_BASIC_DISABLED = (
    "Basic Auth disabled. You need to enable HTTP basic auth in the API settings page of your Mautic account."
)
MSG_BASIC_INVALID = "Authorization denied, invalid credentials."
MSG_ACCESS_DENIED = "API authorization denied."
MSG_NOT_FOUND = "Item was not found."
MSG_NAME_REQUIRED = "A name is required."
MSG_NOT_VALID = "This value is not valid."
MSG_EVENTS_REQUIRED = "At least one event is required. Use the Launch Campaign Builder button to add one."
MSG_SOURCES_REQUIRED = "At least one contact source is required. Use the Launch Campaign Builder button to add one."
MSG_TOKEN_INVALID = "The access token provided is invalid."
MSG_TOKEN_EXPIRED = "The access token provided has expired."
MSG_ONE_METHOD = "Only one method may be used to authenticate at a time (Auth header, GET or POST)."
RATE_LIMIT_CONTENT_TYPE = "text/html; charset=UTF-8"


def _generic_message(status: int) -> str:
    return (
        f"Looks like I encountered an error (error #{status}). If I do it again, please report me to the system "
        "administrator!"
    )


def php_json(payload: Any) -> bytes:
    """JSON bytes as PHP's default ``json_encode`` writes them: compact, ``/`` as ``\\/``, non-ASCII as ``\\uXXXX``."""
    raw = orjson.dumps(payload)
    if not raw.isascii():
        raw = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()
    return raw.replace(b"/", b"\\/")


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer of the API in one of Mautic's shapes.

    ``controller``: ``{"errors": [{"code", "message", "details", "type"}]}`` from ``returnError`` (with the
    ``Mautic-Version`` header); ``kernel``: ``{"errors": [{"message", "code", "type"}]}`` as ``ApiSubscriber``
    rewrites firewall and OAuth errors and the exception handler reports routing and server errors.
    """

    def __init__(self, status: int, message: str, *, kind: str = "controller", error_type: str | None = None,
                 details: Any = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.error_type = error_type
        # ``returnError``'s details: the form's messages by field (``{"name": ["A name is required."]}``), else [].
        self.details = details

    def body(self) -> dict[str, Any]:
        """The response body."""
        if self.kind == "kernel":
            return {"errors": [{"message": self.message, "code": self.status, "type": self.error_type}]}
        details = [] if self.details is None else self.details
        return {"errors": [{"code": self.status, "message": self.message, "details": details, "type": self.error_type}]}

    @classmethod
    def invalid(cls, field: str, message: str) -> ApiError:
        """A form error as ``processForm`` answers it: 400, ``"<field>: <message>"``, the message under the field."""
        return cls(400, f"{field}: {message}", details={field: [message]})


def _server_error() -> ApiError:
    return ApiError(500, _generic_message(500), kind="kernel")


# ---------------------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------------------

_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")
_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE,
)


def _parse_offset(value: str) -> dt.timezone:
    m = _OFFSET_RE.match(value)
    if not m or int(m.group(2)) > 14 or int(m.group(3)) >= 60:
        raise ControlError(400, "utc_offset must look like +00:00 or -05:00")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return dt.timezone(dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes))


def parse_datetime(text: str) -> int | None:
    """Unix seconds of a date or date-time as MySQL reads it (no offset = UTC, as Mautic stores); None if not one."""
    m = _DATETIME_RE.match(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, zone = m.groups()
    try:
        moment = dt.datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0), tzinfo=dt.UTC
        )
    except ValueError:
        return None
    ts = int(moment.timestamp())
    if zone and zone.upper() != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        ts -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return ts


def _db_datetime(ts: int | None) -> str | None:
    """A DATETIME column as the database hands it over (UTC, no offset)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _unix_field(value: Any, name: str) -> int | None:
    """A time given to the control API: unix seconds, an ISO string or null."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ControlError(400, f"{name} must be unix seconds or an ISO-8601 string")
    if isinstance(value, (int, float)):
        return int(value)
    parsed = parse_datetime(str(value))
    if parsed is None:
        raise ControlError(400, f"{name} must be unix seconds or an ISO-8601 string")
    return parsed


# ---------------------------------------------------------------------------------------------------------
# Request parameters as PHP reads them
# ---------------------------------------------------------------------------------------------------------

_BRACKETS_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])+)$")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")


def php_params(items: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Query-string pairs folded into PHP's nested arrays (``where[0][col]=x`` → ``{"where": {"0": {"col": "x"}}}``)."""
    out: dict[str, Any] = {}
    for key, value in items:
        m = _BRACKETS_RE.match(key)
        if m is None:
            out[key] = value
            continue
        node = out.get(m.group(1))
        if not isinstance(node, dict):
            node = out[m.group(1)] = {}
        parts = _PART_RE.findall(m.group(2))
        for i, part in enumerate(parts):
            if part == "":
                part = str(sum(1 for k in node if k.isdigit()))
            if i == len(parts) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {}
                node = child
    return out


def _php_truthy(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value)
    return value not in (None, "", "0")


def _php_int(value: Any, default: int) -> int:
    if value is None:
        return default
    m = re.match(r"^\s*([+-]?\d+)", str(value))
    return int(m.group(1)) if m else 0


def _values(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list):
        return node
    return []


# ---------------------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Record:
    id: int
    added: int
    modified: int | None
    f: dict[str, Any]


@dataclass(slots=True)
class _Member:
    added: int
    manually_removed: bool = False
    manually_added: bool = False
    exited: int | None = None
    rotation: int = 1


@dataclass(slots=True)
class _Column:
    kind: str  # int, bool, date, str
    get: Callable[[MauticInstallation, Any], Any]


_CONTACT_FIELDS: tuple[tuple[int, str, str, str, str], ...] = (
    (1, "title", "Title", "lookup", "core"),
    (2, "firstname", "First Name", "text", "core"),
    (3, "lastname", "Last Name", "text", "core"),
    (4, "company", "Primary company", "text", "core"),
    (5, "position", "Position", "text", "core"),
    (6, "email", "Email", "email", "core"),
    (7, "mobile", "Mobile", "tel", "core"),
    (8, "phone", "Phone", "tel", "core"),
    (9, "points", "Points", "number", "core"),
    (10, "fax", "Fax", "tel", "core"),
    (11, "address1", "Address Line 1", "text", "core"),
    (12, "address2", "Address Line 2", "text", "core"),
    (13, "city", "City", "text", "core"),
    (14, "state", "State", "region", "core"),
    (15, "zipcode", "Zip Code", "text", "core"),
    (16, "country", "Country", "country", "core"),
    (17, "preferred_locale", "Preferred Locale", "locale", "core"),
    (18, "timezone", "Preferred Timezone", "timezone", "core"),
    (19, "last_active", "Date Last Active", "datetime", "core"),
    (20, "attribution_date", "Attribution Date", "datetime", "core"),
    (21, "attribution", "Attribution", "number", "core"),
    (22, "website", "Website", "url", "core"),
    (23, "facebook", "Facebook", "text", "social"),
    (24, "foursquare", "Foursquare", "text", "social"),
    (25, "instagram", "Instagram", "text", "social"),
    (26, "linkedin", "LinkedIn", "text", "social"),
    (27, "skype", "Skype", "text", "social"),
    (28, "twitter", "Twitter", "text", "social"),
)
_FIELD_GROUPS = ("core", "social", "personal", "professional")
_FIELD_KINDS = {"number": "int", "datetime": "date"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


# ---------------------------------------------------------------------------------------------------------
# Columns that where[], orderBy and order[] may name
# ---------------------------------------------------------------------------------------------------------


def _f(key: str) -> Callable[[MauticInstallation, _Record], Any]:
    return lambda inst, r: r.f.get(key)


_PUBLISH_COLUMNS: dict[str, _Column] = {
    "id": _Column("int", lambda inst, r: r.id),
    "isPublished": _Column("bool", _f("isPublished")),
    "dateAdded": _Column("date", lambda inst, r: r.added),
    "dateModified": _Column("date", lambda inst, r: r.modified),
    "createdBy": _Column("int", _f("createdBy")),
    "createdByUser": _Column("str", lambda inst, r: inst.user_name(r.f.get("createdBy"))),
    "modifiedBy": _Column("int", _f("modifiedBy")),
    "modifiedByUser": _Column("str", lambda inst, r: inst.user_name(r.f.get("modifiedBy"))),
}
_COLUMNS: dict[str, dict[str, _Column]] = {
    "campaigns": {
        **_PUBLISH_COLUMNS,
        "name": _Column("str", _f("name")),
        "description": _Column("str", _f("description")),
        "publishUp": _Column("date", _f("publishUp")),
        "publishDown": _Column("date", _f("publishDown")),
        "category": _Column("int", _f("category")),
        "allowRestart": _Column("bool", _f("allowRestart")),
    },
    "segments": {
        **_PUBLISH_COLUMNS,
        "name": _Column("str", _f("name")),
        "publicName": _Column("str", _f("publicName")),
        "alias": _Column("str", _f("alias")),
        "description": _Column("str", _f("description")),
        "category": _Column("int", _f("category")),
        "isGlobal": _Column("bool", _f("isGlobal")),
        "isPreferenceCenter": _Column("bool", _f("isPreferenceCenter")),
    },
    "emails": {
        **_PUBLISH_COLUMNS,
        "name": _Column("str", _f("name")),
        "subject": _Column("str", _f("subject")),
        "language": _Column("str", _f("language")),
        "emailType": _Column("str", _f("emailType")),
        "publishUp": _Column("date", _f("publishUp")),
        "publishDown": _Column("date", _f("publishDown")),
        "sentCount": _Column("int", _f("sentCount")),
        "readCount": _Column("int", _f("readCount")),
        "variantSentCount": _Column("int", _f("variantSentCount")),
        "revision": _Column("int", _f("revision")),
        "category": _Column("int", _f("category")),
    },
    "contacts": {
        **{_snake(k): v for k, v in _PUBLISH_COLUMNS.items()},
        "owner_id": _Column("int", _f("owner")),
        "date_identified": _Column("date", _f("dateIdentified")),
        "color": _Column("str", _f("color")),
        "stage_id": _Column("int", lambda inst, r: None),
        **{
            alias: _Column(
                _FIELD_KINDS.get(kind, "str"),
                (lambda a: lambda inst, r: r.f["v"].get(a))(alias),
            )
            for _id, alias, _label, kind, _group in _CONTACT_FIELDS
        },
    },
}
_CATEGORY_COLUMNS: dict[str, _Column] = {
    "id": _Column("int", lambda inst, r: r.f.get("category")),
    "title": _Column("str", lambda inst, r: inst.category_value(r.f.get("category"), "title")),
    "alias": _Column("str", lambda inst, r: inst.category_value(r.f.get("category"), "alias")),
}
_MEMBER_COLUMNS: dict[str, _Column] = {
    "campaign_id": _Column("int", lambda inst, row: row[0]),
    "lead_id": _Column("int", lambda inst, row: row[1]),
    "date_added": _Column("date", lambda inst, row: row[2].added),
    "manually_removed": _Column("bool", lambda inst, row: row[2].manually_removed),
    "manually_added": _Column("bool", lambda inst, row: row[2].manually_added),
    "date_last_exited": _Column("date", lambda inst, row: row[2].exited),
    "rotation": _Column("int", lambda inst, row: row[2].rotation),
}
# ``lead_lists_leads`` (segment membership) rows: (segment id, contact id, membership).
_SEGMENT_MEMBER_COLUMNS: dict[str, _Column] = {
    "leadlist_id": _Column("int", lambda inst, row: row[0]),
    "lead_id": _Column("int", lambda inst, row: row[1]),
    "date_added": _Column("date", lambda inst, row: row[2].added),
    "manually_removed": _Column("bool", lambda inst, row: row[2].manually_removed),
    "manually_added": _Column("bool", lambda inst, row: row[2].manually_added),
}
_CATCH_ALL: dict[str, tuple[str, ...]] = {
    "campaigns": ("name", "description"),
    "segments": ("name", "alias"),
    "emails": ("name", "subject"),
    "contacts": ("firstname", "lastname", "email", "company", "city"),
}
_DOCTRINE_EXPRS = frozenset(
    {"eq", "neq", "lt", "lte", "gt", "gte", "like", "notLike", "in", "notIn"}
    | {"isNull", "isNotNull", "isEmpty", "isNotEmpty", "between", "notBetween"}
)


def _comparable(kind: str, value: Any) -> Any:
    """A stored value in the form comparisons use (strings case-insensitively, as MySQL's collation does)."""
    if value is None:
        return None
    if kind == "bool":
        return 1 if value else 0
    if kind == "str":
        return str(value).casefold()
    return value


def _coerce(kind: str, raw: Any) -> Any:
    """A request value as MySQL would compare it with a column of ``kind``."""
    text = "" if raw is None else str(raw)
    if kind == "date":
        parsed = parse_datetime(text)
        return parsed if parsed is not None else ("str", text)
    if kind in ("int", "bool"):
        lowered = text.strip().lower()
        if kind == "bool" and lowered in ("true", "false"):
            return 1 if lowered == "true" else 0
        m = re.match(r"^\s*[+-]?\d+(?:\.\d+)?", text)
        return float(m.group()) if m else 0
    return text.casefold()


def _compare(kind: str, stored: Any, wanted: Any) -> tuple[Any, Any]:
    if kind == "date" and isinstance(wanted, tuple):
        return _db_datetime(stored), wanted[1]
    return stored, wanted


def _like(pattern: str) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return re.compile("^" + "".join(out) + "$", re.IGNORECASE | re.DOTALL)


def pattern_match(pattern: re.Pattern[str], value: Any) -> bool:
    """Whether a stored value matches a LIKE pattern (NULL never does)."""
    return value is not None and pattern.match(str(value)) is not None


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}


def _csv(text: str) -> list[str]:
    out: list[str] = []
    for match in re.finditer(r'\s*(?:"((?:[^"]|"")*)"|([^,]*))\s*(?:,|$)', text):
        if match.start() >= len(text) and out:
            break
        out.append(match.group(1).replace('""', '"') if match.group(1) is not None else match.group(2).strip())
    return out


Predicate = Callable[[Any], bool]


def _predicate(inst: MauticInstallation, expr: str, column: _Column, raw: Any) -> Predicate | None:
    """One where[] clause; None for an expression Doctrine's builder does not know (Mautic then ignores it)."""
    kind, get = column.kind, column.get
    if expr in ("isNull", "isNotNull"):
        want_null = expr == "isNull"
        return lambda row: (get(inst, row) is None) == want_null
    if expr in ("isEmpty", "isNotEmpty"):
        want_empty = expr == "isEmpty"
        return lambda row: (get(inst, row) in (None, "")) == want_empty
    if expr in ("between", "notBetween"):
        bounds = _values(raw)
        if len(bounds) != 2:
            return None
        low, high = _coerce(kind, bounds[0]), _coerce(kind, bounds[1])
        inside = expr == "between"

        def between(row: Any) -> bool:
            value = _comparable(kind, get(inst, row))
            if value is None:
                return False
            a, lo = _compare(kind, value, low)
            b, hi = _compare(kind, value, high)
            return (lo <= a and b <= hi) == inside

        return between
    if isinstance(raw, dict):
        raise _server_error()
    if expr in ("in", "notIn"):
        items = _csv(html.unescape("" if raw is None else str(raw)))
        wanted = [_coerce(kind, item) for item in items]
        if len(wanted) == 1:
            expr = "eq" if expr == "in" else "neq"
            raw = items[0]
        else:
            positive = expr == "in"
            if kind != "date":  # plain equality: one set lookup per row (a page of ids is 1,000 values)
                wanted_set = set(wanted)

                def member_of(row: Any) -> bool:
                    value = _comparable(kind, get(inst, row))
                    return value is not None and (value in wanted_set) == positive

                return member_of

            def member(row: Any) -> bool:
                value = _comparable(kind, get(inst, row))
                if value is None:
                    return False
                hit = any(a == b for a, b in (_compare(kind, value, w) for w in wanted))
                return hit == positive

            return member
    if expr in ("like", "notLike"):
        pattern = _like("" if raw is None else str(raw))
        positive = expr == "like"

        def like(row: Any) -> bool:
            value = get(inst, row)
            if value is None:
                return False
            text = _db_datetime(value) if kind == "date" else str(int(value) if kind == "bool" else value)
            return (pattern.match(text) is not None) == positive

        return like
    op = _OPS.get(expr)
    if op is None:
        return None
    wanted = _coerce(kind, raw)

    def compare(row: Any) -> bool:
        value = _comparable(kind, get(inst, row))
        if value is None:
            return False
        a, b = _compare(kind, value, wanted)
        try:
            return op(a, b)
        except TypeError:
            return op(str(a), str(b))

    return compare


def _entity_of(name: Any) -> str:
    key = str(name or "").lower()
    aliases = {"campaign": "campaigns", "contact": "contacts", "segment": "segments", "list": "segments"}
    key = aliases.get(key, key)
    if key == "lists":
        key = "segments"
    if key == "email":
        key = "emails"
    if key not in ENTITIES:
        raise ControlError(400, f"entity must be one of {list(ENTITIES)}")
    return key
