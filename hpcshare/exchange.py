"""Putting objects on every node while the job runs, over MPI.

A put is point-to-point, never a collective: the rank that has the object
(the client in ``main``, or a worker in a task) writes its own node's file
(:mod:`hpcshare.store`), then sends the bytes once to one rank on each
other node, that node's leader, whose service thread writes that node's
file. Nothing waits on the Dask event loop or on a busy task, so nothing
can deadlock against them.

The protocol, on a communicator duplicated from the job's (so no message
mixes with anyone else's), per other node:

1. ``check``: the leader says whether its shared memory has room; any
   refusal ends the put before anything is allocated anywhere;
2. ``data``: the leader creates and allocates the file and answers
   ``ready``; once every node is ready the putter says ``go`` (or
   ``abort`` if one was not) and sends the bytes in pieces, each as soon as
   it is written into the putter's own file (writing here and receiving
   there overlap); the leader answers ``done`` once they are in;
3. on any failure the putter sends ``unlink`` to every node it reached and
   removes its own file: nothing is left behind.

Every wait is idle (short, growing sleeps; no spinning) and bounded by
``hpcshare.timeout``. Puts from one process go one at a time.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes

from . import codec, context, store, sync
from .errors import CapacityError, HpcshareError, NotShareable
from .handles import ArrayHandle, Handle, ObjectHandle
from .layout import memory_order, pieces
from .log import logger
from .memory import check_room

if TYPE_CHECKING:
    from mpi4py import MPI

    from .config import JobConfig
    from .loaders import TableSource
    from .topology import Topology

__all__ = ["Exchange", "current"]

_REQUEST, _REPLY, _DATA, _GO = 1, 2, 3, 4  # tags


def current() -> Exchange:
    """This process's exchange (raises outside a running hpcshare job)."""
    job = context.current()
    if job is None or job.exchange is None:
        raise HpcshareError(
            "hpcshare.put works only inside a running hpcshare job (in main or a task of "
            "`python -m hpcshare job` or hpcshare.run()), or on any Dask cluster with a "
            "distributed.Client (see the README: Any Dask cluster, without MPI)."
        )
    return job.exchange


@contextlib.contextmanager
def collective_phase() -> Iterator[None]:
    """Keep the leader's service thread out of MPI while the main thread runs collectives.

    With MPICH's netmod between nodes, a thread polling for put requests
    while the other ranks wait in dask-mpi's start-up barrier left that
    barrier unfinished in about half of the runs under Slurm (two nodes).
    No put can be in flight then: puts start once Dask runs.
    """
    begin_collective_phase()
    try:
        yield
    finally:
        end_collective_phase()


def begin_collective_phase() -> None:
    """The main thread is about to run collectives on world (Dask's start-up handshake)."""
    job = context.current()
    if job is not None:
        job.in_collective.set()


def end_collective_phase() -> None:
    """The main thread's collectives are over (dask-mpi's last start-up barrier passed)."""
    job = context.current()
    if job is not None:
        job.in_collective.clear()


def _receive(comm: MPI.Comm, source: int, tag: int, timeout: float, what: str) -> Any:
    """Receive a small pickled message, waiting idle, bounded by ``timeout`` (local)."""
    message = sync.poll(lambda: comm.improbe(source=source, tag=tag), timeout=timeout, what=what)
    return message.recv()


def _pieces(nbytes: int) -> list[tuple[int, int]]:
    return pieces(0, nbytes) or [(0, 0)]  # an empty object is still one (empty) message


class Exchange:
    """Puts on this rank and, on node leaders, the service that receives them.

    A context manager, collective on the job's ranks: entering duplicates the
    communicator and starts the service thread on each node's leader;
    leaving stops it and unlinks the node's object files.
    """

    def __init__(self, topo: Topology, config: JobConfig, generation: str, folder: str) -> None:
        self.topo, self.config, self.generation = topo, config, generation
        self.timeout = config.timeout
        self._put_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.comm: MPI.Intracomm | None = None
        self.leaders: dict[int, int] = {}  # node -> world rank of its leader
        self.nodes_on_host = 1
        self.threads_ok = True
        self.joined = store.Joined(folder, topo.node_index, owner=topo.is_leader)
        job = context.current()
        if job is None:
            raise HpcshareError("the put service runs only inside a running hpcshare job (hpcshare.run)")
        self.job = job

    # --- lifecycle ---

    def __enter__(self) -> Exchange:
        topo = self.topo
        self.comm = topo.world.Dup()
        placed = self.comm.allgather((topo.node_index, topo.is_leader, topo.hostname))
        self.leaders = {node: rank for rank, (node, lead, _) in enumerate(placed) if lead}
        self.nodes_on_host = sum(1 for _, lead, host in placed if lead and host == topo.hostname)
        self.joined.__enter__()
        from mpi4py import MPI

        self.threads_ok = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        if topo.is_leader and self.threads_ok:
            self._thread = threading.Thread(target=self._serve, name="hpcshare-exchange", daemon=True)
            self._thread.start()
        self.job.exchange = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.job.exchange = None
        assert self.comm is not None
        try:  # no put is in flight once every rank is here (bounded: a dead rank does not hang us)
            sync.barrier(self.comm, timeout=self.timeout, what="the other ranks to finish their puts")
            finished = True
        except sync.WaitTimeout:
            finished = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
        self.joined.__exit__(*exc)
        if finished:
            self.comm.Free()

    # --- the putter's side ---

    def put(self, obj: Any) -> Handle:
        """Place ``obj`` once on every node; return its handle (local to this rank, point-to-point)."""
        return self.put_encoded(codec.encode(obj))

    def put_source(self, source: TableSource) -> Handle:
        """Place a launch-time table input; an Arrow IPC file read as a table goes in as its bytes."""
        try:
            if source.file_bytes_shared():
                return self.put_encoded(codec.encode_arrow_file(source.path))
            return self.put_encoded(codec.encode(source.load()))
        except (NotShareable, CapacityError) as exc:
            raise type(exc)(f"input {source.name!r} ({source.text}): {exc}") from exc

    def put_encoded(self, enc: codec.Encoded) -> Handle:
        """Place an encoded object once on every node (local to this rank, point-to-point)."""
        if not self.threads_ok and len(self.leaders) > 1:
            raise HpcshareError(
                "hpcshare.put across nodes needs MPI_THREAD_MULTIPLE, which this MPI library "
                "did not provide; use an MPI built with thread support (MPICH, Open MPI 5, Intel MPI)"
            )
        with self._put_lock:
            name = store.new_name(self.topo.rank)
            what = f"hpcshare.put of {enc.summary} ({format_bytes(enc.nbytes)})"
            t = time.perf_counter()
            self._check_room(enc.nbytes, what)
            path = store.path_of(name)
            self._announce(name, enc.nbytes, what)  # the other nodes allocate while this one does
            try:
                mm = store.create(path, enc.nbytes, what)
            except BaseException:
                self._go(what, abort=True)
                raise
            try:
                self._go(what)  # a node that refused made nothing; the others unlink theirs on abort
            except BaseException:
                store.close_writable(mm)
                store.release(name, self.generation)
                raise
            try:
                view = self._write_and_send(path, mm, enc, what)
            except BaseException:
                self._unlink_everywhere(name)
                store.release(name, self.generation)
                raise
            finally:
                store.close_writable(mm)
            obj_here = _keep_mapped(name, self.generation, view)
            logger.debug("%s: on %d node(s) in %.3f s", what, len(self.leaders), time.perf_counter() - t)
        return self._handle(name, enc, obj_here)

    def _handle(self, name: str, enc: codec.Encoded, obj: Any) -> Handle:
        if enc.kind == "ndarray":
            return ArrayHandle(name, obj.shape, obj.dtype, memory_order(obj), self.generation, stored=True)
        return ObjectHandle(name, self.generation, enc.kind, enc.nbytes, enc.summary)

    def _check_room(self, nbytes: int, what: str) -> None:
        """Refuse before anything is allocated: here first, then every other node (point-to-point)."""
        check_room(self.config, nbytes * self.nodes_on_host, self._on_host(what))
        others = self._others()
        for leader in others.values():
            self._request(leader, ("check", nbytes, what))
        refusals = []
        for node, leader in others.items():
            answer = _receive(
                self.comm_(), leader, _REPLY, self.timeout, f"node {node}'s leader (rank {leader})"
            )
            if answer != "ok":
                refusals.append(f"node {node}: {answer}")
        if refusals:
            raise CapacityError("; ".join(refusals))

    def _announce(self, name: str, nbytes: int, what: str) -> None:
        """Ask every other node's leader to create the file (they answer, :meth:`_go` reads it)."""
        for leader in self._others().values():
            self._request(leader, ("data", name, nbytes, what))

    def _go(self, what: str, abort: bool = False) -> None:
        """Every other node's answer to :meth:`_announce`; then ``go`` to all, or ``abort`` (point-to-point)."""
        others = self._others()
        comm = self.comm_()
        refusals, ready = [], []
        for node, leader in others.items():
            answer = _receive(comm, leader, _REPLY, self.timeout, f"node {node}'s leader to allocate")
            if answer == "ready":
                ready.append(leader)
            else:
                refusals.append(f"node {node}: {answer}")
        for leader in ready:  # a node that refused waits for nothing more
            comm.send("abort" if refusals or abort else "go", dest=leader, tag=_GO)
        if refusals:
            full = all(r.split(": ", 2)[1] == CapacityError.__name__ for r in refusals)
            raise (CapacityError if full else HpcshareError)(f"{what}: {'; '.join(refusals)}")

    def _write_and_send(self, path: str, mm: mmap.mmap, enc: codec.Encoded, what: str) -> memoryview:
        """Write this node's file, sending each piece to the other nodes as soon as it is written."""
        with memoryview(mm) as dest:
            others = self._others()
            if not others:
                enc.write_into(dest)
            else:
                sender = _Sender(self.comm_(), list(others.values()), dest, self.timeout, what)
                try:
                    enc.write_into(dest, sender.written)
                finally:  # after a failure too: the leaders wait for every piece
                    sender.finish()
                for node, leader in others.items():
                    answer = _receive(
                        self.comm_(), leader, _REPLY, self.timeout, f"node {node}'s leader to store it"
                    )
                    if answer != "done":
                        raise HpcshareError(f"{what}, node {node}: {answer}")
        return store.map_readonly(path)  # mapped before the writable map goes (see _keep_mapped)

    def _unlink_everywhere(self, name: str) -> None:
        for leader in self._others().values():
            self._request(leader, ("unlink", name))

    def _on_host(self, what: str) -> str:
        n = self.nodes_on_host
        return what if n == 1 else f"{what} x {n} emulated nodes on this host"

    def _others(self) -> dict[int, int]:
        return {node: rank for node, rank in self.leaders.items() if node != self.topo.node_index}

    def comm_(self) -> MPI.Intracomm:
        assert self.comm is not None, "the exchange is not open"
        return self.comm

    def _request(self, leader: int, message: tuple[Any, ...]) -> None:
        request = self.comm_().issend(message, dest=leader, tag=_REQUEST)
        sync.wait(request, timeout=self.timeout, what=f"rank {leader} to take a put request")

    # --- the leader's service thread ---

    def _serve(self) -> None:
        from mpi4py import MPI

        comm = self.comm_()
        backoff = sync.Backoff()
        status = MPI.Status()
        in_collective = self.job.in_collective
        while not self._stop.is_set():
            if in_collective.is_set():  # the main thread is in a collective on world: stay out of MPI
                time.sleep(backoff.LONGEST)
                continue
            message = comm.improbe(tag=_REQUEST, status=status)
            if message is None:
                backoff.sleep()
                continue
            backoff.reset()
            source = status.Get_source()
            request = message.recv()
            try:
                answer = self._answer(source, request)
            except Exception as exc:  # report to the putter; the service goes on
                answer = f"{type(exc).__name__}: {exc}"
            if answer is not None:
                comm.send(answer, dest=source, tag=_REPLY)

    def _answer(self, source: int, request: tuple[Any, ...]) -> str | None:
        kind = request[0]
        if kind == "check":
            _, nbytes, what = request
            try:
                check_room(self.config, nbytes * self.nodes_on_host, self._on_host(what))
            except CapacityError as exc:
                return str(exc)
            return "ok"
        if kind == "data":
            _, name, nbytes, what = request
            return self._receive_file(source, name, nbytes, what)
        if kind == "unlink":
            store.release(request[1], self.generation)
            return None
        return f"unknown request {kind!r}"

    def _receive_file(self, source: int, name: str, nbytes: int, what: str) -> str | None:
        comm = self.comm_()
        path = store.path_of(name)
        try:
            mm = store.create(path, nbytes, what)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        try:
            comm.send("ready", dest=source, tag=_REPLY)
            if _receive(comm, source, _GO, self.timeout, f"rank {source} to send {what}") != "go":
                store.release(name, self.generation)  # another node had no room: nothing comes
                return None
            with memoryview(mm) as dest:
                requests = [
                    comm.Irecv([dest[a:b], b - a, _byte()], source=source, tag=_DATA)
                    for a, b in _pieces(nbytes)
                ]
                for request in requests:
                    sync.wait(request, timeout=self.timeout, what=f"rank {source} to send {what}")
                del requests
            _keep_mapped(name, self.generation, store.map_readonly(path))
        except BaseException as exc:
            store.release(name, self.generation)
            return f"{type(exc).__name__}: {exc}"
        finally:
            store.close_writable(mm)
        return "done"


class _Sender:
    """Sends a file's bytes to other nodes' leaders, piece by piece, as they are written."""

    def __init__(self, comm: MPI.Intracomm, leaders: list[int], data: memoryview, timeout: float, what: str):
        self.comm, self.leaders, self.data = comm, leaders, data
        self.timeout, self.what = timeout, what
        self.pieces = _pieces(len(data))
        self.posted = 0  #: pieces whose sends are posted
        self.requests: list[MPI.Request] = []

    def written(self, n: int) -> None:
        """The first ``n`` bytes are final: send every whole piece among them, and let MPI progress."""
        from mpi4py import MPI

        while self.posted < len(self.pieces) and self.pieces[self.posted][1] <= n:
            a, b = self.pieces[self.posted]
            for leader in self.leaders:
                self.requests.append(
                    self.comm.Isend([self.data[a:b], b - a, _byte()], dest=leader, tag=_DATA)
                )
            self.posted += 1
        MPI.Request.Testall(self.requests)

    def finish(self) -> None:
        """Send what is left and wait until every piece has gone (bounded by the timeout)."""
        try:
            self.written(len(self.data))
            for request in self.requests:
                sync.wait(request, timeout=self.timeout, what=f"the other nodes to receive {self.what}")
        finally:
            self.requests = []  # the buffers go with them, so the file's map can close


def _keep_mapped(name: str, generation: str, view: memoryview) -> Any:
    """Decode a node file and cache it here, so that this process maps the file until it is freed.

    A live file must always be mapped by someone: tools that sweep /dev/shm
    of files no process maps (``hpcshare bench``, test fixtures, site
    scripts) would otherwise take a file no task has resolved yet.
    """
    obj = codec.decode(view)
    store.remember(name, generation, obj)
    return obj


def _byte() -> Any:
    from mpi4py import MPI

    return MPI.BYTE
