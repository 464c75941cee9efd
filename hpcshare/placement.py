"""Placement: every input read once per node into a shared window, before Dask starts.

:func:`place_inputs` runs six named steps, each collective on the job's world
communicator and agreed (an error on one rank is raised on every rank at the
same step):

1. describe: world rank 0 learns each input's metadata and broadcasts it;
2. check capacity: each host's shared memory must hold all of its nodes' copies;
3. allocate: one window per input per node;
4. fill: the node's readers read file inputs in parallel slabs; a function
   source is written once, on world rank 0;
5. publish: node 0's copy of function sources goes to every other node's
   leader, and every rank's writes are made visible to the others;
6. register: each rank registers a read-only view per input, and makes its handle.

A failure after allocation frees what was allocated before it is raised.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dask.system import CPU_COUNT
from dask.utils import format_bytes, format_time

from . import sync
from .errors import CapacityError, HpcshareError, InputError
from .handles import ArrayHandle
from .loaders import ArrayMeta, Hdf5Source, Source
from .log import logger
from .memory import job_memory
from .registry import register, unregister
from .shm import check_capacity
from .windows import NodeWindow

if TYPE_CHECKING:
    from .config import JobConfig
    from .topology import Topology

__all__ = ["PlacedInput", "Placement", "PlacementStats", "RankStats", "place_inputs"]

_PIECE = 64 * 2**20  # bytes read between progress checks; inputs this large get progress lines
_PROGRESS_EVERY = 1.0  # seconds between progress lines, at least
_BCAST_PIECE = 64 * 2**20  # bytes per broadcast message between node leaders
_IN_FLIGHT = 4  # broadcasts between node leaders outstanding at once


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
    broadcast: float
    total: float
    #: every rank's figures, gathered only when asked for (``run(on_placed=...)``)
    ranks: tuple[RankStats, ...] = ()
    file_bytes: int = 0  #: bytes of file inputs the job's ranks read (what their reads asked for)
    rchar: int = 0  #: bytes the job's ranks read while filling, summed from /proc/PID/io rchar
    exchanged: int = 0  #: bytes the node leaders received from each other
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


class _Progress:
    """Progress lines for one rank's share of a long read or exchange, at most one per second."""

    def __init__(self, what: str, total: int, enabled: bool, whose: str = "of this rank's") -> None:
        self.what, self.total, self.enabled, self.whose = what, total, enabled, whose
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and self.total and now - self.last >= _PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info(
                f"{self.what}: {format_bytes(self.done)} {self.whose} {format_bytes(self.total)} "
                f"({100 * self.done / self.total:.0f}%, {format_bytes(int(rate))}/s)"
            )


class _Clock:
    """Seconds per step (world rank 0's figures are the ones reported) and this rank's own work."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.steps: dict[str, float] = {}
        self.own = 0.0  # seconds of this rank's own reading, filling and sending
        self.cpu = time.process_time()
        self.file_bytes = 0  # bytes of file inputs this rank read (what its reads asked for)
        self.rchar = 0  # bytes this process read while filling, by /proc/self/io
        self.exchanged = 0  # bytes this rank received from other nodes' leaders

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = now - self.mark
        self.mark = now

    def own_done(self) -> None:
        """This rank finished its own part of the current step; the rest is waiting."""
        self.own += time.perf_counter() - self.mark

    def restart_cpu(self) -> None:
        self.cpu = time.process_time()

    def cpu_used(self) -> float:
        return time.process_time() - self.cpu


def _readers(topo: Topology, config: JobConfig) -> int:
    """How many of the node's ranks read a file input in parallel (local)."""
    if config.readers is not None:
        return min(config.readers, topo.node.Get_size())
    return max(1, min(topo.node.Get_size(), CPU_COUNT))


def _all_readers(topo: Topology, config: JobConfig) -> tuple[int, int]:
    """This node's readers, and the most readers any node has (collective on world)."""
    from mpi4py import MPI

    here = _readers(topo, config)
    return here, topo.world.allreduce(here, op=MPI.MAX)


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
            check_capacity(config.shm_dir, total * nodes_here, config.shm_headroom, what)
            _check_job_memory(total * nodes_here, what)


def _check_job_memory(need: int, what: str) -> None:
    """Refuse shared inputs larger than the memory the job may use on this host (local)."""
    limit, source = job_memory()
    if need > limit:
        raise CapacityError(
            f"{what} need {format_bytes(need)} of memory on this host, more than the job may "
            f"use here: {format_bytes(limit)}, {source}. Ask the batch system for more memory "
            "per node (for example sbatch --mem), or use fewer or smaller inputs."
        )


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


def _plan(
    topo: Topology, src: Source, meta: ArrayMeta, readers: tuple[int, int], collective: bool
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Each node's byte range of a file input, and this rank's pieces of its own node's range (local).

    The input is cut into pieces (whole chunks for HDF5); with ``collective``
    each node takes a contiguous run of them, else every node takes them all.
    Within a node, the readers split the node's run. Every rank computes the
    same plan from the metadata and ``readers`` (this node's readers, the
    most any node has): nothing is exchanged to agree on it.
    """
    here, most = readers
    nodes = topo.n_nodes if collective else 1
    # every rank cuts the input alike, whatever the size of its node
    pieces = src.slabs(meta, max(most * nodes, -(-meta.nbytes // _PIECE)))
    runs = [pieces[k * len(pieces) // nodes : (k + 1) * len(pieces) // nodes] for k in range(nodes)]
    shares = [(run[0][0], run[-1][1]) if run else (0, 0) for run in runs]
    own = runs[topo.node_index if collective else 0]
    me = topo.node.Get_rank()
    per = -(-len(own) // here) if own else 0
    mine = own[me * per : (me + 1) * per] if me < here else []
    return shares, mine


def _collective(topo: Topology, config: JobConfig) -> bool:
    """Whether file inputs are read collectively: a share per node, exchanged between leaders (local)."""
    return config.read == "collective" and topo.n_nodes > 1


def _read_share(
    topo: Topology, src: Source, meta: ArrayMeta, win: NodeWindow, readers: tuple[int, int], config: JobConfig
) -> int:
    """Read this rank's pieces of a file input; the bytes read (local).

    The node's readers together read the node's share: the whole input, or
    with collective reading the node's run of it. With collective reading
    the readers also have the kernel allocate the rest of the window, which
    the leader fills from the other nodes.
    """
    collective = _collective(topo, config)
    _, mine = _plan(topo, src, meta, readers, collective)
    me = topo.node.Get_rank()
    if config.prefault and collective and me < readers[0]:
        win.prefault_share(me, readers[0])
    elif config.prefault and mine:
        win.prefault(mine[0][0], mine[-1][1])
    if not mine:  # not a reader, or fewer pieces than readers (a small or single-chunk input)
        return 0
    chatty = topo.rank == 0 and not config.quiet
    progress = _Progress(f"reading {src.name!r}", sum(b - a for a, b in mine), chatty)
    out = win.bytes()
    for a, b in mine:
        src.read_slab(meta, out, a, b)
        progress.add(b - a)
    return sum(b - a for a, b in mine)


def _write_once(
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


def _waiting(topo: Topology, config: JobConfig, state: Callable[[], str]) -> Callable[[float], None] | None:
    """On world rank 0 (unless quiet), a progress line about once a second while it waits for the others."""
    if topo.rank != 0 or config.quiet:
        return None
    return lambda seconds: logger.info(f"placing: {state()} ({seconds:.0f} s)")


def _rchar() -> int:
    """Bytes this process has read with read(2)-like calls so far (``/proc/self/io`` rchar; 0 if unknown)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclasses.dataclass
class _Placing:
    """What the fill and publish steps work on."""

    topo: Topology
    sources: Sequence[Source]
    metas: Sequence[ArrayMeta]
    windows: Sequence[NodeWindow]
    config: JobConfig
    clock: _Clock
    readers: tuple[int, int]  #: this node's readers, the most readers any node has

    def unpack(
        self,
    ) -> tuple[
        Topology,
        Sequence[Source],
        Sequence[ArrayMeta],
        Sequence[NodeWindow],
        JobConfig,
        _Clock,
        tuple[int, int],
    ]:
        """The fields, not copied (``dataclasses.astuple`` would deep-copy the communicators)."""
        return self.topo, self.sources, self.metas, self.windows, self.config, self.clock, self.readers


def _fill(p: _Placing) -> None:
    """Step 4: read every file input (this node's share of it), write every function source (collective on world)."""
    topo, sources, metas, windows, config, clock, readers = p.unpack()
    if any(isinstance(src, Hdf5Source) for src in sources):
        import h5py  # noqa: F401  (imported before counting: its files are not the inputs' bytes)
    waiting = _waiting(
        topo,
        config,
        lambda: f"this rank has read its part ({format_bytes(clock.file_bytes)}); waiting for the others",
    )
    with sync.Collective(topo.world, timeout=config.placement_timeout, on_wait=waiting):
        before = _rchar()
        for src, meta, win in zip(sources, metas, windows, strict=True):
            try:
                if src.parallel:
                    clock.file_bytes += _read_share(topo, src, meta, win, readers, config)
                else:
                    _write_once(topo, src, meta, win, readers[0], config)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a rank must not leave alone
                error = _fill_error(topo, src, exc)
                _drop_frames(exc)  # they hold views of the window, which is freed next
                raise error from exc
            win.sync()  # this rank's writes, visible to the leader that sends them to the other nodes
        clock.rchar += _rchar() - before
        clock.own_done()


def _fill_error(topo: Topology, src: Source, exc: BaseException) -> HpcshareError:
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


def _exchange(
    topo: Topology, window: NodeWindow, shares: Sequence[tuple[int, int]], config: JobConfig, what: str
) -> int:
    """Each node's share of ``window`` to every other node, in pipelined pieces (collective on leaders).

    Node ``k``'s leader broadcasts bytes ``shares[k]`` of its window to the
    other leaders, straight into their windows, in pieces of at most
    ``_BCAST_PIECE`` bytes with up to ``_IN_FLIGHT`` broadcasts outstanding.
    Returns the bytes this leader received.
    """
    from mpi4py import MPI

    if topo.leaders == MPI.COMM_NULL or topo.n_nodes < 2:
        return 0
    window.sync()  # the node's readers' writes, before sending them
    data, me = window.bytes(), topo.leaders.Get_rank()
    total = sum(hi - lo for k, (lo, hi) in enumerate(shares) if k != me)
    progress = _Progress(what, total, topo.rank == 0 and not config.quiet, "of the node's")
    pending: collections.deque[tuple[MPI.Request, int, int]] = collections.deque()
    received = 0

    def finish_one() -> None:
        nonlocal received
        request, sender, nbytes = pending.popleft()
        sync.wait(request, timeout=config.placement_timeout, what=f"node {sender}'s leader")
        received += nbytes
        progress.add(nbytes)

    for root, (lo, hi) in enumerate(shares):
        for a in range(lo, hi, _BCAST_PIECE):
            b = min(a + _BCAST_PIECE, hi)
            pending.append(
                (topo.leaders.Ibcast([data[a:b], MPI.BYTE], root=root), root, 0 if root == me else b - a)
            )
            if len(pending) >= _IN_FLIGHT:
                finish_one()
    while pending:
        finish_one()
    return received


def _between_nodes(topo: Topology, window: NodeWindow, config: JobConfig, what: str) -> int:
    """Copy node 0's window into every other node's, once per node (collective on leaders)."""
    shares = [(0, window.nbytes)] + [(0, 0)] * (topo.n_nodes - 1)
    return _exchange(topo, window, shares, config, what)


def _publish(p: _Placing) -> None:
    """Step 5: function sources, and with collective reading every node's share, to the other nodes;
    every rank's writes visible (collective on world)."""
    topo, sources, metas, windows, config, clock, readers = p.unpack()
    waiting = _waiting(
        topo,
        config,
        lambda: (
            f"this node has its copy ({format_bytes(clock.exchanged)} received); waiting for the other nodes"
        ),
    )
    with sync.Collective(
        topo.world, timeout=config.placement_timeout, on_wait=waiting
    ):  # copies between nodes
        for src, meta, win in zip(sources, metas, windows, strict=True):
            what = f"exchanging {src.name!r} between nodes"
            if not src.parallel:
                clock.exchanged += _between_nodes(topo, win, config, what)
            elif _collective(topo, config):
                shares, _ = _plan(topo, src, meta, readers, True)
                clock.exchanged += _exchange(topo, win, shares, config, what)
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
    topo: Topology, metas: Sequence[ArrayMeta], clock: _Clock, config: JobConfig, gather: bool
) -> PlacementStats:
    """Placement's figures; every rank's too when ``gather`` (then collective on world)."""
    ranks: tuple[RankStats, ...] = ()
    if gather:
        worked = topo.node.Get_rank() < _readers(topo, config) or topo.rank == 0
        worked = worked or (topo.is_leader and topo.n_nodes > 1)
        filling = clock.steps["read"] + clock.steps["broadcast"]
        mine = RankStats(topo.rank, clock.own, filling - clock.own, clock.cpu_used(), worked)
        ranks = tuple(topo.world.allgather(mine))
    traffic = topo.world.allreduce((clock.file_bytes, clock.rchar, clock.exchanged), op=_add_tuples)
    return PlacementStats(
        n_inputs=len(metas),
        nbytes=sum(m.nbytes for m in metas),
        n_nodes=topo.n_nodes,
        total=time.perf_counter() - clock.start,
        ranks=ranks,
        read_mode="collective" if _collective(topo, config) else "per-node",
        file_bytes=traffic[0],
        rchar=traffic[1],
        exchanged=traffic[2],
        **clock.steps,
    )


def _add_tuples(a: tuple[int, ...], b: tuple[int, ...], datatype: object = None) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _log_summary(stats: PlacementStats, sources: Sequence[Source], metas: Sequence[ArrayMeta]) -> None:
    rate = stats.nbytes / max(stats.read, 1e-9)
    all_files = all(s.parallel for s in sources)
    verb = "read" if all_files else "read/written"
    parts = [
        f"allocate {format_time(stats.allocate)}",
        f"{verb} {format_time(stats.read)} at {format_bytes(int(rate))}/s",
    ]
    if stats.exchanged:
        parts.append(
            f"between nodes {format_time(stats.broadcast)}, {format_bytes(stats.exchanged)} exchanged"
        )
    files = sum(m.nbytes for src, m in zip(sources, metas, strict=True) if src.parallel)
    if files:
        parts.append(
            f"{stats.read_mode} reading: {format_bytes(stats.file_bytes)} read from files, "
            f"{stats.file_bytes / files:.2f}x the file inputs"
        )
    logger.info(
        f"placed {stats.n_inputs} input(s), {format_bytes(stats.nbytes)} per node on {stats.n_nodes} "
        f"node(s), in {format_time(stats.total)} ({'; '.join(parts)})"
    )


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
    runs once, on world rank 0, and its bytes go to the other nodes' leaders.
    An error on any rank is raised on every rank, after freeing what was
    allocated. With ``gather_stats``, every rank's figures are gathered into
    the result's :class:`PlacementStats` (one more collective).
    """
    chatty = topo.rank == 0 and not config.quiet
    clock = _Clock()
    metas = _describe(topo, sources, config)
    clock.step("describe")
    _check_capacity(topo, metas, config)
    clock.step("capacity")
    windows = _allocate(topo, sources, metas, config)
    clock.step("allocate")
    total = sum(m.nbytes for m in metas)
    if chatty and total >= _PIECE:
        logger.info(
            f"placing {len(metas)} input(s), {format_bytes(total)} per node, on {topo.n_nodes} node(s)"
        )
    try:
        clock.restart_cpu()
        placing = _Placing(topo, sources, metas, windows, config, clock, _all_readers(topo, config))
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
        _log_summary(placement.stats, sources, metas)
    return placement
