"""A group's copies of objects: writing one file completely or not at all, and mapping it.

:func:`write` makes an object's file the only way this path makes one: as
a ``.part`` file (0600, its blocks allocated first, so a full file system
is a :class:`~hpcshare.CapacityError` and never a SIGBUS), held with an
exclusive ``flock`` from before it appears under its name until it is
written, then renamed into place. A reader therefore finds either the whole object or none, and a
writer that dies leaves a ``.part`` that the next sweep removes.

:class:`Copies` is what a worker resolved: each object decoded once per
process over a read-only map of its group's file. The task path: no MPI.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import codec, store
from ..errors import CapacityError
from . import files

if TYPE_CHECKING:
    from .groups import Member

__all__ = ["Copies", "check_room", "map_copy", "write"]

_ELSEWHERE = (
    " Or point hpcshare.shm-dir (DASK_HPCSHARE__SHM_DIR) at a larger file system, such as "
    "node-local disk, on the workers of this host."
)


def check_room(member: Member, nbytes: int, what: str) -> None:
    """Refuse ``nbytes`` more in ``member``'s group before anything is allocated (local).

    The project's one capacity policy (:func:`hpcshare.memory.check_room`),
    naming the host.
    """
    from ..config import JobConfig
    from ..memory import check_room as policy

    try:
        policy(JobConfig.from_options(shm_dir=member.shm_dir), nbytes, f"{what} on host {member.host}")
    except CapacityError as exc:
        raise CapacityError(str(exc) + _ELSEWHERE) from None


def write(member: Member, name: str, nbytes: int, fill: Callable[[memoryview], None], what: str) -> None:
    """Make ``member``'s group's file of ``name``: ``fill`` writes its ``nbytes`` bytes (local).

    Raises :class:`FileExistsError` if another process is writing it (its
    ``.part`` exists) or it exists, and :class:`~hpcshare.CapacityError` when
    the file system has no room.
    """
    part = files.part_path(member.shm_dir, member.cluster, name)
    fd = _create_locked(part, member.shm_dir)
    try:
        store.allocate(fd, nbytes, f"{what}: {member.shm_dir} on host {member.host}", "." + _ELSEWHERE)
        mm = mmap.mmap(fd, max(nbytes, 1))
        try:
            store.populate(mm)
            with memoryview(mm) as whole, whole[:nbytes] as dest:
                fill(dest)
        finally:
            store.close_writable(mm)
        os.rename(part, member.path(name))
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def _create_locked(part: str, directory: str) -> int:
    """A new 0600 file at ``part``, locked exclusively before it appears there (local).

    A ``.part`` that nobody has locked is one whose writer died, and a
    waiting fetcher or a sweep unlinks it: made in place and then locked,
    a new ``.part`` would be unlocked for a moment, and a waiter that looked
    then unlinked it under its writer (whose rename then failed with
    FileNotFoundError). So it is made unnamed (``O_TMPFILE``), locked, and
    then linked into place, which fails with FileExistsError if another
    writer's ``.part`` is there. Where that cannot be done (a file system
    without ``O_TMPFILE``, an overlay that refuses the link, no /proc) the
    file is made in place and locked at once.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: the unnamed file itself
                os.link(str(fd), part, src_dir_fd=fds, follow_symlinks=True)
            finally:
                os.close(fds)
            return fd
        except FileExistsError:
            os.close(fd)  # an unnamed file goes with its last fd
            raise
        except OSError:
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def map_copy(path: str, private: bool = False) -> memoryview:
    """A read-only view of our own object file at ``path`` (local; FileNotFoundError if gone).

    ``private=True``: a writable copy-on-write map instead (``MAP_PRIVATE``):
    the pages written become this process's own; the file never changes.
    """
    fd = files.open_own(path)
    try:
        size = os.fstat(fd).st_size
        mm = (
            mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            if private
            else mmap.mmap(fd, size, prot=mmap.PROT_READ)
        )
    finally:
        os.close(fd)
    return memoryview(mm)


class Copies:
    """The objects this process resolved from its group's files, decoded once each (local)."""

    def __init__(self, member: Member) -> None:
        self.member = member
        self.lock = threading.RLock()
        self.objects: dict[str, Any] = {}

    def get(self, name: str, kind: str, load: Callable[[], Any]) -> Any:
        """Object ``name`` as a task gets it; ``load()`` decodes it the first time."""
        obj = self.objects.get(name)
        if obj is None:
            with self.lock:
                obj = self.objects.get(name)
                if obj is None:
                    obj = self.objects[name] = load()
        if kind != "pandas":
            return obj
        if store.pandas_copies_on_write():
            return obj.copy(deep=False)  # pandas copies a column before writing into it
        # pandas 2 without copy-on-write writes into a shallow copy's columns: decode afresh over a
        # private map, where a write changes only the pages it touches, in this object alone
        return codec.decode(map_copy(self.member.path(name), private=True))

    def hold(self, name: str) -> None:
        """Map and decode ``name`` now, without touching its pages (a worker handler).

        A live object file is always mapped by a process of its group:
        tools that sweep /dev/shm of files nobody maps (benchmarks, test
        fixtures, site scripts) would otherwise take it.
        """
        with self.lock:
            if name not in self.objects:
                self.objects[name] = self.open(name)

    def open(self, name: str) -> Any:
        """Decode the group's file of ``name`` (FileNotFoundError if this group holds none)."""
        return codec.decode(map_copy(self.member.path(name)))

    def release(self, name: str) -> None:
        """Forget ``name`` here and unlink the group's file (idempotent); views handed out stay valid."""
        with self.lock:
            self.objects.pop(name, None)
        try:
            os.unlink(self.member.path(name))
        except OSError:
            pass

    def clear(self) -> None:
        with self.lock:
            self.objects.clear()
