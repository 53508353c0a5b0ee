"""The two reference syncs the Stripe benchmark measures next to the project's own sync.

`naive_load` is the row-at-a-time floor (one upsert and one COMMIT per charge) and `dlt_load` is the
off-the-shelf peer (dlt's `rest_api` source merging into Postgres), both set up as
``docs/performance.md`` describes them (Baselines), so that a run against the local Stripe emulator and
the same Postgres server puts the project's figures next to baselines measured under the same
conditions instead of next to numbers from another machine.

dlt is the optional `bench` extra: it is imported only when `dlt_load` runs.

Run `python -m benchmarks.baselines` from the project root to measure both against a fresh embedded
Postgres and a subprocess emulator.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

PAGE_SIZE = 100

CREATE_CHARGES = """
CREATE TABLE IF NOT EXISTS {table} (
  id        text PRIMARY KEY,
  created   timestamptz NOT NULL,
  amount    bigint NOT NULL,
  currency  text NOT NULL,
  status    text NOT NULL,
  customer  text,
  data      jsonb NOT NULL,
  synced_at timestamptz NOT NULL DEFAULT now()
)
"""

UPSERT_CHARGE = """
INSERT INTO {table} (id, created, amount, currency, status, customer, data)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET created = EXCLUDED.created, amount = EXCLUDED.amount,
  currency = EXCLUDED.currency, status = EXCLUDED.status, customer = EXCLUDED.customer,
  data = EXCLUDED.data, synced_at = now()
"""


def _rate(records: int, seconds: float) -> float:
    return records / seconds if seconds > 0 else 0.0


def naive_load(
    sandbox_url: str,
    api_key: str,
    database_url: str,
    *,
    limit_records: int = 20_000,
    schema: str = "bench_naive",
    reset: bool = False,
) -> dict[str, Any]:
    """Fetch charges page by page and upsert them one row and one COMMIT at a time (the naive baseline).

    Reads at most `limit_records` charges (newest first, pages of 100 via `starting_after`) into
    `<schema>.charges`. Creating the table, and truncating it when `reset` is true, happen before the
    clock starts; the timed section is the fetch + write loop, including the last COMMIT. With
    `reset=False` a second call measures the "full table" variant (every row an update).
    """
    table = sql.Identifier(schema, "charges")
    upsert = sql.SQL(UPSERT_CHARGE).format(table=table)
    with (
        psycopg.connect(database_url) as conn,
        httpx.Client(
            base_url=sandbox_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        ) as client,
    ):
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(CREATE_CHARGES).format(table=table))
        if reset:
            conn.execute(sql.SQL("TRUNCATE {}").format(table))
        conn.commit()

        records = 0
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        started = time.perf_counter()
        while records < limit_records:
            resp = client.get("/v1/charges", params=params)
            resp.raise_for_status()
            page = resp.json()
            charges = page["data"][: limit_records - records]
            for c in charges:
                conn.execute(
                    upsert,
                    (
                        c["id"],
                        datetime.fromtimestamp(c["created"], UTC),
                        c["amount"],
                        c["currency"],
                        c["status"],
                        c["customer"],
                        Jsonb(c),
                    ),
                )
                conn.commit()
            records += len(charges)
            if not page["has_more"] or not page["data"]:
                break
            params["starting_after"] = page["data"][-1]["id"]
        seconds = time.perf_counter() - started
    return {"records": records, "seconds": seconds, "records_per_second": _rate(records, seconds)}


def _drop_dataset(database_url: str, dataset: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name in (dataset, f"{dataset}_staging"):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _count_rows(database_url: str, dataset: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(dataset, "charges")))
        return int(row.fetchone()[0])  # type: ignore[index]


def dlt_load(
    sandbox_url: str,
    api_key: str,
    database_url: str,
    *,
    dataset: str = "bench_dlt",
    pipelines_dir: str | None = None,
    loader_file_format: str = "insert_values",
    reset: bool = False,
) -> dict[str, Any]:
    """Mirror every charge with dlt's `rest_api` source, merged on `id` into Postgres (the dlt baseline).

    Extract, normalize and load run one after another and are timed separately; `seconds` is their
    sum. `records` is the row count of `<dataset>.charges` afterwards. Without `pipelines_dir` the
    pipeline works in a temporary folder removed afterwards, so no local state carries over between
    calls; a second call on the same dataset is still a merge re-run, because the destination tables
    (and dlt's state stored there) are what make it one. `reset=True` drops the dataset and its
    staging dataset first, untimed.
    """
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    import dlt
    from dlt.destinations.impl.postgres.configuration import PostgresCredentials
    from dlt.sources.helpers.rest_client.paginators import JSONResponseCursorPaginator
    from dlt.sources.rest_api import rest_api_source

    if reset:
        _drop_dataset(database_url, dataset)

    # dlt treats a missing password as unresolved configuration; a server with trust auth has none.
    credentials = PostgresCredentials(database_url)
    if credentials.password is None:
        credentials.password = ""

    source = rest_api_source(
        {
            "client": {
                "base_url": sandbox_url.rstrip("/") + "/v1/",
                "auth": {"type": "bearer", "token": api_key},
                "paginator": JSONResponseCursorPaginator(
                    cursor_path="data[-1].id", cursor_param="starting_after", has_more_path="has_more"
                ),
            },
            "resource_defaults": {"write_disposition": "merge", "primary_key": "id"},
            "resources": [
                {
                    "name": "charges",
                    "endpoint": {"path": "charges", "params": {"limit": PAGE_SIZE}, "data_selector": "data"},
                }
            ],
        }
    )

    workdir = pipelines_dir or tempfile.mkdtemp(prefix="dlt-bench-")
    try:
        pipeline = dlt.pipeline(
            pipeline_name=f"{dataset}_charges",
            destination=dlt.destinations.postgres(credentials),
            dataset_name=dataset,
            pipelines_dir=workdir,
        )
        phases: dict[str, float] = {}
        started = time.perf_counter()
        pipeline.extract(source, loader_file_format=loader_file_format)  # type: ignore[arg-type]
        phases["extract"] = time.perf_counter() - started
        mark = time.perf_counter()
        pipeline.normalize()
        phases["normalize"] = time.perf_counter() - mark
        mark = time.perf_counter()
        load_info = pipeline.load()
        phases["load"] = time.perf_counter() - mark
        seconds = time.perf_counter() - started
        load_info.raise_on_failed_jobs()
    finally:
        if pipelines_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    records = _count_rows(database_url, dataset)
    return {
        "records": records,
        "seconds": seconds,
        "records_per_second": _rate(records, seconds),
        "phases": phases,
    }


def _sandbox_charge_count(sandbox_url: str, api_key: str) -> int:
    resp = httpx.get(
        f"{sandbox_url.rstrip('/')}/_sandbox/stripe/export/charges", params={"api_key": api_key}, timeout=120
    )
    resp.raise_for_status()
    return len(resp.json())


def _print_result(label: str, result: dict[str, Any]) -> None:
    line = f"{label:<34} {result['records']:>8,} rec  {result['seconds']:>8.2f} s  "
    line += f"{result['records_per_second']:>8,.0f} rec/s"
    if "phases" in result:
        line += "  (" + ", ".join(f"{k} {v:.2f} s" for k, v in result["phases"].items()) + ")"
    print(line)


def main() -> None:
    """Measure both baselines against a fresh embedded Postgres and a subprocess Stripe emulator."""
    parser = argparse.ArgumentParser(description="Measure the naive and dlt baselines locally.")
    parser.add_argument("--charges", type=int, default=20_000, help="charges in the emulated account")
    parser.add_argument("--naive-limit", type=int, default=20_000, help="records the naive baseline loads")
    parser.add_argument("--format", default="insert_values", help="dlt loader_file_format")
    args = parser.parse_args()

    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres
    from nextcrm_sandbox.server import SandboxServer

    api_key = "sk_test_baselines"
    pg_folder = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    try:
        db = ensure_embedded_postgres(pg_folder).url
        with SandboxServer(subprocess=True) as sandbox:
            sandbox.add_stripe_account(
                api_key=api_key,
                seed=42,
                charges=args.charges,
                subscriptions=1,
                days=90,
                requests_per_second=0,
            )
            in_sandbox = _sandbox_charge_count(sandbox.url, api_key)
            print(f"sandbox: {in_sandbox:,} charges at {sandbox.url}; postgres: {db}")

            for label, reset in (("naive, empty table", True), ("naive, full table", False)):
                result = naive_load(sandbox.url, api_key, db, limit_records=args.naive_limit, reset=reset)
                _print_result(label, result)
            for label, reset in (("dlt, full load", True), ("dlt, merge re-run", False)):
                result = dlt_load(sandbox.url, api_key, db, loader_file_format=args.format, reset=reset)
                _print_result(f"{label} ({args.format})", result)
                if result["records"] != in_sandbox:
                    print(f"  dlt table holds {result['records']:,} rows, the sandbox {in_sandbox:,}")
    finally:
        stop_embedded_postgres(pg_folder)
        shutil.rmtree(pg_folder, ignore_errors=True)


if __name__ == "__main__":
    main()
