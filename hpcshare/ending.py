"""Ending the job from any rank: the job-wide abort, the scratch folder, the launcher's death.

A leaf module: everything that may have to end the job (the waits in
:mod:`hpcshare.sync`, the worker's task guard, the CLI's signal handlers,
the runtime) imports it, and it imports only what ending needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from typing import TYPE_CHECKING

from . import context, shm, supervise

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["abort", "end_alone", "end_with_launcher", "launcher_gone", "remove_scratch"]


def abort(comm: MPI.Comm | None = None, code: int = 1) -> None:
    """End the whole MPI job now with ``code`` (local; does not return).

    Named shared-memory files this process maps are unlinked first, since
    ranks killed by an abort cannot remove them (MPICH leaves its
    ``mpich_shm_*`` segment behind otherwise). Other ranks keep their
    mappings until they exit.
    """
    job = context.current()
    for fn in job.before_abort if job is not None else []:
        try:
            fn()
        except Exception:  # ending regardless
            pass
    shm.unlink_mapped()
    remove_scratch()
    supervise.ending()  # this rank's end is hpcshare's doing: its supervisor stays quiet
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi4py import MPI

    (comm or MPI.COMM_WORLD).Abort(code)


def end_alone(code: int = 1) -> None:
    """End this rank now, without the job (local; does not return).

    For a rank cut off from the rest of the job: no collective step could
    complete, and an abort could not reach the launcher. The named
    shared-memory files this process maps and the scratch folder are
    removed first; the host's /dev/shm watcher removes the rest once the
    host's last rank is gone.
    """
    shm.unlink_mapped()
    remove_scratch()
    supervise.ending()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launcher_gone() -> bool:
    """Whether the process that started this rank has died (local): MPI_Abort would hang then."""
    job = context.current()
    launcher = job.launcher if job is not None and job.launcher is not None else context.PROCESS.launcher
    return launcher is not None and os.getppid() != launcher


def remove_scratch() -> None:
    """Remove the running job's scratch folder on this host, and its folder of put objects if empty (local, idempotent).

    Before an abort or on SIGTERM, when the batch system may kill the
    watcher too. A supervisor's mark that it named its rank's death stays,
    with the folder, for the host's other ranks (:func:`supervise.death_named`).
    """
    job = context.current()
    if job is not None and job.scratch is not None:
        mark = supervise.death_mark(job.scratch)
        if os.path.lexists(mark):  # the host's other ranks, which the launcher stops next, look for it
            _remove_all_but(job.scratch, mark)  # the watcher removes the folder once they are gone
        else:
            shutil.rmtree(job.scratch, ignore_errors=True)
    if job is not None and job.shm_dir:  # the folder of put objects, once its files are unlinked
        with contextlib.suppress(OSError):
            os.rmdir(job.shm_dir)


def _remove_all_but(folder: str, keep: str) -> None:
    """Remove what ``folder`` holds except ``keep`` (local; best effort)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.path == keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def end_with_launcher(job: context.JobContext | None = None) -> None:
    """Have the kernel send this rank SIGTERM when its launcher dies (local; Linux); the process and ``job`` remember it.

    A batch system that SIGKILLs mpiexec and its proxy after the grace time
    would otherwise leave the ranks running on as orphans until ``main``
    ends. SIGTERM ends the job as scancel does (the CLI's handler unlinks
    the shared memory first; the watcher sweeps what is left).
    """
    if context.PROCESS.launcher is None:  # hpcshare job records it before MPI starts, run() once more
        context.PROCESS.launcher = os.getppid()
    parent = context.PROCESS.launcher
    if job is not None:
        job.launcher = parent
    if not supervise.term_on_parent_death():
        return
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
