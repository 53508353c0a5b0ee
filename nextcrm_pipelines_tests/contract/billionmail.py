"""BillionMail's entities in the per-entity contract suite: `billionmail_contacts` and `billionmail_groups`.

Both are read whole on every run: BillionMail's lists take no time filter, and neither a group's counts nor a
contact's subscription moves an update time. Deleted contacts and groups simply vanish from the lists, so the
id sweep flags them. Installs are reached with the admin user's login.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, Truth
from nextcrm_sandbox.billionmail import BillionMailControl

EXPORTS = {"billionmail_contacts": "contacts", "billionmail_groups": "groups"}
WHOLE_LIST = ("BillionMail's contact and group lists take no updated-since filter, and neither a subscription "
              "change nor a group's counts move an update time: both are read whole on every run")  # fmt: skip


def _open(env: Env, spec: Mapping[str, Any], days: int, page_size: int) -> Account:
    control = BillionMailControl(env.server)
    password = f"pw-{uuid.uuid4().hex[:8]}"
    account = control.add_account(**{"seed": 9, "campaigns": 3, "days": days, **spec, "password": password})
    secrets = {"username": account["username"], "password": password}
    base_url = f"{env.server.url}{account['base_path']}"
    with psycopg.connect(env.database_url) as conn:
        connection = vault.add_connection(conn, provider="billionmail", display_name=f"BillionMail {account['id']}",
                                          box=env.box, secrets=secrets, base_url=base_url,
                                          settings={"page_size": page_size})  # fmt: skip
    return Account(env, connection, days, (control, account["id"], base_url, secrets))


def _export(account: Account, entity: str) -> dict[str, Any]:
    control, account_id, _, _ = account.handle
    return control.export(account_id, EXPORTS[entity])


def _truth(account: Account, entity: str) -> Truth:
    export = _export(account, entity)
    render = _contact if entity == "billionmail_contacts" else _group
    return Truth({str(raw["id"]): render(raw) for raw in export["records"]},
                 frozenset(str(i) for i in export["deleted_ids"]))  # fmt: skip


def _contact(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """An entry of one subscription status: its address, confirmation, first group, groups by id, attributes."""
    groups = sorted((str(g["id"]) for g in raw["groups"]), key=int)
    return (False, raw["email"], {1: "subscribed", 0: "unsubscribed"}[raw["active"]], raw["status"] == 1,
            str(raw["group_id"]), groups, raw["attribs"])  # fmt: skip


def _contact_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        row["deleted"],
        row["email"],
        row["status"],
        row["confirmed"],
        row["group_id"],
        row["group_ids"],
        row["attributes"],
    )


def _group(raw: Mapping[str, Any]) -> tuple[Any, ...]:
    """A group's name and its counts of contacts, subscribed and unsubscribed."""
    return False, raw["name"], raw["total_count"], raw["active_count"], raw["unsubscribe_count"]


def _group_row(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return row["deleted"], row["name"], row["contact_count"], row["subscribed_count"], row["unsubscribed_count"]


def _delete_contacts(account: Account) -> list[str]:
    """Delete two addresses with every row of theirs; the entries they were listed under are gone."""
    control, account_id, _, _ = account.handle
    before = {str(raw["id"]) for raw in _export(account, "billionmail_contacts")["records"]}
    control.changes(account_id, contact_deletes=2)
    return sorted(before - {str(raw["id"]) for raw in _export(account, "billionmail_contacts")["records"]})


def _delete_groups(account: Account) -> list[str]:
    """Delete two groups (with their contacts' rows in them) as the admin does, through the API."""
    _, _, base_url, secrets = account.handle
    victims = [int(raw["id"]) for raw in _export(account, "billionmail_groups")["records"]][1:3]
    with httpx.Client(base_url=base_url, timeout=30) as http:
        login = http.post("/api/login", json=secrets).raise_for_status().json()
        headers = {"Authorization": f"Bearer {login['data']['token']}"}
        answer = http.post("/api/contact/group/delete", json={"group_ids": victims}, headers=headers)
    assert answer.raise_for_status().json()["data"] == {"success_count": 2, "failed_count": 0}
    return [str(gid) for gid in victims]


@contextmanager
def _faults(account: Account, server_errors: int, rate_limited: int) -> Iterator[None]:
    """5xx from the install, and 429s from the reverse proxy's request limit in front of it."""
    control, account_id, _, _ = account.handle
    control.set_faults(account=account_id, server_errors=server_errors, proxy_rate_limited=rate_limited)
    try:
        yield
    finally:
        control.clear_faults(account=account_id)


CASES = [
    EntityCase(provider="billionmail", entity="billionmail_contacts",
               open=lambda env, n, days, page_size: _open(env, {"contacts": n, "groups": 6}, days, page_size),
               truth=lambda account: _truth(account, "billionmail_contacts"), row=_contact_row,
               remove=_delete_contacts, faults=_faults, whole_list_reason=WHOLE_LIST, deletions="sweep",
               records=60),
    EntityCase(provider="billionmail", entity="billionmail_groups",
               open=lambda env, n, days, page_size: _open(env, {"groups": n, "contacts": 40}, days, page_size),
               truth=lambda account: _truth(account, "billionmail_groups"), row=_group_row,
               remove=_delete_groups, faults=_faults, whole_list_reason=WHOLE_LIST, deletions="sweep",
               records=30),
]  # fmt: skip
