"""The runtime-sharing API: :func:`put`, :func:`submit`, :func:`free`.

Objects made while the job runs (in ``main`` or in a task) are held once
per node, like the inputs placed at launch; tasks get a small handle.
"""

from __future__ import annotations

import uuid
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import context, store
from .anywhere.files import is_cluster_generation
from .handles import Handle
from .registry import freed_because

if TYPE_CHECKING:
    from distributed import Client, Future

    from .context import JobContext

__all__ = ["free", "put", "submit"]


def put(obj: Any) -> Handle:
    """Place ``obj`` once on every node of the job, or of the Dask cluster; return its handle.

    Call it in ``main`` (the client rank) or in a task on one of the job's
    workers; outside an hpcshare job, in a program with a Dask client or in
    a task on its cluster (any Dask cluster: see :mod:`hpcshare.anywhere`).
    In a job it returns when every node holds the object; on a Dask
    cluster, when the putter's group of workers does (other groups fetch it
    on first use). ``obj`` is a NumPy
    array, a pandas DataFrame or Series, or a pyarrow Table, RecordBatch,
    Array or ChunkedArray. ``handle.resolve()`` in a task gives it back
    zero-copy over the task's node's copy (read-only).

    Raises
    ------
    hpcshare.CapacityError
        Before anything is allocated, when a node's shared memory cannot hold it.
    hpcshare.InputError
        For types and columns that cannot live in shared memory (Python objects).
    """
    job = context.current()
    if job is None or job.exchange is None:  # not in an hpcshare job: the Dask cluster this process is in
        from .anywhere import api

        return api.put(obj)
    _warn_if_put_before(job, obj)
    handle = job.exchange.put(obj)
    _remember_put(job, obj, handle)
    return handle


def _warn_if_put_before(job: JobContext, obj: Any) -> None:
    """Warn when ``obj`` itself was put by this process and its copy is still held (local)."""
    entry = job.puts.get(id(obj))
    if entry is None or entry[0]() is not obj:
        return
    before = entry[1]
    if freed_because(before.name, before.generation) is not None:
        return
    warnings.warn(
        f"hpcshare.put: this object was put before ({before!r}) and is still held: this put makes "
        "a second copy on every node. Pass the first handle to tasks again, or hpcshare.free() it "
        "first if the object has changed since.",
        RuntimeWarning,
        stacklevel=3,
    )


def _remember_put(job: JobContext, obj: Any, handle: Handle) -> None:
    key, puts = id(obj), job.puts
    try:
        ref = weakref.ref(obj, lambda _: puts.pop(key, None))
    except TypeError:  # objects that take no weak reference (some Arrow types) are not tracked
        return
    puts[key] = (ref, handle)


def _put_result(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Handle:
    return put(fn(*args, **kwargs))


def submit(client: Client, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``client.submit(fn, *args, **kwargs)``, whose result is put once per node.

    The worker that runs ``fn`` puts its result; the future's value is the
    :class:`Handle`, so ``client.map(process, [future] * n)`` sends every task
    the handle, never the data. The task is never cached by Dask (pure=False).
    """
    job = context.current()
    if job is None or job.exchange is None:  # any Dask cluster: hpcshare's plugins before the task runs
        from .anywhere import api

        api.ensure(client)
    name = getattr(fn, "__name__", "task")
    key = f"hpcshare-put-{name}-{uuid.uuid4().hex}"
    return client.submit(_put_result, fn, args, kwargs, key=key, pure=False)


def free(handle: Handle) -> None:
    """Free an object put while the job runs, on every node (call it in ``main``).

    Afterwards every resolve of ``handle`` raises :class:`~hpcshare.ResolveError`
    saying it was freed. Views a task already holds stay valid until they are
    dropped: the files are unlinked, not unmapped, so their memory returns to
    the node only then. Objects not freed are freed when the job ends.
    """
    from distributed import default_client

    from .handles import ArrayHandle, ObjectHandle

    if not isinstance(handle, Handle):
        from .codec import describe

        raise TypeError(
            f"hpcshare.free takes the handle hpcshare.put or hpcshare.submit returned, got "
            f"{describe(handle)}; free the handle (h = hpcshare.put(df); ...; hpcshare.free(h))"
        )
    if not (isinstance(handle, ObjectHandle) or (isinstance(handle, ArrayHandle) and handle.stored)):
        raise TypeError(
            f"hpcshare.free takes a handle from hpcshare.put or hpcshare.submit, got {handle!r}; "
            "inputs placed at launch live until the job ends"
        )
    if is_cluster_generation(handle.generation):
        from .anywhere import api

        api.free(handle)
        return
    client = default_client()
    client.run(store.release, handle.name, handle.generation)
    client.run_on_scheduler(store.release, handle.name, handle.generation)
    store.release(handle.name, handle.generation)
