"""Many connections: the connection x day partition model at `--connections` accounts, measured end to end.

One run, one machine, one fresh Postgres (embedded, or fresh schemas on `--database-url`), one sandbox
(in its own process) and a fresh DAGSTER_HOME whose `dagster.yaml` is the project's (Postgres storage,
queued runs, the same run concurrency limits). With N sandbox connections (mostly Stripe, a share of
every other provider; the mix is printed) it measures
  - code location load: `import nextcrm_pipelines.definitions` in a fresh interpreter, `dagster
    definitions validate`, and the webserver's workspace from process start to loaded;
  - the connections sensor: a tick that adds N partitions (evaluation, then the daemon's writes) and a
    tick with nothing to change; the daemon's own tick records of that sensor while it runs;
  - the hourly schedules: one tick of each for N connections (evaluation as the daemon asks for it, with
    its partition-key validation), run requests counted;
  - the UI's partitions page of one asset: the webserver's `PartitionHealthQuery` (what the page asks
    for) and the asset's partition counts, timed over HTTP;
  - one hour's syncs through the daemon: the schedules' run requests (one ranged run per block of
    connections, `--sample-runs all` of them, or a sample) submitted as queued runs to `dagster-daemon run`;
    submit to all done, each run's wall and CPU time, the Postgres connections in use (sampled), and,
    for a sample, extrapolated to N;
  - a backfill of one connection x `BACKFILL_DAYS` days of one asset, launched through the webserver's
    `launchPartitionBackfill` as the UI's backfill dialog does: the mutation, the backfill daemon until
    the backfill's run(s) are submitted, and until done; then the partitions page's queries again;
  - in process, at 10, 100 and 1,000 connections and for four partition shapes (connection x day,
    connection x month, connection only, day only): key count, listing every key, validating one key,
    and one run request per connection for the current period, built and validated.

    python benchmarks/many_connections.py [--connections 1000] [--sample-runs all|K] [--database-url URL]
                                          [--stripe-share 0.9] [--shapes-only] [--skip-shapes]

Every server it starts listens on 127.0.0.1 and is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.webhooks import free_port  # noqa: E402

SCHEMA = "bench_many"
DAGSTER_SCHEMA = "bench_many_dagster"
LOCATION = "nextcrm_pipelines"
REPOSITORY = "__repository__"
UI_ASSET = "stripe_payments"
SHAPE_SIZES = (10, 100, 1000)
# Small accounts: a sync of one connection x day is a few records, so the figures are the model's cost.
DATA_DAYS = 3
OTHERS = ("paypal", "billionmail", "xero", "quickbooks", "myob", "mautic")
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL_DAYS = 30
# A backfill is done once its status leaves these (Dagster's BulkActionStatus values).
BACKFILL_IN_PROGRESS = {"REQUESTED", "CANCELING", "FAILING"}

# The query the asset's Partitions tab sends (Dagster UI 1.13, `usePartitionHealthData`).
PARTITION_HEALTH_QUERY = """
query PartitionHealthQuery($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode {
      id
      partitionKeysByDimension { name type partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
        ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
        ... on MultiPartitionStatuses {
          primaryDimensionName
          ranges {
            primaryDimStartKey primaryDimEndKey primaryDimStartTime primaryDimEndTime
            secondaryDim {
              ... on TimePartitionStatuses { ranges { status startTime endTime startKey endKey } }
              ... on DefaultPartitionStatuses { materializedPartitions materializingPartitions failedPartitions }
            }
          }
        }
      }
    }
  }
}
"""
# The asset's header and the catalog show these counts.
PARTITION_STATS_QUERY = """
query PartitionStats($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    ... on AssetNode { partitionStats { numMaterialized numMaterializing numFailed numPartitions } }
  }
}
"""
WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
SCHEDULES_QUERY = """
query Schedules($repo: RepositorySelector!) {
  schedulesOrError(repositorySelector: $repo) { __typename ... on Schedules {
    results { name scheduleState { id status } } } }
}
"""
STOP_SCHEDULE = """
mutation Stop($id: String!) {
  stopRunningSchedule(id: $id) { __typename ... on PythonError { message } }
}
"""
# What the UI's "Launch backfill" button sends for partitions of an asset (`LAUNCH_PARTITION_BACKFILL_MUTATION`).
LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}
"""
DAEMON_HEALTH_QUERY = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
SENSOR_TICKS_QUERY = """
query Ticks($sensor: SensorSelector!) {
  sensorOrError(sensorSelector: $sensor) { __typename ... on Sensor {
    sensorState { ticks(limit: 20) { status timestamp endTimestamp } } } }
}
"""
LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


# --- processes ----------------------------------------------------------------------------------------


def start_server(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A Dagster server in a session of its own, so stopping it also stops its code servers and runs."""
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after 20 s."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # children it may have left behind
        return
    _kill_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _terminate_on_sigterm() -> None:
    """SIGTERM ends the benchmark as Ctrl-C does, so the cleanup in `finally` blocks runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


# --- GraphQL --------------------------------------------------------------------------------------------


class Webserver:
    """`dagster-webserver` on 127.0.0.1 and the GraphQL calls the benchmark makes to it."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        import httpx

        self.port = free_port()
        self.started = time.perf_counter()
        command = [str(Path(sys.executable).with_name("dagster-webserver")), "-h", "127.0.0.1",
                   "-p", str(self.port), "-w", str(ROOT / "workspace.yaml")]  # fmt: skip
        self.process = start_server(command, env, work / "webserver.log")
        self.log = work / "webserver.log"
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=600)

    def query(self, query: str, variables: dict[str, Any] | None = None) -> tuple[dict[str, Any], float, int]:
        """The answer's data, the seconds it took and its size in bytes."""
        started = time.perf_counter()
        answer = self.client.post("/graphql", json={"query": query, "variables": variables or {}})
        seconds = time.perf_counter() - started
        answer.raise_for_status()
        body = answer.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"], seconds, len(answer.content)

    def wait_loaded(self, timeout: float = 600) -> float:
        """Seconds from process start until the workspace has loaded the code location."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited:\n{self.log.read_text()[-3000:]}")
            try:
                data, _, _ = self.query(WORKSPACE_QUERY)
            except (httpx.HTTPError, RuntimeError):
                time.sleep(0.2)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            loaded = [e for e in entries if e["loadStatus"] == "LOADED"]
            if loaded:
                location = loaded[0]["locationOrLoadError"]
                if location["__typename"] != "RepositoryLocation":
                    raise RuntimeError(f"the code location failed to load: {location}")
                return time.perf_counter() - self.started
            time.sleep(0.2)
        raise TimeoutError("the webserver's workspace did not load")

    def stop_schedules(self) -> list[str]:
        """Stop the hourly and sweep schedules, so the daemon runs only the runs this benchmark submits."""
        repo = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
        data, _, _ = self.query(SCHEDULES_QUERY, {"repo": repo})
        stopped = []
        for schedule in data["schedulesOrError"]["results"]:
            answer, _, _ = self.query(STOP_SCHEDULE, {"id": schedule["scheduleState"]["id"]})
            if answer["stopRunningSchedule"]["__typename"] == "PythonError":
                raise RuntimeError(f"cannot stop {schedule['name']}: {answer['stopRunningSchedule']['message']}")
            stopped.append(schedule["name"])
        return stopped

    def launch(self, job_name: str, tags: dict[str, str]) -> str:
        """Submit a run as the daemon would for a run request: queued, with the request's tags."""
        params = {
            "selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job_name},
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        data, _, _ = self.query(LAUNCH_RUN, {"params": params})
        result = data["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"launching {job_name} failed: {result}")
        return result["run"]["runId"]

    def launch_backfill(self, asset: str, partition_names: list[str]) -> tuple[str, float]:
        """Launch a backfill of `partition_names` of one asset as the UI's dialog does; its id and seconds."""
        params = {"assetSelection": [{"path": [asset]}], "partitionNames": partition_names, "fromFailure": False,
                  "tags": []}  # fmt: skip
        data, seconds, _ = self.query(LAUNCH_BACKFILL, {"backfillParams": params})
        result = data["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"launching a backfill of {asset} failed: {result}")
        return result["backfillId"], seconds

    def daemon_healthy(self) -> bool:
        data, _, _ = self.query(DAEMON_HEALTH_QUERY)
        statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        return any(s["daemonType"] == "QUEUED_RUN_COORDINATOR" and s["healthy"] for s in statuses)

    def sensor_ticks(self, name: str) -> list[dict[str, Any]]:
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name}
        data, _, _ = self.query(SENSOR_TICKS_QUERY, {"sensor": selector})
        return data["sensorOrError"]["sensorState"]["ticks"]

    def close(self) -> None:
        self.client.close()
        stop_server(self.process)


# --- setup ----------------------------------------------------------------------------------------------


def prepare_environment(database_url: str, work: Path) -> dict[str, str]:
    """Fresh schemas, a fresh DAGSTER_HOME holding the project's dagster.yaml, and the variables it reads."""
    import psycopg
    from cryptography.fernet import Fernet

    from nextcrm_pipelines.core import db, settings

    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema in (SCHEMA, DAGSTER_SCHEMA):
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{DAGSTER_SCHEMA}"')
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    storage = settings.dagster_storage_url(database_url).replace(
        f"search_path%3D{settings.DAGSTER_SCHEMA}", f"search_path%3D{DAGSTER_SCHEMA}"
    )
    os.environ.update({
        "NEXTCRM_SECRET_KEY": Fernet.generate_key().decode(), "NEXTCRM_DB_SCHEMA": SCHEMA,
        "DATABASE_URL": database_url, "NEXTCRM_DATA_DIR": str(work / "data"), "DAGSTER_HOME": str(home),
        "NEXTCRM_DAGSTER_STORAGE_URL": storage, "NEXTCRM_DAGSTER_ARTIFACTS": str(work / "artifacts"),
        "NEXTCRM_DAGSTER_COMPUTE_LOGS": str(work / "compute_logs"),
        # The sandbox's MYOB company files sign in as its default administrator.
        "MYOB_COMPANY_FILE_USERNAME": "Administrator",
        # The servers and runs import the code of the tree this benchmark is in.
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    })  # fmt: skip
    os.environ.pop("NEXTCRM_SECRET_KEY_PREVIOUS", None)
    db.upgrade(database_url, SCHEMA)
    return dict(os.environ)


def connection_mix(total: int, stripe_share: float) -> dict[str, int]:
    """How many connections of each provider: `stripe_share` Stripe, the rest spread over the others."""
    others = total - round(total * stripe_share)
    mix = {"stripe": total - others}
    for i, name in enumerate(OTHERS):
        mix[name] = others // len(OTHERS) + (1 if i < others % len(OTHERS) else 0)
    return mix


def create_connections(sandbox: Any, database_url: str, mix: dict[str, int]) -> dict[str, float]:
    """Sandbox accounts and their connections, as a user would connect them; seconds per provider."""
    import httpx
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core.connect import connect
    from nextcrm_pipelines.core.oauth import OAuthApp
    from nextcrm_pipelines.core.vault import SecretBox
    from nextcrm_pipelines.providers import get_provider
    from nextcrm_sandbox.billionmail import BillionMailControl
    from nextcrm_sandbox.mautic import MauticControl
    from nextcrm_sandbox.myob import MyobControl
    from nextcrm_sandbox.paypal import PayPalControl
    from nextcrm_sandbox.quickbooks import QuickBooksControl
    from nextcrm_sandbox.xero import XeroControl

    box = SecretBox.from_environment()
    seconds: dict[str, float] = {}

    def oauth(provider_name: str, client_id: str, secret: str, base_url: str, name: str, **options: Any) -> None:
        provider = get_provider(provider_name)
        assert provider.oauth is not None and provider.discover_tenants is not None
        connect(spec=provider.oauth, discover=provider.discover_tenants,
                app=OAuthApp(client_id, secret, f"http://127.0.0.1:{free_port()}/callback"),
                database_url=database_url, box=box, base_url=base_url, name=name,
                on_url=lambda url: httpx.get(url, follow_redirects=True, timeout=30).raise_for_status(),
                **options)  # fmt: skip

    with psycopg.connect(database_url) as conn:
        started = time.perf_counter()
        for i in range(mix["stripe"]):
            key = f"sk_test_many_{i:05d}"
            sandbox.add_stripe_account(api_key=key, seed=1000 + i, charges=3 * DATA_DAYS, subscriptions=1,
                                       days=DATA_DAYS, requests_per_second=0)  # fmt: skip
            vault.add_connection(conn, provider="stripe", display_name=f"Stripe {i}", secrets={"api_key": key},
                                 box=box, base_url=sandbox.url)  # fmt: skip
        seconds["stripe"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(mix["paypal"]):
            client_id, secret = f"many-paypal-{i}", f"secret-paypal-{i}"
            account = PayPalControl(sandbox).add_account(client_id, secret, seed=2000 + i, transactions=10,
                                                         subscriptions=1, days=DATA_DAYS)  # fmt: skip
            vault.add_connection(conn, provider="paypal", display_name=f"PayPal {i}", box=box,
                                 base_url=f"{sandbox.url}/paypal", external_tenant=account["id"],
                                 secrets={"client_id": client_id, "client_secret": secret,
                                          "grant_type": "client_credentials"},
                                 settings={"mode": "sandbox"})  # fmt: skip
        seconds["paypal"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(mix["billionmail"]):
            mail = BillionMailControl(sandbox).add_account(seed=3000 + i, campaigns=5, contacts=20, days=DATA_DAYS,
                                                           username=f"admin{i}", password="bench-password")  # fmt: skip
            vault.add_connection(conn, provider="billionmail", display_name=f"BillionMail {i}", box=box,
                                 base_url=f"{sandbox.url}{mail['base_path']}",
                                 secrets={"username": f"admin{i}", "password": "bench-password"})  # fmt: skip
        seconds["billionmail"] = time.perf_counter() - started
    controls = {"xero": XeroControl, "quickbooks": QuickBooksControl, "myob": MyobControl}
    for provider_name, control in controls.items():
        started = time.perf_counter()
        for i in range(mix[provider_name]):
            client_id, secret = f"many-{provider_name}-{i}", f"secret-{provider_name}-{i}"
            control(sandbox).add_client(client_id, secret)
            spec = {"client_id": client_id, "seed": 4000 + i, "invoices": 10, "contacts": 5, "days": DATA_DAYS}
            tenant = sandbox.control("POST", f"/_sandbox/{provider_name}/tenants", json=spec)
            oauth(provider_name, client_id, secret, f"{sandbox.url}/{provider_name}", f"{provider_name} {i}",
                  extra_authorize_params={"sandbox_tenant": tenant["id"]})  # fmt: skip
        seconds[provider_name] = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(mix["mautic"]):
        client_id, secret = f"many-mautic-{i}", f"secret-mautic-{i}"
        clients = [{"client_id": client_id, "client_secret": secret}]
        mautic = MauticControl(sandbox).add_account(seed=5000 + i, campaigns=5, contacts=20, days=DATA_DAYS,
                                                    clients=clients)  # fmt: skip
        oauth("mautic", client_id, secret, f"{sandbox.url}{mautic['base_path']}", f"Mautic {i}")
    seconds["mautic"] = time.perf_counter() - started
    return seconds


# --- code location, sensor, schedules ---------------------------------------------------------------


def _timed_subprocess(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def code_location_load(env: dict[str, str], repeat: int = 3) -> dict[str, Any]:
    """Fresh-interpreter import of the definitions (median of `repeat`) and `dagster definitions validate`."""
    imports = [_timed_subprocess([sys.executable, "-c", "import nextcrm_pipelines.definitions"], env)
               for _ in range(repeat)]  # fmt: skip
    bare = [_timed_subprocess([sys.executable, "-c", "pass"], env) for _ in range(repeat)]
    dagster_cli = str(Path(sys.executable).with_name("dagster"))
    validate = _timed_subprocess([dagster_cli, "definitions", "validate", "-w", str(ROOT / "workspace.yaml")], env)
    return {"import_definitions_s": statistics.median(imports), "bare_interpreter_s": statistics.median(bare),
            "definitions_validate_s": validate}  # fmt: skip


def connections_sensor_ticks(instance: Any, defs: Any) -> dict[str, Any]:
    """A tick that adds every connection's partition (evaluate, then apply as the daemon does), then a no-op tick."""
    import dagster as dg

    sensor = defs.resolve_sensor_def("connections_sensor")
    out: dict[str, Any] = {}
    for label in ("adding", "no_change"):
        context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
        started = time.perf_counter()
        data = sensor.evaluate_tick(context)
        evaluated = time.perf_counter() - started
        added = 0
        started = time.perf_counter()
        for request in data.dynamic_partitions_requests or []:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
                added += len(request.partition_keys)
            else:
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
        applied = time.perf_counter() - started
        out[label] = {"evaluate_s": evaluated, "apply_s": applied, "partitions_added": added}
    return out


def schedule_ticks(instance: Any, defs: Any) -> dict[str, Any]:
    """One tick of every provider's hourly schedule now: seconds and run requests (validated, as the daemon)."""
    import dagster as dg

    from nextcrm_pipelines.automation import sync_jobs
    from nextcrm_pipelines.providers import PROVIDERS

    now = datetime.now(UTC).replace(minute=7, second=0, microsecond=0)
    out: dict[str, Any] = {"providers": {}, "requests": []}
    for name, provider in PROVIDERS.items():
        seconds, count = 0.0, 0
        for job in sync_jobs(provider):
            schedule = defs.resolve_schedule_def(job.schedule)
            with dg.build_schedule_context(instance=instance, scheduled_execution_time=now,
                                           resources={"mirror": defs.resources["mirror"]},
                                           repository_def=defs.get_repository_def()) as context:  # fmt: skip
                started = time.perf_counter()
                requests = list(schedule.evaluate_tick(context).run_requests or [])
                seconds += time.perf_counter() - started
            count += len(requests)
            out["requests"] += [(name, job.name, dict(r.tags), job.schedule) for r in requests]
        out["providers"][name] = {"seconds": seconds, "run_requests": count}
    out["seconds"] = sum(p["seconds"] for p in out["providers"].values())
    out["run_requests"] = len(out["requests"])
    return out


def sample_requests(requests: list[tuple[str, str, dict[str, str], str]], k: int | None) -> list:
    """`k` run requests in proportion to each provider's share (at least one of each provider present);
    all of them when `k` is None or not fewer than the requests."""
    if k is None or k >= len(requests):
        return list(requests)
    by_provider: dict[str, list] = defaultdict(list)
    for request in requests:
        by_provider[request[0]].append(request)
    quota = {p: max(1, round(k * len(rs) / len(requests))) for p, rs in by_provider.items()}
    while sum(quota.values()) > k and max(quota.values()) > 1:
        quota[max(quota, key=quota.get)] -= 1
    return [r for p, rs in by_provider.items() for r in rs[: quota[p]]]


# --- runs through the daemon ---------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples, every `interval` seconds, the Postgres sessions and the CPU of the daemon's process tree."""

    def __init__(self, database_url: str, daemon_pid: int, interval: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        import psutil

        self.database_url, self.interval = database_url, interval
        self.daemon = psutil.Process(daemon_pid)
        self.stop = threading.Event()
        self.sessions: list[tuple[int, int]] = []  # (this database, the whole server)
        self.processes: dict[int, dict[str, Any]] = {}

    def run(self) -> None:
        import psutil
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE datname = current_database()), count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend'"
                ).fetchone()
                self.sessions.append((row[0], row[1]))
                for process in self.daemon.children(recursive=True):
                    try:
                        with process.oneshot():
                            times = process.cpu_times()
                            seen = self.processes.setdefault(process.pid, {
                                "ppid": process.ppid(), "cmdline": " ".join(process.cmdline()[:6])})  # fmt: skip
                            seen["own"] = times.user + times.system
                            seen["reaped"] = times.children_user + times.children_system
                    except psutil.Error:
                        continue
                self.stop.wait(self.interval)

    def run_workers(self) -> list[int]:
        """Processes a code server started for runs (not code servers, nor multiprocessing's resource trackers)."""
        servers = {pid for pid, p in self.processes.items() if " grpc" in p["cmdline"]}
        return [pid for pid, p in self.processes.items() if p["ppid"] in servers and pid not in servers
                and "resource_tracker" not in p["cmdline"]]  # fmt: skip

    def run_cpu(self) -> list[float]:
        """CPU seconds of each run: a run worker (a child of a code server) with its step processes."""
        children: dict[int, list[int]] = defaultdict(list)
        for pid, p in self.processes.items():
            children[p["ppid"]].append(pid)

        def tree(pid: int) -> float:
            return sum(self.processes[c]["own"] + tree(c) for c in children.get(pid, []))

        workers = self.run_workers()
        return [self.processes[w]["own"] + max(self.processes[w]["reaped"], tree(w)) for w in workers]


@contextlib.contextmanager
def running_daemon(webserver: Webserver, env: dict[str, str], work: Path) -> Any:
    """`dagster-daemon run` until the block ends: yields its process and the seconds until it was healthy."""
    command = [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(ROOT / "workspace.yaml")]
    daemon = start_server(command, env, work / "daemon.log")
    try:
        started = time.perf_counter()
        deadline = time.monotonic() + 300
        while not webserver.daemon_healthy():
            _check_daemon(daemon, work)
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not report healthy")
            time.sleep(0.5)
        yield daemon, time.perf_counter() - started
    finally:
        stop_server(daemon)


def _check_daemon(daemon: subprocess.Popen, work: Path) -> None:
    if daemon.poll() is not None:
        raise RuntimeError(f"dagster-daemon exited:\n{(work / 'daemon.log').read_text()[-3000:]}")


def run_sample(webserver: Webserver, daemon: subprocess.Popen, work: Path, requests: list, database_url: str,
               instance: Any, sandbox_pid: int | None) -> dict[str, Any]:  # fmt: skip
    """Submit the run requests as queued runs to the running daemon; time them until all are done."""
    import dagster as dg

    from benchmarks.cpu import CpuMeter, postmaster_pid

    idle = Sampler(database_url, daemon.pid)
    idle.start()
    time.sleep(3)
    idle.stop.set()
    idle.join()
    sampler = Sampler(database_url, daemon.pid)
    sampler.start()
    meter = CpuMeter({"sandbox": sandbox_pid} if sandbox_pid else {}, postmaster_pid(database_url))
    before = _cpu_sample(meter)
    started = time.perf_counter()
    run_ids, launches = {}, []
    for provider, job, tags, schedule in requests:
        launched = time.perf_counter()
        run_ids[webserver.launch(job, {**tags, "dagster/schedule_name": schedule})] = provider
        launches.append(time.perf_counter() - launched)
    submitted = time.perf_counter() - started
    while True:
        records = instance.get_run_records(dg.RunsFilter(run_ids=list(run_ids)))
        if len(records) == len(run_ids) and all(r.dagster_run.status.value in TERMINAL for r in records):
            break
        _check_daemon(daemon, work)
        time.sleep(0.5)
    total = time.perf_counter() - started
    spent = meter.spent(before, _cpu_sample(meter))
    sampler.stop.set()
    sampler.join()
    ticks = webserver.sensor_ticks("connections_sensor")
    walls = [r.end_time - r.start_time for r in records if r.start_time and r.end_time]
    queued = [r.start_time - r.create_timestamp.timestamp() for r in records if r.start_time]
    by_provider: dict[str, list[float]] = defaultdict(list)
    for record in records:
        if record.start_time and record.end_time:
            by_provider[run_ids[record.dagster_run.run_id]].append(record.end_time - record.start_time)
    run_cpu = sampler.run_cpu()
    daemon_ticks = [t["endTimestamp"] - t["timestamp"] for t in ticks if t.get("endTimestamp")]
    return {
        "runs": len(records),
        "statuses": dict(Counter(r.dagster_run.status.value for r in records)),
        "submit_s": submitted,
        "launch_run_s": _spread(launches),
        "submit_to_all_done_s": total,
        "run_wall_s": _spread(walls),
        "queued_s": _spread(queued),
        "run_wall_by_provider_s": {p: round(statistics.mean(w), 2) for p, w in sorted(by_provider.items())},
        "run_cpu_s": _spread(run_cpu),
        "run_processes_seen": len(run_cpu),
        "run_process_commands": dict(Counter(sampler.processes[w]["cmdline"][:80] for w in sampler.run_workers())),
        "cpu_s_during_runs": {k: None if v is None else round(v, 1) for k, v in spent.items()},
        "pg_sessions_max": max(s[0] for s in sampler.sessions),
        "pg_sessions_server_max": max(s[1] for s in sampler.sessions),
        "pg_sessions_idle": max(s[0] for s in idle.sessions),
        "connections_sensor_daemon_ticks_s": _spread(daemon_ticks),
    }


def backfill_one_connection(webserver: Webserver, daemon: subprocess.Popen, work: Path, instance: Any,
                            database_url: str, sandbox_pid: int | None) -> dict[str, Any]:  # fmt: skip
    """A backfill of the first Stripe connection x the last `BACKFILL_DAYS` days of `UI_ASSET`, launched
    through the webserver as the UI's dialog does: the mutation, the backfill daemon until its run(s) are
    submitted, and until the backfill is done; the run(s)' wall and CPU, Postgres CPU meanwhile."""
    import dagster as dg

    from benchmarks.cpu import CpuMeter, postmaster_pid
    from nextcrm_pipelines.partitions import connections_partitions_name, partition_key_of

    connection = instance.get_dynamic_partitions(connections_partitions_name("stripe"))[0]
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=back) for back in range(BACKFILL_DAYS - 1, -1, -1)]
    # The partitions holding those days (months: one or two keys), as the UI's dialog would list them.
    keys = list(dict.fromkeys(partition_key_of(True, connection, day) for day in days))
    sampler = Sampler(database_url, daemon.pid)
    sampler.start()
    meter = CpuMeter({"sandbox": sandbox_pid} if sandbox_pid else {}, postmaster_pid(database_url))
    before = _cpu_sample(meter)
    started = time.perf_counter()
    backfill_id, mutation_s = webserver.launch_backfill(UI_ASSET, keys)
    submitted_s = runs_done_s = None
    while True:
        backfill = instance.get_backfill(backfill_id)
        records = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        if records and submitted_s is None:
            submitted_s = time.perf_counter() - started
        runs_done = all(r.dagster_run.status.value in TERMINAL for r in records)
        if records and runs_done and runs_done_s is None:
            runs_done_s = time.perf_counter() - started
        if backfill is not None and backfill.status.value not in BACKFILL_IN_PROGRESS and runs_done:
            break
        _check_daemon(daemon, work)
        time.sleep(0.25)
    done_s = time.perf_counter() - started
    spent = meter.spent(before, _cpu_sample(meter))
    sampler.stop.set()
    sampler.join()
    # The backfill daemon's own lines about this backfill, with their times (how long it evaluated).
    log = re.sub(r"\x1b\[[0-9;]*m", "", (work / "daemon.log").read_text(errors="replace"))
    lines = [line[:160] for line in log.splitlines() if backfill_id in line]
    return {
        "asset": UI_ASSET,
        "partitions": len(keys),
        "first_key": keys[0],
        "last_key": keys[-1],
        "mutation_s": mutation_s,
        "to_runs_submitted_s": submitted_s,
        "to_runs_done_s": runs_done_s,
        "to_done_s": done_s,
        "status": backfill.status.value,
        "runs": len(records),
        "run_statuses": dict(Counter(r.dagster_run.status.value for r in records)),
        "run_ranges": [_run_partitions(r.dagster_run) for r in records[:5]],
        "run_wall_s": _spread([r.end_time - r.start_time for r in records if r.start_time and r.end_time]),
        "run_cpu_s": _spread(sampler.run_cpu()),
        "cpu_s_during_backfill": {k: None if v is None else round(v, 1) for k, v in spent.items()},
        "daemon": _daemon_log_times(lines),
        "daemon_log": lines[:12],
    }


def _run_partitions(run: Any) -> str | None:
    """A run's partition, or its range as `start..end`."""
    tags = run.tags
    if "dagster/asset_partition_range_start" in tags:
        return f"{tags['dagster/asset_partition_range_start']}..{tags.get('dagster/asset_partition_range_end')}"
    return tags.get("dagster/partition")


def _cpu_sample(meter: Any, tries: int = 5) -> dict[str, float | None]:
    """A CPU sample, taken again when Postgres could not be read (a backend ending while it was listed)."""
    for _ in range(tries - 1):
        sample = meter.sample()
        if sample.get("postgres") is not None or meter.postmaster is None:
            return sample
        time.sleep(0.1)
    return meter.sample()


def _daemon_log_times(lines: list[str]) -> dict[str, float | None]:
    """Seconds, from the daemon's log lines about one backfill, from its first evaluation to its first
    submitted run, and of its longest evaluation (whole seconds: the log's resolution)."""
    stamped = []
    for line in lines:
        with contextlib.suppress(ValueError):
            stamped.append((datetime.strptime(line[:25], "%Y-%m-%d %H:%M:%S %z").timestamp(), line))
    starts = [t for t, line in stamped if "Evaluating asset backfill" in line]
    ends = [t for t, line in stamped if "completed iteration" in line]
    submitted = [t for t, line in stamped if "Submitted run" in line]
    evaluations = [end - start for start, end in zip(starts, ends, strict=False)]
    return {
        "first_evaluation_to_submitted_s": submitted[0] - starts[0] if starts and submitted else None,
        "longest_evaluation_s": max(evaluations) if evaluations else None,
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(ordered), "min": round(ordered[0], 2), "median": round(statistics.median(ordered), 2),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2), "max": round(ordered[-1], 2),
            "sum": round(sum(ordered), 1)}  # fmt: skip


def ui_queries(webserver: Webserver, repeat: int = 3) -> dict[str, Any]:
    """The partitions page's queries for one asset: median seconds of `repeat` and the answer's size."""
    out: dict[str, Any] = {}
    variables = {"assetKey": {"path": [UI_ASSET]}}
    for label, query in (("partition_health", PARTITION_HEALTH_QUERY), ("partition_stats", PARTITION_STATS_QUERY)):
        timings, size, data = [], 0, None
        for _ in range(repeat):
            data, seconds, size = webserver.query(query, variables)
            timings.append(seconds)
        out[label] = {"median_s": statistics.median(timings), "first_s": timings[0], "bytes": size}
        if label == "partition_stats":
            out[label]["stats"] = data["assetNodeOrError"]["partitionStats"]
        else:
            dims = data["assetNodeOrError"]["partitionKeysByDimension"]
            out[label]["keys_by_dimension"] = {d["name"]: len(d["partitionKeys"]) for d in dims}
    return out


# --- partition shapes, in process -----------------------------------------------------------------------


def partition_shapes(sizes: tuple[int, ...] = SHAPE_SIZES) -> list[dict[str, Any]]:
    """For each shape and connection count: keys, listing them, validating one, one run request per connection."""
    import dagster as dg

    from nextcrm_pipelines.partitions import sync_start_date

    start = sync_start_date()
    now = datetime.now(UTC)
    today, month = now.date().isoformat(), now.date().replace(day=1).isoformat()

    def shapes(name: str) -> dict[str, dg.PartitionsDefinition]:
        connection = dg.DynamicPartitionsDefinition(name=name)
        daily = dg.DailyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")
        monthly = dg.MonthlyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")
        return {
            "connection x day": dg.MultiPartitionsDefinition({"connection": connection, "date": daily}),
            "connection x month": dg.MultiPartitionsDefinition({"connection": connection, "month": monthly}),
            "connection only": connection,
            "day only": daily,
        }

    def key_for(shape: str, connection: str) -> Any:
        return {
            "connection x day": dg.MultiPartitionKey({"connection": connection, "date": today}),
            "connection x month": dg.MultiPartitionKey({"connection": connection, "month": month}),
            "connection only": connection,
            "day only": today,
        }[shape]

    rows = []
    with dg.DagsterInstance.ephemeral() as instance:
        for size in sizes:
            name = f"shape_{size}_connections"
            connections = [f"stripe-{i:05d}" for i in range(size)]
            instance.add_dynamic_partitions(name, connections)
            for shape, partitions_def in shapes(name).items():
                with dg.partition_loading_context(effective_dt=now, dynamic_partitions_store=instance):
                    started = time.perf_counter()
                    count = partitions_def.get_num_partitions()
                    counted = time.perf_counter() - started
                    started = time.perf_counter()
                    keys = partitions_def.get_partition_keys()
                    listed = time.perf_counter() - started
                    probe = key_for(shape, connections[size // 2])
                    started = time.perf_counter()
                    valid = partitions_def.has_partition_key(probe)
                    validated = time.perf_counter() - started
                    # One run covers every connection when the shape has no connection dimension.
                    targets = [connections[0]] if shape == "day only" else connections
                    started = time.perf_counter()
                    requests = [dg.RunRequest(run_key=f"{c}|{now:%Y-%m-%dT%H}", partition_key=key_for(shape, c))
                                for c in targets]  # fmt: skip
                    built = time.perf_counter() - started
                    started = time.perf_counter()
                    ok = all(partitions_def.has_partition_key(r.partition_key) for r in requests)
                    checked = time.perf_counter() - started
                rows.append({
                    "connections": size, "shape": shape, "keys": count, "listed": len(keys), "count_s": counted,
                    "list_keys_s": listed, "validate_one_s": validated, "valid": valid and ok,
                    "run_requests": len(requests), "build_requests_s": built, "validate_requests_s": checked,
                })  # fmt: skip
                del keys
    return rows


# --- report ---------------------------------------------------------------------------------------------


def print_shapes(rows: list[dict[str, Any]]) -> None:
    print("\n== Partition shapes, in process (ephemeral instance; one asset's partitions definition) ==")
    print(f"{'connections':>11}  {'shape':<19} {'keys':>10} {'list keys':>10} {'check 1 key':>12} "
          f"{'requests':>8} {'build':>8} {'build+check':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['connections']:>11,}  {r['shape']:<19} {r['keys']:>10,} {r['list_keys_s']:>9.3f}s "
              f"{r['validate_one_s'] * 1000:>10.2f}ms {r['run_requests']:>8,} {r['build_requests_s']:>7.3f}s "
              f"{r['build_requests_s'] + r['validate_requests_s']:>11.3f}s")  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    n, mix = report["connections"], report["mix"]
    load, sensor, schedule = report["load"], report["sensor"], report["schedule"]
    print(f"\n== Many connections: {n:,} connections on {os.cpu_count()} CPUs ==")
    print("mix: " + ", ".join(f"{p} {c}" for p, c in mix.items() if c) +
          f"; created in {report['create_s']:.1f}s (" +
          ", ".join(f"{p} {s:.1f}s" for p, s in report["create_by_provider_s"].items() if mix[p]) + ")")  # fmt: skip
    print(
        f"keys per connection x day asset: {report['keys_per_daily_asset']:,} (Stripe's: "
        f"{report['keys_stripe_asset']:,})"
    )
    print(f"code location: import in a fresh interpreter {load['import_definitions_s']:.2f}s (bare interpreter "
          f"{load['bare_interpreter_s']:.2f}s); `dagster definitions validate` {load['definitions_validate_s']:.2f}s; "
          f"webserver start to workspace loaded {report['webserver_load_s']:.2f}s")  # fmt: skip
    adding, same = sensor["adding"], sensor["no_change"]
    print(f"connections_sensor: adding {adding['partitions_added']:,} partitions: evaluate {adding['evaluate_s']:.2f}s"
          f" + writes {adding['apply_s']:.2f}s; no-change tick {same['evaluate_s']:.2f}s")  # fmt: skip
    print(f"hourly schedules: one tick each, {schedule['run_requests']:,} run requests in {schedule['seconds']:.2f}s ("
          + ", ".join(f"{p} {v['run_requests']} in {v['seconds']:.2f}s" for p, v in schedule["providers"].items()
                      if v["run_requests"]) + ")")  # fmt: skip
    for key, when in (("ui_before_runs", "before the runs"), ("ui", "after the runs and the backfill")):
        if key not in report:
            continue
        health, stats = report[key]["partition_health"], report[key]["partition_stats"]
        print(
            f"UI partitions page of {UI_ASSET}, {when}: PartitionHealthQuery {health['median_s']:.2f}s median "
            f"(first {health['first_s']:.2f}s, {health['bytes']:,} bytes, keys {health['keys_by_dimension']}); "
            f"partitionStats {stats['median_s']:.2f}s median (first {stats['first_s']:.2f}s) {stats['stats']}"
        )
    if "runs" in report:
        runs = report["runs"]
        print(f"daemon: {runs['runs']} runs {runs['statuses']}, submitted in {runs['submit_s']:.1f}s, submit to all "
              f"done {runs['submit_to_all_done_s']:.1f}s ({runs['runs'] / runs['submit_to_all_done_s'] * 3600:,.0f} "
              f"runs/hour at max_concurrent_runs={report['max_concurrent_runs']})")  # fmt: skip
        print(f"  per run wall {runs['run_wall_s']}; queued {runs['queued_s']}")
        print(f"  per run CPU (the run worker and any step processes) {runs['run_cpu_s']}; "
              f"launchRun per request {runs['launch_run_s']}")  # fmt: skip
        print(f"  mean wall by provider {runs['run_wall_by_provider_s']}")
        print(f"  CPU seconds while the runs went: {runs['cpu_s_during_runs']}")
        print(f"  Postgres sessions on this database: max {runs['pg_sessions_max']} while runs execute "
              f"({runs['pg_sessions_idle']} idle with webserver + daemon); whole server max "
              f"{runs['pg_sessions_server_max']}")  # fmt: skip
        print(f"  connections_sensor ticks in the daemon (no change): {runs['connections_sensor_daemon_ticks_s']}")
        extra = report["extrapolated"]
        whole = "measured: all of" if runs["runs"] == extra["run_requests"] else (
            f"extrapolated from the {runs['runs']}-run sample (same mix) to")  # fmt: skip
        print(f"one hour's syncs, {whole} the hour's {extra['run_requests']:,} runs for {n:,} connections: "
              f"{extra['hours_at_measured_rate'] * 60:.1f} min at the measured rate; "
              f"{extra['cpu_per_run_s']:.1f} CPU-s per run, {extra['cpu_hours']:.2f} CPU-hours of run processes "
              f"({extra['cores_to_finish_in_an_hour']:.2f} cores busy for the hour)")  # fmt: skip
    if "backfill" in report:
        b = report["backfill"]
        print(f"backfill of {b['partitions']} partitions of {b['asset']} ({b['first_key']} .. {b['last_key']}) "
              f"through launchPartitionBackfill: mutation {b['mutation_s']:.2f}s, to run(s) submitted "
              f"{b['to_runs_submitted_s'] or float('nan'):.1f}s, run(s) done "
              f"{b['to_runs_done_s'] or float('nan'):.1f}s, "
              f"backfill done {b['to_done_s']:.1f}s; {b['status']}, "
              f"{b['runs']} run(s) {b['run_statuses']}, run wall {b['run_wall_s']}, run CPU {b['run_cpu_s']}, "
              f"CPU seconds meanwhile {b['cpu_s_during_backfill']}; daemon (from its log) {b['daemon']}")  # fmt: skip
    if report.get("shapes"):
        print_shapes(report["shapes"])
    print(json.dumps(report, default=str))


def extrapolate(runs: dict[str, Any], run_requests: int) -> dict[str, Any]:
    """One hour's runs at N from the sample: time at the measured rate and CPU per run."""
    rate = runs["runs"] / runs["submit_to_all_done_s"]
    # Every run's processes are in the sum (with a few short-lived helpers of the code server, near zero).
    cpu_per_run = runs["run_cpu_s"]["sum"] / runs["runs"] if runs["run_cpu_s"] else 0.0
    cpu_hours = cpu_per_run * run_requests / 3600
    return {"run_requests": run_requests, "hours_at_measured_rate": run_requests / rate / 3600,
            "cpu_per_run_s": cpu_per_run, "cpu_hours": cpu_hours, "cores_to_finish_in_an_hour": cpu_hours}  # fmt: skip


# --- main -----------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, database_url: str, work: Path) -> dict[str, Any]:
    import dagster as dg
    import yaml

    from nextcrm_sandbox.server import SandboxServer

    env = prepare_environment(database_url, work)
    warnings.filterwarnings("ignore")
    from nextcrm_pipelines.definitions import defs
    from nextcrm_pipelines.partitions import connections_partitions_name

    mix = connection_mix(args.connections, args.stripe_share)
    sample_runs = "all" if args.sample_runs is None else args.sample_runs
    report: dict[str, Any] = {"connections": args.connections, "mix": mix, "sample_runs": sample_runs}
    report["max_concurrent_runs"] = yaml.safe_load((ROOT / "dagster.yaml").read_text())["concurrency"]["runs"][
        "max_concurrent_runs"
    ]
    with SandboxServer(subprocess=True) as sandbox:
        started = time.perf_counter()
        report["create_by_provider_s"] = create_connections(sandbox, database_url, mix)
        report["create_s"] = time.perf_counter() - started
        print(f"{args.connections:,} connections created in {report['create_s']:.1f}s: {mix}", flush=True)
        report["load"] = code_location_load(env)
        print(f"code location load {report['load']}", flush=True)
        with dg.DagsterInstance.get() as instance:
            report["run_coordinator"] = type(instance.run_coordinator).__name__
            report["sensor"] = connections_sensor_ticks(instance, defs)
            print(f"connections sensor {report['sensor']}", flush=True)
            with dg.partition_loading_context(dynamic_partitions_store=instance):
                stripe_asset = defs.resolve_assets_def("stripe_payments")
                report["keys_stripe_asset"] = stripe_asset.partitions_def.get_num_partitions()
                days = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_offset=1).get_num_partitions()
            report["keys_per_daily_asset"] = days * sum(c for p, c in mix.items() if p != "billionmail")
            report["dynamic_partitions"] = {p: len(instance.get_dynamic_partitions(connections_partitions_name(p)))
                                            for p in mix}  # fmt: skip
            schedule = schedule_ticks(instance, defs)
            report["schedule"] = {k: v for k, v in schedule.items() if k != "requests"}
            print(f"hourly schedules {report['schedule']}", flush=True)
            webserver = Webserver(env, work)
            try:
                report["webserver_load_s"] = webserver.wait_loaded()
                print(f"webserver workspace loaded in {report['webserver_load_s']:.1f}s", flush=True)
                report["schedules_stopped"] = webserver.stop_schedules()
                report["ui_before_runs"] = ui_queries(webserver)
                print(f"UI queries before runs {report['ui_before_runs']}", flush=True)
                if args.sample_runs != 0 or args.backfill:
                    with running_daemon(webserver, env, work) as (daemon, ready_s):
                        report["daemon_ready_s"] = ready_s
                        if args.sample_runs != 0:
                            sample = sample_requests(schedule["requests"], args.sample_runs)
                            report["sample_mix"] = dict(Counter(r[0] for r in sample))
                            print(f"submitting {len(sample)} of {schedule['run_requests']} run requests "
                                  f"{report['sample_mix']} to dagster-daemon", flush=True)  # fmt: skip
                            report["runs"] = run_sample(webserver, daemon, work, sample, database_url, instance,
                                                        sandbox.pid)  # fmt: skip
                            report["extrapolated"] = extrapolate(report["runs"], schedule["run_requests"])
                            print(f"runs {report['runs']}", flush=True)
                        if args.backfill:
                            report["backfill"] = backfill_one_connection(webserver, daemon, work, instance,
                                                                         database_url, sandbox.pid)  # fmt: skip
                            print(f"backfill {report['backfill']}", flush=True)
                report["ui"] = ui_queries(webserver)
            finally:
                webserver.close()
    return report


def _sample_size(value: str) -> int | None:
    """`all` (None: every run request of the hour) or a whole number of run requests."""
    if value == "all":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'all' or a whole number, got {value!r}")
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--sample-runs", type=_sample_size, default=None, metavar="all|K",
                        help="run requests of one hour launched through the daemon: all (default), a sample of K"
                             " in the providers' proportions, or 0 for none")  # fmt: skip
    parser.add_argument("--no-backfill", dest="backfill", action="store_false",
                        help=f"skip the backfill of one connection x {BACKFILL_DAYS} days")  # fmt: skip
    parser.add_argument("--stripe-share", type=float, default=0.9, help="share of Stripe connections")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"),
                        help="a Postgres server to use (fresh schemas) instead of the embedded one")  # fmt: skip
    parser.add_argument("--shapes-only", action="store_true", help="only the in-process partition shapes")
    parser.add_argument("--skip-shapes", action="store_true")
    args = parser.parse_args()
    _terminate_on_sigterm()
    warnings.filterwarnings("ignore")
    if args.shapes_only:
        rows = partition_shapes()
        print_shapes(rows)
        print(json.dumps(rows))
        return

    from nextcrm_pipelines.core.embedded_pg import ensure_embedded_postgres, stop_embedded_postgres

    work = Path(tempfile.mkdtemp(prefix="nextcrm-many-"))
    folder = None
    database_url = args.database_url
    try:
        if not database_url:
            folder = work / "pg"
            database_url = ensure_embedded_postgres(folder).url
        report = measure(args, database_url, work)
    finally:
        if folder:
            stop_embedded_postgres(folder)
        shutil.rmtree(work, ignore_errors=True)
    if not args.skip_shapes:
        report["shapes"] = partition_shapes()
    print_report(report)


if __name__ == "__main__":
    main()
