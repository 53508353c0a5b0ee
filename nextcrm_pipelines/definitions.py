"""The code location's single entry point: Definitions built from the provider registry."""

from __future__ import annotations

import dagster as dg

from nextcrm_pipelines.assets import SYNC_RETRY_POLICY, build_provider_assets
from nextcrm_pipelines.automation import (
    build_actions_job,
    build_actions_sensor,
    build_connections_sensor,
    build_hourly_schedules,
    build_sweep_job,
    build_sweep_schedule,
    build_sync_jobs,
    build_webhook_job,
    build_webhook_sensor,
    daily_sweeps,
)
from nextcrm_pipelines.health import build_health_asset, build_health_check
from nextcrm_pipelines.providers import PROVIDERS
from nextcrm_pipelines.resources import MirrorDatabase, ProviderClients


def build_definitions(
    clients: ProviderClients | None = None, retry_policy: dg.RetryPolicy | None = SYNC_RETRY_POLICY
) -> dg.Definitions:
    """Every provider's assets (and its connection health with its check), jobs, schedules and sensors, sharing
    the `mirror` and `clients` resources.

    Callers take jobs, schedules and sensors with `defs.resolve_job_def` (and `resolve_*_def`): the sync
    jobs are asset jobs that only the resolved repository holds as `JobDefinition`s. `clients` replaces the
    provider clients (a test's faulty or recording ones); `retry_policy` is the sync steps' own."""
    providers = list(PROVIDERS.values())
    # Whole-list entities sweep within their own runs; daily ones get a daily sweep job.
    swept = [p for p in providers if daily_sweeps(p)]
    applied = [p for p in providers if p.webhooks is not None and p.webhooks.apply is not None]
    acting = [p for p in providers if p.actions]
    return dg.Definitions(
        assets=[a for p in providers for a in build_provider_assets(p, retry_policy)]
        + [build_health_asset(p) for p in providers],
        asset_checks=[build_health_check(p) for p in providers],
        jobs=[job for p in providers for job in build_sync_jobs(p)]
        + [build_sweep_job(p) for p in swept]
        + [build_webhook_job(p) for p in applied]
        + [build_actions_job(p) for p in acting],
        schedules=[s for p in providers for s in build_hourly_schedules(p)] + [build_sweep_schedule(p) for p in swept],
        sensors=[build_connections_sensor(providers)]
        + [build_webhook_sensor(p) for p in applied]
        + [build_actions_sensor(p) for p in acting],
        resources={"mirror": MirrorDatabase(), "clients": clients or ProviderClients()},
        # A run's steps run one after another in the run's process: the entities of one connection take its
        # lock in turn (a run never finds its own connection busy), and no step pays a process start.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
