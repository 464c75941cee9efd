"""Named shared-memory files: which a process maps, free space, unlinking, the watcher.

MPI libraries back shared windows with named files in /dev/shm (MPICH:
``mpich_shm_*``). They unlink them when a job ends normally; a killed job
leaves them behind until the node reboots. Everything hpcshare does about
those files lives here:

- :func:`mapped_files`, :func:`mapped_shm_files`: what a process maps (from
  ``/proc/PID/maps``);
- :func:`unlink_mapped`: unlink this process's named files before an abort;
- :func:`names`, :func:`orphaned_names`, :func:`sweep_orphans`: files that
  appeared and that no live process maps or holds open any more;
- :func:`free_space`, :func:`check_capacity`: room before allocating;
- :class:`Watcher`: one process per host that unlinks the job's files once
  every rank on that host is gone, however the ranks ended. It learns the
  files as they appear, from the ranks' maps, so it knows every MPI
  library's (MPICH ``mpich_shm_*``, Open MPI ``sm_segment.*``, ...).

This file is also the watcher's program (``python -I shm.py PIDS PATH...``,
a PATH ending in ``/`` a folder removed with what it holds),
so it imports nothing but the standard library at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .topology import Topology

__all__ = [
    "MADV_HUGEPAGE",
    "MADV_POPULATE_WRITE",
    "SHM_DIR",
    "Watcher",
    "check_capacity",
    "free_space",
    "libc",
    "mapped_files",
    "mapped_shm_files",
    "names",
    "orphaned_names",
    "running",
    "sweep_orphans",
    "unlink_mapped",
]

SHM_DIR = "/dev/shm"
_WATCH_EVERY = 0.5  # seconds between the watcher's looks at the ranks
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


@functools.cache
def libc() -> Any:
    """The C library, for madvise and mprotect on shared memory (None where it cannot be loaded)."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


def mapped_files(pid: int | str = "self") -> list[str]:
    """Paths of the files process ``pid`` maps, in the order of its maps (local).

    Empty when the process is gone or its maps cannot be read (another user's).
    """
    paths: list[str] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    paths.append(fields[5].rstrip("\n"))
    except OSError:
        pass
    return paths


def mapped_shm_files(shm_dir: str = SHM_DIR, pid: int | str = "self") -> list[str]:
    """Files in ``shm_dir`` that process ``pid`` maps and that still have a name (local)."""
    prefix = shm_dir.rstrip("/") + "/"
    return sorted({p for p in mapped_files(pid) if p.startswith(prefix) and not p.endswith(" (deleted)")})


def unlink_mapped(shm_dir: str = SHM_DIR) -> None:
    """Unlink the named shared-memory files this process maps (local, idempotent).

    The mappings stay valid; the memory is returned once every process that
    maps it has exited, whoever ends them. Called before an abort, since
    ranks killed by it cannot remove their files.
    """
    for path in mapped_shm_files(shm_dir):
        try:
            os.unlink(path)
        except OSError:
            pass


def names(shm_dir: str = SHM_DIR) -> set[str]:
    """Names of the files in ``shm_dir`` (local; empty if it cannot be read)."""
    try:
        return set(os.listdir(shm_dir))
    except OSError:
        return set()


def _open_files(shm_dir: str, pid: str) -> set[str]:
    """Names of the files in ``shm_dir`` that process ``pid`` holds open (empty if it cannot be read)."""
    prefix, found = shm_dir.rstrip("/") + "/", set[str]()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix) and "/" not in target[len(prefix) :]:
            found.add(target[len(prefix) :])
    return found


def _names_in_use(shm_dir: str) -> set[str]:
    """Names of the files in ``shm_dir`` that some live process maps or holds open (local).

    Open counts too: a Dask cluster's group marker (:mod:`hpcshare.anywhere.groups`)
    is held open with a lock, never mapped, for as long as its cluster lives.
    """
    found: set[str] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found.update(os.path.basename(p) for p in mapped_shm_files(shm_dir, entry))
            found.update(_open_files(shm_dir, entry))
    return found


def _mine(path: str) -> bool:
    """Whether ``path`` belongs to this process's user (never followed through a link)."""
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def orphaned_names(before: Iterable[str], shm_dir: str = SHM_DIR) -> set[str]:
    """This user's files in ``shm_dir`` that are not in ``before`` and that no live process maps or
    holds open (local).

    Other users' files are theirs to answer for, also when this runs as root.
    """
    new = names(shm_dir) - set(before) - _names_in_use(shm_dir)
    return {n for n in new if _mine(os.path.join(shm_dir, n))}


def sweep_orphans(before: Iterable[str], shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink :func:`orphaned_names`; return the names removed (local).

    For a program that started an MPI job and saw it killed (a benchmark
    run's time limit, the OOM killer): nobody else would remove its files.
    """
    removed = []
    for name in sorted(orphaned_names(before, shm_dir)):
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def free_space(path: str) -> tuple[int, int]:
    """Free and total bytes of the file system at ``path`` (local; raises OSError)."""
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


def check_capacity(path: str, need: int, headroom: int, what: str) -> None:
    """Raise :class:`~hpcshare.CapacityError` unless ``path`` has ``need + headroom`` bytes free (local).

    A window larger than the free space of the shared-memory file system maps
    fine and then dies with SIGBUS on first touch, so this runs before any
    allocation.
    """
    from dask.utils import format_bytes

    from .errors import CapacityError

    try:
        free, total = free_space(path)
    except OSError as exc:
        raise CapacityError(
            f"cannot check shared memory at {path!r} ({exc}); set hpcshare.shm-dir "
            "(DASK_HPCSHARE__SHM_DIR) to where your MPI keeps shared windows"
        ) from exc
    if need + headroom > free:
        raise CapacityError(
            f"{what} need {format_bytes(need)} of shared memory on this host, but "
            f"{path} has {format_bytes(free)} free of {format_bytes(total)} "
            f"(plus {format_bytes(headroom)} kept free). Run on nodes with more "
            "memory, use fewer or smaller inputs, or grow the file system: in a "
            "container `docker run --shm-size=...`, in Apptainer bind a larger "
            "tmpfs, or `mount -o remount,size=... /dev/shm` as root."
        )


class Watcher:
    """The /dev/shm watcher of one host, as a context manager (collective on ``topo.host``).

    Entering gathers the PIDs of the host's ranks on host rank 0, which starts
    this file as a program in its own session, watching the named files it
    maps at that moment. The watcher outlives the ranks on purpose: when the
    last of them is gone (normal end, crash, abort, kill) it unlinks whatever
    of those files is still there, then exits. Leaving the block does nothing:
    the watcher sees the ranks end and exits by itself.
    """

    def __init__(self, topo: Topology, shm_dir: str = SHM_DIR, folders: Iterable[str] = ()) -> None:
        self.topo, self.shm_dir, self.folders = topo, shm_dir, tuple(folders)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Watcher:
        from .context import PROCESS  # not at module level: this file is also the watcher's program

        pids = self.topo.host.gather(os.getpid(), root=0)
        if PROCESS.watcher is not None or self.topo.host.Get_rank() != 0 or pids is None:
            return self  # once per process: a second job in the same ranks is already watched
        paths = mapped_shm_files(self.shm_dir)
        paths += [f.rstrip("/") + "/" for f in self.folders]  # the job's folders, removed with all they hold
        if paths:
            self.process = PROCESS.watcher = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), ",".join(map(str, pids)), *paths],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            # never waited for: it must outlive this process (PROCESS keeps it, so Popen's finalizer
            # does not warn about a live child)
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def running(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (a zombie maps nothing, and holds no files, any more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int] | None:
    """The device and inode of ``path`` if it is this user's and not a link, else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) else None


def _watch(argv: list[str]) -> int:
    """The watcher's program: ``PID[,PID...] PATH [PATH...]``.

    It may run as root (CI, some sites): it removes only files and folders of
    its own user, and a folder only if it is still the one it saw at the
    start, so another user's file that took a name the job used is left alone.
    """
    pids = [int(p) for p in argv[0].split(",") if p]
    paths = {p: _identity(p) for p in argv[1:] if not p.endswith("/")}
    folders = {
        p.rstrip("/"): _identity(p.rstrip("/")) for p in argv[1:] if p.endswith("/")
    }  # with all they hold
    shm_dir = os.path.dirname(([*paths] or [SHM_DIR + "/"])[0])
    while live := [p for p in pids if running(p)]:
        # files the MPI library (any of them) creates while the job runs: whatever the ranks map
        for pid in live:
            paths.update({f: _identity(f) for f in mapped_shm_files(shm_dir, pid) if f not in paths})
        if not folders and not any(os.path.exists(p) for p in paths):
            return 0  # the MPI library cleaned up; nothing left to watch
        time.sleep(_WATCH_EVERY)
    for path, seen in paths.items():
        if seen is not None and _identity(path) == seen:
            with contextlib.suppress(OSError):
                os.unlink(path)
    for folder, seen in folders.items():
        if seen is not None and _identity(folder) == seen:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(_watch(sys.argv[1:]))
