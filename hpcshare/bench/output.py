"""What ``hpcshare bench`` writes: bench.json, the table (bench.txt), the plot (bench.png)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

from .rows import BenchRow
from .targets import Target

__all__ = ["BenchResult", "format_table", "line", "write_plot", "write_results"]

#: contenders that are not a way of running the workload, only a yardstick
BASELINES = ("shm-copy", "h5-read-direct", "mpi-transfer")


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """A benchmark run: its rows and the verdicts on them."""

    config: dict[str, Any]
    seconds: float
    rows: list[BenchRow]
    checksums_agree: bool
    targets: list[Target]
    interrupted: bool = False

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
            "interrupted": self.interrupted,
        }


def write_results(result: BenchResult, out: Path) -> None:
    """bench.json and bench.txt in ``out`` (local)."""
    (out / "bench.json").write_text(json.dumps(result.to_json(), indent=1, default=str))
    (out / "bench.txt").write_text(format_table(result.rows) + "\n")


def line(row: BenchRow) -> str:
    """One progress line for a finished run."""
    what = f"{row.label} S={format_bytes(row.size)} W={row.workers}"
    if row.status != "ok":
        return f"{what}: {row.status} ({row.note})"
    return f"{what}: node memory {format_bytes(row.node_memory or 0)}, ready {row.ready or 0:.3f} s"


def _cells(r: BenchRow) -> str:
    mem = format_bytes(r.node_memory or 0)
    steady = format_bytes(r.steady_memory) if r.steady_memory is not None else "-"
    ready = f"{r.ready:.3f}" if r.ready is not None else "-"
    phase = f"{r.task_phase:.2f}" if r.task_phase is not None else "-"
    ovh = f"{1e3 * r.per_task_overhead:.2f}" if r.per_task_overhead is not None else "-"
    moved = format_bytes(r.moved_bytes) if r.moved_bytes is not None else "-"
    checksum = f"{r.checksum:.10e}" if r.checksum is not None else ""
    return f"{mem:>12} {steady:>12} {ready:>8} {phase:>8} {ovh:>11} {moved:>10}  {checksum}"


def format_table(rows: Sequence[BenchRow]) -> str:
    head = (
        f"{'contender':<21} {'S':>10} {'W':>3} {'node memory':>12} {'while tasks':>12} {'ready s':>8} "
        f"{'tasks s':>8} "
        f"{'ovh/task ms':>11} {'moved':>10}  checksum / note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        start = f"{r.label:<21} {format_bytes(r.size):>10} {r.workers:>3} "
        if r.status != "ok":
            note = r.note.splitlines()[0] if r.note else ""
            lines.append(f"{start}{r.status:>12}  {note}")
        else:
            lines.append(start + _cells(r))
    return "\n".join(lines)


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
        r
        for r in rows
        if r.status == "ok" and r.contender not in (*BASELINES, "hpcshare-empty") and r.nodes == 1
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
