"""What NextCRM asks Mautic to do, through the outbox (`core.outbox`): create a campaign, publish or unpublish one,
create or update a contact, and add a contact to a segment or remove it.

Mautic takes no idempotency key, so each write goes out once (`MauticApi.write`), and an action whose earlier
attempt may have reached Mautic is looked up before it is sent again:

- a campaign carries a marker derived from the outbox row's key at the end of its description
  (`[nextcrm:<24 hex digits>]`); `find` lists the campaigns whose description holds it and adopts the first;
- a contact is created with `POST /api/contacts/new`, which Mautic itself turns into an update of the contact
  holding the same email while email is a unique identifier (its default); `find` looks the email up anyway
  and adopts a contact that already holds every value the action gives, so an installation configured
  otherwise gets no second contact either. A contact named by id is updated with `PATCH`, which sets the
  same values again when repeated;
- publishing, unpublishing and segment membership set a state: repeating them changes nothing.

What Mautic answers goes into the mirror in the same run, in the shape and at the version the sync gives it
(read your writes): a campaign with its live member count, a contact with its segment ids, a segment with its
member count; a later sync of the unchanged object changes nothing.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field, PositiveInt, model_validator

from nextcrm_pipelines.core.actions import ActionInvalid, ActionSpec, Mirrored, Payload, Sent
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.providers.mautic.client import MauticApi
from nextcrm_pipelines.providers.mautic.records import changed_at, contact_fields

# Core contact fields an action may set, by Mautic's alias (text fields are at most 191 characters).
CONTACT_FIELDS = ("title", "firstname", "lastname", "email", "company", "position", "phone", "mobile", "address1",
                  "address2", "city", "state", "zipcode", "country", "website")  # fmt: skip
Text = Annotated[str | None, Field(min_length=1, max_length=191)]


def marker(key: str) -> str:
    """The reference a campaign made for the outbox row with idempotency key `key` carries in its description."""
    return f"[nextcrm:{hashlib.sha256(key.encode()).hexdigest()[:24]}]"


class CampaignEvent(Payload):
    """One step of a campaign: an action (send an email, change points...), a decision (opens an email...) or a
    condition, by Mautic's event type (`email.send`, `lead.changepoints`, `email.open`...) and its properties.
    `parent` is the position (from 0) of an earlier event it follows; under a decision or condition,
    `decision_path` says on which branch (`yes`, `no`)."""

    name: str = Field(min_length=1, max_length=191)
    type: str = Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)+$", max_length=100)
    event_type: Literal["action", "decision", "condition"]
    description: str | None = Field(default=None, max_length=1000)
    properties: dict[str, Any] = Field(default_factory=dict)
    trigger_mode: Literal["immediate", "interval", "date"] | None = None
    trigger_interval: int | None = Field(default=None, ge=0, le=100_000)
    trigger_interval_unit: Literal["i", "h", "d", "m", "y"] | None = None
    trigger_date: AwareDatetime | None = None
    parent: int | None = Field(default=None, ge=0)
    decision_path: Literal["yes", "no"] | None = None

    @model_validator(mode="after")
    def _check(self) -> CampaignEvent:
        scheduled = (self.trigger_mode, self.trigger_interval, self.trigger_interval_unit, self.trigger_date)
        if self.event_type != "action":
            if any(value is not None for value in scheduled):
                raise ValueError("only actions are scheduled (trigger_mode, trigger_interval..., trigger_date)")
        elif self.trigger_mode == "interval" and (self.trigger_interval is None or self.trigger_interval_unit is None):
            raise ValueError("an interval action gives trigger_interval and trigger_interval_unit")
        elif self.trigger_mode == "date" and self.trigger_date is None:
            raise ValueError("a dated action gives trigger_date")
        return self


class CreateCampaign(Payload):
    """A new campaign: its name, the segments whose contacts enter it (Mautic needs a source) and its events (Mautic
    needs one at least); unpublished unless `published`."""

    name: str = Field(min_length=1, max_length=191)
    description: str | None = Field(default=None, max_length=10_000)
    segment_ids: list[PositiveInt] = Field(min_length=1, max_length=100)
    events: list[CampaignEvent] = Field(min_length=1, max_length=200)
    published: bool = False

    @model_validator(mode="after")
    def _check(self) -> CreateCampaign:
        if len(set(self.segment_ids)) != len(self.segment_ids):
            raise ValueError("segment_ids are given once each")
        for n, event in enumerate(self.events):
            if event.parent is not None and event.parent >= n:
                raise ValueError(f"events.{n}.parent: an event follows an earlier one (its position, from 0)")
            branching = event.parent is not None and self.events[event.parent].event_type != "action"
            if branching and event.decision_path is None:
                raise ValueError(f"events.{n}.decision_path: an event under a decision or condition names its branch")
            if not branching and event.decision_path is not None:
                raise ValueError(f"events.{n}.decision_path: only an event under a decision or condition has one")
        return self


class CampaignRef(Payload):
    """A campaign, by id."""

    campaign_id: PositiveInt


class SaveContact(Payload):
    """A contact to create or update: by `contact_id`, or else by `email` (the contact holding it is updated, or a
    new one made). Fields left out (or null) are left as they are."""

    contact_id: PositiveInt | None = None
    email: str | None = Field(default=None, max_length=191, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    title: Text = None
    firstname: Text = None
    lastname: Text = None
    company: Text = None
    position: Text = None
    phone: Text = None
    mobile: Text = None
    address1: Text = None
    address2: Text = None
    city: Text = None
    state: Text = None
    zipcode: Text = None
    country: Text = None
    website: Text = None
    points: int | None = Field(default=None, ge=-1_000_000_000, le=1_000_000_000)

    @model_validator(mode="after")
    def _check(self) -> SaveContact:
        if self.contact_id is None and self.email is None:
            raise ValueError("a contact is named by contact_id or by email")
        if not fields_of(self):
            raise ValueError("give at least one field to set (email, firstname, ...)")
        return self


class SegmentMembership(Payload):
    """A contact and a segment."""

    segment_id: PositiveInt
    contact_id: PositiveInt


def fields_of(payload: SaveContact) -> dict[str, Any]:
    """The contact fields the action sets, by Mautic's alias."""
    return payload.model_dump(exclude_none=True, exclude={"contact_id"})


# --- campaigns ------------------------------------------------------------------------------------------------


def campaign_body(payload: CreateCampaign, key: str) -> dict[str, Any]:
    """`POST /api/campaigns/new`'s body: the events with temporary ids (`new1`...; Mautic gives them real ones),
    their tree (`parent`, `children`, `order` = depth) and canvas (segments -> first events -> the ones after),
    and the key's marker at the end of the description."""
    ids = [f"new{n + 1}" for n in range(len(payload.events))]
    depth: list[int] = []
    for event in payload.events:
        depth.append(1 if event.parent is None else depth[event.parent] + 1)
    events, nodes, connections = [], [{"id": "lists", "positionX": "100", "positionY": "50"}], []
    for n, event in enumerate(payload.events):
        children = [ids[m] for m, other in enumerate(payload.events) if other.parent == n]
        action = event.event_type == "action"
        events.append({
            "id": ids[n], "name": event.name, "description": event.description, "type": event.type,
            "eventType": event.event_type, "order": depth[n], "properties": event.properties,
            "triggerMode": (event.trigger_mode or "immediate") if action else None,
            "triggerInterval": event.trigger_interval if event.trigger_mode == "interval" else None,
            "triggerIntervalUnit": event.trigger_interval_unit if event.trigger_mode == "interval" else None,
            "triggerDate": event.trigger_date.isoformat() if event.trigger_mode == "date" and event.trigger_date
            else None,
            "children": children, "parent": ids[event.parent] if event.parent is not None else None,
            "decisionPath": event.decision_path,
        })  # fmt: skip
        column = sum(1 for m in range(n) if depth[m] == depth[n])
        nodes.append({"id": ids[n], "positionX": str(100 + 240 * column), "positionY": str(50 + 150 * depth[n])})
        source = "lists" if event.parent is None else ids[event.parent]
        anchor = "leadsource" if event.parent is None else event.decision_path or "bottom"
        connections.append({"sourceId": source, "targetId": ids[n], "anchors": {"source": anchor, "target": "top"}})
    reference = marker(key)
    return {
        "name": payload.name,
        "description": f"{payload.description}\n\n{reference}" if payload.description else reference,
        "isPublished": 1 if payload.published else 0,
        "lists": [{"id": segment_id} for segment_id in payload.segment_ids],
        "forms": [],
        "events": events,
        "canvasSettings": {"nodes": nodes, "connections": connections},
    }


def _answered(body: dict[str, Any], key: str, api: MauticApi, endpoint: str) -> dict[str, Any]:
    found = body.get(key)
    if not isinstance(found, dict) or "id" not in found:
        raise ProviderError(f"Mautic's answer holds no {key}", provider="mautic",
                            connection_id=api.http.connection_id, endpoint=endpoint)  # fmt: skip
    return found


def campaign_sent(api: MauticApi, campaign: dict[str, Any]) -> Sent:
    """The campaign as the sync stores it (with its live member count), at its version."""
    counted = api.with_member_counts([campaign])
    if not counted:
        raise ProviderError(f"campaign {campaign['id']} is gone from Mautic", provider="mautic",
                            connection_id=api.http.connection_id, status=404)  # fmt: skip
    raw = counted[0]
    return Sent(campaign, str(campaign["id"]), (Mirrored("mautic_campaigns", raw, changed_at(raw)),))


def create_campaign(api: MauticApi, payload: CreateCampaign, key: str) -> Sent:
    """Create the campaign (segments checked first: Mautic answers an unknown one with a server error)."""
    wanted = {str(segment_id) for segment_id in payload.segment_ids}
    missing = sorted(wanted - api.segments_listed(wanted), key=int)
    if missing:
        raise ActionInvalid(f"create_campaign: segment_ids {', '.join(missing)} not in Mautic: nothing was sent")
    _, body = api.write("POST", "/api/campaigns/new", campaign_body(payload, key))
    return campaign_sent(api, _answered(body, "campaign", api, "POST /api/campaigns/new"))


def find_campaign(api: MauticApi, payload: CreateCampaign, key: str) -> Sent | None:
    """The campaign an earlier attempt made: the first one whose description carries the key's marker."""
    found = api.campaigns_describing(marker(key))
    return campaign_sent(api, found[0]) if found else None


def _set_published(api: MauticApi, campaign_id: int, published: bool) -> Sent:
    path = f"/api/campaigns/{campaign_id}/edit"
    _, body = api.write("PATCH", path, {"isPublished": 1 if published else 0})
    return campaign_sent(api, _answered(body, "campaign", api, f"PATCH {path}"))


def publish_campaign(api: MauticApi, payload: CampaignRef, key: str) -> Sent:
    return _set_published(api, payload.campaign_id, True)


def unpublish_campaign(api: MauticApi, payload: CampaignRef, key: str) -> Sent:
    return _set_published(api, payload.campaign_id, False)


# --- contacts -------------------------------------------------------------------------------------------------


def contact_sent(api: MauticApi, contact: dict[str, Any], created: bool | None = None) -> Sent:
    """The contact as the sync stores it (with its segment ids), at its version; the outbox keeps only its id and
    times (its fields are personal data, kept in the mirror)."""
    (raw,) = api.with_segment_ids([contact])
    result: dict[str, Any] = {"id": contact["id"], "dateAdded": contact.get("dateAdded"),
                              "dateModified": contact.get("dateModified")}  # fmt: skip
    if created is not None:
        result["created"] = created
    return Sent(result, str(contact["id"]), (Mirrored("mautic_contacts", raw, changed_at(raw)),))


def save_contact(api: MauticApi, payload: SaveContact, key: str) -> Sent:
    """`PATCH /api/contacts/{id}/edit` for a contact named by id, else `POST /api/contacts/new` (Mautic updates the
    contact that holds the email, while email is a unique identifier)."""
    fields = fields_of(payload)
    if payload.contact_id is not None:
        path = f"/api/contacts/{payload.contact_id}/edit"
        _, body = api.write("PATCH", path, fields)
        return contact_sent(api, _answered(body, "contact", api, f"PATCH {path}"), created=False)
    status, body = api.write("POST", "/api/contacts/new", fields)
    return contact_sent(api, _answered(body, "contact", api, "POST /api/contacts/new"), created=status == 201)


def _holds(contact: dict[str, Any], fields: dict[str, Any]) -> bool:
    """Whether the contact already holds every value given (emails compared as Mautic does, ignoring case)."""
    values = contact_fields(contact)
    for alias, wanted in fields.items():
        held = contact.get("points", values.get("points")) if alias == "points" else values.get(alias)
        if alias == "email":
            if str(held or "").casefold() != str(wanted).casefold():
                return False
        elif alias == "points":
            if held is None or int(float(held)) != wanted:
                return False
        elif held is None or str(held) != str(wanted):
            return False
    return True


def find_contact(api: MauticApi, payload: SaveContact, key: str) -> Sent | None:
    """For a contact named by email: one that already holds every value given (made or updated by an earlier
    attempt, or already so). None for a contact named by id: its update is sent again (it sets the same values)."""
    if payload.contact_id is not None or payload.email is None:
        return None
    fields = fields_of(payload)
    for contact in api.contacts_with_email(payload.email):
        if _holds(contact, fields):
            return contact_sent(api, contact)
    return None


# --- segment membership ---------------------------------------------------------------------------------------


def _membership(api: MauticApi, payload: SegmentMembership, action: str) -> Sent:
    """Add or remove, then read the contact (its segment ids) and the segment (its member count) as the sync does."""
    segment, contact = str(payload.segment_id), str(payload.contact_id)
    _, body = api.write("POST", f"/api/segments/{segment}/contact/{contact}/{action}")
    mirrored = [Mirrored("mautic_contacts", raw, changed_at(raw)) for raw in api.contacts_by_id([contact]).values()]
    mirrored += [Mirrored("mautic_segments", raw, changed_at(raw)) for raw in api.segments_by_id([segment]).values()]
    result = {**body, "segment_id": payload.segment_id, "contact_id": payload.contact_id, "action": action}
    return Sent(result, f"{segment}:{contact}", tuple(mirrored))


def add_contact_to_segment(api: MauticApi, payload: SegmentMembership, key: str) -> Sent:
    return _membership(api, payload, "add")


def remove_contact_from_segment(api: MauticApi, payload: SegmentMembership, key: str) -> Sent:
    return _membership(api, payload, "remove")


ACTIONS = {
    spec.name: spec
    for spec in (
        ActionSpec("create_campaign", CreateCampaign, create_campaign,
                   "Create a campaign fed by segments, with its events (unpublished unless asked).",
                   find=find_campaign, entities=("mautic_campaigns",)),
        ActionSpec("publish_campaign", CampaignRef, publish_campaign, "Publish a campaign.",
                   entities=("mautic_campaigns",)),
        ActionSpec("unpublish_campaign", CampaignRef, unpublish_campaign, "Unpublish a campaign.",
                   entities=("mautic_campaigns",)),
        ActionSpec("create_or_update_contact", SaveContact, save_contact,
                   "Create a contact, or update the one with this id or email.",
                   find=find_contact, entities=("mautic_contacts",)),
        ActionSpec("add_contact_to_segment", SegmentMembership, add_contact_to_segment,
                   "Add a contact to a segment.", entities=("mautic_contacts", "mautic_segments")),
        ActionSpec("remove_contact_from_segment", SegmentMembership, remove_contact_from_segment,
                   "Remove a contact from a segment.", entities=("mautic_contacts", "mautic_segments")),
    )
}  # fmt: skip
