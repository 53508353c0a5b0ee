"""The code location's single entry point: Definitions built from the provider registry."""

from __future__ import annotations

import dagster as dg

from nextcrm_pipelines.assets import build_provider_assets
from nextcrm_pipelines.automation import (
    build_connections_sensor,
    build_hourly_schedule,
    build_sweep_job,
    build_sweep_schedule,
    build_sync_job,
    build_webhook_job,
    build_webhook_sensor,
)
from nextcrm_pipelines.providers import PROVIDERS
from nextcrm_pipelines.resources import MirrorDatabase


def build_definitions() -> dg.Definitions:
    providers = list(PROVIDERS.values())
    # Whole-list entities sweep within their own runs; daily ones get a daily sweep job.
    swept = [p for p in providers if p.id_sweeps and p.daily]
    applied = [p for p in providers if p.webhooks is not None and p.webhooks.apply is not None]
    webhook_jobs = {p.name: build_webhook_job(p) for p in applied}
    return dg.Definitions(
        assets=[a for p in providers for a in build_provider_assets(p)],
        jobs=[build_sync_job(p) for p in providers] + [build_sweep_job(p) for p in swept] + list(webhook_jobs.values()),
        schedules=[build_hourly_schedule(p) for p in providers] + [build_sweep_schedule(p) for p in swept],
        sensors=[build_connections_sensor(providers)]
        + [build_webhook_sensor(p, webhook_jobs[p.name]) for p in applied],
        resources={"mirror": MirrorDatabase()},
    )


defs = build_definitions()
