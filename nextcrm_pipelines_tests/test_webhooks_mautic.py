"""Mautic webhooks end to end: sandbox change → signed PHP-encoded delivery → receiver → inbox → sensor tick →
apply run → `mautic_campaigns`, over real HTTP and a real Postgres.

- Campaign joins and leaves send no webhook (Mautic has no such event): a later edit of a contact refreshes its
  campaigns and shows a silent join; a deleted member's campaigns drop to Mautic's live counts.
- Duplicated (three copies) and newest-first deliveries leave exactly the table that in-order delivery does.
- A re-sync after a webhook refresh keeps the live count, which the sync stores too (Mautic's listed
  `contactCount` is cached for hours).
- An email sent or opened by a campaign refreshes that campaign, and no other.
- Event types that touch nothing we store are processed and counted as skipped: no row changes, no API call.
- A delivery signed with another secret is refused (401) and stores nothing; immediate mode does not resend.
- Bodies carry `\\/` and `\\uXXXX` escapes and verify over those exact bytes (re-encoding them would not).
- The sandbox sends what Mautic sends: nothing for memberships or anonymous visitors' saves, `…_new` when a save
  identifies a contact; queue mode sends `webhook_limit` events per body and resends only after transport errors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import httpx
import orjson
import psycopg
import pytest
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.sync import SyncResult
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines.webhooks.verify import InvalidSignature, base64_hmac_verifier
from nextcrm_pipelines_tests.accounting import free_port, mirror
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply
from nextcrm_sandbox.mautic import MauticControl, php_json
from nextcrm_sandbox.server import SandboxServer

SECRET = "mautic-webhook-" + "s" * 24
CAMPAIGNS = "mautic_campaigns"
NEW_CONTACT = "mautic.lead_post_save_new"
UPDATED = "mautic.lead_post_save_update"
DELETED = "mautic.lead_post_delete"
POINTS = "mautic.lead_points_change"
CACHED_LISTING = {"limit": 0, "withContactCounts": "true"}


# --- helpers -----------------------------------------------------------------------------------------------


def hooked(database_url: str, box: SecretBox, connection: Connection, secret: str = SECRET) -> None:
    """Keep the webhook's secret with the connection's other secrets, as `connections add` would."""
    with psycopg.connect(database_url) as conn:
        secrets = vault.load_secrets(conn, connection.id, box).reveal()
        vault.add_connection(conn, provider="mautic", display_name=connection.display_name, box=box,
                             secrets={**secrets, "webhook_secret": secret}, external_tenant=connection.external_tenant,
                             base_url=connection.base_url, settings=connection.settings,
                             connection_id=connection.id)  # fmt: skip


def twin(database_url: str, box: SecretBox, connection: Connection) -> Connection:
    """A second connection to the same installation with the same API credentials and webhook secret."""
    with psycopg.connect(database_url) as conn:
        secrets = vault.load_secrets(conn, connection.id, box).reveal()
        return vault.add_connection(conn, provider="mautic", display_name=f"{connection.display_name} twin", box=box,
                                    secrets=secrets, base_url=connection.base_url,
                                    settings=connection.settings)  # fmt: skip


def sync(database_url: str, schema: str, sandbox: SandboxServer, connection: Connection) -> list[SyncResult]:
    """Sync the last week of campaigns, day by day, and check every day succeeded."""
    days = days_back(sandbox_now(sandbox).date(), 7)
    results = sync_days(database_url, schema, connection.id, CAMPAIGNS, days)
    assert all(r.status == "success" for r in results), [r.error for r in results]
    return results


class Mautic:
    """The installation's REST API with a bearer token, as a Mautic user's integration would call it."""

    def __init__(self, sandbox: SandboxServer, control: MauticControl, account: str, client_id: str) -> None:
        token = control.grant(account, client_id)["token"]["access_token"]
        self.http = httpx.Client(base_url=f"{sandbox.url}/mautic/{account}/api", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def close(self) -> None:
        self.http.close()


@contextmanager
def mautic_api(sandbox, control, account, database_url, box, connection) -> Iterator[Mautic]:
    with psycopg.connect(database_url) as conn:
        client_id = vault.load_secrets(conn, connection.id, box).reveal()["client_id"]
    api = Mautic(sandbox, control, account, client_id)
    try:
        yield api
    finally:
        api.close()


@contextmanager
def subscribed(control: MauticControl, account: str, url: str, **options: Any) -> Iterator[dict[str, Any]]:
    """A webhook of the installation for the test's duration (deleted afterwards: the sandbox is shared)."""
    sub = control.subscribe_webhooks(account, url, options.pop("secret", SECRET), **options)
    try:
        yield sub
    finally:
        control.unsubscribe_webhooks(sub["id"])


def live_counts(control: MauticControl, account: str) -> dict[str, int]:
    """Each campaign's contacts right now (memberships not manually removed), from the sandbox's own state."""
    counts = Counter(r["campaign_id"] for r in control.export(account, "campaign_contacts")["records"])
    return {str(c["id"]): counts.get(str(c["id"]), 0) for c in control.export(account, "campaigns")["records"]}


def members(control: MauticControl, account: str) -> dict[str, set[str]]:
    """Contact id -> the campaigns it is in now."""
    found: dict[str, set[str]] = {}
    for row in control.export(account, "campaign_contacts")["records"]:
        found.setdefault(row["lead_id"], set()).add(row["campaign_id"])
    return found


def identified(control: MauticControl, account: str) -> list[str]:
    """Ids of the contacts that are not anonymous (Mautic sends their saves), in id order."""
    names = ("firstname", "lastname", "company", "email")
    contacts = control.export(account, "contacts")["records"]
    return [str(c["id"]) for c in contacts if any(c["fields"]["all"].get(name) for name in names)]


def outsiders(control: MauticControl, account: str, campaign: str) -> list[str]:
    """Identified contacts that are not in the campaign now, in id order."""
    memberships = members(control, account)
    return [lead for lead in identified(control, account) if campaign not in memberships.get(lead, set())]


def counts(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Campaign id -> the contact count a mirror row holds."""
    return {cid: row["contact_count"] for cid, row in rows.items()}


def comparable(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows without what differs by connection or by the moment of writing."""
    return {cid: {k: v for k, v in row.items() if k not in ("connection_id", "synced_at")} for cid, row in rows.items()}


def post_signed(url: str, payload: dict[str, Any]) -> httpx.Response:
    """Deliver a Mautic body as Mautic would: PHP's JSON bytes, `Webhook-Signature` over them."""
    body = php_json(payload)
    signature = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    return httpx.post(url, content=body, headers={"Webhook-Signature": signature, "Content-Type": "application/json"})


def skipped_in_runs(instance: dg.DagsterInstance) -> int:
    """The `skipped_types` the apply runs reported."""
    total = 0
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
            total += record.dagster_event.event_specific_data.metadata["skipped_types"].value
    return total


def webhook_logs(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT connection_id, status, total_records, inserted_records, updated_records FROM {} "
                    "WHERE asset = 'mautic_webhooks' ORDER BY id").format(table("integration_sync_logs", schema))
        ).fetchall()  # fmt: skip


# --- end to end ---------------------------------------------------------------------------------------------


def test_contact_edits_and_deletes_bring_campaign_counts_to_the_live_figures(database_url, schema, box, sandbox,
                                                                             mautic):  # fmt: skip
    control, account, connection = mautic("client_credentials", contacts=40)
    hooked(database_url, box, connection)
    sync(database_url, schema, sandbox, connection)
    before = mirror(database_url, schema, CAMPAIGNS, connection.id)
    assert counts(before) == live_counts(control, account)
    memberships = members(control, account)
    campaign = max(before, key=lambda cid: (before[cid]["contact_count"], cid))
    joiner = outsiders(control, account, campaign)[0]
    leaver = next(lead for lead, joined in sorted(memberships.items()) if campaign not in joined and lead != joiner)
    left = memberships[leaver]
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}") as sub,
        mautic_api(sandbox, control, account, database_url, box, connection) as api,
        dg.instance_for_test() as instance,
    ):
        assert api.call("POST", f"/campaigns/{campaign}/contact/{joiner}/add") == {"success": 1}
        assert control.flush_webhooks()
        assert control.webhook_attempts(sub["id"]) == []  # Mautic tells no one of a join
        assert tick_and_apply(instance, "mautic") == []
        api.call("PATCH", f"/contacts/{joiner}/edit", json={"position": "Head of growth"})
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
        edited = mirror(database_url, schema, CAMPAIGNS, connection.id)
        api.call("DELETE", f"/contacts/{leaver}/delete")
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
        attempts = control.webhook_attempts(sub["id"])
    assert [a["status"] for a in attempts] == [200, 200]
    expected = counts(before)
    expected[campaign] += 1
    assert counts(edited) == expected  # the joiner's edit refreshed its campaigns: the silent join shows
    for cid in left:
        expected[cid] -= 1
    after = mirror(database_url, schema, CAMPAIGNS, connection.id)
    assert counts(after) == expected == live_counts(control, account)
    for cid, row in after.items():  # the rest of each row is what the sync wrote, at the same version
        assert (row["name"], row["published"], row["source_updated_at"], row["deleted"]) == (
            before[cid]["name"], before[cid]["published"], before[cid]["source_updated_at"], False)  # fmt: skip
    statuses = [(kind, status) for _, kind, status, _, _ in inbox_rows(database_url, schema, "mautic")]
    assert statuses == [(UPDATED, "processed"), (DELETED, "processed")]
    # The edit stored the contact (only campaigns were synced here) and rewrote the one campaign whose count
    # moved; the delete re-read every campaign (a deleted contact's memberships are gone) and rewrote the ones
    # it had been in.
    assert webhook_logs(database_url, schema) == [(connection.id, "success", 1, 1, 1),
                                                  (connection.id, "success", 1, 0, len(left))]  # fmt: skip


def test_duplicates_and_newest_first_leave_the_in_order_table(database_url, schema, box, sandbox, mautic):
    control, account, in_order = mautic("client_credentials", contacts=40)
    hooked(database_url, box, in_order)
    reordered = twin(database_url, box, in_order)
    for connection in (in_order, reordered):
        sync(database_url, schema, sandbox, connection)
    campaign = sorted(live_counts(control, account), key=int)[0]
    x, y = outsiders(control, account, campaign)[:2]
    memberships = members(control, account)
    deleted = next(lead for lead, joined in sorted(memberships.items()) if joined and lead not in (x, y))
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{in_order.id}") as first,
        subscribed(control, account, f"{url}/webhooks/mautic/{reordered.id}", hold=True) as second,
        mautic_api(sandbox, control, account, database_url, box, in_order) as api,
        dg.instance_for_test() as instance,
    ):
        api.call("POST", f"/campaigns/{campaign}/contact/{x}/add")  # joins and leaves send nothing
        api.call("POST", f"/campaigns/{campaign}/contact/{y}/add")
        api.call("PATCH", f"/contacts/{x}/edit", json={"points": 999})  # saved, and its points changed
        api.call("POST", f"/campaigns/{campaign}/contact/{x}/remove")
        api.call("PATCH", f"/contacts/{y}/edit", json={"position": "Buyer"})
        api.call("DELETE", f"/contacts/{deleted}/delete")
        assert control.flush_webhooks()
        held = control.release_webhooks(second["id"], order="newest-first", copies=3)
        assert control.flush_webhooks()
        assert len(tick_and_apply(instance, "mautic")) == 1
        sent = control.webhook_attempts(first["id"])
        resent = control.webhook_attempts(second["id"])
    assert held == len(sent) == 4 and len(resent) == 3 * len(sent)
    assert all(a["status"] == 200 for a in sent + resent)
    one = mirror(database_url, schema, CAMPAIGNS, in_order.id)
    other = mirror(database_url, schema, CAMPAIGNS, reordered.id)
    assert comparable(one) == comparable(other)
    assert counts(one) == live_counts(control, account)
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT connection_id, event_type, count(*), count(*) FILTER (WHERE status = 'processed') "
                    "FROM {} GROUP BY 1, 2").format(table("webhook_events", schema))
        ).fetchall()  # fmt: skip
    kinds = {(cid, kind): (total, processed) for cid, kind, total, processed in stored}
    for connection in (in_order, reordered):  # the copies were redeliveries: each event stored once
        assert {kind: n for (cid, kind), n in kinds.items() if cid == connection.id} == {
            UPDATED: (2, 2), POINTS: (1, 1), DELETED: (1, 1)}  # fmt: skip


def test_a_resync_after_a_webhook_refresh_keeps_the_live_count(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=40)
    hooked(database_url, box, connection)
    with mautic_api(sandbox, control, account, database_url, box, connection) as api:
        cached = api.call("GET", "/campaigns", params=CACHED_LISTING)["campaigns"]  # Mautic keeps these 12 hours
        campaign = sorted(cached, key=int)[0]
        first, second = outsiders(control, account, campaign)[:2]
        api.call("POST", f"/campaigns/{campaign}/contact/{first}/add")
        sync(database_url, schema, sandbox, connection)
        synced = mirror(database_url, schema, CAMPAIGNS, connection.id)
        with (
            receiver(database_url, schema, box) as url,
            subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}"),
            dg.instance_for_test() as instance,
        ):
            api.call("POST", f"/campaigns/{campaign}/contact/{second}/add")
            api.call("PATCH", f"/contacts/{second}/edit", json={"position": "Champion"})
            assert control.flush_webhooks()
            assert len(tick_and_apply(instance, "mautic")) == 1
        refreshed = mirror(database_url, schema, CAMPAIGNS, connection.id)
        listed = api.call("GET", "/campaigns", params=CACHED_LISTING)["campaigns"]
    stale = {cid: raw["contactCount"] for cid, raw in cached.items()}
    assert {cid: raw["contactCount"] for cid, raw in listed.items()} == stale  # Mautic's listing is still cached
    assert synced[campaign]["contact_count"] == stale[campaign] + 1  # the sync counted the join the cache missed
    assert refreshed[campaign]["contact_count"] == stale[campaign] + 2 == live_counts(control, account)[campaign]
    again = sync(database_url, schema, sandbox, connection)  # every partition re-run after the refresh
    resynced = mirror(database_url, schema, CAMPAIGNS, connection.id)
    assert counts(resynced) == live_counts(control, account)
    assert comparable(resynced) == comparable(refreshed)
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0


def test_event_types_that_touch_nothing_are_counted_and_change_nothing(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=20)
    hooked(database_url, box, connection)
    sync(database_url, schema, sandbox, connection)
    before = mirror(database_url, schema, CAMPAIGNS, connection.id)
    at = "2026-11-26T10:00:00+00:00"
    bodies = [
        {"mautic.company_post_save": [{"company": {"id": 3, "fields": {"all": {"companyname": "Acme"}}},
                                        "timestamp": at}]},
        {"mautic.page_on_hit": [{"hit": {"id": 9, "url": "https://example.com/pricing", "lead": {"id": 1}},
                                 "timestamp": at}]},
        {"mautic.email_on_open": [{"stat": {"id": 4, "source": "email", "sourceId": 2, "lead": {"id": 1}},
                                   "timestamp": at}]},
    ]  # fmt: skip
    requests_before = control.stats()["by_account"][account]["requests"]
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        for payload in bodies:
            assert post_signed(f"{url}/webhooks/mautic/{connection.id}", payload).status_code == 200
        assert len(tick_and_apply(instance, "mautic")) == 1
        assert skipped_in_runs(instance) == 3
    assert [status for _, _, status, _, _ in inbox_rows(database_url, schema, "mautic")] == ["processed"] * 3
    assert webhook_logs(database_url, schema) == [(connection.id, "success", 3, 0, 0)]
    assert mirror(database_url, schema, CAMPAIGNS, connection.id) == before
    assert control.stats()["by_account"][account]["requests"] == requests_before  # nothing was re-read


def test_campaign_emails_refresh_the_campaign_that_sent_them(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=30)
    hooked(database_url, box, connection)
    sync(database_url, schema, sandbox, connection)
    before = mirror(database_url, schema, CAMPAIGNS, connection.id)
    sent_by, opened_from, untold = sorted(before, key=int)[:3]
    memberships = members(control, account)
    for campaign in (sent_by, opened_from, untold):  # joins send no webhook: nothing tells us of these
        lead = next(lead for lead, joined in sorted(memberships.items()) if campaign not in joined)
        control.add_to_campaign(account, int(campaign), int(lead))
    send_event = next(iter(before[sent_by]["raw"]["events"]))
    open_event = next(iter(before[opened_from]["raw"]["events"]))
    at = "2026-11-26T10:00:00+00:00"
    bodies = [
        {"mautic.email_on_send": [{"email": {"id": 1}, "contact": {"id": 1}, "source": ["campaign.event", send_event],
                                   "timestamp": at}]},
        {"mautic.email_on_open": [{"stat": {"id": 7, "source": "campaign.event", "sourceId": int(open_event),
                                            "lead": {"id": 2}}, "timestamp": at}]},
    ]  # fmt: skip
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        for payload in bodies:
            assert post_signed(f"{url}/webhooks/mautic/{connection.id}", payload).status_code == 200
        assert len(tick_and_apply(instance, "mautic")) == 1
    after = mirror(database_url, schema, CAMPAIGNS, connection.id)
    truth = live_counts(control, account)
    changed = {cid for cid in after if after[cid]["contact_count"] != before[cid]["contact_count"]}
    assert changed == {sent_by, opened_from}
    assert {cid: after[cid]["contact_count"] for cid in changed} == {cid: truth[cid] for cid in changed}
    assert after[untold]["contact_count"] == truth[untold] - 1  # no event named it: left for the next sync


def test_a_delivery_signed_with_another_secret_is_refused_and_not_resent(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=20)
    hooked(database_url, box, connection)
    contact = identified(control, account)[0]
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}", secret="not-the-secret") as sub,
    ):
        control.update_record(account, "contacts", int(contact), {"position": "Analyst"})
        assert control.flush_webhooks()
        attempts = control.webhook_attempts(sub["id"])
    assert [(a["number"], a["status"]) for a in attempts] == [(1, 401)]  # refused, and immediate mode gave up
    assert inbox_rows(database_url, schema) == []


def test_php_escaped_bodies_verify_over_their_exact_bytes(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=20)
    hooked(database_url, box, connection)
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}", events=[NEW_CONTACT]) as sub,
        mautic_api(sandbox, control, account, database_url, box, connection) as api,
        dg.instance_for_test() as instance,
    ):
        created = api.call("POST", "/contacts/new", json={"firstname": "Zoë", "website": "https://zoë.example/hi"})
        assert control.flush_webhooks()
        assert [a["status"] for a in control.webhook_attempts(sub["id"])] == [200]
        assert len(tick_and_apply(instance, "mautic")) == 1
    with psycopg.connect(database_url) as conn:
        raw_body, headers, payload = conn.execute(
            sql.SQL("SELECT raw_body, headers, payload FROM {}").format(table("webhook_events", schema))
        ).fetchone()
    body = raw_body.encode()
    assert b"https:\\/\\/zo\\u00eb.example\\/hi" in body and b'"firstname":"Zo\\u00eb"' in body
    assert payload["contact"]["id"] == created["contact"]["id"]
    assert payload["contact"]["fields"]["all"]["website"] == "https://zoë.example/hi"
    expected = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == expected
    assert headers["x-origin-base-url"] == f"{sandbox.url}/mautic/{account}"
    verify = base64_hmac_verifier("webhook-signature")
    verify(headers, body, SECRET, time.time())
    reencoded = orjson.dumps(orjson.loads(body))  # the same JSON, other bytes: the signature does not cover it
    assert reencoded != body
    with pytest.raises(InvalidSignature):
        verify(headers, reencoded, SECRET, time.time())
    assert [status for _, _, status, _, _ in inbox_rows(database_url, schema, "mautic")] == ["processed"]


# --- the sandbox's events and delivery modes --------------------------------------------------------------------------


def test_the_sandbox_sends_only_the_events_mautic_sends(database_url, schema, box, sandbox, mautic):
    control, account, connection = mautic("client_credentials", contacts=20)
    hooked(database_url, box, connection)
    live = live_counts(control, account)
    campaign = max(live, key=lambda cid: (live[cid], cid))
    joiner = outsiders(control, account, campaign)[0]
    member = next(lead for lead, joined in sorted(members(control, account).items()) if campaign in joined)
    anonymous = dict.fromkeys(("firstname", "lastname", "company", "email", "twitter", "dateIdentified"))
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}") as sub,
        mautic_api(sandbox, control, account, database_url, box, connection) as api,
    ):
        api.call("POST", f"/campaigns/{campaign}/contact/{joiner}/add")
        api.call("POST", f"/campaigns/{campaign}/contact/{member}/remove")
        control.remove_from_campaign(account, int(campaign), int(joiner))
        control.add_to_campaign(account, int(campaign), int(member))
        control.changes(account, joins=3, leaves=2)
        visitor = control.add_record(account, "contacts", anonymous)  # an anonymous visitor's save: nothing either
        assert control.flush_webhooks()
        assert control.webhook_attempts(sub["id"]) == []
        path = f"/contacts/{visitor['id']}"
        api.call("PATCH", f"{path}/edit", json={"points": visitor["points"] + 7})  # points change: sent
        api.call("PATCH", f"{path}/edit", json={"email": "ada@example.com"})  # identified by this save
        api.call("PATCH", f"{path}/edit", json={"position": "CTO"})
        api.call("DELETE", f"{path}/delete")
        assert control.flush_webhooks()
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            sql.SQL("SELECT event_type, payload FROM {} ORDER BY id").format(table("webhook_events", schema))
        ).fetchall()
    assert [kind for kind, _ in stored] == [POINTS, NEW_CONTACT, UPDATED, DELETED]
    (_, points), (_, new), (_, updated), (_, deleted) = stored
    assert points["points"] == {"old_points": visitor["points"], "new_points": visitor["points"] + 7}
    assert points["contact"]["dateIdentified"] is None and new["contact"]["dateIdentified"] is not None
    assert new["contact"]["fields"]["all"]["email"] == "ada@example.com"
    assert updated["contact"]["fields"]["all"]["position"] == "CTO"
    assert deleted["id"] == visitor["id"] and deleted["contact"]["id"] is None
    assert {p["contact"]["id"] for p in (points, new, updated)} == {visitor["id"]}


def test_queue_mode_batches_at_the_cron_run_and_resends_only_after_transport_errors(
    database_url, schema, box, sandbox, mautic
):
    control, account, connection = mautic("client_credentials", contacts=20)
    hooked(database_url, box, connection)
    contacts = identified(control, account)[:3]
    dead = f"http://127.0.0.1:{free_port()}/webhooks/mautic/{connection.id}"
    with (
        receiver(database_url, schema, box) as url,
        subscribed(control, account, f"{url}/webhooks/mautic/{connection.id}", mode="queue", webhook_limit=2,
                   events=[UPDATED]) as queued,
        subscribed(control, account, dead, mode="queue", retry_delays=[0.01, 0.01],
                   events=[UPDATED]) as unreachable_queue,
        subscribed(control, account, dead, events=[UPDATED]) as unreachable_now,
    ):  # fmt: skip
        for contact in contacts:
            control.update_record(account, "contacts", int(contact), {"position": "Analyst"})
        assert control.flush_webhooks()
        assert control.webhook_attempts(queued["id"]) == [] and control.webhook(queued["id"])["queued"] == 3
        assert control.process_webhooks(account) == 3  # 2 + 1 to the receiver, 1 (of 3 events) to the dead URL
        assert control.flush_webhooks()
        delivered = control.webhook_attempts(queued["id"])
        failed_queue = control.webhook_attempts(unreachable_queue["id"])
        failed_now = control.webhook_attempts(unreachable_now["id"])
    assert [(a["number"], a["status"]) for a in delivered] == [(1, 200), (1, 200)]
    assert [a["number"] for a in failed_queue] == [1, 2, 3] and all(a["error"] for a in failed_queue)
    assert [a["number"] for a in failed_now] == [1, 1, 1] and all(a["error"] for a in failed_now)
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(sql.SQL("SELECT DISTINCT raw_body FROM {}").format(table("webhook_events", schema)))
        bodies = [orjson.loads(raw) for (raw,) in stored.fetchall()]
    assert sorted(len(b[UPDATED]) for b in bodies) == [1, 2]
    assert len(inbox_rows(database_url, schema, "mautic")) == 3


def test_subscriptions_refuse_what_mautic_would_not_send(sandbox, mautic):
    _, account, _ = mautic("client_credentials", contacts=5)
    url = f"http://127.0.0.1:{free_port()}/hook"
    refusals = [({"events": ["mautic.campaign_on_trigger"]}, 400), ({"mode": "cron"}, 400),
                ({"retry_delays": [1]}, 400), ({"account": f"nope-{uuid.uuid4().hex[:6]}"}, 404)]  # fmt: skip
    for options, status in refusals:
        body = {"account": account, "url": url, "secret": SECRET, **options}
        response = httpx.post(f"{sandbox.url}/_sandbox/mautic/webhooks", json=body)
        assert response.status_code == status, (options, response.text)
