"""Idle waits and error agreement on MPI communicators.

MPICH's blocking collectives poll at full speed: a rank waiting in
``Barrier`` for a leader that reads a file burns a whole core, which on an
oversubscribed node steals the core the reader needs. Here every wait is a
poll with short, growing sleeps (:class:`Backoff`, the one poll loop of
hpcshare: :func:`poll` for bounded waits, the put service's loop for its own).
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import ending
from .config import default_timeout
from .errors import HpcshareError, WaitTimeout

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "Backoff",
    "Collective",
    "WaitTimeout",
    "agree",
    "agreed",
    "barrier",
    "bcast",
    "origin_of",
    "poll",
    "wait",
]

T = TypeVar("T")


class Backoff:
    """Sleeps that double from 20 us to 1 ms while a poll finds nothing, and to 5 ms once a wait lasts (local).

    A waiting rank moves a non-blocking collective on only when it polls:
    each step of an ``Ibarrier`` (three for 6 ranks) waits for the next
    poll of the rank it needs, so sleeps of 5 ms made every short wait of
    the job's start 10-40 ms long (~0.1 s in all). Sleeps of up to 1 ms keep
    those short; a rank that polls every millisecond uses about 1% of a
    core. A wait that has lasted a second (a leader reading a large input,
    the client running ``main``) goes on with 5 ms sleeps, a few tenths of
    a percent.
    """

    FIRST, SHORT, LONGEST = 20e-6, 1e-3, 5e-3
    PATIENCE = 1.0  #: seconds of waiting after which the sleeps grow from SHORT to LONGEST

    def __init__(self) -> None:
        self.delay = self.FIRST
        self.since = time.monotonic()

    def sleep(self) -> None:
        """Sleep, and make the next sleep longer."""
        time.sleep(self.delay)
        longest = self.LONGEST if time.monotonic() - self.since > self.PATIENCE else self.SHORT
        self.delay = min(self.delay * 2, longest)

    def reset(self) -> None:
        """Something arrived: the next wait starts short again."""
        self.delay = self.FIRST
        self.since = time.monotonic()


def poll(
    ready: Callable[[], T | None],
    *,
    timeout: float | None = None,
    what: str = "the other ranks",
    on_wait: Callable[[float], Any] | None = None,
) -> T:
    """Call ``ready()`` until it returns something other than None or False, idly (local).

    ``on_wait(seconds)`` is called about once a second while the wait lasts
    (progress lines).

    Raises
    ------
    WaitTimeout
        When ``timeout`` seconds pass first.
    """
    backoff = Backoff()
    start = tick = time.monotonic()
    deadline = None if timeout is None else start + timeout
    while (result := ready()) is None or result is False:
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise WaitTimeout(f"waited {timeout:g} s for {what} and gave up")
        if on_wait is not None and now - tick >= 1.0:
            tick = now
            on_wait(now - start)
        backoff.sleep()
    return result


def wait(
    request: MPI.Request,
    *,
    timeout: float | None = None,
    what: str = "the other ranks",
    on_wait: Callable[[float], Any] | None = None,
) -> None:
    """Wait for ``request`` without spinning the CPU (local); see :func:`poll`."""
    poll(request.Test, timeout=timeout, what=what, on_wait=on_wait)


def barrier(
    comm: MPI.Comm,
    *,
    timeout: float | None = None,
    what: str = "the other ranks",
    on_wait: Callable[[float], Any] | None = None,
) -> None:
    """Idle barrier (collective on ``comm``)."""
    wait(comm.Ibarrier(), timeout=timeout, what=what, on_wait=on_wait)


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


def agree(
    comm: MPI.Comm,
    error: BaseException | None,
    timeout: float | None = None,
    on_wait: Callable[[float], Any] | None = None,
) -> None:
    """Raise the same error on every rank if any rank had one (collective).

    The rank that had the error (the lowest, if several) re-raises its own
    exception; every other rank raises a copy marked with :func:`origin_of`,
    so a launcher prints the message once. A rank that waits longer than
    ``timeout`` (default ``hpcshare.timeout``) for the others ends the whole
    job: they are stuck, and nothing else would end it.
    """
    limit = default_timeout() if timeout is None else timeout
    try:
        barrier(comm, timeout=limit, what="the other ranks to finish this step", on_wait=on_wait)
    except WaitTimeout as exc:
        _give_up(exc, error)
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


def _give_up(exc: WaitTimeout, error: BaseException | None) -> None:
    """End the whole job from a rank that waited too long (local; does not return)."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    mine = "" if error is None else f" (this rank had failed: {type(error).__name__}: {error})"
    print(f"hpcshare: rank {rank}: {exc}{mine}; ending the job", file=sys.stderr, flush=True)
    ending.abort(code=1)


class Collective:
    """Context manager: run a block on every rank, then :func:`agree`.

    ``with Collective(comm): ...`` catches an exception in the block, meets
    the other ranks, and raises the first rank's error everywhere. That
    includes SystemExit and KeyboardInterrupt: a rank that left on its own
    would leave the others waiting. ``timeout`` bounds the wait for the
    slowest rank (default ``hpcshare.timeout``).
    """

    def __init__(
        self, comm: MPI.Comm, timeout: float | None = None, on_wait: Callable[[float], Any] | None = None
    ) -> None:
        self.comm, self.timeout, self.on_wait = comm, timeout, on_wait

    def __enter__(self) -> Collective:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        agree(self.comm, exc, self.timeout, self.on_wait)
        return True
