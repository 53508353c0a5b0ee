"""QuickBooks webhooks end to end: a change in the sandbox company → signed delivery → receiver → inbox →
sensor tick → apply run (re-read by id) → the `quickbooks_invoices` row.

Connections are made through the sandbox's OAuth flow and synced first, as a user would have them.
Both payload formats (legacy `eventNotifications`, CloudEvents arrays) carry edits, voids, hard
deletes, merges and creates into the table; three copies of every delivery sent newest first, applied
one event at a time, end in the same table as one in-order delivery; events of another realm of the
same app change nothing; an invoice that is no longer found counts as deleted only when Change Data
Capture says so, and one that is neither found nor reported deleted fails the batch visibly; a delivery
signed with the wrong verifier token is refused and stores nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
import httpx
import orjson
import pytest

from nextcrm_pipelines.core.connect import connect
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.oauth import OAuthApp
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.quickbooks.webhooks import WEBHOOKS
from nextcrm_pipelines.webhooks.inbox import apply_pending
from nextcrm_pipelines_tests.accounting import (
    PROFILES,
    Account,
    assert_mirror_equals_export,
    connect_account,
    consent,
    free_port,
    mirror,
)
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now, sync_days
from nextcrm_pipelines_tests.test_webhook_receiver import b64
from nextcrm_pipelines_tests.webhook_helpers import inbox_rows, receiver, tick_and_apply

PROFILE = PROFILES["quickbooks_invoices"]
TOKEN = "qbo-verifier-token-0123456789"
TENANT = {"invoices": 40, "customers": 10, "days": 3, "currencies": ["USD"], "deleted_invoices": 0}


@pytest.fixture
def verifier_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The app's verifier token, configured as QuickBooks apps configure it: once per app."""
    monkeypatch.setenv("QUICKBOOKS_WEBHOOK_VERIFIER_TOKEN", TOKEN)
    return TOKEN


def sync_recent(database_url: str, schema: str, sandbox, connection_id: str) -> None:
    today = sandbox_now(sandbox).date()
    results = sync_days(database_url, schema, connection_id, PROFILE.entity, days_back(today, TENANT["days"] + 1))
    assert all(r.status == "success" for r in results), [r.error for r in results]


def synced_account(sandbox, database_url: str, schema: str, box) -> Account:
    account = connect_account(sandbox, database_url, box, PROFILE, **TENANT)
    sync_recent(database_url, schema, sandbox, account.connection.id)
    assert_mirror_equals_export(account, database_url, schema)
    return account


def connect_again(account: Account, database_url: str, box, name: str) -> Connection:
    """A second connection to the same company through the same app (a new consent, a new grant)."""
    provider = get_provider("quickbooks")
    app = OAuthApp(account.client_id, account.client_secret, f"http://127.0.0.1:{free_port()}/callback")
    (connection,) = connect(spec=provider.oauth, discover=provider.discover_tenants, app=app,
                            database_url=database_url, box=box, base_url=f"{account.sandbox.url}/quickbooks",
                            name=name, on_url=consent, extra_authorize_params={"sandbox_tenant": account.tenant_id},
                            connection_settings={"requests_per_second": 0, **PROFILE.settings})  # fmt: skip
    return connection


@contextmanager
def subscribed(account: Account, url: str, connection_id: str | None = None, **options: Any) -> Iterator[str]:
    """The app's webhooks delivered to one connection's receiver URL; yields the subscription id."""
    target = f"{url}/webhooks/quickbooks/{connection_id or account.connection.id}"
    options.setdefault("verifier_token", TOKEN)
    sub = account.control.subscribe_webhooks(target, app=account.client_id, **options)
    try:
        yield sub["id"]
    finally:
        account.control.unsubscribe_webhooks(sub["id"])


def flush(account: Account) -> None:
    assert account.control.flush_webhooks()


def statuses(account: Account, subscription: str) -> list[int | None]:
    return [a["status"] for a in account.control.webhook_attempts() if a["subscription"] == subscription]


def realm_requests(account: Account) -> int:
    return int(account.control.stats()["tenants"][account.tenant_id]["requests"])


def live_ids(rows: dict[str, dict[str, Any]]) -> list[str]:
    return sorted((rid for rid, row in rows.items() if not row["deleted"]), key=int)


def at(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, UTC)


def comparable(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A connection's rows without what differs between connections (its id, when they were written)."""
    return {rid: {k: v for k, v in row.items() if k not in ("connection_id", "synced_at")} for rid, row in rows.items()}


@pytest.mark.parametrize("shape", ["legacy", "cloudevents"])
def test_edits_voids_deletes_merges_and_creates_reach_the_table(shape, database_url, schema, box, sandbox,
                                                                verifier_token):  # fmt: skip
    account = synced_account(sandbox, database_url, schema, box)
    before = mirror(database_url, schema, PROFILE.entity, account.connection.id)
    edit, void, delete, source, into = live_ids(before)[:5]
    control, tenant, now = account.control, account.tenant_id, sandbox.clock()
    with receiver(database_url, schema, box) as url, subscribed(account, url, format=shape) as sub, \
            dg.instance_for_test() as instance:  # fmt: skip
        randomly = control.changes(tenant, edits=2)["edited"]  # the control API's bulk changes notify too
        control.update_record(tenant, edit, {"PrivateNote": "Called the customer"}, updated_at=now + 1)
        control.void_invoice(tenant, void, updated_at=now + 2)
        control.delete_invoice(tenant, delete, updated_at=now + 3)
        merged = control.merge_invoices(tenant, source, into, updated_at=now + 4)["merged"]
        created = control.add_record(tenant, "invoice", updated_at=now + 5)
        flush(account)
        assert statuses(account, sub) == [200] * 6  # one delivery per control call
        assert len(tick_and_apply(instance, "quickbooks")) == 1
        assert all(run.is_success for run in instance.get_runs())
    rows = assert_mirror_equals_export(account, database_url, schema)
    assert rows[edit]["raw"]["PrivateNote"] == "Called the customer"
    assert rows[edit]["source_updated_at"] == at(now + 1) > before[edit]["source_updated_at"]
    assert (rows[void]["status"], rows[void]["deleted"], rows[void]["total"]) == ("voided", True, 0)
    assert before[void]["total"] > 0 and not before[void]["deleted"]
    # The hard delete keeps what we knew and says it is gone, as of the event's time.
    gone, known = rows[delete], before[delete]
    assert (gone["status"], gone["deleted"], gone["source_updated_at"]) == ("deleted", True, at(now + 3))
    assert (gone["doc_number"], gone["total"]) == (known["doc_number"], known["total"])
    assert (rows[source]["status"], rows[source]["deleted"]) == ("deleted", True)
    assert rows[into]["total"] == before[into]["total"] + before[source]["total"] == Decimal(str(merged["TotalAmt"]))
    assert rows[created["Id"]]["total"] == Decimal(str(created["TotalAmt"])) and not rows[created["Id"]]["deleted"]
    assert all(rows[rid]["source_updated_at"] > before[rid]["source_updated_at"] for rid in randomly)
    inbox = inbox_rows(database_url, schema, "quickbooks")
    # Seven invoice events; a payment an edit records, or one a void, delete or merge unlinks, has its own.
    invoice_events = [kind for _, kind, _, _, _ in inbox if kind.lower().startswith(("invoice.", "qbo.invoice."))]
    assert {status for _, _, status, _, _ in inbox} == {"processed"} and len(invoice_events) == 7
    kinds = {kind for _, kind, _, _, _ in inbox}
    if shape == "legacy":
        assert {"Invoice.Update", "Invoice.Void", "Invoice.Delete", "Invoice.Merge", "Invoice.Create"} <= kinds
    else:
        assert {f"qbo.invoice.{verb}.v1" for verb in ("updated", "voided", "deleted", "merged", "created")} <= kinds


@pytest.mark.parametrize("shape", ["legacy", "cloudevents"])
def test_three_copies_newest_first_end_in_the_same_table_as_one_in_order_delivery(shape, database_url, schema, box,
                                                                                  sandbox, verifier_token):  # fmt: skip
    account = synced_account(sandbox, database_url, schema, box)
    other = connect_again(account, database_url, box, "QuickBooks shuffled")
    sync_recent(database_url, schema, sandbox, other.id)
    first, second = account.connection.id, other.id
    assert comparable(mirror(database_url, schema, PROFILE.entity, first)) == comparable(
        mirror(database_url, schema, PROFILE.entity, second)
    )
    x, y, z, w, v = live_ids(mirror(database_url, schema, PROFILE.entity, first))[:5]
    control, tenant, now = account.control, account.tenant_id, sandbox.clock()
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance, \
            subscribed(account, url, first, format=shape) as in_order, \
            subscribed(account, url, second, format=shape, hold=True) as held:  # fmt: skip
        # Nine changes, nine deliveries: one invoice edited twice then voided, another edited then deleted, ...
        control.update_record(tenant, y, {"PrivateNote": "y first"}, updated_at=now + 1)
        control.update_record(tenant, x, {"PrivateNote": "x first"}, updated_at=now + 2)
        control.update_record(tenant, x, {"PrivateNote": "x second"}, updated_at=now + 3)
        control.void_invoice(tenant, x, updated_at=now + 4)
        control.delete_invoice(tenant, y, updated_at=now + 5)
        control.merge_invoices(tenant, z, w, updated_at=now + 6)
        created = control.add_record(tenant, "invoice", updated_at=now + 7)["Id"]
        control.update_record(tenant, created, {"PrivateNote": "new, then edited"}, updated_at=now + 8)
        control.update_record(tenant, v, {"PrivateNote": "v"}, updated_at=now + 8)
        flush(account)
        requests = realm_requests(account)
        assert len(tick_and_apply(instance, "quickbooks")) == 1  # the in-order connection, in one batch
        # Every named invoice re-read by one query, once each (and the payments a void or merge moved, by one more).
        kinds = [kind.lower().removeprefix("qbo.") for _, kind, _, _, _ in inbox_rows(database_url, schema)]
        reread = {kind.split(".")[0] for kind in kinds if kind.split(".")[1] not in ("delete", "deleted")}
        assert realm_requests(account) - requests == len(reread) and "invoice" in reread

        assert control.release_webhooks(held, order="newest-first", copies=3) == 9
        flush(account)
        assert statuses(account, in_order) == [200] * 9 and statuses(account, held) == [200] * 27
        # Applied one event per batch, newest first: every re-read and deletion meets fresher data or its own.
        outcome = apply_pending(database_url=database_url, schema=schema, provider="quickbooks",
                                apply=WEBHOOKS.apply, batch=1)  # fmt: skip
        assert (outcome.processed, outcome.failed) == (len(kinds), 0)
        assert tick_and_apply(instance, "quickbooks") == []
    inbox = inbox_rows(database_url, schema, "quickbooks")
    assert len(inbox) == 2 * len(kinds) and {status for _, _, status, _, _ in inbox} == {"processed"}  # copies once
    rows = assert_mirror_equals_export(account, database_url, schema)
    assert comparable(mirror(database_url, schema, PROFILE.entity, second)) == comparable(rows)
    assert (rows[x]["status"], rows[x]["source_updated_at"]) == ("voided", at(now + 4))
    assert (rows[y]["status"], rows[y]["source_updated_at"]) == ("deleted", at(now + 5))
    assert (rows[z]["status"], rows[w]["source_updated_at"]) == ("deleted", at(now + 6))
    assert rows[created]["raw"]["PrivateNote"] == "new, then edited"


def test_events_of_another_realm_of_the_app_change_nothing(database_url, schema, box, sandbox, verifier_token):
    account = synced_account(sandbox, database_url, schema, box)
    # A second company connected to the same app: its events reach the same webhook endpoint.
    foreign = account.control.add_tenant(account.client_id, **{**TENANT, "seed": 6})["id"]
    assert foreign != account.tenant_id
    before = mirror(database_url, schema, PROFILE.entity, account.connection.id)
    theirs = {str(r["Id"]) for r in account.control.export(foreign, "invoice")["records"]}
    shared = [rid for rid in live_ids(before) if rid in theirs][:3]
    assert len(shared) == 3  # ids that exist in both companies: applying them here would show
    control, now = account.control, sandbox.clock()
    with receiver(database_url, schema, box) as url, subscribed(account, url) as sub, \
            dg.instance_for_test() as instance:  # fmt: skip
        control.delete_invoice(foreign, shared[0], updated_at=now + 1)
        control.void_invoice(foreign, shared[1], updated_at=now + 2)
        control.update_record(foreign, shared[2], {"PrivateNote": "theirs"}, updated_at=now + 3)
        flush(account)
        assert statuses(account, sub) == [200] * 3
        requests = realm_requests(account)
        assert len(tick_and_apply(instance, "quickbooks")) == 1
        assert all(run.is_success for run in instance.get_runs())
        assert realm_requests(account) == requests  # nothing re-read from our company either
    inbox = inbox_rows(database_url, schema, "quickbooks")
    # Three invoice events, and one per payment the delete or void left unapplied: all skipped, all processed.
    assert {status for _, _, status, _, _ in inbox} == {"processed"} and len(inbox) >= 3
    assert mirror(database_url, schema, PROFILE.entity, account.connection.id) == before


def test_a_delivery_signed_with_a_wrong_verifier_token_is_refused_and_nothing_is_stored(
    database_url, schema, box, sandbox, verifier_token
):
    account = synced_account(sandbox, database_url, schema, box)
    before = mirror(database_url, schema, PROFILE.entity, account.connection.id)
    wrong = {"verifier_token": "another-apps-token", "retry_delays": [0.05, 0.05]}
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance, \
            subscribed(account, url, **wrong) as sub:  # fmt: skip
        account.control.void_invoice(account.tenant_id, live_ids(before)[0])
        flush(account)
        assert statuses(account, sub) == [401, 401, 401]  # refused, retried on the schedule, given up
        assert tick_and_apply(instance, "quickbooks") == []
    assert inbox_rows(database_url, schema, "quickbooks") == []
    assert mirror(database_url, schema, PROFILE.entity, account.connection.id) == before


def test_an_invoice_no_longer_found_is_flagged_deleted_only_when_change_data_capture_says_so(
    database_url, schema, box, sandbox, verifier_token
):
    account = synced_account(sandbox, database_url, schema, box)
    before = mirror(database_url, schema, PROFILE.entity, account.connection.id)
    gone = live_ids(before)[0]
    control, tenant, now = account.control, account.tenant_id, sandbox.clock()
    unknown = {"name": "Invoice", "id": "987654", "operation": "Update", "lastUpdated": "2026-01-05T10:00:00-0700"}
    body = orjson.dumps({"eventNotifications": [{"realmId": tenant, "dataChangeEvent": {"entities": [unknown]}}]})
    with receiver(database_url, schema, box) as url, dg.instance_for_test() as instance:
        with subscribed(account, url):
            control.update_record(tenant, gone, {"PrivateNote": "about to go"}, updated_at=now + 1)
            flush(account)
        control.delete_invoice(tenant, gone, updated_at=now + 2)  # no subscription any more: no Delete event
        target = f"{url}/webhooks/quickbooks/{account.connection.id}"
        assert httpx.post(target, content=body, headers={"intuit-signature": b64(TOKEN, body)}).status_code == 200
        assert len(tick_and_apply(instance, "quickbooks")) == 1
        assert not any(run.is_success for run in instance.get_runs())  # the unexplained id fails the run
    rows = mirror(database_url, schema, PROFILE.entity, account.connection.id)
    # Only Change Data Capture knows when it was deleted: the row carries that time.
    assert (rows[gone]["status"], rows[gone]["deleted"], rows[gone]["source_updated_at"]) == ("deleted", True,
                                                                                              at(now + 2))  # fmt: skip
    assert rows[gone]["doc_number"] == before[gone]["doc_number"]
    assert "987654" not in rows
    # Only the event naming the unexplained id fails (and is retried with backoff).
    (_, _, applied, _, no_error), (_, _, failed, attempts, error) = inbox_rows(database_url, schema, "quickbooks")
    assert (applied, no_error, failed, attempts) == ("processed", None, "failed", 1)
    assert "987654" in error and "neither found nor reported deleted" in error
