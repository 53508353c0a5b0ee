"""Runtime settings read from the environment, with the embedded-Postgres default.

Everything the code location needs to find its database and data folder is resolved here, so
the CLI, Dagster resources and tests agree on one answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = "nextcrm_integrations"
DAGSTER_SCHEMA = "dagster"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def data_dir() -> Path:
    """The project's local data folder (embedded Postgres, generated key, Dagster artifacts)."""
    configured = os.environ.get("NEXTCRM_DATA_DIR")
    path = Path(configured) if configured else PROJECT_ROOT / ".nextcrm"
    return path.expanduser().resolve()


def db_schema() -> str:
    """The Postgres schema holding every table of this project (never the CRM's own schema)."""
    schema = os.environ.get("NEXTCRM_DB_SCHEMA", DEFAULT_SCHEMA)
    if not _IDENTIFIER.match(schema):
        raise ValueError(f"NEXTCRM_DB_SCHEMA={schema!r} is not a plain lower-case Postgres identifier")
    return schema


def database_url() -> str:
    """`DATABASE_URL` when set, else the URL of the embedded server (started if needed)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres

    return ensure_embedded_postgres(data_dir()).url


def sqlalchemy_url(url: str) -> str:
    """Rewrite a libpq-style URL so SQLAlchemy uses psycopg 3."""
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def libpq_url(url: str) -> str:
    """Strip a SQLAlchemy driver suffix so psycopg / libpq accept the URL."""
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def dagster_storage_url(url: str) -> str:
    """The URL Dagster's run/event/schedule storage uses: same server, its own schema.

    dagster-postgres is written for psycopg2 (e.g. `NOTIFY run_events, %(id)s`), while SQLAlchemy
    2.1 picks psycopg 3 for a bare `postgresql://` URL, so the driver is named explicitly.
    """
    base = "postgresql+psycopg2://" + libpq_url(url)[len("postgresql://") :]
    option = f"options=-csearch_path%3D{DAGSTER_SCHEMA}"
    return f"{base}{'&' if '?' in base else '?'}{option}"


def redact_url(url: str) -> str:
    """A database URL with any password replaced, fit for printing."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
