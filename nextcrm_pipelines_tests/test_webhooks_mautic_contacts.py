"""Mautic contact webhooks reach `mautic_contacts` and `mautic_segments`: a new contact is stored, an update
rewrites its row (with its segment ids), a delete flags it, and the segments it is in get their live member
counts; duplicated and newest-first deliveries leave exactly the tables that one in-order delivery does."""

from __future__ import annotations

import dagster as dg

from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_mautic_contacts_segments import member_counts, memberships
from nextcrm_pipelines_tests.test_webhooks_mautic import comparable, hooked, mautic_api, subscribed, twin
from nextcrm_pipelines_tests.webhook_helpers import receiver, tick_and_apply

CONTACTS, SEGMENTS = "mautic_contacts", "mautic_segments"


def sync_all(database_url, schema, sandbox, connection) -> None:
    days = days_back(sandbox_now(sandbox).date(), 3)
    for entity in (CONTACTS, SEGMENTS):
        results = sync_days(database_url, schema, connection.id, entity, days)
        assert all(r.status == "success" for r in results), [r.error for r in results]


def test_new_updated_and_deleted_contacts_reach_the_tables(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=30, segments=5, days=3)
    hooked(database_url, box, connection)
    sync_all(database_url, schema, sandbox, connection)
    joined = memberships(control, account)
    member = next(lead for lead, ids in sorted(joined.items(), key=lambda item: int(item[0])) if ids)
    segment = joined[member][0]
    doomed = next(lead for lead, ids in sorted(joined.items(), key=lambda item: int(item[0]))
                  if segment in ids and lead != member)  # fmt: skip
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}"),
        mautic_api(sandbox, control, account, database_url, box, connection) as api,
        dg.instance_for_test() as instance,
    ):
        created = api.call("POST", "/contacts/new", json={"firstname": "Ada", "email": "ada@example.com"})["contact"]
        api.call("POST", f"/segments/{segment}/contact/{created['id']}/add")  # no event of its own
        api.call("PATCH", f"/contacts/{created['id']}/edit", json={"position": "CTO"})
        api.call("PATCH", f"/contacts/{member}/edit", json={"position": "Buyer"})
        api.call("DELETE", f"/contacts/{doomed}/delete")
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
    contacts = mirror(database_url, schema, CONTACTS, connection.id)
    new = contacts[str(created["id"])]
    assert (new["email"], new["position"], new["deleted"], new["segment_ids"]) == (
        "ada@example.com", "CTO", False, [segment])  # fmt: skip
    assert contacts[member]["position"] == "Buyer" and not contacts[member]["deleted"]
    assert contacts[doomed]["deleted"] and contacts[doomed]["email"]  # flagged, its last data kept
    segments = mirror(database_url, schema, SEGMENTS, connection.id)
    assert segments[segment]["member_count"] == member_counts(control, account)[segment]


def test_duplicates_and_newest_first_leave_the_in_order_tables(database_url, schema, box, sandbox, mautic):
    control, account, in_order = mautic("client_credentials", contacts=30, segments=5, days=3)
    hooked(database_url, box, in_order)
    reordered = twin(database_url, box, in_order)
    for connection in (in_order, reordered):
        sync_all(database_url, schema, sandbox, connection)
    joined = memberships(control, account)
    x, y, gone = [lead for lead, ids in sorted(joined.items(), key=lambda item: int(item[0])) if ids][:3]
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{in_order.id}") as first,
        subscribed(control, account, f"{url}/webhooks/mautic/{reordered.id}", hold=True) as second,
        mautic_api(sandbox, control, account, database_url, box, in_order) as api,
        dg.instance_for_test() as instance,
    ):
        api.call("PATCH", f"/contacts/{x}/edit", json={"position": "First"})
        api.call("POST", f"/segments/{joined[y][0]}/contact/{x}/add")
        api.call("PATCH", f"/contacts/{x}/edit", json={"position": "Second", "points": 77})
        api.call("PATCH", f"/contacts/{y}/edit", json={"city": "Lyon"})
        api.call("PATCH", f"/contacts/{gone}/edit", json={"position": "Leaving"})
        api.call("DELETE", f"/contacts/{gone}/delete")
        created = api.call("POST", "/contacts/new", json={"lastname": "Newcomer"})["contact"]
        assert control.flush_webhooks()
        held = control.release_webhooks(second["id"], order="newest-first", copies=3)
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
        sent = control.webhook_attempts(first["id"])
    assert held == len(sent) >= 6
    for entity in (CONTACTS, SEGMENTS):
        one = mirror(database_url, schema, entity, in_order.id)
        other = mirror(database_url, schema, entity, reordered.id)
        assert comparable(one) == comparable(other), entity
    contacts = mirror(database_url, schema, CONTACTS, in_order.id)
    assert contacts[x]["position"] == "Second" and contacts[x]["points"] == 77
    assert contacts[gone]["deleted"] and contacts[str(created["id"])]["last_name"] == "Newcomer"
    segments = mirror(database_url, schema, SEGMENTS, in_order.id)
    live = member_counts(control, account)
    touched = set(joined[x]) | set(joined[y]) | set(joined[gone])
    assert {s: segments[s]["member_count"] for s in touched} == {s: live[s] for s in touched}
