"""put and free on a Dask cluster hpcshare did not start (LocalCluster, ``dask worker``, dask-jobqueue).

:func:`hpcshare.put` comes here when no hpcshare MPI job runs in the
process: in a task it uses the worker it runs on
(``distributed.get_worker()``), elsewhere the default client
(``distributed.get_client()``). :func:`ensure` registers hpcshare's
plugins with the scheduler the first time (:mod:`.plugins`).

A put writes the object once into the putter's group
(:func:`.copies.write`): a task's worker writes its own group's file, a
client that sees a live group's shared-memory directory (a LocalCluster,
a client on a worker's host) writes it itself, and a client that sees none
(a login node) sends it once to one worker, which writes its group's file.
Other groups fetch it on first resolve. Room is checked in every group before anything is
allocated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes

from .. import codec
from ..errors import CapacityError, HpcshareError
from ..handles import ArrayHandle, Handle, ObjectHandle
from ..layout import memory_order
from . import copies, files, groups, plugins

if TYPE_CHECKING:
    from distributed import Client, Worker

    from .groups import Member

__all__ = ["NO_CLUSTER", "ensure", "free", "put"]

NO_CLUSTER = (
    "hpcshare.put works only inside a running hpcshare job or with a Dask cluster: "
    "(1) any Dask cluster: make a distributed.Client first (Client(), LocalCluster, SLURMCluster, "
    "a scheduler's address) and call hpcshare.put in that program or in a task; "
    "(2) an MPI job: in main or a task of `python -m hpcshare job` or hpcshare.run()."
)


def _current_worker() -> Worker | None:
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _cluster_of(dask_scheduler: Any) -> str | None:
    side = dask_scheduler.plugins.get(files.PLUGIN)
    return getattr(side, "cluster", None)


def ensure(client: Client) -> str:
    """The cluster's name; registers hpcshare's plugins first if the scheduler has none (local to the client).

    Registered with the scheduler, so workers and nannies that join later get them too.
    """
    cluster = client.run_on_scheduler(_cluster_of)
    if cluster is None:
        client.register_plugin(plugins.SchedulerSide(files.new_token()))
        cluster = client.run_on_scheduler(_cluster_of)  # a concurrent client's, if it came first
        client.register_plugin(plugins.WorkerSide(cluster))
        client.register_plugin(plugins.NannySide(cluster))
    return str(cluster)


def _handle(cluster: str, name: str, enc: codec.Encoded, obj: Any) -> Handle:
    generation = files.generation_of(cluster)
    if enc.kind == "ndarray":
        return ArrayHandle(name, obj.shape, obj.dtype, memory_order(obj), generation, stored=True)
    return ObjectHandle(name, generation, enc.kind, enc.nbytes, enc.summary)


def _write(member: Member, enc: codec.Encoded, what: str, other_groups: list[str]) -> str:
    """Check room here and in ``other_groups``' answers, then write the object; its name."""
    if other_groups:
        raise CapacityError("; ".join(other_groups))
    copies.check_room(member, enc.nbytes, what)
    name = files.new_token()
    copies.write(member, name, enc.nbytes, enc.write_into, what)
    return name


def _described(enc: codec.Encoded) -> str:
    return f"hpcshare.put of {enc.summary} ({format_bytes(enc.nbytes)})"


def put(obj: Any) -> Handle:
    """Hold ``obj`` once per group of the cluster; its handle (local to the caller)."""
    from distributed import get_client

    worker = _current_worker()
    if worker is not None:
        side = worker.plugins.get(files.PLUGIN)
        if not isinstance(side, plugins.WorkerSide):  # the cluster's first put, in a task
            ensure(get_client())
            side = worker.plugins.get(files.PLUGIN)
        if isinstance(side, plugins.WorkerSide):
            return _put_in_task(worker, side, obj)
    try:
        client = get_client()
    except ValueError:
        raise HpcshareError(NO_CLUSTER) from None
    return put_from_client(client, obj)


def _put_in_task(worker: Worker, side: plugins.WorkerSide, obj: Any) -> Handle:
    from distributed.utils import sync

    enc = codec.encode(obj)
    what = _described(enc)
    member = side.member
    refusals = sync(
        worker.loop, worker.scheduler.hpcshare_room, nbytes=enc.nbytes, what=what, group=member.group
    )
    name = _write(member, enc, what, refusals)
    side.copies.hold(name)
    key = worker.get_current_task()
    sync(
        worker.loop,
        worker.scheduler.hpcshare_register,
        name=name,
        group=member.group,
        nbytes=enc.nbytes,
        key=key,
    )
    return _handle(side.cluster, name, enc, obj)


def put_from_client(client: Client, obj: Any) -> Handle:
    """:func:`put` in the client's program (local to the client).

    A client that sees a live group's shared-memory directory writes the
    object there itself; one that sees none (a login node, a container of
    its own) pushes it (:func:`_push`).
    """
    cluster = ensure(client)
    enc = codec.encode(obj)
    what = _described(enc)
    with groups.joined(groups.shm_dir(), cluster) as member:
        if member is not None:
            refusals = client.sync(
                client.scheduler.hpcshare_room, nbytes=enc.nbytes, what=what, group=member.group
            )
            name = _write(member, enc, what, refusals)
            client.sync(
                client.scheduler.hpcshare_register,
                name=name,
                group=member.group,
                nbytes=enc.nbytes,
                client=client.id,
            )
            return _handle(cluster, name, enc, obj)
    return _push(client, obj, what)


def _put_here(obj: Any) -> Handle:
    return put(obj)


def _push(client: Client, obj: Any, what: str) -> Handle:
    """Send ``obj`` once, to one worker, which puts it into its group (local to the client).

    The bytes leave the client once (``scatter`` to that worker, over the
    cluster's comms); other groups fetch from that group on first resolve.
    The worker holds the scattered object privately only until its put
    returns. The object is this client's, as if it had written it. If that
    worker dies or leaves before its put returns (its ``.part`` file is
    swept), the client sends the object to the next worker.
    """
    from concurrent.futures import CancelledError

    from distributed.scheduler import KilledWorker

    workers = sorted(client.scheduler_info()["workers"])
    if not workers:
        raise HpcshareError(
            f"{what}: this client sees no worker's shared memory and the cluster has no worker to send "
            "it to yet; wait for workers (client.wait_for_workers(1)) and put again"
        )
    lost = []
    for target in workers:
        try:
            return _push_to(client, obj, target)
        except (CancelledError, KilledWorker, OSError) as exc:  # that worker died or left meanwhile
            lost.append(f"{target} ({type(exc).__name__}: {exc})")
    raise HpcshareError(
        f"{what}: every worker it was sent to died or left before it held it: {'; '.join(lost)}. "
        "Put it again once the cluster has workers that stay."
    )


def _push_to(client: Client, obj: Any, target: str) -> Handle:
    import uuid

    [scattered] = client.scatter([obj], workers=[target], hash=False)
    try:
        pushed = client.submit(
            _put_here,
            scattered,
            key=f"hpcshare-push-{uuid.uuid4().hex}",
            workers=[target],
            allow_other_workers=False,
            pure=False,
        )
        return pushed.result()
    finally:
        scattered.release()


def free(handle: Handle) -> None:
    """Free a cluster's object in every group (local to the client; the workers release it)."""
    from distributed import default_client

    client = default_client()
    client.sync(client.scheduler.hpcshare_free, name=handle.name)
