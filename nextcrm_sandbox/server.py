"""The provider sandbox server: one Starlette app with the emulated provider APIs and a shared clock.

Demo runs, tests and benchmarks point real provider clients (stripe-python, httpx) at this server on
loopback instead of the internet. ``build_app`` composes the provider routes (Stripe today, others under
their own path prefixes later) with the clock control routes; ``SandboxServer`` runs that app with
uvicorn in a background thread, or in a child process when the server's CPU must not share the
client's GIL (benchmarks); ``main`` is the ``python -m nextcrm_sandbox.server`` entry point.

The control API under ``/_sandbox`` has no authentication: it is test tooling and the server refuses
to bind to anything but a loopback address.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import queue
import socket
import subprocess as sp
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from nextcrm_sandbox.billionmail import BillionMailSandbox
from nextcrm_sandbox.mautic import MauticSandbox
from nextcrm_sandbox.myob import MyobSandbox
from nextcrm_sandbox.paypal import PayPalSandbox
from nextcrm_sandbox.quickbooks import QuickBooksSandbox
from nextcrm_sandbox.stripe import StripeSandbox
from nextcrm_sandbox.xero import XeroSandbox

__all__ = ["DEFAULT_PORT", "SandboxClock", "SandboxServer", "build_app", "main"]

DEFAULT_PORT = 12111
READY_PREFIX = "NEXTCRM_SANDBOX_READY "


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


def build_app(accounts: list[dict[str, Any]] | None = None, now: int | None = None) -> Starlette:
    """The sandbox ASGI app.

    ``accounts`` are Stripe account specs as accepted by ``POST /_sandbox/stripe/accounts``
    (``api_key``, ``seed``, ``charges``, ``subscriptions``, optional ``customers``, ``days``,
    ``requests_per_second``, ``now``). ``now`` sets the sandbox clock's start (default: real time).
    ``app.state.clock`` and ``app.state.stripe`` expose the clock and the Stripe state in-process.
    """
    clock = SandboxClock(now)
    stripe = StripeSandbox(clock.now)
    for spec in accounts or []:
        stripe.add_account(spec)
    xero, quickbooks, myob = XeroSandbox(clock.now), QuickBooksSandbox(clock.now), MyobSandbox(clock.now)
    paypal, billionmail, mautic = PayPalSandbox(clock.now), BillionMailSandbox(clock.now), MauticSandbox(clock.now)
    routes: list[BaseRoute] = [
        *_clock_routes(clock),
        *stripe.routes(),  # first: the benchmarks' hot path is matched before the other emulators' routes
        *xero.routes(),
        *quickbooks.routes(),
        *myob.routes(),
        *paypal.routes(),
        *billionmail.routes(),
        *mautic.routes(),
        *stripe.fallback_routes(),
    ]
    app = Starlette(routes=routes)
    app.state.clock = clock
    app.state.stripe = stripe
    app.state.xero = xero
    app.state.quickbooks = quickbooks
    app.state.myob = myob
    app.state.paypal = paypal
    app.state.billionmail = billionmail
    app.state.mautic = mautic
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
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")


class SandboxServer:
    """Run the sandbox on ``127.0.0.1`` (free port by default) for the duration of a ``with`` block.

    ``subprocess=False`` serves from a daemon thread of this process; ``subprocess=True`` starts
    ``python -m nextcrm_sandbox.server`` so the server has its own interpreter and GIL.
    Accounts passed here are created before ``start()`` returns.
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
    ) -> None:
        _check_loopback(host)
        self.host = host
        self.port = port
        self.subprocess = subprocess
        self.startup_timeout = startup_timeout
        self._accounts = list(accounts or [])
        self._now = now
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
        self.app = build_app(self._accounts, now=self._now)
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
                    close()  # the emulator's webhook delivery thread
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


def _parse_account(value: str) -> dict[str, Any]:
    try:
        key, seed, charges, subscriptions = value.rsplit(":", 3)
        return {
            "api_key": key,
            "seed": int(seed),
            "charges": int(charges),
            "subscriptions": int(subscriptions),
        }
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY:SEED:CHARGES:SUBSCRIPTIONS, got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the sandbox until interrupted (``python -m nextcrm_sandbox.server``)."""
    parser = argparse.ArgumentParser(prog="python -m nextcrm_sandbox.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--stripe-account",
        action="append",
        default=[],
        type=_parse_account,
        metavar="KEY:SEED:CHARGES:SUBSCRIPTIONS",
        help="create a Stripe account at startup (repeatable)",
    )
    parser.add_argument("--now", type=int, default=None, help="start the sandbox clock at this unix time")
    parser.add_argument(
        "--announce",
        action="store_true",
        help=f"print '{READY_PREFIX}<url>' on stdout once listening (used by SandboxServer)",
    )
    args = parser.parse_args(argv)
    try:
        _check_loopback(args.host)
    except ValueError as err:
        parser.error(str(err))
    app = build_app(args.stripe_account, now=args.now)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    if args.announce:
        print(f"{READY_PREFIX}http://{host}:{port}", flush=True)
    else:
        print(f"sandbox listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(_uvicorn_config(app)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
