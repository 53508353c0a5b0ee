"""A run over whole-list entities, retried or re-executed from failure, reads again only the connections that
failed: the others were read whole (and swept) by the earlier attempt, and their sync logs say so.

One BillionMail connection of two cannot list its contacts in the first run (a `ProviderClients` resource of
the test's own, the seam the code location offers); re-executed from failure once it can, the run reads that
connection's contacts and sweeps them, and leaves the other connection's alone.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import ProviderError
from nextcrm_pipelines.definitions import build_definitions
from nextcrm_pipelines.partitions import connections_partitions_name
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.helpers import WrappingClients
from nextcrm_sandbox.billionmail import BillionMailControl

FAILING_ENV = "NEXTCRM_TEST_FAILING_CONNECTION"


class _ContactsFail:
    """A BillionMail client whose contact list cannot be read (an outage); all else is the real client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def contacts(self, *args: Any, **kwargs: Any):
        raise ProviderError("contacts: provider answered 500 (test)", provider="billionmail")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class FailingConnectionClients(WrappingClients):
    """The real clients, except that the connection named by NEXTCRM_TEST_FAILING_CONNECTION cannot list contacts."""

    def wrap(self, connection: Any, client: Any) -> Any:
        return _ContactsFail(client) if os.environ.get(FAILING_ENV) == connection.id else client


def billionmail_sync() -> dg.JobDefinition:
    """The BillionMail sync job with those clients and no step retries (a reconstructable target)."""
    return build_definitions(clients=FailingConnectionClients(), retry_policy=None).resolve_job_def("billionmail_sync")


def _logged(database_url: str, schema: str, run_id: str) -> list[tuple[str, str, str, str]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT connection_id, asset, coalesce(partition, ''), status FROM {} WHERE run_id = %s "
                    "ORDER BY 1, 2, 3").format(table("integration_sync_logs", schema)),
            (run_id,),
        ).fetchall()  # fmt: skip


def test_a_reexecution_reads_again_only_the_connection_whose_whole_list_failed(database_url, schema, box, sandbox,
                                                                              monkeypatch):  # fmt: skip
    control = BillionMailControl(sandbox)
    connections = []
    for seed in (21, 22):
        password = f"pw-{uuid.uuid4().hex[:8]}"
        account = control.add_account(seed=seed, campaigns=2, contacts=40, groups=3, days=5, password=password)
        with psycopg.connect(database_url) as conn:
            connections.append(vault.add_connection(
                conn, provider="billionmail", display_name=f"BM {account['id']}", box=box,
                secrets={"username": account["username"], "password": password},
                base_url=f"{sandbox.url}{account['base_path']}"))  # fmt: skip
    ok, failing = sorted(connections, key=lambda c: c.id)
    monkeypatch.setenv(FAILING_ENV, failing.id)
    job = dg.reconstructable(billionmail_sync)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(connections_partitions_name("billionmail"), [ok.id, failing.id])
        tags = {"dagster/asset_partition_range_start": ok.id, "dagster/asset_partition_range_end": failing.id}
        with dg.execute_job(job, instance=instance, tags=tags, raise_on_error=False) as first:
            assert not first.success
            first_run = first.run_id
        contacts_first = [row for row in _logged(database_url, schema, first_run) if row[1] == "billionmail_contacts"]
        assert [(c, p == "id-sweep", s) for c, _, p, s in contacts_first] == [
            (ok.id, False, "success"), (ok.id, True, "success"), (failing.id, False, "failed")]  # fmt: skip

        monkeypatch.delenv(FAILING_ENV)
        options = dg.ReexecutionOptions.from_failure(first_run, instance)
        with dg.execute_job(job, instance=instance, reexecution_options=options, tags=tags) as again:
            assert again.success
            second_run = again.run_id
    # Only the failed connection's contacts are read (and swept) again; the other's were read whole before.
    again_logged = [(c, a, p == "id-sweep", s) for c, a, p, s in _logged(database_url, schema, second_run)]
    assert again_logged == [(failing.id, "billionmail_contacts", False, "success"),
                            (failing.id, "billionmail_contacts", True, "success")]  # fmt: skip
    for connection in (ok, failing):
        assert len(mirror(database_url, schema, "billionmail_contacts", connection.id)) >= 40
