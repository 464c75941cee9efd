"""Measuring a contender from outside: node memory of its process tree, and stopping it.

Node memory is the sum of PSS over the run's processes: PSS splits each
shared page between the processes that map it, so one copy of the input
shared by W workers counts once, while W private copies count W times.
A file's pages in the page cache that no process maps count for nobody.

The processes are read one after another, not at one instant: while
workers map and unmap a file in every task, a page can be counted whole in
one process and again in part in the next. For such a run
(``PeakMemory(..., mapped=FILE)``) the file's mappings are left out of each
process's PSS and the file's pages in the page cache counted once instead
(:func:`resident_bytes`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import signal
import subprocess
import threading
import time

import numpy as np
import psutil

__all__ = ["PeakMemory", "available_memory", "kill_group", "resident_bytes", "tree_pss"]


def _pss_without(p: psutil.Process, mapped: str | None) -> int:
    """PSS of ``p`` in bytes, less that of its mappings of the file ``mapped``."""
    if mapped is None:
        return int(p.memory_full_info().pss)
    return sum(int(m.pss) for m in p.memory_maps(grouped=True) if m.path != mapped)


def tree_pss(root: int, mapped: str | None = None) -> tuple[int, int]:
    """Summed PSS in bytes of ``root`` and all its descendants, and how many there are (local).

    With ``mapped`` (a file the processes map), their mappings of it are left
    out and the file's pages in the page cache counted once instead.
    """
    try:
        parent = psutil.Process(root)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = resident_bytes(mapped) if mapped is not None else 0
    for p in procs:
        try:
            total += _pss_without(p, mapped)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total, len(procs)


def resident_bytes(path: str) -> int:
    """Bytes of the file ``path`` that the page cache holds (local), mapped by anybody or not.

    ``mincore`` over a mapping of the file that reads none of it.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            resident = int(np.count_nonzero(np.frombuffer(vec.raw, np.uint8) & 1))
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * mmap.PAGESIZE, size)


class PeakMemory(threading.Thread):
    """Samples :func:`tree_pss` of a process every ``interval`` seconds; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.1, mapped: str | None = None) -> None:
        super().__init__(daemon=True, name="hpcshare-bench-sampler")
        self.root, self.interval, self.mapped = root, interval, mapped
        self.peak = 0  #: the largest summed PSS seen, in bytes
        self.processes = 0  #: how many processes there were at that peak
        self.samples: list[tuple[float, int]] = []  #: (wall-clock time, summed PSS)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            total, count = tree_pss(self.root, self.mapped)
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
