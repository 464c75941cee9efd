"""Memory policy for workers that share their node's inputs.

Pages of node-shared objects (the input windows, objects put while the job
runs) are resident in every worker that reads them, so a worker's RSS
counts them once per worker, while the node holds them once. Dask's memory
monitor compares RSS with fractions of each worker's limit (spill at 0.7,
pause at 0.8 by default), so it would spill or pause workers that hold no
private data at all.

hpcshare gives Dask two things instead:

- :func:`job_memory`: the memory the job may use on this machine: the
  machine, this process's cgroup, Slurm's ``--mem`` and ``--mem-per-cpu``
  times the CPUs on the node, whichever is lowest;
- :func:`worker_memory_limit`: each worker's *private* budget, so that the
  node's private limits plus its shared bytes stay within the job's memory;
- :class:`PrivateMemory`: a worker plugin after which the monitor measures
  the worker's private memory (its resident anonymous pages, ``RssAnon``:
  not the shared-memory pages of inputs and objects, nor the shared
  libraries' clean pages), plus its share of the objects put on its node,
  which come out of the workers' budgets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psutil
from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from .config import JobConfig
    from .topology import Topology

__all__ = [
    "PrivateMemory",
    "check_room",
    "file_memory",
    "job_memory",
    "node_memory_total",
    "private_memory",
    "worker_memory_limit",
]

MIB = 2**20


def node_memory_total() -> int:
    """Physical memory of this machine in bytes (local)."""
    return int(psutil.virtual_memory().total)


def _cgroup_limits() -> list[int]:
    """Memory limits of this process's cgroups, v1 and v2, in bytes (local)."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return []
    limits = []
    for _, controllers, rel in (e for e in entries if len(e) == 3):
        if controllers == "":  # cgroup v2
            path = os.path.join("/sys/fs/cgroup", rel.lstrip("/"), "memory.max")
        elif "memory" in controllers.split(","):  # cgroup v1
            path = os.path.join("/sys/fs/cgroup/memory", rel.lstrip("/"), "memory.limit_in_bytes")
        else:
            continue
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            limits.append(int(value))
    return limits


def _mib(env: Mapping[str, str], name: str) -> int:
    """A positive number of MiB from Slurm's variable ``name``, else 0."""
    value = env.get(name, "")
    return int(value) if value.isdigit() else 0


def job_memory(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Memory the job may use on this machine in bytes, and where that limit comes from (local).

    The lowest of: physical memory; the memory limit of this process's
    cgroup (what a batch system enforces); Slurm's ``--mem``
    (``SLURM_MEM_PER_NODE``, MiB); Slurm's ``--mem-per-cpu``
    (``SLURM_MEM_PER_CPU``, MiB) times the CPUs the job has on this node
    (``SLURM_CPUS_ON_NODE``). A value of 0 (``--mem=0``: the whole node) sets
    no limit.
    """
    env = os.environ if environ is None else environ
    limits = [(node_memory_total(), "the machine's memory")]
    limits += [(limit, "the memory limit of this process's cgroup") for limit in _cgroup_limits()]
    per_node = _mib(env, "SLURM_MEM_PER_NODE")
    if per_node:
        limits.append((per_node * MIB, f"Slurm's --mem ({per_node} MiB)"))
    per_cpu, cpus = _mib(env, "SLURM_MEM_PER_CPU"), _mib(env, "SLURM_CPUS_ON_NODE")
    if per_cpu and cpus:
        limits.append((per_cpu * cpus * MIB, f"Slurm's --mem-per-cpu ({per_cpu} MiB) x {cpus} CPUs"))
    return min(limits, key=lambda limit: limit[0])


OTHERS_GROWTH = 1.5  #: the scheduler's and client's private memory before Dask starts, times this
OTHERS_FLOOR = 100 * MIB  #: but at least this for each: they grow once Dask runs (task state, main)
PER_RANK = 8 * MIB  #: each rank's supervisor and the host's watcher, per rank
WORKER_FLOOR = 2.0  #: a worker's budget must be at least this many times what it uses before any task


def check_room(config: JobConfig, need: int, what: str) -> None:
    """Refuse ``need`` more bytes of node-shared memory on this host, before anything is allocated (local).

    The one capacity policy, for inputs placed at launch and objects put
    while the job runs: the shared-memory directory must have room for them
    and ``hpcshare.shm-headroom`` more, and the bytes must fit in the memory
    the job may use on this host (:func:`job_memory`: the machine, the
    cgroup, Slurm's ``--mem``) and in the memory the host can still give now.
    """
    from dask.utils import format_bytes

    from .errors import CapacityError
    from .shm import check_capacity

    check_capacity(config.shm_dir, need, config.shm_headroom, what)
    limit, source = job_memory()
    if need > limit:
        raise CapacityError(
            f"{what} need {format_bytes(need)} of memory on this host, more than the job may "
            f"use here: {format_bytes(limit)}, {source}. Ask the batch system for more memory "
            "per node (for example sbatch --mem), or use fewer or smaller inputs."
        )
    available = int(psutil.virtual_memory().available)
    if need > available:
        raise CapacityError(
            f"{what} need {format_bytes(need)} of memory on this host, but only "
            f"{format_bytes(available)} is available now. Free objects you no longer need "
            "(hpcshare.free), or use fewer or smaller ones."
        )


def worker_memory_limit(topo: Topology, config: JobConfig, shared: int) -> int:
    """Dask's memory limit for each worker: its private budget (collective on ``topo.host``).

    With ``hpcshare.worker.memory-limit: auto``: the job's memory on this
    host, less the host's shared inputs (``shared`` per node), less what the
    host's other processes need (the scheduler's and the client's private
    memory now, times 1.5 and at least 100 MiB each, 8 MiB a rank for the supervisors and the
    watcher, and the libraries' file pages, which the host holds once),
    divided among the host's workers. So the workers' limits, the
    shared bytes and the other processes add up to the job's memory.
    :class:`PrivateMemory` makes Dask compare the limit with private memory
    only. An explicit limit is taken as it is; 0 means no limit (Dask's
    convention). Capped at the memory Dask sees, which it would use instead,
    with a warning on every worker.

    Raises
    ------
    CapacityError
        With ``auto``, when the budget of a worker is less than twice what a
        worker uses before any task: its workers would pause at once and the
        job would wait for them forever.
    """
    from distributed.system import MEMORY_LIMIT

    is_worker = topo.role == "worker"
    # one round on the host: each rank's role, leadership, private memory and file pages now
    ranks = topo.host.allgather((is_worker, topo.is_leader, private_memory(), file_memory()))
    workers_here = sum(1 for worker, *_ in ranks if worker)
    nodes_here = sum(1 for _, leader, *_ in ranks if leader)
    others = sum(max(int(mem * OTHERS_GROWTH), OTHERS_FLOOR) for worker, _, mem, _ in ranks if not worker)
    largest_worker = max((mem for worker, _, mem, _ in ranks if worker), default=0)
    libraries = max(files for *_, files in ranks)  # the libraries' pages: the host holds them once
    if config.memory_limit == 0:
        return 0
    if config.memory_limit is not None:
        return max(min(config.memory_limit, int(MEMORY_LIMIT)), 1)
    total, source = job_memory()
    reserve = others + libraries + PER_RANK * topo.host.Get_size()
    private = (total - shared * nodes_here - reserve) // max(workers_here, 1)
    need = int(WORKER_FLOOR * largest_worker)
    if workers_here and private < need:
        from dask.utils import format_bytes

        from .errors import CapacityError

        raise CapacityError(
            f"the inputs ({format_bytes(shared * nodes_here)} on this host) and the scheduler, client, "
            f"supervisors and libraries ({format_bytes(reserve)}) leave each of the {workers_here} worker(s) on "
            f"this host {format_bytes(max(private, 0))} of the job's {format_bytes(total)} ({source}); "
            f"a worker needs at least {format_bytes(need)} (twice the {format_bytes(largest_worker)} it "
            "uses before any task). Ask for more memory per node, run fewer ranks per node, or use "
            "smaller inputs; or set a worker limit yourself (--memory-limit, hpcshare.worker.memory-limit)."
        )
    return max(min(private, int(MEMORY_LIMIT)), 1)


def private_memory(pid: int | str = "self") -> int:
    """Process ``pid``'s private memory: its resident anonymous pages, in bytes (local).

    ``RssAnon`` (``/proc/PID/status``): the heap, stacks, and the pages the
    process has copied (written library data). Not counted: ``RssShmem``
    (tmpfs files and shared anonymous mappings: the MPI windows of the
    inputs, the objects in /dev/shm, the MPI library's segments) and
    ``RssFile`` (:func:`file_memory`). Where ``RssAnon`` is missing (kernels
    before 4.5), the RSS.
    """
    anon = _status(pid, "RssAnon")
    if anon is None:
        return int(psutil.Process(None if pid == "self" else int(pid)).memory_info().rss)
    return anon


def file_memory(pid: int | str = "self") -> int:
    """Process ``pid``'s resident pages of files, ``RssFile``, in bytes; 0 where unknown (local).

    Clean pages of shared libraries and mapped files: the node holds them
    once for all its processes, and the kernel can drop them. How many of
    them a process has mapped varies from run to run by several MiB.
    """
    return _status(pid, "RssFile") or 0


def _status(pid: int | str, field: str) -> int | None:
    """One ``kB`` field of ``/proc/PID/status``, in bytes; None if it is missing."""
    key = field.encode() + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PrivateMemory(WorkerPlugin):
    """Worker plugin: Dask's memory monitor measures private memory and a share of puts.

    Replaces the worker's :meth:`SystemMonitor.get_process_memory` (the one
    place distributed samples process memory: spilling, pausing, the
    dashboard and the scheduler's "unmanaged memory" all read it). The
    objects put on the node while the job runs (``put_bytes()``, their size,
    from the job's private folder: nobody else's files count) are divided
    among the node's workers and added: they come out of the private budgets
    the limits were made from. Without ``put_bytes`` (a Dask cluster
    hpcshare did not start, whose limits know nothing of shared objects) it
    measures private memory only.
    """

    name = "hpcshare-private-memory"
    _RESCAN = 1.0  # seconds between listings of the node's put objects

    def __init__(self, put_bytes: Any = None, workers_on_node: int = 1) -> None:
        self.put_bytes, self.workers_on_node = put_bytes, max(workers_on_node, 1)
        self._puts, self._scanned = 0, -self._RESCAN

    def setup(self, worker: Any) -> None:
        self._monitor = worker.monitor
        self._monitor.get_process_memory = self.measure  # an instance attribute over the class's method

    def teardown(self, worker: Any) -> None:
        """Dask's own measure again (the plugin is removed, or the worker closes)."""
        monitor = getattr(self, "_monitor", None)
        if monitor is not None and monitor.__dict__.get("get_process_memory") == self.measure:
            del monitor.get_process_memory

    def measure(self) -> int:
        if self.put_bytes is None:
            return private_memory()
        now = time.monotonic()
        if now - self._scanned >= self._RESCAN:
            self._scanned, self._puts = now, int(self.put_bytes())
        return private_memory() + self._puts // self.workers_on_node
