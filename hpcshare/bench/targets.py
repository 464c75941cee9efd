"""The project's benchmark targets, judged from a run's rows.

The targets are stated for inputs of 1 GiB and more; the memory ones at
W = 4 workers (``--cluster local``'s all at W = 4); ``--overhead``'s handle target for 100,000 tiny tasks and
more (docs/benchmarks.md says why each figure is what it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from dask.utils import format_bytes

from .names import EMPTY
from .rows import BenchRow, need

__all__ = ["Target", "checksums_agree", "targets"]

MIN_SIZE = 2**30  # targets are judged for inputs of at least this many bytes
MEMORY_WORKERS = 4  # memory targets are judged at this worker count
JUDGED_TINY_TASKS = 100_000  # the handle target is judged at this many tiny tasks of each kind or more
HANDLE_COST = 1.05  # tiny tasks that receive a handle: at most this many times those that receive none


@dataclasses.dataclass(frozen=True)
class Target:
    what: str  #: the target, with the size and worker count it was judged at
    met: bool
    figure: str  #: the measured figures behind the verdict


def checksums_agree(rows: Sequence[BenchRow]) -> bool:
    """Whether every contender that ran produced the same checksum for the same size and task count."""
    runs: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.status == "ok" and r.checksum is not None and r.contender not in EMPTY:
            runs.setdefault((r.workload, r.size), []).append(r.checksum)
    return all(np.allclose(v, v[0], rtol=1e-12, atol=0) for v in runs.values())


def find(
    rows: Sequence[BenchRow],
    contender: str,
    size: int | None = None,
    workers: int | None = None,
    workload: str = "array",
    nodes: int = 1,
    tls: bool | None = None,
) -> BenchRow | None:
    """The first ``ok`` row of ``contender`` (at ``size``, ``workers`` and ``tls`` when given)."""
    for r in rows:
        if (
            r.contender == contender
            and r.status == "ok"
            and (size is None or r.size == size)
            and (workers is None or r.workers == workers)
            and r.workload == workload
            and r.nodes == nodes
            and (tls is None or r.tls is tls)
        ):
            return r
    return None


def _bytes_at_most(what: str, ours: float, limit: float) -> Target:
    """A memory target: ``ours`` at most ``limit`` bytes."""
    return Target(what, ours <= limit, f"{format_bytes(int(ours))} vs {format_bytes(int(limit))}")


def _within_empty(rows: Sequence[BenchRow], r: BenchRow, empty: str, what: str) -> Iterator[Target]:
    """``r``'s memory while tasks run at most 1.15 x (S + the peak of the ``empty`` run at its W and workload)."""
    e = find(rows, empty, workers=r.workers, workload=r.workload)
    if r.steady_memory is not None and e is not None:
        yield _bytes_at_most(what, r.steady_memory, 1.15 * (r.size + need(e.node_memory)))


def _times_below(what: str, theirs: int, ours: int) -> Target:
    """A memory target: ``theirs`` at least 3.5 times ``ours``."""
    ratio = theirs / ours
    return Target(what, ratio >= 3.5, f"{format_bytes(theirs)} vs {format_bytes(ours)} ({ratio:.2f}x)")


def _ready_ratio(what: str, ours: BenchRow | None, base: BenchRow | None, limit: float) -> Iterator[Target]:
    if ours and base:
        a, b = need(ours.ready, "ready"), need(base.ready, "ready")
        yield Target(what, a / b <= limit, f"{a:.3f} s vs {b:.3f} s ({a / b:.2f}x)")


def _memory(rows: Sequence[BenchRow], r: BenchRow, tag: str) -> Iterator[Target]:
    mem = need(r.node_memory, "node memory")
    empty = find(rows, "hpcshare-empty", workers=r.workers)
    if empty and r.workers == MEMORY_WORKERS:
        limit = 1.15 * (r.size + need(empty.node_memory))
        yield _bytes_at_most(f"hpcshare node memory <= 1.15 x (S + empty job), {tag}", mem, limit)
    for other in ("scatter", "submit"):
        o = find(rows, other, r.size, r.workers)
        if o and r.workers == MEMORY_WORKERS:
            ratio = need(o.node_memory) / mem
            yield Target(f"{other} uses >= 3.5x hpcshare's node memory, {tag}", ratio >= 3.5, f"{ratio:.2f}x")
    ray = find(rows, "ray", r.size, r.workers)
    if ray:
        theirs = need(ray.node_memory)
        yield _bytes_at_most(f"hpcshare node memory <= Ray's, {tag}", mem, theirs)


def _ready(rows: Sequence[BenchRow], r: BenchRow, tag: str) -> Iterator[Target]:
    yield from _ready_ratio(
        f"time to ready <= 1.3x one-process copy into fresh shared memory, {tag}",
        r,
        find(rows, "shm-copy", r.size),
        1.3,
    )
    yield from _ready_ratio(
        f"time to ready from HDF5 <= 1.2x read_direct into private memory, {tag}",
        find(rows, "hpcshare-h5", r.size, r.workers),
        find(rows, "h5-read-direct", r.size),
        1.2,
    )
    scatter = find(rows, "scatter", r.size, r.workers)
    if scatter and r.workers == MEMORY_WORKERS:
        ratio = need(scatter.ready) / need(r.ready)
        yield Target(
            f"time to ready >= 2x faster than scatter(broadcast=True), {tag}", ratio >= 2, f"{ratio:.1f}x"
        )


def _costs(r: BenchRow, tag: str) -> Iterator[Target]:
    median, p99 = need(r.resolve_us_median), need(r.resolve_us_p99)
    yield Target(
        f"handle resolve median <= 20 us, {tag}", median <= 20, f"{median:.2f} us (p99 {p99:.2f} us)"
    )
    waiting = need(r.waiting_cpu_fraction)
    yield Target(
        f"waiting ranks use < 5% of a core during placement, {tag}", waiting < 0.05, f"{100 * waiting:.1f}%"
    )


def _flat_task_time(rows: Sequence[BenchRow]) -> Iterator[Target]:
    for w in sorted({r.workers for r in rows}):
        probes = sorted(
            (r.size, need(r.probe_task_median), need(r.probe_task_first_read_median))
            for r in rows
            if r.contender == "hpcshare" and r.status == "ok" and r.workers == w
        )
        if len(probes) > 1:
            (s0, small, small_cold), (s1, large, large_cold) = probes[0], probes[-1]
            yield Target(
                f"task time flat in S (resolve + read 1 MiB, {format_bytes(s1)} over "
                f"{format_bytes(s0)} <= 1.1), W={w}",
                large / small <= 1.1,
                f"{large * 1e3:.3f} ms vs {small * 1e3:.3f} ms ({large / small:.2f}x); first read from "
                f"memory, not cache: {large_cold * 1e3:.3f} ms vs {small_cold * 1e3:.3f} ms",
            )


def _put_memory(rows: Sequence[BenchRow], r: BenchRow, tag: str) -> Iterator[Target]:
    """hpcshare-put's steady-state memory against the empty job and the others', its peak against unidist's."""
    if r.steady_memory is None:  # a task phase shorter than the sampling interval: nothing to judge
        return
    mem = r.steady_memory
    yield from _within_empty(
        rows,
        r,
        "hpcshare-empty",
        f"hpcshare-put node memory while tasks run <= 1.15 x (S + empty job), {tag}",
    )
    for other in ("submit", "scatter"):
        o = find(rows, other, r.size, r.workers, r.workload)
        if o and o.steady_memory:
            what = f"{other} uses >= 3.5x hpcshare-put's node memory while tasks run, {tag}"
            yield _times_below(what, o.steady_memory, mem)
    ray = find(rows, "ray-put", r.size, r.workers, r.workload)
    if ray and ray.steady_memory:
        yield _bytes_at_most(
            f"hpcshare-put node memory while tasks run <= Ray's (ray-put), {tag}", mem, ray.steady_memory
        )
    unidist = find(rows, "unidist-put", r.size, r.workers, r.workload)
    if unidist:
        ours, theirs = need(r.node_memory), need(unidist.node_memory)
        yield _bytes_at_most(
            f"hpcshare-put peak node memory (transient copies included) <= unidist-put's, {tag}", ours, theirs
        )


def _put_ready(rows: Sequence[BenchRow], r: BenchRow, tag: str) -> Iterator[Target]:
    """Time to ready against one copy into fresh shared memory plus one MPI transfer per other node."""
    copy = find(rows, "shm-copy", r.size)
    transfer = find(rows, "mpi-transfer", r.size) if r.nodes > 1 else None
    if copy is None or (r.nodes > 1 and transfer is None):
        return
    base = need(copy.ready) + (r.nodes - 1) * (need(transfer.ready) if transfer else 0.0)
    ours = need(r.ready)
    what = "one copy into fresh shared memory" + (f" + {r.nodes - 1} MPI transfer(s)" if r.nodes > 1 else "")
    yield Target(
        f"hpcshare-put time to ready <= 1.3x {what}, {tag}",
        ours <= 1.3 * base,
        f"{ours:.3f} s vs {base:.3f} s ({ours / base:.2f}x)",
    )


def _put_costs(r: BenchRow, tag: str) -> Iterator[Target]:
    if r.nodes > 1:
        moved = need(r.moved_bytes, "moved bytes")
        yield Target(
            f"hpcshare-put: workers move < 1 MiB between them, {tag}",
            moved < 2**20,
            format_bytes(int(moved)),
        )
    if r.workload == "frame":
        median = need(r.resolve_us_median)
        yield Target(
            f"resolving the shared DataFrame takes a median <= 100 us, {tag}",
            median <= 100,
            f"{median:.1f} us (p99 {need(r.resolve_us_p99):.1f} us)",
        )


def _local(rows: Sequence[BenchRow], r: BenchRow, tag: str) -> Iterator[Target]:
    """``--cluster local``: memory while tasks run against the empty cluster and the seed pattern,
    the peak against Ray's, time to ready against one copy into fresh shared memory."""
    mem = r.steady_memory
    yield from _within_empty(
        rows, r, "local-empty", f"hpcshare node memory while tasks run <= 1.15 x (S + empty cluster), {tag}"
    )
    submit = find(rows, "local-submit", r.size, r.workers, r.workload)
    if mem is not None and submit is not None and submit.steady_memory is not None:
        what = f"client.submit uses >= 3.5x hpcshare's node memory while tasks run, {tag}"
        yield _times_below(what, submit.steady_memory, mem)
    ray = find(rows, "ray", r.size, r.workers, r.workload)
    if ray is not None:
        ours, theirs = need(r.node_memory), need(ray.node_memory)
        yield _bytes_at_most(f"hpcshare peak node memory <= Ray's (ray.put), {tag}", ours, theirs)
    yield from _ready_ratio(
        f"hpcshare time to ready <= 1.3x one copy into fresh shared memory, {tag}",
        r,
        find(rows, "shm-copy", r.size, r.workers, r.workload),  # the copy measured just before
        1.3,
    )


def _flat_frame_resolve(rows: Sequence[BenchRow]) -> Iterator[Target]:
    """Resolving a frame costs the same at every S: no copy on resolve."""
    for w in sorted({r.workers for r in rows}):
        medians = sorted(
            (r.size, need(r.resolve_us_median))
            for r in rows
            if r.contender == "hpcshare-put"
            and r.status == "ok"
            and r.workload == "frame"
            and r.workers == w
            and r.nodes == 1
        )
        if len(medians) > 1 and medians[-1][0] >= MIN_SIZE:
            (s0, small), (s1, large) = medians[0], medians[-1]
            yield Target(
                f"DataFrame resolve flat in S ({format_bytes(s1)} over {format_bytes(s0)} <= 1.5), W={w}",
                large <= 1.5 * small,
                f"{large:.1f} us vs {small:.1f} us ({large / small:.2f}x)",
            )


def _handle_cost(r: BenchRow) -> Iterator[Target]:
    """``--overhead``: tiny tasks that receive a handle take at most 5% longer than those that receive none.

    Judged on the median over pairs of neighbouring blocks, which a burst of
    other load on the machine moves less than the totals.
    """
    none, handle, median = r.per_task_us("none"), r.per_task_us("handle"), r.handle_ratio
    yield Target(
        f"tiny tasks that receive a handle within 5% of those that receive none, TLS on, "
        f"W={r.workers}, {r.tasks} tasks of each",
        median <= HANDLE_COST,
        f"median {median:.3f}x over {len(r.handle_pairs or [])} pairs of blocks; in total "
        f"{handle:.1f} us vs {none:.1f} us a task ({handle / none:.3f}x)",
    )


def targets(rows: Sequence[BenchRow]) -> list[Target]:
    """The targets these rows can judge, in the order docs/benchmarks.md lists them."""
    out: list[Target] = []
    for r in rows:
        if r.status == "ok" and r.contender == "hpcshare-tiny" and r.tls and r.tasks >= JUDGED_TINY_TASKS:
            out += _handle_cost(r)
        if r.status != "ok" or r.size < MIN_SIZE:
            continue
        tag = f"S={format_bytes(r.size)}, W={r.workers}"
        if r.contender == "hpcshare":
            out += [*_memory(rows, r, tag), *_ready(rows, r, tag), *_costs(r, tag)]
        elif r.contender == "hpcshare-put":
            tag += f", {r.workload}, {r.nodes} node{'s' if r.nodes > 1 else ''}"
            if r.nodes == 1 and r.workers == MEMORY_WORKERS:
                out += _put_memory(rows, r, tag)
            out += [*_put_ready(rows, r, tag), *_put_costs(r, tag)]
        elif r.contender == "local-hpcshare" and r.workers == MEMORY_WORKERS:
            out += _local(rows, r, f"{tag}, {r.workload}, LocalCluster")
    out += _flat_task_time(rows)
    out += _flat_frame_resolve(rows)
    return out
