"""What the webhook end-to-end tests share: the receiver on a loopback port and one sensor tick + run."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
import uvicorn
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.definitions import defs
from nextcrm_pipelines.webhooks.app import build_app

# The tags the daemon puts on a run a sensor requested, by which it skips a run key seen before.
RUN_KEY_TAG = "dagster/run_key"
SENSOR_TAG = "dagster/sensor_name"


@contextmanager
def receiver(database_url: str, schema: str, box, **options) -> Iterator[str]:
    """The receiver app served by uvicorn on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(database_url=database_url, schema=schema, box=box, **options),
                                           log_level="warning", lifespan="on"))  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def tick_and_apply(instance: dg.DagsterInstance, provider: str) -> list[dg.RunRequest]:
    """Evaluate `<provider>_webhooks_sensor` once and execute each run it requests, as the daemon would:
    a request whose run key an earlier run of this sensor already carries is skipped, not run again.
    Returns the requests that started a run."""
    sensor = defs.resolve_sensor_def(f"{provider}_webhooks_sensor")
    context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
    requests = list(sensor.evaluate_tick(context).run_requests or [])
    job = defs.resolve_job_def(f"{provider}_apply_webhooks")
    started = []
    for request in requests:
        tags = {**(request.tags or {}), RUN_KEY_TAG: request.run_key, SENSOR_TAG: sensor.name}
        if request.run_key and instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key,
                                                                              SENSOR_TAG: sensor.name})):  # fmt: skip
            continue
        job.execute_in_process(instance=instance, raise_on_error=False, run_config=request.run_config or None,
                               tags=tags)  # fmt: skip
        started.append(request)
    return started


def inbox_rows(database_url: str, schema: str, provider: str | None = None) -> list[tuple]:
    """(event_id, event_type, status, attempts, last_error) of every inbox row, in arrival order."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL(
                "SELECT event_id, event_type, status, attempts, last_error FROM {} "
                "WHERE %(p)s::text IS NULL OR provider = %(p)s ORDER BY id"
            ).format(table("webhook_events", schema)),
            {"p": provider},
        ).fetchall()
