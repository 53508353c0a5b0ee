"""What the outbox tests share (`test_outbox.py` and every `test_actions_<provider>.py`): submitting an action,
reading its outbox row back, one `apply_due` run, one sensor tick and the apply run it asks for, a worker killed
after the provider acted, and the emulators' request counters."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from nextcrm_pipelines.core import outbox
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines_tests.accounting import Account

# The outbox columns the tests read, as the keys of a row's dict.
COLUMNS = ("id", "status", "attempts", "result_id", "error", "result", "sent_at", "idempotency_key")


def submit(database_url: str, schema: str, connection: str | Connection | Account, action: str,
           payload: dict[str, Any], key: str | None = None) -> outbox.Submitted:  # fmt: skip
    """Store an action (committed) for a connection, named by its id, its `Connection` or the connected sandbox
    `Account`; under the idempotency key `key` if given (else the outbox makes one), requested by "tests"."""
    if isinstance(connection, Account):
        connection = connection.connection
    connection_id = connection.id if isinstance(connection, Connection) else connection
    with psycopg.connect(database_url) as conn:
        return outbox.submit(conn, schema, connection_id=connection_id, action=action, payload=payload,
                             idempotency_key=key, requested_by="tests")  # fmt: skip


def _select(schema: str, where: str = "") -> sql.Composed:
    return sql.SQL("SELECT {columns} FROM {outbox} {where} ORDER BY id").format(
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS),
        outbox=table("integration_outbox", schema),
        where=sql.SQL(where),
    )


def rows(database_url: str, schema: str) -> dict[int, dict[str, Any]]:
    """Every outbox row by id, oldest first, each a dict of `COLUMNS`."""
    with psycopg.connect(database_url) as conn:
        return {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in conn.execute(_select(schema)).fetchall()}


def outbox_row(database_url: str, schema: str, action_id: int) -> dict[str, Any]:
    """The outbox row of one action, a dict of `COLUMNS`."""
    with psycopg.connect(database_url) as conn:
        found = conn.execute(_select(schema, "WHERE id = %s"), (action_id,)).fetchone()
    assert found is not None, f"no outbox row {action_id}"
    return dict(zip(COLUMNS, found, strict=True))


def stored_key(database_url: str, schema: str, action_id: int) -> str:
    """The idempotency key an action is stored under: the one it was submitted with, or the one the outbox made."""
    return outbox_row(database_url, schema, action_id)["idempotency_key"]


def applier(default: Provider) -> Callable[..., outbox.ActionsOutcome]:
    """`apply(database_url, schema, provider=default, **kwargs)`: one `outbox.apply_due` run for `provider` (a
    test file's own by default) with no back-off between retries, so a retried action is due again at once.
    `kwargs` go to `apply_due` (`limit`, `lease`...)."""

    def apply(database_url: str, schema: str, provider: Provider = default, **kwargs: Any) -> outbox.ActionsOutcome:
        return outbox.apply_due(database_url=database_url, schema=schema, provider=provider, retry_base=0, **kwargs)

    return apply


def without_find(provider: Provider, *actions: str) -> Provider:
    """`provider` as it would be if these actions (all of them when none is named) could not look up what an
    earlier attempt made: a re-send is then a new request to the provider."""
    names = actions or tuple(provider.actions)
    changed = {name: dataclasses.replace(provider.actions[name], find=None) for name in names}
    return dataclasses.replace(provider, actions={**provider.actions, **changed})


def _tick(sensor: Any, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
    return list(sensor.evaluate_tick(context).run_requests or [])


def through_dagster(provider: str, instance: dg.DagsterInstance | None = None) -> list[dg.AssetMaterialization]:
    """One tick of `<provider>_actions_sensor` and the `<provider>_apply_actions` run it asks for (with the
    request's run config and tags), as the daemon would, in `instance` or a fresh test instance. The run must
    succeed and leave nothing due: the next tick asks for no run. Returns the run's materializations."""
    if instance is None:
        with dg.instance_for_test() as fresh:
            return through_dagster(provider, fresh)
    sensor = defs.resolve_sensor_def(f"{provider}_actions_sensor")
    (request,) = _tick(sensor, instance)
    result = defs.resolve_job_def(f"{provider}_apply_actions").execute_in_process(
        instance=instance, run_config=request.run_config, tags=request.tags
    )
    assert result.success
    assert not _tick(sensor, instance)  # nothing is due any more
    return result.asset_materializations_for_node(f"{provider}_send_actions")


# A worker that dies (exit code 9) once the provider has acted, before the outcome is recorded; run as
# `python -c CRASH <database_url> <schema> <provider> <recorder>`, where the recorder it dies in is
# `_record_success` (the provider accepted) or `_record_failure` (the provider refused). Its lease is one second.
CRASH = textwrap.dedent(
    """
    import os, sys
    from nextcrm_pipelines.core import outbox
    from nextcrm_pipelines.providers import get_provider

    def killed(*args, **kwargs):  # the worker dies after the provider acted, before anything is recorded
        os._exit(9)

    setattr(outbox, sys.argv[4], killed)
    outbox.apply_due(database_url=sys.argv[1], schema=sys.argv[2], provider=get_provider(sys.argv[3]), lease=1.0)
    """
)


def crash(database_url: str, schema: str, provider: str, recorder: str = "_record_success") -> None:
    """One apply run of `provider`'s due actions in a worker process killed after the provider acted on the first,
    before `recorder` stored the outcome; the row stays `sending` until its one-second lease lapses."""
    worker = subprocess.run([sys.executable, "-c", CRASH, database_url, schema, provider, recorder],
                            capture_output=True, timeout=120)  # fmt: skip
    assert worker.returncode == 9, worker.stderr.decode()[-2000:]


# --- the emulators' request counters -----------------------------------------------------------------------------


def account_stats(control: Any, account: str) -> dict[str, Any]:
    """One account's counters in an emulator's `stats()`: PayPal and BillionMail list them under `accounts`,
    Mautic under `by_account`, Xero and QuickBooks by tenant (organisation, realm) under `tenants`."""
    stats = control.stats()
    for section in ("accounts", "by_account", "tenants"):
        if account in stats.get(section, {}):
            return stats[section][account]
    raise KeyError(f"the emulator keeps no counters for {account!r}")


def requests_served(control: Any, account: str | None = None) -> int:
    """How many requests the emulator answered for `account`, or for everyone when `account` is None."""
    if account is not None:
        return int(account_stats(control, account).get("requests", 0))
    stats = control.stats()
    return int(stats["total"] if "total" in stats else stats["requests"])


def route_counts(control: Any, *routes: str) -> dict[str, int]:
    """How often the emulator served each of these routes ("METHOD /path/{pattern}"), all accounts together."""
    stats = control.stats()
    served = stats["by_route"] if "by_route" in stats else stats["by_path"]
    return {route: int(served.get(route, 0)) for route in routes}


def route_count(control: Any, route: str) -> int:
    """How often the emulator served one route, all accounts together."""
    return route_counts(control, route)[route]
