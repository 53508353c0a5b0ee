"""Xero backfill benchmark: 100,000 invoices with line items over 90 days, under Xero's 60 calls/minute.

The sandbox (in its own process) enforces Xero's published limits with real-time fixed windows (60
per minute and 5,000 per day per organisation, 429 with `X-Rate-Limit-Problem` beyond them). The
organisation is connected through the OAuth flow, then a child process backfills 90 days through
the same `sync_partitions` the assets call, with the client's own pacing. A sampler counts the API
requests the sandbox answers every second, so the report shows requests per minute (the busiest
60-second span and the average), the 429s received (0 means the limiter kept under the limit),
records/s and the child's peak RSS.

    python benchmarks/xero_backfill.py [--invoices 100000] [--days 90]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(args: argparse.Namespace) -> None:
    """Backfill every day of the window in one call, as a Dagster backfill run does."""
    from datetime import UTC, datetime, timedelta

    from nextcrm_pipelines.core.runner import day_window, sync_partitions
    from nextcrm_pipelines.providers import get_provider

    today = datetime.now(UTC).date()
    days = [today - timedelta(days=n) for n in range(args.days, -1, -1)]
    started = time.perf_counter()
    results = sync_partitions(database_url=args.database_url, schema=args.schema, provider=get_provider("xero"),
                              entity_name="xero_invoices", connection_id=args.connection_id,
                              windows=[day_window(d) for d in days])  # fmt: skip
    print(json.dumps({
        "seconds": time.perf_counter() - started,
        "records": sum(r.total for r in results),
        "inserted": sum(r.counts.inserted for r in results),
        "failed_windows": sum(r.status != "success" for r in results),
        "requests": sum(r.stats.requests for r in results),
        "retries": sum(r.stats.retries for r in results),
        "rate_limit_waits": sum(r.stats.rate_limit_waits for r in results),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


class Sampler(threading.Thread):
    """Reads the sandbox's answered-request counter once a second."""

    def __init__(self, read: object) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.read()))
            self.stop.wait(1.0)

    def busiest_minute(self) -> int:
        best = 0
        for i, (t0, n0) in enumerate(self.samples):
            later = [n for t, n in self.samples[i:] if t - t0 <= 60.0]
            best = max(best, later[-1] - n0)
        return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invoices", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--connection-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import httpx
    import psycopg
    from cryptography.fernet import Fernet

    from nextcrm_pipelines.core import db
    from nextcrm_pipelines.core.connect import connect
    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres
    from nextcrm_pipelines.core.oauth import OAuthApp
    from nextcrm_pipelines.core.vault import SecretBox
    from nextcrm_pipelines.providers import get_provider
    from nextcrm_sandbox.server import SandboxServer
    from nextcrm_sandbox.xero import XeroControl

    schema = "bench_xero"
    os.environ["NEXTCRM_SECRET_KEY"] = Fernet.generate_key().decode()
    os.environ["NEXTCRM_DB_SCHEMA"] = schema
    folder = None
    database_url = os.environ.get("BENCH_DATABASE_URL")
    if not database_url:
        folder = Path(tempfile.mkdtemp(prefix="nextcrm-bench-"))
        database_url = ensure_embedded_postgres(folder).url
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        db.upgrade(database_url, schema)
        with SandboxServer(subprocess=True) as sandbox:
            control = XeroControl(sandbox)
            control.add_client("bench-app", "bench-secret")
            started = time.perf_counter()
            tenant = control.add_tenant("bench-app", seed=9, invoices=args.invoices, contacts=2000, days=args.days)
            print(f"sandbox organisation: {tenant['counts']['invoices']:,} invoices in "
                  f"{time.perf_counter() - started:.1f}s", flush=True)  # fmt: skip
            provider = get_provider("xero")
            (connection,) = connect(
                spec=provider.oauth, discover=provider.discover_tenants,
                app=OAuthApp("bench-app", "bench-secret", "http://127.0.0.1:8766/callback"),
                database_url=database_url, box=SecretBox.from_environment(), base_url=f"{sandbox.url}/xero",
                name="Bench", on_url=lambda url: httpx.get(url, follow_redirects=True, timeout=60).raise_for_status(),
            )  # fmt: skip
            sampler = Sampler(lambda: int(control.stats()["tenants"][tenant["id"]]["requests"]))
            sampler.start()
            output = subprocess.run(
                [sys.executable, __file__, "--child", "--database-url", database_url, "--schema", schema,
                 "--connection-id", connection.id, "--days", str(args.days)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            sampler.stop.set()
            sampler.join()
            result = json.loads(output.strip().splitlines()[-1])
            stats = control.stats()
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                f"SELECT count(*), sum(jsonb_array_length(raw->'LineItems')) FROM \"{schema}\".xero_invoices"
            ).fetchone()
    finally:
        if folder:
            stop_embedded_postgres(folder)
            shutil.rmtree(folder, ignore_errors=True)

    minutes = result["seconds"] / 60
    print(f"\n== Xero backfill: {args.invoices:,} invoices with line items over {args.days} days ==")
    print(f"records read            {result['records']:>10,}  ({result['failed_windows']} failed windows)")
    print(f"rows in xero_invoices   {rows[0]:>10,}  ({rows[1]:,} line items kept)")
    rate = result["records"] / result["seconds"]
    print(f"wall time               {result['seconds']:>10.1f} s   -> {rate:,.0f} records/s")
    print(f"API requests            {result['requests']:>10,}  (retries {result['retries']}, "
          f"rate-limit waits {result['rate_limit_waits']})")  # fmt: skip
    print(f"requests per minute     {result['requests'] / minutes:>10.1f} average, {sampler.busiest_minute()} in the "
          f"busiest 60 s (Xero's limit: 60)")  # fmt: skip
    print(f"429 answers from Xero   {stats.get('rate_limited', 0):>10}")
    print(f"peak RSS of the sync    {result['peak_rss_mb']:>10.0f} MB")


if __name__ == "__main__":
    main()
