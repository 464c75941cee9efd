"""Fail when an MPI library or hpcshare left files in /dev/shm; CI runs it after each library's tests.

    python .ci/shm_leftovers.py BEFORE LIBRARY

BEFORE is a file listing what /dev/shm held when CI started: those files are
not this run's. A file that a live process maps belongs to a job that is
still running (on a shared machine, someone else's), so only files that no
process maps count, as in the tests' ``clean_shm`` fixture.
"""

from __future__ import annotations

import re
import sys
import time

from hpcshare import shm

# The names MPI libraries and hpcshare give their files (docs/install.md says which makes which)
NAMES = re.compile(
    r"hpcshare-"  # hpcshare.put's objects
    r"|mpich_"  # MPICH: mpich_shm_*
    r"|Intel_MPI_"  # Intel MPI: Intel_MPI_XXXXXX, unlinked once every rank maps it
    r"|sm_segment\.|osc_sm\.|osc_rdma\.|open_mpi_shmem_mmap\.|ompi"  # Open MPI 5
    r"|vader"  # Open MPI 1.8 to 4.1: vader_segment.*
    r"|ucx_shm_"  # UCX, the network layer of MPICH's wheel and of Open MPI: unlinked once mapped
)


def main(before_file: str, library: str) -> int:
    with open(before_file) as f:
        before = f.read().split()
    deadline = time.monotonic() + 10  # the last job's watcher sweeps within a second of its end
    while (left := sorted(n for n in shm.orphaned_names(before) if NAMES.match(n))) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    if left:
        print(f"left behind in /dev/shm by the tests under {library}: {' '.join(left)}", file=sys.stderr)
        return 1
    print(f"/dev/shm: nothing left behind by the tests under {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
