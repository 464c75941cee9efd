"""The read plan of a file input: which node reads which share, which reader which pieces.

Pure: plain numbers in, plain data out, no communicator. Every rank computes
the same plan from the input's size and the readers per node, so nothing is
sent to agree on it, and it is tested without MPI.

The input is cut into pieces (by the source: whole chunks for HDF5); node
``k`` takes the ``k``-th contiguous run of them, its *share*, and the node's
readers split that run, each a contiguous run of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..layout import PIECE

if TYPE_CHECKING:
    from ..loaders import ArrayMeta, Source

__all__ = [
    "ReadPlan",
    "piece_count",
    "plan_input",
    "plan_reads",
    "readers_per_node",
    "shares_from_node0",
]

Range = tuple[int, int]  #: a byte range ``(start, stop)`` of the input


def readers_per_node(node_size: int, asked: int | None, cpus: int) -> int:
    """How many of a node's ranks read a file input in parallel (local).

    ``asked`` (``hpcshare.readers``), at most the node's ranks; ``None``: the
    node's ranks, at most ``cpus``, at least one.
    """
    if asked is not None:
        return min(asked, node_size)
    return max(1, min(node_size, cpus))


def piece_count(nbytes: int, most_readers: int, nodes: int) -> int:
    """How many pieces to cut an input of ``nbytes`` into (local).

    One for every reader of every node (``most_readers``: the most readers any
    node has), more if a piece would exceed :data:`~hpcshare.layout.PIECE` bytes. A source may
    make fewer, larger ones to keep its alignment.
    """
    return max(most_readers * nodes, -(-nbytes // PIECE))


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """Each node's contiguous run of the input's pieces (a run may be empty)."""

    runs: tuple[tuple[Range, ...], ...]

    @property
    def shares(self) -> list[Range]:
        """Each node's byte range of the input; ``(0, 0)`` for a node without pieces."""
        return [(run[0][0], run[-1][1]) if run else (0, 0) for run in self.runs]

    def pieces(self, node: int, rank: int, readers: int) -> list[Range]:
        """The pieces rank ``rank`` of node ``node`` reads, when the node has ``readers`` readers (local).

        Each reader takes a contiguous run of ``ceil(pieces / readers)`` of its
        node's pieces: the last readers take fewer, or none when the node has
        fewer pieces than readers; a rank that is not a reader takes none.
        """
        own = self.runs[node]
        if not own or rank >= readers:
            return []
        per = -(-len(own) // readers)
        return list(own[rank * per : (rank + 1) * per])


def plan_reads(pieces: Sequence[Range], nodes: int) -> ReadPlan:
    """Give each of ``nodes`` nodes a contiguous run of ``pieces``, in node order (local).

    Runs differ in length by one piece at most; with fewer pieces than nodes
    the first nodes get none.
    """
    n = len(pieces)
    return ReadPlan(tuple(tuple(pieces[k * n // nodes : (k + 1) * n // nodes]) for k in range(nodes)))


def plan_input(src: Source, meta: ArrayMeta, nodes: int, most_readers: int) -> ReadPlan:
    """The plan of a file input on ``nodes`` nodes (1: every node reads all of it) (local).

    The source cuts the input (:meth:`Source.slabs`: aligned byte ranges,
    whole chunk rows for HDF5) into :func:`piece_count` pieces or fewer;
    ``most_readers`` is the most readers any node has, so every rank cuts the
    input alike, whatever the size of its own node.
    """
    return plan_reads(src.slabs(meta, piece_count(meta.nbytes, most_readers, nodes)), nodes)


def shares_from_node0(nbytes: int, nodes: int) -> list[Range]:
    """The shares of an input node 0 holds whole (a function source's): all, then none (local)."""
    return [(0, nbytes)] + [(0, 0)] * (nodes - 1)
