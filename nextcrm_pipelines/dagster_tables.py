"""Dagster's view of a mirror table, read from the project's table metadata (core/tables.py).

An asset that writes a table attaches `table_metadata(...)`, so the UI shows the table's columns,
their Postgres types, nullability and descriptions (the column comments) from the same definition
the migrations and the write path use.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nextcrm_pipelines.core import settings
from nextcrm_pipelines.core.tables import table_named


def column_schema(table: sa.Table) -> dg.TableSchema:
    """`table`'s columns as a Dagster table schema, its key and unique constraints as table constraints."""
    dialect = pg.dialect()
    key = {c.name for c in table.primary_key.columns}
    uniques = [u for u in table.constraints if isinstance(u, sa.UniqueConstraint)]
    single_unique = {next(iter(u.columns)).name for u in uniques if len(u.columns) == 1}
    columns = [
        dg.TableColumn(
            name=column.name,
            type=column.type.compile(dialect=dialect).lower(),
            description=column.comment,
            constraints=dg.TableColumnConstraints(
                nullable=bool(column.nullable) and column.name not in key,
                unique=column.name in single_unique or key == {column.name},
            ),
        )
        for column in table.columns
    ]
    constraints = [f"primary key ({', '.join(c.name for c in table.primary_key.columns)})"] if key else []
    constraints += [f"unique ({', '.join(c.name for c in u.columns)})" for u in uniques if len(u.columns) > 1]
    return dg.TableSchema(columns=columns, constraints=dg.TableConstraints(other=constraints))


def table_metadata(table: sa.Table | str, schema: str | None = None) -> dict[str, Any]:
    """Dagster metadata naming `table` (a table or its name) in `schema` and describing its columns.

    `schema` defaults to the configured one (`NEXTCRM_DB_SCHEMA`, else `nextcrm_integrations`).
    """
    table = table if isinstance(table, sa.Table) else table_named(table)
    return {
        "dagster/column_schema": column_schema(table),
        "dagster/table_name": f"{schema or settings.db_schema()}.{table.name}",
    }
