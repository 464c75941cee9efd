"""Objects put while the job runs: one shared file per object per node.

:func:`hpcshare.put` writes an object (encoded by :mod:`hpcshare.codec`)
into one file per node, ``<object name>-n<node>`` (mode 0600), inside the
job's folder in the shared-memory directory (mode 0700, a random name, made
by one rank per host: :mod:`hpcshare.runtime`), so no other user can see, pre-create
or add to the files the job counts and unlinks. Object names carry a random
part as well (:func:`new_name`). Tasks
resolve its handle by mapping their node's file read-only and decoding it
once per process; later resolves hit this process's cache.

This module is the task path: it imports nothing from MPI. Moving bytes to
other nodes is :mod:`hpcshare.exchange`'s job.

Lifetimes: a file is unlinked by :func:`release` (``hpcshare.free``) or
at the end of the job (:class:`Joined`), or, if the job is killed, by the
host's watcher (:class:`hpcshare.shm.Watcher`, which removes the job's
folder). Unlinking never unmaps: a view a task still holds stays valid
until it is dropped, and the memory is returned after that.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from dask.sizeof import sizeof

from . import codec, context, registry, shm
from .context import JobContext
from .errors import CapacityError, HpcshareError, ResolveError

if TYPE_CHECKING:
    from .handles import ArrayHandle, ObjectHandle

__all__ = [
    "FREED",
    "Joined",
    "allocate",
    "attach_array",
    "attach_object",
    "create",
    "file_name",
    "in_a_job",
    "new_name",
    "node_bytes",
    "node_files",
    "populate",
    "release",
]

FREED = (
    "it was freed by hpcshare.free(). Views taken before that stay valid until "
    "dropped; put it again if tasks still need it."
)
_SMALL = 256  # Dask's sizeof of a node-shared object a task holds: it is not this worker's memory


def new_name(rank: int) -> str:
    """A fresh object name: the putting rank and 16 random hex digits (local)."""
    return f"p{rank}x{secrets.token_hex(8)}"


def file_name(name: str, node: int) -> str:
    return f"{name}-n{node}"


class Joined:
    """This process's place in the running job for its put objects, as a context manager (local).

    Entering notes the job's folder of put objects and node on the
    job's context, so handles can find their node's files. Leaving forgets every object this
    process resolved; with ``owner=True`` (one rank per node) it also unlinks
    the node's files that are left.
    """

    def __init__(self, folder: str, node: int, *, owner: bool = False) -> None:
        self.folder, self.node, self.owner = folder, node, owner

    def __enter__(self) -> Joined:
        ctx = registry.job()
        ctx.shm_dir, ctx.node = self.folder, self.node
        return self

    def __exit__(self, *exc: object) -> None:
        ctx = context.current()
        if ctx is None:
            return
        with ctx.lock:
            stored = [*((n, e[0]) for n, e in ctx.objects.items())]
            stored += [(n, e[0]) for n, e in ctx.arrays.items() if n in ctx.stored]
            for name, generation in stored:
                registry.unregister(name, generation)
            ctx.objects.clear()
            ctx.stored.clear()
        if self.owner:
            for path, _ in node_files(self.folder, self.node):
                _unlink(path)


def in_a_job() -> bool:
    """Whether this process is in a running job whose put objects it can map (local)."""
    ctx = context.current()
    return ctx is not None and bool(ctx.shm_dir)


def node_files(folder: str, node: int | None = None) -> list[tuple[str, int]]:
    """Paths and sizes of the object files in the job's ``folder`` (of one node, or all) (local).

    Only regular files of this process's user count (never followed through
    a link), though nobody else can add to the folder.
    """
    suffix = "" if node is None else f"-n{node}"
    uid, found = os.getuid(), []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if not e.name.endswith(suffix):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # freed meanwhile
                if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                    found.append((e.path, st.st_size))
    except OSError:
        return []
    return sorted(found)


def node_bytes(folder: str, node: int) -> int:
    """Bytes of the objects put on ``node`` that are still there (local)."""
    return sum(size for _, size in node_files(folder, node))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _here() -> JobContext:
    ctx = registry.job()
    if not ctx.shm_dir:
        raise ResolveError(registry.NOT_IN_A_JOB)
    return ctx


def path_of(name: str, node: int | None = None) -> str:
    """The file of object ``name`` on ``node`` (default: this process's node) (local)."""
    ctx = _here()
    return os.path.join(ctx.shm_dir, file_name(name, ctx.node if node is None else node))


def create(path: str, nbytes: int, what: str) -> mmap.mmap:
    """Create ``path`` (mode 0600, must not exist) with ``nbytes`` allocated; map it writable (local).

    The blocks are allocated now (``posix_fallocate``), so a full file
    system is a :class:`CapacityError` here, not a SIGBUS on first touch.
    A file that is already there is an :class:`HpcshareError` naming it and
    its owner; nothing of it is touched.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise HpcshareError(_taken(path, what)) from None
    try:
        allocate(fd, nbytes, f"{what}: {os.path.dirname(path)}")
        mm = mmap.mmap(fd, max(nbytes, 1))  # the map keeps its own descriptor
        populate(mm)
        return mm
    except BaseException:
        _unlink(path)
        raise
    finally:
        os.close(fd)


def allocate(fd: int, nbytes: int, where: str, advice: str = "") -> None:
    """Allocate ``nbytes`` (at least 1) of the file ``fd`` now, or raise :class:`CapacityError` (local).

    ``where`` starts the message ("hpcshare.put of ...: /dev/shm"); ``advice`` ends it.
    """
    try:
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise CapacityError(
                f"{where} has no room for {nbytes} more bytes ({exc.strerror}){advice}"
            ) from exc
        raise


def _taken(path: str, what: str) -> str:
    """Why ``path`` could not be created: it exists, and whose it is."""
    try:
        st = os.lstat(path)
        owner = f"owned by uid {st.st_uid}" + (" (this job's user)" if st.st_uid == os.getuid() else "")
    except OSError:
        owner = "gone again"
    return (
        f"{what}: {path} already exists ({owner}), so the object cannot be stored under its name. "
        "Object names are random and the job's folder is private: the folder was tampered with, "
        "or two jobs share a generation. Nothing was left behind; put the object again."
    )


def populate(mm: mmap.mmap) -> None:
    """Map all of ``mm``'s pages now, in one call (best effort; Linux 5.14+).

    Faulting a fresh shared-memory file in page by page while copying into it
    costs more than having the kernel map it in one go (1 GiB here: 0.45 s
    of copy after the allocation, against 0.26 s to populate plus 0.08 s).
    """
    try:
        mm.madvise(shm.MADV_POPULATE_WRITE)
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

    The file must be a regular file of this process's user (checked on the
    open descriptor, never through a link). ``private=True``: a writable
    copy-on-write map instead (``MAP_PRIVATE``): pages are the node's until
    this process writes one, which then becomes this process's own; the
    file never changes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ResolveError(
                f"{path} is not a file of this job (owner uid {st.st_uid}, this job runs as "
                f"{os.getuid()}): refusing to map it. The job's shared-memory folder was tampered with."
            )
        size = st.st_size
        if private:
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        else:
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    ctx = context.current()
    if ctx is not None:
        ctx.maps.add(mm)
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
    ctx = _here()
    if ctx.generation != generation:
        raise ResolveError(
            f"{what} {name!r} (generation {generation}) comes from an earlier job; this process "
            f"is in job {ctx.generation}. Use the handles your current job made."
        )
    try:
        view = map_readonly(path_of(name), private)
    except FileNotFoundError:
        raise ResolveError(f"{what} {name!r} cannot be resolved on node {ctx.node}: {FREED}") from None
    return codec.decode(view)


def attach_array(handle: ArrayHandle) -> np.ndarray:
    """The read-only view of a put array on this node; registered, so later resolves are a lookup."""
    with _here().lock:
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
    why = registry.freed_because(handle.name, handle.generation)
    if why is not None:
        raise ResolveError(f"object {handle.name!r} ({handle.summary}) cannot be resolved: {why}")
    ctx = _here()
    entry = ctx.objects.get(handle.name)
    if entry is None or entry[0] != handle.generation:
        with ctx.lock:
            entry = ctx.objects.get(handle.name)
            if entry is None or entry[0] != handle.generation:
                entry = (handle.generation, _open(handle.name, handle.generation, "object"))
                ctx.objects[handle.name] = entry
                _wrap_sizeof(ctx, type(entry[1]))
    obj = entry[1]
    if handle.kind == "pandas":
        if pandas_copies_on_write():
            obj = obj.copy(deep=False)
        else:
            obj = _open(handle.name, handle.generation, "object", private=True)
    _hand_out(ctx, obj)
    return obj


def _hand_out(ctx: JobContext, obj: Any) -> None:
    """Note ``obj`` as node-shared until it is dropped (for Dask's sizeof)."""
    key = id(obj)
    handed_out = ctx.handed_out

    def forget(_: weakref.ref[Any]) -> None:
        handed_out.pop(key, None)

    handed_out[key] = weakref.ref(obj, forget)


def count_as_shared(obj: Any) -> None:
    """Have Dask's sizeof count ``obj``, a view of a node-shared object, as small until it is dropped (local)."""
    ctx = _here()
    _wrap_sizeof(ctx, type(obj))
    _hand_out(ctx, obj)


def remember(name: str, generation: str, obj: Any) -> None:
    """Cache ``obj`` (decoded over this node's file) as what ``name`` resolves to here (local)."""
    ctx = _here()
    with ctx.lock:
        if isinstance(obj, np.ndarray):
            registry.register(name, generation, obj)
            ctx.stored.add(name)
            _wrap_sizeof(ctx, np.ndarray)
        else:
            ctx.objects[name] = (generation, obj)
            _wrap_sizeof(ctx, type(obj))


def release(name: str, generation: str) -> None:
    """Free object ``name`` in this process and unlink this node's file (local, idempotent).

    Later resolves in this process raise :class:`ResolveError` saying it
    was freed; objects already handed out keep their mapping.
    """
    ctx = context.current()
    if ctx is None:
        return
    with ctx.lock:
        ctx.objects.pop(name, None)
        ctx.stored.discard(name)
        registry.unregister(name, generation, why=FREED)
        if ctx.shm_dir and ctx.generation == generation:
            _unlink(path_of(name))


# --- Dask's memory accounting -------------------------------------------------------


def _is_node_shared(ctx: JobContext, obj: Any) -> bool:
    """Whether ``obj`` is a node-shared object (or an array whose memory is a node file)."""
    ref = ctx.handed_out.get(id(obj))
    if ref is not None and ref() is obj:
        return True
    if isinstance(obj, np.ndarray):
        base: Any = obj
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        return isinstance(base, mmap.mmap) and base in ctx.maps
    return False


def _map_ranges() -> list[tuple[int, int]]:
    """(address, bytes) of this process's maps of node files."""
    ctx = context.current()
    ranges = []
    for mm in list(ctx.maps) if ctx is not None else []:
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


def _wrap_sizeof(ctx: JobContext, cls: type) -> None:
    """Make Dask's sizeof of node-shared objects of ``cls`` small for the rest of the job.

    Other objects keep Dask's figure; the job's end puts Dask's own
    registration back.
    """
    original = sizeof.dispatch(cls)
    if getattr(original, "_hpcshare_wraps", None) is not None:
        return

    def shared_is_small(obj: Any) -> int:
        return _SMALL if _is_node_shared(ctx, obj) else int(original(obj))

    shared_is_small._hpcshare_wraps = original  # type: ignore[attr-defined]
    had = cls in sizeof._lookup
    previous = sizeof._lookup.get(cls)
    sizeof.register(cls)(shared_is_small)

    def restore() -> None:  # also where Dask's lookup cached the wrapper for a subclass
        for key in [k for k, v in sizeof._lookup.items() if v is shared_is_small]:
            del sizeof._lookup[key]
        if had:
            sizeof._lookup[cls] = previous

    ctx.on_end(restore)
