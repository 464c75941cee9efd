"""``hpcshare info``: topology, MPI library, thread level and shared memory."""

from __future__ import annotations

import os
import shutil
import socket
import sys

from dask.utils import format_bytes

from .shm import free_space, mapped_files
from .topology import launcher_size, role_of

__all__ = ["print_info"]

_THREAD_LEVELS = {0: "single", 1: "funneled", 2: "serialized", 3: "multiple"}


def _mpi_library_file() -> str | None:
    """The shared MPI library this process loaded (local)."""
    for path in mapped_files():
        if os.path.basename(path).startswith(("libmpi.so", "libmpich.so", "libmpi_", "libmpicxx")):
            return path
    return None


def print_info(shm_dir: str | None = None, ranks_per_node: int | None = None) -> int:
    """Print what the job would see, on world rank 0 (collective on COMM_WORLD).

    ``ranks_per_node`` (default: ``hpcshare.ranks-per-node``) shows the
    emulated nodes a job with that setting would have.
    """
    import dask.config
    from mpi4py import MPI

    from . import config as _config  # noqa: F401 - registers hpcshare defaults

    shm_dir = shm_dir or dask.config.get("hpcshare.shm-dir")
    if ranks_per_node is None:
        ranks_per_node = dask.config.get("hpcshare.ranks-per-node", None)
    world = MPI.COMM_WORLD
    host = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        free, total = free_space(shm_dir)
    except OSError:
        free, total = -1, -1
    mine = (world.Get_rank(), socket.gethostname(), host.Get_rank(), host.Get_size(), free, total)
    rows = world.gather(mine, root=0)
    host.Free()
    if world.Get_rank() != 0:
        return 0
    assert rows is not None
    size = world.Get_size()
    level = MPI.Query_thread()
    lib = MPI.Get_library_version().strip().splitlines()[0]
    print(f"hpcshare info: {size} rank(s), Python {sys.version.split()[0]}, pid {os.getpid()}")
    print(f"MPI library: {lib}")
    print(
        f"MPI standard {'.'.join(map(str, MPI.Get_version()))}, thread level {_THREAD_LEVELS.get(level, level)}"
    )
    import mpi4py

    print(f"mpi4py {mpi4py.__version__}, MPI library file {_mpi_library_file() or 'unknown'}")
    launched = launcher_size()
    started = (
        f"started by a launcher that set {launched[1]}={launched[0]}" if launched else "no launcher seen"
    )
    print(f"mpiexec on PATH: {shutil.which('mpiexec') or 'none'}; {started}")
    hosts: dict[str, list[tuple[int, int, int, int, int, int]]] = {}
    for row in rows:
        hosts.setdefault(row[1], []).append(row)
    print(f"{len(hosts)} host(s):")
    for name, hr in hosts.items():
        ranks = sorted(r[0] for r in hr)
        roles = ", ".join(f"{r} {role_of(r)}" for r in ranks)
        free, total = hr[0][4], hr[0][5]
        shm = f"{format_bytes(free)} free of {format_bytes(total)}" if total >= 0 else "not found"
        print(f"  {name}: {len(hr)} rank(s) sharing memory [{roles}]; {shm_dir}: {shm}")
        if ranks_per_node:
            by_host_rank = sorted(hr, key=lambda r: r[2])
            nodes = [
                by_host_rank[i : i + int(ranks_per_node)] for i in range(0, len(hr), int(ranks_per_node))
            ]
            print(
                f"    emulated nodes of {ranks_per_node} rank(s): "
                + "; ".join(f"[{', '.join(str(r[0]) for r in node)}]" for node in nodes)
            )
    if size == 1 and launched is not None and launched[0] > 1:
        n, var = launched
        print(
            f"WARNING: this rank sees an MPI world of 1 rank, but {var}={n}: the launcher "
            "comes from another MPI than mpi4py's, so every rank starts alone. Use the "
            "matching mpiexec, or srun --mpi=pmi2 (MPICH, Intel MPI) / --mpi=pmix (Open MPI).",
            file=sys.stderr,
        )
    if size < 3:
        print(f"note: a job needs at least 3 ranks (scheduler, client, a worker); this world has {size}.")
    return 0
