"""Stripe sync benchmark: our engine against the fetch-only limit, a naive loader and dlt.

One run, one machine, one Postgres server, one sandbox (in its own process): the sandbox holds
N charges over D days; we measure
  - fetch-only: every page our Stripe client reads for the backfill, parsed, no database;
  - ours: the full backfill (every day, through the same `sync_partitions` the assets call, which
    shares the days between `sync_workers` processes), then a re-sync of the same days with nothing
    changed;
  - naive: fetch + one `INSERT ... ON CONFLICT` and one COMMIT per row, on a subset, scaled;
  - dlt: its `rest_api` source into the same Postgres with `merge` on id (first load and re-run);
and peak RSS of our sync at two sizes, each in a fresh process, to show memory does not grow with
the record count. Rates are charges per second of wall time; ratios are against baselines measured
in this same run. Fetch-only, ours and naive run `--repeat` times, interleaved, and the medians are
compared; each phase also reports the CPU seconds of the client, the sandbox and Postgres.

    python benchmarks/stripe_sync.py [--charges 200000] [--days 90] [--small 50000] [--repeat 3] [--skip-dlt]
    python benchmarks/stripe_sync.py --profile fetch.prof   # only the fetch-only phase, under cProfile

`--profile` runs the fetch-only phase once under cProfile, prints where the client's time goes and
saves the statistics for `python -m pstats` or snakeviz; nothing else is measured.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH_KEY = "sk_test_benchmark_{}"


def _days(now: datetime, days: int) -> list:
    today = now.date()
    return [today - timedelta(days=n) for n in range(days, -1, -1)]


def _sandbox_now(url: str) -> datetime:
    import httpx

    return datetime.fromtimestamp(httpx.get(f"{url}/_sandbox/clock").json()["now"], UTC)


def _meter(database_url: str, sandbox_pid: int | None) -> Any:
    """CPU seconds of this process, the sandbox and Postgres; None when psutil (the bench extra) is missing."""
    try:
        from benchmarks.cpu import CpuMeter, postmaster_pid

        return CpuMeter({"sandbox": sandbox_pid} if sandbox_pid else {}, postmaster_pid(database_url))
    except ImportError:
        return None


def _spent(meter: Any, before: dict | None) -> dict | None:
    if meter is None or before is None:
        return None
    return {k: None if v is None else round(v, 2) for k, v in meter.spent(before, meter.sample()).items()}


def fetch_only(url: str, api_key: str, days: int, meter: Any = None) -> dict:
    """Every page the backfill reads, through our client, parsed; no database.

    Under the sync's garbage-collector setting, so the limit gets every client-side saving the sync gets.
    """
    from nextcrm_pipelines.core.connections import Connection
    from nextcrm_pipelines.core.runner import day_window
    from nextcrm_pipelines.core.sync import fewer_gc_passes
    from nextcrm_pipelines.core.vault import Secrets
    from nextcrm_pipelines.providers.stripe.client import StripeApi

    connection = Connection(id="bench", provider="stripe", display_name="bench", base_url=url,
                            settings={"requests_per_second": 0})  # fmt: skip
    before = meter.sample() if meter else None
    started = time.perf_counter()
    records = 0
    with fewer_gc_passes(), StripeApi(connection, Secrets({"api_key": api_key})) as api:
        for day in _days(_sandbox_now(url), days):
            for page in api.charges(day_window(day)):
                records += len(page)
        requests = api.stats.requests
    seconds = time.perf_counter() - started
    return {"records_read": records, "seconds": seconds, "requests": requests, "cpu_s": _spent(meter, before)}


def ours(database_url: str, url: str, api_key: str, days: int, schema: str, sandbox_pid: int | None = None) -> dict:
    """Full backfill then an unchanged re-sync, day by day, through the assets' sync path."""
    from benchmarks.harness import fresh_schema

    box = fresh_schema(database_url, schema)
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core.runner import day_window, sync_partitions, sync_workers
    from nextcrm_pipelines.providers import get_provider

    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name="Bench", secrets={"api_key": api_key},
                                          box=box, base_url=url, settings={"requests_per_second": 0})  # fmt: skip
    provider = get_provider("stripe")
    out: dict = {}
    windows = [day_window(day) for day in _days(_sandbox_now(url), days)]
    meter = _meter(database_url, sandbox_pid)
    for phase in ("backfill", "resync"):
        before = meter.sample() if meter else None
        started = time.perf_counter()
        results = sync_partitions(database_url=database_url, schema=schema, provider=provider,
                                  entity_name="stripe_payments", connection_id=connection.id, windows=windows,
                                  box=box)  # fmt: skip
        totals = {
            name: sum(getattr(r.counts, name) for r in results)
            for name in ("inserted", "updated", "unchanged", "failed")
        }
        totals["requests"] = sum(r.stats.requests for r in results)
        totals["failed_windows"] = sum(r.status == "failed" for r in results)
        totals["seconds"] = time.perf_counter() - started
        totals["cpu_s"] = _spent(meter, before)
        out[phase] = totals
    with psycopg.connect(database_url) as conn:
        out["rows"] = conn.execute(f'SELECT count(*) FROM "{schema}".stripe_payments').fetchone()[0]
    out["workers"] = sync_workers(provider, len(windows))
    # The largest of this process and its helpers (each holds its own batches in flight).
    peaks = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out["peak_rss_mb"] = max(peaks) / 1024
    return out


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(ours(args.database_url, args.sandbox_url, args.api_key, args.days, args.schema, args.sandbox_pid)))


def _run_child(database_url: str, url: str, api_key: str, days: int, schema: str, sandbox_pid: int | None) -> dict:
    """`ours` in a fresh process, so that the peak RSS it reports is the sync's own."""
    from benchmarks.harness import run_child

    return run_child(__file__, "--database-url", database_url, "--sandbox-url", url, "--api-key", api_key,
                     "--days", str(days), "--schema", schema, "--sandbox-pid", str(sandbox_pid or 0),
                     failure="our sync failed")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--charges", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=50_000, help="second size for the memory comparison")
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--naive-subset", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of fetch-only, ours and naive (medians)")
    parser.add_argument("--skip-dlt", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="profile one fetch-only pass into FILE and stop there")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-url", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    parser.add_argument("--sandbox-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from benchmarks.harness import bench_database
    from nextcrm_sandbox.server import SandboxServer

    report: dict = {"charges": args.charges, "days": args.days, "repeat": args.repeat,
                    "fetch_only_runs": [], "ours_runs": [], "naive_runs": []}  # fmt: skip
    with bench_database() as database_url, SandboxServer(subprocess=True) as sandbox:
        big, small = BENCH_KEY.format("big"), BENCH_KEY.format("small")
        started = time.perf_counter()
        sandbox.add_stripe_account(api_key=big, seed=42, charges=args.charges, subscriptions=10,
                                   days=args.days, requests_per_second=0)  # fmt: skip
        # Same charges per day as the big account, so the two sizes differ only in record count.
        small_days = max(1, round(args.days * args.small / args.charges))
        report["small_days"] = small_days
        sandbox.add_stripe_account(api_key=small, seed=43, charges=args.small, subscriptions=10,
                                   days=small_days, requests_per_second=0)  # fmt: skip
        print(f"sandbox ready in {time.perf_counter() - started:.1f}s at {sandbox.url}", flush=True)

        sandbox_pid = sandbox.pid
        if args.profile:
            profile_fetch(sandbox.url, big, args.days, args.profile)
            return
        from benchmarks.baselines import dlt_load, naive_load

        meter = _meter(database_url, sandbox_pid)
        # Repetitions interleave the contenders, so a noisy spell on this shared machine hits them alike.
        for rep in range(1, args.repeat + 1):
            report["fetch_only_runs"].append(fetch_only(sandbox.url, big, args.days, meter))
            print(f"[{rep}] fetch-only", report["fetch_only_runs"][-1], flush=True)
            report["ours_runs"].append(_run_child(database_url, sandbox.url, big, args.days, "bench_ours", sandbox_pid))
            print(f"[{rep}] ours", report["ours_runs"][-1], flush=True)
            report["naive_runs"].append(
                naive_load(sandbox.url, big, database_url, limit_records=args.naive_subset, reset=True)
            )
            print(f"[{rep}] naive", report["naive_runs"][-1], flush=True)
        report["ours_small"] = _run_child(database_url, sandbox.url, small, small_days, "bench_ours_small", sandbox_pid)
        print("ours (small)", report["ours_small"], flush=True)
        if not args.skip_dlt:
            pipelines = tempfile.mkdtemp(prefix="nextcrm-bench-dlt-")
            report["dlt_first"] = dlt_load(sandbox.url, big, database_url, pipelines_dir=pipelines)
            print("dlt first load", report["dlt_first"], flush=True)
            report["dlt_rerun"] = dlt_load(sandbox.url, big, database_url, pipelines_dir=pipelines)
            print("dlt re-run", report["dlt_rerun"], flush=True)
            shutil.rmtree(pipelines, ignore_errors=True)
    print_report(report)


def profile_fetch(url: str, api_key: str, days: int, path: str) -> None:
    """One fetch-only pass under cProfile: its statistics saved to `path`, the top of them printed."""
    profiler = cProfile.Profile()
    result = profiler.runcall(fetch_only, url, api_key, days)
    profiler.dump_stats(path)
    print(f"fetch-only under cProfile: {result['records_read']:,} records, {result['requests']:,} requests, "
          f"{result['seconds']:.1f}s (profiled, slower than a plain run); statistics in {path}")  # fmt: skip
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).strip_dirs().sort_stats(order).print_stats(25)


def _median_run(runs: list[dict], seconds: Any) -> dict:
    """The run of median wall time (`seconds` picks it out of a run)."""
    return sorted(runs, key=seconds)[len(runs) // 2]


def _cpu_line(label: str, phase: dict) -> str | None:
    cpu = phase.get("cpu_s")
    if not cpu:
        return None
    parts = ", ".join(f"{who} {spent:.1f}" for who, spent in cpu.items() if spent is not None)
    return f"CPU seconds, {label} ({phase['seconds']:.1f}s wall on {os.cpu_count()} CPUs): {parts}"


def print_report(report: dict) -> None:
    """Medians of the repetitions, ratios between contenders of this run, then the whole report as JSON."""
    n = report["charges"]
    fetch_run = _median_run(report["fetch_only_runs"], lambda r: r["seconds"])
    backfill_run = _median_run(report["ours_runs"], lambda r: r["backfill"]["seconds"])["backfill"]
    resync_run = _median_run(report["ours_runs"], lambda r: r["resync"]["seconds"])["resync"]
    fetch = n / fetch_run["seconds"]
    backfill = n / backfill_run["seconds"]
    resync = n / resync_run["seconds"]
    naive = _median_run(report["naive_runs"], lambda r: r["seconds"])["records_per_second"]

    def spread(values: list[float]) -> str:
        return " / ".join(f"{v:,.0f}" for v in values)

    reps = report["repeat"]
    lines = [
        "",
        f"== Stripe sync benchmark: {n:,} charges over {report['days']} days "
        f"({fetch_run['records_read']:,} records read incl. the events feed), median of {reps}; "
        f"our backfill in {report['ours_runs'][-1].get('workers', 1)} process(es) ==",
        f"fetch-only (client, no DB)   {fetch:10,.0f} charges/s  ({fetch_run['seconds']:.1f}s)"
        f"  runs: {spread([n / r['seconds'] for r in report['fetch_only_runs']])}",
        f"ours: full backfill          {backfill:10,.0f} charges/s  ({backfill_run['seconds']:.1f}s)"
        f"  = {backfill / fetch:.0%} of fetch-only"
        f"  runs: {spread([n / r['backfill']['seconds'] for r in report['ours_runs']])}",
        f"ours: unchanged re-sync      {resync:10,.0f} charges/s  ({resync_run['seconds']:.1f}s)"
        f"  runs: {spread([n / r['resync']['seconds'] for r in report['ours_runs']])}",
        f"naive row-by-row (subset)    {naive:10,.0f} charges/s  -> ours is {backfill / naive:.1f}x"
        f"  runs: {spread([r['records_per_second'] for r in report['naive_runs']])}",
    ]
    if "dlt_first" in report:
        dlt = n / report["dlt_first"]["seconds"]
        dlt2 = n / report["dlt_rerun"]["seconds"]
        lines.append(f"dlt rest_api merge: load     {dlt:10,.0f} charges/s  -> ours is {backfill / dlt:.1f}x")
        lines.append(f"dlt rest_api merge: re-run   {dlt2:10,.0f} charges/s  -> ours is {resync / dlt2:.1f}x")
    peak = max(r["peak_rss_mb"] for r in report["ours_runs"])
    rows = report["ours_runs"][-1]["rows"]
    lines.append(
        f"peak RSS of our sync (same charges per day): {report['ours_small']['peak_rss_mb']:.0f} MB at "
        f"{report['ours_small']['rows']:,} rows over {report['small_days']} days, "
        f"{peak:.0f} MB at {rows:,} rows over {report['days']} days"
    )
    for label, phase in (("fetch-only", fetch_run), ("backfill", backfill_run), ("re-sync", resync_run)):
        line = _cpu_line(label, phase)
        if line:
            lines.append(line)
    lines.append(f"rows mirrored: {rows:,} (sandbox: {n:,})")
    print("\n".join(lines))
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
