"""Connection health in the Dagster UI: per provider, one external asset partitioned by connection, and a check.

`<provider>_connection_health` has one partition per connection (the provider's connection dimension, the
one its synced assets use) and is never materialised: the connections sensor records an `AssetObservation`
of a connection when its health changes, with its name, status, sync status, last successful sync, last
error (its cause, scrubbed) and `fix`, the command that fixes this connection. The observation's data
version is a digest of that state, so the sensor tells a change from the latest observation of each
partition (one event-log query per provider whose connections changed; its cursor holds one digest per
provider, so a tick where nothing changed reads no events and writes none). The check `connections_healthy`
passes while every connection of the provider is active, and otherwise warns, listing the first connections
that need action with their fix; the sensor records it when that list changes, and it can be executed from
the UI at any time. Thousands of connections cost thousands of partitions of one asset per provider, not
thousands of assets, and an event only when a connection's state changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import dagster as dg
import psycopg

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.provider import Provider
from nextcrm_pipelines.core.runner import reauth_command
from nextcrm_pipelines.partitions import connection_partitions
from nextcrm_pipelines.resources import MirrorDatabase

HEALTH_CHECK = "connections_healthy"
# Connections the check lists by name (the rest are counted).
LISTED = 20
# The tag Dagster reads an observation's data version from.
DATA_VERSION_TAG = "dagster/data_version"
# Stored errors are already free of credentials; what reaches the UI is scrubbed again and cut short.
ERROR_LIMIT = 500
_SCRUB = (
    (re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b([sr]k|pk|whsec)_(test_|live_)?[A-Za-z0-9*]+"), r"\1_***"),
    (re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*"), "<token>"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[\w.~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@"), "***@"),
    (re.compile(r"\b[A-Za-z0-9]{40,}\b"), "<redacted>"),
)


def health_asset_key(provider: str) -> dg.AssetKey:
    return dg.AssetKey(f"{provider}_connection_health")


def scrub(text: str | None) -> str | None:
    """An error made fit for the UI: e-mail addresses, key- and token-shaped strings and URL credentials
    removed, at most `ERROR_LIMIT` characters."""
    if not text:
        return text
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


@dataclass(frozen=True)
class ConnectionHealth:
    """What the UI shows of one connection: its state, and the command that fixes it when it cannot sync."""

    connection_id: str
    display_name: str
    status: str
    sync_status: str
    last_synced_at: datetime | None
    last_error: str | None
    fix: str | None

    @property
    def needs_action(self) -> bool:
        return self.status != "active"

    @property
    def version(self) -> str:
        """A digest of the state an observation records: a new one means the health changed. The time of the
        last successful sync is left out (it moves every hour); the observation shows it as of the change."""
        state = [self.display_name, self.status, self.sync_status, self.last_error, self.fix]
        return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, Any]:
        synced = self.last_synced_at
        return {
            "display_name": self.display_name,
            "status": self.status,
            "sync_status": self.sync_status,
            "last_success": dg.MetadataValue.timestamp(synced) if synced else "never",
            "last_error": self.last_error or "",
            "fix": self.fix or "nothing to fix",
        }

    def line(self) -> str:
        """One line of the check's list: id, name, status and the command that fixes it."""
        return f"{self.connection_id} ({self.display_name}): {self.status}, fix with `{self.fix}`"


def connection_health(provider: Provider, connection: Connection) -> ConnectionHealth:
    """The health of one connection, with the one command that fixes it (none while it is active)."""
    fix = None
    if connection.status == "needs_reauth":
        fix = reauth_command(provider, connection)
    elif connection.status != "active":
        fix = vault.enable_command(connection.id)
    return ConnectionHealth(
        connection_id=connection.id,
        display_name=connection.display_name,
        status=connection.status,
        sync_status=connection.sync_status,
        last_synced_at=connection.last_synced_at,
        last_error=scrub(vault.error_cause(connection.last_error)),
        fix=fix,
    )


@dataclass(frozen=True)
class CheckOutcome:
    """The `connections_healthy` check of one provider, as the sensor records it and an executed check returns it."""

    passed: bool
    description: str
    metadata: dict[str, Any]

    @property
    def severity(self) -> dg.AssetCheckSeverity:
        return dg.AssetCheckSeverity.WARN

    def evaluation(self, provider: str) -> dg.AssetCheckEvaluation:
        return dg.AssetCheckEvaluation(asset_key=health_asset_key(provider), check_name=HEALTH_CHECK,
                                       passed=self.passed, severity=self.severity, description=self.description,
                                       metadata=self.metadata)  # fmt: skip

    def result(self) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=self.passed, severity=self.severity, description=self.description,
                                   metadata=self.metadata)  # fmt: skip


def check_outcome(provider: str, healths: list[ConnectionHealth]) -> CheckOutcome:
    """Passes while every connection is active; else warns with the first `LISTED` that need action and their fix
    (those waiting for new credentials first)."""
    needing = sorted(
        (h for h in healths if h.needs_action), key=lambda h: (h.status != "needs_reauth", h.connection_id)
    )
    counts: dict[str, int] = dict.fromkeys(vault.STATUSES, 0)
    for health in healths:
        counts[health.status] = counts.get(health.status, 0) + 1
    metadata: dict[str, Any] = {"connections": len(healths), **{status: counts[status] for status in vault.STATUSES}}
    if not needing:
        return CheckOutcome(True, f"every {provider} connection is active ({len(healths)})", metadata)
    lines = [health.line() for health in needing[:LISTED]]
    if len(needing) > LISTED:
        lines.append(f"... and {len(needing) - LISTED} more (`nextcrm-pipelines connections list` shows them all)")
    metadata["need_action"] = dg.MetadataValue.text("\n".join(lines))
    description = f"{len(needing)} of {len(healths)} {provider} connection(s) need action:\n" + "\n".join(lines)
    return CheckOutcome(False, description, metadata)


def build_health_asset(provider: Provider) -> dg.AssetSpec:
    """The provider's connection health: an external asset with a partition per connection, observed by the
    connections sensor."""
    return dg.AssetSpec(
        key=health_asset_key(provider.name),
        group_name=provider.name,
        partitions_def=connection_partitions(provider.name),
        description=f"Health of each {provider.name} connection (a partition each): status, sync status, last "
        "successful sync, last error and the command that fixes it, observed by connections_sensor when it changes. "
        "Connections are added with the CLI (`connections add`, `connect`) or the CRM app, not the partition dialog.",
    )


def build_health_check(provider: Provider) -> dg.AssetChecksDefinition:
    """`connections_healthy`: warns while a connection of the provider needs action, listing the fixes."""

    @dg.asset_check(
        asset=health_asset_key(provider.name),
        name=HEALTH_CHECK,
        description=f"Every {provider.name} connection is active; otherwise lists those that need action (the first "
        f"{LISTED}) with the command that fixes each. Recorded by connections_sensor when it changes.",
    )
    def _check(mirror: MirrorDatabase) -> dg.AssetCheckResult:
        with psycopg.connect(mirror.url()) as conn:
            stored = vault.list_connections(conn, provider=provider.name)
        return check_outcome(provider.name, [connection_health(provider, c) for c in stored]).result()

    return _check


def _digest(items: list[Any]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _previous(cursor: str | None) -> dict[str, list[str]]:
    """The digests the sensor recorded last tick, per provider: [connection states, check outcome]."""
    try:
        state = json.loads(cursor or "{}").get("health", {})
    except (ValueError, AttributeError):
        return {}
    return state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class HealthTick:
    """What one tick records: the events, the cursor that remembers them, and a line per provider that changed."""

    events: list[dg.AssetObservation | dg.AssetCheckEvaluation]
    cursor: str
    notes: list[str]


def health_tick(
    instance: dg.DagsterInstance, providers: list[Provider], stored: list[Connection], cursor: str | None
) -> HealthTick:
    """Observations of the connections whose health changed since their latest observation, and each provider's
    check when its outcome changed. A provider whose connections' states all match the cursor's digest costs
    no event-log read."""
    previous = _previous(cursor)
    by_provider: dict[str, list[Connection]] = defaultdict(list)
    for connection in stored:
        by_provider[connection.provider].append(connection)
    events: list[dg.AssetObservation | dg.AssetCheckEvaluation] = []
    state: dict[str, list[str]] = {}
    notes, passing = [], []
    for provider in providers:
        healths = [connection_health(provider, c) for c in by_provider.get(provider.name, [])]
        key = health_asset_key(provider.name)
        outcome = check_outcome(provider.name, healths)
        digests = [_digest([(h.connection_id, h.version) for h in healths]),
                   _digest([outcome.passed, outcome.description])]  # fmt: skip
        known = previous.get(provider.name) or ["", ""]
        if digests[0] != known[0]:
            latest = instance.event_log_storage.get_latest_tags_by_partition(
                key, dg.DagsterEventType.ASSET_OBSERVATION, [DATA_VERSION_TAG]
            )
            changed = [h for h in healths if latest.get(h.connection_id, {}).get(DATA_VERSION_TAG) != h.version]
            events += [dg.AssetObservation(asset_key=key, partition=h.connection_id, metadata=h.metadata(),
                                           tags={DATA_VERSION_TAG: h.version}) for h in changed]  # fmt: skip
            if changed:
                shown = ", ".join(f"{h.connection_id} {h.status}" for h in changed[:LISTED])
                more = f" and {len(changed) - LISTED} more" if len(changed) > LISTED else ""
                notes.append(f"{key.to_user_string()}: recorded the health of {len(changed)} connection(s) "
                             f"whose state changed ({shown}{more})")  # fmt: skip
        if digests[1] != known[1]:
            events.append(outcome.evaluation(provider.name))
            if outcome.passed:
                passing.append(key.to_user_string())
            else:
                notes.append(f"{HEALTH_CHECK} on {key.to_user_string()} warns: "
                             f"{outcome.description.splitlines()[0].rstrip(':')}")  # fmt: skip
        state[provider.name] = digests
    if passing:
        notes.append(f"{HEALTH_CHECK} passes on {', '.join(passing)}")
    return HealthTick(events=events, cursor=json.dumps({"health": state}, sort_keys=True), notes=notes)
