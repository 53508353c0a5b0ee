"""The provider sandbox server: the seven emulated provider APIs and a shared clock on one loopback HTTP server.

Demo runs, tests and benchmarks point real provider clients (stripe-python, httpx) at this server instead of
the internet. ``build_app`` composes the emulators, each under its own path prefix: Stripe (``/v1``), Xero
(``/xero``), QuickBooks Online (``/quickbooks``), MYOB Business (``/myob``), PayPal (``/paypal``), BillionMail
(``/billionmail/<account>``) and Mautic (``/mautic/<account>``), with their control APIs under
``/_sandbox/<provider>``, the clock under ``/_sandbox/clock``, every provider's accounts at
``GET /_sandbox/accounts`` and the saved state at ``/_sandbox/state``. ``SandboxServer`` runs the app with
uvicorn in a background thread, or in a child process when the server's CPU must not share the client's GIL
(benchmarks); ``serve_command`` (``nextcrm-sandbox serve``, ``python -m nextcrm_sandbox.server``) serves it
until interrupted.

With a state directory (``state_dir``, ``--state-dir``) the sandbox outlives its process: it starts from the
state saved there and saves every change (``nextcrm_sandbox.state``), so a restart keeps a refund made in the
demo. Without one everything lives in memory, as tests and benchmarks want.

The control API under ``/_sandbox`` has no authentication: it is test tooling and the server refuses
to bind to anything but a loopback address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import socket
import subprocess as sp
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.billionmail import BillionMailSandbox
from nextcrm_sandbox.mautic import MauticSandbox
from nextcrm_sandbox.myob import MyobSandbox
from nextcrm_sandbox.paypal import PayPalSandbox
from nextcrm_sandbox.quickbooks import QuickBooksSandbox
from nextcrm_sandbox.state import CLOCK, SandboxStore, SaveAfterRequests, SaveScheduler
from nextcrm_sandbox.stripe import StripeSandbox
from nextcrm_sandbox.webhooks import WebhookOutbox
from nextcrm_sandbox.xero import XeroSandbox

__all__ = ["DEFAULT_PORT", "PROVIDERS", "SandboxClock", "SandboxServer", "build_app", "main", "serve_command"]

DEFAULT_PORT = 12111
READY_PREFIX = "NEXTCRM_SANDBOX_READY "
# The emulators, by their ``app.state`` name and control path (``/_sandbox/<name>``).
PROVIDERS = ("stripe", "xero", "quickbooks", "myob", "paypal", "billionmail", "mautic")


class SandboxClock:
    """One clock for the whole sandbox: real time plus an offset that only ever grows.

    Built with an explicit ``now`` it starts there and then ticks with real time; ``advance`` jumps it
    forward (e.g. 31 days to expire events).
    """

    def __init__(self, now: int | None = None) -> None:
        self._offset = 0.0 if now is None else float(now) - time.time()
        self._lock = threading.Lock()

    def now(self) -> int:
        """Current sandbox unix time (seconds)."""
        return int(time.time() + self._offset)

    def advance(self, seconds: float) -> int:
        """Move the clock forward by ``seconds`` (>= 0) and return the new time."""
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        with self._lock:
            self._offset += seconds
        return self.now()


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers={"content-type": "application/json"})


def _clock_routes(clock: SandboxClock) -> list[BaseRoute]:
    async def get_clock(request: Request) -> Response:
        return _json(200, {"now": clock.now()})

    async def advance(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            return _json(400, {"error": "body must be JSON"})
        seconds = body.get("seconds") if isinstance(body, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            return _json(400, {"error": "seconds must be a number >= 0"})
        return _json(200, {"now": clock.advance(seconds)})

    return [
        Route("/_sandbox/clock", get_clock, methods=["GET"]),
        Route("/_sandbox/clock/advance", advance, methods=["POST"]),
    ]


def _outboxes(app: Starlette) -> dict[str, WebhookOutbox]:
    """The webhook outbox of every emulator that sends webhooks."""
    st = app.state
    return {"stripe": st.stripe.webhooks, "xero": st.xero.webhooks.outbox, "quickbooks": st.quickbooks.webhooks,
            "paypal": st.paypal.webhooks, "mautic": st.mautic.webhooks.outbox}  # fmt: skip


def accounts_listing(app: Starlette) -> dict[str, Any]:
    """What ``GET /_sandbox/accounts`` answers: per provider its accounts (tenants, installations), OAuth apps and
    grants, and webhook subscriptions, so a caller can skip creating what a restored sandbox already has."""
    st = app.state

    def oauth(server: Any) -> dict[str, Any]:
        grants = [{"id": g.id, "client_id": g.client_id, "revoked": g.revoked} for g in server.grants.values()]
        return {"clients": sorted(server.clients), "grants": grants}

    hooks = {
        name: [
            {"id": sub.id, "account": sub.key, "url": sub.url, "enabled": sub.enabled} for sub in box.subscriptions()
        ]
        for name, box in _outboxes(app).items()
    }
    return {
        "restored": bool(st.store is not None and st.store.restored),
        "stripe": {"accounts": [{"id": a.api_key} for a in st.stripe.accounts()], "webhooks": hooks["stripe"]},
        "xero": {
            "tenants": [{"id": rt.tenant.id, "name": rt.tenant.name, "client_id": rt.tenant.client_id}
                        for rt in st.xero.tenants.values()],
            **oauth(st.xero.oauth),
            "webhooks": hooks["xero"],
        },
        "quickbooks": {
            "tenants": [{"id": c.realm_id, "name": c.name, "client_id": c.client_id}
                        for c in (rt.company for rt in st.quickbooks._runtime.values())],
            **oauth(st.quickbooks.oauth),
            "webhooks": hooks["quickbooks"],
        },
        "myob": {
            "tenants": [{"id": t.id, "name": t.name, "client_id": t.client_id} for t in st.myob.tenants.values()],
            **oauth(st.myob.oauth),
        },
        "paypal": {
            "accounts": [{"id": rt.account.id, "client_id": rt.account.client_id}
                         for rt in st.paypal._runtime.values()],
            "webhooks": hooks["paypal"],
        },
        "billionmail": {
            "accounts": [{"id": inst.id, "username": inst.username} for inst in st.billionmail.installs.values()],
        },
        "mautic": {
            "accounts": [{"id": inst.id, **oauth(inst.oauth)} for inst in st.mautic.installations.values()],
            "webhooks": hooks["mautic"],
        },
    }  # fmt: skip


def _state_routes() -> list[BaseRoute]:
    async def accounts(request: Request) -> Response:
        return _json(200, accounts_listing(request.app))

    async def state(request: Request) -> Response:
        return _json(200, _state_summary(request.app))

    async def save(request: Request) -> Response:
        scheduler: SaveScheduler | None = request.app.state.saver
        if scheduler is None:
            return _json(409, {"error": "this sandbox was started without a state directory"})
        figures = scheduler.save_now("request")
        if figures is None:
            return _json(500, {"error": "the save failed; the server's log says why"})
        return _json(200, _state_summary(request.app))

    return [
        Route("/_sandbox/accounts", accounts, methods=["GET"]),
        Route("/_sandbox/state", state, methods=["GET"]),
        Route("/_sandbox/state/save", save, methods=["POST"]),
    ]


def _state_summary(app: Starlette) -> dict[str, Any]:
    """``GET /_sandbox/state``: where the state is saved, whether it was restored, how many saves this process made
    (and which one last wrote each part), and the last save's figures."""
    store: SandboxStore | None = app.state.store
    if store is None:
        return {"state_dir": None}
    saver: SaveScheduler = app.state.saver
    aside = app.state.set_aside
    return {
        "state_dir": str(store.directory),
        "restored": store.restored,
        "set_aside": None if aside is None else {"problem": aside.problem, "moved_to": str(aside.moved_to)},
        "saves": store.saves,
        "part_saves": store.part_saves,
        "last_save": store.last or None,
        "pending": saver.pending,
    }


def _part_of(path: str) -> str | None:
    """The part of a persistent sandbox a request to ``path`` may touch: an emulator, the clock, or none."""
    head, _, rest = path.lstrip("/").partition("/")
    if head == "_sandbox":
        head = rest.partition("/")[0]
        return head if head in PROVIDERS or head == CLOCK else None
    if head == "v1":
        return "stripe"
    return head if head in PROVIDERS else None


@contextlib.asynccontextmanager
async def _save_at_shutdown(app: Starlette) -> AsyncIterator[None]:
    yield
    # Connections are closed by now: the last changes are saved before the process exits.
    app.state.saver.save_now("shutdown")


def build_app(
    accounts: list[dict[str, Any]] | None = None, now: int | None = None, *, state_dir: Path | str | None = None
) -> Starlette:
    """The sandbox ASGI app.

    ``accounts`` are Stripe account specs as accepted by ``POST /_sandbox/stripe/accounts``
    (``api_key``, ``seed``, ``charges``, ``subscriptions``, optional ``customers``, ``days``,
    ``requests_per_second``, ``now``). ``now`` sets the sandbox clock's start (default: real time).
    With ``state_dir`` the emulators and the clock are restored from the state saved there, if any (``now``
    then applies only to a fresh sandbox; an account of ``accounts`` identical to a restored one is kept as
    it is), and every change is saved there; served by uvicorn, the app also saves at shutdown.
    ``app.state.clock``, ``app.state.stripe``, ``app.state.xero``... expose the clock and the emulators in-process.
    """
    store = SandboxStore(Path(state_dir)) if state_dir is not None else None
    loaded = store.load() if store is not None else None
    restored = loaded.parts if loaded is not None else {}
    clock: SandboxClock = restored.get(CLOCK) or SandboxClock(now)
    fresh = {"stripe": StripeSandbox, "xero": XeroSandbox, "quickbooks": QuickBooksSandbox, "myob": MyobSandbox,
             "paypal": PayPalSandbox, "billionmail": BillionMailSandbox, "mautic": MauticSandbox}  # fmt: skip
    # An emulator never saved (nothing touched it before the last stop) starts empty beside the restored ones.
    sandboxes: dict[str, Any] = {name: restored.get(name) or fresh[name](clock.now) for name in PROVIDERS}
    stripe: StripeSandbox = sandboxes["stripe"]
    for spec in accounts or []:
        stripe.add_account(spec)
    routes: list[BaseRoute] = [
        *_clock_routes(clock),
        *stripe.routes(),  # first: the benchmarks' hot path is matched before the other emulators' routes
        *sandboxes["xero"].routes(),
        *sandboxes["quickbooks"].routes(),
        *sandboxes["myob"].routes(),
        *sandboxes["paypal"].routes(),
        *sandboxes["billionmail"].routes(),
        *sandboxes["mautic"].routes(),
        *_state_routes(),
        *stripe.fallback_routes(),
    ]
    saver: SaveScheduler | None = None
    if store is None:
        app = Starlette(routes=routes)
    else:
        store.snapshot = lambda: {CLOCK: clock, **sandboxes}
        saver = SaveScheduler(store)
        app = Starlette(routes=routes, middleware=[Middleware(SaveAfterRequests, scheduler=saver, part_of=_part_of)],
                        lifespan=_save_at_shutdown)  # fmt: skip
    app.state.clock = clock
    for name, sandbox in sandboxes.items():
        setattr(app.state, name, sandbox)
    app.state.store = store
    app.state.saver = saver
    app.state.set_aside = loaded if loaded is not None and loaded.moved_to is not None else None
    if restored:
        for outbox in _outboxes(app).values():
            outbox.resume()  # deliveries queued before the restart go out now that every emulator is back
    return app


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the sandbox only binds to loopback addresses, not {host!r}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Starlette) -> uvicorn.Config:
    # The lifespan runs only to save a persistent sandbox at shutdown.
    lifespan = "on" if getattr(app.state, "store", None) is not None else "off"
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan)


class SandboxServer:
    """Run the sandbox on ``127.0.0.1`` (free port by default) for the duration of a ``with`` block.

    ``subprocess=False`` serves from a daemon thread of this process; ``subprocess=True`` starts
    ``python -m nextcrm_sandbox.server`` so the server has its own interpreter and GIL.
    Accounts passed here are created before ``start()`` returns. With ``state_dir`` the sandbox starts from
    the state saved there and saves its changes there (see ``build_app``).
    """

    def __init__(
        self,
        accounts: list[dict[str, Any]] | None = None,
        *,
        now: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        subprocess: bool = False,
        startup_timeout: float = 120.0,
        state_dir: Path | None = None,
    ) -> None:
        _check_loopback(host)
        self.host = host
        self.port = port
        self.subprocess = subprocess
        self.startup_timeout = startup_timeout
        self._accounts = list(accounts or [])
        self._now = now
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._proc: sp.Popen[str] | None = None
        self._client: httpx.Client | None = None
        self.app: Starlette | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (valid once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> SandboxServer:
        """Start serving and wait until the server answers."""
        if self._thread is not None or self._proc is not None:
            return self
        try:
            if self.subprocess:
                self._start_process()
            else:
                self._start_thread()
            self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(30.0, read=None))
            self._wait_ready()
            if self.subprocess:
                for spec in self._accounts:
                    self.control("POST", "/_sandbox/stripe/accounts", json=spec)
        except BaseException:
            self.stop()  # a server that started must not outlive a start that failed
            raise
        return self

    def _start_thread(self) -> None:
        self.app = build_app(self._accounts, now=self._now, state_dir=self.state_dir)
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self.app))
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("sandbox server thread exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("sandbox server did not start")
            time.sleep(0.005)

    def _start_process(self) -> None:
        cmd = [sys.executable, "-m", "nextcrm_sandbox.server", "--host", self.host]
        cmd += ["--port", str(self.port), "--announce"]
        if self._now is not None:
            cmd += ["--now", str(self._now)]
        if self.state_dir is not None:
            cmd += ["--state-dir", str(self.state_dir)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = sp.Popen(cmd, stdout=sp.PIPE, text=True, env=env)
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self._proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name="sandbox-stdout", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError("sandbox subprocess did not announce its port") from None
            if line is None:
                code = self._proc.wait()
                self._proc = None
                raise RuntimeError(f"sandbox subprocess exited with code {code} during startup")
            if line.startswith(READY_PREFIX):
                self.port = int(line[len(READY_PREFIX) :].strip().rsplit(":", 1)[1])
                return

    def _wait_ready(self) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if self._client.get("/_sandbox/clock").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError("sandbox subprocess exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("sandbox server did not answer")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
            self._server = None
            self._thread = None
            for name in ("stripe", "xero", "quickbooks", "paypal", "mautic") if self.app is not None else ():
                close = getattr(getattr(self.app.state, name, None), "close", None)
                if close is not None:
                    close()  # the emulator's webhook delivery thread (a persistent sandbox saved at shutdown)
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except sp.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)
            self._proc = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server's process id in subprocess mode."""
        return self._proc.pid if self._proc is not None else None

    # --- control API helpers ----------------------------------------------------------------------------

    def control(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the unauthenticated control API (``/_sandbox/...``) and return its JSON answer."""
        if self._client is None:
            raise RuntimeError("sandbox server is not running")
        resp = self._client.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise RuntimeError(f"sandbox control {method} {path} failed: {resp.status_code} {resp.text}")
        return resp.json()

    def add_stripe_account(
        self,
        api_key: str,
        *,
        seed: int = 0,
        charges: int = 1000,
        subscriptions: int = 100,
        customers: int | None = None,
        days: int = 90,
        requests_per_second: float | None = None,
        now: int | None = None,
    ) -> dict[str, Any]:
        """``POST /_sandbox/stripe/accounts``; returns the account summary with object counts."""
        spec: dict[str, Any] = {
            "api_key": api_key,
            "seed": seed,
            "charges": charges,
            "subscriptions": subscriptions,
            "days": days,
        }
        if customers is not None:
            spec["customers"] = customers
        if requests_per_second is not None:
            spec["requests_per_second"] = requests_per_second
        if now is not None:
            spec["now"] = now
        return self.control("POST", "/_sandbox/stripe/accounts", json=spec)

    def clock(self) -> int:
        """``GET /_sandbox/clock``."""
        return int(self.control("GET", "/_sandbox/clock")["now"])

    def advance_clock(self, seconds: float) -> int:
        """``POST /_sandbox/clock/advance``; returns the new time."""
        return int(self.control("POST", "/_sandbox/clock/advance", json={"seconds": seconds})["now"])

    def set_stripe_faults(self, api_key: str, **faults: Any) -> dict[str, Any]:
        """``POST /_sandbox/stripe/faults`` with any of the fault fields (see the Stripe control API)."""
        return self.control("POST", "/_sandbox/stripe/faults", json={"api_key": api_key, **faults})

    def clear_stripe_faults(self, api_key: str) -> None:
        """``DELETE /_sandbox/stripe/faults?api_key=...``."""
        self.control("DELETE", "/_sandbox/stripe/faults", params={"api_key": api_key})

    def stripe_export(self, api_key: str, kind: str) -> list[dict[str, Any]]:
        """``GET /_sandbox/stripe/export/{charges|subscriptions}?api_key=...``."""
        return self.control("GET", f"/_sandbox/stripe/export/{kind}", params={"api_key": api_key})

    def stripe_stats(self, api_key: str) -> dict[str, Any]:
        """``GET /_sandbox/stripe/stats?api_key=...``."""
        return self.control("GET", "/_sandbox/stripe/stats", params={"api_key": api_key})


def _parse_account(
    ctx: click.Context | None, param: click.Parameter | None, values: Sequence[str]
) -> list[dict[str, Any]]:
    accounts = []
    for value in values:
        try:
            key, seed, charges, subscriptions = value.rsplit(":", 3)
            accounts.append(
                {"api_key": key, "seed": int(seed), "charges": int(charges), "subscriptions": int(subscriptions)}
            )
        except ValueError:
            raise click.BadParameter(f"expected KEY:SEED:CHARGES:SUBSCRIPTIONS, got {value!r}") from None
    return accounts


def _loopback_host(ctx: click.Context | None, param: click.Parameter | None, value: str) -> str:
    try:
        _check_loopback(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return value


@click.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    callback=_loopback_host,
    help="Loopback address to bind (127.0.0.1, ::1 or localhost); any other address is refused.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the sandbox here: restore its accounts, records, OAuth grants, tokens, webhook "
    "subscriptions and clock at startup and save every change (within about a second, and at "
    "shutdown). Without it the sandbox lives in memory and starts empty.",
)
@click.option(
    "--stripe-account",
    "stripe_accounts",
    multiple=True,
    callback=_parse_account,
    metavar="KEY:SEED:CHARGES:SUBSCRIPTIONS",
    help="Create a Stripe account with this API key at startup, generated from SEED (repeatable); "
    "a restored identical account is kept as it is.",
)
@click.option(
    "--now",
    type=int,
    default=None,
    metavar="UNIX_TIME",
    help="Start the sandbox clock at this unix time (a fresh sandbox only: a restored one keeps its clock).",
)
@click.option(
    "--announce",
    is_flag=True,
    help=f"Print '{READY_PREFIX}<url>' on stdout once listening (how SandboxServer learns the port).",
)
def serve_command(host: str, port: int, state_dir: Path | None, stripe_accounts: list[dict[str, Any]],
                  now: int | None, announce: bool) -> None:  # fmt: skip
    """Serve the emulated provider APIs on loopback until interrupted.

    One HTTP server answers for the seven providers NextCRM syncs, each under its own path prefix:

    \b
      Stripe             /v1
      Xero               /xero
      QuickBooks Online  /quickbooks
      MYOB Business      /myob
      PayPal             /paypal
      BillionMail        /billionmail/<account>
      Mautic             /mautic/<account>

    Accounts are created and changed through the control API, /_sandbox/<provider>/... per provider;
    GET /_sandbox/accounts lists every provider's accounts, /_sandbox/clock holds the shared clock and
    /_sandbox/state tells where the state is saved. Nothing leaves the machine: the control API has no
    authentication, so the server binds to a loopback address only.
    """
    app = build_app(stripe_accounts, now=now, state_dir=state_dir)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    store: SandboxStore | None = app.state.store
    if store is not None:
        what = "restored from" if store.restored else "kept in"
        click.echo(f"sandbox state {what} {store.directory}", err=True)
    if announce:
        click.echo(f"{READY_PREFIX}http://{url_host}:{bound}")
        sys.stdout.flush()
    else:
        click.echo(f"sandbox listening on http://{url_host}:{bound}", err=True)
    try:
        uvicorn.Server(_uvicorn_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down (and saved the state) already
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``serve_command`` with ``argv`` (``python -m nextcrm_sandbox.server``): 0 once served; a usage error
    exits (``SystemExit`` 2) as on the command line."""
    try:
        serve_command.main(args=list(argv) if argv is not None else None, prog_name="python -m nextcrm_sandbox.server")
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
