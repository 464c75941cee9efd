"""Groups: the processes of a Dask cluster that see the same shared-memory directory.

Workers are grouped by a probe, not by host name: one host may have many
/dev/shm (containers, Slurm's ``job_container/tmpfs``), and the only sure
test that two processes share one is a file. The first process of a
cluster to look creates the marker ``hpcshare-dask-<cluster>.group`` with
a random token in it (written aside, then hard-linked into place, so
nobody reads it half-written and two creators cannot both win); every
later one finds it and reads the same token. Processes with the same
token are one group, and a group holds one copy of each object.

The marker is also the group's lifetime: every member (workers and
nannies, for as long as they live; a client while it writes a put) holds
it open with a shared ``flock``. The kernel drops a dead process's lock
whatever killed it, so a marker nobody holds belongs to a group that is
gone, and anyone who can lock it exclusively may sweep its files
(:mod:`hpcshare.anywhere.lifetimes`). A joiner that finds the marker
unlinked under it (swept meanwhile) starts over. A sweep fails while any
other process holds the marker, even for a moment, so every process that
drops its lock, or that locked the marker only to see whether the group is
alive, sweeps afterwards: the last of them finds it free and removes the
group's files. Local, no MPI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
from collections.abc import Iterator

from ..sync import poll
from . import files, lifetimes

__all__ = ["Member", "join", "joined", "probe", "shm_dir"]

_JOIN_TRIES = 20  # a sweep that unlinks the marker between our open and our lock: start over this often


def shm_dir() -> str:
    """Where this process keeps shared objects: ``hpcshare.shm-dir`` of its Dask config (local)."""
    import dask.config

    from .. import config  # noqa: F401  (registers hpcshare's defaults)

    return str(dask.config.get("hpcshare.shm-dir"))


@dataclasses.dataclass(eq=False)
class Member:
    """This process's place in a group: the marker held open with a shared lock (local)."""

    shm_dir: str
    cluster: str
    group: str  #: the group's token (what the scheduler knows it by)
    fd: int
    host: str = dataclasses.field(default_factory=socket.gethostname)

    def leave(self) -> None:
        """Drop the lock (idempotent); the last member's sweep then removes the group's files."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def path(self, name: str) -> str:
        """This group's file of object ``name``."""
        return files.object_path(self.shm_dir, self.cluster, name)


def _create_marker(path: str) -> bool:
    """Make the marker with a fresh token, atomically; False if one exists already."""
    aside = f"{path}.{files.new_token()}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, files.new_token().encode())
    finally:
        os.close(fd)
    try:
        os.link(aside, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(aside)


def _lock_shared(fd: int, path: str, timeout: float) -> None:
    """A shared lock on the marker, waiting idle (bounded) while a sweep holds it exclusively."""

    def locked() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    poll(locked, timeout=timeout, what=f"the sweep holding {path} to finish")


def _still_linked(fd: int, path: str) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def join(shm_dir: str, cluster: str, *, timeout: float = 30.0) -> Member:
    """Join ``cluster``'s group in ``shm_dir``, making the group if there is none (local).

    Raises :class:`~hpcshare.HpcshareError` if the marker is not ours
    (another user made it).
    """
    member = _join(shm_dir, cluster, create=True, timeout=timeout)
    assert member is not None
    return member


def _join(shm_dir: str, cluster: str, *, create: bool, timeout: float = 30.0) -> Member | None:
    """Join the group; None when ``create`` is false and no live group is there."""
    path = files.marker_path(shm_dir, cluster)
    for _ in range(_JOIN_TRIES):
        if create:
            _create_marker(path)
        try:
            fd = files.open_own(path)
        except FileNotFoundError:
            if not create:
                return None
            continue
        try:
            if not create:  # a client: a marker nobody holds is a dead group's, not one to write into
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    # the group is dead, and its last member's sweep may have failed on this very
                    # lock: sweep it (once our lock is dropped, or the sweep would fail on it too)
                    os.close(fd)
                    lifetimes.sweep(shm_dir, cluster)
                    return None
            _lock_shared(fd, path, timeout)
            if _still_linked(fd, path):
                token = os.pread(fd, 64, 0).decode()
                return Member(shm_dir, cluster, token, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swept between our open and our lock: start over
    raise TimeoutError(f"could not join the group of {path}: it was swept {_JOIN_TRIES} times meanwhile")


def probe(shm_dir: str, cluster: str) -> str | None:
    """The token of the live group of ``cluster`` in ``shm_dir``, or None (local)."""
    member = _join(shm_dir, cluster, create=False)
    if member is None:
        return None
    _leave_and_sweep(member)
    return member.group


def _leave_and_sweep(member: Member) -> None:
    """Leave, and sweep the group if we were its last holder: a member that left meanwhile found
    our lock and could not sweep."""
    member.leave()
    lifetimes.sweep(member.shm_dir, member.cluster)


@contextlib.contextmanager
def joined(shm_dir: str, cluster: str) -> Iterator[Member | None]:
    """The live group of ``cluster`` here for the block, held (None if there is none) (local)."""
    member = _join(shm_dir, cluster, create=False)
    try:
        yield member
    finally:
        if member is not None:
            _leave_and_sweep(member)
