"""An emulated BillionMail installation: its data model, deterministic generation, auth state and changes."""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from nextcrm_sandbox.billionmail.wire import (
    _CAPTCHA_SOURCE,
    _DAY,
    ACCESS_TTL,
    CAPTCHA_TTL,
    CONTACT_MAX_PAGE_SIZE,
    ISSUER,
    LOGIN_BLOCK_SECONDS,
    MAX_LOGIN_RETRIES,
    REFRESH_TTL,
    SEND_RATE_PER_THREAD,
    _jwt_decode,
    _jwt_encode,
    _to_int,
    _Token,
    _TokenError,
)
from nextcrm_sandbox.control import ControlError, int_field, number_field

# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


class _Rng(random.Random):
    """``random.Random`` with cheaper picks for bulk generation (fully determined by the seed)."""

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.random() * len(seq))]

    def between(self, start: int, stop: int) -> int:
        """An int in ``[start, stop)``."""
        return start + int(self.random() * (stop - start))


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)


def _fails(n: int, rate: float) -> int:
    return _floor(n * rate)


@dataclass(slots=True, eq=False)
class _Task:
    """One ``email_tasks`` row plus the delivery timeline that drives its counters on the clock."""

    id: int
    task_name: str
    addresser: str
    subject: str
    full_name: str
    template_id: int
    group_ids: tuple[int, ...]
    recipients: list[str]
    threads: int
    rate: float  # mails a second while running
    start_time: int
    create_time: int
    update_time: int
    remark: str = ""
    is_record: int = 1
    unsubscribe: int = 1
    track_open: int = 1
    track_click: int = 1
    active: int = 1
    add_type: int = 0
    warmup: int = 0
    pause: int = 0
    pauses: list[list[int | None]] = field(default_factory=list)  # [paused_at, resumed_at or None]
    forced_done: int | None = None
    fail_rate: float = 0.03  # share of sends that bounce or are deferred
    bounce_share: float = 0.7  # share of those failures that bounce
    open_rate: float = 0.3  # share of delivered mails opened
    click_rate: float = 0.05  # share of delivered mails clicked
    salt: int = 0

    @property
    def recipient_count(self) -> int:
        return len(self.recipients)

    def running_seconds(self, t: float) -> float:
        """Seconds spent sending between ``start_time`` and ``t`` (pauses excluded)."""
        if t <= self.start_time:
            return 0.0
        total = t - self.start_time
        for begin, end in self.pauses:
            assert begin is not None
            lo = max(begin, self.start_time)
            hi = t if end is None else min(end, t)
            if hi > lo:
                total -= hi - lo
        return max(0.0, total)

    def sent(self, t: float) -> int:
        """Mails handed to Postfix by time ``t``."""
        total = self.recipient_count
        if self.forced_done is not None and t >= self.forced_done:
            return total
        if self.rate <= 0:
            return 0
        return min(total, _floor(self.running_seconds(t) * self.rate))

    def process(self, now: float) -> int:
        """``task_process``: 0 pending, 1 processing, 2 done, 3 paused."""
        if self.pause:
            return 3
        if now < self.start_time:
            return 0
        if self.sent(now) >= self.recipient_count:
            return 2
        return 1

    def split(self, n: int) -> tuple[int, int, int]:
        """(delivered, bounced, deferred) among the first ``n`` sends."""
        failed = _fails(n, self.fail_rate)
        bounced = _floor(failed * self.bounce_share)
        return n - failed, bounced, failed - bounced

    def opened(self, delivered: int) -> int:
        """Distinct opens among ``delivered`` mails (none without open tracking)."""
        return _floor(delivered * self.open_rate) if self.track_open else 0

    def clicked(self, delivered: int) -> int:
        """Distinct clicks among ``delivered`` mails (none without click tracking)."""
        return _floor(delivered * self.click_rate) if self.track_click else 0

    def category(self, k: int) -> str:
        """What became of the ``k``-th send (0-based): ``sent``, ``bounced`` or ``deferred``."""
        if _fails(k + 1, self.fail_rate) == _fails(k, self.fail_rate):
            return "sent"
        j = _fails(k, self.fail_rate)
        if _floor((j + 1) * self.bounce_share) > _floor(j * self.bounce_share):
            return "bounced"
        return "deferred"

    def send_time(self, k: int) -> float:
        """Wall time of the ``k``-th send."""
        target = (k + 1) / self.rate if self.rate > 0 else math.inf
        t = float(self.start_time)
        elapsed = 0.0
        for begin, end in sorted(self.pauses, key=lambda p: p[0] or 0):
            assert begin is not None
            if begin < t:
                if end is not None and end > t:
                    t = float(end)
                continue
            room = begin - t
            if elapsed + room >= target:
                break
            elapsed += room
            if end is None:
                return math.inf
            t = float(end)
        at = t + (target - elapsed)
        if self.forced_done is not None and at > self.forced_done:
            return float(self.forced_done)
        return at


@dataclass(slots=True, eq=False)
class _Group:
    id: int
    name: str
    description: str
    create_time: int
    update_time: int
    token: str
    double_optin: int = 0


@dataclass(slots=True, eq=False)
class _Contact:
    """One ``bm_contacts`` row: an email in one group."""

    id: int
    email: str
    group_id: int
    active: int  # 1 subscribed, 0 unsubscribed
    status: int  # 1 confirmed, 0 unconfirmed
    create_time: int
    attribs: dict[str, str]
    task_id: int = 0
    last_active_at: int = 0


@dataclass(slots=True, eq=False)
class _Template:
    id: int
    temp_name: str
    add_type: int
    create_time: int
    update_time: int


@dataclass(slots=True, eq=False)
class _ApiKey:
    """One ``api_templates`` row: a send-API key bound to an email template, with its own IP whitelist."""

    id: int
    api_key: str
    api_name: str
    template_id: int
    subject: str
    addresser: str
    full_name: str
    active: int
    ip_whitelist: list[str]
    create_time: int
    update_time: int


@dataclass
class Knobs:
    """Per-install behaviour (durations in seconds). Defaults are the stock BillionMail configuration."""

    token_ttl: int = ACCESS_TTL
    refresh_ttl: int = REFRESH_TTL
    # Whether a refresh answers a new refresh token (the source does; not documented by BillionMail).
    refresh_rotates: bool = True
    # Failed logins from one IP after which the captcha is required (the source: 1; 0 turns it off).
    captcha_after_failures: int = 1
    max_login_retries: int = MAX_LOGIN_RETRIES
    login_block_seconds: int = LOGIN_BLOCK_SECONDS
    # SafePath: None = off; else "/api/*" needs the session of a visit to "/<safe_path>".
    safe_path: str | None = None
    # Console IP whitelist: None = off; else these IPs (plus 127.0.0.1 and ::1, as the source adds).
    ip_whitelist: list[str] | None = None
    # The client IP the install sees when a request has no X-Forwarded-For / X-Real-IP header.
    client_ip: str | None = None
    # IP whitelist of the key given as ``api_key`` (empty = any IP).
    api_key_ip_whitelist: list[str] = field(default_factory=list)
    send_rate_per_thread: float = SEND_RATE_PER_THREAD
    # ``/api/contact/list`` without ``status`` → 412 (the fact sheet); False = defaults to 1 like ``default:"1"``.
    contact_status_required: bool = True
    contact_max_page_size: int = CONTACT_MAX_PAGE_SIZE
    # ``task/update`` leaves ``update_time`` alone in the source; True bumps it on edits.
    edit_touches_update_time: bool = False


_KNOB_NAMES = tuple(f.name for f in fields(Knobs))


def _ip_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ControlError(400, f"{name} must be a list of IP strings")
    return list(value)


def _apply_knobs(knobs: Knobs, body: Mapping[str, Any]) -> Knobs:
    """A copy of ``knobs`` with the knob fields of ``body`` validated and applied."""
    out = Knobs(**{k: (list(v) if isinstance(v, list) else v) for k, v in asdict(knobs).items()})
    for name in ("token_ttl", "refresh_ttl"):
        if name in body:
            setattr(out, name, int_field(body, name, 0, 1))
    for name in ("captcha_after_failures", "max_login_retries", "login_block_seconds"):
        if name in body:
            setattr(out, name, int_field(body, name, 0, 0))
    if "contact_max_page_size" in body:
        out.contact_max_page_size = int_field(body, "contact_max_page_size", 0, 1)
    for name in ("refresh_rotates", "contact_status_required", "edit_touches_update_time"):
        if name in body:
            if not isinstance(body[name], bool):
                raise ControlError(400, f"{name} must be a boolean")
            setattr(out, name, body[name])
    if "safe_path" in body:
        value = body["safe_path"]
        if value in (None, "", False):
            out.safe_path = None
        elif isinstance(value, str) and value.strip("/") and "/" not in value.strip("/"):
            out.safe_path = value.strip("/")
        else:
            raise ControlError(400, "safe_path must be a single path segment or null")
    if "ip_whitelist" in body:
        value = body["ip_whitelist"]
        out.ip_whitelist = None if value in (None, False) else _ip_list(value, "ip_whitelist")
    if "client_ip" in body:
        value = body["client_ip"]
        if value is not None and not (isinstance(value, str) and value):
            raise ControlError(400, "client_ip must be an IP string or null")
        out.client_ip = value
    if "api_key_ip_whitelist" in body:
        out.api_key_ip_whitelist = _ip_list(body["api_key_ip_whitelist"], "api_key_ip_whitelist")
    if "send_rate_per_thread" in body:
        out.send_rate_per_thread = number_field(body, "send_rate_per_thread", SEND_RATE_PER_THREAD, 0.0)
        if out.send_rate_per_thread <= 0:
            raise ControlError(400, "send_rate_per_thread must be > 0")
    return out


# ---------------------------------------------------------------------------------------------------------
# Generation vocabulary
# ---------------------------------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _words(
    "Ada Alan Grace Linus Margaret Dennis Barbara Ken Radia Tim Frances Guido Hedy John Katherine Donald "
    "Edsger Annie Brian Shafi Sophie Yukihiro Anders Rasmus Joan Niklaus Leslie Carol Bjarne Mary"
)
_LAST = _words(
    "Lovelace Turing Hopper Torvalds Hamilton Ritchie Liskov Thompson Perlman Berners Allen Rossum Lamarr "
    "McCarthy Johnson Knuth Dijkstra Easley Kernighan Goldwasser Wilson Matsumoto Hejlsberg Lerdorf Clarke "
    "Wirth Lamport Shaw Stroustrup Keller"
)
_DOMAINS = _words(
    "gmail.com gmail.com gmail.com outlook.com hotmail.com yahoo.com icloud.com proton.me fastmail.com "
    "acme.io globex.com initech.co umbrella.org hooli.xyz"
)
_GROUP_NAMES = (
    "Newsletter",
    "Customers",
    "Leads",
    "VIP",
    "Webinar attendees",
    "Trial users",
    "Partners",
    "Events",
    "Beta testers",
    "Win-back",
    "Press",
    "Investors",
)
_TEMPLATES = ("Welcome series", "Monthly newsletter", "Product launch", "Re-engagement", "Event invitation")
_SUBJECT_OPENERS = (
    "Your {month} update",
    "What's new in {month}",
    "Last chance: {offer}",
    "Introducing {product}",
    "{offer} for our subscribers",
    "Join us: {event}",
    "We miss you - {offer}",
    "Tips to get more from {product}",
)
_MONTHS = _words("January February March April May June July August September October November December")
_OFFERS = ("20% off annual plans", "free shipping", "early access", "a bonus month", "double points")
_PRODUCTS = ("NextCRM Flow", "Pipelines 2.0", "the mobile app", "Smart Segments", "the new dashboard")
_EVENTS = ("our spring webinar", "the customer summit", "office hours", "the product AMA")
_PROVIDERS = {
    "gmail.com": ("Gmail", "gmail-smtp-in.l.google.com[142.250.27.26]:25"),
    "outlook.com": ("Outlook", "outlook-com.olc.protection.outlook.com[52.101.68.10]:25"),
    "hotmail.com": ("Outlook", "hotmail-com.olc.protection.outlook.com[52.101.9.3]:25"),
    "yahoo.com": ("Yahoo", "mta7.am0.yahoodns.net[67.195.204.77]:25"),
    "icloud.com": ("iCloud", "mx01.mail.icloud.com[17.57.154.6]:25"),
}


def _subject(rng: _Rng) -> str:
    return rng.pick(_SUBJECT_OPENERS).format(
        month=rng.pick(_MONTHS), offer=rng.pick(_OFFERS), product=rng.pick(_PRODUCTS), event=rng.pick(_EVENTS)
    )


def _provider(email: str) -> tuple[str, str]:
    domain = email.rsplit("@", 1)[-1].lower()
    return _PROVIDERS.get(domain, ("Other", f"mx.{domain}[203.0.113.25]:25"))


def _queue_id(task: _Task, k: int) -> str:
    digest = hashlib.blake2b(f"{task.salt}:{task.id}:{k}".encode(), digest_size=8).hexdigest().upper()
    return digest[:12]


# ---------------------------------------------------------------------------------------------------------
# One installation
# ---------------------------------------------------------------------------------------------------------


class BillionMailInstall:
    """One BillionMail installation: its credentials, tokens, sessions, contacts, groups and tasks."""

    def __init__(self, spec: Mapping[str, Any], *, now: int) -> None:
        self.spec = dict(spec)
        self.id: str = spec["id"]
        self.username: str = spec["username"]
        self.password: str = spec["password"]
        self.seed: int = spec["seed"]
        self.knobs: Knobs = spec["knobs"]
        self.domain = f"mail{abs(self.seed) % 1000}.example.com"
        self.secret = hashlib.sha256(f"billionmail-jwt:{self.id}:{self.seed}".encode()).digest()
        self.created_at = now
        self.tasks: dict[int, _Task] = {}
        self.groups: dict[int, _Group] = {}
        self.contacts: dict[int, _Contact] = {}
        self.by_email: dict[str, list[int]] = {}
        self.templates: dict[int, _Template] = {}
        self.api_keys: dict[int, _ApiKey] = {}
        self.api_mails: list[dict[str, Any]] = []
        self.deleted_task_ids: list[int] = []
        self.deleted_contact_ids: list[int] = []
        self.deleted_emails: list[str] = []
        self.deleted_group_ids: list[int] = []
        self.next_task_id = 1
        self.next_contact_id = 1
        self.next_group_id = 1
        self.next_api_id = 1
        self.tokens: dict[str, _Token] = {}
        self.retries: dict[str, tuple[int, int]] = {}  # ip -> (failures, expires_at)
        self.release: dict[str, tuple[int, int]] = {}  # ip -> (release_time, expires_at)
        self.captchas: dict[str, tuple[str, int]] = {}
        self.sessions: dict[str, tuple[bool, int]] = {}
        self.contact_version = 0
        self.task_version = 0
        self._contact_cache: dict[tuple[Any, ...], list[_Contact]] = {}
        self._task_cache: dict[tuple[Any, ...], list[_Task]] = {}
        self._group_counts_cache: tuple[int, dict[int, tuple[int, int]]] | None = None
        self._change_round = 0
        self.stats: Counter[str] = Counter()
        self._generate(now)

    # --- generation -----------------------------------------------------------------------------------------

    def _generate(self, now: int) -> None:
        spec = self.spec
        days = float(spec["days"])
        horizon = int(days * _DAY)
        t0 = now - horizon
        rng = _Rng(f"billionmail:{self.seed}:setup")
        for i, name in enumerate(_TEMPLATES, start=1):
            created = t0 - rng.between(2 * _DAY, 60 * _DAY)
            self.templates[i] = _Template(i, name, i % 2, created, created + rng.between(0, _DAY))
        n_groups = spec["groups"]
        for i in range(n_groups):
            created = t0 - rng.between(_DAY, 90 * _DAY)
            base = _GROUP_NAMES[i % len(_GROUP_NAMES)]
            name = base if i < len(_GROUP_NAMES) else f"{base} {i // len(_GROUP_NAMES) + 1}"
            self._add_group(
                name, f"{name} list", created, token=hashlib.md5(f"{self.id}:{i}".encode()).hexdigest()[:12]
            )
        members = self._generate_contacts(spec["contacts"], t0, horizon)
        self._generate_tasks(spec["campaigns"], t0, horizon, now, members)
        if spec.get("api_key"):
            self._add_api_key(str(spec["api_key"]), 1, list(self.knobs.api_key_ip_whitelist), t0, "Default API")

    def _add_group(self, name: str, description: str, created: int, token: str | None = None) -> _Group:
        gid = self.next_group_id
        self.next_group_id += 1
        group = _Group(gid, name, description, created, created, token or secrets.token_hex(6))
        self.groups[gid] = group
        self.contact_version += 1
        return group

    def _add_api_key(self, key: str, template_id: int, ips: list[str], created: int, name: str) -> _ApiKey:
        api = _ApiKey(
            id=self.next_api_id,
            api_key=key,
            api_name=name,
            template_id=template_id,
            subject="Your message from NextCRM",
            addresser=f"noreply@{self.domain}",
            full_name="NextCRM",
            active=1,
            ip_whitelist=ips,
            create_time=created,
            update_time=created,
        )
        self.next_api_id += 1
        self.api_keys[api.id] = api
        return api

    def _generate_contacts(self, count: int, t0: int, horizon: int) -> dict[int, tuple[list[int], list[str]]]:
        """Contacts in create order; returns each group's active members as (create times, emails)."""
        rng = _Rng(f"billionmail:{self.seed}:contacts")
        group_ids = list(self.groups)
        members: dict[int, tuple[list[int], list[str]]] = {gid: ([], []) for gid in group_ids}
        if not group_ids:
            return members
        times = sorted(t0 + int(rng.random() * horizon) for _ in range(count))
        many = len(group_ids) > 1
        for i, created in enumerate(times):
            first, last = rng.pick(_FIRST), rng.pick(_LAST)
            email = f"{first.lower()}.{last.lower()}{i + 1}@{rng.pick(_DOMAINS)}"
            active = 0 if rng.random() < 0.12 else 1
            status = 1 if rng.random() < 0.9 else 0
            attribs = {"first_name": first, "last_name": last} if rng.random() < 0.7 else {}
            g1 = rng.pick(group_ids)
            chosen = [g1]
            if many and rng.random() < 0.12:
                g2 = rng.pick(group_ids)
                if g2 != g1:
                    chosen.append(g2)
            for gid in chosen:
                self._insert_contact(email, gid, active, status, created, dict(attribs))
                if active:
                    members[gid][0].append(created)
                    members[gid][1].append(email)
        return members

    def _insert_contact(
        self, email: str, gid: int, active: int, status: int, created: int, attribs: dict[str, str]
    ) -> _Contact:
        row = _Contact(self.next_contact_id, email, gid, active, status, created, attribs)
        self.next_contact_id += 1
        self.contacts[row.id] = row
        self.by_email.setdefault(email, []).append(row.id)
        self.contact_version += 1
        return row

    def _snapshot(self, group_ids: Iterable[int], at: float | None = None) -> list[str]:
        """The recipients a task to the groups gets (``GetActiveContacts``): subscribed and confirmed contacts
        (created by ``at``), deduplicated like ``InsertIgnore``."""
        out: list[str] = []
        for gid in group_ids:
            rows = sorted(
                (
                    r
                    for r in self.contacts.values()
                    if r.group_id == gid and r.active == 1 and r.status == 1 and (at is None or r.create_time <= at)
                ),
                key=lambda r: r.id,
            )
            out.extend(r.email for r in rows)
        return list(dict.fromkeys(out))

    def _generate_tasks(
        self, count: int, t0: int, horizon: int, now: int, members: Mapping[int, tuple[list[int], list[str]]]
    ) -> None:
        rng = _Rng(f"billionmail:{self.seed}:campaigns")
        group_ids = list(self.groups)
        if not group_ids or count == 0:
            return
        plan = ["done"] * count
        if count >= 4:
            extra = {"pending": 0.08, "processing": 0.08, "paused": 0.06}
            recent = list(range(count // 2, count))
            rng.shuffle(recent)
            pos = 0
            for status, share in extra.items():
                for _ in range(max(1, round(count * share))):
                    if pos < len(recent):
                        plan[recent[pos]] = status
                        pos += 1
        creates = sorted(t0 + int(rng.random() * horizon) for _ in range(count))
        drafts: list[_Task] = []
        per_thread = self.knobs.send_rate_per_thread
        for i, created in enumerate(creates):
            gids = [rng.pick(group_ids)]
            if len(group_ids) > 1 and rng.random() < 0.2:
                other = rng.pick(group_ids)
                if other not in gids:
                    gids.append(other)
            recipients: list[str] = []
            for gid in gids:
                times, emails = members[gid]
                recipients.extend(emails[: bisect.bisect_right(times, created)])
            if len(gids) > 1:
                recipients = list(dict.fromkeys(recipients))
            threads = rng.pick((1, 2, 5, 5, 5, 10))
            status = plan[i] if recipients else "done"
            rate = threads * per_thread
            total = len(recipients)
            start = created + rng.pick((0, 0, 60, 600, 3600, 6 * 3600))
            pauses: list[list[int | None]] = []
            if status == "pending":
                start = now + rng.between(600, 3 * _DAY)
            elif status == "processing":
                frac = 0.1 + 0.8 * rng.random()
                remaining = rng.between(3600, 6 * 3600)
                rate = total * (1 - frac) / remaining if total else rate
                start = now - int(frac * total / rate) if total else now
            elif status == "paused":
                frac = 0.1 + 0.8 * rng.random()
                rate = total / rng.between(3600, 6 * 3600)
                ran = int(frac * total / rate)
                start = min(start, now - ran - rng.between(60, 3600))
                pauses.append([start + ran, None])
            else:
                duration = math.ceil(total / rate) if total else 0
                if start + duration > now:
                    start = now - duration - rng.between(60, 3600)
            created = min(created, start)
            fail_rate = 0.01 + 0.07 * rng.random()
            open_rate = 0.15 + 0.3 * rng.random()
            drafts.append(
                _Task(
                    id=0,
                    task_name=f"task_{created}",
                    addresser=rng.pick(("news", "hello", "marketing", "team")) + f"@{self.domain}",
                    subject=_subject(rng),
                    full_name=rng.pick(("NextCRM", "NextCRM Team", "The NextCRM Newsletter")),
                    template_id=rng.between(1, len(self.templates) + 1),
                    group_ids=tuple(gids),
                    recipients=recipients,
                    threads=threads,
                    rate=rate,
                    start_time=start,
                    create_time=created,
                    update_time=created,
                    remark=rng.pick(("", "", "", "A/B subject test", "Quarterly send")),
                    pause=1 if status == "paused" else 0,
                    pauses=pauses,
                    fail_rate=fail_rate,
                    bounce_share=0.5 + 0.4 * rng.random(),
                    open_rate=open_rate,
                    click_rate=open_rate * (0.1 + 0.25 * rng.random()),
                    salt=self.seed,
                )
            )
        drafts.sort(key=lambda t: t.create_time)
        for task in drafts:
            task.id = self.next_task_id
            self.next_task_id += 1
            self.tasks[task.id] = task
        self.task_version += 1

    # --- counters and views ----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Object counts for the control API."""
        return {
            "campaigns": len(self.tasks),
            "contacts": len(self.by_email),
            "contact_rows": len(self.contacts),
            "groups": len(self.groups),
            "templates": len(self.templates),
            "api_keys": len(self.api_keys),
        }

    def _group_counts(self) -> dict[int, tuple[int, int]]:
        """(subscribed, unsubscribed) rows per group, cached until contacts change."""
        if self._group_counts_cache is not None and self._group_counts_cache[0] == self.contact_version:
            return self._group_counts_cache[1]
        out: dict[int, list[int]] = {gid: [0, 0] for gid in self.groups}
        for r in self.contacts.values():
            slot = out.setdefault(r.group_id, [0, 0])
            slot[0 if r.active else 1] += 1
        result = {gid: (a, u) for gid, (a, u) in out.items()}
        self._group_counts_cache = (self.contact_version, result)
        return result

    def task_detail(self, task: _Task, now: float) -> dict[str, Any]:
        """A ``TaskDetail`` row of ``task/list``."""
        counts = self._group_counts()
        sent = task.sent(now)
        delivered, bounced, deferred = task.split(sent)
        total = task.recipient_count
        template = self.templates.get(task.template_id)
        groups = []
        for gid in task.group_ids:
            group = self.groups.get(gid)
            if group is not None:
                groups.append(
                    {
                        "id": group.id,
                        "name": group.name,
                        "description": group.description,
                        "count": counts.get(gid, (0, 0))[0],
                    }
                )
        return {
            **self.task_entity(task, now, with_warmup=False),
            "estimated_time_with_warmup": 0,
            "groups": groups,
            "sent_count": sent,
            "unsent_count": max(0, total - sent),
            "progress": min(100, int(sent / total * 100)) if total else 0,
            "template_name": template.temp_name if template else "",
            "success_count": delivered,
            "error_count": bounced + deferred,
            "deferred": deferred,
        }

    def task_entity(self, task: _Task, now: float, *, with_warmup: bool = True) -> dict[str, Any]:
        """The ``email_tasks`` row as ``task/find`` returns it."""
        out = {
            "id": task.id,
            "task_name": task.task_name,
            "addresser": task.addresser,
            "subject": task.subject,
            "full_name": task.full_name,
            "recipient_count": task.recipient_count,
            "task_process": task.process(now),
            "pause": task.pause,
            "template_id": task.template_id,
            "is_record": task.is_record,
            "unsubscribe": task.unsubscribe,
            "threads": task.threads,
            "etypes": ",".join(str(g) for g in task.group_ids),
            "track_open": task.track_open,
            "track_click": task.track_click,
            "start_time": task.start_time,
            "create_time": task.create_time,
            "update_time": task.update_time,
            "remark": task.remark,
            "active": task.active,
            "add_type": task.add_type,
        }
        if with_warmup:
            out["warmup"] = task.warmup
        return out

    def ordered_tasks(self, keyword: str) -> list[_Task]:
        """Tasks matching ``keyword`` (``task_name`` or ``subject`` LIKE) by ``create_time DESC``."""
        key = (keyword, self.task_version)
        cached = self._task_cache.get(key)
        if cached is None:
            rows = [t for t in self.tasks.values() if not keyword or keyword in t.task_name or keyword in t.subject]
            rows.sort(key=lambda t: (t.create_time, t.id), reverse=True)
            self._task_cache = {k: v for k, v in self._task_cache.items() if k[1] == self.task_version}
            self._task_cache[key] = rows
            cached = rows
        return cached

    def contact_view(self, row: _Contact, status: int) -> dict[str, Any]:
        """A row of ``contact/list``: the email's listed row with its groups for this ``status``."""
        groups = sorted(
            {self.contacts[i].group_id for i in self.by_email.get(row.email, ()) if self.contacts[i].active == status}
        )
        group = self.groups.get(row.group_id)
        return {
            "id": row.id,
            "email": row.email,
            "group_id": row.group_id,
            "active": row.active,
            "task_id": row.task_id,
            "create_time": row.create_time,
            "groups": [{"id": g, "name": self.groups[g].name} for g in groups if g in self.groups],
            "status": row.status,
            "group_name": group.name if group else "",
            "attribs": dict(row.attribs),
            "last_active_at": row.last_active_at,
            "tags": [],
        }

    def ordered_contacts(self, group_id: int, keyword: str, status: int) -> list[_Contact]:
        """One row per email among the matching rows, by ``create_time`` DESC (``GetContactsWithPage``).

        The row an email is listed under is its newest (``DISTINCT ON (email) ... ORDER BY email,
        create_time DESC``); rows created in the same second are a tie Postgres breaks at will: here the
        lowest id. An email added to another group later is then listed under that group's row.
        """
        key = ("list", self.contact_version, group_id, keyword, status)
        cached = self._contact_cache.get(key)
        if cached is None:
            chosen: dict[str, _Contact] = {}
            for row in self.contacts.values():
                if row.active != status or (group_id > 0 and row.group_id != group_id):
                    continue
                if keyword and keyword not in row.email:
                    continue
                held = chosen.get(row.email)
                if held is None or (row.create_time, -row.id) > (held.create_time, -held.id):
                    chosen[row.email] = row
            cached = sorted(chosen.values(), key=lambda r: (r.create_time, r.id), reverse=True)
            self._contact_cache = {k: v for k, v in self._contact_cache.items() if k[1] == self.contact_version}
            self._contact_cache[key] = cached
        return cached

    def group_view(self, group: _Group) -> dict[str, Any]:
        """A ``ContactGroupInfo`` row of ``contact/group/list``."""
        active, unsub = self._group_counts().get(group.id, (0, 0))
        return {
            **self.group_entity(group),
            "total_count": active + unsub,
            "active_count": active,
            "unsubscribe_count": unsub,
            "subscribe_link": "",
            "sender": "",
        }

    @staticmethod
    def group_entity(group: _Group) -> dict[str, Any]:
        """A ``ContactGroup`` as ``contact/group/all`` returns it."""
        return {
            "id": group.id,
            "name": group.name,
            "description": group.description,
            "create_time": group.create_time,
            "update_time": group.update_time,
            "token": group.token,
            "double_optin": group.double_optin,
            "welcome_mail_html": "",
            "welcome_mail_drag": "",
            "welcome_subject": "",
            "send_welcome_email": 0,
            "confirm_subject": "",
            "confirm_mail_html": "",
            "confirm_mail_drag": "",
            "success_url": "",
            "confirm_url": "",
            "already_url": "",
            "subscribe_form": "",
            "unsubscribe_mail_html": "",
            "unsubscribe_mail_drag": "",
            "unsubscribe_subject": "",
            "unsubscribe_redirect_url": "",
            "send_unsubscribe_email": 0,
        }

    @staticmethod
    def api_key_view(api: _ApiKey) -> dict[str, Any]:
        """An ``ApiTemplates`` row with its IP whitelist."""
        return {
            "id": api.id,
            "api_key": api.api_key,
            "api_name": api.api_name,
            "template_id": api.template_id,
            "subject": api.subject,
            "addresser": api.addresser,
            "full_name": api.full_name,
            "unsubscribe": 0,
            "track_open": 1,
            "track_click": 1,
            "active": api.active,
            "create_time": api.create_time,
            "update_time": api.update_time,
            "expire_time": 0,
            "last_key_update_time": api.create_time,
            "ip_whitelist": list(api.ip_whitelist),
        }

    def log_row(self, task: _Task, k: int) -> dict[str, Any]:
        """The Postfix log row (``mailstat_send_mails``) of the ``k``-th send."""
        recipient = task.recipients[k]
        category = task.category(k)
        provider, relay = _provider(recipient)
        at = task.send_time(k)
        delay: float | int = round(0.2 + (k % 17) * 0.13, 2)
        delay = int(delay) if float(delay).is_integer() else delay
        if category == "sent":
            dsn, description = "2.0.0", f"250 2.0.0 Ok: queued as {_queue_id(task, k + 7919)}"
        elif category == "bounced":
            dsn, description = "5.1.1", "550 5.1.1 The email account that you tried to reach does not exist"
        else:
            dsn, description = "4.7.0", "421 4.7.0 Try again later, closing connection"
        return {
            "postfix_message_id": _queue_id(task, k),
            "status": category,
            "recipient": recipient,
            "mail_provider": provider,
            "delay": delay,
            "delays": f"0.01/0/{round(delay / 3, 2)}/{round(delay * 2 / 3, 2)}",
            "dsn": dsn,
            "relay": relay,
            "description": description,
            "log_time": int(at),
        }

    # --- auth state ------------------------------------------------------------------------------------------

    def issue(self, subject: str, ttl: int, now: int, roles: list[str] | None) -> str:
        """Sign an access or refresh token (``GenerateToken`` / ``GenerateRefreshToken``) and remember it."""
        jti = secrets.token_hex(16)
        claims: dict[str, Any] = {"accountId": 1, "username": self.username, "roles": roles, "apiToken": False}
        claims.update({"iss": ISSUER, "sub": subject, "exp": now + ttl, "nbf": now, "iat": now, "jti": jti})
        self.tokens[jti] = _Token(subject, now + ttl)
        return _jwt_encode(claims, self.secret)

    def parse(self, token: str, now: int) -> dict[str, Any]:
        """``ParseToken``: signature, ``exp``/``nbf`` on the sandbox clock, the logout blacklist."""
        claims = _jwt_decode(token.removeprefix("Bearer "), self.secret)
        record = self.tokens.get(str(claims.get("jti")))
        exp = _to_int(claims.get("exp"))
        if record is not None:
            exp = min(exp, record.expires_at)
        if exp and now >= exp:
            raise _TokenError("token has invalid claims: token is expired")
        if _to_int(claims.get("nbf")) > now:
            raise _TokenError("token has invalid claims: token is not valid yet")
        if record is None or record.revoked:
            raise _TokenError("invalid token")
        return claims

    def expire_tokens(self, now: int, refresh: bool) -> int:
        """Make live access tokens (and refresh tokens too with ``refresh``) expire now; returns how many."""
        n = 0
        for record in self.tokens.values():
            if record.expires_at > now and (refresh or record.subject == "access_token"):
                record.expires_at = now
                n += 1
        return n

    def failures(self, ip: str, now: int) -> int | None:
        """Failed logins cached for ``ip`` (None when nothing is cached: no captcha needed)."""
        entry = self.retries.get(ip)
        if entry is None or entry[1] <= now:
            self.retries.pop(ip, None)
            return None
        return entry[0]

    def new_captcha(self, now: int) -> tuple[str, str]:
        """A captcha (id, answer) valid for three minutes."""
        cid = secrets.token_urlsafe(15)
        answer = "".join(secrets.choice(_CAPTCHA_SOURCE) for _ in range(4))
        self.captchas = {k: v for k, v in self.captchas.items() if v[1] > now}
        self.captchas[cid] = (answer, now + CAPTCHA_TTL)
        return cid, answer

    def verify_captcha(self, cid: str, answer: str, now: int) -> bool:
        """Check and consume a captcha, right or wrong (the store verifies with clear=true)."""
        entry = self.captchas.pop(cid, None)
        return entry is not None and entry[1] > now and entry[0] == answer

    def session_passed(self, sid: str | None, now: int) -> bool:
        """Whether the session visited the SafePath within the session lifetime."""
        if not sid:
            return False
        entry = self.sessions.get(sid)
        return entry is not None and entry[0] and entry[1] > now

    # --- mutations ------------------------------------------------------------------------------------------

    def create_task(
        self,
        *,
        now: int,
        addresser: str,
        subject: str,
        full_name: str,
        template_id: int,
        group_ids: Sequence[int],
        start_time: int,
        threads: int = 5,
        is_record: int = 1,
        unsubscribe: int = 1,
        track_open: int = 1,
        track_click: int = 1,
        warmup: int = 0,
        remark: str = "",
        recipients: list[str] | None = None,
        rng: _Rng | None = None,
    ) -> _Task:
        """Insert a task with its frozen recipient list (``CreateTaskWithRecipients``)."""
        rng = rng or _Rng(f"billionmail:{self.seed}:task:{self.next_task_id}")
        rcpts = self._snapshot(group_ids) if recipients is None else recipients
        open_rate = 0.15 + 0.3 * rng.random()
        task = _Task(
            id=self.next_task_id,
            task_name=f"task_{now}",
            addresser=addresser,
            subject=subject,
            full_name=full_name,
            template_id=template_id,
            group_ids=tuple(group_ids),
            recipients=rcpts,
            threads=threads,
            rate=max(threads, 1) * self.knobs.send_rate_per_thread,
            start_time=start_time,
            create_time=now,
            update_time=now,
            remark=remark,
            is_record=is_record,
            unsubscribe=unsubscribe,
            track_open=track_open,
            track_click=track_click,
            warmup=warmup,
            fail_rate=0.01 + 0.07 * rng.random(),
            bounce_share=0.5 + 0.4 * rng.random(),
            open_rate=open_rate,
            click_rate=open_rate * (0.1 + 0.25 * rng.random()),
            salt=self.seed,
        )
        self.next_task_id += 1
        self.tasks[task.id] = task
        self.task_version += 1
        return task

    def delete_task(self, task_id: int) -> bool:
        """Remove a task for good (``DeleteTask``); False when there was none."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return False
        self.deleted_task_ids.append(task_id)
        self.task_version += 1
        return True

    def pause_task(self, task: _Task, now: int) -> None:
        """Stop sending now: ``pause`` 1, ``task_process`` 3."""
        task.pause = 1
        task.pauses.append([now, None])

    def resume_task(self, task: _Task, now: int) -> None:
        """Continue sending from now."""
        task.pause = 0
        for interval in task.pauses:
            if interval[1] is None:
                interval[1] = now

    def edit_task(self, task: _Task, now: int) -> None:
        """Record an edit of a task's fields (``update_time`` only moves when the knob says so)."""
        self.task_version += 1
        if self.knobs.edit_touches_update_time:
            task.update_time = now

    def delete_email(self, email: str) -> list[int]:
        """Delete every row of an email; returns the row ids."""
        ids = self.by_email.pop(email, [])
        for rid in ids:
            self.contacts.pop(rid, None)
        if ids:
            self.deleted_contact_ids.extend(ids)
            self.deleted_emails.append(email)
            self.contact_version += 1
        return ids

    def drop_contact_rows(self, ids: Iterable[int]) -> int:
        """Delete contact rows by id, keeping ``by_email`` in step; returns how many there were."""
        dropped = 0
        for rid in ids:
            row = self.contacts.pop(rid, None)
            if row is None:
                continue
            dropped += 1
            self.deleted_contact_ids.append(rid)
            remaining = [r for r in self.by_email.get(row.email, ()) if r != rid]
            if remaining:
                self.by_email[row.email] = remaining
            else:
                self.by_email.pop(row.email, None)
                self.deleted_emails.append(row.email)
        if dropped:
            self.contact_version += 1
        return dropped

    def delete_group(self, gid: int) -> bool:
        """``DeleteContactsByGroupId`` then ``DeleteGroup``; False when there was no such group."""
        if gid not in self.groups:
            return False
        self.drop_contact_rows([rid for rid, row in self.contacts.items() if row.group_id == gid])
        del self.groups[gid]
        self.deleted_group_ids.append(gid)
        self.contact_version += 1
        return True

    def update_group(self, gid: int, changes: Mapping[str, Any], now: int) -> None:
        """``UpdateGroup``: the given fields and ``update_time`` (a missing group: nothing to update)."""
        group = self.groups.get(gid)
        if group is None:
            return
        for name, value in changes.items():
            setattr(group, name, value)
        group.update_time = now
        self.contact_version += 1

    def edit_contact(
        self, email: str, active: int, group_ids: Sequence[int], attribs: dict[str, str] | None, now: int
    ) -> None:
        """``EditContacts``: with groups, the email's rows are deleted and created again, one per group, at
        ``now`` (new ids), keeping its newest row's confirmation and, unless new ones are given, attributes;
        without groups nothing is written."""
        if not group_ids:
            return
        rows = sorted((self.contacts[r] for r in self.by_email.get(email, ())), key=lambda r: r.id)
        newest = rows[-1] if rows else None
        final = attribs if attribs is not None else dict(newest.attribs) if newest is not None else {}
        status = newest.status if newest is not None else 0
        self.drop_contact_rows([r.id for r in rows])
        for gid in group_ids:
            self._insert_contact(email, gid, active, status, now, dict(final))

    def apply_changes(self, changes: Mapping[str, int], now: int) -> dict[str, list[Any]]:
        """Creates, edits, deletes and progress of tasks, and contact creates/unsubscribes/deletes, at ``now``."""
        self._change_round += 1
        rng = _Rng(f"billionmail:{self.seed}:changes:{self._change_round}")
        out: dict[str, list[Any]] = {
            "created": [],
            "edited": [],
            "deleted": [],
            "progressed": [],
            "contacts_created": [],
            "contacts_unsubscribed": [],
            "contacts_deleted": [],
        }
        group_ids = list(self.groups)
        for _ in range(changes.get("contact_creates", 0)):
            if not group_ids:
                break
            first, last = rng.pick(_FIRST), rng.pick(_LAST)
            email = f"{first.lower()}.{last.lower()}.n{self.next_contact_id}@{rng.pick(_DOMAINS)}"
            row = self._insert_contact(email, rng.pick(group_ids), 1, 1, now, {"first_name": first, "last_name": last})
            out["contacts_created"].append(row.id)
        for _ in range(changes.get("creates", 0)):
            if not group_ids:
                break
            gids = [rng.pick(group_ids)]
            task = self.create_task(
                now=now,
                addresser=f"news@{self.domain}",
                subject=_subject(rng),
                full_name="NextCRM",
                template_id=rng.between(1, len(self.templates) + 1),
                group_ids=gids,
                start_time=now + rng.pick((0, 0, 60, 600, 3600)),
                threads=rng.pick((1, 2, 5, 5, 10)),
                rng=rng,
            )
            out["created"].append(task.id)
        created = set(out["created"])
        existing = [tid for tid in self.tasks if tid not in created]
        for tid in self._sample(rng, existing, changes.get("edits", 0)):
            task = self.tasks[tid]
            if rng.random() < 0.6:
                task.subject = _subject(rng)
            else:
                task.remark = rng.pick(("Resent to openers", "Subject updated", "Internal note", "Q3 campaign"))
            self.edit_task(task, now)
            out["edited"].append(tid)
        edited = set(out["edited"])
        candidates = [tid for tid in self.tasks if tid not in created and tid not in edited]
        for tid in self._sample(rng, candidates, changes.get("deletes", 0)):
            self.delete_task(tid)
            out["deleted"].append(tid)
        movable = [t for t in self.tasks.values() if t.id not in created and t.process(now) in (0, 1, 3)]
        for task in self._sample(rng, movable, changes.get("progress", 0)):
            state = task.process(now)
            if state == 0:
                task.start_time = now
            elif state == 3:
                self.resume_task(task, now)
            else:
                task.forced_done = now
            out["progressed"].append(task.id)
        subscribed = sorted({r.email for r in self.contacts.values() if r.active == 1})
        for email in self._sample(rng, subscribed, changes.get("contact_unsubscribes", 0)):
            for rid in self.by_email.get(email, ()):
                self.contacts[rid].active = 0
            self.contact_version += 1
            out["contacts_unsubscribed"].append(min(self.by_email[email]))
        emails = sorted(self.by_email)
        for email in self._sample(rng, emails, changes.get("contact_deletes", 0)):
            ids = self.delete_email(email)
            if ids:
                out["contacts_deleted"].append(min(ids))
        return out

    @staticmethod
    def _sample(rng: _Rng, population: Sequence[Any], n: int) -> list[Any]:
        if n <= 0 or not population:
            return []
        return rng.sample(list(population), min(n, len(population)))

    def export(self, entity: str, now: int) -> dict[str, Any]:
        """Every current record in its API shape and the ids deleted so far."""
        if entity == "campaigns":
            return {
                "records": [self.task_detail(t, now) for t in sorted(self.tasks.values(), key=lambda t: t.id)],
                "deleted_ids": list(self.deleted_task_ids),
            }
        if entity == "contacts":
            # What a full sweep of ``contact/list`` for status 1 and then 0 returns (an email can be in both).
            records = [self.contact_view(r, s) for s in (1, 0) for r in self.ordered_contacts(0, "", s)]
            records.sort(key=lambda r: (r["id"], -r["active"]))
            return {
                "records": records,
                "deleted_ids": list(self.deleted_contact_ids),
                "deleted_emails": list(self.deleted_emails),
            }
        if entity == "groups":
            return {
                "records": [self.group_view(g) for g in self.groups.values()],
                "deleted_ids": list(self.deleted_group_ids),
            }
        if entity == "api_mails":
            return {"records": list(self.api_mails), "deleted_ids": []}
        raise ControlError(400, "entity must be campaigns, contacts, groups or api_mails")
