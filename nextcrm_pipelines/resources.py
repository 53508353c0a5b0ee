"""Dagster resources: where the mirror lives, and authenticated provider clients. No secret enters config.

The database URL comes from the environment at run time (`DATABASE_URL`, or the embedded server),
and each connection's secrets come from the encrypted vault when its client is opened.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg

from nextcrm_pipelines.core import settings
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import open_connection
from nextcrm_pipelines.core.vault import SecretBox


class MirrorDatabase(dg.ConfigurableResource):
    """The CRM's Postgres database and the schema holding the integration tables.

    Both come from the environment (`DATABASE_URL`, `NEXTCRM_DB_SCHEMA`), like the CLI's, so a
    password in the URL never becomes resource config shown in the UI.
    """

    def url(self) -> str:
        return settings.libpq_url(settings.database_url())

    def schema(self) -> str:
        return settings.db_schema()

    def secret_box(self) -> SecretBox:
        return SecretBox.from_environment()


class ProviderClients(dg.ConfigurableResource):
    """An authenticated, rate-limited client for one connection of any provider.

    `open` checks the connection is active, takes its sync lock, reads its secrets from the vault
    (OAuth tokens refreshed under the connection's row lock) and opens the provider's client at the
    connection's request rate; bad credentials mark it `needs_reauth`. Assets, the sweep job and the
    webhook apply job receive it by injection, so a test (or a deployment) can hand them another one.
    """

    def open(
        self,
        *,
        database_url: str,
        provider: Provider,
        connection_id: str,
        box: SecretBox | None = None,
        lock: bool = True,
        rate_share: float = 1.0,
        wait: bool = True,
        run_id: str | None = None,
    ) -> AbstractContextManager[tuple[psycopg.Connection, Connection, Any, RequestStats]]:
        """Yield (session, connection, client, request counters) for the block; see `runner.open_connection`."""
        return open_connection(database_url=database_url, provider=provider, connection_id=connection_id, box=box,
                               lock=lock, rate_share=rate_share, wait=wait, run_id=run_id)  # fmt: skip

    def opener(self) -> ClientOpener:
        """`open` as a picklable callable: a backfill's helper processes rebuild this resource from it."""
        return ClientOpener(type(self), self.model_dump())


@dataclass(frozen=True)
class ClientOpener:
    """A `ProviderClients` resource's class and config; calling it opens a client as the resource's `open` does.

    The resource Dagster hands a step is bound to the run's context and cannot be sent to another process;
    this can, so every process of a backfill opens its clients the same way.
    """

    kind: type[ProviderClients]
    config: dict[str, Any]

    def __call__(
        self, **kwargs: Any
    ) -> AbstractContextManager[tuple[psycopg.Connection, Connection, Any, RequestStats]]:
        return self.kind(**self.config).open(**kwargs)
