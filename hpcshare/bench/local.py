"""``hpcshare bench --cluster local``: the seed pattern on a LocalCluster that hpcshare did not start.

Each contender is one program (``python -m hpcshare.bench.contenders NAME
...``, no mpiexec) that starts ``Client(n_workers=W, threads_per_worker=1)``
(a LocalCluster of W worker processes under nannies, the scheduler in the
program; no dashboard), makes the object with ``create_data`` (the
workload's :func:`.workloads.make`), runs T tasks over it and writes its
figures:

- ``local-hpcshare``: ``data = hpcshare.submit(client, create_data)``: the
  worker that made it puts it into its group's shared memory, tasks get the
  handle (:mod:`hpcshare.anywhere`; its plugins are registered by this first
  use, which the time to ready includes);
- ``local-empty``: the same with the 1 MiB input: the cluster's processes
  and imports without the data;
- ``local-submit``: ``data = client.submit(create_data)``: every worker
  fetches its own copy when its first task needs it;
- ``local-scatter``: ``client.scatter(create_data(), broadcast=True)`` from
  the program, whose own object is dropped before the tasks.

Ray (``ray``: ``ray.put(create_data())`` in the driver, W Ray workers) and
the ``shm-copy`` baseline are the launcher benchmark's programs. Time to
ready leaves out making the object (:func:`.workloads.make_timed` notes it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from .workloads import (
    hpcshare_task,
    made_seconds,
    make,
    make_timed,
    moved_bytes,
    resolve_figures,
    task_figures,
    task_of,
    task_phase,
    write,
)

__all__ = ["LOCAL_PROGRAMS", "local_cluster"]


def local_cluster(workers: int) -> Any:
    """The seed's ``Client(n_workers=W, threads_per_worker=1)``: worker processes under nannies (local).

    No dashboard: other programs on the machine may hold its port, and
    bokeh is not a dependency.
    """
    from distributed import Client

    client = Client(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    client.wait_for_workers(workers)
    return client


def _hpcshare(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    import hpcshare

    made = f"{args.out}.made"
    t = time.perf_counter()
    data = hpcshare.submit(client, make_timed, args.workload, args.npy, made)
    data.result()  # the handle: the maker's group holds the object
    ready = time.perf_counter() - t - made_seconds(made)
    each = {"workload": args.workload, "pure": False}
    results, phase, started = task_phase(
        lambda: client.gather(client.map(hpcshare_task, [data] * args.tasks, range(args.tasks), **each))
    )
    figures = task_figures(results, phase, args.workers, started)
    figures.update(resolve_figures(results), ready=ready)
    return figures


def _submit(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    """The seed pattern as it is: no time to ready, the copies move while the first tasks wait."""
    from distributed import wait

    data = client.submit(make_timed, args.workload, args.npy, f"{args.out}.made", pure=False)
    wait(data)
    task = task_of(args.workload)
    results, phase, started = task_phase(
        lambda: client.gather(client.map(task, [data] * args.tasks, range(args.tasks), pure=False))
    )
    return task_figures(results, phase, args.workers, started)


def _scatter(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    held = [make(args.workload, args.npy)]  # the object in hand, in the client's program
    t = time.perf_counter()
    future = client.scatter(held[0], broadcast=True)
    ready = time.perf_counter() - t
    held.clear()
    task = task_of(args.workload)
    results, phase, started = task_phase(
        lambda: client.gather(client.map(task, [future] * args.tasks, range(args.tasks), pure=False))
    )
    figures = task_figures(results, phase, args.workers, started)
    figures.update(ready=ready)
    return figures


def _on_local_cluster(code: Callable[[argparse.Namespace, Any], dict[str, Any]]) -> Callable[..., None]:
    def run(args: argparse.Namespace) -> None:
        with local_cluster(args.workers) as client:
            figures = code(args, client)
            figures.update(moved_bytes=moved_bytes(client))
            client.shutdown()
        write(args.out, figures)

    return run


#: the programs of this mode, by contender name (:mod:`.contenders` runs them)
LOCAL_PROGRAMS: dict[str, Callable[[argparse.Namespace], None]] = {
    "local-hpcshare": _on_local_cluster(_hpcshare),
    "local-empty": _on_local_cluster(_hpcshare),  # the driver passes the 1 MiB input
    "local-submit": _on_local_cluster(_submit),
    "local-scatter": _on_local_cluster(_scatter),
}
