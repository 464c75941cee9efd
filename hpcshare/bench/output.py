"""What ``hpcshare bench`` writes: bench.json, the table (bench.txt), the plot (bench.png).

With ``--overhead``, bench.txt holds the start-up table (against plain
dask-mpi, :mod:`.startup`), the overhead table and what TLS and handles
cost (:func:`overhead_costs`); there is no plot. ``--startup``: the
start-up table alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

from .names import EMPTY
from .rows import BenchRow, need
from .startup import Startup, format_startup
from .targets import Target, find

__all__ = [
    "BenchResult",
    "Cost",
    "format_overhead_table",
    "format_table",
    "line",
    "overhead_costs",
    "report_text",
    "write_plot",
    "write_results",
]

#: contenders that are not a way of running the workload, only a yardstick
BASELINES = ("shm-copy", "h5-read-direct", "mpi-transfer")
TINY = "hpcshare-tiny"  #: ``--overhead``'s contender, which has a table of its own


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one thing costs: a figure with it against the same figure without it."""

    what: str
    unit: str  #: "us" (a task) or "s" (start-up)
    with_it: float
    without: float

    @property
    def extra(self) -> float:
        return self.with_it - self.without

    @property
    def ratio(self) -> float:
        return self.with_it / self.without

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "extra": self.extra, "ratio": self.ratio}

    def __str__(self) -> str:
        d = 1 if self.unit == "us" else 3
        return (
            f"{self.what}: {self.extra:+.{d}f} {self.unit} ({self.with_it:.{d}f} {self.unit} with, "
            f"{self.without:.{d}f} {self.unit} without: {self.ratio:.3f}x)"
        )


def overhead_costs(rows: Sequence[BenchRow]) -> list[Cost]:
    """TLS's cost per task and at start-up, and a handle's per task, at each W with both rows (local)."""
    out: list[Cost] = []
    for w in sorted({r.workers for r in rows if r.contender == TINY}):
        on, off = (find(rows, TINY, workers=w, workload="tiny", tls=tls) for tls in (True, False))
        if on is not None and off is not None:
            out += [
                Cost(
                    f"TLS per task, no handle, W={w}", "us", on.per_task_us("none"), off.per_task_us("none")
                ),
                Cost(
                    f"TLS per task, with a handle, W={w}",
                    "us",
                    on.per_task_us("handle"),
                    off.per_task_us("handle"),
                ),
                Cost(
                    f"TLS at start-up, launch to ready client, W={w}",
                    "s",
                    need(on.startup),
                    need(off.startup),
                ),
                Cost(
                    f"TLS at start-up, inputs placed to ready client, W={w}",
                    "s",
                    need(on.dask_startup),
                    need(off.dask_startup),
                ),
            ]
        for row, setting in ((on, "TLS on"), (off, "TLS off")):
            if row is not None:
                out.append(
                    Cost(
                        f"a handle per task, {setting}, W={w}",
                        "us",
                        row.per_task_us("handle"),
                        row.per_task_us("none"),
                    )
                )
    return out


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """A benchmark run: its rows and the verdicts on them."""

    config: dict[str, Any]
    seconds: float
    rows: list[BenchRow]
    checksums_agree: bool
    targets: list[Target]
    interrupted: bool = False
    startup: list[Startup] = dataclasses.field(default_factory=list)  #: start-up against plain dask-mpi

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": {
                "cpus": os.cpu_count(),
                "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            },
            "config": self.config,
            "seconds": self.seconds,
            "rows": [r.to_json() for r in self.rows],
            "checksums_agree": self.checksums_agree,
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "costs": [c.to_json() for c in overhead_costs(self.rows)],
            "startup": [c.to_json() for c in self.startup],
            "interrupted": self.interrupted,
        }


def write_results(result: BenchResult, out: Path) -> None:
    """bench.json and bench.txt in ``out`` (local)."""
    (out / "bench.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    (out / "bench.txt").write_text(report_text(result.rows, result.startup) + "\n")


def report_text(rows: Sequence[BenchRow], startup: Sequence[Startup] = ()) -> str:
    """bench.txt: the start-up table, the contenders' table, and the overhead table with the costs,
    for what there is."""
    memory = [r for r in rows if r.contender != TINY]
    tiny = [r for r in rows if r.contender == TINY]
    parts = [format_startup(list(startup))] if startup else []
    parts += [format_table(memory)] if memory or not (tiny or startup) else []
    if tiny:
        parts += [format_overhead_table(tiny), "\n".join(str(c) for c in overhead_costs(tiny))]
    return "\n\n".join(p for p in parts if p)


def line(row: BenchRow) -> str:
    """One progress line for a finished run."""
    what = f"{row.label} S={format_bytes(row.size)} W={row.workers}"
    if row.status != "ok":
        return f"{what}: {row.status} ({row.note})"
    if row.contender == TINY:
        return (
            f"{what}, {row.tasks} tasks: start-up {need(row.startup):.3f} s, "
            f"{need(row.tiny_none_per_s):.0f} tasks/s, with a handle {need(row.tiny_handle_per_s):.0f}"
        )
    ready = f"{row.ready:.3f} s" if row.ready is not None else "-"
    return f"{what}: node memory {format_bytes(row.node_memory or 0)}, ready {ready}"


def _cells(r: BenchRow) -> str:
    mem = format_bytes(r.node_memory or 0)
    steady = format_bytes(r.steady_memory) if r.steady_memory is not None else "-"
    ready = f"{r.ready:.3f}" if r.ready is not None else "-"
    phase = f"{r.task_phase:.2f}" if r.task_phase is not None else "-"
    ovh = f"{1e3 * r.per_task_overhead:.2f}" if r.per_task_overhead is not None else "-"
    moved = format_bytes(r.moved_bytes) if r.moved_bytes is not None else "-"
    checksum = f"{r.checksum:.10e}" if r.checksum is not None else ""
    return f"{mem:>12} {steady:>12} {ready:>8} {phase:>8} {ovh:>11} {moved:>10}  {checksum}"


def _table(
    head: str, rows: Sequence[BenchRow], start: Callable[[BenchRow], str], cells: Callable[[BenchRow], str]
) -> str:
    """The head, a rule, then a line per row: its start, then its cells or how it ended and why."""
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            note = r.note.splitlines()[0] if r.note else ""
            lines.append(f"{start(r)}{r.status:>12}  {note}")
        else:
            lines.append(start(r) + cells(r))
    return "\n".join(lines)


def format_table(rows: Sequence[BenchRow]) -> str:
    head = (
        f"{'contender':<21} {'S':>10} {'W':>3} {'node memory':>12} {'while tasks':>12} {'ready s':>8} "
        f"{'tasks s':>8} "
        f"{'ovh/task ms':>11} {'moved':>10}  checksum / note"
    )
    return _table(head, rows, lambda r: f"{r.label:<21} {format_bytes(r.size):>10} {r.workers:>3} ", _cells)


def _tiny_cells(r: BenchRow) -> str:
    none, handle = r.per_task_us("none"), r.per_task_us("handle")
    return (
        f"{need(r.startup):>12.3f} {need(r.dask_startup):>12.3f} "
        f"{need(r.tiny_none_per_s):>12.1f} {none:>8.1f} {need(r.tiny_handle_per_s):>14.1f} {handle:>8.1f} "
        f"{handle / none:>10.3f}x {r.handle_ratio:>10.3f}x"
    )


def format_overhead_table(rows: Sequence[BenchRow]) -> str:
    """``--overhead``'s rows: start-up, each kind of tiny task's throughput and cost per task, and
    handle over none in total and as the median over pairs of neighbouring blocks."""
    head = (
        f"{'contender':<21} {'W':>3} {'tasks':>7} {'start-up s':>12} {'Dask start s':>12} "
        f"{'none tasks/s':>12} {'us/task':>8} {'handle tasks/s':>14} {'us/task':>8} {'handle/none':>11} {'pair median':>11}"
    )
    return _table(head, rows, lambda r: f"{r.label:<21} {r.workers:>3} {r.tasks:>7} ", _tiny_cells)


def _series(ok: Sequence[BenchRow]) -> tuple[int, int]:
    """The S for memory-vs-W (the largest every contender ran at every W, else the largest) and the W for memory-vs-S."""
    contenders = {r.label for r in ok}
    worker_counts = {r.workers for r in ok}
    complete = [
        size
        for size in {r.size for r in ok}
        if len({(r.label, r.workers) for r in ok if r.size == size}) == len(contenders) * len(worker_counts)
    ]
    return max(complete or [r.size for r in ok]), max(worker_counts)


def write_plot(rows: Sequence[BenchRow], path: Path) -> Path | None:
    """Node memory against W and against S (a line per contender), and at the largest S and W
    the peak beside the memory while the tasks ran (bars); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [  # one node's memory: runs on several emulated nodes hold a copy per node
        r for r in rows if r.status == "ok" and r.contender not in (*BASELINES, *EMPTY, TINY) and r.nodes == 1
    ]
    if not ok:
        return None
    big_s, big_w = _series(ok)
    several_w = len({r.workers for r in ok}) > 1
    fig, axes = plt.subplots(1, 3 if several_w else 2, figsize=(17 if several_w else 12, 5))
    ax_w, ax_s, ax_bar = axes if several_w else (None, *axes)
    labels = sorted({r.label for r in ok})
    colors = [plt.get_cmap("tab20")(i / 20) for i in range(20)]
    for i, c in enumerate(labels):
        style = {"marker": "os^Dv<>"[i % 7], "color": colors[i % len(colors)], "label": c}
        mine = [r for r in ok if r.label == c and r.node_memory]
        by_w = sorted((r.workers, (r.node_memory or 0) / 2**30) for r in mine if r.size == big_s)
        by_s = sorted((r.size / 2**30, (r.node_memory or 0) / 2**30) for r in mine if r.workers == big_w)
        if by_w and ax_w is not None:
            ax_w.plot(*zip(*by_w, strict=True), **style)
        if by_s:
            ax_s.plot(*zip(*by_s, strict=True), **style)
    ylabel = "node memory, sum of PSS (GiB)"
    if ax_w is not None:
        ax_w.set(
            title=f"peak node memory vs W (S = {format_bytes(big_s)})", xlabel="workers W", ylabel=ylabel
        )
    ax_s.set(title=f"peak node memory vs S (W = {big_w})", xlabel="input size S (GiB)", ylabel=ylabel)
    ax_s.legend(fontsize=8)
    for ax in (ax_w, ax_s):
        if ax is not None:
            ax.grid(alpha=0.3)
    _bars(ax_bar, [r for r in ok if r.size == big_s and r.workers == big_w])
    ax_bar.set(title=f"S = {format_bytes(big_s)}, W = {big_w}", xlabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(ax: Any, rows: Sequence[BenchRow]) -> None:
    """Each run's peak (light) and its memory while the tasks ran (dark), largest first."""
    rows = sorted(rows, key=lambda r: r.node_memory or 0)
    y = range(len(rows))
    ax.barh(y, [(r.node_memory or 0) / 2**30 for r in rows], color="#c6dbef", label="peak")
    ax.barh(
        y,
        [(r.steady_memory or 0) / 2**30 for r in rows],
        height=0.5,
        color="#2171b5",
        label="while tasks ran",
    )
    ax.set_yticks(list(y), [r.label for r in rows], fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
