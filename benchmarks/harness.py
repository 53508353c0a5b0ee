"""What the benchmark scripts share: the Postgres they measure against, a freshly migrated schema in it, child
processes that report their figures as one JSON line, and the memory checks' round of sizes and verdict.

The scripts run as `python benchmarks/<name>.py` with the project root put on `sys.path` first; they import
this module (like `benchmarks.baselines` and `benchmarks.cpu`) inside their functions, after that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def bench_database() -> Iterator[str]:
    """The URL of the Postgres to measure against: `BENCH_DATABASE_URL` when it is set, else an embedded server
    started in a temporary folder, stopped and removed when the block ends."""
    configured = os.environ.get("BENCH_DATABASE_URL")
    if configured:
        yield configured
        return
    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="nextcrm-bench-"))
    url = ensure_embedded_postgres(folder).url
    try:
        yield url
    finally:
        stop_embedded_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


def drop_schema(database_url: str, schema: str) -> None:
    """Drop `schema` and everything in it, if it exists."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def fresh_schema(database_url: str, schema: str) -> Any:
    """Make `schema` this process's (`NEXTCRM_DB_SCHEMA`), drop it if it exists and migrate it afresh. Returns
    the `SecretBox` of the process's encryption key, `NEXTCRM_SECRET_KEY`: a new one unless one is set already,
    so that every schema of a run and the child processes it starts share it."""
    from cryptography.fernet import Fernet

    os.environ.setdefault("NEXTCRM_SECRET_KEY", Fernet.generate_key().decode())
    os.environ["NEXTCRM_DB_SCHEMA"] = schema
    from nextcrm_pipelines.core import db
    from nextcrm_pipelines.core.vault import SecretBox

    drop_schema(database_url, schema)
    db.upgrade(database_url, schema)
    return SecretBox.from_environment()


def run_child(script: str, *args: str, failure: str) -> dict[str, Any]:
    """Run `script --child *args` in a fresh Python process (so its peak RSS is its own) and return the JSON
    object on the last line it prints. A non-zero exit raises `RuntimeError("<failure> (exit code N)")` with the
    end of the child's stderr."""
    output = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    if output.returncode != 0:
        raise RuntimeError(f"{failure} (exit code {output.returncode}):\n{output.stderr[-4000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def each_size(sizes: list[int], control: Any, add_account: Callable[[int], dict[str, Any]],
              measure: Callable[[int, dict[str, Any]], dict[str, Any]]) -> dict[int, dict[str, Any]]:  # fmt: skip
    """A memory check's round: for each size a sandbox account of that many contacts (`add_account(size)`, timed),
    the figures `measure(size, account)` reports (printed as they come), then the account deleted from `control`
    so that the next size has the sandbox's memory to itself. The figures by size."""
    report: dict[int, dict[str, Any]] = {}
    for size in sizes:
        started = time.perf_counter()
        account = add_account(size)
        print(f"{size} contacts ready in {time.perf_counter() - started:.1f}s", flush=True)
        report[size] = measure(size, account)
        print(f"{size} contacts: {report[size]}", flush=True)
        control.delete_account(account["id"])
    return report


def print_peak_verdict(report: dict[int, dict[str, Any]], limit_mb: int) -> None:
    """Whether the peak RSS stayed flat across the sizes and under `limit_mb`, as the memory checks' last line."""
    peaks = [out["peak_rss_mb"] for out in report.values()]
    verdict = "flat and under" if max(peaks) < limit_mb else "NOT under"
    print(f"largest / smallest peak: {max(peaks) / min(peaks):.2f}x; {verdict} {limit_mb} MB")
