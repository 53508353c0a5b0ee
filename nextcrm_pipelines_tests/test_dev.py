"""`nextcrm-sandbox dev` run for real, as `make dev` runs it: the ports it is given, one clear line for a
taken port, a killed child restarted, every process gone after SIGTERM, and the sandbox's accounts (a
refund made in it) kept across a restart on other ports, with the demo connection and its webhooks
following the new ports.

One dev instance (sandbox, receiver, Dagster code server, webserver and daemon) serves the module's tests
in order; the last one stops it and starts a second one on the same data folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import stripe
from cryptography.fernet import Fernet
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db, settings
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_pipelines_tests.accounting import free_port
from nextcrm_sandbox.cli import DEMO_API_KEY

pytestmark = pytest.mark.timeout(240)

STARTUP_SECONDS = 120


def _tree(pid: int) -> set[int]:
    """`pid` and every process below it (by parent id), with every member of their process groups."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parents[int(entry.name)], groups[int(entry.name)] = int(fields[1]), int(fields[2])
    tree = {pid}
    while True:
        more = {p for p, parent in parents.items() if parent in tree} | {
            p for p, group in groups.items() if group in tree
        }
        if more <= tree:
            return tree
        tree |= more


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended: it only waits to be reaped)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Dev:
    """A running `nextcrm-sandbox dev`: its process, its ports, and the lines it printed so far."""

    def __init__(self, env: dict[str, str], ports: dict[str, int]) -> None:
        self.ports = ports
        self.lines: list[str] = []
        args = ["--ui-port", str(ports["ui"]), "--sandbox-port", str(ports["sandbox"]),
                "--webhook-port", str(ports["webhook"])]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nextcrm_sandbox.cli", "dev", *args], env=env, cwd=settings.PROJECT_ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first printed line matching `pattern`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the reader's last lines
                break
            time.sleep(0.2)
        for line in list(self.lines):
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; dev printed:\n{self.output}")

    def child(self, marker: str) -> int:
        """The pid of the child whose command line contains `marker`."""
        for pid in _tree(self.proc.pid) - {self.proc.pid}:
            if marker in _cmdline(pid) and _parent(pid) == self.proc.pid:
                return pid
        raise AssertionError(f"no child of dev runs {marker!r}")

    def stop(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM, then wait; returns (exit code, seconds taken)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill_tree(self) -> None:
        """Cleanup after a failed test: nothing of this instance may outlive the module."""
        for pid in _alive(_tree(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@pytest.fixture(scope="module")
def dev_env(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment `make dev` would have, pointed at a schema, a Dagster storage schema and a data folder
    of this module's own, with a "Demo Stripe" connection stored as `make demo` leaves it (port 12111)."""
    schema = f"t_dev_{uuid.uuid4().hex[:8]}"
    storage = f"dagster_dev_{uuid.uuid4().hex[:8]}"
    data = tmp_path_factory.mktemp("dev-data")
    key = Fernet.generate_key().decode()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(storage)))
    db.upgrade(database_url, schema)
    os.environ["NEXTCRM_DB_SCHEMA"] = schema  # `vault` resolves its tables through the schema setting
    try:
        with psycopg.connect(database_url) as conn:
            vault.add_connection(conn, provider="stripe", display_name="Demo Stripe", secrets={"api_key": DEMO_API_KEY},
                                 box=SecretBox([key]), base_url="http://127.0.0.1:12111")  # fmt: skip
    finally:
        os.environ.pop("NEXTCRM_DB_SCHEMA")
    ports = ("UI_PORT", "SANDBOX_PORT", "WEBHOOK_PORT")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("NEXTCRM_", "DAGSTER_")) and name not in ports}  # fmt: skip
    env.update(
        DATABASE_URL=database_url, NEXTCRM_DB_SCHEMA=schema, NEXTCRM_DATA_DIR=str(data), NEXTCRM_SECRET_KEY=key,
        NEXTCRM_DAGSTER_STORAGE_URL=settings.dagster_storage_url(database_url).replace(
            "search_path%3Ddagster", f"search_path%3D{storage}"),
    )  # fmt: skip
    try:
        yield env
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            for name in (schema, storage):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def dev(dev_env: dict[str, str]) -> Iterator[Dev]:
    ui, sandbox, webhook = _free_ports(3)
    instance = Dev(dev_env, {"ui": ui, "sandbox": sandbox, "webhook": webhook})
    try:
        instance.wait_for(r"^dev: logs ", STARTUP_SECONDS)
        yield instance
    finally:
        if instance.proc.poll() is None:
            instance.kill_tree()


def _demo_stripe(env: dict[str, str]) -> vault.Connection:
    os.environ["NEXTCRM_DB_SCHEMA"] = env["NEXTCRM_DB_SCHEMA"]
    try:
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            return vault.get_connection(conn, "stripe-demo-stripe")
    finally:
        os.environ.pop("NEXTCRM_DB_SCHEMA")


def _stripe_hooks(sandbox_port: int) -> list[str]:
    listing = httpx.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/accounts", timeout=10).json()
    return [hook["url"] for hook in listing["stripe"]["webhooks"]]


def test_dev_serves_on_the_ports_it_is_given_and_points_the_demo_connection_there(dev: Dev, dev_env) -> None:
    ui, sandbox, webhook = dev.ports["ui"], dev.ports["sandbox"], dev.ports["webhook"]
    assert _answers(f"http://127.0.0.1:{ui}/server_info")
    assert _answers(f"http://127.0.0.1:{webhook}/healthz")
    assert _answers(f"http://127.0.0.1:{sandbox}/_sandbox/clock")
    dev.wait_for(rf"^dev: Dagster UI +http://127\.0\.0\.1:{ui}$", 1)
    dev.wait_for(rf"^dev: sandbox +http://127\.0\.0\.1:{sandbox} ", 1)
    dev.wait_for(rf"^dev: webhooks +http://127\.0\.0\.1:{webhook}/webhooks/", 1)
    # The connection `make demo` stored for port 12111 now reaches this sandbox, and its webhooks this receiver.
    assert _demo_stripe(dev_env).base_url == f"http://127.0.0.1:{sandbox}"
    assert _stripe_hooks(sandbox) == [f"http://127.0.0.1:{webhook}/webhooks/stripe/stripe-demo-stripe"]
    # Quiet: no routine INFO lines and no warnings from Dagster (`dagster dev`'s SupersessionWarning among them).
    assert not [line for line in dev.lines if re.search(r"INFO|Warning", line)], dev.output


def test_a_taken_port_gives_one_line_naming_the_variable_and_no_traceback(dev: Dev, dev_env) -> None:
    ui, webhook = _free_ports(2)
    env = {**dev_env, "UI_PORT": str(ui), "SANDBOX_PORT": str(dev.ports["sandbox"]), "WEBHOOK_PORT": str(webhook)}
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "nextcrm_sandbox.cli", "dev"], env=env, capture_output=True,
                            text=True, timeout=60, cwd=settings.PROJECT_ROOT)  # fmt: skip
    printed = second.stdout + second.stderr
    assert second.returncode != 0
    suggested = re.search(r"e\.g\. `make dev SANDBOX_PORT=(\d+)`", printed)
    assert suggested and int(suggested[1]) != dev.ports["sandbox"], printed
    assert printed.strip().splitlines() == [
        f"Error: port {dev.ports['sandbox']} is in use (another `make dev`?): set SANDBOX_PORT=<a free port>, "
        f"e.g. `make dev SANDBOX_PORT={suggested[1]}`"
    ], printed
    assert time.monotonic() - started < 20  # checked before anything starts
    assert dev.proc.poll() is None and _answers(f"http://127.0.0.1:{dev.ports['sandbox']}/_sandbox/clock")


def test_a_killed_receiver_is_reported_and_restarted(dev: Dev) -> None:
    receiver = dev.child("webhooks serve")
    os.kill(receiver, signal.SIGKILL)
    dev.wait_for(r"^dev: the webhook receiver exited unexpectedly with exit code -9 \(SIGKILL\); restarting it", 10)
    _wait_until(lambda: _answers(f"http://127.0.0.1:{dev.ports['webhook']}/healthz"), 15, "the receiver answered")
    assert dev.child("webhooks serve") != receiver
    dev.wait_for(r"^dev: restarted the webhook receiver \(pid \d+\)$", 5)


def test_sigterm_stops_every_process_and_a_refund_survives_a_restart_on_other_ports(dev: Dev, dev_env) -> None:
    sandbox_url = f"http://127.0.0.1:{dev.ports['sandbox']}"
    client = stripe.StripeClient(DEMO_API_KEY, base_addresses={"api": sandbox_url}, max_network_retries=0)
    charge = next(c for c in client.v1.charges.list({"limit": 100}) if c.paid and not c.refunded)
    refund = client.v1.refunds.create({"charge": charge.id, "amount": 120})

    tree = _tree(dev.proc.pid)
    assert len(tree) >= 7  # dev, its five children, the code server's own server
    code, seconds = dev.stop()
    assert code == 0 and seconds < 15, dev.output
    _wait_until(lambda: not _alive(tree), 2, "every process of dev's tree was gone")
    stopped = [line for line in dev.lines if line.startswith("dev: stopped ")]
    assert sorted(re.match(r"dev: stopped (the [\w ]+?) \(", line)[1] for line in stopped) == [
        "the Dagster code server", "the Dagster daemon", "the Dagster webserver", "the sandbox",
        "the webhook receiver",
    ], dev.output  # fmt: skip
    assert "Traceback" not in dev.output

    ui, sandbox, webhook = _free_ports(3)
    again = Dev(dev_env, {"ui": ui, "sandbox": sandbox, "webhook": webhook})
    try:
        again.wait_for(r"^dev: logs ", STARTUP_SECONDS)
        again.wait_for(r"^dev: kept the restored stripe account", 1)
        client = stripe.StripeClient(DEMO_API_KEY, base_addresses={"api": f"http://127.0.0.1:{sandbox}"},
                                     max_network_retries=0)  # fmt: skip
        assert client.v1.charges.retrieve(charge.id).amount_refunded == 120
        assert [r.id for r in client.v1.refunds.list({"charge": charge.id})] == [refund.id]
        assert _demo_stripe(dev_env).base_url == f"http://127.0.0.1:{sandbox}"
        # One subscription, to this receiver: the one to the first instance's port is gone.
        assert _stripe_hooks(sandbox) == [f"http://127.0.0.1:{webhook}/webhooks/stripe/stripe-demo-stripe"]
        code, seconds = again.stop()
        assert code == 0 and seconds < 15, again.output
    finally:
        if again.proc.poll() is None:
            again.kill_tree()


def test_a_childs_dagster_errors_reach_the_terminal_as_one_line_each_and_their_traces_the_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nextcrm_sandbox.cli import _ChildSpec, _Supervisor

    said = [
        "2026-12-07 03:07:05 +0000 - dagster - INFO - stripe_sync - run - routine progress",
        "2026-12-07 03:07:05 +0000 - dagster - ERROR - stripe_sync - run - STEP_FAILURE - step failed.",
        "Traceback (most recent call last):",
        '  File "assets.py", line 280, in _sync',
        "dagster._core.definitions.events.Failure: the cause",
        "2026-12-07 03:07:06 +0000 - dagster - WARNING - stripe_sync - run - attempt 1 of 4 failed; next in ~30 s",
    ]
    script = "import sys; sys.stdout.write(sys.argv[1])"
    supervisor = _Supervisor(tmp_path / "logs", tmp_path)
    child = supervisor.start(
        _ChildSpec(
            "code-server", "the code server", [sys.executable, "-c", script, "\n".join(said) + "\n"], dict(os.environ)
        )
    )
    assert child.proc is not None and child.proc.wait(timeout=30) == 0
    _wait_until(lambda: child.log_path.read_text().count("\n") == len(said), 10, "the whole output in the log file")
    time.sleep(0.3)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[code-server]")]
    assert printed == [f"[code-server] {said[1]}", f"[code-server] {said[5]}"]
    assert child.log_path.read_text().splitlines() == said


def test_children_do_not_outlive_a_supervisor_that_is_killed(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from nextcrm_sandbox.cli import _ChildSpec, _Supervisor\n"
        "supervisor = _Supervisor(Path(sys.argv[1]), Path(sys.argv[1]))\n"
        "child = supervisor.start(_ChildSpec('sleeper', 'a sleeper', ['sleep', '120'], dict(os.environ)))\n"
        "print(child.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert supervisor.stdout is not None
        child = int(supervisor.stdout.readline())
        assert _alive({child}) == {child}
        supervisor.kill()
        supervisor.wait(timeout=10)
        _wait_until(lambda: not _alive({child}), 10, "the child stopped with its supervisor")
    finally:
        supervisor.kill()


def test_make_dev_passes_its_port_variables_to_the_dev_server() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    planned = subprocess.run(["make", "-n", "-o", "install", "dev", "UI_PORT=3101", "SANDBOX_PORT=12191",
                              "WEBHOOK_PORT=8791"], cwd=settings.PROJECT_ROOT, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert re.search(r"nextcrm-sandbox dev\s+(\\\s+)?--ui-port 3101 --sandbox-port 12191 --webhook-port 8791", planned)
    defaults = subprocess.run(["make", "-n", "-o", "install", "dev"], cwd=settings.PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    assert re.search(r"--ui-port 3000 --sandbox-port 12111 --webhook-port 8787", defaults), defaults
