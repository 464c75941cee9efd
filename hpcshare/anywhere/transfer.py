"""Moving an object's bytes to a group that has no copy: worker to worker, over Dask's comms.

The first task in a group to resolve an object its group does not hold
asks the scheduler which workers hold it (:func:`fetch`), and reads it from
one of them piece by piece (:data:`~hpcshare.layout.PIECE`) through the
worker handler ``hpcshare_piece`` (:func:`serve_piece`): an RPC over the
connections the cluster already has, with its TLS when it has it, and no
port of hpcshare's own. The bytes go straight into the group's new file,
which every other worker of the group then maps: they cross between groups
once per group. Other tasks of the group that want it meanwhile wait for
that file. Local to the fetching worker; no MPI.
"""

from __future__ import annotations

import fcntl
import os
from functools import partial
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes

from ..errors import HpcshareError, ResolveError
from ..layout import pieces
from ..sync import poll
from . import copies, files

if TYPE_CHECKING:
    from distributed import Worker

    from .groups import Member

__all__ = ["fetch", "serve_piece"]

_TRIES = 3  # a writer of this group that died mid-fetch: take over this often


def serve_piece(member: Member, name: str, offset: int, size: int) -> bytes:
    """Bytes ``offset`` to ``offset + size`` of this group's file of ``name`` (a worker handler)."""
    with copies.map_copy(member.path(name)) as view:
        return bytes(view[offset : offset + size])


def room(member: Member, nbytes: int, what: str) -> str | None:
    """Why this group cannot hold ``nbytes`` more, or None (a worker handler; local)."""
    try:
        copies.check_room(member, nbytes, what)
    except HpcshareError as exc:
        return str(exc)
    return None


def _writer_gone(member: Member, name: str) -> bool:
    """Whether the group's file of ``name`` is there, or its writer is gone (its .part unlocked)."""
    if os.path.exists(member.path(name)):
        return True
    part = files.part_path(member.shm_dir, member.cluster, name)
    try:
        fd = files.open_own(part)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is at work
        # the lock is free: its writer renamed it into place and closed it, or died
        if os.path.exists(member.path(name)):
            return True
        opened, there = os.fstat(fd), os.stat(part)
        if (opened.st_dev, opened.st_ino) == (there.st_dev, there.st_ino):
            # still the file its dead writer left: stale (a new writer cannot start beside it)
            os.unlink(part)
        return True
    except FileNotFoundError:  # renamed into place or removed meanwhile
        return True
    finally:
        os.close(fd)


def _read_into(worker: Worker, sources: list[str], name: str, what: str, dest: memoryview) -> None:
    """Read the object's bytes into ``dest`` from the first of ``sources`` that can send them all."""
    from distributed.utils import sync

    failures = []
    for address in sources:
        try:
            for a, b in pieces(0, len(dest)):
                dest[a:b] = sync(worker.loop, _read_from, worker, address, name, a, b - a)
            return
        except OSError as exc:  # that worker died or closed: the next one
            failures.append(f"{address}: {type(exc).__name__}: {exc}")
    raise ResolveError(
        f"{what} ({format_bytes(len(dest))}) could not be read from any worker holding it: "
        + ("; ".join(failures) or "none is left")
    )


async def _read_from(worker: Worker, address: str, name: str, offset: int, size: int) -> Any:
    return await worker.rpc(address).hpcshare_piece(name=name, offset=offset, size=size)


def fetch(worker: Worker, member: Member, name: str, what: str, timeout: float) -> int:
    """Copy object ``name`` into this group from a worker of a group that holds it (local).

    Returns the bytes this call read from other groups (0 when another
    worker of the group fetched it meanwhile). Raises :class:`ResolveError` if it was freed or nobody holds it any
    more, :class:`~hpcshare.CapacityError` if this group has no room.
    """
    from distributed.utils import sync

    for _ in range(_TRIES):
        if os.path.exists(member.path(name)):
            return 0
        answer = sync(worker.loop, worker.scheduler.hpcshare_sources, name=name)
        if answer["why"] is not None:
            raise ResolveError(f"{what} cannot be resolved: {answer['why']}")
        nbytes, sources = answer["nbytes"], answer["sources"]
        why_not = room(member, nbytes, what)
        if why_not is not None:
            from ..errors import CapacityError

            raise CapacityError(why_not)

        try:
            copies.write(member, name, nbytes, partial(_read_into, worker, sources, name, what), what)
        except FileExistsError:  # another task of this group fetches it: wait for its file
            poll(lambda: _writer_gone(member, name), timeout=timeout, what=f"another worker to fetch {what}")
            continue
        sync(worker.loop, worker.scheduler.hpcshare_holds, name=name, group=member.group)
        return int(nbytes)
    raise ResolveError(f"{what}: the workers of this group that fetched it died {_TRIES} times")
