"""Mautic's entities in the contract suite: `mautic_contacts` (with the ids of their segments) and
`mautic_segments` (with live member counts).

Contacts are read by day (`dateModified`, or `dateAdded` while never modified), paged by id; segments are
read whole on every run. Mautic keeps no trace of a deleted record, so deletions reach the mirror through the
id sweep. Accounts are reached with the client
credentials grant.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth
from nextcrm_sandbox.mautic import MauticControl

EXPORTS = {"mautic_contacts": "contacts", "mautic_segments": "segments"}


def _open(env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    control = MauticControl(env.server)
    client_id, secret = f"mautic-{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}"
    account = control.add_account(**{"seed": 6, "campaigns": 5, "days": days, **spec,
                                     "clients": [{"client_id": client_id, "client_secret": secret}]})  # fmt: skip
    with psycopg.connect(env.database_url) as conn:
        connection = vault.add_connection(
            conn, provider="mautic", display_name=f"Mautic {account['id']}", box=env.box,
            base_url=f"{env.server.url}{account['base_path']}",
            secrets={"client_id": client_id, "client_secret": secret, "grant_type": "client_credentials"},
            settings={"page_size": page_size},
        )  # fmt: skip
    return Account(env, connection, days, (control, account["id"]))


def _memberships(control: MauticControl, account: str) -> dict[str, list[str]]:
    """Contact id -> the segments it is in now (not manually removed), from the sandbox's own state."""
    found: dict[str, set[str]] = {}
    for row in control.export(account, "segment_contacts")["records"]:
        if row["manually_removed"] == "0":
            found.setdefault(row["lead_id"], set()).add(row["leadlist_id"])
    return {lead: sorted(ids, key=int) for lead, ids in found.items()}


def _truth(account: Account, entity: str) -> Truth:
    control, account_id = account.handle
    export = control.export(account_id, EXPORTS[entity])
    joined = _memberships(control, account_id)
    if entity == "mautic_contacts":
        rows = {}
        for raw in export["records"]:
            fields, rid = raw["fields"]["all"], str(raw["id"])
            rows[rid] = (False, fields.get("email"), fields.get("firstname"), fields.get("city"), raw["points"],
                         joined.get(rid, []))  # fmt: skip
    else:
        members = Counter(segment for ids in joined.values() for segment in ids)
        rows = {str(raw["id"]): (False, raw["name"], members.get(str(raw["id"]), 0)) for raw in export["records"]}
    return Truth(rows, frozenset(str(i) for i in export["deleted_ids"]))


def _contact_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["email"], row["first_name"], row["city"], row["points"], row["segment_ids"]


def _segment_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["name"], row["member_count"]


def _at_midnight(account: Account, entity: str, midnight: datetime) -> str:
    control, account_id = account.handle
    fields = {"firstname": "Midnight"} if entity == "mautic_contacts" else {}
    return str(control.add_record(account_id, EXPORTS[entity], fields, at=midnight.timestamp())["id"])


def _delete_two(account: Account, entity: str) -> list[str]:
    control, account_id = account.handle
    victims = [raw["id"] for raw in control.export(account_id, EXPORTS[entity])["records"]][1:3]
    for rid in victims:
        control.delete_record(account_id, EXPORTS[entity], rid)
    return [str(rid) for rid in victims]


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    control, account_id = account.handle
    control.set_faults(account=account_id, server_errors=server_errors, rate_limited=rate_limited)
    try:
        yield
    finally:
        control.clear_faults(account=account_id)


def _case(entity: str, spec: Mapping[str, int], records: int, daily: bool = True) -> EntityCase:
    key = EXPORTS[entity]
    return EntityCase(
        provider="mautic", entity=entity,
        open=lambda env, n, days, page_size: _open(env, {**spec, key: n}, days, page_size),
        truth=lambda account: _truth(account, entity),
        row=_contact_row if entity == "mautic_contacts" else _segment_row,
        remove=lambda account: _delete_two(account, entity), faults=_faults,
        at_midnight=(lambda account, midnight: _at_midnight(account, entity, midnight)) if daily else None,
        whole_list_reason=None if daily else "segments are read whole on every run: a member joining or leaving "
        "changes a segment's count but not its dateModified",
        deletions="sweep", records=records,
    )  # fmt: skip


CASES = [
    _case("mautic_contacts", {"segments": 6}, records=60),
    _case("mautic_segments", {"contacts": 40}, records=30, daily=False),
]
