"""A sandbox whose accounts outlive the process: its emulators' state saved to, and restored from, a directory.

``SandboxStore`` keeps one file per part of the sandbox in the state directory: ``clock.state`` (the shared
clock's offset) and ``<provider>.state`` for each emulator (accounts, tenants, apps, OAuth grants and tokens,
webhook subscriptions with their queued deliveries, every record). Each file is a header line (format, a
fingerprint of the sandbox's code, the payload's length and SHA-256) and a pickle. A save runs on the
server's event loop once the requests being served are done (``SaveScheduler``), so no handler changes what it
pickles; it writes a temporary file beside the part's file, ``fsync``s it and ``os.replace``s the old one, so a
crash leaves the previous or the new file, never half of one. Only the parts requests touched since the last
save are written. The emulators refer to the one clock: each
part's pickle names it, and loading hands every part the clock loaded first.

Locks, conditions and threads are not pickled: they are rebuilt empty on restore, and the webhook outboxes
start delivering again once every part is back. When a file was written by other code (the fingerprint
differs) or cannot be read, all the files are moved aside together into ``set-aside-<time>/`` with a one-line
message and the sandbox starts empty. The files are pickles: only load state directories you made.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import hashlib
import io
import itertools
import logging
import os
import pickle
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CLOCK", "LoadResult", "SandboxStore", "SaveAfterRequests", "SaveScheduler", "code_fingerprint"]

log = logging.getLogger(__name__)

CLOCK = "clock"  # the part every other part refers to
FORMAT = 1
_SUFFIX = ".state"
_MAGIC = b"NEXTCRM-SANDBOX-STATE "
_PACKAGE = Path(__file__).resolve().parent
# The command line front end holds no state: editing it must not discard a saved sandbox.
_NOT_STATE = frozenset({"cli.py"})


def code_fingerprint() -> str:
    """SHA-256 over the sandbox package's source (but the CLI): a saved state is read back only by the same code."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        rel = path.relative_to(_PACKAGE).as_posix()
        if rel in _NOT_STATE:
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- pickling: what must not be pickled is rebuilt empty, the shared clock is named ----------------------


def _none() -> None:
    return None


def _count(start: int) -> itertools.count[int]:
    return itertools.count(start)


def _reduce_count(counter: itertools.count[int]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    text = repr(counter)  # "count(7)": the next value (itertools.count pickles only until Python 3.14)
    if not (text.startswith("count(") and text.endswith(")") and text[6:-1].lstrip("-").isdigit()):
        raise pickle.PicklingError(f"cannot save {text}: only integer counters with step 1 are saved")
    return _count, (int(text[6:-1]),)


def _shared(name: str) -> Any:
    """Stands for an object saved in another part (the clock); ``_Unpickler`` resolves it."""
    raise pickle.UnpicklingError(f"{name!r} is restored by the sandbox store only")


def _reduce_shared(names: Mapping[int, str], obj: Any) -> Any:
    name = names.get(id(obj))
    return (_shared, (name,)) if name is not None else obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


_DISPATCH: dict[type, Callable[[Any], Any]] = {
    **copyreg.dispatch_table,
    type(threading.Lock()): lambda lock: (threading.Lock, ()),
    type(threading.RLock()): lambda lock: (threading.RLock, ()),
    threading.Condition: lambda cond: (threading.Condition, ()),
    threading.Thread: lambda thread: (_none, ()),
    itertools.count: _reduce_count,
}


def dumps(obj: Any, shared: Mapping[str, Any] | None = None) -> bytes:
    """``obj`` pickled; locks and conditions come back new and unlocked, threads as ``None``, and the objects of
    ``shared`` (name -> object) as references that ``loads`` resolves."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    table = dict(_DISPATCH)
    names = {id(value): name for name, value in (shared or {}).items()}
    for value in (shared or {}).values():
        table[type(value)] = partial(_reduce_shared, names)
    pickler.dispatch_table = table
    pickler.dump(obj)
    return buffer.getvalue()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, shared: Mapping[str, Any]) -> None:
        super().__init__(file)
        self.shared = shared

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_shared":
            return self.shared.__getitem__
        return super().find_class(module, name)


def loads(data: bytes, shared: Mapping[str, Any] | None = None) -> Any:
    """The object ``dumps`` pickled, its references to ``shared`` objects resolved."""
    return _Unpickler(io.BytesIO(data), shared or {}).load()


# --- the state files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """What ``SandboxStore.load`` found: the restored parts (empty when there were none) and, when the files
    were set aside, why and where."""

    parts: dict[str, Any]
    problem: str | None = None
    moved_to: Path | None = None


class StateFileError(Exception):
    """A state file this code cannot use; the message says why in a few words."""


class SandboxStore:
    """The state files of one sandbox: ``load`` at startup, ``save`` after changes and at shutdown.

    ``snapshot`` returns the parts to save by name (``clock`` and one per emulator), called on the thread that
    owns them. ``last`` holds the figures of the latest save (parts, bytes, seconds to pickle and to write),
    ``part_saves`` the number of the save that last wrote each part (saves are numbered from 1 per process).
    """

    def __init__(self, directory: Path | str, snapshot: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.directory = Path(directory)
        self.snapshot = snapshot
        self.fingerprint = code_fingerprint()
        self.restored = False
        self.saves = 0
        self.part_saves: dict[str, int] = {}
        self.last: dict[str, Any] = {}
        self._write_lock = threading.Lock()

    def path(self, part: str) -> Path:
        """The file of one part."""
        return self.directory / f"{part}{_SUFFIX}"

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{_SUFFIX}")) if self.directory.is_dir() else []

    # --- load ---------------------------------------------------------------------------------------------

    def load(self) -> LoadResult:
        """The saved parts (none when nothing was saved); unusable files are moved aside (never deleted)."""
        if self.directory.is_dir():
            for partial_write in self.directory.glob(".*.tmp"):  # a save cut short by a crash: never a state
                partial_write.unlink(missing_ok=True)
        files = self._files()
        if not files:
            return LoadResult({})
        try:
            clock_file = self.path(CLOCK)
            if clock_file not in files:
                raise StateFileError("has no clock.state")
            clock = loads(self._payload(clock_file))
            parts = {CLOCK: clock}
            for file in files:
                if file != clock_file:
                    parts[file.name[: -len(_SUFFIX)]] = loads(self._payload(file), {CLOCK: clock})
        except StateFileError as err:
            problem = str(err)
        except Exception as err:  # any failure to rebuild the objects means this code cannot use the files
            problem = f"cannot be restored ({type(err).__name__})"
        else:
            self.restored = True
            return LoadResult(parts)
        moved = self._move_aside(files)
        print(f"sandbox state in {self.directory} {problem}; moved it to {moved} and started a fresh sandbox",
              file=sys.stderr, flush=True)  # fmt: skip
        return LoadResult({}, problem, moved)

    def _payload(self, file: Path) -> bytes:
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise StateFileError(f"cannot be read ({file.name}: {err.strerror})") from None
        head, sep, payload = raw.partition(b"\n")
        try:
            header = orjson.loads(head[len(_MAGIC) :]) if head.startswith(_MAGIC) and sep else None
        except orjson.JSONDecodeError:
            header = None
        if not isinstance(header, dict):
            raise StateFileError(f"is not a sandbox state ({file.name})")
        if header.get("format") != FORMAT or header.get("code") != self.fingerprint:
            raise StateFileError("was written by another version of the sandbox code")
        if header.get("length") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise StateFileError(f"is damaged ({file.name}: the checksum does not match)")
        return payload

    def _move_aside(self, files: Iterable[Path]) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = self.directory / f"set-aside-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"set-aside-{stamp}-{n}"
        target.mkdir(mode=0o700)
        for file in files:
            os.replace(file, target / file.name)
        return target

    # --- save ---------------------------------------------------------------------------------------------

    def save(self, reason: str = "change", parts: Iterable[str] | None = None) -> dict[str, Any]:
        """Pickle the named parts of ``snapshot()`` (all when ``None``) and replace their files atomically;
        returns the save's figures."""
        if self.snapshot is None:
            raise RuntimeError("this store has nothing to save")
        every = self.snapshot()
        wanted = set(every if parts is None else parts)
        if not self.path(CLOCK).exists():
            wanted.add(CLOCK)  # every other part refers to it
        names = [name for name in every if name in wanted]
        started = time.perf_counter()
        clock = {CLOCK: every[CLOCK]}
        payloads = {name: dumps(every[name], None if name == CLOCK else clock) for name in names}
        pickled = time.perf_counter()
        with self._write_lock:
            for name, payload in payloads.items():
                self._write(name, payload)
        done = time.perf_counter()
        self.saves += 1
        self.part_saves.update(dict.fromkeys(names, self.saves))
        self.last = {
            "reason": reason,
            "parts": names,
            "bytes": sum(len(p) for p in payloads.values()),
            "pickle_seconds": round(pickled - started, 4),
            "write_seconds": round(done - pickled, 4),
            "saved_at": time.time(),
        }
        return self.last

    def _write(self, part: str, payload: bytes) -> None:
        header = {"format": FORMAT, "code": self.fingerprint, "part": part, "length": len(payload),
                  "sha256": hashlib.sha256(payload).hexdigest(), "saved_at": time.time()}  # fmt: skip
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{part}.", suffix=".tmp", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(_MAGIC + orjson.dumps(header) + b"\n")
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(part))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if os.name == "posix":  # the rename itself survives a power cut
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


# --- when to save -----------------------------------------------------------------------------------------


class SaveScheduler:
    """Debounced saves on the server's event loop of the parts requests touched.

    A part is saved within ``soon`` seconds of a request that may change it (any method but GET/HEAD/OPTIONS),
    within ``later`` seconds of reads only (they move request counters, rate-limit windows, caches and lazily
    made ids, nothing a client wrote). A save waits while requests are being served (some do part of their work
    on worker threads, which a save must not catch half done), for ``max_defer`` seconds at most; the save that
    follows the last request of a burst sees everything at rest. A failed save is retried with a growing pause
    and reported once per kind of failure.
    """

    def __init__(self, store: SandboxStore, *, soon: float = 0.5, later: float = 5.0, max_defer: float = 3.0) -> None:
        self.store = store
        self.soon = soon
        self.later = later
        self.max_defer = max_defer
        self.busy = 0  # requests being served
        self.failures = 0  # consecutive failed saves
        self.dirty: set[str] = set()
        self._dirty_all = False  # a save of every part failed: the retry saves every part
        self._due = float("inf")
        self._handle: asyncio.TimerHandle | None = None
        self._deferred_since: float | None = None
        self._reported: set[str] = set()

    @property
    def pending(self) -> bool:
        """Whether a save is scheduled."""
        return self._handle is not None

    def changed(self, part: str, writes: bool) -> None:
        """Note a request that touched ``part``; call on the event loop."""
        self.dirty.add(part)
        self._schedule(self.soon if writes else self.later)

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if due >= self._due:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        self._handle = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle, self._due = None, float("inf")
        if self.busy:
            self._deferred_since = self._deferred_since or loop.time()
            if loop.time() - self._deferred_since < self.max_defer:
                self._schedule(0.05)
                return
        self._deferred_since = None
        self.save_now("change", every=self._dirty_all)

    def save_now(self, reason: str, *, every: bool = True) -> dict[str, Any] | None:
        """Save every part (or only the dirty ones) at once, cancelling a scheduled save; on failure log it,
        schedule a retry and return ``None``."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle, self._due = None, float("inf")
        parts, self.dirty, self._dirty_all = (None if every else self.dirty), set(), False
        try:
            figures = self.store.save(reason, parts)
        except Exception as err:  # the sandbox keeps serving; the next save may succeed (or say why again)
            if parts is None:
                self._dirty_all = True
            else:
                self.dirty |= parts
            self.failures += 1
            what = f"{type(err).__name__}: {err}"
            if what not in self._reported:
                self._reported.add(what)
                log.warning("could not save the sandbox state to %s (%s); retrying", self.store.directory, what)
            with contextlib.suppress(RuntimeError):  # no running loop (a save at shutdown): nothing to retry on
                self._schedule(min(30.0, self.soon * 2**self.failures))
            return None
        self.failures = 0
        return figures


class SaveAfterRequests:
    """ASGI middleware telling the ``SaveScheduler`` which part each request touched (``part_of(path)``;
    ``None``: none, e.g. ``/_sandbox/state``)."""

    def __init__(self, app: ASGIApp, scheduler: SaveScheduler, part_of: Callable[[str], str | None]) -> None:
        self.app = app
        self.scheduler = scheduler
        self.part_of = part_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        part = self.part_of(scope["path"]) if scope["type"] == "http" else None
        if part is None:
            await self.app(scope, receive, send)
            return
        self.scheduler.busy += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.scheduler.busy -= 1
            self.scheduler.changed(part, writes=scope["method"] not in ("GET", "HEAD", "OPTIONS"))
