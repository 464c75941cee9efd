"""Measuring a contender from outside: node memory of its process tree, and stopping it.

Node memory is the sum of PSS over the run's processes: PSS splits each
shared page between the processes that map it, so one copy of the input
shared by W workers counts once, while W private copies count W times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil

__all__ = ["PeakMemory", "available_memory", "kill_group", "tree_pss"]


def tree_pss(root: int) -> tuple[int, int]:
    """Summed PSS in bytes of ``root`` and all its descendants, and how many there are (local)."""
    try:
        parent = psutil.Process(root)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total, len(procs)


class PeakMemory(threading.Thread):
    """Samples :func:`tree_pss` of a process every ``interval`` seconds; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="hpcshare-bench-sampler")
        self.root, self.interval = root, interval
        self.peak = 0  #: the largest summed PSS seen, in bytes
        self.processes = 0  #: how many processes there were at that peak
        self.samples: list[tuple[float, int]] = []  #: (wall-clock time, summed PSS)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total, count = tree_pss(self.root)
            self.samples.append((time.time(), total))
            if total > self.peak:
                self.peak, self.processes = total, count
            self._done.wait(self.interval)

    def peak_between(self, start: float, end: float) -> int | None:
        """The largest sample taken from ``start`` to ``end`` (wall-clock), or None if none was."""
        inside = [pss for t, pss in self.samples if start <= t <= end]
        return max(inside) if inside else None

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()


def available_memory() -> int:
    """Bytes of memory the node can still give without swapping (local)."""
    return int(psutil.virtual_memory().available)


def kill_group(proc: subprocess.Popen[str], grace: float = 10.0) -> str:
    """Kill a contender's process group; wait (at most ``grace`` s) until none of it is left.

    Returns what the contender printed. Ranks that outlive mpiexec still map
    their shared-memory files, so the caller sweeps /dev/shm only after this.
    """
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return output
