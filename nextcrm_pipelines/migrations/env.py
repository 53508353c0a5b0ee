"""Alembic environment: runs migrations against the schema given by the caller's config.

The project's tables carry no schema of their own (core/tables.py): the connection's search path
places them, so autogenerate compares the metadata with the tables of that one schema.
"""

from alembic import context
from sqlalchemy import create_engine, pool, text

from nextcrm_pipelines.core.tables import project_metadata

config = context.config
schema = config.attributes["schema"]
engine = create_engine(config.attributes["database_url"], poolclass=pool.NullPool)


def _project_table(name: str | None, type_: str, parent_names: dict) -> bool:
    """Autogenerate leaves Alembic's own version table out (it lives beside the project's tables)."""
    return not (type_ == "table" and name == "alembic_version")


with engine.connect() as connection:
    connection.execute(text(f'SET search_path TO "{schema}"'))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=project_metadata(),
        include_name=_project_table,
        version_table_schema=schema,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations(schema=schema)
engine.dispose()
