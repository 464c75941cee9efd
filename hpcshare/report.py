"""The memory report: what each node holds, measured, against one copy per worker."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import psutil
from dask.utils import format_bytes

from . import sync

if TYPE_CHECKING:
    from .config import JobConfig
    from .topology import Topology

__all__ = ["NodeMemory", "RankMemory", "format_report", "measure_rank", "print_report", "summarize"]


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """One rank's memory, measured from /proc (proportional set size splits shared pages)."""

    rank: int
    host: str
    node: int
    role: str
    pss: int
    rss: int
    objects: int = 0  #: bytes of objects put while the job runs that this node still holds (leaders)


def measure_rank(rank: int, host: str, node: int, role: str, objects: int = 0) -> RankMemory:
    """Measure this process (local)."""
    m = psutil.Process().memory_full_info()
    return RankMemory(rank, host, node, role, int(m.pss), int(m.rss), objects)


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
    object_bytes: int = 0  # objects put while the job ran, still held at its end

    @property
    def per_worker_copies(self) -> int:
        """What the node would hold if every worker had its own copy of the inputs and objects."""
        shared = self.input_bytes + self.object_bytes
        return self.pss - shared + max(self.workers, 1) * shared


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
            object_bytes=sum(r.objects for r in rs),
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
        f"{'measured':>10} {'sum RSS':>10} {'copy/worker':>11} {'saved':>10} {'put objects':>11}",
    ]
    for n in nodes:
        lines.append(
            f"{n.node:>4}  {n.host[:16]:<16} {n.ranks:>5} {n.workers:>7} {fb(n.input_bytes):>10} "
            f"{fb(n.pss):>10} {fb(n.rss):>10} {fb(n.per_worker_copies):>11} "
            f"{fb(n.per_worker_copies - n.pss):>10} {fb(n.object_bytes):>11}"
        )
    lines.append(
        "measured = sum of PSS over the node's ranks (shared pages split between the ranks "
        "that map them); sum RSS counts them once per rank; copy/worker = measured with one "
        "private copy of the inputs (and put objects) per worker instead of one per node; "
        "put objects = hpcshare.put objects not freed by the end of the job."
    )
    return "\n".join(lines)


def print_report(
    topo: Topology, input_bytes: int, n_inputs: int, config: JobConfig, object_bytes: int = 0
) -> None:
    """Measure every rank; print the memory report on world rank 0 unless quiet (collective on world).

    ``object_bytes``: this rank's count of put objects its node holds (one rank per node).

    Raises
    ------
    hpcshare.sync.WaitTimeout
        When a rank does not arrive within ``config.timeout``.
    """
    mine = measure_rank(topo.rank, topo.hostname, topo.node_index, topo.role, object_bytes)
    sync.barrier(topo.world, timeout=config.timeout, what="all ranks at the end of the job")
    ranks = topo.world.gather(mine, root=0)
    if topo.rank == 0 and not config.quiet and ranks:
        print(format_report(summarize(ranks, input_bytes), n_inputs), flush=True)
