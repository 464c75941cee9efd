"""Resolving a handle of a Dask cluster's object: the task path of :mod:`hpcshare.anywhere`.

In a task, the worker's :class:`~hpcshare.anywhere.plugins.WorkerSide`
holds the group: the object is decoded once per worker over its group's
file, which the first task of a group that needs it fetches from another
group (:mod:`.transfer`). Elsewhere (the client, a plain process on a
worker's host) the group's file is mapped if this process sees one.
No MPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import ResolveError
from . import files, groups
from .copies import map_copy

if TYPE_CHECKING:
    from ..handles import Handle
    from .plugins import WorkerSide

__all__ = ["resolve"]


def _describe(handle: Handle) -> str:
    return f"object {handle.name!r} ({getattr(handle, 'summary', None) or repr(handle)})"


def _worker_side(cluster: str) -> WorkerSide | None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not in a task
        return None
    side = worker.plugins.get(files.PLUGIN)
    return side if getattr(side, "cluster", None) == cluster else None  # type: ignore[return-value]


def resolve(handle: Handle, kind: str) -> Any:
    """The object of ``handle`` (of kind "ndarray", "pandas" or "arrow"), read-only, zero-copy (local)."""
    cluster = files.cluster_of(handle.generation)
    what = _describe(handle)
    side = _worker_side(cluster)
    if side is not None:

        def load() -> Any:
            try:
                return side.copies.open(handle.name)
            except FileNotFoundError:
                side.fetch(handle.name, what, timeout=_timeout())
                return side.copies.open(handle.name)

        return side.copies.get(handle.name, kind, load)
    where = groups.shm_dir()
    with groups.joined(where, cluster) as member:
        if member is not None:
            try:
                return codec.decode(map_copy(member.path(handle.name), private=kind == "pandas"))
            except FileNotFoundError:
                pass
    raise ResolveError(
        f"{what} cannot be resolved in this process: it is not a worker of the Dask cluster that "
        f"holds it, and no copy of it is in {where} here. Resolve handles in tasks (client.submit, "
        "client.map), or free and put it again if it was freed."
    )


def _timeout() -> float:
    from ..config import default_timeout

    return default_timeout()
