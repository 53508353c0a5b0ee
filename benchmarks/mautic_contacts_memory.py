"""Mautic contacts memory check: peak RSS of syncing 20,000 and 200,000 sandbox contacts, then sweeping them.

The sandbox (in its own process) holds two installations of N contacts over D days (the same
contacts per day at both sizes is not the point: the larger one has ten times the contacts per
window). Each sync runs in a fresh process through the same `sync_partitions` the assets call, every
day of the span. Then 300 segment joins and leaves are made (they date no contact) and the daily
sweep runs in the same process: every contact id and every segment membership listed, the contacts
whose segments differ read again. The process reports its peak RSS: streaming keeps it flat whatever
the number of contacts.

    python benchmarks/mautic_contacts_memory.py [--sizes 20000 200000] [--days 10] [--page-size 1000]

`BENCH_DATABASE_URL` points at a Postgres to use; without it an embedded one is started in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIMIT_MB = 300


def sync_contacts(database_url: str, base_url: str, client_id: str, days: int, schema: str, page_size: int) -> dict:
    """Sync every day of the installation's contacts in this process; counts, seconds and peak RSS."""
    from benchmarks.harness import drop_schema, fresh_schema

    box = fresh_schema(database_url, schema)
    import httpx
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core.runner import day_window, sweep_connection, sync_partitions
    from nextcrm_pipelines.providers import get_provider

    secrets = {"client_id": client_id, "client_secret": f"{client_id}-secret", "grant_type": "client_credentials"}
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="mautic", display_name="Bench", secrets=secrets, box=box,
                                          base_url=base_url, settings={"requests_per_second": 0,
                                                                       "page_size": page_size})  # fmt: skip
    sandbox = base_url.split("/mautic/")[0]
    today = datetime.fromtimestamp(httpx.get(f"{sandbox}/_sandbox/clock").json()["now"], UTC).date()
    windows = [day_window(today - timedelta(days=n)) for n in range(days + 1, -1, -1)]
    started = time.perf_counter()
    results = sync_partitions(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                              entity_name="mautic_contacts", connection_id=connection.id, windows=windows,
                              box=box)  # fmt: skip
    seconds = round(time.perf_counter() - started, 1)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f'SELECT count(*) FROM "{schema}".mautic_contacts').fetchone()[0]
        conn.commit()
    # Joins and leaves that date no contact: 200 contacts join segment 1, 100 leave segment 2 (some no-ops).
    account_id = base_url.split("/mautic/")[1].strip("/")
    control = f"{sandbox}/_sandbox/mautic/accounts/{account_id}/segments"
    with httpx.Client(timeout=60) as http:
        for contact in range(1, 301):
            segment, verb = (1, "add") if contact <= 200 else (2, "remove")
            http.post(f"{control}/{segment}/contacts/{contact}/{verb}").raise_for_status()
    started = time.perf_counter()
    swept = sweep_connection(database_url=database_url, schema=schema, provider=get_provider("mautic"),
                             entity_name="mautic_contacts", connection_id=connection.id, box=box)  # fmt: skip
    drop_schema(database_url, schema)
    return {
        "rows": rows,
        "records": sum(r.total for r in results),
        "failed_windows": sum(r.status == "failed" for r in results),
        "requests": sum(r.stats.requests for r in results),
        "seconds": seconds,
        "sweep_ids": swept.total,
        "sweep_read_again": swept.counts.updated,
        "sweep_requests": swept.stats.requests,
        "sweep_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _run_child(database_url: str, base_url: str, client_id: str, days: int, schema: str, page_size: int) -> dict:
    """`sync_contacts` in a fresh process, so that the peak RSS it reports is the sync's own."""
    from benchmarks.harness import run_child

    return run_child(__file__, "--database-url", database_url, "--base-url", base_url, "--client-id", client_id,
                     "--days", str(days), "--schema", schema, "--page-size", str(page_size),
                     failure="the sync failed")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(sync_contacts(args.database_url, args.base_url, args.client_id, args.days, args.schema,
                                       args.page_size)))  # fmt: skip
        return

    from benchmarks.harness import bench_database, each_size, print_peak_verdict
    from nextcrm_sandbox.mautic import MauticControl
    from nextcrm_sandbox.server import SandboxServer

    with bench_database() as database_url, SandboxServer(subprocess=True, startup_timeout=600) as sandbox:
        control = MauticControl(sandbox)

        def add_account(size: int) -> dict:
            client = {"client_id": f"bench-{size}", "client_secret": f"bench-{size}-secret"}
            return control.add_account(seed=size, contacts=size, campaigns=5, segments=10, days=args.days,
                                       clients=[client])  # fmt: skip

        def measure(size: int, account: dict) -> dict:
            return _run_child(database_url, f"{sandbox.url}{account['base_path']}", f"bench-{size}", args.days,
                              f"bench_mautic_{size}", args.page_size)  # fmt: skip

        report = each_size(args.sizes, control, add_account, measure)
    print("\ncontacts  synced  seconds  sweep: ids  read again  requests  seconds  peak RSS (MB)")
    for size, out in report.items():
        print(f"{size:>8}  {out['rows']:>6}  {out['seconds']:>7}  {out['sweep_ids']:>10}  {out['sweep_read_again']:>10}"
              f"  {out['sweep_requests']:>8}  {out['sweep_seconds']:>7}  {out['peak_rss_mb']:>13}")  # fmt: skip
    print_peak_verdict(report, LIMIT_MB)


if __name__ == "__main__":
    main()
