"""Mautic actions through the outbox, against the Mautic sandbox over real HTTP and a real Postgres: each action
reaches Mautic once and lands in the mirror in the same run (a later sync changes nothing); a worker killed after
Mautic acted, or an answer lost on the way, leaves one campaign and one contact because the next attempt finds them
(without the lookup the sandbox, as Mautic does, makes a second); bad actions fail naming the field before anything
is sent; Mautic's refusals carry its message. The emulator's writes are checked on their own at the end."""

from __future__ import annotations

import time
import uuid
from typing import Any

import dagster as dg
import httpx
import psycopg
import pytest

from nextcrm_pipelines.core import outbox
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.mautic.actions import marker
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now
from nextcrm_pipelines_tests.outbox_helpers import (
    applier,
    crash,
    requests_served,
    route_counts,
    rows,
    stored_key,
    submit,
    through_dagster,
    without_find,
)
from nextcrm_pipelines_tests.test_mautic_contacts_segments import member_counts, memberships, run
from nextcrm_pipelines_tests.test_webhooks_mautic import comparable, hooked, subscribed
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply

MAUTIC = get_provider("mautic")
apply = applier(MAUTIC)
ENTITIES = ("mautic_campaigns", "mautic_contacts", "mautic_segments")
EVENTS = [
    {"name": "Welcome email", "type": "email.send", "event_type": "action", "properties": {"email": 1}},
    {"name": "Opens it", "type": "email.open", "event_type": "decision", "parent": 0},
    {"name": "Reward", "type": "lead.changepoints", "event_type": "action", "parent": 1, "decision_path": "yes",
     "properties": {"points": 10}, "trigger_mode": "interval", "trigger_interval": 2, "trigger_interval_unit": "d"},
]  # fmt: skip


def sync_everything(database_url: str, schema: str, sandbox, connection, days: int = 3) -> list:
    dates = days_back(sandbox_now(sandbox).date(), days)
    return [result for entity in ENTITIES for result in run(database_url, schema, connection, entity, dates)]


def records(control, account: str, entity: str) -> dict[str, dict[str, Any]]:
    return {str(r["id"]): r for r in control.export(account, entity)["records"]}


def campaign_payload(segment: str, **extra: Any) -> dict[str, Any]:
    return {"name": "Spring launch", "description": "From the CRM", "segment_ids": [int(segment)], "events": EVENTS,
            **extra}  # fmt: skip


def test_every_action_through_dagster_reaches_mautic_and_the_mirror_and_a_later_sync_changes_nothing(
    database_url, schema, sandbox, mautic
):
    control, account, connection = mautic("client_credentials", contacts=30, segments=4, campaigns=10, days=2)
    dormant, live = sorted(records(control, account, "campaigns"), key=int)[:2]
    control.update_record(account, "campaigns", int(dormant), {"isPublished": False})
    control.update_record(account, "campaigns", int(live), {"isPublished": True})
    assert all(r.status == "success" for r in sync_everything(database_url, schema, sandbox, connection))
    joined = memberships(control, account)
    segment = str(control.export(account, "segments")["records"][0]["id"])
    outsider = next(cid for cid in records(control, account, "contacts") if segment not in joined.get(cid, []))
    leaver, left = next((cid, ids[0]) for cid, ids in sorted(joined.items()) if ids and cid != outsider)
    edited = next(cid for cid in records(control, account, "contacts") if cid not in (outsider, leaver))
    email = f"new.{uuid.uuid4().hex[:8]}@example.com"
    asked = {
        "create_campaign": campaign_payload(segment),
        "publish_campaign": {"campaign_id": int(dormant)},
        "unpublish_campaign": {"campaign_id": int(live)},
        "create_or_update_contact": {"email": email, "firstname": "Ada", "city": "Lyon", "points": 5},
        "add_contact_to_segment": {"segment_id": int(segment), "contact_id": int(outsider)},
        "remove_contact_from_segment": {"segment_id": int(left), "contact_id": int(leaver)},
    }
    ids = {action: submit(database_url, schema, connection.id, action, payload).id for action, payload in asked.items()}
    by_id = submit(database_url, schema, connection.id, "create_or_update_contact",
                   {"contact_id": int(edited), "position": "Buyer"}).id  # fmt: skip
    materialized = {m.asset_key.path[0] for m in through_dagster("mautic")}
    assert materialized == set(ENTITIES)
    stored = rows(database_url, schema)
    assert {stored[i]["status"] for i in stored} == {"succeeded"} and {stored[i]["attempts"] for i in stored} == {1}

    # At Mautic: what each action asked for.
    campaigns = records(control, account, "campaigns")
    made = campaigns[stored[ids["create_campaign"]]["result_id"]]
    reference = marker(stored_key(database_url, schema, ids["create_campaign"]))
    assert made["name"] == "Spring launch" and not made["isPublished"]
    assert made["description"] == f"From the CRM\n\n{reference}"
    assert list(made["lists"]) == [segment] and len(made["events"]) == 3
    assert campaigns[dormant]["isPublished"] and not campaigns[live]["isPublished"]
    contacts = records(control, account, "contacts")
    new_id = stored[ids["create_or_update_contact"]]["result_id"]
    fields = contacts[new_id]["fields"]["all"]
    assert (fields["email"], fields["firstname"], fields["city"]) == (email, "Ada", "Lyon")
    assert contacts[new_id]["points"] == 5
    assert stored[ids["create_or_update_contact"]]["result"]["created"] is True
    assert contacts[edited]["fields"]["all"]["position"] == "Buyer"
    now_joined = memberships(control, account)
    assert segment in now_joined[outsider] and left not in now_joined.get(leaver, [])

    # In the mirror, at once.
    mirrored = {entity: mirror(database_url, schema, entity, connection.id) for entity in ENTITIES}
    row = mirrored["mautic_campaigns"][str(made["id"])]
    assert (row["name"], row["published"], row["segment_count"], row["event_count"]) == ("Spring launch", False, 1, 3)
    assert mirrored["mautic_campaigns"][dormant]["published"] and not mirrored["mautic_campaigns"][live]["published"]
    people = mirrored["mautic_contacts"]
    assert (people[new_id]["email"], people[new_id]["first_name"], people[new_id]["points"]) == (email, "Ada", 5)
    assert people[edited]["position"] == "Buyer"
    assert segment in people[outsider]["segment_ids"] and left not in people[leaver]["segment_ids"]
    counts = member_counts(control, account)
    assert {s: mirrored["mautic_segments"][s]["member_count"] for s in (segment, left)} == {
        s: counts[s] for s in (segment, left)}  # fmt: skip
    assert stored[by_id]["result_id"] == edited

    # A later sync of the same objects changes nothing.
    again = sync_everything(database_url, schema, sandbox, connection)
    assert all(r.status == "success" for r in again)
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0, [
        (r.entity, r.window, r.counts) for r in again if r.counts.inserted or r.counts.updated]  # fmt: skip


def made_by(control, account: str, action: str, before: dict[str, dict], email: str) -> list[str]:
    """Ids of the campaigns (or contacts with this email) the sandbox holds that were not there before."""
    entity = "campaigns" if action == "create_campaign" else "contacts"
    now = records(control, account, entity)
    new = [rid for rid in now if rid not in before]
    if entity == "contacts":
        new = [rid for rid in new if now[rid]["fields"]["all"].get("email") == email]
    return sorted(new, key=int)


@pytest.mark.parametrize("action", ["create_campaign", "create_or_update_contact"])
@pytest.mark.parametrize("lookup", [True, False], ids=["with_find", "without_find"])
def test_a_worker_killed_after_mautic_acted_leaves_one_object_because_the_next_run_finds_it(
    database_url, schema, sandbox, mautic, secret_key, action, lookup
):
    # Email is not a unique identifier here: Mautic itself would make a second contact with the same email.
    control, account, connection = mautic("client_credentials", contacts=10, segments=2, campaigns=3, days=1,
                                          contact_unique_fields=[])  # fmt: skip
    segment = next(iter(records(control, account, "segments")))
    email = f"crash.{uuid.uuid4().hex[:8]}@example.com"
    payload = campaign_payload(segment) if action == "create_campaign" else {"email": email, "lastname": "Crash"}
    before = records(control, account, "campaigns" if action == "create_campaign" else "contacts")
    done = submit(database_url, schema, connection.id, action, payload)
    crash(database_url, schema, "mautic")
    (first,) = made_by(control, account, action, before, email)
    assert rows(database_url, schema)[done.id]["status"] == "sending"
    time.sleep(1.2)  # the dead worker's lease lapses
    after = apply(database_url, schema, provider=MAUTIC if lookup else without_find(MAUTIC, action))
    row = rows(database_url, schema)[done.id]
    assert after.succeeded == 1 and row["status"] == "succeeded"
    made = made_by(control, account, action, before, email)
    if lookup:
        assert after.adopted == 1 and made == [first] and row["result_id"] == first
        table = "mautic_campaigns" if action == "create_campaign" else "mautic_contacts"
        assert first in mirror(database_url, schema, table, connection.id)
    else:  # sent again: Mautic made a second one, which the lookup prevents
        assert after.adopted == 0 and len(made) == 2 and row["result_id"] == made[1]


@pytest.mark.parametrize("action", ["create_campaign", "create_or_update_contact"])
def test_an_answer_lost_after_mautic_acted_is_looked_up_and_the_object_adopted(database_url, schema, sandbox, mautic,
                                                                               action):  # fmt: skip
    control, account, connection = mautic("client_credentials", contacts=10, segments=2, campaigns=3, days=1,
                                          contact_unique_fields=[])  # fmt: skip
    segment = next(iter(records(control, account, "segments")))
    email = f"lost.{uuid.uuid4().hex[:8]}@example.com"
    payload = campaign_payload(segment) if action == "create_campaign" else {"email": email, "firstname": "Lost"}
    before = records(control, account, "campaigns" if action == "create_campaign" else "contacts")
    done = submit(database_url, schema, connection.id, action, payload)
    control.set_faults(account=account, lost_answers=1)
    try:
        first = apply(database_url, schema)
    finally:
        control.clear_faults(account=account)
    row = rows(database_url, schema)[done.id]
    # A 5xx after the write: Mautic acted, but the answer never said so. Sent once, not repeated.
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 500" in row["error"]
    (made,) = made_by(control, account, action, before, email)
    second = apply(database_url, schema)
    row = rows(database_url, schema)[done.id]
    assert second.succeeded == second.adopted == 1 and row["status"] == "succeeded" and row["result_id"] == made
    assert made_by(control, account, action, before, email) == [made]


def test_a_contact_named_by_email_is_updated_not_duplicated_while_email_identifies_contacts(database_url, schema,
                                                                                          sandbox, mautic):  # fmt: skip
    control, account, connection = mautic("client_credentials", contacts=10, segments=2, campaigns=2, days=1)
    existing = next(c for c in records(control, account, "contacts").values() if c["fields"]["all"].get("email"))
    email = existing["fields"]["all"]["email"].upper()  # Mautic compares emails ignoring case
    done = submit(database_url, schema, connection.id, "create_or_update_contact", {"email": email, "position": "CFO"})
    assert apply(database_url, schema).succeeded == 1
    row = rows(database_url, schema)[done.id]
    assert row["result_id"] == str(existing["id"]) and row["result"]["created"] is False
    after = records(control, account, "contacts")
    assert len(after) == 10 and after[str(existing["id"])]["fields"]["all"]["position"] == "CFO"
    assert mirror(database_url, schema, "mautic_contacts", connection.id)[str(existing["id"])]["position"] == "CFO"


BAD = [
    ("create_campaign", {"name": "x", "events": EVENTS}, "segment_ids: Field required"),
    ("create_campaign", {"name": "x", "segment_ids": [1], "events": []}, "events: List should have at least 1 item"),
    ("create_campaign", {"name": " ", "segment_ids": [1], "events": EVENTS}, "name: String should have at least 1"),
    ("create_campaign", {"name": "x", "segment_ids": [1], "events": [{**EVENTS[0], "event_type": "goal"}]},
     "events.0.event_type: Input should be 'action', 'decision' or 'condition'"),
    ("create_campaign", {"name": "x", "segment_ids": [1],
                         "events": [EVENTS[0], EVENTS[1], {**EVENTS[2], "decision_path": None}]},
     "events.2.decision_path: an event under a decision or condition names its branch"),
    ("create_campaign", {"name": "x", "segment_ids": [1], "events": [{**EVENTS[0], "parent": 0}]},
     "events.0.parent: an event follows an earlier one"),
    ("create_campaign", {"name": "x", "segment_ids": [1], "events": [{**EVENTS[0], "decision_path": "no"}]},
     "events.0.decision_path: only an event under a decision or condition has one"),
    ("create_campaign", {"name": "x", "segment_ids": [1], "events": [{**EVENTS[1], "trigger_mode": "immediate"}]},
     "only actions are scheduled"),
    ("publish_campaign", {}, "campaign_id: Field required"),
    ("publish_campaign", {"campaign_id": -3}, "campaign_id: Input should be greater than 0"),
    ("unpublish_campaign", {"campaign_id": "seven"}, "campaign_id: Input should be a valid integer"),
    ("create_or_update_contact", {"firstname": "Ada"}, "named by contact_id or by email"),
    ("create_or_update_contact", {"email": "not-an-email"}, "email: String should match pattern"),
    ("create_or_update_contact", {"contact_id": 4}, "give at least one field to set"),
    ("create_or_update_contact", {"email": "a@example.com", "shoe_size": 44}, "shoe_size: Extra inputs"),
    ("add_contact_to_segment", {"segment_id": 1}, "contact_id: Field required"),
    ("remove_contact_from_segment", {"segment_id": 0, "contact_id": 1}, "segment_id: Input should be greater than 0"),
    ("delete_everything", {}, "mautic has no action 'delete_everything'"),
]  # fmt: skip


def test_bad_actions_fail_naming_the_field_and_nothing_is_sent(database_url, schema, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=5, segments=2, campaigns=2, days=1)
    ids = [submit(database_url, schema, connection.id, action, payload).id for action, payload, _ in BAD]
    before = requests_served(control, account)
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == len(BAD) and done.succeeded == 0
    for action_id, (_, _, message) in zip(ids, BAD, strict=True):
        assert stored[action_id]["status"] == "failed" and message in stored[action_id]["error"], stored[action_id]
        assert stored[action_id]["sent_at"] is None
        assert "a@example.com" not in stored[action_id]["error"]
    assert requests_served(control, account) == before  # nothing reached Mautic, not even a token request


def test_mautic_refusals_fail_with_its_message_and_an_unknown_segment_is_caught_before_the_write(
    database_url, schema, sandbox, mautic
):
    control, account, connection = mautic("client_credentials", contacts=5, segments=2, campaigns=2, days=1)
    contact = next(iter(records(control, account, "contacts")))
    gone = submit(database_url, schema, connection.id, "publish_campaign", {"campaign_id": 99_999}).id
    stranger = submit(database_url, schema, connection.id, "add_contact_to_segment",
                      {"segment_id": 1, "contact_id": 88_888}).id  # fmt: skip
    nowhere = submit(database_url, schema, connection.id, "create_campaign", campaign_payload("77")).id
    missing = submit(database_url, schema, connection.id, "create_or_update_contact",
                     {"contact_id": 77_777, "email": "someone@example.com"}).id  # fmt: skip
    writes = route_counts(control, "POST /api/campaigns/new")
    done = apply(database_url, schema)
    stored = rows(database_url, schema)
    assert done.failed == 4 and done.retrying == 0
    for action_id, endpoint in ((gone, "PATCH /api/campaigns/99999/edit"),
                                (stranger, "POST /api/segments/1/contact/88888/add"),
                                (missing, "PATCH /api/contacts/77777/edit")):  # fmt: skip
        error = stored[action_id]["error"]
        assert f"{endpoint} -> HTTP 404: Mautic refused it: Item was not found." in error, error
        assert "someone@example.com" not in error
    assert "segment_ids 77 not in Mautic: nothing was sent" in stored[nowhere]["error"]
    assert route_counts(control, "POST /api/campaigns/new") == writes  # the unknown segment never reached the write
    assert contact  # the installation had contacts to refuse against


def test_server_errors_and_rate_limits_are_survived_and_publishing_twice_changes_nothing(database_url, schema,
                                                                                        sandbox, mautic):  # fmt: skip
    control, account, connection = mautic("client_credentials", contacts=5, segments=2, campaigns=2, days=1)
    dormant = next(iter(records(control, account, "campaigns")))
    control.update_record(account, "campaigns", int(dormant), {"isPublished": False})
    done = submit(database_url, schema, connection.id, "publish_campaign", {"campaign_id": int(dormant)})
    control.set_faults(account=account, server_errors=1)
    try:
        first = apply(database_url, schema)
    finally:
        control.clear_faults(account=account)
    row = rows(database_url, schema)[done.id]
    assert first.retrying == 1 and row["status"] == "unknown" and "HTTP 500" in row["error"]
    control.set_faults(account=account, rate_limited=1)  # 429: turned away unread, so waited out and sent again
    try:
        second = apply(database_url, schema)
    finally:
        control.clear_faults(account=account)
    row = rows(database_url, schema)[done.id]
    assert second.succeeded == 1 and row["status"] == "succeeded" and row["attempts"] == 2
    assert records(control, account, "campaigns")[dormant]["isPublished"]
    assert mirror(database_url, schema, "mautic_campaigns", connection.id)[dormant]["published"]


def test_the_contact_webhooks_mautic_sends_for_our_writes_find_the_mirror_already_current(
    database_url, schema, box, sandbox, mautic
):
    control, account, connection = mautic("client_credentials", contacts=10, segments=2, campaigns=2, days=1)
    hooked(database_url, box, connection)
    known = next(cid for cid, c in records(control, account, "contacts").items() if c["fields"]["all"].get("email"))
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}"),
        dg.instance_for_test() as instance,
    ):
        made = submit(database_url, schema, connection.id, "create_or_update_contact",
                      {"email": f"hook.{uuid.uuid4().hex[:8]}@example.com", "firstname": "Hook"}).id  # fmt: skip
        submit(database_url, schema, connection.id, "create_or_update_contact",
               {"contact_id": int(known), "position": "Head of hooks"})  # fmt: skip
        assert apply(database_url, schema).succeeded == 2
        new = rows(database_url, schema)[made]["result_id"]
        written = comparable(mirror(database_url, schema, "mautic_contacts", connection.id))
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
    events = inbox_rows(database_url, schema, "mautic")
    assert {kind for _, kind, *_ in events} == {"mautic.lead_post_save_new", "mautic.lead_post_save_update"}
    assert {status for _, _, status, *_ in events} == {"processed"}
    after = comparable(mirror(database_url, schema, "mautic_contacts", connection.id))
    assert {cid: after[cid] for cid in (new, known)} == {cid: written[cid] for cid in (new, known)}


def test_contact_updates_in_bulk_cost_one_write_and_one_read_each(database_url, schema, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=100, segments=3, campaigns=1, days=1)
    contacts = sorted(records(control, account, "contacts"), key=int)
    with psycopg.connect(database_url) as conn:
        for n in range(300):
            outbox.submit(conn, schema, connection_id=connection.id, action="create_or_update_contact",
                          payload={"contact_id": int(contacts[n % 100]), "points": n})  # fmt: skip
    names = ("PATCH /api/contacts/{id}/edit", "GET /api/stats/{table}", "GET /api/contacts", "POST /oauth/v2/token")
    before = route_counts(control, *names)
    done = apply(database_url, schema)
    served = {name: count - before[name] for name, count in route_counts(control, *names).items()}
    assert done.succeeded == 300, done.lines[:3]
    # The write and the read of the contact's segment ids, nothing else per action; one token for the run.
    assert served == {"PATCH /api/contacts/{id}/edit": 300, "GET /api/stats/{table}": 300, "GET /api/contacts": 0,
                      "POST /oauth/v2/token": 1}  # fmt: skip
    people = mirror(database_url, schema, "mautic_contacts", connection.id)
    assert {people[cid]["points"] for cid in contacts} == set(range(200, 300))


# --- the emulator's writes, as Mautic serves them -------------------------------------------------------------


class Api:
    """One installation's API over HTTP with a client-credentials token."""

    def __init__(self, server, control, account: str, client_id: str, secret: str) -> None:
        self.base = f"{server.url}/mautic/{account}"
        token = httpx.post(f"{self.base}/oauth/v2/token", data={"grant_type": "client_credentials",
                           "client_id": client_id, "client_secret": secret}).json()["access_token"]  # fmt: skip
        self.http = httpx.Client(base_url=f"{self.base}/api", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)


@pytest.fixture
def installation(sandbox):
    from nextcrm_sandbox.mautic import MauticControl

    control = MauticControl(sandbox)
    client_id, secret = f"m-{uuid.uuid4().hex[:8]}", "s3cret"
    account = control.add_account(seed=9, campaigns=3, contacts=6, segments=2, days=2,
                                  clients=[{"client_id": client_id, "client_secret": secret}])["id"]  # fmt: skip
    api = Api(sandbox, control, account, client_id, secret)
    yield control, account, api
    api.http.close()


def emulator_campaign(segment: str) -> dict[str, Any]:
    return {"name": "API campaign", "description": "Made twice", "isPublished": 0, "lists": [{"id": int(segment)}],
            "events": [{"id": "new_1", "name": "Send", "type": "email.send", "eventType": "action", "order": 1,
                        "properties": {"email": 1}, "triggerMode": "immediate", "parent": None},
                       {"id": "new_2", "name": "Opens", "type": "email.open", "eventType": "decision", "order": 2,
                        "parent": "new_1"}],
            "canvasSettings": {"nodes": [{"id": "new_1", "positionX": "1", "positionY": "2"},
                                         {"id": "lists", "positionX": "3", "positionY": "4"}],
                               "connections": [{"sourceId": "lists", "targetId": "new_1",
                                                "anchors": {"source": "leadsource", "target": "top"}}]}}  # fmt: skip


def test_emulator_creates_a_second_campaign_for_a_repeated_create_and_serves_it(installation):
    control, account, api = installation
    segment = next(iter(records(control, account, "segments")))
    first, second = (api.call("POST", "/campaigns/new", json=emulator_campaign(segment)) for _ in range(2))
    assert first.status_code == second.status_code == 201
    one, two = first.json()["campaign"], second.json()["campaign"]
    assert one["id"] != two["id"] and one["name"] == two["name"] == "API campaign"
    assert first.headers["location"].endswith(f"/mautic/{account}/api/campaigns/{one['id']}")
    assert one["isPublished"] is False and one["dateModified"] is None and list(one["lists"]) == [segment]
    events = list(one["events"].values())
    assert [e["name"] for e in events] == ["Send", "Opens"] and all(isinstance(e["id"], int) for e in events)
    assert events[1]["parent"]["id"] == events[0]["id"] and events[0]["children"][0]["id"] == events[1]["id"]
    assert one["canvasSettings"]["nodes"][0]["id"] == str(events[0]["id"])
    assert one["canvasSettings"]["connections"][0]["targetId"] == str(events[0]["id"])
    listed = api.call("GET", "/campaigns", params={"where[0][col]": "id", "where[0][expr]": "in",
                                                   "where[0][val]": f"{one['id']},{two['id']}"}).json()  # fmt: skip
    assert sorted(listed["campaigns"]) == sorted([str(one["id"]), str(two["id"])])
    assert listed["campaigns"][str(one["id"])] == one
    assert len(records(control, account, "campaigns")) == 5


def test_emulator_put_creates_a_missing_campaign_and_replaces_an_existing_one(installation):
    control, account, api = installation
    first, second = sorted(records(control, account, "segments"), key=int)[:2]
    created = api.call("PUT", "/campaigns/99999/edit", json=emulator_campaign(first))
    assert created.status_code == 201 and created.json()["campaign"]["id"] != 99999
    made = created.json()["campaign"]
    kept = min(made["events"], key=int)
    replacement = {**emulator_campaign(second), "name": "Replaced",
                   "events": [{**emulator_campaign(second)["events"][0], "id": int(kept)}]}  # fmt: skip
    replaced = api.call("PUT", f"/campaigns/{made['id']}/edit", json=replacement)
    assert replaced.status_code == 200
    campaign = replaced.json()["campaign"]
    assert campaign["name"] == "Replaced" and campaign["description"] == "Made twice" and not campaign["isPublished"]
    assert list(campaign["lists"]) == [second] and list(campaign["events"]) == [kept]
    patched = api.call("PATCH", f"/campaigns/{made['id']}/edit", json={"lists": [{"id": int(first)}]}).json()
    assert sorted(patched["campaign"]["lists"], key=int) == sorted([first, second], key=int)  # PATCH adds sources
    assert records(control, account, "campaigns")[str(made["id"])] == patched["campaign"]


def test_emulator_refuses_campaigns_as_mautic_does(installation):
    control, account, api = installation
    segment = next(iter(records(control, account, "segments")))
    body = emulator_campaign(segment)
    blank = api.call("POST", "/campaigns/new", json={**body, "name": " "})
    assert blank.status_code == 400 and blank.json() == {"errors": [
        {"code": 400, "message": "name: A name is required.", "details": {"name": ["A name is required."]},
         "type": None}]}  # fmt: skip
    no_events = api.call("POST", "/campaigns/new", json={**body, "events": []})
    assert no_events.status_code == 400 and no_events.json()["errors"][0]["message"].startswith(
        "At least one event is required.")  # fmt: skip
    no_source = api.call("POST", "/campaigns/new", json={**body, "lists": []})
    assert no_source.status_code == 400 and "At least one contact source" in no_source.json()["errors"][0]["message"]
    unknown = api.call("POST", "/campaigns/new", json={**body, "lists": [{"id": 999}]})
    assert unknown.status_code == 500  # the segment's foreign key
    missing = api.call("PATCH", "/campaigns/99999/edit", json={"isPublished": 1})
    assert missing.status_code == 404 and missing.json()["errors"][0]["message"] == "Item was not found."
    assert len(records(control, account, "campaigns")) == 3


def test_emulator_publishes_with_patch_and_stamps_the_edit(installation):
    control, account, api = installation
    campaign = next(iter(records(control, account, "campaigns").values()))
    for flag in (1, 0, "1", False):
        answer = api.call("PATCH", f"/campaigns/{campaign['id']}/edit", json={"isPublished": flag})
        assert answer.status_code == 200 and answer.json()["campaign"]["isPublished"] is bool(int(flag))
        assert answer.json()["campaign"]["dateModified"] is not None
    assert api.call("PATCH", f"/campaigns/{campaign['id']}/edit", json={"isPublished": "maybe"}).json() == {
        "errors": [{"code": 400, "message": "isPublished: This value is not valid.",
                    "details": {"isPublished": ["This value is not valid."]}, "type": None}]}  # fmt: skip
    assert records(control, account, "campaigns")[str(campaign["id"])]["isPublished"] is False


def test_emulator_contact_create_updates_the_contact_holding_the_email_unless_email_is_not_unique(installation):
    control, account, api = installation
    existing = next(c for c in records(control, account, "contacts").values() if c["fields"]["all"].get("email"))
    email = existing["fields"]["all"]["email"]
    again = api.call("POST", "/contacts/new", json={"email": email.upper(), "position": "Owner"})
    assert again.status_code == 200 and again.json()["contact"]["id"] == existing["id"]
    assert again.json()["contact"]["fields"]["all"]["position"] == "Owner"
    fresh = api.call("POST", "/contacts/new", json={"email": "fresh@example.com", "firstname": "Fresh"})
    assert fresh.status_code == 201 and "location" in fresh.headers
    made = fresh.json()["contact"]
    # Only what was given: no generated name, city, tags or owner.
    assert {k: v for k, v in made["fields"]["all"].items() if v is not None} == {
        "id": made["id"], "email": "fresh@example.com", "firstname": "Fresh", "points": 0}  # fmt: skip
    assert made["tags"] == [] and made["owner"] is None and made["points"] == 0
    control.configure(account, contact_unique_fields=[])
    twin = api.call("POST", "/contacts/new", json={"email": "fresh@example.com", "firstname": "Fresh"})
    assert twin.status_code == 201 and twin.json()["contact"]["id"] != made["id"]
    assert len(records(control, account, "contacts")) == 8


def test_emulator_segment_membership_is_repeatable(installation):
    control, account, api = installation
    segment = next(iter(records(control, account, "segments")))
    contact = next(iter(records(control, account, "contacts")))
    for action in ("add", "add", "remove", "remove"):
        answer = api.call("POST", f"/segments/{segment}/contact/{contact}/{action}")
        assert answer.status_code == 200 and answer.json() == {"success": 1}
        assert (segment in memberships(control, account).get(contact, [])) is (action == "add")
    assert api.call("POST", f"/segments/{segment}/contact/99999/add").status_code == 404
