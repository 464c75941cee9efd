"""The state of the job running in this process, in one object.

:func:`hpcshare.run` makes a :class:`JobContext` and enters it with
:func:`running`; every module that keeps something for the length of a job
(the registry of inputs and put objects, the put service, the scratch
folder, the launcher's pid, the patches made to Dask) keeps it on that
object, found with :func:`current`. Leaving :func:`running` undoes the
patches and drops the object, so a second job in the same process starts
from a clean state (trio's ``RunContext`` is the model).

What outlives a job lives on :data:`PROCESS`: the /dev/shm watcher (one per
process), windows kept mapped because arrays still view them, and whether a
stop signal is being handled.

This is the one module with ``global`` statements. It imports only
:mod:`hpcshare.errors` at run time, so every module may import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import HpcshareError

if TYPE_CHECKING:
    import mmap
    import subprocess

    import numpy as np

    from .exchange import Exchange
    from .security import CredentialsMaker

__all__ = ["PROCESS", "JobContext", "ProcessState", "current", "running"]


@dataclasses.dataclass(eq=False)
class JobContext:
    """Everything one job keeps in this process; made by ``run()``, dropped at its end (local)."""

    generation: str = ""  #: 12 hex characters naming the job (its files, its handles)
    shm_dir: str = ""  #: where the job's put objects live
    node: int = -1  #: this process's node index
    launcher: int | None = None  #: the pid of the process that started this rank, when the job began
    scratch: str | None = None  #: the job's private scratch folder on this host
    exchange: Exchange | None = None  #: the put service, while Dask runs
    #: set while this process's main thread is in a collective on world (the put service keeps out)
    in_collective: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    #: name -> (generation, read-only array) of inputs and put arrays resolved here
    arrays: dict[str, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    #: name -> (generation, why) of objects freed in this job
    freed: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    #: name -> (generation, object) of put pandas and Arrow objects decoded here
    objects: dict[str, tuple[str, Any]] = dataclasses.field(default_factory=dict)
    stored: set[str] = dataclasses.field(default_factory=set)  #: names of put arrays among ``arrays``
    #: id -> object handed to a task, node-shared (for Dask's sizeof)
    handed_out: dict[int, weakref.ref[Any]] = dataclasses.field(default_factory=dict)
    #: this process's read-only maps of node files
    maps: weakref.WeakSet[mmap.mmap] = dataclasses.field(default_factory=weakref.WeakSet)
    #: id -> (weak reference, handle) of objects this process put (to warn when one is put twice)
    puts: dict[int, tuple[weakref.ref[Any], Any]] = dataclasses.field(default_factory=dict)
    #: id -> weak reference of dask_dataframe partitions made here (the view guard does not warn of them)
    partitions: dict[int, weakref.ref[Any]] = dataclasses.field(default_factory=dict)
    #: called before this rank ends the job through hpcshare (liveness says goodbye to rank 0)
    before_abort: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    #: what to undo when the job ends, in reverse order (patches to Dask)
    undo: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    def on_end(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the job ends in this process (local)."""
        self.undo.append(fn)

    def _close(self) -> None:
        while self.undo:
            with contextlib.suppress(Exception):
                self.undo.pop()()
        with self.lock:
            self.arrays.clear()
            self.objects.clear()
            self.stored.clear()
            self.handed_out.clear()
            self.puts.clear()
            self.partitions.clear()
        self.exchange = None


@dataclasses.dataclass(eq=False)
class ProcessState:
    """What this process keeps across jobs (local)."""

    stopping: bool = False  #: a stop signal (Ctrl-C, SIGTERM) is being handled
    #: the /dev/shm watcher started here: one per process, since it watches every later job's ranks too
    watcher: subprocess.Popen[bytes] | None = None
    kept_windows: list[Any] = dataclasses.field(default_factory=list)  #: windows still viewed at free()
    ended: set[str] = dataclasses.field(default_factory=set)  #: generations of jobs that ended here
    #: rank 0 of ``hpcshare job``: the TLS certificates' maker the CLI started, for the job to take
    credentials: CredentialsMaker | None = None
    #: the process that started this rank, as first recorded (``ending.end_with_launcher``); None before
    launcher: int | None = None


PROCESS = ProcessState()
_job: JobContext | None = None


def current() -> JobContext | None:
    """The job running in this process, or None (local)."""
    return _job


@contextlib.contextmanager
def running(job: JobContext) -> Iterator[JobContext]:
    """Make ``job`` this process's running job for the block (local).

    Leaving undoes what the job patched, forgets its objects and notes its
    generation as ended (handles of it then say so).
    """
    global _job
    if _job is not None:
        raise HpcshareError(
            f"job {_job.generation or '(starting)'} is still running in this process: "
            "hpcshare.run cannot be nested"
        )
    _job = job
    try:
        yield job
    finally:
        _job = None
        if job.generation:
            PROCESS.ended.add(job.generation)
        job._close()
