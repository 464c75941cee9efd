"""Reading inputs into a node's window: this rank's pieces of a file, or a function source's data."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dask.system import CPU_COUNT

from ..errors import HpcshareError, InputError
from ..loaders import ArrayMeta, Source
from ..windows import NodeWindow
from .plan import plan_input, readers_per_node
from .progress import Progress

if TYPE_CHECKING:
    from ..config import JobConfig
    from ..topology import Topology

__all__ = [
    "all_readers",
    "fill_error",
    "node_readers",
    "rchar",
    "read_share",
    "reads_collectively",
    "write_once",
]


def node_readers(topo: Topology, config: JobConfig) -> int:
    """How many of the node's ranks read a file input in parallel (local)."""
    return readers_per_node(topo.node.Get_size(), config.readers, CPU_COUNT)


def all_readers(topo: Topology, config: JobConfig) -> tuple[int, int]:
    """This node's readers, and the most readers any node has (collective on world)."""
    from mpi4py import MPI

    here = node_readers(topo, config)
    return here, topo.world.allreduce(here, op=MPI.MAX)


def reads_collectively(topo: Topology, config: JobConfig) -> bool:
    """Whether file inputs are read collectively: a share per node, broadcast between leaders (local)."""
    return config.read == "collective" and topo.n_nodes > 1


def read_share(
    topo: Topology, src: Source, meta: ArrayMeta, win: NodeWindow, readers: tuple[int, int], config: JobConfig
) -> int:
    """Read this rank's pieces of a file input; the bytes read (local).

    The node's readers together read the node's share: the whole input, or
    with collective reading the node's run of it. With collective reading
    the readers also have the kernel allocate the rest of the window, which
    the leader fills from the other nodes' broadcasts.
    """
    here, most = readers
    collective = reads_collectively(topo, config)
    plan = plan_input(src, meta, topo.n_nodes if collective else 1, most)
    me = topo.node.Get_rank()
    mine = plan.pieces(topo.node_index if collective else 0, me, here)
    if config.prefault and collective and me < here:
        win.prefault_share(me, here)
    elif config.prefault and mine:
        win.prefault(mine[0][0], mine[-1][1])
    if not mine:  # not a reader, or fewer pieces than readers (a small or single-chunk input)
        return 0
    chatty = topo.rank == 0 and not config.quiet
    progress = Progress(f"reading {src.name!r}", sum(b - a for a, b in mine), chatty)
    out = win.bytes()
    for a, b in mine:
        src.read_slab(meta, out, a, b)
        progress.add(b - a)
    return sum(b - a for a, b in mine)


def write_once(
    topo: Topology, src: Source, meta: ArrayMeta, win: NodeWindow, readers: int, config: JobConfig
) -> None:
    """Write a function source's data on world rank 0 (local).

    Meanwhile the node's readers have the kernel allocate the window's pages,
    each its own share, in parallel.
    """
    me = topo.node.Get_rank()
    if config.prefault and me < readers:
        win.prefault_share(me, readers)
    if topo.rank == 0:
        src.fill(meta, win.bytes())


def rchar() -> int:
    """Bytes this process has read with read(2)-like calls so far (``/proc/self/io`` rchar; 0 if unknown)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def fill_error(topo: Topology, src: Source, exc: BaseException) -> HpcshareError:
    """The error to agree on when placing ``src`` failed on this rank: it names the node and the file."""
    where = f"on node {topo.node_index} ({topo.hostname})"
    if isinstance(exc, HpcshareError):
        try:
            return type(exc)(f"{exc} ({where})")
        except TypeError:  # an error class that takes other arguments
            return exc
    if isinstance(exc, OSError) and exc.filename is not None and src.parallel:
        path = os.path.abspath(os.fsdecode(exc.filename))
        return InputError(
            f"input {src.name!r}: cannot read {path!r} {where}: {exc.strerror or exc}. Every node "
            "must be able to read the file at the same path."
        )
    return InputError.from_failure(src.name, f"placing {src.text} {where} failed with", exc)
