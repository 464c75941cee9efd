"""The benchmark's workloads and the pieces every contender program shares.

Two workloads; every contender of one workload must agree on its checksum
(the sum of the tasks' results):

- ``array``: T tasks, task i returning ``(i + 1) * dot(x, x)`` over the
  whole input x (a float64 array of S bytes);
- ``frame``: T tasks, each a groupby-sum over every row of a pandas
  DataFrame of S bytes (an int64 key with 1024 groups and a float64 value,
  both taken from the input file), task i returning ``(i + 1)`` times a
  weighted total of the group sums.

Both are CPU-bound and read the whole object, so every worker runs several
tasks and none can avoid holding the data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESOLVES_PER_TASK = 200
FRAME_GROUPS = 1024
FRAME_CHUNK_ROWS = 1 << 20  # the groupby runs over slices of this many rows: small temporaries
WORKLOADS = ("array", "frame")


def work(x: np.ndarray, i: int) -> float:
    """The ``array`` task: read the whole input once (CPU-bound dot product)."""
    flat = x.reshape(-1)
    return (i + 1) * float(np.dot(flat, flat))


def frame_work(df: Any, i: int) -> float:
    """The ``frame`` task: a groupby-sum over every row, slice by slice (CPU-bound)."""
    sums = np.zeros(FRAME_GROUPS)
    for a in range(0, len(df), FRAME_CHUNK_ROWS):
        part = df.iloc[a : a + FRAME_CHUNK_ROWS].groupby("k", sort=True)["v"].sum()
        sums[part.index.to_numpy()] += part.to_numpy()
    return (i + 1) * float(np.dot(sums, np.arange(1, FRAME_GROUPS + 1)))


def timed_work(x: np.ndarray, i: int) -> tuple[float, float]:
    t = time.perf_counter()
    value = work(x, i)
    return value, time.perf_counter() - t


def timed_frame_work(df: Any, i: int) -> tuple[float, float]:
    t = time.perf_counter()
    value = frame_work(df, i)
    return value, time.perf_counter() - t


def task_of(workload: str) -> Callable[[Any, int], tuple[float, float]]:
    """The timed task of a workload: ``(object, i) -> (value, seconds)``."""
    return timed_frame_work if workload == "frame" else timed_work


def load(path: str) -> np.ndarray:
    return np.load(path)


def mapping_seconds(path: str) -> float:
    """How long mapping the .npy file read-only takes here: the ``memmap`` contender's time to ready."""
    t = time.perf_counter()
    np.load(path, mmap_mode="r")
    return time.perf_counter() - t


def memmap_task(path: str, i: int) -> tuple[float, float]:
    """The ``memmap`` contender's task: ``np.load(path, mmap_mode="r")``, then the ``array`` task over it.

    Its seconds include the mapping and the page faults of the first touch:
    the pages come from the page cache (or the disk, if it does not hold them).
    """
    t = time.perf_counter()
    value = work(np.load(path, mmap_mode="r"), i)
    return value, time.perf_counter() - t


def make_frame(npy: str) -> Any:
    """The ``frame`` workload's DataFrame, as many bytes as the input file (16 bytes a row)."""
    import pandas as pd

    x = np.load(npy, mmap_mode="r")
    rows = max(x.size // 2, 1)
    key = (np.asarray(x[-rows:]) * FRAME_GROUPS).astype(np.int64)
    return pd.DataFrame({"k": key, "v": np.array(x[:rows])})


def make(workload: str, npy: str) -> Any:
    """The workload's object, made from the input file."""
    return make_frame(npy) if workload == "frame" else load(npy)


def make_timed(workload: str, npy: str, made: str) -> Any:
    """What a ``-put`` contender runs in a task: :func:`make`, noting in the file ``made`` how long it took.

    The task runs in another process; reading that file afterwards
    (:func:`made_seconds`) lets the contender's time to ready be the sharing alone.
    """
    t = time.perf_counter()
    obj = make(workload, npy)
    Path(made).write_text(repr(time.perf_counter() - t))
    return obj


def made_seconds(made: str) -> float:
    return float(Path(made).read_text())


def hpcshare_task(h: Any, i: int, workload: str = "array") -> tuple[float, float, list[int]]:
    """hpcshare's task: resolve the handle (timed), then the workload's task."""
    resolves = []
    for _ in range(RESOLVES_PER_TASK):
        t = time.perf_counter_ns()
        h.resolve()
        resolves.append(time.perf_counter_ns() - t)
    value, seconds = task_of(workload)(h.resolve(), i)
    return value, seconds, resolves


def resolve_figures(results: list[tuple[float, float, list[int]]]) -> dict[str, float]:
    resolves = np.concatenate([r[2] for r in results]) / 1e3  # us
    return {
        "resolve_us_median": float(np.median(resolves)),
        "resolve_us_p99": float(np.percentile(resolves, 99)),
    }


def probe_task(h: Any) -> tuple[float, float]:
    """A task that resolves and reads a fixed 1 MiB: its time should not grow with the input.

    Returns the time of resolve + a first read, and the fastest of 20 resolves
    + reads of the same bytes once they are in the CPU's cache. The first depends on
    where those bytes were (after tasks streamed gigabytes through the
    cache, they come from memory); the second is hpcshare's own cost.
    """
    times = []
    for _ in range(21):  # the first, then the fastest of 20: a 2-core machine's scheduler adds noise
        t = time.perf_counter()
        flat = h.resolve().reshape(-1)
        float(flat[: (1 << 20) // flat.itemsize].sum())
        times.append(time.perf_counter() - t)
    return times[0], min(times[1:])


def write(out: str, figures: dict[str, Any]) -> None:
    with open(out, "w") as f:
        json.dump(figures, f)


def task_phase(run_tasks: Callable[[], list[Any]]) -> tuple[list[Any], float, float]:
    """Run the task phase: the tasks' results, its seconds, and when it began (wall clock)."""
    started, t = time.time(), time.perf_counter()
    results = run_tasks()
    return results, time.perf_counter() - t, started


def task_figures(
    results: list[Any], phase: float, workers: int, started: float | None = None
) -> dict[str, Any]:
    """Checksum and task-phase figures from the tasks' ``(value, seconds, ...)`` results.

    ``started`` (wall-clock time the task phase began) gives the driver the
    window in which it takes the steady-state node memory.
    """
    values, seconds = [r[0] for r in results], [r[1] for r in results]
    figures = {
        "checksum": float(sum(values)),
        "task_phase": phase,
        "task_compute_median": float(np.median(seconds)),
        "task_compute_max": float(max(seconds)),
        # wall time the workers had, less the time tasks computed, per task
        "per_task_overhead": max(phase * workers - sum(seconds), 0.0) / len(values),
    }
    if started is not None:
        figures["task_window"] = [started, time.time()]
    return figures


def moved_bytes(client: Any) -> int:
    """Bytes the Dask workers sent one another so far."""
    return int(sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values()))


def ray_init(workers: int) -> Any:
    """Ray on this machine with ``workers`` CPUs, its workers up."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.get([ray.remote(lambda: 0).remote() for _ in range(workers)])
    return ray


def run_on_ray(args: Any, share: Callable[[Any], tuple[Any, float]]) -> None:
    """T tasks of ``args.workload`` on Ray over the object ``share(ray)`` places in Ray's store.

    ``share`` returns the object's reference and its time to ready; the
    figures go to ``args.out``.
    """
    ray = ray_init(args.workers)
    try:
        task = ray.remote(task_of(args.workload))
        ref, ready = share(ray)
        results, phase, started = task_phase(
            lambda: ray.get([task.remote(ref, i) for i in range(args.tasks)])
        )
    finally:
        ray.shutdown()
    figures = task_figures(results, phase, args.workers, started)
    figures.update(ready=ready)
    write(args.out, figures)
