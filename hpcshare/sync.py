"""Idle waits and error agreement on MPI communicators.

MPICH's blocking collectives poll at full speed: a rank waiting in
``Barrier`` for a leader that reads a file burns a whole core, which on an
oversubscribed node steals the core the reader needs. Here every wait is a
non-blocking request polled with short, growing sleeps.
"""

from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING, Any

from .errors import HpcshareError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["Collective", "WaitTimeout", "agree", "agreed", "barrier", "bcast", "origin_of", "wait"]

_MIN_SLEEP = 20e-6
_MAX_SLEEP = 5e-3


class WaitTimeout(HpcshareError, TimeoutError):
    """A bounded wait ran out of time."""


def wait(request: MPI.Request, *, timeout: float | None = None, what: str = "the other ranks") -> None:
    """Wait for ``request`` without spinning the CPU (local).

    Raises
    ------
    WaitTimeout
        When ``timeout`` seconds pass first.
    """
    sleep = _MIN_SLEEP
    deadline = None if timeout is None else time.monotonic() + timeout
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimeout(f"waited {timeout:g} s for {what} and gave up")
        time.sleep(sleep)
        sleep = min(sleep * 2, _MAX_SLEEP)


def barrier(comm: MPI.Comm, *, timeout: float | None = None, what: str = "the other ranks") -> None:
    """Idle barrier (collective on ``comm``)."""
    wait(comm.Ibarrier(), timeout=timeout, what=what)


def bcast(comm: MPI.Comm, obj: Any = None, root: int = 0) -> Any:
    """Broadcast a small picklable object, waiting idle for the root (collective)."""
    barrier(comm)
    return comm.bcast(obj, root=root)


def _portable(exc: BaseException) -> bytes:
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(HpcshareError(f"{type(exc).__name__}: {exc}"))


def agree(comm: MPI.Comm, error: BaseException | None) -> None:
    """Raise the same error on every rank if any rank had one (collective).

    The rank that had the error (the lowest, if several) re-raises its own
    exception; every other rank raises a copy marked with :func:`origin_of`,
    so a launcher prints the message once.
    """
    barrier(comm)
    report = None if error is None else _portable(error)
    reports = comm.allgather(report)
    failed = [r for r, rep in enumerate(reports) if rep is not None]
    if not failed:
        return
    origin = failed[0]
    if comm.Get_rank() == origin and error is not None:
        try:
            error._hpcshare_agreed = True  # type: ignore[attr-defined]
        except AttributeError:
            pass
        raise error
    copy = pickle.loads(reports[origin])
    try:
        copy._hpcshare_origin = origin
    except AttributeError:
        copy = HpcshareError(str(copy))
        copy._hpcshare_origin = origin  # type: ignore[attr-defined]
    raise copy


def origin_of(exc: BaseException) -> int | None:
    """The rank an agreed error came from, or ``None`` if it was raised here."""
    return getattr(exc, "_hpcshare_origin", None)


def agreed(exc: BaseException) -> bool:
    """Whether every rank of the job raised ``exc`` (or its copy) through :func:`agree`."""
    return origin_of(exc) is not None or getattr(exc, "_hpcshare_agreed", False)


class Collective:
    """Context manager: run a block on every rank, then :func:`agree`.

    ``with Collective(comm): ...`` catches an exception in the block, meets
    the other ranks, and raises the first rank's error everywhere.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm

    def __enter__(self) -> Collective:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: let them through
        agree(self.comm, exc)
        return True
