"""CPU accounting for benchmarks: where the seconds go between our process, named helpers and Postgres.

On a shared 2-core machine the client, the emulator and the Postgres server compete for the same
cores, so a rate alone does not say what to make cheaper; CPU seconds per party do.
"""

from __future__ import annotations

import os
import time
from typing import Any


class CpuMeter:
    """CPU seconds (user + system) of named processes, the Postgres server and this process."""

    def __init__(self, processes: dict[str, int], postmaster_pid: int | None) -> None:
        import psutil

        self._psutil = psutil
        self.processes = {name: psutil.Process(pid) for name, pid in processes.items()}
        self.postmaster = psutil.Process(postmaster_pid) if postmaster_pid else None

    def _postgres(self) -> float | None:
        if self.postmaster is None:
            return None
        try:
            children = self._settled_children()
            own = self.postmaster.cpu_times()
            total = own.user + own.system + own.children_user + own.children_system
            for child in children:
                try:
                    times = child.cpu_times()
                    total += times.user + times.system
                except self._psutil.NoSuchProcess:
                    pass
            return total
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            return None

    def _settled_children(self) -> list[Any]:
        """The postmaster's children once it has reaped those that ended (up to 2 s).

        A backend that has just exited is a zombie until the postmaster reaps it: its CPU time is
        then neither readable as a child's nor added to the postmaster's children's times yet.
        """
        deadline = time.monotonic() + 2
        while True:
            children = self.postmaster.children()
            ended = []
            for child in children:
                try:
                    ended.append(child.status() == self._psutil.STATUS_ZOMBIE)
                except self._psutil.NoSuchProcess:
                    ended.append(True)
            if not any(ended) or time.monotonic() > deadline:
                return children
            time.sleep(0.01)

    def _process(self, process: Any) -> float | None:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except self._psutil.Error:
            return None

    def sample(self) -> dict[str, float | None]:
        """CPU seconds used so far by each (None where it cannot be read).

        The client is this process plus its children that have ended (a backfill's helper processes).
        """
        out = {name: self._process(process) for name, process in self.processes.items()}
        out["postgres"] = self._postgres()
        reaped = os.times()
        out["client"] = time.process_time() + reaped.children_user + reaped.children_system
        return out

    @staticmethod
    def spent(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
        """CPU seconds used between two samples."""
        return {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None for k in before}


def postmaster_pid(database_url: str) -> int | None:
    """The pid of the server's postmaster when it runs on this machine (the parent of our backend)."""
    import psutil
    import psycopg

    with psycopg.connect(database_url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    try:
        return psutil.Process(backend).ppid()
    except psutil.Error:
        return None
