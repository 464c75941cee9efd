"""The memory report: what each node holds, measured, against one copy per worker."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from dask.utils import format_bytes

__all__ = ["NodeMemory", "RankMemory", "format_report", "measure_rank", "summarize"]


def _smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """One rank's memory, measured from /proc (proportional set size splits shared pages)."""

    rank: int
    host: str
    node: int
    role: str
    pss: int
    rss: int


def measure_rank(rank: int, host: str, node: int, role: str) -> RankMemory:
    """Measure this process (local)."""
    m = _smaps_rollup()
    return RankMemory(rank, host, node, role, m.get("Pss", 0), m.get("Rss", 0))


@dataclasses.dataclass(frozen=True)
class NodeMemory:
    """One node's figures in the report."""

    node: int
    host: str
    ranks: int
    workers: int
    input_bytes: int
    pss: int  # measured: sum of PSS over the node's ranks
    rss: int  # sum of RSS: counts every shared page once per rank that touched it

    @property
    def per_worker_copies(self) -> int:
        """What the node would hold if every worker had its own copy of the inputs."""
        return self.pss - self.input_bytes + max(self.workers, 1) * self.input_bytes


def summarize(ranks: Sequence[RankMemory], input_bytes: int) -> list[NodeMemory]:
    """Group rank measurements by node (local)."""
    nodes: dict[int, list[RankMemory]] = {}
    for r in ranks:
        nodes.setdefault(r.node, []).append(r)
    return [
        NodeMemory(
            node=n,
            host=rs[0].host,
            ranks=len(rs),
            workers=sum(r.role == "worker" for r in rs),
            input_bytes=input_bytes,
            pss=sum(r.pss for r in rs),
            rss=sum(r.rss for r in rs),
        )
        for n, rs in sorted(nodes.items())
    ]


def format_report(nodes: Sequence[NodeMemory], n_inputs: int) -> str:
    """The report as printed at the end of every job."""
    fb = format_bytes
    lines = [
        "hpcshare memory report "
        f"({n_inputs} input(s), {fb(nodes[0].input_bytes if nodes else 0)} per node, held once per node)",
        f"{'node':>4}  {'host':<16} {'ranks':>5} {'workers':>7} {'inputs':>10} "
        f"{'measured':>10} {'sum RSS':>10} {'copy/worker':>11} {'saved':>10}",
    ]
    for n in nodes:
        lines.append(
            f"{n.node:>4}  {n.host[:16]:<16} {n.ranks:>5} {n.workers:>7} {fb(n.input_bytes):>10} "
            f"{fb(n.pss):>10} {fb(n.rss):>10} {fb(n.per_worker_copies):>11} "
            f"{fb(n.per_worker_copies - n.pss):>10}"
        )
    lines.append(
        "measured = sum of PSS over the node's ranks (shared pages split between the ranks "
        "that map them); sum RSS counts them once per rank; copy/worker = measured with one "
        "private copy of the inputs per worker instead of one per node."
    )
    return "\n".join(lines)


def node_memory_total() -> int:
    """Physical memory of this machine in bytes (local)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def job_memory_total(environ: Mapping[str, str] | None = None) -> int:
    """Memory the job may use on this machine, in bytes (local).

    Physical memory, capped by Slurm's ``--mem`` (``SLURM_MEM_PER_NODE``, in
    MiB) and by the memory limit of this process's cgroup (v2), whichever is
    lowest: on a shared node the job gets its allocation, not the machine.
    """
    env = os.environ if environ is None else environ
    limits = [node_memory_total()]
    slurm = env.get("SLURM_MEM_PER_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        limits.append(int(slurm) * 2**20)
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        entries = []
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
    return min(limits)
