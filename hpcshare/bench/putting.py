"""The contenders that make their object while the job runs (the seed pattern).

``data = client.submit(create_data)`` then T tasks over ``data``: hpcshare
through ``hpcshare.submit`` (held once per node), Ray through a remote task
whose result goes to its object store, unidist's MPI backend with its
per-host shared object store. Their time to ready leaves out making the
object (:func:`.workloads.make_timed` notes it), so that it is the sharing alone.
Also the ``mpi-transfer`` baseline: the cost of one MPI transfer between
two nodes, the least a put to another node must pay.
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time
from typing import Any

import numpy as np

from .workloads import (
    hpcshare_task,
    load,
    made_seconds,
    make_timed,
    moved_bytes,
    resolve_figures,
    run_on_ray,
    task_figures,
    task_of,
    task_phase,
    write,
)

__all__ = ["run_hpcshare_put", "run_mpi_transfer", "run_ray_put", "run_unidist_put"]


def run_hpcshare_put(args: argparse.Namespace) -> None:
    """``hpcshare.submit(client, create_data)`` on ``args.nodes`` emulated nodes."""
    import hpcshare

    def main(client: Any, inputs: Any) -> None:
        made = f"{args.out}.made"
        t = time.perf_counter()
        data = hpcshare.submit(client, make_timed, args.workload, args.npy, made)
        data.result()  # the handle: every node holds the object
        ready = time.perf_counter() - t - made_seconds(made)
        each = {"workload": args.workload, "pure": False}
        results, phase, started = task_phase(
            lambda: client.gather(client.map(hpcshare_task, [data] * args.tasks, range(args.tasks), **each))
        )
        figures = task_figures(results, phase, args.workers, started)
        figures.update(resolve_figures(results), ready=ready, moved_bytes=moved_bytes(client))
        write(args.out, figures)

    ranks = args.workers + 2
    hpcshare.run(main, {}, quiet=True, ranks_per_node=-(-ranks // args.nodes))


def run_ray_put(args: argparse.Namespace) -> None:
    """The seed pattern in Ray: made in a remote task, held in Ray's object store."""
    made = f"{args.out}.made"

    def share(ray: Any) -> tuple[Any, float]:
        t = time.perf_counter()
        ref = ray.remote(make_timed).remote(args.workload, args.npy, made)
        ray.wait([ref], fetch_local=False)
        return ref, time.perf_counter() - t - made_seconds(made)

    run_on_ray(args, share)


def run_unidist_put(args: argparse.Namespace) -> None:
    """The seed pattern under unidist's MPI backend (mpiexec -n W+2: root, monitor, W workers)."""
    import unidist

    unidist.init()  # rank 0 goes on here; the other ranks serve unidist until it shuts down
    made = f"{args.out}.made"
    make, task = unidist.remote(make_timed), unidist.remote(task_of(args.workload))
    t = time.perf_counter()
    ref = make.remote(args.workload, args.npy, made)
    unidist.wait([ref])
    ready = time.perf_counter() - t - made_seconds(made)
    results, phase, started = task_phase(
        lambda: unidist.get([task.remote(ref, i) for i in range(args.tasks)])
    )
    figures = task_figures(results, phase, args.workers, started)
    figures.update(ready=ready)
    write(args.out, figures)


def run_mpi_transfer(args: argparse.Namespace) -> None:
    """Baseline: one MPI transfer of the input from rank 0 into fresh shared memory on rank 1."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    piece = 1 << 28
    if comm.rank == 0:
        data = load(args.npy).reshape(-1).view(np.uint8)
        comm.send(data.nbytes, dest=1)
        comm.recv(source=1)  # rank 1 has its memory
        t = time.perf_counter()
        for a in range(0, data.nbytes, piece):
            comm.Send([data[a : a + piece], MPI.BYTE], dest=1)
        comm.recv(source=1)
        write(args.out, {"ready": time.perf_counter() - t})
    elif comm.rank == 1:
        nbytes = comm.recv(source=0)
        fd, path = tempfile.mkstemp(prefix="hpcshare-bench-", dir="/dev/shm")
        try:
            os.ftruncate(fd, nbytes)
            with mmap.mmap(fd, nbytes) as m:
                dest = np.frombuffer(m, np.uint8)
                comm.send("ready", dest=0)
                for a in range(0, nbytes, piece):
                    comm.Recv([dest[a : a + piece], MPI.BYTE], source=0)
                del dest
                comm.send("done", dest=0)
        finally:
            os.close(fd)
            os.unlink(path)
