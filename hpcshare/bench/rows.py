"""One benchmark run's row: what ran, how it ended, and the figures measured."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["BenchRow", "need"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One contender at one input size and worker count (and TLS setting, for hpcshare-tiny).

    The driver fills ``status`` to ``note``; the contender's program writes the
    figures after that (each contender the ones that apply to it, the others
    stay None and are left out of bench.json).
    """

    contender: str
    size: int  #: input bytes
    workers: int
    tasks: int
    workload: str = "array"  #: "array" or "frame" (see :mod:`.workloads`), "tiny" for hpcshare-tiny
    nodes: int = 1  #: emulated nodes (hpcshare-put); 1 for every other contender
    tls: bool | None = None  #: hpcshare-tiny: TLS on (the job's default) or off (``--no-tls``)
    status: str = "pending"  #: ok, failed or skipped
    note: str = ""  #: why it failed or was skipped
    # measured from outside by the driver
    wall: float | None = None  #: seconds from start to exit, including start-up
    node_memory: int | None = None  #: peak of the summed PSS of the run's processes, bytes
    steady_memory: int | None = None  #: the same, its peak while the tasks ran (transient copies done)
    processes: int | None = None  #: processes at that peak
    # written by the contender
    ready: float | None = None  #: seconds until every worker could read the input
    checksum: float | None = None  #: sum of the tasks' results; must agree across contenders
    task_phase: float | None = None  #: seconds for all tasks
    task_compute_median: float | None = None  #: median seconds one task computed
    task_compute_max: float | None = None  #: the slowest task's seconds (a first touch of the input)
    per_task_overhead: float | None = None  #: worker seconds per task not spent computing
    moved_bytes: int | None = None  #: bytes Dask moved between processes
    task_window: list[float] | None = None  #: wall-clock start and end of the task phase
    placement: dict[str, float] | None = None  #: hpcshare: allocate, read, wait, total seconds
    waiting_cpu_fraction: float | None = None  #: hpcshare: CPU use of ranks that only waited
    resolve_us_median: float | None = None  #: hpcshare: handle.resolve() microseconds
    resolve_us_p99: float | None = None
    probe_task_median: float | None = None  #: hpcshare: resolve + read 1 MiB, cached, seconds
    probe_task_first_read_median: float | None = None  #: the same, first read, seconds
    # written by hpcshare-tiny (``hpcshare bench --overhead``)
    startup: float | None = None  #: seconds from the launch until the client is ready
    dask_startup: float | None = None  #: the part of it from the inputs placed: Dask and TLS
    tiny_none_per_s: float | None = None  #: tiny tasks a second, each receiving its index only
    tiny_handle_per_s: float | None = None  #: the same, each also receiving a handle it resolves
    handle_pairs: list[float] | None = None  #: handle-over-none time of each pair of neighbouring blocks
    protocol: str | None = None  #: the scheme of the scheduler's address: tls or tcp
    runs: list[dict[str, Any]] | None = None  #: each job's own figures (the row's: totals, medians)

    @property
    def label(self) -> str:
        """The contender, with its workload and node count where they are not the default."""
        frame = " frame" if self.workload == "frame" else ""
        nodes = f" {self.nodes}n" if self.nodes > 1 else ""
        tls = " no-tls" if self.tls is False else ""
        return f"{self.contender}{frame}{nodes}{tls}"

    def per_task_us(self, kind: str) -> float:
        """Microseconds a tiny task of ``kind`` ("none" or "handle") took, the cluster's 1 / throughput."""
        rate = need(getattr(self, f"tiny_{kind}_per_s"), f"{kind} tasks a second")
        return 1e6 / rate

    @property
    def handle_ratio(self) -> float:
        """The median of :attr:`handle_pairs`: what a handle costs a tiny task, as a ratio."""
        return statistics.median(need(self.handle_pairs, "handle-over-none ratios"))

    def ended(self, status: str, note: str = "", **measured: Any) -> BenchRow:
        """This row with its outcome and the driver's figures."""
        return dataclasses.replace(self, status=status, note=note, **measured)

    def with_figures(self, figures: Mapping[str, Any]) -> BenchRow:
        """This row with the figures a contender wrote (unknown names raise TypeError)."""
        return dataclasses.replace(self, **figures)

    def to_json(self) -> dict[str, Any]:
        """The row as bench.json stores it: figures that were not measured are left out."""
        return {
            k: v for k, v in dataclasses.asdict(self).items() if v is not None and not (k == "note" and not v)
        }


def need(value: T | None, what: str = "figure") -> T:
    """``value``, which an ``ok`` row of this contender always has (raises if it is missing)."""
    if value is None:
        raise ValueError(f"the benchmark row has no {what}")
    return value
