"""Objects put while the job runs: one shared file per object per node.

:func:`hpcshare.put` writes an object (encoded by :mod:`hpcshare.codec`)
into one file per node in the shared-memory directory, named
``hpcshare-<job generation>-<object name>-n<node>``, mode 0600. Tasks
resolve its handle by mapping their node's file read-only and decoding it
once per process; later resolves hit this process's cache.

This module is the task path: it imports nothing from MPI. Moving bytes to
other nodes is :mod:`hpcshare.exchange`'s job.

Lifetimes: a file is unlinked by :func:`release` (``hpcshare.free``) or
at the end of the job (:class:`Joined`), or, if the job is killed, by the
host's watcher (:class:`hpcshare.shm.Watcher`, which sweeps the job's
prefix). Unlinking never unmaps: a view a task still holds stays valid
until it is dropped, and the memory is returned after that.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import threading
import weakref
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from . import codec, handles
from .errors import CapacityError, ResolveError
from .handles import ArrayHandle, ObjectHandle

__all__ = [
    "FREED",
    "Joined",
    "attach_array",
    "attach_object",
    "create",
    "file_name",
    "job_prefix",
    "node_files",
    "release",
]

FREED = (
    "it was freed by hpcshare.free(). Views taken before that stay valid until "
    "dropped; put it again if tasks still need it."
)
_SMALL = 256  # Dask's sizeof of a node-shared object a task holds: it is not this worker's memory


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where this process is: its job and node."""

    shm_dir: str
    node: int
    generation: str


_place: _Place | None = None
_lock = threading.RLock()
_objects: dict[str, tuple[str, Any]] = {}  # name -> (generation, the decoded object) of pandas and Arrow
_arrays: dict[str, str] = {}  # name -> generation of put arrays registered with hpcshare.handles
_handed_out: dict[int, weakref.ref[Any]] = {}  # id -> object, for Dask's sizeof
_maps: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # this process's read-only maps of node files
_wrapped: set[type] = set()


def job_prefix(generation: str) -> str:
    """The start of every file name of this job's objects."""
    return f"hpcshare-{generation}-"


def file_name(generation: str, name: str, node: int) -> str:
    return f"{job_prefix(generation)}{name}-n{node}"


class Joined:
    """This process's membership of a job, as a context manager (local).

    Entering says where this process is, so handles can find their node's
    files. Leaving forgets every object this process resolved; with
    ``owner=True`` (one rank per node) it also unlinks the node's files
    that are left.
    """

    def __init__(self, shm_dir: str, node: int, generation: str, *, owner: bool = False) -> None:
        self.place = _Place(shm_dir, node, generation)
        self.owner = owner

    def __enter__(self) -> Joined:
        global _place
        _place = self.place
        return self

    def __exit__(self, *exc: object) -> None:
        global _place
        with _lock:
            for name, generation in [*((n, e[0]) for n, e in _objects.items()), *_arrays.items()]:
                handles.unregister(name, generation)
            _objects.clear()
            _arrays.clear()
            _place = None
        if self.owner:
            for path in node_files(self.place.shm_dir, self.place.generation, self.place.node):
                _unlink(path)


def node_files(shm_dir: str, generation: str, node: int | None = None) -> list[str]:
    """Paths of this job's object files in ``shm_dir`` (of one node, or all) (local)."""
    prefix = job_prefix(generation)
    suffix = None if node is None else f"-n{node}"
    try:
        entries = os.listdir(shm_dir)
    except OSError:
        return []
    return sorted(
        os.path.join(shm_dir, e)
        for e in entries
        if e.startswith(prefix) and (suffix is None or e.endswith(suffix))
    )


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _here() -> _Place:
    if _place is None:
        raise ResolveError(handles._NOT_IN_A_JOB)
    return _place


def path_of(name: str, node: int | None = None) -> str:
    """The file of object ``name`` on ``node`` (default: this process's node) (local)."""
    place = _here()
    return os.path.join(
        place.shm_dir, file_name(place.generation, name, place.node if node is None else node)
    )


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def create(path: str, nbytes: int, what: str) -> mmap.mmap:
    """Create ``path`` (mode 0600, must not exist) with ``nbytes`` allocated; map it writable (local).

    The blocks are allocated now (``posix_fallocate``), so a full file
    system is a :class:`CapacityError` here, not a SIGBUS on first touch.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG):
                raise CapacityError(
                    f"{what}: {os.path.dirname(path)} has no room for {nbytes} more bytes ({exc.strerror})"
                ) from exc
            raise
        mm = mmap.mmap(fd, max(nbytes, 1))  # the map keeps its own descriptor
        _populate(mm)
        return mm
    except BaseException:
        _unlink(path)
        raise
    finally:
        os.close(fd)


def _populate(mm: mmap.mmap) -> None:
    """Map all of ``mm``'s pages now, in one call (best effort; Linux 5.14+).

    Faulting a fresh shared-memory file in page by page while copying into it
    costs more than having the kernel map it in one go (1 GiB here: 0.45 s
    of copy after the allocation, against 0.26 s to populate plus 0.08 s).
    """
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        pass


def close_writable(mm: mmap.mmap) -> None:
    """Unmap a file's writable map once it is written (local).

    If something still holds a view into it, it is unmapped when that view
    goes instead: Dask's profiler keeps the frames of a task it sampled,
    locals included, for a moment after they return.
    """
    try:
        mm.close()
    except BufferError:
        pass


def map_readonly(path: str, private: bool = False) -> memoryview:
    """A read-only view of the whole file at ``path`` (local; FileNotFoundError if gone).

    ``private=True``: a writable copy-on-write map instead (``MAP_PRIVATE``):
    pages are the node's until this process writes one, which then becomes
    this process's own; the file never changes.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if private:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        else:
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    _maps.add(mm)
    return memoryview(mm)


def pandas_copies_on_write() -> bool:
    """Whether pandas copies a shallow copy's columns before writing into them (local).

    Always in pandas 3; in pandas 2.2 and 2.3 only with
    ``pd.options.mode.copy_on_write = True``.
    """
    import pandas as pd

    return int(pd.__version__.split(".")[0]) >= 3 or pd.get_option("mode.copy_on_write") is True


def _open(name: str, generation: str, what: str, private: bool = False) -> Any:
    """Decode this node's file of ``name`` (local); a missing file means it was freed."""
    place = _here()
    if place.generation != generation:
        raise ResolveError(
            f"{what} {name!r} (generation {generation}) comes from an earlier job; this process "
            f"is in job {place.generation}. Use the handles your current job made."
        )
    try:
        view = map_readonly(path_of(name), private)
    except FileNotFoundError:
        raise ResolveError(f"{what} {name!r} cannot be resolved on node {place.node}: {FREED}") from None
    return codec.decode(view)


def attach_array(handle: ArrayHandle) -> np.ndarray:
    """The read-only view of a put array on this node; registered, so later resolves are a lookup."""
    with _lock:
        array: np.ndarray = _open(handle.name, handle.generation, "array")
        remember(handle.name, handle.generation, array)
        return array


def attach_object(handle: ObjectHandle) -> Any:
    """A DataFrame, Series or Arrow object over this node's copy (local).

    pandas objects never let a write reach the node's copy: with pandas
    copy-on-write (pandas 3, or switched on in pandas 2) they are a shallow
    copy of the cached object, and pandas copies a column before writing
    into it; otherwise (pandas 2's default) they are decoded afresh over a
    private copy-on-write map of the node's file, so in-place writes change
    only the pages they touch, in this object alone.
    """
    entry = _objects.get(handle.name)
    if entry is None or entry[0] != handle.generation:
        why = handles.freed_because(handle.name, handle.generation)
        if why is not None:
            raise ResolveError(f"object {handle.name!r} ({handle.summary}) cannot be resolved: {why}")
        with _lock:
            entry = _objects.get(handle.name)
            if entry is None or entry[0] != handle.generation:
                entry = (handle.generation, _open(handle.name, handle.generation, "object"))
                _objects[handle.name] = entry
                _wrap_sizeof(type(entry[1]))
    obj = entry[1]
    if handle.kind == "pandas":
        if pandas_copies_on_write():
            obj = obj.copy(deep=False)
        else:
            obj = _open(handle.name, handle.generation, "object", private=True)
    _hand_out(obj)
    return obj


def _hand_out(obj: Any) -> None:
    """Note ``obj`` as node-shared until it is dropped (for Dask's sizeof)."""
    key = id(obj)

    def forget(_: weakref.ref[Any]) -> None:
        _handed_out.pop(key, None)

    _handed_out[key] = weakref.ref(obj, forget)


def count_as_shared(obj: Any) -> None:
    """Have Dask's sizeof count ``obj``, a view of a node-shared object, as small until it is dropped (local)."""
    _wrap_sizeof(type(obj))
    _hand_out(obj)


def remember(name: str, generation: str, obj: Any) -> None:
    """Cache ``obj`` (decoded over this node's file) as what ``name`` resolves to here (local)."""
    with _lock:
        if isinstance(obj, np.ndarray):
            handles.register(name, generation, obj)
            _arrays[name] = generation
            _wrap_sizeof(np.ndarray)
        else:
            _objects[name] = (generation, obj)
            _wrap_sizeof(type(obj))


def release(name: str, generation: str) -> None:
    """Free object ``name`` in this process and unlink this node's file (local, idempotent).

    Later resolves in this process raise :class:`ResolveError` saying it
    was freed; objects already handed out keep their mapping.
    """
    with _lock:
        _objects.pop(name, None)
        _arrays.pop(name, None)
        handles.unregister(name, generation, why=FREED)
        if _place is not None and _place.generation == generation:
            _unlink(path_of(name))


# --- Dask's memory accounting -------------------------------------------------------


def _is_node_shared(obj: Any) -> bool:
    """Whether ``obj`` is a node-shared object (or an array whose memory is a node file)."""
    ref = _handed_out.get(id(obj))
    if ref is not None and ref() is obj:
        return True
    if isinstance(obj, np.ndarray):
        base: Any = obj
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        return isinstance(base, mmap.mmap) and base in _maps
    return False


def _map_ranges() -> list[tuple[int, int]]:
    """(address, bytes) of this process's maps of node files."""
    ranges = []
    for mm in list(_maps):
        try:
            ranges.append((np.frombuffer(mm, np.uint8).ctypes.data, len(mm)))
        except (ValueError, TypeError):  # closed
            pass
    return ranges


def views_node_memory(obj: Any) -> bool:
    """Whether any data buffer of ``obj`` (array, pandas or Arrow object) lies in a node file (local)."""
    maps = _map_ranges()
    return any(
        lo < start + size and start < lo + n for start, size in codec.buffer_ranges(obj) for lo, n in maps
    )


def _wrap_sizeof(cls: type) -> None:
    """Make Dask's sizeof of node-shared objects of ``cls`` small; others keep Dask's figure."""
    if cls in _wrapped:
        return
    original = sizeof.dispatch(cls)

    def shared_is_small(obj: Any) -> int:
        return _SMALL if _is_node_shared(obj) else int(original(obj))

    sizeof.register(cls)(shared_is_small)
    _wrapped.add(cls)
