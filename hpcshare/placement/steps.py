"""Placement's six named steps, and :func:`place_inputs`, which runs them in order.

Each step is collective on the job's world communicator and agreed (an error
on one rank is raised on every rank at the same step):

1. describe: world rank 0 learns each input's metadata and broadcasts it;
2. check capacity: each host's shared memory must hold all of its nodes' copies;
3. allocate: one window per input per node;
4. fill: the node's readers read file inputs in parallel slabs; a function
   source is written once, on world rank 0;
5. publish: the broadcast of shares (node 0's copy of function sources, and
   with collective reading each node's share of file inputs) to every other
   node's leader, and every rank's writes made visible to the others;
6. register: each rank registers a read-only view per input, and makes its handle.

A failure after allocation frees what was allocated before it is raised.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dask.utils import format_bytes

from .. import sync
from ..handles import ArrayHandle
from ..layout import PIECE
from ..loaders import ArrayMeta, Hdf5Source, Source
from ..log import logger
from ..memory import check_room
from ..registry import register
from ..windows import NodeWindow
from .broadcast import broadcast_shares
from .plan import plan_input, shares_from_node0
from .progress import Clock, log_summary, waiting_lines
from .reading import (
    all_readers,
    fill_error,
    node_readers,
    rchar,
    read_share,
    reads_collectively,
    write_once,
)
from .results import PlacedInput, Placement, PlacementStats, RankStats

if TYPE_CHECKING:
    from ..config import JobConfig
    from ..topology import Topology

__all__ = ["place_inputs"]


def _describe(topo: Topology, sources: Sequence[Source], config: JobConfig) -> list[ArrayMeta]:
    """Step 1: learn every input's metadata on world rank 0 (collective on world)."""
    metas: list[ArrayMeta] | None = None
    with sync.Collective(topo.world, timeout=config.placement_timeout):
        if topo.rank == 0:
            metas = [src.describe() for src in sources]
    metas = sync.bcast(topo.world, metas)
    assert metas is not None
    return metas


def _check_capacity(topo: Topology, metas: Sequence[ArrayMeta], config: JobConfig) -> None:
    """Step 2: refuse inputs the host's shared memory cannot hold (collective on world).

    Per physical host: emulated nodes on one host share its /dev/shm.
    """
    total = sum(m.nbytes for m in metas)
    nodes_here = topo.host.allreduce(1 if topo.is_leader else 0)
    with sync.Collective(topo.world, timeout=config.timeout):
        if topo.host.Get_rank() == 0 and total:
            what = f"{len(metas)} input(s) x {nodes_here} node(s) on this host"
            check_room(config, total * nodes_here, what)


def _allocate(
    topo: Topology, sources: Sequence[Source], metas: Sequence[ArrayMeta], config: JobConfig
) -> list[NodeWindow]:
    """Step 3: one window per input on each node (collective on world).

    An input that cannot be allocated frees the ones allocated before it.
    """
    windows: list[NodeWindow] = []
    try:
        for src, meta in zip(sources, metas, strict=True):
            with sync.Collective(topo.world, timeout=config.timeout):
                windows.append(NodeWindow.allocate(topo.node, meta.nbytes, src.name))
    except BaseException:
        _free_all(windows)
        raise
    return windows


@dataclasses.dataclass
class _Placing:
    """What the fill and publish steps work on."""

    topo: Topology
    sources: Sequence[Source]
    metas: Sequence[ArrayMeta]
    windows: Sequence[NodeWindow]
    config: JobConfig
    clock: Clock
    readers: tuple[int, int]  #: this node's readers, the most readers any node has

    @property
    def chatty(self) -> bool:
        """Whether this rank prints progress lines: world rank 0, unless quiet."""
        return self.topo.rank == 0 and not self.config.quiet

    def unpack(
        self,
    ) -> tuple[
        Topology,
        Sequence[Source],
        Sequence[ArrayMeta],
        Sequence[NodeWindow],
        JobConfig,
        Clock,
        tuple[int, int],
    ]:
        """The fields, not copied (``dataclasses.astuple`` would deep-copy the communicators)."""
        return self.topo, self.sources, self.metas, self.windows, self.config, self.clock, self.readers


def _fill(p: _Placing) -> None:
    """Step 4: read every file input (this node's share of it), write every function source (collective on world)."""
    topo, sources, metas, windows, config, clock, readers = p.unpack()
    if any(isinstance(src, Hdf5Source) for src in sources):
        import h5py  # noqa: F401  (imported before counting: its files are not the inputs' bytes)
    waiting = waiting_lines(
        p.chatty,
        lambda: f"this rank has read its part ({format_bytes(clock.file_bytes)}); waiting for the others",
    )
    with sync.Collective(topo.world, timeout=config.placement_timeout, on_wait=waiting):
        before = rchar()
        for src, meta, win in zip(sources, metas, windows, strict=True):
            try:
                if src.parallel:
                    clock.file_bytes += read_share(topo, src, meta, win, readers, config)
                else:
                    write_once(topo, src, meta, win, readers[0], config)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a rank must not leave alone
                error = fill_error(topo, src, exc)
                _drop_frames(exc)  # they hold views of the window, which is freed next
                raise error from exc
            win.sync()  # this rank's writes, visible to the leader that sends them to the other nodes
        clock.rchar += rchar() - before
        clock.own_done()


def _publish(p: _Placing) -> None:
    """Step 5: the broadcast of shares between nodes (function sources, and with collective reading
    file inputs); every rank's writes visible (collective on world)."""
    topo, sources, metas, windows, config, clock, readers = p.unpack()
    waiting = waiting_lines(
        p.chatty,
        lambda: (
            f"this node has its copy ({format_bytes(clock.broadcast_bytes)} received); "
            "waiting for the other nodes"
        ),
    )
    with sync.Collective(topo.world, timeout=config.placement_timeout, on_wait=waiting):
        for src, meta, win in zip(sources, metas, windows, strict=True):
            what = f"broadcasting {src.name!r} between nodes"
            if not src.parallel:
                shares = shares_from_node0(win.nbytes, topo.n_nodes)
                clock.broadcast_bytes += broadcast_shares(topo, win, shares, config, what)
            elif reads_collectively(topo, config):
                shares = plan_input(src, meta, topo.n_nodes, readers[1]).shares
                clock.broadcast_bytes += broadcast_shares(topo, win, shares, config, what)
            win.sync()  # publish this rank's writes before the others read
        clock.own_done()
    for win in windows:
        win.sync()  # and see theirs


def _register(
    sources: Sequence[Source], metas: Sequence[ArrayMeta], windows: Sequence[NodeWindow], generation: str
) -> dict[str, PlacedInput]:
    """Step 6: the windows sealed read-only, a read-only view and a handle per input (local)."""
    placed = {}
    for src, meta, win in zip(sources, metas, windows, strict=True):
        win.seal()  # placed: from here on the pages are read-only in this process
        register(src.name, generation, win.array(meta.shape, meta.dtype, meta.order))
        handle = ArrayHandle(src.name, meta.shape, meta.dtype, meta.order, generation)
        placed[src.name] = PlacedInput(src, meta, win, handle)
    return placed


def _free_all(windows: Sequence[NodeWindow]) -> None:
    """Free windows, last allocated first (collective on each node communicator)."""
    for win in reversed(windows):
        win.free()


def _drop_frames(exc: BaseException) -> None:
    """Clear the frames of ``exc`` and the errors chained to it: they hold views of the windows."""
    seen: BaseException | None = exc
    while seen is not None:
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__


def _stats(
    topo: Topology, metas: Sequence[ArrayMeta], clock: Clock, config: JobConfig, gather: bool
) -> PlacementStats:
    """Placement's figures; every rank's too when ``gather`` (then collective on world)."""
    ranks: tuple[RankStats, ...] = ()
    if gather:
        worked = topo.node.Get_rank() < node_readers(topo, config) or topo.rank == 0
        worked = worked or (topo.is_leader and topo.n_nodes > 1)
        filling = clock.steps["read"] + clock.steps["broadcast"]
        mine = RankStats(topo.rank, clock.own, filling - clock.own, clock.cpu_used(), worked)
        ranks = tuple(topo.world.allgather(mine))
    traffic = (0, 0, 0)
    if metas:  # no inputs, no bytes read or sent
        traffic = topo.world.allreduce((clock.file_bytes, clock.rchar, clock.broadcast_bytes), op=_add_tuples)
    return PlacementStats(
        n_inputs=len(metas),
        nbytes=sum(m.nbytes for m in metas),
        n_nodes=topo.n_nodes,
        total=time.perf_counter() - clock.start,
        ranks=ranks,
        read_mode="collective" if reads_collectively(topo, config) else "per-node",
        file_bytes=traffic[0],
        rchar=traffic[1],
        broadcast_bytes=traffic[2],
        **clock.steps,
    )


def _add_tuples(a: tuple[int, ...], b: tuple[int, ...], datatype: object = None) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def place_inputs(
    topo: Topology,
    sources: Sequence[Source],
    config: JobConfig,
    generation: str,
    *,
    gather_stats: bool = False,
) -> Placement:
    """Place every input once per node (collective on ``topo.world``).

    Metadata is learned on world rank 0 and broadcast; each host's shared
    memory is checked before anything is allocated; files are read straight
    into the window by the node's readers in parallel slabs; a function source
    runs once, on world rank 0, and its bytes are broadcast to the other
    nodes' leaders. An error on any rank is raised on every rank, after
    freeing what was allocated. With ``gather_stats``, every rank's figures
    are gathered into the result's :class:`PlacementStats` (one more
    collective).
    """
    chatty = topo.rank == 0 and not config.quiet
    clock = Clock()
    if not sources:  # the same on every rank (run's inputs are): nothing to agree on, allocate or read
        clock.steps = dict.fromkeys(("describe", "capacity", "allocate", "read", "broadcast"), 0.0)
        return Placement({}, _stats(topo, (), clock, config, gather_stats))
    metas = _describe(topo, sources, config)
    clock.step("describe")
    _check_capacity(topo, metas, config)
    clock.step("capacity")
    windows = _allocate(topo, sources, metas, config)
    clock.step("allocate")
    total = sum(m.nbytes for m in metas)
    if chatty and total >= PIECE:
        logger.info(
            f"placing {len(metas)} input(s), {format_bytes(total)} per node, on {topo.n_nodes} node(s)"
        )
    try:
        clock.restart_cpu()
        placing = _Placing(topo, sources, metas, windows, config, clock, all_readers(topo, config))
        _fill(placing)
        clock.step("read")
        _publish(placing)
        clock.step("broadcast")
    except BaseException as exc:
        _drop_frames(exc)
        _free_all(windows)
        raise
    placement = Placement(
        _register(sources, metas, windows, generation), _stats(topo, metas, clock, config, gather_stats)
    )
    if chatty and metas:
        log_summary(placement.stats, sources, metas)
    return placement
