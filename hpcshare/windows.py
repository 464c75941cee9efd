"""MPI-3 shared-memory windows holding one copy of an array per node."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING

import numpy as np

from .errors import CapacityError, HpcshareError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["NodeWindow", "check_capacity", "shm_free"]

# Views kept alive past free() keep their window here until the process ends.
_deferred: list[NodeWindow] = []


def shm_free(path: str) -> tuple[int, int]:
    """Free and total bytes of the file system at ``path`` (local)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_capacity(path: str, need: int, headroom: int, what: str) -> None:
    """Raise :class:`CapacityError` unless ``path`` has ``need + headroom`` bytes free (local).

    A window larger than the free space of the shared-memory file system maps
    fine and then dies with SIGBUS on first touch, so this runs before any
    allocation.
    """
    from dask.utils import format_bytes

    try:
        free, total = shm_free(path)
    except OSError as exc:
        raise CapacityError(
            f"cannot check shared memory at {path!r} ({exc}); set hpcshare.shm-dir "
            "(DASK_HPCSHARE__SHM_DIR) to where your MPI keeps shared windows"
        ) from exc
    if need + headroom > free:
        raise CapacityError(
            f"{what} need {format_bytes(need)} of shared memory on this host, but "
            f"{path} has {format_bytes(free)} free of {format_bytes(total)} "
            f"(plus {format_bytes(headroom)} kept free). Run on nodes with more "
            "memory, use fewer or smaller inputs, or grow the file system: in a "
            "container `docker run --shm-size=...`, in Apptainer bind a larger "
            "tmpfs, or `mount -o remount,size=... /dev/shm` as root."
        )


class NodeWindow:
    """One node's shared copy of ``nbytes`` bytes.

    The node leader's segment holds the data; every rank of the node maps it.
    Build with :meth:`allocate` (collective on the node communicator), end with
    :meth:`free` (collective, idempotent).
    """

    def __init__(self, win: MPI.Win, comm: MPI.Comm, nbytes: int, name: str) -> None:
        self._win = win
        self._comm = comm
        self.nbytes = nbytes
        self.name = name
        buf, _ = win.Shared_query(0)
        self._buffer: object | None = buf
        self._base: np.ndarray | None = np.frombuffer(buf, dtype=np.uint8, count=nbytes)  # type: ignore[call-overload]

    @classmethod
    def allocate(cls, comm: MPI.Comm, nbytes: int, name: str) -> NodeWindow:
        """Allocate the node's window (collective on ``comm``, the node communicator).

        Only the leader asks for the bytes; the other ranks ask for one byte,
        since some MPI libraries reject zero-byte segments.
        """
        from mpi4py import MPI

        size = max(nbytes, 1) if comm.Get_rank() == 0 else 1
        win = MPI.Win.Allocate_shared(size, 1, comm=comm)  # type: ignore[arg-type]
        # A passive-target epoch for the window's whole life, so sync() may be called
        # (the MPI memory model asks for MPI_Win_sync between direct stores and loads
        # by other ranks; x86 does not need it, weaker memory models do).
        win.Lock_all(MPI.MODE_NOCHECK)
        return cls(win, comm, nbytes, name)

    def sync(self) -> None:
        """Make this rank's stores visible and the others' visible here (local).

        Call after writing and again after the barrier that follows.
        """
        if self._base is not None:
            self._win.Sync()

    @property
    def freed(self) -> bool:
        return self._base is None

    def bytes(self) -> np.ndarray:
        """The window as a writable uint8 array (local). Raises after :meth:`free`."""
        if self._base is None:
            raise HpcshareError(f"the shared window of input {self.name!r} has been freed")
        return self._base

    def views_alive(self) -> int:
        """How many arrays other than our own still use the window's memory (local)."""
        if self._base is None:
            return 0
        # our references: self._base, the getrefcount argument
        return max(sys.getrefcount(self._base) - 2, 0)

    def free(self) -> None:
        """Free the window (collective on the node communicator). Idempotent.

        If any rank of the node still holds a view of the data, freeing would
        leave that view pointing at unmapped memory; the window is then kept
        until the process ends, with a warning.
        """
        from mpi4py import MPI

        if self._base is None:
            return
        from ._sync import barrier

        barrier(self._comm)  # wait idle; the allreduce after it is then quick
        alive = self._comm.allreduce(self.views_alive(), op=MPI.MAX)
        if alive:
            if self._comm.Get_rank() == 0:
                warnings.warn(
                    f"{alive} array(s) still view shared input {self.name!r} at the end "
                    "of the job; its memory stays mapped until the process exits. "
                    "Return copies (np.array(view)) or derived results from tasks and main.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _deferred.append(self)
            self._base = None
            self._win.Unlock_all()
            return
        self._base = None
        self._buffer = None
        self._win.Unlock_all()
        self._win.Free()
