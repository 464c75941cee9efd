"""What placement returns: the placed inputs on this rank, and placement's figures."""

from __future__ import annotations

import dataclasses

from ..handles import ArrayHandle
from ..loaders import ArrayMeta, Source
from ..registry import unregister
from ..windows import NodeWindow

__all__ = ["PlacedInput", "Placement", "PlacementStats", "RankStats"]


@dataclasses.dataclass(frozen=True)
class RankStats:
    """One rank's share of placement."""

    rank: int
    read: float  #: seconds spent on its own share of reading or filling
    wait: float  #: seconds spent waiting for the other ranks during fill and publish
    cpu: float  #: CPU seconds used during fill and publish
    worked: bool  #: whether it read, wrote or sent data (False: it only waited)


@dataclasses.dataclass(frozen=True)
class PlacementStats:
    """Placement's figures: seconds per step on this rank's clock, and bytes."""

    n_inputs: int
    nbytes: int  #: bytes one node holds for all inputs
    n_nodes: int
    describe: float
    capacity: float
    allocate: float
    read: float
    broadcast: float  #: seconds of the publish step: the broadcast of shares between nodes
    total: float
    #: every rank's figures, gathered only when asked for (``run(on_placed=...)``)
    ranks: tuple[RankStats, ...] = ()
    file_bytes: int = 0  #: bytes of file inputs the job's ranks read (what their reads asked for)
    rchar: int = 0  #: bytes the job's ranks read while filling, summed from /proc/PID/io rchar
    broadcast_bytes: int = 0  #: bytes the node leaders received from each other's broadcasts
    read_mode: str = "per-node"  #: how file inputs were read: "collective" or "per-node"


@dataclasses.dataclass(frozen=True)
class PlacedInput:
    """One input, placed: its metadata, its window on this node, its handle."""

    source: Source
    meta: ArrayMeta
    window: NodeWindow
    handle: ArrayHandle


class Placement:
    """All inputs of a job on this rank.

    End with :meth:`free` (collective on world), or use it as a context
    manager: leaving the block frees it.
    """

    def __init__(self, inputs: dict[str, PlacedInput], stats: PlacementStats) -> None:
        self.inputs = inputs
        self.stats = stats

    @property
    def handles(self) -> dict[str, ArrayHandle]:
        return {name: p.handle for name, p in self.inputs.items()}

    @property
    def nbytes(self) -> int:
        """Bytes one node holds for all inputs."""
        return self.stats.nbytes

    def free(self) -> None:
        """Unregister and free every window, last placed first (collective on world). Idempotent."""
        for name in reversed(list(self.inputs)):
            unregister(name)
            self.inputs[name].window.free()

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()
