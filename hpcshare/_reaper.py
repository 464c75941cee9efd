"""Remove a job's named shared-memory files once all of its ranks on this host are gone.

MPI libraries unlink their shared-memory files when the job ends normally.
When a rank is killed (a crash, ``MPI_Abort``, a batch system's time limit),
the library of the other ranks is killed too and the files stay in /dev/shm
until the node reboots. The job's first rank on each host starts this
watcher in its own session; it polls the ranks' PIDs twice a second and,
when none is left, unlinks the files that are still there.

Run as a plain script with ``python -I`` (it imports nothing but the
standard library): ``_reaper.py PID[,PID...] PATH [PATH...]``.
"""

from __future__ import annotations

import os
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: its files are no longer in use
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def mapped_shm_names(shm_dir: str = "/dev/shm") -> set[str]:
    """Names of the files in ``shm_dir`` that some live process still maps."""
    names: set[str] = set()
    prefix = shm_dir.rstrip("/") + "/"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/maps") as f:
                    names.update(os.path.basename(line.split()[-1]) for line in f if prefix in line)
            except OSError:
                continue
    return names


def shm_names(shm_dir: str = "/dev/shm") -> set[str]:
    """Names of the files in ``shm_dir`` (empty if it cannot be read)."""
    try:
        return set(os.listdir(shm_dir))
    except OSError:
        return set()


def orphaned_shm_names(before: set[str], shm_dir: str = "/dev/shm") -> set[str]:
    """Files in ``shm_dir`` that are not in ``before`` and that no live process maps."""
    return shm_names(shm_dir) - before - mapped_shm_names(shm_dir)


def main(argv: list[str]) -> int:
    pids = [int(p) for p in argv[0].split(",") if p]
    paths = argv[1:]
    while any(_alive(p) for p in pids):
        if not any(os.path.exists(p) for p in paths):
            return 0  # the MPI library cleaned up; nothing left to watch
        time.sleep(0.5)
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
