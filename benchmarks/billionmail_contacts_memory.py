"""BillionMail contacts memory check: peak RSS of syncing 20,000 and 200,000 sandbox contacts.

The sandbox (in its own process) holds an installation of N contacts. Each sync runs in a fresh
process through the same path a Dagster run takes: `sync_partitions` reads the whole contact list
(the subscribed list, then the unsubscribed one, 100 a page, the most BillionMail serves), then
`sweep_connection` lists every id again to flag entries gone upstream; the process reports its peak
RSS. Streaming keeps it flat whatever the number of contacts.

    python benchmarks/billionmail_contacts_memory.py [--sizes 20000 200000] [--page-size 100]

`BENCH_DATABASE_URL` points at a Postgres to use; without it an embedded one is started in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIMIT_MB = 300


def sync_contacts(database_url: str, base_url: str, password: str, schema: str, page_size: int) -> dict:
    """Sync and sweep the installation's whole contact list in this process; counts, seconds and peak RSS."""
    from benchmarks.harness import drop_schema, fresh_schema

    box = fresh_schema(database_url, schema)
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core.runner import snapshot_window, sweep_connection, sync_partitions
    from nextcrm_pipelines.providers import get_provider

    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="billionmail", display_name="Bench", box=box,
                                          secrets={"username": "admin", "password": password}, base_url=base_url,
                                          settings={"requests_per_second": 0, "page_size": page_size})  # fmt: skip
    provider = get_provider("billionmail")
    started = time.perf_counter()
    (result,) = sync_partitions(database_url=database_url, schema=schema, provider=provider,
                                entity_name="billionmail_contacts", connection_id=connection.id,
                                windows=[snapshot_window()], box=box)  # fmt: skip
    synced = time.perf_counter()
    sync_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    swept = sweep_connection(database_url=database_url, schema=schema, provider=provider,
                             entity_name="billionmail_contacts", connection_id=connection.id, box=box)  # fmt: skip
    with psycopg.connect(database_url) as conn:
        rows, deleted = conn.execute(
            f'SELECT count(*), count(*) FILTER (WHERE deleted) FROM "{schema}".billionmail_contacts'
        ).fetchone()
        conn.commit()
    drop_schema(database_url, schema)
    return {
        "rows": rows,
        "flagged_deleted": deleted,
        "records": result.total,
        "status": result.status,
        "sweep_listed": swept.total,
        "requests": result.stats.requests + swept.stats.requests,
        "sync_seconds": round(synced - started, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "sync_peak_rss_mb": round(sync_peak, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _run_child(database_url: str, base_url: str, password: str, schema: str, page_size: int) -> dict:
    """`sync_contacts` in a fresh process, so that the peak RSS it reports is the sync's own."""
    from benchmarks.harness import run_child

    return run_child(__file__, "--database-url", database_url, "--base-url", base_url, "--password", password,
                     "--schema", schema, "--page-size", str(page_size), failure="the sync failed")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--password", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(sync_contacts(args.database_url, args.base_url, args.password, args.schema, args.page_size)))
        return

    from benchmarks.harness import bench_database, each_size, print_peak_verdict
    from nextcrm_sandbox.billionmail import BillionMailControl
    from nextcrm_sandbox.server import SandboxServer

    with bench_database() as database_url, SandboxServer(subprocess=True, startup_timeout=600) as sandbox:
        control = BillionMailControl(sandbox)

        def add_account(size: int) -> dict:
            return control.add_account(id=f"bench-{size}", seed=size, contacts=size, groups=12, campaigns=2, days=365,
                                       password=f"bench-{size}")  # fmt: skip

        def measure(size: int, account: dict) -> dict:
            return _run_child(database_url, f"{sandbox.url}{account['base_path']}", f"bench-{size}",
                              f"bench_billionmail_{size}", args.page_size)  # fmt: skip

        report = each_size(args.sizes, control, add_account, measure)
    print("\ncontacts  entries  sync s  sync+sweep s  peak RSS (MB)")
    for size, out in report.items():
        print(f"{size:>8}  {out['rows']:>7}  {out['sync_seconds']:>6}  {out['seconds']:>12}  {out['peak_rss_mb']:>13}")
    print_peak_verdict(report, LIMIT_MB)


if __name__ == "__main__":
    main()
