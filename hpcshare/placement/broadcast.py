"""The broadcast of shares: each node's share of a window to every other node, between leaders."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import sync
from ..layout import pieces
from ..windows import NodeWindow
from .progress import Progress

if TYPE_CHECKING:
    from ..config import JobConfig
    from ..topology import Topology

__all__ = ["IN_FLIGHT", "broadcast_shares"]

IN_FLIGHT = 4  #: broadcasts between node leaders outstanding at once


def broadcast_shares(
    topo: Topology, window: NodeWindow, shares: Sequence[tuple[int, int]], config: JobConfig, what: str
) -> int:
    """Each node's share of ``window`` to every other node, in pipelined pieces (collective on leaders).

    Node ``k``'s leader broadcasts bytes ``shares[k]`` of its window to the
    other leaders, straight into their windows, in pieces of at most
    :data:`~hpcshare.layout.PIECE` bytes with up to :data:`IN_FLIGHT` broadcasts
    outstanding; every leader waits for each idly, bounded by
    ``config.placement_timeout``. Returns the bytes this leader received
    (0 on other ranks, or on one node).
    """
    from mpi4py import MPI

    if topo.leaders == MPI.COMM_NULL or topo.n_nodes < 2:
        return 0
    window.sync()  # the node's readers' writes, before sending them
    data, me = window.bytes(), topo.leaders.Get_rank()
    total = sum(hi - lo for k, (lo, hi) in enumerate(shares) if k != me)
    progress = Progress(what, total, topo.rank == 0 and not config.quiet, "of the node's")
    pending: collections.deque[tuple[MPI.Request, int, int]] = collections.deque()
    received = 0

    def finish_one() -> None:
        nonlocal received
        request, sender, nbytes = pending.popleft()
        sync.wait(request, timeout=config.placement_timeout, what=f"node {sender}'s leader")
        received += nbytes
        progress.add(nbytes)

    for root, (lo, hi) in enumerate(shares):
        for a, b in pieces(lo, hi):
            pending.append(
                (topo.leaders.Ibcast([data[a:b], MPI.BYTE], root=root), root, 0 if root == me else b - a)
            )
            if len(pending) >= IN_FLIGHT:
                finish_one()
    while pending:
        finish_one()
    return received
