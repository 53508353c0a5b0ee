"""Process environment for the tooling: database URL, Dagster home and storage, secret key.

`prepare()` resolves the database (starting the embedded server when `DATABASE_URL` is unset),
applies migrations, and exports what `dagster.yaml` and the code location read, so `dagster dev`,
the demo and the CLI all share one Postgres server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nextcrm_pipelines.core import db, settings


@dataclass(frozen=True)
class Environment:
    database_url: str
    schema: str
    dagster_home: Path
    embedded: bool


def export_dagster_settings(database_url: str) -> Path:
    """Point Dagster at the project's `dagster.yaml` and its storage at `database_url`."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.PROJECT_ROOT).resolve()
    data = settings.data_dir()
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("NEXTCRM_DAGSTER_STORAGE_URL", settings.dagster_storage_url(database_url))
    os.environ.setdefault("NEXTCRM_DAGSTER_ARTIFACTS", str(data / "dagster"))
    os.environ.setdefault("NEXTCRM_DAGSTER_COMPUTE_LOGS", str(data / "dagster" / "compute_logs"))
    return home


def prepare(*, upgrade: bool = True) -> Environment:
    """Resolve the database, migrate it and export the settings child processes need."""
    embedded = not os.environ.get("DATABASE_URL")
    url = settings.database_url()
    os.environ["DATABASE_URL"] = url
    home = export_dagster_settings(url)
    if upgrade:
        db.upgrade(url, settings.db_schema())
    return Environment(url, settings.db_schema(), home, embedded)
