"""Crash cleanup without a launcher: sweeping the files of groups nobody holds any more.

A group's files live as long as one process holds its marker with a shared
``flock`` (:mod:`hpcshare.anywhere.groups`). :func:`sweep` looks at this
user's markers in a shared-memory directory and takes each one's lock
exclusively without waiting: if it gets it, every process of that group is
gone (ended, crashed or killed with ``kill -9``: the kernel drops their
locks), so it unlinks the group's objects and then the marker. A ``.part``
file whose writer's exclusive lock is gone (a worker killed mid-put) is
unlinked even in a live group.

It runs when a worker, a nanny or a client of any cluster first uses
hpcshare on a host, when the last member of a group leaves, and as
``python -m hpcshare clean``. It only ever touches this user's own 0600
files named ``hpcshare-dask-*``: another user's files, and live objects
of another cluster (whose markers are held), are never touched. Local.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from ..shm import running
from . import files

__all__ = ["holders", "sweep", "sweep_when_unheld"]


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[bool]:
    """Whether ``path`` (ours) could be locked exclusively now; held for the block."""
    try:
        fd = files.open_own(path)
    except (OSError, Exception):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _ours(path: str) -> bool:
    try:
        return files.owned_by_us(os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def _unlink(path: str, removed: list[str]) -> None:
    try:
        os.unlink(path)
        removed.append(os.path.basename(path))
    except OSError:
        pass


def _sweep_cluster(shm_dir: str, cluster: str, found: list[tuple[str, str]], removed: list[str]) -> None:
    """Sweep one cluster's files in ``shm_dir``: ``found`` is (kind, file name) of each."""
    paths = [os.path.join(shm_dir, entry) for kind, entry in found if kind != "marker"]
    for kind, entry in found:
        path = os.path.join(shm_dir, entry)
        if kind == "part":  # its writer's exclusive lock is gone: it died mid-put
            with _exclusive(path) as dead:
                if dead:
                    _unlink(path, removed)
    marker = files.marker_path(shm_dir, cluster)
    if os.path.lexists(marker):
        with _exclusive(marker) as dead:
            if dead:  # objects first, the marker last, while we hold it: a joiner then starts over
                for path in paths:
                    if _ours(path):
                        _unlink(path, removed)
                _unlink(marker, removed)
        return
    for path in paths:  # objects without a marker: a sweep of the group was cut short
        if _ours(path) and not os.path.lexists(marker):
            _unlink(path, removed)


def sweep(shm_dir: str, cluster: str | None = None) -> list[str]:
    """Unlink the files of this user's dead groups in ``shm_dir`` (of ``cluster``, or all); the names removed.

    Local; safe to run at any time from any process: live groups keep
    their objects.
    """
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    by_cluster: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        parsed = files.parse(entry)
        if parsed is not None and (cluster is None or parsed[0] == cluster):
            by_cluster.setdefault(parsed[0], []).append((parsed[2], entry))
    removed: list[str] = []
    for name, found in sorted(by_cluster.items()):
        _sweep_cluster(shm_dir, name, found, removed)
    return sorted(set(removed))


def holders(path: str) -> list[int] | None:
    """The pids that hold an ``flock`` on file ``path``, from ``/proc/locks``; None if unknown (local).

    A pid is 0 when the holder is in another pid namespace.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ  1234 00:1a:5678 0 EOF"; blocked waiters are "1: -> FLOCK ..."
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            found.append(int(fields[4]))
    return found


def sweep_when_unheld(shm_dir: str, cluster: str, timeout: float = 10.0) -> list[str]:
    """Sweep ``cluster``'s group in ``shm_dir``; while its marker is held only by processes that
    are ending (workers killed together, whose last threads still exit), try again, for up to
    ``timeout`` seconds (local).

    Returns at once when a live process holds the marker: that member sweeps as it leaves.
    """
    marker = files.marker_path(shm_dir, cluster)
    deadline = time.monotonic() + timeout
    removed: list[str] = []
    while True:
        removed += sweep(shm_dir, cluster)
        if not os.path.lexists(marker) or time.monotonic() > deadline:
            break
        held_by = holders(marker)
        if held_by is None or any(pid == 0 or running(pid) for pid in held_by):
            break
        time.sleep(0.05)
    return sorted(set(removed))
