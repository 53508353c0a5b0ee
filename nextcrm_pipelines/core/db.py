"""Postgres access: psycopg 3 connections to the project's schema, and Alembic migrations.

Runtime code talks to Postgres through psycopg 3 (COPY and server-side statements are the fast
path); SQLAlchemy is used by Alembic to manage the schema, against the table metadata of
`core/tables.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from nextcrm_pipelines.core import settings

if TYPE_CHECKING:
    import sqlalchemy as sa

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def connect(url: str | None = None, *, autocommit: bool = False) -> psycopg.Connection:
    """A psycopg 3 connection to `url` (default: the configured database)."""
    return psycopg.connect(settings.libpq_url(url or settings.database_url()), autocommit=autocommit)


def table(name: str, schema: str | None = None) -> sql.Composed:
    """A schema-qualified, quoted table name for composing SQL."""
    return sql.Identifier(schema or settings.db_schema(), name)


def alembic_config(url: str, schema: str):
    """An Alembic config that targets `schema` on `url`, independent of the working directory."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["database_url"] = settings.sqlalchemy_url(url)
    cfg.attributes["schema"] = schema
    return cfg


def upgrade(url: str | None = None, schema: str | None = None, revision: str = "head") -> str:
    """Create or upgrade the project schema (and Dagster's storage schema) to `revision`."""
    from alembic import command

    url = url or settings.database_url()
    schema = schema or settings.db_schema()
    with connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.DAGSTER_SCHEMA)))
    command.upgrade(alembic_config(url, schema), revision)
    return current_revision(url, schema) or ""


def schema_differences(
    url: str | None = None, schema: str | None = None, metadata: sa.MetaData | None = None
) -> list[Any]:
    """How `schema` differs from the project's table metadata, as Alembic's autogenerate sees it
    (columns, types, nullability, keys, indexes, comments): empty when the migrations and the
    metadata describe the same tables. `metadata` defaults to `core.tables.project_metadata()`."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, pool

    from nextcrm_pipelines.core.tables import project_metadata

    schema = schema or settings.db_schema()
    engine = create_engine(settings.sqlalchemy_url(url or settings.database_url()), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'SET search_path TO "{schema}"')
            context = MigrationContext.configure(connection)
            return compare_metadata(context, metadata if metadata is not None else project_metadata())
    finally:
        engine.dispose()


def current_revision(url: str | None = None, schema: str | None = None) -> str | None:
    """The Alembic revision the schema is at, or None before the first upgrade."""
    schema = schema or settings.db_schema()
    with connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.alembic_version",)).fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute(sql.SQL("SELECT version_num FROM {}").format(table("alembic_version", schema))).fetchone()
        return row[0] if row else None
