"""Placement: every input read once per node into a shared window, before Dask starts."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import mmap
import os
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.utils import format_bytes, format_time

from . import _sync
from .errors import HpcshareError, InputError
from .handles import Handle, _register, _unregister
from .loaders import ArrayMeta, Source, _split
from .windows import NodeWindow, check_capacity

if TYPE_CHECKING:
    from .config import JobConfig
    from .topology import Topology

__all__ = ["PlacedInput", "Placement", "place_inputs"]

_PIECE = 64 * 2**20  # bytes read between progress checks
_PROGRESS_EVERY = 2.0  # seconds between progress lines
_BCAST_PIECE = 256 * 2**20  # bytes per broadcast message between node leaders


def log(message: str) -> None:
    """Print one hpcshare status line to stderr (local)."""
    print(f"hpcshare: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class PlacedInput:
    """One input, placed: its metadata, its window on this node, its handle."""

    source: Source
    meta: ArrayMeta
    window: NodeWindow
    handle: Handle


@dataclasses.dataclass
class Placement:
    """All inputs of a job on this rank. End with :meth:`free` (collective on world)."""

    inputs: dict[str, PlacedInput]
    timings: dict[str, float]
    #: per rank: seconds reading its own share, seconds waiting for the others,
    #: CPU seconds during reading and waiting, and whether it read or sent data
    ranks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def handles(self) -> dict[str, Handle]:
        return {name: p.handle for name, p in self.inputs.items()}

    @property
    def nbytes(self) -> int:
        """Bytes one node holds for all inputs."""
        return sum(p.meta.nbytes for p in self.inputs.values())

    def free(self) -> None:
        """Unregister and free every window, last placed first (collective). Idempotent."""
        for name in reversed(list(self.inputs)):
            _unregister(name)
            self.inputs[name].window.free()


class _Progress:
    """Progress lines for one rank's share of a long read."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and self.total and now - self.last >= _PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log(
                f"reading {self.name!r}: {100 * self.done / self.total:.0f}% of this rank's "
                f"{format_bytes(self.total)} ({format_bytes(int(rate))}/s)"
            )


def _readers(topo: Topology, config: JobConfig) -> int:
    if config.readers is not None:
        return min(config.readers, topo.node.Get_size())
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(topo.node.Get_size(), cpus))


_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PREFAULT = os.environ.get("HPCSHARE_PREFAULT", "1") == "1"  # for measuring; see docs/benchmarks.md


def _prefault(out: np.ndarray, start: int, stop: int) -> None:
    """Allocate the pages of ``out[start:stop]`` in one call (local; best effort).

    First-touch faults on shared memory cost about 1 s per GiB on one core;
    the kernel populates the same pages faster, and each reader does its own
    share, so the node's cores split the work.
    """
    if stop <= start:
        return
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    addr = out.ctypes.data + start
    lo = addr - addr % page
    length = ctypes.c_size_t(addr + (stop - start) - lo)
    # huge pages, where the administrator allows them for shared memory
    # (/sys/kernel/mm/transparent_hugepage/shmem_enabled: advise or within_size)
    libc.madvise(ctypes.c_void_p(lo), length, _MADV_HUGEPAGE)
    libc.madvise(ctypes.c_void_p(lo), length, _MADV_POPULATE_WRITE)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


def _read_parallel(
    topo: Topology, src: Source, meta: ArrayMeta, out: np.ndarray, readers: int, chatty: bool, prefault: bool
) -> None:
    """Read this rank's pieces of ``src`` (local; the node's readers together read all)."""
    pieces = src.slabs(meta, max(readers, -(-meta.nbytes // _PIECE)))
    me = topo.node.Get_rank()
    if me >= readers or not pieces:
        return
    per = -(-len(pieces) // readers)
    mine = pieces[me * per : (me + 1) * per]
    if not mine:  # fewer pieces than readers (a small or single-chunk input)
        return
    progress = _Progress(src.name, sum(b - a for a, b in mine), chatty)
    if prefault:
        _prefault(out, mine[0][0], mine[-1][1])
    for a, b in mine:
        src.read_slab(meta, out, a, b)
        progress.add(b - a)


def _broadcast_between_nodes(topo: Topology, window: NodeWindow) -> None:
    """Copy node 0's window into every other node's, once per node (collective on leaders)."""
    from mpi4py import MPI

    if topo.leaders == MPI.COMM_NULL or topo.n_nodes < 2:
        return
    data = window.bytes()
    for a in range(0, window.nbytes, _BCAST_PIECE):
        piece = data[a : a + _BCAST_PIECE]
        _sync.wait(topo.leaders.Ibcast([piece, MPI.BYTE], root=0), what="node 0's leader")


@contextlib.contextmanager
def _naming(src: Source) -> Iterator[None]:
    """Turn a failure while reading or filling ``src`` into an error that names the input."""
    try:
        yield
    except HpcshareError:
        raise
    except Exception as exc:
        raise InputError.from_failure(src.name, f"placing {src.text} failed with", exc) from exc


def place_inputs(topo: Topology, sources: Sequence[Source], config: JobConfig, generation: str) -> Placement:
    """Place every input once per node (collective on ``topo.world``).

    Metadata is learned on world rank 0 and broadcast; each node's shared
    memory is checked before anything is allocated; files are read straight
    into the window by the node's readers in parallel slabs; a function source
    runs once, on world rank 0, and its bytes go to the other nodes' leaders.
    An error on any rank is raised on every rank, after freeing what was
    allocated.
    """
    world = topo.world
    chatty = topo.rank == 0 and not config.quiet
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    metas: list[ArrayMeta] | None = None
    with _sync.Collective(world):
        if topo.rank == 0:
            metas = [src.describe() for src in sources]
    metas = _sync.bcast(world, metas)
    assert metas is not None
    timings["describe"] = time.perf_counter() - t0
    total = sum(m.nbytes for m in metas)

    # Capacity, per physical host: emulated nodes on one host share its /dev/shm.
    nodes_here = topo.host.allreduce(1 if topo.is_leader else 0)
    with _sync.Collective(world):
        if topo.host.Get_rank() == 0 and total:
            what = f"{len(metas)} input(s) x {nodes_here} node(s) on this host"
            check_capacity(config.shm_dir, total * nodes_here, config.shm_headroom, what)

    placed: dict[str, PlacedInput] = {}
    placement = Placement(placed, timings)
    try:
        t = time.perf_counter()
        windows: list[NodeWindow] = []
        for src, meta in zip(sources, metas, strict=True):
            with _sync.Collective(world):
                windows.append(NodeWindow.allocate(topo.node, meta.nbytes, src.name))
            placed[src.name] = PlacedInput(src, meta, windows[-1], None)  # type: ignore[arg-type]
        timings["allocate"] = time.perf_counter() - t

        t = time.perf_counter()
        if chatty and total >= _PIECE:
            log(f"placing {len(metas)} input(s), {format_bytes(total)} per node, on {topo.n_nodes} node(s)")
        readers = _readers(topo, config)
        cpu = time.process_time()
        with _sync.Collective(world):
            for src, meta, win in zip(sources, metas, windows, strict=True):
                with _naming(src):
                    if src.parallel:
                        _read_parallel(topo, src, meta, win.bytes(), readers, chatty, _PREFAULT)
                        continue
                    # one rank writes (rank 0) or receives (a leader); the readers
                    # allocate the pages meanwhile, in parallel
                    if _PREFAULT and topo.node.Get_rank() < readers:
                        shares = _split(meta.nbytes, readers, mmap.PAGESIZE)
                        if topo.node.Get_rank() < len(shares):
                            _prefault(win.bytes(), *shares[topo.node.Get_rank()])
                    if topo.rank == 0:
                        src.fill(meta, win.bytes())
            own_read = time.perf_counter() - t
        timings["read"] = time.perf_counter() - t
        wait = timings["read"] - own_read

        t = time.perf_counter()
        with _sync.Collective(world):
            for src, win in zip(sources, windows, strict=True):
                if not src.parallel:
                    _broadcast_between_nodes(topo, win)
                win.sync()  # publish this rank's writes before the others read
            own_bcast = time.perf_counter() - t
        timings["broadcast"] = time.perf_counter() - t
        wait += timings["broadcast"] - own_bcast
        cpu = time.process_time() - cpu
        for win in windows:
            win.sync()  # and see theirs
    except BaseException as exc:
        # the traceback's frames hold views of the windows; drop them so free() can unmap
        seen: BaseException | None = exc
        while seen is not None:  # the chained errors' frames too
            traceback.clear_frames(seen.__traceback__)
            seen = seen.__cause__ or seen.__context__
        placement.free()
        raise

    for src, meta, win in zip(sources, metas, windows, strict=False):
        view = win.bytes()[: meta.nbytes].view(meta.dtype).reshape(meta.shape, order=meta.order)  # type: ignore[call-overload]
        _register(src.name, generation, view)
        handle = Handle(src.name, meta.shape, meta.dtype, meta.order, generation)
        placed[src.name] = PlacedInput(src, meta, win, handle)
    timings["total"] = time.perf_counter() - t0
    did_work = topo.node.Get_rank() < readers or topo.rank == 0 or (topo.is_leader and topo.n_nodes > 1)
    mine = {"rank": topo.rank, "read": own_read, "wait": wait, "cpu": cpu, "worked": did_work}
    placement.ranks = world.allgather(mine)
    if chatty and metas:
        rate = total / max(timings["read"], 1e-9)
        verb = "read" if all(s.parallel for s in sources) else "read/written"
        parts = [
            f"allocate {format_time(timings['allocate'])}",
            f"{verb} {format_time(timings['read'])} at {format_bytes(int(rate))}/s",
        ]
        if topo.n_nodes > 1 and not all(s.parallel for s in sources):
            parts.append(f"between nodes {format_time(timings['broadcast'])}")
        log(
            f"placed {len(metas)} input(s), {format_bytes(total)} per node on {topo.n_nodes} node(s), "
            f"in {format_time(timings['total'])} ({', '.join(parts)})"
        )
    return placement
