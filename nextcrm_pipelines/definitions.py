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
)
from nextcrm_pipelines.providers import PROVIDERS
from nextcrm_pipelines.resources import MirrorDatabase


def build_definitions() -> dg.Definitions:
    providers = list(PROVIDERS.values())
    # Whole-list entities sweep within their own runs; daily ones get a daily sweep job.
    swept = [p for p in providers if p.id_sweeps and p.daily]
    return dg.Definitions(
        assets=[a for p in providers for a in build_provider_assets(p)],
        jobs=[build_sync_job(p) for p in providers] + [build_sweep_job(p) for p in swept],
        schedules=[build_hourly_schedule(p) for p in providers] + [build_sweep_schedule(p) for p in swept],
        sensors=[build_connections_sensor(providers)],
        resources={"mirror": MirrorDatabase()},
    )


defs = build_definitions()
