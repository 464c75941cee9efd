"""``hpcshare bench --overhead``: the job's own costs, with TLS and without.

The ``hpcshare-tiny`` contender is one job, ``mpiexec -n W+2 python -m
hpcshare.bench.contenders hpcshare-tiny --npy X.npy --h5 X.h5 --tasks N
--workers W --out JSON [--no-tls] [--launched T]``: ``hpcshare.run`` on the
small launch-time input ``X.npy`` (``--no-tls``: plain TCP, as ``hpcshare job
--no-tls``). On the client it measures

- start-up: from the launch (``--launched``, the driver's wall clock just
  before it started mpiexec; by hand, this rank's own start) until ``main``
  runs with every worker connected, and the part of it after the inputs
  were placed (the job's TLS credentials, the scheduler, the workers and
  their connections);
- N tiny tasks through ``client.map`` that receive their index only
  (``none``), and N that also receive the input's handle, resolve it and read
  one element (``handle``), each kind timed from ``client.map`` until the
  client holds every result. The kinds alternate in blocks of about
  :data:`BLOCK` tasks, none, handle, handle, none, so that a change in the
  machine's load weighs on both alike; each pair of neighbouring blocks
  gives a handle-over-none ratio, whose median the target is judged on.

The tasks do nothing else: what is measured is Dask's cost per task, the
transport's (TLS or TCP) and the handle's. The driver runs :data:`JOB_ORDER`:
jobs with TLS and without, alternating in the same way, each with its share
of the tasks; :func:`combine` makes one row of each setting's jobs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import psutil

from .rows import BenchRow, need
from .workloads import write

__all__ = [
    "BLOCK",
    "JOB_ORDER",
    "KINDS",
    "combine",
    "expected_checksum",
    "run_tiny",
    "shares",
    "tiny",
    "tiny_with_handle",
]

KINDS = ("none", "handle")  #: the two kinds of tiny task
BLOCK = 2000  #: about how many tasks of one kind are submitted at once; the kinds alternate by blocks
WARM_UP = 1000  #: tasks of each kind a job runs before it measures (imports, connections, caches)
#: the jobs of one worker count, in order: TLS on (True) and off, alternating as the kinds do
JOB_ORDER = (True, False, False, True, True, False, False, True)


def tiny(i: int) -> int:
    """A task that receives its index only and returns it."""
    return i


def tiny_with_handle(h: Any, i: int) -> int:
    """A task that also receives an input handle, resolves it and reads one element (>= 0 here)."""
    return i + int(h.resolve()[0] >= 0)


def shares(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` whole shares that differ by at most one."""
    return [n * (k + 1) // parts - n * k // parts for k in range(parts)]


def expected_checksum(n: int) -> int:
    """The sum of every result of one setting's jobs: n(n-1)/2 twice and n, for each job's n tasks."""
    return sum(k * k for k in shares(n, JOB_ORDER.count(True)))


def _blocks(n: int) -> list[tuple[str, range]]:
    """The job's measured blocks in order: each kind runs every index once, none, handle, handle, none."""
    rounds = max(1, n // (2 * BLOCK))
    edges = [n * k // (2 * rounds) for k in range(2 * rounds + 1)]
    chunks = [range(a, b) for a, b in itertools.pairwise(edges)]
    order: list[tuple[str, range]] = []
    for first, second in zip(chunks[::2], chunks[1::2], strict=True):
        order += [("none", first), ("handle", first), ("handle", second), ("none", second)]
    return order


def _measure(client: Any, handle: Any, n: int) -> tuple[list[float], int]:
    """Each of :func:`_blocks`'s seconds, in order, and the sum of every result (local, on the client)."""
    seconds, checksum = [], 0
    for kind, indices in _blocks(n):
        if kind == "none":
            t = time.perf_counter()
            results = client.gather(client.map(tiny, indices, pure=False))
        else:
            handles = [handle] * len(indices)
            t = time.perf_counter()
            results = client.gather(client.map(tiny_with_handle, handles, indices, pure=False))
        seconds.append(time.perf_counter() - t)
        checksum += sum(results)
    if checksum != n * n:
        raise RuntimeError(f"the tiny tasks' results sum to {checksum}, not {n * n}: some did not run once")
    return seconds, checksum


def _figures(n: int, seconds: list[float]) -> dict[str, Any]:
    """Each kind's tasks a second, and each pair of neighbouring blocks' handle-over-none time ratio.

    Blocks come in fours, none, handle, handle, none, the two of a pair on
    the same indices: a burst of the machine's other load shows in one pair,
    not in their median.
    """
    kinds = [kind for kind, _ in _blocks(n)]
    total = {kind: sum(t for k, t in zip(kinds, seconds, strict=True) if k == kind) for kind in KINDS}
    fours = [seconds[i : i + 4] for i in range(0, len(seconds), 4)]
    return {
        "task_phase": sum(seconds),
        "handle_pairs": [ratio for a, b, c, d in fours for ratio in (b / a, c / d)],
        **{f"tiny_{kind}_per_s": n / total[kind] for kind in KINDS},
    }


def run_tiny(args: argparse.Namespace) -> None:
    """One job: start-up to a ready client, then the tiny tasks; figures to ``args.out`` (collective)."""
    import hpcshare

    launched = args.launched if args.launched is not None else psutil.Process().create_time()
    placed: list[float] = []  # on every rank: when the inputs were placed (Dask starts next)

    def main(client: Any, inputs: Any) -> None:
        startup, ready = time.time() - launched, time.perf_counter()
        h = inputs["x"]
        warm = range(min(args.tasks, WARM_UP))
        client.gather(client.map(tiny, warm, pure=False))
        client.gather(client.map(tiny_with_handle, [h] * len(warm), warm, pure=False))
        seconds, checksum = _measure(client, h, args.tasks)
        figures: dict[str, Any] = {
            "startup": startup,
            "dask_startup": ready - placed[0],
            "protocol": client.scheduler.address.split("://")[0],
            "checksum": float(checksum),
        }
        write(args.out, figures | _figures(args.tasks, seconds))

    def on_placed(stats: Any) -> None:
        placed.append(time.perf_counter())

    hpcshare.run(main, {"x": args.npy}, quiet=True, tls=args.tls, on_placed=on_placed)


def combine(jobs: Sequence[BenchRow]) -> BenchRow:
    """One setting's row from its jobs: their tasks and time added up, the median start-up (local).

    A job that did not end ``ok`` stands for them all. Each job's own
    figures stay in the row's ``runs``.
    """
    tasks = sum(j.tasks for j in jobs)
    for job in jobs:
        if job.status != "ok":
            return job.with_figures({"tasks": tasks})
    seconds = {kind: sum(j.tasks / need(getattr(j, f"tiny_{kind}_per_s")) for j in jobs) for kind in KINDS}
    return jobs[0].with_figures(
        {
            "wall": sum(need(j.wall) for j in jobs),
            "tasks": tasks,
            "startup": statistics.median(need(j.startup) for j in jobs),
            "dask_startup": statistics.median(need(j.dask_startup) for j in jobs),
            "task_phase": sum(seconds.values()),
            "checksum": sum(need(j.checksum) for j in jobs),
            "handle_pairs": [ratio for j in jobs for ratio in j.handle_pairs or []],
            **{f"tiny_{kind}_per_s": tasks / seconds[kind] for kind in KINDS},
            "runs": [
                {
                    "tasks": j.tasks,
                    "startup": j.startup,
                    "dask_startup": j.dask_startup,
                    "protocol": j.protocol,
                }
                | {f"{kind}_per_s": getattr(j, f"tiny_{kind}_per_s") for kind in KINDS}
                for j in jobs
            ],
        }
    )
