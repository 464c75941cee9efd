"""What handles resolve to in this process: the running job's registry of node-shared arrays.

Both sides use it: placement and the put store register arrays here
(:func:`register`), handles look them up (:func:`lookup`). The entries live on
the running job's :class:`~hpcshare.context.JobContext`, so they end with
the job. The task path: nothing here imports MPI.
"""

from __future__ import annotations

import os
import socket

import numpy as np

from . import context
from .context import JobContext
from .errors import ResolveError

__all__ = [
    "ENDED",
    "NOT_IN_A_JOB",
    "freed_because",
    "job",
    "lookup",
    "register",
    "registered_views",
    "unregister",
    "where",
]

ENDED = "the job that placed it has ended and its shared memory was freed."
NOT_IN_A_JOB = (
    "no hpcshare job placed it in this process. Handles resolve only in the "
    "ranks of the job that placed them: run tasks on the job's in-process "
    "workers (no Nanny, no LocalCluster), started by `python -m hpcshare job` "
    "or hpcshare.run()."
)


def where() -> str:
    """This process, for messages: "process PID on HOST"."""
    return f"process {os.getpid()} on {socket.gethostname()}"


def job(what: str = "") -> JobContext:
    """The running job; outside one, a :class:`ResolveError` that says why (local)."""
    ctx = context.current()
    if ctx is None:
        raise ResolveError(f"{what}{NOT_IN_A_JOB}")
    return ctx


def register(name: str, generation: str, array: np.ndarray) -> None:
    """Make ``array`` (made read-only here) what handles of ``name`` and ``generation`` resolve to (local)."""
    array.flags.writeable = False
    ctx = job(f"cannot register {name!r}: ")
    with ctx.lock:
        ctx.arrays[name] = (generation, array)
        ctx.freed.pop(name, None)


def unregister(name: str, generation: str | None = None, why: str = ENDED) -> None:
    """Forget array ``name`` in this process; its handles then say ``why`` (local).

    ``generation`` marks it freed even if this process never resolved it.
    """
    ctx = context.current()
    if ctx is None:
        return
    with ctx.lock:
        entry = ctx.arrays.pop(name, None)
        gen = generation if generation is not None else (entry[0] if entry is not None else None)
        if gen is not None:
            ctx.freed[name] = (gen, why)


def lookup(name: str) -> tuple[str, np.ndarray] | None:
    """(generation, read-only array) registered for ``name`` in the running job, or None (local)."""
    ctx = context.current()
    return None if ctx is None else ctx.arrays.get(name)


def freed_because(name: str, generation: str) -> str | None:
    """Why ``name`` of ``generation`` can no longer be resolved here, or None (local)."""
    ctx = context.current()
    entry = None if ctx is None else ctx.freed.get(name)
    if entry is not None and entry[0] == generation:
        return entry[1]
    if generation in context.PROCESS.ended:
        return ENDED
    return None


def registered_views() -> list[tuple[str, np.ndarray]]:
    """(name, read-only view) of every array this process holds (local)."""
    ctx = context.current()
    if ctx is None:
        return []
    with ctx.lock:
        return [(name, view) for name, (_, view) in ctx.arrays.items()]
