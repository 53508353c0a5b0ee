"""Alembic environment: runs migrations against the schema given by the caller's config."""

from alembic import context
from sqlalchemy import create_engine, pool, text

config = context.config
schema = config.attributes["schema"]
engine = create_engine(config.attributes["database_url"], poolclass=pool.NullPool)

with engine.connect() as connection:
    connection.execute(text(f'SET search_path TO "{schema}"'))
    connection.commit()
    context.configure(
        connection=connection,
        version_table_schema=schema,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations(schema=schema)
engine.dispose()
