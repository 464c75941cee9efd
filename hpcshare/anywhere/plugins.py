"""hpcshare on a Dask cluster it did not start: a scheduler, a worker and a nanny plugin.

:func:`hpcshare.anywhere.api.ensure` registers all three with the scheduler
on first use (``client.register_plugin``), which also hands them to workers
and nannies that join later (adaptive scaling, a Nanny's restart).

- :class:`SchedulerSide` keeps the cluster's name (a random token), which
  group each worker is in, and for each object its size, the groups that
  hold it and the clients that own it. It frees an object on
  :func:`hpcshare.free` and when every client that put it has closed or
  disconnected, by telling every worker to release it.
- :class:`WorkerSide` joins the worker's group (:mod:`.groups`), serves
  pieces of its group's files to other groups (:mod:`.transfer`), releases
  objects, and has Dask's memory monitor measure private memory
  (:class:`~hpcshare.memory.PrivateMemory`). Leaving sweeps the group's
  files if it was the last member.
- :class:`NannySide` holds the group too (so a worker's restart does not
  drop the group's files) and has the Nanny's restart check compare the
  worker's *private* memory with its limit. A closing nanny sweeps the
  group again once its worker process has ended: a worker that Dask kills
  because it did not close in time (its own teardown never runs) still
  leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin
from tornado.ioloop import PeriodicCallback

from ..memory import PrivateMemory, private_memory
from ..sync import WaitTimeout, poll
from . import files, groups, lifetimes, transfer
from .copies import Copies

if TYPE_CHECKING:
    from distributed import Nanny, Scheduler, Worker

__all__ = ["FREED", "NannySide", "SchedulerSide", "WorkerSide"]

FREED = (
    "it was freed by hpcshare.free(). Views taken before that stay valid until dropped; "
    "put it again if tasks still need it."
)
CLIENT_GONE = "the client that put it ({client}) closed or disconnected, which frees its objects."
CLUSTER_GONE = "the cluster that held it has closed."
_WORKER_END = 60.0  # s a closing nanny waits for its worker process to end, to sweep after it
_NANNY_SIDES: weakref.WeakKeyDictionary[Nanny, NannySide] = weakref.WeakKeyDictionary()  #: each nanny's own


@dataclasses.dataclass
class _Object:
    nbytes: int
    groups: set[str]
    owners: set[str]


class SchedulerSide(SchedulerPlugin):
    """The cluster's table of groups and objects, on the scheduler (its handlers are local RPCs)."""

    name = files.PLUGIN
    idempotent = True  # a second client's registration keeps the first's table

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.group_of: dict[str, str] = {}  #: worker address -> group
        self.objects: dict[str, _Object] = {}
        self.freed: dict[str, str] = {}  #: name -> why
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update(
            hpcshare_cluster=lambda: self.cluster,
            hpcshare_join=self.join,
            hpcshare_register=self.register,
            hpcshare_sources=self.sources,
            hpcshare_holds=self.holds,
            hpcshare_room=self.room,
            hpcshare_free=self.free,
        )

    async def close(self) -> None:
        for name in list(self.objects):
            self.freed[name] = CLUSTER_GONE
        self.objects.clear()

    def join(self, worker: str, group: str) -> None:
        self.group_of[worker] = group

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self.group_of.pop(worker, None)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        for name, obj in list(self.objects.items()):
            if client in obj.owners:
                obj.owners.discard(client)
                if not obj.owners:
                    task = asyncio.ensure_future(self.free(name, CLIENT_GONE.format(client=client)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    def register(
        self, name: str, group: str, nbytes: int, client: str | None = None, key: Any = None
    ) -> None:
        """A new object in ``group``, owned by ``client`` or by the clients that want task ``key``."""
        owners = {client} if client else set()
        ts = self.scheduler.tasks.get(key) if key is not None else None
        if ts is not None:
            owners |= {cs.client_key for cs in ts.who_wants or ()}
        self.objects[name] = _Object(nbytes, {group}, owners)

    def holds(self, name: str, group: str) -> None:
        obj = self.objects.get(name)
        if obj is not None:
            obj.groups.add(group)

    def sources(self, name: str) -> dict[str, Any]:
        """The workers that hold ``name`` now, its size, or why it cannot be had."""
        obj = self.objects.get(name)
        if obj is None:
            why = self.freed.get(
                name, "this cluster has no object of that name (it comes from another cluster)."
            )
            return {"why": why, "nbytes": 0, "sources": []}
        holders = [w for w, g in self.group_of.items() if g in obj.groups]
        if not holders:
            return {"why": "every worker that held it has left the cluster.", "nbytes": 0, "sources": []}
        return {"why": None, "nbytes": obj.nbytes, "sources": holders}

    async def room(self, nbytes: int, what: str, group: str | None = None) -> list[str]:
        """Why groups other than ``group`` could not hold ``nbytes`` more (one worker of each answers)."""
        one_each = {g: w for w, g in self.group_of.items() if g != group}
        answers = await asyncio.gather(
            *(self.scheduler.rpc(w).hpcshare_room(nbytes=nbytes, what=what) for w in one_each.values()),
            return_exceptions=True,
        )
        return [a for a in answers if isinstance(a, str)]

    async def free(self, name: str, why: str = FREED) -> None:
        """Forget ``name`` and have every worker release it (idempotent)."""
        self.freed[name] = why
        if self.objects.pop(name, None) is not None:
            await self.scheduler.broadcast(msg={"op": "hpcshare_release", "name": name}, on_error="ignore")


class WorkerSide(WorkerPlugin):
    """A worker's membership of its group, its copies, and its handlers (see the module)."""

    name = files.PLUGIN
    idempotent = True
    member: groups.Member
    copies: Copies
    worker: Worker

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    async def setup(self, worker: Worker) -> None:
        where = groups.shm_dir()
        lifetimes.sweep(where)  # what dead clusters left on this host
        self.member = groups.join(where, self.cluster)
        self.copies = Copies(self.member)
        self.worker = worker
        self._memory = PrivateMemory()
        self._memory.setup(worker)
        self.traffic = {"served": 0, "fetched": 0}  #: bytes this worker sent to / read from other groups
        # handlers are named functions (bound methods): distributed logs each handler's __name__
        self._handlers: dict[str, Callable[..., Any]] = {
            "hpcshare_piece": self._serve_piece,
            "hpcshare_room": self._room,
            "hpcshare_release": self.copies.release,
            "hpcshare_hold": self.copies.hold,
        }
        worker.handlers.update(self._handlers)
        await worker.scheduler.hpcshare_join(worker=worker.address, group=self.member.group)

    def _serve_piece(self, name: str, offset: int, size: int) -> bytes:
        piece = transfer.serve_piece(self.member, name, offset, size)
        self.traffic["served"] += len(piece)
        return piece

    def _room(self, nbytes: int, what: str) -> str | None:
        return transfer.room(self.member, nbytes, what)

    def fetch(self, name: str, what: str, timeout: float) -> None:
        """Copy ``name`` into this worker's group from another group (see :func:`.transfer.fetch`)."""
        self.traffic["fetched"] += transfer.fetch(self.worker, self.member, name, what, timeout)

    def teardown(self, worker: Worker) -> None:
        from distributed.core import Status

        if worker.status not in (Status.closing, Status.closing_gracefully, Status.closed):
            for name in getattr(
                self, "_handlers", {}
            ):  # a closing worker keeps them: releases may still come
                worker.handlers.pop(name, None)
        if hasattr(self, "member"):
            self._memory.teardown(worker)
            self.copies.clear()
            self.member.leave()
            lifetimes.sweep(self.member.shm_dir, self.cluster)  # the last member removes the group's files


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists, also as a zombie: a killed process's other threads may still
    hold its files (and locks) after its first thread shows as a zombie; it is gone once reaped."""
    import psutil

    return bool(psutil.pid_exists(pid))


class NannySide(NannyPlugin):
    """A nanny holds its worker's group, and restarts it on private memory only (see the module)."""

    name = files.PLUGIN
    idempotent = True
    member: groups.Member
    _dask_check: PeriodicCallback | None = None

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def setup(self, nanny: Nanny) -> None:
        where = groups.shm_dir()
        lifetimes.sweep(where)
        self.member = groups.join(where, self.cluster)
        # Dask's Nanny.plugin_add replaces a plugin of the same name without tearing the old one
        # down (a nanny that registers while the plugin is being registered gets it twice): the
        # old one's lock would live as long as the nanny's process, and nobody would sweep after
        replaced = _NANNY_SIDES.get(nanny)
        if replaced is not None:
            replaced._release(nanny)
        _NANNY_SIDES[nanny] = self
        self._swap_memory_check(nanny)

    def _release(self, nanny: Nanny) -> None:
        """Give Dask its own memory check back (running if ours ran) and leave the group."""
        callbacks = nanny.periodic_callbacks
        if self._dask_check is not None:
            ours = callbacks.get("memory_monitor")
            if ours is not None and ours.is_running():
                ours.stop()
                self._dask_check.start()
            callbacks["memory_monitor"] = self._dask_check
            self._dask_check = None
        if hasattr(self, "member"):
            self.member.leave()

    def teardown(self, nanny: Nanny) -> None:
        if _NANNY_SIDES.get(nanny) is self:
            del _NANNY_SIDES[nanny]
        self._release(nanny)
        if hasattr(self, "member"):
            lifetimes.sweep(self.member.shm_dir, self.cluster)  # a worker that closes later sweeps too
            # Dask tears nanny plugins down before it stops the worker process, and kills a worker
            # that does not close in time: then the worker's own teardown never runs, so sweep
            # again once that process has ended. Not a daemon: the nanny's process waits for it.
            process = nanny.process.process if nanny.process is not None else None
            pid = process.pid if process is not None else None
            threading.Thread(target=self._sweep_after, args=(pid,), name="hpcshare-nanny-sweep").start()

    def _sweep_after(self, pid: int | None) -> None:
        """Sweep the group once worker process ``pid`` has ended (if nobody else holds it then).

        Workers that Dask kills together end a few milliseconds apart, so
        the first to end finds the others still holding the marker: the
        sweep tries again while only ending processes (gone, or zombies whose
        last threads still exit) hold it (:func:`.lifetimes.sweep_when_unheld`).
        """
        if pid is not None:
            try:
                poll(lambda: not _alive(pid), timeout=_WORKER_END, what=f"worker process {pid} to end")
            except WaitTimeout:  # still alive: it holds the group itself, and sweeps as it leaves
                return
        lifetimes.sweep_when_unheld(self.member.shm_dir, self.cluster)

    def _swap_memory_check(self, nanny: Nanny) -> None:
        """Run Dask's restart check only when the worker's private memory is over the threshold.

        Dask's check (``NannyMemoryManager.memory_monitor``) measures RSS,
        which counts every shared page the worker touched; it is called, and
        restarts the worker, only once its private memory alone is over
        ``distributed.worker.memory.terminate`` of its limit.
        """
        self._dask_check = dask_check = nanny.periodic_callbacks.get("memory_monitor")
        if dask_check is None:  # no limit, or restarts turned off
            return
        manager = nanny.memory_manager

        def check() -> None:
            process = nanny.process.process if nanny.process is not None else None
            limit, fraction = manager.memory_limit, manager.memory_terminate_fraction
            if process is None or process.pid is None or not limit or fraction is False:
                return
            try:
                private = private_memory(process.pid)
            except Exception:  # the worker ended meanwhile
                return
            if private > fraction * limit:
                manager.memory_monitor(nanny)

        ours = PeriodicCallback(check, dask_check.callback_time)
        running = dask_check.is_running()
        dask_check.stop()
        nanny.periodic_callbacks["memory_monitor"] = ours
        if running:
            ours.start()
