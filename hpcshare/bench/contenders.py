"""One contender of ``hpcshare bench``, run as its own program and measured from outside.

``python -m hpcshare.bench.contenders CONTENDER --npy PATH --h5 PATH --tasks T --workers W --out JSON
[--workload array|frame|tiny] [--nodes N] [--no-tls] [--launched T]``

MPI contenders (hpcshare, hpcshare-h5, hpcshare-put, scatter, submit,
memmap, memmap-cold, unidist-put, hpcshare-tiny, the mpi-transfer baseline) run under ``mpiexec
-n W+2``; the others (fork, ray, ray-put, the other baselines, and
:mod:`.local`'s ``local-*`` on a LocalCluster) run as one process that
starts its own workers. Each writes its figures as JSON to
``--out``. :mod:`.workloads` holds the workloads; :mod:`.putting` the
contenders that make their object at run time (the ``-put`` ones);
:mod:`.overhead` the job's own costs (hpcshare-tiny, ``--overhead``).
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..placement import PlacementStats

from . import overhead, putting
from .local import LOCAL_PROGRAMS
from .workloads import (
    WORKLOADS,
    hpcshare_task,
    load,
    make,
    mapping_seconds,
    memmap_task,
    moved_bytes,
    probe_task,
    resolve_figures,
    run_on_ray,
    task_figures,
    task_of,
    task_phase,
    timed_work,
    write,
)

# --- contenders under mpiexec -------------------------------------------------


def _placement_figures(stats: PlacementStats) -> dict[str, Any]:
    """What the driver reports of placement, from every rank's figures."""
    ranks = stats.ranks
    waiting = [r for r in ranks if not r.worked]
    return {
        "ready": stats.total - stats.describe,
        "placement": {
            "allocate": stats.allocate,
            "read": max(r.read for r in ranks),
            "wait": max(r.wait for r in ranks),
            "total": stats.total,
        },
        # CPU use of the ranks that only waited, as a fraction of the time they waited
        "waiting_cpu_fraction": max((r.cpu / max(r.read + r.wait, 1e-9) for r in waiting), default=0.0),
    }


def run_hpcshare(args: argparse.Namespace, source: str) -> None:
    import hpcshare

    placed: list[PlacementStats] = []  # filled on every rank before Dask starts

    def main(client: Any, inputs: Any) -> None:
        h = inputs["x"]
        results, phase, started = task_phase(
            lambda: client.gather(client.map(hpcshare_task, [h] * args.tasks, range(args.tasks), pure=False))
        )
        probes = client.gather(client.map(probe_task, [h] * (4 * args.workers), pure=False))
        figures = task_figures(results, phase, args.workers, started)
        figures.update(_placement_figures(placed[0]))
        figures.update(resolve_figures(results))
        figures.update(
            probe_task_median=float(np.median([p[1] for p in probes])),
            probe_task_first_read_median=float(np.median([p[0] for p in probes])),
            moved_bytes=moved_bytes(client),
        )
        write(args.out, figures)

    hpcshare.run(main, {"x": source}, quiet=True, on_placed=placed.append)


def dask_mpi_cluster(args: argparse.Namespace, client_code: Any) -> None:
    from dask_mpi import initialize
    from distributed import Client

    if initialize(exit=False, nthreads=1, dashboard=False, memory_limit=0):
        with Client() as client:
            client.wait_for_workers(args.workers)
            try:
                client_code(client)
            finally:
                client.shutdown()


def run_scatter(args: argparse.Namespace) -> None:
    def code(client: Any) -> None:
        data = make(args.workload, args.npy)  # the object in hand, on the client
        t = time.perf_counter()
        future = client.scatter(data, broadcast=True)
        ready = time.perf_counter() - t
        copies = len(client.who_has([future])[future.key])
        del data
        task = task_of(args.workload)
        results, phase, started = task_phase(
            lambda: client.gather(client.map(task, [future] * args.tasks, range(args.tasks), pure=False))
        )
        figures = task_figures(results, phase, args.workers, started)
        figures.update(ready=ready, moved_bytes=moved_bytes(client) + copies * os.path.getsize(args.npy))
        write(args.out, figures)

    dask_mpi_cluster(args, code)


def run_submit(args: argparse.Namespace) -> None:
    def code(client: Any) -> None:
        t = time.perf_counter()
        data = client.submit(load, args.npy)  # the seed pattern: data made in a task
        data.result()
        ready = time.perf_counter() - t
        results, phase, started = task_phase(
            lambda: client.gather(client.map(timed_work, [data] * args.tasks, range(args.tasks), pure=False))
        )
        figures = task_figures(results, phase, args.workers, started)
        figures.update(ready=ready, moved_bytes=moved_bytes(client))
        write(args.out, figures)

    dask_mpi_cluster(args, code)


def _evict(path: str) -> None:
    """Drop the file's pages from the page cache, so that the next reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_memmap(args: argparse.Namespace, cold: bool = False) -> None:
    """dask-mpi, every task maps the .npy file (``np.load(path, mmap_mode="r")``).

    The node's page cache holds the one copy that every worker maps; nothing
    is placed, so ready is the time a worker takes to map the file. With
    ``cold`` the file's pages are first dropped from the page cache: the
    tasks that touch a page first read it from the disk.
    """

    def code(client: Any) -> None:
        if cold:
            _evict(args.npy)
        ready = max(client.run(mapping_seconds, args.npy).values())  # every worker, in parallel
        results, phase, started = task_phase(
            lambda: client.gather(
                client.map(memmap_task, [args.npy] * args.tasks, range(args.tasks), pure=False)
            )
        )
        figures = task_figures(results, phase, args.workers, started)
        figures.update(ready=ready, moved_bytes=moved_bytes(client))
        write(args.out, figures)

    dask_mpi_cluster(args, code)


# --- single-process contenders --------------------------------------------------

_GLOBAL: np.ndarray | None = None


def _fork_task(i: int) -> tuple[float, float]:
    assert _GLOBAL is not None
    return timed_work(_GLOBAL, i)


def run_fork(args: argparse.Namespace) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _GLOBAL
    _GLOBAL = load(args.npy)
    t = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for f in [pool.submit(time.sleep, 0.05) for _ in range(args.workers)]:
            f.result()
        ready = time.perf_counter() - t
        results, phase, started = task_phase(lambda: list(pool.map(_fork_task, range(args.tasks))))
    figures = task_figures(results, phase, args.workers, started)
    figures.update(ready=ready, moved_bytes=0)
    write(args.out, figures)


def run_ray(args: argparse.Namespace) -> None:
    """Ray: the workload's object made in the driver, ray.put once; the driver's copy dropped before the tasks.

    The object is made once Ray runs, as Dask's contenders make theirs once
    the cluster runs: the peak counts Ray's processes beside ``create_data``'s
    temporaries.
    """

    def share(ray: Any) -> tuple[Any, float]:
        held = [make(args.workload, args.npy)]
        t = time.perf_counter()
        ref = ray.put(held.pop())
        return ref, time.perf_counter() - t

    run_on_ray(args, share)


def run_shm_copy(args: argparse.Namespace) -> None:
    """Baseline: one process copies the input, in hand, into fresh shared memory."""
    data = load(args.npy)
    fd, path = tempfile.mkstemp(prefix="hpcshare-bench-", dir="/dev/shm")
    try:
        os.ftruncate(fd, data.nbytes)
        with mmap.mmap(fd, data.nbytes) as m:
            dest = np.frombuffer(m, dtype=data.dtype)
            t = time.perf_counter()
            np.copyto(dest, data)
            ready = time.perf_counter() - t
            del dest
    finally:
        os.close(fd)
        os.unlink(path)
    write(args.out, {"ready": ready})


def run_h5_read_direct(args: argparse.Namespace) -> None:
    """Baseline: h5py read_direct of the dataset into private memory."""
    import h5py

    with h5py.File(args.h5, "r") as f:
        ds = f["x"]
        dest = np.empty(ds.shape, ds.dtype)
        t = time.perf_counter()
        ds.read_direct(dest)
        ready = time.perf_counter() - t
    write(args.out, {"ready": ready})


CONTENDERS = {
    "hpcshare": lambda a: run_hpcshare(a, a.npy),
    "hpcshare-h5": lambda a: run_hpcshare(a, f"{a.h5}:/x"),
    # the driver passes a 1 MiB input: the job's processes, imports and task code without the data
    "hpcshare-empty": lambda a: (
        run_hpcshare(a, a.npy) if a.workload == "array" else putting.run_hpcshare_put(a)
    ),
    "hpcshare-put": putting.run_hpcshare_put,
    "scatter": run_scatter,
    "submit": run_submit,
    "memmap": run_memmap,
    "memmap-cold": lambda a: run_memmap(a, cold=True),
    "unidist-put": putting.run_unidist_put,
    "fork": run_fork,
    "ray": run_ray,
    "ray-put": putting.run_ray_put,
    "shm-copy": run_shm_copy,
    "h5-read-direct": run_h5_read_direct,
    "mpi-transfer": putting.run_mpi_transfer,
    "hpcshare-tiny": overhead.run_tiny,
    **LOCAL_PROGRAMS,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcshare.bench.contenders")
    p.add_argument("contender", choices=sorted(CONTENDERS))
    p.add_argument("--npy", required=True)
    p.add_argument("--h5", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workload", choices=(*WORKLOADS, "tiny"), default="array", help="tiny: hpcshare-tiny's")
    p.add_argument("--nodes", type=int, default=1, help="hpcshare-put: emulated nodes")
    p.add_argument("--no-tls", dest="tls", action="store_false", help="hpcshare-tiny: plain TCP, not TLS")
    p.add_argument(
        "--launched",
        type=float,
        help="hpcshare-tiny: wall-clock time of the launch (default: the rank's start)",
    )
    args = p.parse_args(argv)
    CONTENDERS[args.contender](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
