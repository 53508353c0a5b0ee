"""What a provider plugs into the generic machinery: its entities, secrets and fetch functions.

Adding a provider is one folder under `providers/` exporting a `Provider`, plus its name in the
registry (`nextcrm_pipelines.providers.PROVIDER_NAMES`); assets, schedules, CLI prompts and sync
logs come from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nextcrm_pipelines.core.actions import ActionSpec
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import RequestStats
from nextcrm_pipelines.core.oauth import OAuthSpec, TokenManager
from nextcrm_pipelines.core.sweep import IdSweep
from nextcrm_pipelines.core.sync import EntitySpec, Record, SyncWindow
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.webhooks.verify import WebhookSpec

if TYPE_CHECKING:  # the connect flow (an HTTP server, OAuth) is not needed to sync
    from nextcrm_pipelines.core.connect import Discover


@dataclass(frozen=True)
class ClientContext:
    """What opening a provider client gets: the connection, its secrets, counters, and (OAuth) its tokens."""

    connection: Connection
    secrets: Secrets
    stats: RequestStats
    tokens: TokenManager | None = None
    # The share of the connection's request rate this client may use: several processes syncing
    # one connection's windows side by side split its rate between them.
    rate_share: float = 1.0


OpenClient = Callable[[ClientContext], AbstractContextManager[Any]]
Fetch = Callable[[Any, SyncWindow], Iterator[list[Record]]]


@dataclass(frozen=True)
class SecretField:
    """A secret the connect flow asks for, and the environment variable it may come from."""

    name: str
    env_var: str
    prompt: str
    optional: bool = False


@dataclass(frozen=True)
class Provider:
    """A provider's contribution: entities with their fetchers, and how to open a client."""

    name: str
    category: str
    entities: tuple[EntitySpec, ...]
    fetchers: dict[str, Fetch]
    open_client: OpenClient
    secret_fields: tuple[SecretField, ...] = field(default_factory=tuple)
    # OAuth providers: how to authorise, and which tenants a grant reaches (one connection each).
    oauth: OAuthSpec | None = None
    discover_tenants: Discover | None = None
    # Entities whose deletions are found by comparing id sets (the deletion sweep job).
    id_sweeps: dict[str, IdSweep] = field(default_factory=dict)
    # `connections add`: fixed secrets stored with the ones asked for (e.g. the client-credentials
    # grant), settings read from the environment (name -> (variable, default)), and the variable that
    # holds the base URL of a self-hosted installation.
    fixed_secrets: dict[str, str] = field(default_factory=dict)
    env_settings: dict[str, tuple[str, str]] = field(default_factory=dict)
    base_url_env: str | None = None
    # Signed webhooks, for providers that send them (see `nextcrm_pipelines.webhooks`).
    webhooks: WebhookSpec | None = None
    # Whether a backfill may sync its windows in several processes at once (see
    # `runner.sync_partitions`): only for clients that honour `ClientContext.rate_share` and keep no
    # state a second process could invalidate (an API key, not a rotating refresh token).
    parallel_windows: bool = False
    # What NextCRM can ask the provider to do (see `core.outbox`), by action name.
    actions: dict[str, ActionSpec] = field(default_factory=dict)
    # `connections add` / `set-secret`: checks secrets before they are stored; (secrets, base_url=, tenant=) ->
    # the account they reach (or None), raising `AuthenticationFailed` when the provider refuses them.
    check_credentials: Callable[..., str | None] | None = None

    @property
    def daily(self) -> bool:
        """Whether all the provider's entities sync day by day, partitioned by connection x month."""
        return all(entity.daily for entity in self.entities)

    @property
    def daily_entities(self) -> tuple[EntitySpec, ...]:
        """The entities synced day by day (partitioned by connection x month)."""
        return tuple(entity for entity in self.entities if entity.daily)

    @property
    def list_entities(self) -> tuple[EntitySpec, ...]:
        """The entities read whole on every run (partitioned by connection only)."""
        return tuple(entity for entity in self.entities if not entity.daily)

    def entity(self, name: str) -> EntitySpec:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(f"{self.name} has no entity {name!r}")
