"""Dagster resources: where the mirror lives. Credentials never enter run config.

The database URL comes from the environment at run time (`DATABASE_URL`, or the embedded server),
and each connection's secrets come from the encrypted vault when its sync starts.
"""

import dagster as dg

from nextcrm_pipelines.core import settings
from nextcrm_pipelines.core.vault import SecretBox


class MirrorDatabase(dg.ConfigurableResource):
    """The CRM's Postgres database and the schema holding the integration tables.

    Both come from the environment (`DATABASE_URL`, `NEXTCRM_DB_SCHEMA`), like the CLI's, so a
    password in the URL never becomes resource config shown in the UI.
    """

    def url(self) -> str:
        return settings.libpq_url(settings.database_url())

    def schema(self) -> str:
        return settings.db_schema()

    def secret_box(self) -> SecretBox:
        return SecretBox.from_environment()
