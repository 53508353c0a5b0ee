"""Webhook soak: the receiver under steady load while apply runs compete and a sync is killed over and over.

For `--seconds` (default 300), `--senders` (default 16) concurrent senders POST signed Stripe events to
`nextcrm-pipelines webhooks serve` on loopback, each event carrying a charge of its own; one send in
twenty re-delivers an event already acknowledged, as Stripe does. Meanwhile two processes run the
`stripe_apply_webhooks` job back to back (as queued runs would, without the one-at-a-time limit, so
their claims really compete), and a `nextcrm-pipelines sync` of the same connection (a slow sandbox
account, so it is always mid-way) is killed with SIGKILL and started again every `--kill-every`
seconds (default 30). Then the senders stop, the inbox is drained, and the counts are printed:

- every acknowledged event is in the inbox exactly once (the inbox is unique on the event id, so a
  missing or extra id is what could go wrong);
- every one was applied exactly once: `processed` after one attempt, its charge in `stripe_payments`,
  and the webhook sync logs count as many applied events as there are events.

    python benchmarks/webhook_soak.py [--seconds 300] [--senders 16] [--kill-every 30] [--database-url URL]

Exits non-zero when a count is off.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.webhooks import (  # noqa: E402
    charge_blobs,
    event_body,
    free_port,
    fresh_stripe_connection,
    start_receiver,
    stop_process,
    stripe_signature,
)

SCHEMA = "bench_soak"
SECRET = "whsec_bench_" + "b" * 32
REDELIVER_EVERY = 20
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def prepare(database_url: str, sandbox_url: str, api_key: str) -> str:
    """A fresh schema with one Stripe connection (sandbox key and webhook secret)."""
    from nextcrm_pipelines.core.vault import SecretBox

    return fresh_stripe_connection(database_url, SCHEMA, SecretBox.from_environment(), "Soak",
                                   {"api_key": api_key, "webhook_secret": SECRET}, sandbox_url)  # fmt: skip


# --- senders ----------------------------------------------------------------------------------------


class Sent:
    """What the senders did: events acknowledged (2xx), answers by status, re-deliveries."""

    def __init__(self) -> None:
        self.acknowledged: set[str] = set()
        self.answers: Counter[int | str] = Counter()
        self.redelivered = 0


async def _sender(worker: int, port: int, connection_id: str, template: dict[str, Any], until: float,
                  sent: Sent) -> None:  # fmt: skip
    import httpx
    import orjson

    mine: list[tuple[str, bytes]] = []
    path = f"/webhooks/stripe/{connection_id}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        n = 0
        while time.monotonic() < until:
            n += 1
            if mine and n % REDELIVER_EVERY == 0:
                event_id, body = mine[n % len(mine)]
                sent.redelivered += 1
            else:
                event_id = f"evt_soak_{worker}_{n}"
                charge = orjson.dumps({**template, "id": f"ch_soak_{worker}_{n}", "amount": 100 + n})
                body = event_body(event_id, charge, int(time.time()))
            headers = {"Stripe-Signature": stripe_signature(body, SECRET), "Content-Type": "application/json"}
            try:
                answer = await client.post(path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                sent.answers[type(exc).__name__] += 1
                continue
            sent.answers[answer.status_code] += 1
            if answer.status_code == 200:
                sent.acknowledged.add(event_id)
                if len(mine) < 200:
                    mine.append((event_id, body))


def send_for(port: int, connection_id: str, senders: int, seconds: float) -> Sent:
    """Run the senders for `seconds`; returns what they sent."""
    import orjson

    template = orjson.loads(charge_blobs(1)[0])
    sent = Sent()
    until = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(*(_sender(w, port, connection_id, template, until, sent) for w in range(senders)))

    asyncio.run(run())
    return sent


# --- apply runs -------------------------------------------------------------------------------------


def _apply_loop(env: dict[str, str], stop: Any, results: Any) -> None:
    """Run the real `stripe_apply_webhooks` job back to back until told to stop; report the run count."""
    os.environ.update(env)
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore")
    from nextcrm_pipelines.definitions import defs

    job = defs.resolve_job_def("stripe_apply_webhooks")
    runs = failed = 0
    with dg.DagsterInstance.ephemeral() as instance:
        while not stop.is_set():
            result = job.execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET_RUN)
            runs += 1
            failed += not result.success
            stop.wait(0.5)
    results.put({"runs": runs, "failed": failed})


# --- the sync that is killed ------------------------------------------------------------------------


class Killer(threading.Thread):
    """Starts a backfill of the connection and SIGKILLs it every `every` seconds, until stopped."""

    def __init__(self, connection_id: str, env: dict[str, str], every: float, days: int, log: Path) -> None:
        super().__init__(name="sync-killer", daemon=True)
        self.connection_id, self.env, self.every, self.days, self.log = connection_id, env, every, days, log
        self.stop = threading.Event()
        self.kills = self.finished = 0

    def run(self) -> None:
        today = datetime.now(UTC).date()
        first = today - timedelta(days=self.days)
        command = [sys.executable, "-m", "nextcrm_pipelines.cli", "sync", self.connection_id,
                   "--entity", "stripe_payments", "--from", str(first), "--to", str(today)]  # fmt: skip
        with self.log.open("ab") as log:
            while not self.stop.is_set():
                process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
                if self.stop.wait(self.every) or process.poll() is None:
                    if process.poll() is None:
                        process.send_signal(signal.SIGKILL)
                        self.kills += 1
                else:
                    self.finished += 1
                process.wait()


# --- the check ----------------------------------------------------------------------------------------


def drain(database_url: str) -> int:
    """Apply whatever is still due (a run after the last tick); returns the events applied."""
    from nextcrm_pipelines.providers import get_provider
    from nextcrm_pipelines.webhooks.inbox import apply_pending

    apply = get_provider("stripe").webhooks.apply
    applied = 0
    while True:
        outcome = apply_pending(database_url=database_url, schema=SCHEMA, provider="stripe", apply=apply)
        applied += outcome.processed
        if not outcome.processed and not outcome.held:
            return applied
        if outcome.held:
            time.sleep(1)


def check(database_url: str, sent: Sent) -> dict[str, Any]:
    """The counts that prove nothing was lost or doubled."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        ids = {r[0] for r in conn.execute(
            f"SELECT event_id FROM \"{SCHEMA}\".webhook_events WHERE event_id LIKE 'evt_soak_%'")}  # fmt: skip
        rows = conn.execute(f"SELECT count(*) FROM \"{SCHEMA}\".webhook_events WHERE event_id LIKE 'evt_soak_%'")
        inbox_rows = rows.fetchone()[0]
        states = Counter({(s, a): n for s, a, n in conn.execute(
            f"SELECT status, attempts, count(*) FROM \"{SCHEMA}\".webhook_events GROUP BY 1, 2")})  # fmt: skip
        charges = conn.execute(
            f"SELECT count(*) FROM \"{SCHEMA}\".stripe_payments WHERE id LIKE 'ch_soak_%'").fetchone()[0]  # fmt: skip
        logged = conn.execute(
            f"SELECT coalesce(sum(total_records), 0), count(*) FROM \"{SCHEMA}\".integration_sync_logs "
            "WHERE asset = 'stripe_webhooks' AND status <> 'running'").fetchone()  # fmt: skip
        syncs = Counter(dict(conn.execute(
            f"SELECT status, count(*) FROM \"{SCHEMA}\".integration_sync_logs WHERE asset = 'stripe_payments' "
            "GROUP BY 1").fetchall()))  # fmt: skip
    acknowledged = sent.acknowledged
    return {
        "acknowledged_events": len(acknowledged),
        "acknowledged_missing_from_inbox": len(acknowledged - ids),
        "inbox_rows": inbox_rows,
        "inbox_rows_not_acknowledged": len(ids - acknowledged),
        "inbox_by_status_attempts": {f"{s}/{a}": n for (s, a), n in sorted(states.items())},
        "charges_in_table": charges,
        "events_applied_by_logs": int(logged[0]),
        "apply_batches_logged": int(logged[1]),
        "sync_logs_by_status": dict(syncs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--kill-every", type=float, default=30)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    args = parser.parse_args()

    from cryptography.fernet import Fernet

    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres
    from nextcrm_sandbox.server import SandboxServer

    work = Path(tempfile.mkdtemp(prefix="nextcrm-soak-"))
    folder = None
    database_url = args.database_url
    receiver = None
    try:
        if not database_url:
            folder = work / "pg"
            folder.mkdir()
            database_url = ensure_embedded_postgres(folder).url
        os.environ.update({"NEXTCRM_SECRET_KEY": Fernet.generate_key().decode(), "NEXTCRM_DB_SCHEMA": SCHEMA,
                           "DATABASE_URL": database_url, "NEXTCRM_DATA_DIR": str(work / "data")})  # fmt: skip
        os.environ.pop("NEXTCRM_SECRET_KEY_PREVIOUS", None)
        env = dict(os.environ)
        with SandboxServer(subprocess=True) as sandbox:
            key = f"sk_test_{uuid.uuid4().hex}"
            # Slow on purpose: each page takes a while, so every sync is mid-way when it is killed.
            sandbox.add_stripe_account(api_key=key, seed=5, charges=20_000, subscriptions=0, days=40,
                                       requests_per_second=0)  # fmt: skip
            sandbox.set_stripe_faults(key, latency_ms=150)
            connection_id = prepare(database_url, sandbox.url, key)
            port = free_port()
            receiver = start_receiver(port, env, work / "receiver.log")
            context = multiprocessing.get_context("spawn")
            stop, results = context.Event(), context.Queue()
            appliers = [context.Process(target=_apply_loop, args=(env, stop, results)) for _ in range(2)]
            for process in appliers:
                process.start()
            killer = Killer(connection_id, env, args.kill_every, 40, work / "sync.log")
            killer.start()
            started = time.monotonic()
            print(f"soak: {args.senders} senders for {args.seconds:.0f}s; 2 apply loops; a sync killed every "
                  f"{args.kill_every:.0f}s", flush=True)  # fmt: skip
            sent = send_for(port, connection_id, args.senders, args.seconds)
            sending = time.monotonic() - started
            killer.stop.set()
            killer.join(timeout=60)
            stop.set()
            loops = [results.get(timeout=300) for _ in appliers]
            for process in appliers:
                process.join(timeout=60)
            drained = drain(database_url)
            report = check(database_url, sent)
    finally:
        if receiver is not None:
            stop_process(receiver)
        if folder:
            stop_embedded_postgres(folder)
        shutil.rmtree(work, ignore_errors=True)
    sends = sum(sent.answers.values())
    print(f"sent {sends:,} requests in {sending:.0f}s ({sends / sending:,.0f}/s), {sent.redelivered:,} of them "
          f"re-deliveries; answers {dict(sent.answers)}")  # fmt: skip
    print(f"apply runs: {[loop['runs'] for loop in loops]} (failed {[loop['failed'] for loop in loops]}); "
          f"{drained:,} events applied by the final drain")  # fmt: skip
    print(f"sync: killed {killer.kills} time(s), finished {killer.finished} time(s)")
    for name, value in report.items():
        print(f"  {name}: {value}")
    exact = (
        report["acknowledged_missing_from_inbox"] == 0
        and report["inbox_rows"] == report["acknowledged_events"] + report["inbox_rows_not_acknowledged"]
        and report["inbox_by_status_attempts"] == {"processed/1": report["inbox_rows"]}
        and report["charges_in_table"] == report["inbox_rows"]
        and report["events_applied_by_logs"] == report["inbox_rows"]
    )
    print("every acknowledged event is in the inbox exactly once and was applied exactly once: "
          + ("yes" if exact else "NO"))  # fmt: skip
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
