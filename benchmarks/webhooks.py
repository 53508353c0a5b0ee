"""Webhook receiver benchmark: signed Stripe events per second into the inbox, and receipt to table.

One run, one machine, one Postgres server. The receiver runs as `nextcrm-pipelines webhooks serve`
does, in its own process, so the load generator does not share its interpreter. We measure
  - receiver: a closed loop of `--concurrency` HTTP/1.1 keep-alive connections on loopback, each
    POSTing Stripe events (each carrying a distinct charge, ~2.5 KB) signed with the connection's
    `webhook_secret`; verified events accepted per second and client-side latency percentiles;
  - baseline: the bare database cost of the same rows, one committed INSERT per event into a table
    like `webhook_events` (same columns, indexes and foreign key) from a psycopg AsyncConnectionPool of
    the receiver's size at the same concurrency; the receiver's rate is reported as a ratio of it;
  - apply: the backlog those rounds leave, applied by the `stripe_apply_webhooks` runs the sensor
    requests (each bounded) until nothing is due;
  - receipt to table: one event POSTed, then a sensor tick and the run it requests (executed in
    process), until its charge row is in `stripe_payments`; set against the sensor interval.
Rounds alternate receiver and baseline so that both see the same machine; the median round is the
figure. CPU is reported per event for the receiver process, the Postgres server (postmaster and every
backend: with `--database-url` on a shared server, other sessions count too) and this process (the
load generator); on a busy machine these move less than the rates do.

    python benchmarks/webhooks.py [--events 10000] [--rounds 3] [--concurrency 16] [--database-url URL]
                                  [--profile receiver.txt]   # py-spy stacks of the receiver in round 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu import CpuMeter, postmaster_pid  # noqa: E402

SCHEMA = "bench_webhooks"
SECRET = "whsec_bench_" + "b" * 32
RECEIVER_POOL_SIZE = 8  # `build_app`'s default, which `webhooks serve` uses
TARGET_EVENTS_PER_SECOND = 1_000
TARGET_P99_MS = 100.0
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # run config: only the run's own events


# --- events -----------------------------------------------------------------------------------------


def charge_blobs(count: int, seed: int = 42) -> list[bytes]:
    """`count` distinct Stripe charge objects (JSON bytes) from the sandbox's generator."""
    from nextcrm_sandbox.stripe import StripeAccount

    account = StripeAccount("sk_test_bench_webhooks", seed=seed, charges=count, subscriptions=0, days=30)
    return [account.charges.blob(i) for i in range(len(account.charges))]


def event_body(event_id: str, charge: bytes, created: int) -> bytes:
    """A `charge.succeeded` Event carrying `charge`, as Stripe delivers it."""
    head = (
        f'{{"id":"{event_id}","object":"event","api_version":"2024-06-20","created":{created},'
        f'"livemode":false,"pending_webhooks":1,"request":{{"id":null,"idempotency_key":null}},'
        f'"type":"charge.succeeded","data":{{"object":'
    )
    return head.encode() + charge + b"}}"


def stripe_signature(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    """The `Stripe-Signature` header for `body`: `t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`."""
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), str(at).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


# --- load -------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured phase: requests (or inserts), wall time, latencies and CPU."""

    name: str
    count: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    cpu: dict[str, float | None] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Successful requests (or inserts) per second of wall time."""
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The `q` quantile (0..1) of the latencies, in ms."""
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        """The phase's figures, rounded, for the report."""
        return {
            "name": self.name,
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.rate, 1),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "max_ms": round(max(self.latencies_ms, default=float("nan")), 2),
            "errors": self.errors,
            "cpu_s": {k: None if v is None else round(v, 2) for k, v in self.cpu.items()},
        }


async def _post_worker(port: int, path: str, bodies: Iterator[bytes], phase: Phase) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    prefix = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json; charset=utf-8\r\n"
        "User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
    ).encode()
    try:
        for body in bodies:
            head = f"Content-Length: {len(body)}\r\nStripe-Signature: {stripe_signature(body)}\r\n\r\n".encode()
            started = time.perf_counter()
            writer.write(prefix + head + body)
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            phase.latencies_ms.append((time.perf_counter() - started) * 1000)
            if 200 <= status < 300:
                phase.count += 1
            else:
                phase.errors[str(status)] = phase.errors.get(str(status), 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


def receiver_load(port: int, connection_id: str, bodies: list[bytes], concurrency: int, phase: Phase) -> Phase:
    """POST every body to the receiver from `concurrency` keep-alive connections; fills `phase`."""
    path = f"/webhooks/stripe/{connection_id}"

    async def run() -> None:
        shared = iter(bodies)  # one event loop: the workers draw from it in turn
        await asyncio.gather(*(_post_worker(port, path, shared, phase) for _ in range(concurrency)))

    started = time.perf_counter()
    asyncio.run(run())
    phase.seconds = time.perf_counter() - started
    return phase


def _orjson_text(obj: Any) -> str:
    import orjson

    return orjson.dumps(obj).decode()


def baseline_load(
    database_url: str,
    target: str,
    connection_id: str,
    bodies: list[bytes],
    concurrency: int,
    pool_size: int,
    phase: Phase,
) -> Phase:
    """One committed INSERT of each event's row into `target` from an async pool; fills `phase`.

    Rows carry what the receiver stores (payload as jsonb, raw body, audit headers); their
    parameters are built before the clock starts, and jsonb is dumped with orjson.
    """
    import orjson
    from psycopg import AsyncConnection, sql
    from psycopg.types.json import Jsonb, set_json_dumps
    from psycopg_pool import AsyncConnectionPool

    from nextcrm_pipelines.webhooks.verify import parse_time

    insert = sql.SQL(
        "INSERT INTO {} (provider, connection_id, event_id, event_type, occurred_at, payload, raw_body, headers, "
        "status, last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (provider, connection_id, event_id) DO NOTHING"
    ).format(sql.SQL(target))
    headers = Jsonb({"content-type": "application/json; charset=utf-8", "stripe-signature": stripe_signature(b"")})
    rows = []
    for body in bodies:
        payload = orjson.loads(body)
        rows.append(
            (
                "stripe",
                connection_id,
                payload["id"],
                payload["type"],
                parse_time(payload["created"]),
                Jsonb(payload),
                body.decode(),
                headers,
                "pending",
                None,
            )
        )

    async def configure(conn: AsyncConnection) -> None:
        set_json_dumps(_orjson_text, context=conn)

    async def run() -> None:
        async with AsyncConnectionPool(
            database_url, min_size=pool_size, max_size=pool_size, configure=configure, open=False
        ) as pool:
            await pool.wait()
            shared = iter(rows)

            async def worker() -> None:
                for params in shared:
                    started = time.perf_counter()
                    async with pool.connection() as conn:
                        await conn.execute(insert, params)
                    phase.latencies_ms.append((time.perf_counter() - started) * 1000)
                    phase.count += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            phase.seconds = time.perf_counter() - started

    asyncio.run(run())
    return phase


# --- receiver process -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_receiver(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`nextcrm-pipelines webhooks serve` on 127.0.0.1:`port`, waited for until it answers."""
    import httpx

    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nextcrm_pipelines.cli",
            "webhooks",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the receiver exited ({process.returncode}):\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError("the receiver did not answer within 60 s")


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a child process (SIGKILL when it does not exit in 10 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_profiler(pid: int, output: str) -> subprocess.Popen:
    """py-spy sampling `pid` into `output` (collapsed stacks) until `stop_profiler`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    process = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--output", output],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the load starts
    return process


def stop_profiler(process: subprocess.Popen) -> None:
    """Stop py-spy; it writes its output on SIGINT."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- apply ------------------------------------------------------------------------------------------


def sensor_tick_and_run(instance: Any) -> tuple[int, float, float]:
    """One `stripe_webhooks_sensor` evaluation and the run it requests, executed in process with the
    request's run config and tags (console logging at WARNING).

    Returns (runs requested, seconds in the sensor, seconds in the runs).
    """
    import dagster as dg

    from nextcrm_pipelines.definitions import defs

    started = time.perf_counter()
    sensor = defs.resolve_sensor_def("stripe_webhooks_sensor")
    context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
    requests = list(sensor.evaluate_tick(context).run_requests or [])
    ticked = time.perf_counter()
    job = defs.resolve_job_def("stripe_apply_webhooks")
    for request in requests:
        run_config = {**(request.run_config or {}), **QUIET_RUN}
        result = job.execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config, tags=request.tags
        )
        if not result.success:
            raise RuntimeError("a stripe_apply_webhooks run failed")
    return len(requests), ticked - started, time.perf_counter() - ticked


def drain(instance: Any) -> tuple[int, float]:
    """Sensor ticks and their runs until nothing is due; returns (runs, seconds in runs)."""
    runs, seconds = 0, 0.0
    while True:
        requested, _, run_s = sensor_tick_and_run(instance)
        if not requested:
            return runs, seconds
        runs, seconds = runs + requested, seconds + run_s


def _apply_worker(database_url: str, env: dict[str, str], start: Any, results: Any) -> None:
    """One apply run's work (`apply_pending`, as the job calls it) in its own process, started on a signal."""
    os.environ.update(env)
    from nextcrm_pipelines.providers import get_provider
    from nextcrm_pipelines.webhooks.inbox import apply_pending

    apply = get_provider("stripe").webhooks.apply
    start.wait()
    began = time.time()
    outcome = apply_pending(database_url=database_url, schema=SCHEMA, provider="stripe", apply=apply)
    results.put({"began": began, "ended": time.time(), "processed": outcome.processed, "failed": outcome.failed,
                 "held": outcome.held})  # fmt: skip


def competing_apply(database_url: str, workers: int) -> dict[str, Any]:
    """Re-queue every processed event, then apply them with `workers` apply runs started together, each in
    its own process; each event must be applied exactly once between them."""
    import multiprocessing

    import psycopg

    from nextcrm_pipelines.webhooks.inbox import requeue

    with psycopg.connect(database_url) as conn:
        events, _ = requeue(conn, SCHEMA, provider="stripe", statuses=("processed",))
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(workers + 1), context.Queue()
    env = {k: os.environ[k] for k in ("NEXTCRM_SECRET_KEY", "NEXTCRM_DB_SCHEMA", "DATABASE_URL")}
    processes = [
        context.Process(target=_apply_worker, args=(database_url, env, start, results)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    start.wait()
    outcomes = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    seconds = max(o["ended"] for o in outcomes) - min(o["began"] for o in outcomes)
    processed = sum(o["processed"] for o in outcomes)
    inbox = inbox_counts(database_url)
    if processed != events or inbox != {"processed": events}:
        raise RuntimeError(f"{workers} competing apply runs processed {processed} of {events}; inbox {inbox}")
    return {"workers": workers, "events": events, "seconds": seconds, "per_second": events / seconds,
            "per_run": [o["processed"] for o in outcomes], "inbox_after": inbox}  # fmt: skip


def inbox_counts(database_url: str) -> dict[str, int]:
    """Inbox rows by status."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(f'SELECT status, count(*) FROM "{SCHEMA}".webhook_events GROUP BY status').fetchall()
    return {status: int(n) for status, n in rows}


def receipt_to_table(
    port: int, connection_id: str, charges: list[bytes], database_url: str, instance: Any
) -> list[dict[str, float]]:
    """For each charge: POST its event, tick the sensor, run the apply job, until the row is in the table."""
    import httpx
    import orjson
    import psycopg

    from nextcrm_pipelines.core.money import minor_to_major

    timings = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client, psycopg.connect(database_url) as db:
        for n, charge in enumerate(charges):
            raw = orjson.loads(charge)
            body = event_body(f"evt_single_{n}_{time.time_ns()}", charge, int(time.time()))
            started = time.perf_counter()
            response = client.post(
                f"/webhooks/stripe/{connection_id}",
                content=body,
                headers={"Stripe-Signature": stripe_signature(body), "Content-Type": "application/json"},
            )
            acknowledged = time.perf_counter()
            if response.status_code != 200:
                raise RuntimeError(f"the receiver answered {response.status_code}: {response.text}")
            runs, sensor_s, run_s = sensor_tick_and_run(instance)
            row = db.execute(
                f'SELECT amount FROM "{SCHEMA}".stripe_payments WHERE connection_id = %s AND id = %s',
                (connection_id, raw["id"]),
            ).fetchone()
            db.commit()
            applied = time.perf_counter()
            if runs != 1 or row is None or row[0] != minor_to_major(raw["amount"], raw["currency"]):
                raise RuntimeError(f"charge {raw['id']} was not applied (runs={runs}, row={row})")
            timings.append(
                {
                    "post_ms": (acknowledged - started) * 1000,
                    "sensor_ms": sensor_s * 1000,
                    "run_ms": run_s * 1000,
                    "total_ms": (applied - started) * 1000,
                }
            )
    return timings


def fresh_process_load_seconds() -> float:
    """Wall time of loading the code location in a new interpreter (what each launched run pays first)."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import nextcrm_pipelines.definitions"], check=True, cwd=ROOT, capture_output=True
    )
    return time.perf_counter() - started


# --- main -------------------------------------------------------------------------------------------


def fresh_stripe_connection(database_url: str, schema: str, box: Any, name: str, secrets: dict[str, str],
                            base_url: str | None = None) -> str:  # fmt: skip
    """Drop and migrate `schema`, then add one Stripe connection with `secrets`; returns its id."""
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core import db

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    db.upgrade(database_url, schema)
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name=name, box=box, secrets=secrets,
                                          base_url=base_url)  # fmt: skip
    return connection.id


def prepare_database(database_url: str, box: Any) -> str:
    """A fresh schema with one Stripe connection holding the webhook secret, and the baseline table."""
    import psycopg

    connection_id = fresh_stripe_connection(database_url, SCHEMA, box, "Bench hooks",
                                            {"api_key": "sk_test_bench", "webhook_secret": SECRET})  # fmt: skip
    with psycopg.connect(database_url) as conn:
        conn.execute(f'CREATE TABLE "{SCHEMA}".baseline_events (LIKE "{SCHEMA}".webhook_events INCLUDING ALL)')
        conn.execute(
            f'ALTER TABLE "{SCHEMA}".baseline_events ADD FOREIGN KEY (connection_id) '
            f'REFERENCES "{SCHEMA}".integration_connections (id)'
        )
    return connection_id


def run(args: argparse.Namespace, database_url: str, work: Path) -> dict[str, Any]:
    """Every measurement against `database_url`, with the receiver started and stopped here; the report."""
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    os.environ.update(
        {
            "NEXTCRM_SECRET_KEY": key,
            "NEXTCRM_DB_SCHEMA": SCHEMA,
            "DATABASE_URL": database_url,
            "NEXTCRM_DATA_DIR": str(work / "data"),
        }
    )
    os.environ.pop("NEXTCRM_SECRET_KEY_PREVIOUS", None)
    from nextcrm_pipelines.core.vault import SecretBox

    connection_id = prepare_database(database_url, SecretBox([key]))
    singles = 5
    warmup = min(500, args.events)
    started = time.perf_counter()
    charges = charge_blobs(warmup + args.rounds * args.events + singles)
    now = int(time.time())
    bodies = [event_body(f"evt_bench_{n:08d}", c, now) for n, c in enumerate(charges[:-singles])]
    print(
        f"{len(charges):,} charges generated in {time.perf_counter() - started:.1f}s; "
        f"mean event {statistics.mean(len(b) for b in bodies):,.0f} bytes",
        flush=True,
    )

    import dagster as dg

    for category in (dg.BetaWarning, dg.PreviewWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module="dagster")
    from nextcrm_pipelines.automation import webhook_sensor_interval

    report: dict[str, Any] = {
        "events": args.events,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "receiver_pool": RECEIVER_POOL_SIZE,
        "cpus": os.cpu_count(),
        "sensor_interval_s": webhook_sensor_interval(),
    }
    port = free_port()
    receiver = start_receiver(port, dict(os.environ), work / "receiver.log")
    try:
        meter = CpuMeter({"receiver": receiver.pid}, postmaster_pid(database_url))
        receiver_load(port, connection_id, bodies[:warmup], args.concurrency, Phase("warm-up"))
        baseline_load(
            database_url,
            f'"{SCHEMA}".baseline_events',
            connection_id,
            bodies[:warmup],
            args.concurrency,
            RECEIVER_POOL_SIZE,
            Phase("warm-up"),
        )
        rounds = []
        for r in range(args.rounds):
            chunk = bodies[warmup + r * args.events : warmup + (r + 1) * args.events]
            profiler = start_profiler(receiver.pid, args.profile) if args.profile and r == 0 else None
            before = meter.sample()
            ours = receiver_load(port, connection_id, chunk, args.concurrency, Phase(f"receiver {r + 1}"))
            ours.cpu = meter.spent(before, meter.sample())
            if profiler:
                stop_profiler(profiler)
                print(f"receiver profile of round 1 (py-spy, raw collapsed stacks): {args.profile}", flush=True)
            before = meter.sample()
            base = baseline_load(
                database_url,
                f'"{SCHEMA}".baseline_events',
                connection_id,
                chunk,
                args.concurrency,
                RECEIVER_POOL_SIZE,
                Phase(f"baseline {r + 1}"),
            )
            base.cpu = meter.spent(before, meter.sample())
            rounds.append((ours, base))
            print(
                f"round {r + 1}: receiver {ours.rate:,.0f} ev/s p99 {ours.percentile(0.99):.1f} ms; "
                f"baseline {base.rate:,.0f} inserts/s p99 {base.percentile(0.99):.1f} ms",
                flush=True,
            )
        report["rounds_detail"] = [{"receiver": o.summary(), "baseline": b.summary()} for o, b in rounds]
        report["inbox_after_load"] = inbox_counts(database_url)

        import dagster as dg

        with dg.instance_for_test() as instance:
            backlog = report["inbox_after_load"].get("pending", 0)
            runs, run_s = drain(instance)
            report["apply_backlog"] = {
                "events": backlog,
                "runs": runs,
                "run_s": run_s,
                "per_second": backlog / run_s if run_s else 0.0,
                "inbox_after": inbox_counts(database_url),
            }
            print(f"backlog of {backlog:,} applied by {runs} run(s) in {run_s:.1f}s", flush=True)
            for workers in (2, 1, 2, 1):  # re-applied (rows unchanged): competing runs against one alone
                figures = competing_apply(database_url, workers)
                report.setdefault("reapply", []).append(figures)
                rate, split = figures["per_second"], figures["per_run"]
                print(f"re-applied {figures['events']:,} by {workers} competing run(s) in {figures['seconds']:.1f}s "
                      f"= {rate:,.0f} events/s (per run {split})", flush=True)  # fmt: skip
            report["receipt_to_table"] = receipt_to_table(
                port, connection_id, charges[-singles:], database_url, instance
            )
        report["fresh_process_load_s"] = fresh_process_load_seconds()
    finally:
        stop_process(receiver)
    return report


def _median_round(rounds: list[dict[str, Any]], side: str) -> dict[str, Any]:
    ordered = sorted(rounds, key=lambda r: r[side]["per_second"])
    return ordered[len(ordered) // 2][side]


def print_report(report: dict[str, Any]) -> None:
    """The figures as a table, then the whole report as JSON."""

    def per_event(summary: dict[str, Any], who: str) -> str:
        spent = summary["cpu_s"].get(who)
        return "-" if spent is None or not summary["count"] else f"{spent * 1000 / summary['count']:.2f}"

    rounds = report["rounds_detail"]
    lines = [
        "",
        f"== Webhook receiver: {report['events']:,} signed Stripe events x {report['rounds']} rounds, "
        f"{report['concurrency']} in flight, receiver pool {report['receiver_pool']}, {report['cpus']} CPUs ==",
        f"{'phase':<13}{'per s':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'non-2xx':>8}{'wall s':>8}"
        "   CPU ms/event: receiver  postgres  client",
    ]
    for pair in rounds:
        for side in ("receiver", "baseline"):
            s = pair[side]
            lines.append(
                f"{s['name']:<13}{s['per_second']:>8,.0f}{s['p50_ms']:>8.1f}{s['p99_ms']:>8.1f}{s['max_ms']:>8.1f}"
                f"{sum(s['errors'].values()):>8}{s['seconds']:>8.1f}{'':>17}{per_event(s, 'receiver'):>8}"
                f"{per_event(s, 'postgres'):>10}{per_event(s, 'client'):>8}"
            )
    ours, base = _median_round(rounds, "receiver"), _median_round(rounds, "baseline")
    met = ours["per_second"] >= TARGET_EVENTS_PER_SECOND and ours["p99_ms"] < TARGET_P99_MS
    lines += [
        f"median round: receiver {ours['per_second']:,.0f} events/s (p50 {ours['p50_ms']:.1f} ms, "
        f"p99 {ours['p99_ms']:.1f} ms); baseline {base['per_second']:,.0f} inserts/s (p50 {base['p50_ms']:.1f} ms, "
        f"p99 {base['p99_ms']:.1f} ms)",
        f"receiver / bare committed INSERT = {ours['per_second'] / base['per_second']:.2f}",
        f"target >= {TARGET_EVENTS_PER_SECOND:,} events/s with p99 < {TARGET_P99_MS:.0f} ms: "
        + ("met" if met else "MISSED"),
    ]
    apply = report["apply_backlog"]
    lines.append(
        f"apply: backlog of {apply['events']:,} events by {apply['runs']} stripe_apply_webhooks run(s) in "
        f"{apply['run_s']:.1f}s = {apply['per_second']:,.0f} events/s (inbox after: {apply['inbox_after']})"
    )
    for workers in (2, 1):
        rates = sorted(f["per_second"] for f in report["reapply"] if f["workers"] == workers)
        lines.append(f"re-apply of the whole inbox (rows unchanged) by {workers} run(s) started together: "
                     f"{' / '.join(f'{r:,.0f}' for r in rates)} events/s, each event applied exactly once")  # fmt: skip
    singles = report["receipt_to_table"]
    med = {k: statistics.median(t[k] for t in singles) for k in singles[0]}
    interval, work = report["sensor_interval_s"], med["total_ms"] / 1000
    lines += [
        f"receipt to table, {len(singles)} single events, sensor ticked right after the 2xx (median; first):",
        f"  POST -> 2xx {med['post_ms']:.1f} ms; sensor tick {med['sensor_ms']:.0f} ms; apply run in process "
        f"{med['run_ms']:.0f} ms; POST -> row in stripe_payments {med['total_ms']:.0f} ms "
        f"(first {singles[0]['total_ms']:.0f} ms)",
        f"  sensor interval {interval} s (NEXTCRM_WEBHOOK_SENSOR_SECONDS): receipt to table ~ "
        f"{interval / 2 + work:.1f} s on average, up to ~ {interval + work:.1f} s; the daemon's run launcher adds a "
        "new process per run, "
        f"which loads the code location first ({report['fresh_process_load_s']:.1f} s here)",
    ]
    print("\n".join(lines))
    print(json.dumps(report, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000, help="events per round (each side)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16, help="requests (and inserts) in flight")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="an existing server (default: a fresh embedded Postgres, stopped afterwards)",
    )
    parser.add_argument("--profile", metavar="FILE", help="record the receiver with py-spy during round 1 into FILE")
    args = parser.parse_args()

    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres

    work = Path(tempfile.mkdtemp(prefix="nextcrm-bench-webhooks-"))
    folder = None
    database_url = args.database_url
    try:
        if not database_url:
            folder = work / "pg"
            folder.mkdir()
            database_url = ensure_embedded_postgres(folder).url
        report = run(args, database_url, work)
    finally:
        if folder:
            stop_embedded_postgres(folder)
        shutil.rmtree(work, ignore_errors=True)
    print_report(report)


if __name__ == "__main__":
    main()
