"""``MauticInstallation``: one Mautic installation's users, API clients and OAuth server, its generated campaigns,
contacts, segments and emails with their memberships, and the API's list, read and write semantics over them.

Changes to contacts are told to ``on_contact_event(event type, payload)`` when set, as Mautic's ``LeadBundle``
webhook subscriber queues them, the payload carrying the contact and the ``timestamp``:

- ``mautic.lead_post_save_new`` when a save identifies the contact (it now has a name, company, email or social
  handle and had no ``dateIdentified``, which the save sets; creating an identified contact is such a save);
- ``mautic.lead_post_save_update`` for any other save of an identified contact; saves of anonymous visitors send
  neither;
- ``mautic.lead_points_change`` when a save moves the points (anonymous or not);
- ``mautic.lead_post_delete`` when the contact is deleted.

Campaign membership changes (joins, leaves, by the API or the control API) send nothing: Mautic has no webhook
event for them, and adding a contact to a campaign does not save the contact."""

from __future__ import annotations

import bisect
import datetime as dt
import html
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from nextcrm_sandbox.control import ControlError, bool_field, int_field, number_field
from nextcrm_sandbox.mautic.model import (
    _ALIASES,
    _CATCH_ALL,
    _CATEGORY_ALIASES,
    _CATEGORY_COLUMNS,
    _COLUMNS,
    _CONTACT_FIELDS,
    _DAY,
    _DOCTRINE_EXPRS,
    _FIELD_GROUPS,
    _MEMBER_COLUMNS,
    _MULTI,
    _ONE,
    _ORM_ONLY,
    _SEGMENT_MEMBER_COLUMNS,
    CAMPAIGN_CONTACTS_LIMIT,
    CODE_TTL,
    CONTACT_COUNT_TTL,
    DEFAULT_PAGE_LIMIT,
    ENTITIES,
    GRANT_TYPES,
    MAUTIC_VERSION,
    MSG_NOT_FOUND,
    PREFIX,
    RATE_LIMIT_CONTENT_TYPE,
    RATE_PERIOD,
    ApiError,
    Predicate,
    _camel,
    _Column,
    _comparable,
    _csv,
    _db_datetime,
    _entity_of,
    _like,
    _Member,
    _parse_offset,
    _php_int,
    _php_truthy,
    _predicate,
    _Record,
    _server_error,
    _slug,
    _snake,
    _unix_field,
    _values,
    parse_datetime,
    pattern_match,
)
from nextcrm_sandbox.oauth import OAuthPolicy, OAuthServer

_FIRST = ("Jim", "Ava", "Noah", "Mia", "Liam", "Zoë", "Omar", "Inès", "Lars", "Yuki", "Ana", "Ravi", "Chloe", "Mateo")
_LAST = ("Contact", "Müller", "Smith", "Okafor", "Tanaka", "García", "Nguyen", "Rossi", "Kowalski", "Dubois", "Silva")
_COMPANIES = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark Industries", "Wayne Enterprises", "Vandelay")
_CITIES = (
    ("Berlin", "Berlin", "10115", "Germany", "Europe/Berlin"),
    ("Austin", "Texas", "73301", "United States", "America/Chicago"),
    ("Lyon", "Auvergne-Rhône-Alpes", "69001", "France", "Europe/Paris"),
    ("Osaka", "Osaka", "530-0001", "Japan", "Asia/Tokyo"),
    ("Porto", "Porto", "4000-001", "Portugal", "Europe/Lisbon"),
    ("Toronto", "Ontario", "M5H 2N2", "Canada", "America/Toronto"),
)
_TAGS = ("vip", "newsletter", "trial", "customer", "partner", "webinar")
_CAMPAIGN_NAMES = (
    "Welcome",
    "Onboarding",
    "Re-engagement",
    "Webinar follow-up",
    "Product launch",
    "Trial nurture",
    "Win-back",
    "Upsell",
    "Event invite",
    "Newsletter",
)
_EVENTS = (
    ("email.send", "action", "Send email", {"email": 1, "email_type": "marketing"}),
    ("lead.changepoints", "action", "Adjust contact points", {"points": 20}),
    ("email.open", "decision", "Opens email", {}),
    ("lead.changetags", "action", "Modify contact's tags", {"add_tags": ["engaged"], "remove_tags": []}),
    ("campaign.addremovelead", "action", "Change campaigns", {"addTo": [], "removeFrom": ["this"]}),
)
_CATEGORIES = (
    (1, "Onboarding", "onboarding", "4e5e9e", "campaign"),
    (2, "Retention", "retention", "e5a41b", "campaign"),
    (3, "Events", "events", "66bb6a", "campaign"),
    (4, "Newsletters", "newsletters", "9575cd", "email"),
    (5, "Product", "product", "ef5350", "global"),
)


@dataclass
class _Client:
    client_id: str
    client_secret: str
    grant_types: tuple[str, ...]
    redirect_uris: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "grant_types": list(self.grant_types),
            "redirect_uris": list(self.redirect_uris),
        }


@dataclass
class _Bucket:
    calls: int
    reset_at: float


_KNOB_DEFAULTS: dict[str, Any] = {
    "api_enabled": True,
    "basic_auth": False,
    "login_form": False,
    "rate_limit": 0,
    "rate_limit_period": RATE_PERIOD,
    "rate_limit_content_type": RATE_LIMIT_CONTENT_TYPE,
    "default_pagelimit": DEFAULT_PAGE_LIMIT,
    "access_token_lifetime": 60,
    "refresh_token_lifetime": 14,
    "total_as_string": {"campaigns": False, "contacts": True, "segments": False, "emails": False},
    "empty_as_object": {"campaigns": False, "contacts": True, "segments": False, "emails": False},
    "total_count_ttl": 0,
    "contact_count_ttl": CONTACT_COUNT_TTL,
    "insert_during_paging": 0,
    "utc_offset": "+00:00",
    "mautic_version": MAUTIC_VERSION,
    # Contact fields marked "Is Unique Identifier" (email by default): ``POST /api/contacts/new`` with a value
    # of one of them that a contact already has updates that contact instead of creating another.
    "contact_unique_fields": ["email"],
}
_SOCIAL_FIELDS = tuple(alias for _i, alias, _l, _k, group in _CONTACT_FIELDS if group == "social")
_COUNT_FIELDS = ("campaigns", "contacts", "segments", "emails")
_ACCOUNT_FIELDS = frozenset({"id", "seed", "days", "clients", "users", *_COUNT_FIELDS, *_KNOB_DEFAULTS})
_CHANGE_FIELDS = (
    "creates",
    "edits",
    "deletes",
    "publishes",
    "unpublishes",
    "joins",
    "leaves",
    "contact_creates",
    "contact_edits",
    "contact_deletes",
)


def _normalise_knobs(body: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Validated knob values from ``body`` over ``base``."""
    out = dict(base)
    for name in ("api_enabled", "basic_auth", "login_form"):
        if name in body:
            out[name] = bool_field(body, name, False)
    for name, minimum in (
        ("rate_limit", 0),
        ("default_pagelimit", 1),
        ("access_token_lifetime", 1),
        ("refresh_token_lifetime", 1),
        ("total_count_ttl", 0),
        ("contact_count_ttl", 0),
        ("insert_during_paging", 0),
    ):
        if name in body:
            out[name] = int_field(body, name, 0, minimum)
    if "rate_limit_period" in body:
        out["rate_limit_period"] = number_field(body, "rate_limit_period", RATE_PERIOD, 0.001)
    for name in ("rate_limit_content_type", "mautic_version"):
        if name in body:
            if not isinstance(body[name], str) or not body[name]:
                raise ControlError(400, f"{name} must be a non-empty string")
            out[name] = body[name]
    if "utc_offset" in body:
        _parse_offset(str(body["utc_offset"]))
        out["utc_offset"] = str(body["utc_offset"])
    if "contact_unique_fields" in body:
        fields = body["contact_unique_fields"]
        aliases = {alias for _i, alias, _l, _k, _g in _CONTACT_FIELDS}
        if not isinstance(fields, list) or any(f not in aliases for f in fields):
            raise ControlError(400, 'contact_unique_fields must be a list of contact field aliases (e.g. ["email"])')
        out["contact_unique_fields"] = list(dict.fromkeys(fields))
    for name in ("total_as_string", "empty_as_object"):
        if name in body:
            value = body[name]
            merged = dict(out[name])
            if isinstance(value, bool):
                merged = dict.fromkeys(ENTITIES, value)
            elif isinstance(value, dict) and all(k in ENTITIES and isinstance(v, bool) for k, v in value.items()):
                merged.update(value)
            else:
                raise ControlError(400, f"{name} must be true/false or an object of entity: true/false")
            out[name] = merged
    return out


class MauticInstallation:
    """One Mautic installation: users, API clients, OAuth server, generated entities, memberships and knobs."""

    def __init__(self, spec: Mapping[str, Any], clock: Callable[[], int]) -> None:
        self.spec = dict(spec)
        self.id: str = spec["id"]
        self.base_path = f"{PREFIX}/{self.id}"
        self.clock = clock
        self.seed: int = spec["seed"]
        self.knobs: dict[str, Any] = dict(spec["knobs"])
        self.tz = _parse_offset(self.knobs["utc_offset"])
        self.users: dict[str, dict[str, Any]] = {}
        for i, user in enumerate(spec["users"], start=1):
            self.users[user["username"]] = {**user, "id": i}
        self.users_by_id = {u["id"]: u for u in self.users.values()}
        self.clients: dict[str, _Client] = {}
        self.oauth = OAuthServer(clock, self._policy())
        for client in spec["clients"]:
            self.add_client(client)
        self.categories = {
            cid: {"id": cid, "title": title, "alias": alias, "description": None, "color": color, "bundle": bundle}
            for cid, title, alias, color, bundle in _CATEGORIES
        }
        self.tables: dict[str, dict[int, _Record]] = {name: {} for name in ENTITIES}
        self.next_ids: dict[str, int] = dict.fromkeys(ENTITIES, 1)
        self.next_event_id = 1
        self.deleted: dict[str, dict[int, int]] = {name: {} for name in ENTITIES}
        self.campaign_leads: dict[int, dict[int, _Member]] = {}
        self.segment_leads: dict[int, dict[int, _Member]] = {}
        self.version = 0
        self._select_cache: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()
        self.contact_counts: dict[int, tuple[int, int]] = {}
        self.total_cache: dict[tuple[Any, ...], tuple[int, int]] = {}
        self.buckets: dict[str, _Bucket] = {}
        self.codes: OrderedDict[str, str] = OrderedDict()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.requests = 0
        self.throttled = 0
        self._rng = random.Random(f"mautic-changes:{self.seed}")
        self.on_contact_event: Callable[[str, dict[str, Any]], None] | None = None
        self._generate(clock())

    # --- configuration ------------------------------------------------------------------------------------

    def _policy(self) -> OAuthPolicy:
        return OAuthPolicy(
            access_ttl=self.knobs["access_token_lifetime"] * 60,
            code_ttl=CODE_TTL,
            refresh_idle_ttl=self.knobs["refresh_token_lifetime"] * _DAY,
            rotate=True,
            rotate_after=0,
            grace=0,
            client_auth=frozenset({"basic", "body"}),
            pkce=False,
            token_type="bearer",
            scope_required=False,
            redirect_prefix_match=True,
        )

    def configure(self, body: Mapping[str, Any]) -> None:
        """Change knobs without regenerating data."""
        unknown = set(body) - set(_KNOB_DEFAULTS)
        if unknown:
            raise ControlError(400, f"unknown knobs: {sorted(unknown)}")
        self.knobs = _normalise_knobs(body, self.knobs)
        self.tz = _parse_offset(self.knobs["utc_offset"])
        policy = self._policy()
        self.oauth.policy.access_ttl = policy.access_ttl
        self.oauth.policy.refresh_idle_ttl = policy.refresh_idle_ttl
        self._touch()

    def add_client(self, spec: Mapping[str, Any]) -> _Client:
        """Register (or replace) API credentials; grant types default to all three, as for an admin's client."""
        client_id, secret = spec.get("client_id"), spec.get("client_secret")
        if not isinstance(client_id, str) or not client_id or not isinstance(secret, str) or not secret:
            raise ControlError(400, "client_id and client_secret must be non-empty strings")
        grants = spec.get("grant_types") or list(GRANT_TYPES)
        if not isinstance(grants, list) or any(g not in GRANT_TYPES for g in grants):
            raise ControlError(400, f"grant_types must be a list drawn from {list(GRANT_TYPES)}")
        uris = spec.get("redirect_uris") or []
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise ControlError(400, "redirect_uris must be a list of strings")
        client = _Client(client_id, secret, tuple(grants), tuple(uris))
        self.clients[client_id] = client
        self.oauth.register_client(client_id, secret, client.redirect_uris)
        return client

    def user_name(self, user_id: Any) -> str | None:
        user = self.users_by_id.get(user_id)
        return f"{user['firstName']} {user['lastName']}" if user else None

    def category_value(self, category_id: Any, key: str) -> Any:
        category = self.categories.get(category_id)
        return category[key] if category else None

    def iso(self, ts: int | None) -> str | None:
        """An API date: ISO-8601 with the installation's offset (``+00:00`` by default)."""
        if ts is None:
            return None
        return dt.datetime.fromtimestamp(ts, self.tz).isoformat()

    def _touch(self) -> None:
        self.version += 1
        self._select_cache.clear()

    def counts(self) -> dict[str, int]:
        """Record counts for the control API."""
        out = {name: len(table) for name, table in self.tables.items()}
        out["campaign_members"] = sum(
            1 for members in self.campaign_leads.values() for m in members.values() if not m.manually_removed
        )
        out["segment_members"] = sum(len(members) for members in self.segment_leads.values())
        out["deleted"] = sum(len(d) for d in self.deleted.values())
        return out

    def summary(self) -> dict[str, Any]:
        """The account as the control API reports it."""
        return {
            "id": self.id,
            "base_path": self.base_path,
            "counts": self.counts(),
            "clients": [c.summary() for c in self.clients.values()],
            "users": [u["username"] for u in self.users.values()],
            "knobs": dict(self.knobs),
        }

    # --- generation ---------------------------------------------------------------------------------------

    def _alloc(self, entity: str) -> int:
        rid = self.next_ids[entity]
        self.next_ids[entity] = rid + 1
        return rid

    def _maybe_modified(self, rng: random.Random, added: int, now: int) -> int | None:
        if rng.random() < 0.55 and now > added:
            return added + 1 + int(rng.random() * (now - added))
        return None

    def _author(self, rng: random.Random) -> int:
        ids = list(self.users_by_id)
        return ids[int(rng.random() * len(ids))]

    def _generate(self, now: int) -> None:
        rng = random.Random(f"mautic:{self.seed}")
        spec = self.spec
        span = max(1, int(spec["days"] * _DAY))
        start = now - span

        def when() -> int:
            return start + int(rng.random() * span)

        for added in sorted(when() for _ in range(spec["segments"])):
            self._new_segment(rng, added, self._maybe_modified(rng, added, now))
        for added in sorted(when() for _ in range(spec["emails"])):
            self._new_email(rng, added, self._maybe_modified(rng, added, now))
        for added in sorted(when() for _ in range(spec["campaigns"])):
            self._new_campaign(rng, added, self._maybe_modified(rng, added, now), now)
        campaign_ids = list(self.tables["campaigns"])
        segment_ids = list(self.tables["segments"])
        for added in sorted(when() for _ in range(spec["contacts"])):
            cid = self._new_contact(rng, added, self._maybe_modified(rng, added, now), now)
            self._generated_memberships(rng, cid, added, now, campaign_ids, segment_ids)
        self._touch()

    def _generated_memberships(
        self, rng: random.Random, lead_id: int, added: int, now: int, campaigns: list[int], segments: list[int]
    ) -> None:
        table = self.tables["campaigns"]
        for cid in rng.sample(campaigns, min(len(campaigns), rng.choice((0, 1, 1, 2, 3)))):
            since = max(added, table[cid].added)
            joined = since + int(rng.random() * max(0, now - since))
            self.campaign_leads.setdefault(cid, {})[lead_id] = _Member(
                joined, manually_removed=rng.random() < 0.05, manually_added=rng.random() < 0.3
            )
        for sid in rng.sample(segments, min(len(segments), rng.choice((0, 1, 1, 2)))):
            self.segment_leads.setdefault(sid, {})[lead_id] = _Member(
                added + int(rng.random() * max(0, now - added)), manually_added=rng.random() < 0.2
            )

    def _publish_fields(self, rng: random.Random, modified: int | None, published: bool) -> dict[str, Any]:
        author = self._author(rng)
        return {
            "isPublished": published,
            "createdBy": author,
            "modifiedBy": self._author(rng) if modified is not None else None,
        }

    def _new_campaign(self, rng: random.Random, added: int, modified: int | None, now: int) -> int:
        rid = self._alloc("campaigns")
        name = f"{rng.choice(_CAMPAIGN_NAMES)} {rid}"
        events: dict[str, dict[str, Any]] = {}
        for order in range(1, rng.choice((1, 2, 2, 3, 4)) + 1):
            etype, event_type, label, props = rng.choice(_EVENTS)
            eid = self.next_event_id
            self.next_event_id += 1
            interval = rng.choice((None, 1, 3, 7))
            events[str(eid)] = {
                "id": eid,
                "type": etype,
                "eventType": event_type,
                "name": label,
                "description": None,
                "order": order,
                "properties": dict(props),
                "triggerDate": None,
                "triggerInterval": interval,
                "triggerIntervalUnit": "d" if interval else None,
                "triggerMode": "interval" if interval else "immediate",
                "children": [],
                "parent": None,
                "decisionPath": None,
            }
        segments = list(self.tables["segments"])
        lists = sorted(rng.sample(segments, min(len(segments), rng.choice((0, 1, 1, 2)))))
        publish_up = publish_down = None
        roll = rng.random()
        if roll < 0.1:
            publish_up = added + int(rng.random() * 30 * _DAY)
        elif roll < 0.2:
            publish_down = added + int(rng.random() * 60 * _DAY)
        fields = {
            "name": name,
            "description": rng.choice((None, f"{name} for new contacts", "Automated journey")),
            **self._publish_fields(rng, modified, rng.random() < 0.7),
            "publishUp": publish_up,
            "publishDown": publish_down,
            "category": rng.choice((None, None, 1, 2, 3)),
            "allowRestart": rng.random() < 0.2,
            "events": events,
            "lists": lists,
        }
        self.tables["campaigns"][rid] = _Record(rid, added, modified, fields)
        return rid

    def _new_segment(self, rng: random.Random, added: int, modified: int | None) -> int:
        rid = self._alloc("segments")
        name = f"{rng.choice(('Newsletter', 'Customers', 'Trial users', 'Leads', 'Webinar'))} {rid}"
        fields = {
            "name": name,
            "publicName": name,
            "alias": _slug(name),
            "description": rng.choice((None, "Built from filters")),
            **self._publish_fields(rng, modified, rng.random() < 0.85),
            "category": rng.choice((None, None, 5)),
            "filters": [
                {
                    "glue": "and",
                    "field": "country",
                    "object": "lead",
                    "type": "country",
                    "operator": "=",
                    "properties": {"filter": rng.choice(_CITIES)[3]},
                }
            ],
            "isGlobal": rng.random() < 0.6,
            "isPreferenceCenter": rng.random() < 0.2,
        }
        self.tables["segments"][rid] = _Record(rid, added, modified, fields)
        return rid

    def _new_email(self, rng: random.Random, added: int, modified: int | None) -> int:
        rid = self._alloc("emails")
        name = f"{rng.choice(('Welcome', 'Monthly news', 'Reminder', 'Offer', 'Follow-up'))} {rid}"
        email_type = rng.choice(("list", "template", "template"))
        sent = rng.randrange(0, 5000) if email_type == "list" else rng.randrange(0, 800)
        segments = list(self.tables["segments"])
        fields = {
            "name": name,
            "subject": f"{name}: news from us",
            "language": rng.choice(("en", "en", "de", "fr")),
            **self._publish_fields(rng, modified, rng.random() < 0.8),
            "category": rng.choice((None, 4, 5)),
            "emailType": email_type,
            "publishUp": None,
            "publishDown": None,
            "sentCount": sent,
            "readCount": int(sent * rng.random() * 0.6),
            "variantSentCount": sent,
            "variantReadCount": 0,
            "revision": 1 + (modified is not None) + rng.randrange(0, 3),
            "customHtml": f"<h1>{name}</h1><p>Hi {{contactfield=firstname}}</p>",
            "lists": sorted(rng.sample(segments, min(len(segments), 1))) if email_type == "list" else [],
        }
        fields["variantReadCount"] = fields["readCount"]
        self.tables["emails"][rid] = _Record(rid, added, modified, fields)
        return rid

    def _new_contact(self, rng: random.Random, added: int, modified: int | None, now: int) -> int:
        rid = self._alloc("contacts")
        anonymous = rng.random() < 0.1
        city, state, zipcode, country, timezone = rng.choice(_CITIES)
        last_active = added + int(rng.random() * max(0, now - added)) if rng.random() < 0.8 else None
        values: dict[str, Any] = {"points": rng.choice((0, 0, 5, 10, 25, 40)), "last_active": last_active}
        if not anonymous:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            values.update(
                {
                    "title": rng.choice((None, "Mr", "Ms", "Dr")),
                    "firstname": first,
                    "lastname": last,
                    "company": rng.choice((None, *_COMPANIES)),
                    "position": rng.choice((None, "CEO", "Marketing lead", "Engineer")),
                    "email": f"{_slug(first)}.{_slug(last)}{rid}@example.com",
                    "phone": f"+1 555 {rng.randrange(1000, 9999)}" if rng.random() < 0.5 else None,
                    "city": city,
                    "state": state,
                    "zipcode": zipcode,
                    "country": country,
                    "timezone": timezone,
                    "preferred_locale": rng.choice(("en_US", "de", "fr", "ja")),
                    "twitter": f"{_slug(first)}{rid}" if rng.random() < 0.2 else None,
                }
            )
        fields = {
            "v": {k: v for k, v in values.items() if v is not None},
            **self._publish_fields(rng, modified, True),
            "owner": self._author(rng) if rng.random() < 0.6 else None,
            "dateIdentified": None if anonymous else added,
            "color": rng.choice((None, None, "ab5959", "4e5e9e")),
            "ip": f"203.0.113.{rng.randrange(1, 255)}" if rng.random() < 0.7 else None,
            "tags": sorted(rng.sample(_TAGS, rng.choice((0, 0, 1, 2)))),
            "dnc": ["email"] if rng.random() < 0.04 else [],
        }
        self.tables["contacts"][rid] = _Record(rid, added, modified, fields)
        return rid

    def create(self, entity: str, added: int, fields: Mapping[str, Any] | None = None) -> _Record:
        """A new record of ``entity`` added at ``added`` (``fields`` override the generated values)."""
        rng, now = self._rng, self.clock()
        if entity == "campaigns":
            rid = self._new_campaign(rng, added, None, now)
        elif entity == "segments":
            rid = self._new_segment(rng, added, None)
        elif entity == "emails":
            rid = self._new_email(rng, added, None)
        else:
            rid = self._new_contact(rng, added, None, now)
        rec = self.tables[entity][rid]
        rec.f["modifiedBy"] = None
        if fields:
            self._apply_fields(entity, rec, fields)
        self._touch()
        if entity == "contacts":
            self._contact_saved(rec, added, created=True)
        return rec

    def _apply_fields(self, entity: str, rec: _Record, fields: Mapping[str, Any]) -> None:
        for key, value in fields.items():
            if key in ("id", "dateAdded"):
                continue
            if key == "dateModified":
                rec.modified = _unix_field(value, "dateModified")
            elif key in ("publishUp", "publishDown", "dateIdentified"):
                rec.f[key] = _unix_field(value, key)
            elif entity == "contacts" and key in {alias for _i, alias, _l, _k, _g in _CONTACT_FIELDS}:
                if key in ("last_active", "attribution_date"):
                    value = _unix_field(value, key)
                if value is None:
                    rec.f["v"].pop(key, None)
                else:
                    rec.f["v"][key] = value
            elif entity == "contacts" and key == "lastActive":
                rec.f["v"]["last_active"] = _unix_field(value, key)
            else:
                rec.f[key] = value

    def update(self, entity: str, rid: int, fields: Mapping[str, Any], at: int) -> _Record:
        """Change a record as a user edit at ``at``: new ``dateModified`` and ``modifiedBy``."""
        rec = self.tables[entity].get(rid)
        if rec is None:
            raise ControlError(404, f"no {entity} record {rid}")
        points = rec.f["v"].get("points", 0) if entity == "contacts" else None
        rec.modified = at
        rec.f["modifiedBy"] = next(iter(self.users_by_id))
        self._apply_fields(entity, rec, fields)
        self._touch()
        if entity == "contacts":
            self._contact_saved(rec, at, created=False)
            view = self._render_contact(rec, False)
            if view["points"] != points:
                change = {"old_points": points, "new_points": view["points"]}
                self._contact_event("mautic.lead_points_change", {"contact": view, "points": change})
        return rec

    # --- API writes -----------------------------------------------------------------------------------------

    def api_user(self, user_id: int | None) -> int:
        """Who an API write is by: the token's user, else (client credentials) the installation's first user."""
        return user_id if user_id is not None else next(iter(self.users_by_id))

    def duplicate_contact(self, fields: Mapping[str, Any]) -> _Record | None:
        """``LeadModel::checkForDuplicateContact``: the oldest contact holding a value the write gives for one of the
        unique identifier fields (compared as MySQL's collation does, case-insensitively), or None."""
        wanted = {alias: str(fields[alias]).casefold() for alias in self.knobs["contact_unique_fields"]
                  if fields.get(alias) not in (None, "")}  # fmt: skip
        if not wanted:
            return None
        contacts = self.tables["contacts"]
        for rid in sorted(contacts):
            values = contacts[rid].f["v"]
            if any(values.get(alias) is not None and str(values[alias]).casefold() == value
                   for alias, value in wanted.items()):  # fmt: skip
                return contacts[rid]
        return None

    def api_create_contact(self, fields: Mapping[str, Any], at: int, user_id: int | None) -> _Record:
        """A contact made through the API: the fields it was given and nothing else (no points, owner, tags or IP),
        created by the API user; its save sends the webhooks a save sends."""
        rid = self._alloc("contacts")
        rec = _Record(rid, at, None, {"v": {"points": 0}, "isPublished": True, "createdBy": self.api_user(user_id),
                                      "modifiedBy": None, "owner": None, "dateIdentified": None, "color": None,
                                      "ip": None, "tags": [], "dnc": []})  # fmt: skip
        self.tables["contacts"][rid] = rec
        self._apply_fields("contacts", rec, fields)
        self._touch()
        self._contact_saved(rec, at, created=True)
        return rec

    def api_campaign_events(
        self, events: list[Any], canvas: Mapping[str, Any], keep: Collection[int] = ()
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """``CampaignModel::setEvents``: the request's events with real ids (an id the campaign has is kept, ``new…``
        or anything else gets a new one), parents linked by the ids the request used, children derived, and the
        canvas's node and connection ids rewritten to match. An event without a name, type or event type fails as
        the database would (500)."""
        real: list[int] = []
        by_given: dict[str, int] = {}
        for event in events:
            if not isinstance(event, dict) or not all(event.get(k) for k in ("name", "type", "eventType")):
                raise _server_error()
            if event["eventType"] not in ("action", "decision", "condition"):
                raise _server_error()
            given = str(event.get("id") or "")
            if given.isdigit() and int(given) in keep:
                rid = int(given)
            else:
                rid = self.next_event_id
                self.next_event_id += 1
            real.append(rid)
            if given:
                by_given[given] = rid

        def ref(value: Any) -> int | None:
            value = value.get("id") if isinstance(value, dict) else value
            return None if value in (None, "") else by_given.get(str(value))

        parents = {rid: ref(event.get("parent")) for event, rid in zip(events, real, strict=True)}
        briefs = {rid: {"id": rid, "name": str(e["name"]), "description": e.get("description"), "type": str(e["type"]),
                        "eventType": str(e["eventType"])} for e, rid in zip(events, real, strict=True)}  # fmt: skip
        stored: dict[str, dict[str, Any]] = {}
        for event, rid in zip(events, real, strict=True):
            when = event.get("triggerDate")
            moment = None if when in (None, "") else parse_datetime(str(when))
            if when not in (None, "") and moment is None:
                raise _server_error()
            interval = event.get("triggerInterval")
            properties = event.get("properties")
            parent = parents[rid]
            stored[str(rid)] = {
                "id": rid,
                "type": str(event["type"]),
                "eventType": str(event["eventType"]),
                "name": str(event["name"]),
                "description": event.get("description"),
                "order": _php_int(event.get("order"), 1),
                "properties": dict(properties) if isinstance(properties, dict) else {},
                "triggerDate": self.iso(moment),
                "triggerInterval": None if interval in (None, "") else _php_int(interval, 0),
                "triggerIntervalUnit": event.get("triggerIntervalUnit") or None,
                "triggerMode": event.get("triggerMode") or None,
                "children": [briefs[child] for child, of in parents.items() if of == rid],
                "parent": briefs[parent] if parent is not None else None,
                "decisionPath": event.get("decisionPath") or None,
            }

        def node(value: Any) -> str:
            return str(by_given.get(str(value), value))

        nodes = [{**n, "id": node(n.get("id"))} for n in _values(canvas.get("nodes")) if isinstance(n, dict)]
        connections = [{**c, "sourceId": node(c.get("sourceId")), "targetId": node(c.get("targetId"))}
                       for c in _values(canvas.get("connections")) if isinstance(c, dict)]  # fmt: skip
        return stored, {"nodes": nodes, "connections": connections}

    def api_create_campaign(self, fields: Mapping[str, Any], lists: Iterable[int], events: list[Any],
                            canvas: Mapping[str, Any] | None, at: int, user_id: int | None) -> _Record:  # fmt: skip
        """``POST /api/campaigns/new`` (checked by the caller): a campaign with its segments as sources and its events
        (set only when the canvas comes with them, as ``CampaignApiController::preSaveEntity`` does), never modified,
        published unless told otherwise (``FormEntity``'s default). Nothing stops a second one like it."""
        stored, drawn = self.api_campaign_events(events, canvas) if canvas is not None else ({}, None)
        rid = self._alloc("campaigns")
        f: dict[str, Any] = {
            "name": None,
            "description": None,
            "isPublished": True,
            "createdBy": self.api_user(user_id),
            "modifiedBy": None,
            "publishUp": None,
            "publishDown": None,
            "category": None,
            "allowRestart": False,
            "events": stored,
            "lists": sorted(set(lists)),
            "canvas": drawn,
        }
        f.update(fields)
        rec = self.tables["campaigns"][rid] = _Record(rid, at, None, f)
        self._touch()
        return rec

    def api_edit_campaign(self, rid: int, fields: Mapping[str, Any], at: int, user_id: int | None, *,
                          lists: Iterable[int] | None = None, events: list[Any] | None = None,
                          canvas: Mapping[str, Any] | None = None, replace: bool = False) -> _Record:  # fmt: skip
        """``PATCH|PUT /api/campaigns/{id}/edit`` (checked by the caller): the fields given; segments given are added
        (PATCH) or become the sources (PUT); PUT's events replace the campaign's (ids it has are kept)."""
        rec = self.tables["campaigns"][rid]
        rec.modified = at
        rec.f["modifiedBy"] = self.api_user(user_id)
        rec.f.update(fields)
        if lists is not None:
            rec.f["lists"] = sorted(set(lists) if replace else set(rec.f["lists"]) | set(lists))
        if replace and events is not None and canvas is not None:
            keep = {int(k) for k in rec.f["events"]}
            rec.f["events"], rec.f["canvas"] = self.api_campaign_events(events, canvas, keep)
        self._touch()
        return rec

    def delete(self, entity: str, rid: int, at: int) -> None:
        """Delete a record (no tombstone in the API; the control export lists its id)."""
        if entity == "contacts":
            # As LeadModel leaves it after the delete: the entity's id is gone, the event names it.
            gone = {**self._render_contact(self.tables[entity][rid], False), "id": None}
            self._contact_event("mautic.lead_post_delete", {"id": rid, "contact": gone})
        del self.tables[entity][rid]
        self.deleted[entity][rid] = at
        if entity == "campaigns":
            self.campaign_leads.pop(rid, None)
            self.contact_counts.pop(rid, None)
        elif entity == "segments":
            self.segment_leads.pop(rid, None)
        elif entity == "contacts":
            for members in (*self.campaign_leads.values(), *self.segment_leads.values()):
                members.pop(rid, None)
        self._touch()

    def apply_changes(self, changes: Mapping[str, int], now: int) -> dict[str, list[int]]:
        """Campaign creates/edits/deletes/(un)publishes, membership joins/leaves and contact changes at ``now``."""
        rng = self._rng
        out: dict[str, list[int]] = {k: [] for k in ("created", "edited", "deleted", "published", "unpublished")}
        out.update({k: [] for k in ("joined", "left", "contacts_created", "contacts_edited", "contacts_deleted")})
        campaigns = self.tables["campaigns"]
        pool = sorted(campaigns)
        rng.shuffle(pool)
        for _ in range(changes.get("creates", 0)):
            out["created"].append(self.create("campaigns", now).id)
        for rid in pool[: changes.get("edits", 0)]:
            rec = campaigns[rid]
            self.update("campaigns", rid, {"description": f"Edited {self.iso(now)}"}, now)
            rec.f["name"] = re.sub(r"( v\d+)?$", f" v{rng.randrange(2, 99)}", rec.f["name"], count=1)
            out["edited"].append(rid)
        pool = pool[changes.get("edits", 0) :]
        flips = (
            (changes.get("publishes", 0), "published", True),
            (changes.get("unpublishes", 0), "unpublished", False),
        )
        for wanted, key, target in flips:
            candidates = [rid for rid in pool if campaigns[rid].f["isPublished"] != target]
            for rid in candidates[:wanted]:
                self.update("campaigns", rid, {"isPublished": target}, now)
                out[key].append(rid)
                pool.remove(rid)
        for rid in pool[: changes.get("deletes", 0)]:
            self.delete("campaigns", rid, now)
            out["deleted"].append(rid)
        contacts = self.tables["contacts"]
        people = sorted(contacts)
        rng.shuffle(people)
        for _ in range(changes.get("contact_creates", 0)):
            rec = self.create("contacts", now)
            rec.f["v"]["last_active"] = now
            out["contacts_created"].append(rec.id)
        for rid in people[: changes.get("contact_edits", 0)]:
            points = contacts[rid].f["v"].get("points", 0) + rng.choice((5, 10, 20))
            self.update("contacts", rid, {"points": points, "last_active": now}, now)
            out["contacts_edited"].append(rid)
        people = people[changes.get("contact_edits", 0) :]
        for rid in people[: changes.get("contact_deletes", 0)]:
            self.delete("contacts", rid, now)
            out["contacts_deleted"].append(rid)
        live_campaigns, live_contacts = sorted(campaigns), sorted(contacts)
        for _ in range(changes.get("joins", 0)):
            if not live_campaigns or not live_contacts:
                break
            cid, lid = rng.choice(live_campaigns), rng.choice(live_contacts)
            self.campaign_leads.setdefault(cid, {})[lid] = _Member(now, manually_added=True)
            out["joined"].append(lid)
        members = [
            (cid, lid) for cid, rows in self.campaign_leads.items() for lid, m in rows.items() if not m.manually_removed
        ]
        rng.shuffle(members)
        for cid, lid in members[: changes.get("leaves", 0)]:
            self.campaign_leads[cid][lid].manually_removed = True
            out["left"].append(lid)
        self._touch()
        return out

    def join(self, campaign_id: int, contact_id: int, at: int) -> bool:
        """``MembershipManager::addContact``: add (or re-add) the contact manually; False if it already was in."""
        members = self.campaign_leads.setdefault(campaign_id, {})
        member = members.get(contact_id)
        if member is not None and not member.manually_removed:
            return False
        if member is None:
            members[contact_id] = _Member(at, manually_added=True)
        else:
            member.manually_removed, member.manually_added, member.exited = False, True, None
            member.rotation += 1
        self._touch()
        return True

    def leave(self, campaign_id: int, contact_id: int, at: int) -> bool:
        """``MembershipManager::removeContact``: mark the membership manually removed; False if it was not in."""
        member = self.campaign_leads.get(campaign_id, {}).get(contact_id)
        if member is None or member.manually_removed:
            return False
        member.manually_removed, member.manually_added, member.exited = True, False, at
        self._touch()
        return True

    @staticmethod
    def anonymous(rec: _Record) -> bool:
        """``Lead::isAnonymous``: no first or last name, company, email or social handle."""
        values = rec.f["v"]
        identities = ("firstname", "lastname", "company", "email", *_SOCIAL_FIELDS)
        return not any(values.get(alias) for alias in identities)

    def _contact_saved(self, rec: _Record, at: int, *, created: bool) -> None:
        """``WebhookSubscriber::onLeadNewUpdate`` after a save: ``…_new`` when the save identifies the contact
        (``Lead::checkDateIdentified`` sets ``dateIdentified`` then), ``…_update`` otherwise, nothing when the
        contact is anonymous."""
        if self.anonymous(rec):
            return
        identified = created or rec.f["dateIdentified"] is None
        if rec.f["dateIdentified"] is None:
            rec.f["dateIdentified"] = at
            self._touch()
        kind = "mautic.lead_post_save_new" if identified else "mautic.lead_post_save_update"
        self._contact_event(kind, {"contact": self._render_contact(rec, False)})

    def _contact_event(self, kind: str, payload: dict[str, Any]) -> None:
        if self.on_contact_event is not None:
            self.on_contact_event(kind, {**payload, "timestamp": self.iso(self.clock())})

    # --- rendering ----------------------------------------------------------------------------------------

    def _publish_view(self, rec: _Record) -> dict[str, Any]:
        f = rec.f
        return {
            "isPublished": bool(f.get("isPublished")),
            "dateAdded": self.iso(rec.added),
            "createdBy": f.get("createdBy"),
            "createdByUser": self.user_name(f.get("createdBy")),
            "dateModified": self.iso(rec.modified),
            "modifiedBy": f.get("modifiedBy") if rec.modified is not None else None,
            "modifiedByUser": self.user_name(f.get("modifiedBy")) if rec.modified is not None else None,
        }

    def _category(self, category_id: Any) -> dict[str, Any] | None:
        category = self.categories.get(category_id)
        return dict(category) if category else None

    def _segment_brief(self, sid: int) -> dict[str, Any]:
        seg = self.tables["segments"].get(sid)
        if seg is None:
            return {"id": sid, "name": None, "alias": None, "description": None}
        return {"id": sid, "name": seg.f["name"], "alias": seg.f["alias"], "description": seg.f["description"]}

    def render(self, entity: str, rec: _Record, *, minimal: bool = False) -> dict[str, Any]:
        """A record in the API's shape (``minimal`` swaps the *Details serializer group for *List)."""
        if entity == "campaigns":
            return self._render_campaign(rec, minimal)
        if entity == "contacts":
            return self._render_contact(rec, minimal)
        if entity == "segments":
            return self._render_segment(rec, minimal)
        return self._render_email(rec, minimal)

    def _render_campaign(self, rec: _Record, minimal: bool) -> dict[str, Any]:
        f = rec.f
        pub = self._publish_view(rec)
        out: dict[str, Any] = {"id": rec.id, "name": f["name"], "description": f["description"]}
        out["isPublished"] = pub.pop("isPublished")
        if not minimal:
            out["publishUp"] = self.iso(f["publishUp"])
            out["publishDown"] = self.iso(f["publishDown"])
        out.update(pub)
        out["category"] = self._category(f["category"])
        if minimal:
            return out
        out["allowRestart"] = bool(f["allowRestart"])
        out["events"] = {k: dict(v) for k, v in f["events"].items()} or []
        out["forms"] = []
        out["lists"] = {str(sid): self._segment_brief(sid) for sid in f["lists"]} or []
        nodes = [
            {"id": str(e["id"]), "positionX": str(200 * i), "positionY": "150"}
            for i, e in enumerate(f["events"].values())
        ]
        out["canvasSettings"] = f.get("canvas") or {"nodes": nodes, "connections": []}
        return out

    def _render_segment(self, rec: _Record, minimal: bool) -> dict[str, Any]:
        f = rec.f
        out = self._publish_view(rec)
        out.update({"id": rec.id, "name": f["name"], "publicName": f["publicName"], "alias": f["alias"]})
        out["description"] = f["description"]
        out["category"] = self._category(f["category"])
        if not minimal:
            out["filters"] = [dict(x) for x in f["filters"]]
            out["isGlobal"] = bool(f["isGlobal"])
            out["isPreferenceCenter"] = bool(f["isPreferenceCenter"])
        return out

    def _render_email(self, rec: _Record, minimal: bool) -> dict[str, Any]:
        f = rec.f
        out = self._publish_view(rec)
        out.update({"id": rec.id, "name": f["name"], "subject": f["subject"], "language": f["language"]})
        out["category"] = self._category(f["category"])
        if minimal:
            return out
        out.update(
            {
                "fromAddress": None,
                "fromName": None,
                "replyToAddress": None,
                "bccAddress": None,
                "customHtml": f["customHtml"],
                "plainText": None,
                "template": None if f["emailType"] == "list" else "blank",
                "emailType": f["emailType"],
                "publishUp": self.iso(f["publishUp"]),
                "publishDown": self.iso(f["publishDown"]),
                "readCount": f["readCount"],
                "sentCount": f["sentCount"],
                "revision": f["revision"],
                "assetAttachments": [],
                "variantStartDate": None,
                "variantSentCount": f["variantSentCount"],
                "variantReadCount": f["variantReadCount"],
                "variantParent": None,
                "variantChildren": [],
                "translationParent": None,
                "translationChildren": [],
                "unsubscribeForm": None,
                "dynamicContent": [{"tokenName": None, "content": None, "filters": []}],
                "lists": [
                    {
                        "createdByUser": self.user_name(self.tables["segments"][sid].f["createdBy"])
                        if sid in self.tables["segments"]
                        else None,
                        "modifiedByUser": None,
                        **self._segment_brief(sid),
                    }
                    for sid in f["lists"]
                ],
            }
        )
        return out

    def _contact_fields(self, rec: _Record, only: set[str] | None = None) -> dict[str, Any]:
        values = rec.f["v"]
        groups: dict[str, dict[str, Any]] = {g: {} for g in _FIELD_GROUPS}
        flat: dict[str, Any] = {"id": rec.id}
        for fid, alias, label, kind, group in _CONTACT_FIELDS:
            if only is not None and alias not in only:
                continue
            value = values.get(alias)
            if kind == "datetime":
                value = _db_datetime(value)
            groups[group][alias] = {
                "id": str(fid),
                "label": label,
                "alias": alias,
                "type": kind,
                "group": group,
                "object": "lead",
                "is_fixed": "1",
                "default_value": None,
                "value": value,
                "normalizedValue": value,
            }
            flat[alias] = value
        out: dict[str, Any] = {g: (fields or []) for g, fields in groups.items()}
        out["all"] = flat
        return out

    def _render_contact(self, rec: _Record, minimal: bool, only: set[str] | None = None) -> dict[str, Any]:
        f = rec.f
        pub = self._publish_view(rec)
        out: dict[str, Any] = {"id": rec.id}
        out.update({k: pub[k] for k in ("dateAdded", "createdBy", "createdByUser", "dateModified")})
        out.update({k: pub[k] for k in ("modifiedBy", "modifiedByUser", "isPublished")})
        owner = self.users_by_id.get(f["owner"])
        if not minimal:
            out["owner"] = (
                {
                    "id": owner["id"],
                    "username": owner["username"],
                    "firstName": owner["firstName"],
                    "lastName": owner["lastName"],
                }
                if owner
                else None
            )
        out["points"] = f["v"].get("points", 0)
        if not minimal:
            out["lastActive"] = self.iso(f["v"].get("last_active"))
            out["dateIdentified"] = self.iso(f["dateIdentified"])
        out["color"] = f["color"]
        if not minimal:
            ip = f["ip"]
            details = dict.fromkeys(("city", "region", "country", "latitude", "longitude", "isp", "organization"), "")
            out["ipAddresses"] = {ip: {"ipAddress": ip, "ipDetails": {**details, "timezone": ""}}} if ip else []
        out["fields"] = self._contact_fields(rec, only)
        if minimal:
            return out
        out["tags"] = [{"id": _TAGS.index(t) + 1, "tag": t} for t in f["tags"]]
        out["utmtags"] = []
        out["stage"] = None
        out["preferredProfileImage"] = "gravatar"
        out["doNotContact"] = [
            {
                "id": rec.id * 10 + i,
                "dateAdded": self.iso(rec.modified or rec.added),
                "reason": 1,
                "comments": "Unsubscribed",
                "channel": channel,
                "channelId": None,
            }
            for i, channel in enumerate(f["dnc"], start=1)
        ]
        out["frequencyRules"] = []
        return out

    # --- queries ------------------------------------------------------------------------------------------

    def column(self, entity: str, name: str) -> _Column:
        """The column ``name`` (optionally ``alias.name``) of ``entity``; unknown → 500 as Doctrine's error would."""
        text = str(name).strip()
        if "." in text:
            alias, text = text.split(".", 1)
            if alias == _CATEGORY_ALIASES.get(entity) and entity != "contacts" and alias != _ALIASES[entity]:
                col = _CATEGORY_COLUMNS.get(text)
                if col is None:
                    raise _server_error()
                return col
            if alias != _ALIASES[entity]:
                raise _server_error()
        columns = _COLUMNS[entity]
        if entity in _ORM_ONLY:
            col = columns.get(text)
        elif entity == "contacts":
            col = columns.get(text) or columns.get(_snake(text))
        else:
            col = columns.get(text) or columns.get(_camel(text))
        if col is None:
            raise _server_error()
        return col

    def where(self, entity: str, clauses: Any, columns: Callable[[str], _Column] | None = None) -> list[Predicate]:
        """Predicates of a ``where[]`` array (Doctrine expressions; ``andX``/``orX`` nest)."""
        resolve = columns or (lambda name: self.column(entity, name))
        preds: list[Predicate] = []
        for clause in _values(clauses):
            if not isinstance(clause, dict):
                raise _server_error()
            if "internal" in clause:
                continue
            expr = clause.get("expr")
            if expr in ("andX", "orX"):
                subs = self.where(entity, clause.get("val") or clause.get("value") or {}, columns)
                if subs:
                    combine = all if expr == "andX" else any
                    preds.append(lambda row, subs=subs, combine=combine: combine(p(row) for p in subs))
                continue
            col = clause.get("col") or clause.get("column")
            if not expr or not col or not isinstance(expr, str) or not isinstance(col, str):
                raise _server_error()
            if expr not in _DOCTRINE_EXPRS:
                continue
            pred = _predicate(self, expr, resolve(col), clause.get("value", clause.get("val", "")))
            if pred is not None:
                preds.append(pred)
        return preds

    def search(self, entity: str, text: str, user_id: int | None) -> list[Predicate]:
        """Predicates of a search string: words (AND, ``OR`` between groups), ``!`` negation, quotes, commands."""
        groups: list[list[Predicate]] = [[]]
        for match in re.finditer(r'(!?)(?:([\w.]+):)?(?:"([^"]*)"|(\S+))', text.replace("(", " ").replace(")", " ")):
            negate, command, quoted, bare = match.groups()
            if not command and not quoted and bare and bare.upper() == "OR":
                groups.append([])
                continue
            if not command and not quoted and bare and bare.upper() == "AND":
                continue
            value = quoted if quoted is not None else bare or ""
            strict = quoted is not None
            pred = self._search_term(entity, (command or "").lower(), value, strict, user_id)
            if negate:
                groups[-1].append(lambda row, p=pred: not p(row))
            else:
                groups[-1].append(pred)
        groups = [g for g in groups if g]
        if not groups:
            return []
        if len(groups) == 1:
            return groups[0]
        return [lambda row: any(all(p(row) for p in g) for g in groups)]

    def _search_term(self, entity: str, command: str, value: str, strict: bool, user_id: int | None) -> Predicate:
        prefix = value if strict or "%" in value else f"{value}%"
        if command == "ids":
            ids = {_php_int(v, 0) for v in value.split(",")}
            return lambda r: r.id in ids
        if command == "is":
            word = value.lower()
            if word in ("published", "unpublished") and entity != "contacts":
                want = word == "published"
                return lambda r: bool(r.f.get("isPublished")) == want
            if word == "uncategorized" and entity != "contacts":
                return lambda r: r.f.get("category") is None
            if word == "mine":
                key = "owner" if entity == "contacts" else "createdBy"
                return lambda r: r.f.get(key) == user_id
            if word == "unowned" and entity == "contacts":
                return lambda r: r.f.get("owner") is None
            if word == "anonymous" and entity == "contacts":
                return lambda r: r.f.get("dateIdentified") is None
        if command == "category" and entity != "contacts":
            pattern = _like(prefix)
            return lambda r: pattern_match(pattern, self.category_value(r.f.get("category"), "alias"))
        if entity == "contacts" and command:
            return self._contact_command(command, value, prefix)
        if command:
            value, strict = f"{command}:{value}", True
        pattern = _like(value if strict or "%" in value else f"%{value}%")
        columns = [self.column(entity, name) for name in _CATCH_ALL[entity]]

        def catch_all(r: _Record) -> bool:
            for col in columns:
                stored = col.get(self, r)
                if stored is not None and pattern.match(str(stored)):
                    return True
            return False

        return catch_all

    def _contact_command(self, command: str, value: str, prefix: str) -> Predicate:
        pattern = _like(prefix)

        def text_match(*aliases: str) -> Predicate:
            return lambda r: any(pattern_match(pattern, r.f["v"].get(a)) for a in aliases)

        if command == "name":
            return text_match("firstname", "lastname")
        if command in {alias for _i, alias, _l, _k, _g in _CONTACT_FIELDS}:
            return text_match(command)
        if command == "segment":
            members = {
                sid: rows
                for sid, rows in self.segment_leads.items()
                if pattern.match(self.tables["segments"][sid].f["alias"])
            }
            return lambda r: any(r.id in rows and not rows[r.id].manually_removed for rows in members.values())
        if command == "owner":
            owners = {
                u["id"] for u in self.users.values() if pattern.match(u["username"]) or pattern.match(u["lastName"])
            }
            return lambda r: r.f.get("owner") in owners
        if command == "tag":
            return lambda r: any(pattern.match(t) for t in r.f["tags"])
        literal = _like(f"{command}:{value}")
        return lambda r: any(pattern_match(literal, r.f["v"].get(a)) for a in _CATCH_ALL["contacts"])

    def order_keys(self, entity: str, params: Mapping[str, Any]) -> list[tuple[_Column, bool]]:
        """(column, descending) pairs from ``order[]`` or ``orderBy``/``orderByDir``, else the entity's default."""
        order = params.get("order")
        if isinstance(order, dict) and order:
            keys = []
            for clause in _values(order):
                if not isinstance(clause, dict) or not clause.get("col"):
                    raise _server_error()
                direction = str(clause.get("dir") or "ASC").upper()
                keys.append((self.column(entity, str(clause["col"])), direction == "DESC"))
            return keys
        order_by = params.get("orderBy")
        if isinstance(order_by, str) and order_by not in ("", "0"):
            direction = str(params.get("orderByDir") or "ASC").upper()
            if direction not in ("ASC", "DESC"):
                raise _server_error()
            return [(self.column(entity, part.strip()), direction == "DESC") for part in order_by.split(",")]
        if entity == "contacts":
            return [(_COLUMNS["contacts"]["last_active"], True)]
        return []

    def select_ids(
        self,
        entity: str,
        preds: list[Predicate],
        order: list[tuple[_Column, bool]],
        signature: tuple[Any, ...],
    ) -> list[int]:
        """Ids matching ``preds`` in ``order`` (ties by id), cached per data version so paging costs one slice."""
        key = (entity, signature, self.version)
        hit = self._select_cache.get(key)
        if hit is not None:
            self._select_cache.move_to_end(key)
            return hit
        table = self.tables[entity]
        rows = [r for r in table.values() if all(p(r) for p in preds)] if preds else list(table.values())
        rows.sort(key=lambda r: r.id)
        for col, desc in reversed(order):

            def sort_key(r: _Record, col: _Column = col) -> tuple[int, Any]:
                value = _comparable(col.kind, col.get(self, r))
                return (0, 0) if value is None else (1, value)

            rows.sort(key=sort_key, reverse=desc)
        ids = [r.id for r in rows]
        self._select_cache[key] = ids
        while len(self._select_cache) > 32:
            self._select_cache.popitem(last=False)
        return ids

    def list_entities(self, entity: str, params: Mapping[str, Any], user_id: int | None) -> dict[str, Any]:
        """``GET /api/{entities}``: ``{"total": ..., "<entityNameMulti>": {"<id>": {...}}}``."""
        now = self.clock()
        preds: list[Predicate] = []
        if _php_truthy(params.get("published")):
            preds.append(lambda r: bool(r.f.get("isPublished")))
        search = params.get("search")
        if isinstance(search, str) and search.strip():
            preds.extend(self.search(entity, search, user_id))
        where = params.get("where")
        order = self.order_keys(entity, params)
        # Paging by id (`id gt <last>` in id order, as connectors do) is a slice of the ids matching the rest,
        # which are selected once per data version: a database's index, not a scan of every row per page.
        floor = None
        if isinstance(where, dict) and order == [(self.column(entity, "id"), False)]:
            where, floor = _split_id_floor(where)
        if isinstance(where, dict):
            preds.extend(self.where(entity, where))
        signature = (
            _php_truthy(params.get("published")),
            search if isinstance(search, str) else "",
            orjson.dumps(where if isinstance(where, dict) else {}),
            orjson.dumps(params.get("order") if isinstance(params.get("order"), dict) else {}),
            str(params.get("orderBy") or ""),
            str(params.get("orderByDir") or ""),
            user_id if isinstance(search, str) and "mine" in search else None,
        )
        ids = self.select_ids(entity, preds, order, signature)
        if floor is not None:
            ids = ids[bisect.bisect_left(ids, floor) :]
            signature = (*signature, floor)
        start = max(0, _php_int(params.get("start"), 0))
        limit = _php_int(params.get("limit"), self.knobs["default_pagelimit"])
        if limit < 0:
            raise _server_error()
        page = ids[start : start + limit] if limit else ids[start:]
        minimal = _php_truthy(params.get("minimal"))
        select = [str(s) for s in _values(params.get("select"))] if isinstance(params.get("select"), dict) else []
        with_counts = entity == "campaigns" and str(params.get("withContactCounts", "")).lower() in ("1", "true")
        table = self.tables[entity]
        records: dict[str, Any] = {}
        for rid in page:
            rec = table[rid]
            if select and entity == "contacts":
                view = self._render_contact(rec, minimal, set(select))
            else:
                view = self.render(entity, rec, minimal=minimal)
            if with_counts:
                count, fetched = self._contact_count(rid, now)
                view["contactCount"] = count
                view["contactCountFetchedAt"] = self.iso(fetched)
            if select:
                wanted = {"id", *select}
                view = {k: v for k, v in view.items() if v is not None and (entity == "contacts" or k in wanted)}
            records[str(rid)] = view
        total = self._total(entity, signature, len(ids), now)
        body: dict[str, Any] = {"total": str(total) if self.knobs["total_as_string"][entity] else total}
        body[_MULTI[entity]] = records or ({} if self.knobs["empty_as_object"][entity] else [])
        return body

    def _total(self, entity: str, signature: tuple[Any, ...], actual: int, now: int) -> int:
        ttl = self.knobs["total_count_ttl"]
        if not ttl or entity != "contacts":
            return actual
        key = (entity, signature)
        cached = self.total_cache.get(key)
        if cached is not None and now - cached[1] < ttl:
            return cached[0]
        self.total_cache[key] = (actual, now)
        return actual

    def _contact_count(self, campaign_id: int, now: int) -> tuple[int, int]:
        cached = self.contact_counts.get(campaign_id)
        if cached is not None and now - cached[1] < self.knobs["contact_count_ttl"]:
            return cached
        members = self.campaign_leads.get(campaign_id, {})
        fresh = (sum(1 for m in members.values() if not m.manually_removed), now)
        self.contact_counts[campaign_id] = fresh
        return fresh

    def get_entity(self, entity: str, rid: int) -> dict[str, Any]:
        """``GET /api/{entities}/{id}``: ``{"<entityNameOne>": {...}}``."""
        rec = self.tables[entity].get(rid)
        if rec is None:
            raise ApiError(404, MSG_NOT_FOUND)
        return {_ONE[entity]: self.render(entity, rec)}

    def campaign_contacts(self, campaign_id: int, params: Mapping[str, Any]) -> dict[str, Any]:
        """``GET /api/campaigns/{id}/contacts``: ``campaign_leads`` stats rows of strings, a list (``[]`` if empty)."""
        if campaign_id not in self.tables["campaigns"]:
            raise ApiError(404, MSG_NOT_FOUND)
        total, rows = self._member_rows(params, campaign_id=campaign_id, default_limit=CAMPAIGN_CONTACTS_LIMIT)
        return {"total": total, "contacts": rows}

    def stats(self, table: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """``GET /api/stats/{table}`` (``StatsApiController``): ``{"total", "stats": [rows]}``; an unknown table
        answers the tables and columns there are. Two are kept: ``campaign_leads`` (every campaign membership row,
        the manually removed ones included) and ``lead_lists_leads`` (segment memberships)."""
        if table == "lead_lists_leads":
            total, rows = self._segment_member_rows(params)
            return {"total": total, "stats": rows}
        if table != "campaign_leads":
            return {
                "availableTables": ["campaign_leads", "lead_lists_leads"],
                "tableColumns": {"campaign_leads": list(_MEMBER_COLUMNS),
                                 "lead_lists_leads": list(_SEGMENT_MEMBER_COLUMNS)},
            }  # fmt: skip
        total, rows = self._member_rows(params, campaign_id=None, default_limit=CAMPAIGN_CONTACTS_LIMIT)
        return {"total": total, "stats": rows}

    def _segment_member_rows(self, params: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """``lead_lists_leads`` rows matching ``where[]``, sorted by ``order[]``, one ``start``/``limit`` page: the
        total (a string, as DBAL counts it) and the rows (strings)."""
        segments, leads = _member_keys(params.get("where"))
        wanted = sorted(self.segment_leads) if segments is None else sorted(segments & set(self.segment_leads))
        rows = (
            (sid, lid, members[lid])
            for sid in wanted
            for members in (self.segment_leads[sid],)
            for lid in (sorted(members) if leads is None else sorted(lead for lead in leads if lead in members))
        )
        total, page = self._stats_page(params, _SEGMENT_MEMBER_COLUMNS, "segments", rows, CAMPAIGN_CONTACTS_LIMIT)
        return total, [
            {
                "leadlist_id": str(sid),
                "lead_id": str(lid),
                "date_added": _db_datetime(m.added),
                "manually_removed": "1" if m.manually_removed else "0",
                "manually_added": "1" if m.manually_added else "0",
            }
            for sid, lid, m in page
        ]

    def _stats_page(
        self, params: Mapping[str, Any], columns: Mapping[str, _Column], kind: str, rows: Iterable[tuple[Any, ...]],
        default_limit: int,
    ) -> tuple[str, list[tuple[Any, ...]]]:  # fmt: skip
        """A stats table's rows matching ``where[]`` (over ``columns``), sorted by ``order[]``, one
        ``start``/``limit`` page: the total (a string, as DBAL counts it) and the page; an unknown column is the
        server error Mautic gives."""

        def resolve(name: str) -> _Column:
            col = columns.get(name.split(".", 1)[-1])
            if col is None:
                raise _server_error()
            return col

        where = params.get("where")
        preds = self.where(kind, where, resolve) if isinstance(where, dict) else []
        kept = [row for row in rows if all(p(row) for p in preds)]
        order = params.get("order")
        for clause in reversed(_values(order) if isinstance(order, dict) else []):
            if not isinstance(clause, dict) or not clause.get("col"):
                raise _server_error()
            col = resolve(str(clause["col"]))
            desc = str(clause.get("dir") or "ASC").upper() == "DESC"
            kept.sort(
                key=lambda row, col=col: (0, 0) if col.get(self, row) is None else (1, col.get(self, row)), reverse=desc
            )
        start = max(0, _php_int(params.get("start"), 0))
        limit = max(0, _php_int(params.get("limit"), default_limit))
        return str(len(kept)), kept[start : start + limit]

    def segment_join(self, segment_id: int, contact_id: int, at: int) -> bool:
        """``ListModel::addLead`` (manual): add or re-add the contact; False if it already was in. No webhook, and
        the contact's ``dateModified`` stays (Mautic does not save the contact)."""
        members = self.segment_leads.setdefault(segment_id, {})
        member = members.get(contact_id)
        if member is not None and not member.manually_removed:
            return False
        members[contact_id] = _Member(at, manually_added=True)
        self._touch()
        return True

    def segment_leave(self, segment_id: int, contact_id: int, at: int) -> bool:
        """``ListModel::removeLead`` (manual): the row stays, manually removed; False if it was not in."""
        member = self.segment_leads.get(segment_id, {}).get(contact_id)
        if member is None or member.manually_removed:
            return False
        member.manually_removed, member.manually_added = True, False
        self._touch()
        return True

    def _member_rows(
        self, params: Mapping[str, Any], *, campaign_id: int | None, default_limit: int
    ) -> tuple[str, list[dict[str, Any]]]:
        """``campaign_leads`` rows matching ``where[]``, sorted by ``order[]``, one ``start``/``limit`` page: the
        total (a string, as DBAL counts it) and the rows (strings). One campaign's hide manual removals."""
        campaigns = [campaign_id] if campaign_id is not None else sorted(self.campaign_leads)
        rows = (
            (cid, lid, m)
            for cid in campaigns
            for lid, m in sorted(self.campaign_leads.get(cid, {}).items())
            if not (campaign_id is not None and m.manually_removed)
        )
        total, page = self._stats_page(params, _MEMBER_COLUMNS, "campaigns", rows, default_limit)
        return total, [
            {
                "campaign_id": str(cid),
                "lead_id": str(lid),
                "date_added": _db_datetime(m.added),
                "manually_removed": "1" if m.manually_removed else "0",
                "manually_added": "1" if m.manually_added else "0",
                "date_last_exited": _db_datetime(m.exited),
                "rotation": str(m.rotation),
            }
            for cid, lid, m in page
        ]

    def _published_now(self, rec: _Record, now: int) -> bool:
        f = rec.f
        return (
            bool(f.get("isPublished"))
            and (f.get("publishUp") is None or f["publishUp"] <= now)
            and (f.get("publishDown") is None or f["publishDown"] >= now)
        )

    def contact_campaigns(self, contact_id: int) -> dict[str, Any]:
        """``GET /api/contacts/{id}/campaigns``: published campaigns the contact is in (``[]`` when none)."""
        if contact_id not in self.tables["contacts"]:
            raise ApiError(404, MSG_NOT_FOUND)
        now = self.clock()
        out: dict[str, Any] = {}
        for cid, rec in sorted(self.tables["campaigns"].items()):
            member = self.campaign_leads.get(cid, {}).get(contact_id)
            if member is None or member.manually_removed or not self._published_now(rec, now):
                continue
            item: dict[str, Any] = {"id": cid, "name": rec.f["name"]}
            if rec.f["lists"]:
                item["listMembership"] = list(rec.f["lists"])
            item.update(
                {
                    "dateAdded": self.iso(member.added),
                    "manuallyRemoved": member.manually_removed,
                    "manuallyAdded": member.manually_added,
                }
            )
            out[str(cid)] = item
        return {"total": len(out), "campaigns": out or []}

    def contact_segments(self, contact_id: int) -> dict[str, Any]:
        """``GET /api/contacts/{id}/segments``: the segments the contact is in (``[]`` when none)."""
        if contact_id not in self.tables["contacts"]:
            raise ApiError(404, MSG_NOT_FOUND)
        out: dict[str, Any] = {}
        for sid, rec in sorted(self.tables["segments"].items()):
            member = self.segment_leads.get(sid, {}).get(contact_id)
            if member is None or member.manually_removed:
                continue
            out[str(sid)] = {
                "id": sid,
                "name": rec.f["name"],
                "alias": rec.f["alias"],
                "dateAdded": self.iso(member.added),
                "manuallyRemoved": member.manually_removed,
                "manuallyAdded": member.manually_added,
            }
        return {"total": len(out), "segments": out or []}

    def export(self, entity: str) -> dict[str, Any]:
        """Every current record in full API shape, and the ids deleted so far."""
        if entity == "segment_contacts":
            return {"records": self._segment_member_rows({"limit": str(10**9)})[1], "deleted_ids": []}
        if entity == "campaign_contacts":
            rows = []
            for cid in sorted(self.campaign_leads):
                rows.extend(self.campaign_contacts(cid, {"limit": str(10**9)})["contacts"])
            return {"records": rows, "deleted_ids": []}
        entity = _entity_of(entity)
        table = self.tables[entity]
        return {
            "records": [self.render(entity, table[rid]) for rid in sorted(table)],
            "deleted_ids": sorted(self.deleted[entity]),
        }


def _split_id_floor(where: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """``where[]`` without its top-level ``id gt|gte <integer>`` clauses, and the least id they leave (None: no
    such clause). Anything else (nested, non-integer, other operators) stays a predicate."""
    kept: dict[str, Any] = {}
    floor: int | None = None
    for key, clause in where.items():
        column = (clause.get("col") or clause.get("column")) if isinstance(clause, dict) else None
        if column == "id" and "internal" not in clause:
            expr, value = clause.get("expr"), str(clause.get("value", clause.get("val", ""))).strip()
            if expr in ("gt", "gte") and re.fullmatch(r"-?\d+", value):
                bound = int(value) + (1 if expr == "gt" else 0)
                floor = bound if floor is None else max(floor, bound)
                continue
        kept[key] = clause
    return kept, floor


def _member_keys(where: Any) -> tuple[set[int] | None, set[int] | None]:
    """The segment ids and contact ids a ``lead_lists_leads`` query's top-level ``leadlist_id`` / ``lead_id``
    ``eq`` or ``in`` clauses allow (None: any), looked up as a database's primary key would be instead of
    scanning every membership. The clauses still filter the rows found; one that is not plain integers narrows
    nothing."""
    found: dict[str, set[int]] = {}
    for clause in _values(where) if isinstance(where, dict) else []:
        if not isinstance(clause, dict) or "internal" in clause or clause.get("expr") not in ("eq", "in"):
            continue
        column = str(clause.get("col") or clause.get("column") or "").split(".", 1)[-1]
        raw = clause.get("value", clause.get("val", ""))
        if column not in ("leadlist_id", "lead_id") or isinstance(raw, dict):
            continue
        items = _csv(html.unescape(str(raw))) if clause["expr"] == "in" else [str(raw).strip()]
        if not items or not all(re.fullmatch(r"\d+", item.strip()) for item in items):
            continue
        values = {int(item) for item in items}
        found[column] = found[column] & values if column in found else values
    return found.get("leadlist_id"), found.get("lead_id")
