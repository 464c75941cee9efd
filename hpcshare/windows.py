"""MPI-3 shared-memory windows holding one copy of an array per node."""

from __future__ import annotations

import ctypes
import mmap
import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .context import PROCESS
from .errors import HpcshareError
from .shm import MADV_HUGEPAGE, MADV_POPULATE_WRITE, libc
from .sync import barrier

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["NodeWindow", "kept_mapped"]

_PROT_READ = 1
_PROT_WRITE = 2


def kept_mapped() -> int:
    """How many windows this process keeps mapped because views outlived their job (local)."""
    return len(PROCESS.kept_windows)


class NodeWindow:
    """One node's shared copy of ``nbytes`` bytes.

    The node leader's segment holds the data; every rank of the node maps it.
    Build with :meth:`allocate` (collective on the node communicator), end with
    :meth:`free` (collective, idempotent), or use it as a context manager:
    leaving the block frees it.
    """

    def __init__(self, win: MPI.Win, comm: MPI.Comm, nbytes: int, name: str) -> None:
        self._win = win
        self._comm = comm
        self.nbytes = nbytes
        self.name = name
        buf, _ = win.Shared_query(0)
        self._base: np.ndarray | None = np.frombuffer(buf, dtype=np.uint8, count=nbytes)  # type: ignore[call-overload]
        self._readonly: Any = None  # the bytes as a read-only buffer with no way back to a writable one
        self._sealed: tuple[int, int] | None = None  # the page range mapped read-only by seal()

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

    def __enter__(self) -> NodeWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def sync(self) -> None:
        """Make this rank's stores visible and the others' visible here (local).

        Call after writing and again after the barrier that follows.
        """
        if self._base is not None:
            self._win.Sync()

    def bytes(self) -> np.ndarray:
        """The window as a writable uint8 array (local). Raises after :meth:`free`."""
        if self._base is None:
            raise HpcshareError(f"the shared window of input {self.name!r} has been freed")
        return self._base

    def array(self, shape: tuple[int, ...], dtype: np.dtype, order: str) -> np.ndarray:
        """The window's bytes as a read-only array of ``shape``, ``dtype`` and memory ``order`` (local).

        Every base in its chain is read-only (a buffer made from the address,
        read-only, that refers to no writable object), so NumPy refuses
        ``flags.writeable = True`` on it and on any view of it.
        """
        if self._readonly is None:
            from mpi4py import MPI

            self._readonly = MPI.buffer.fromaddress(self.bytes().ctypes.data, self.nbytes, readonly=True)
        count = int(np.prod(shape, dtype=np.int64))
        flat = np.frombuffer(self._readonly, dtype=dtype, count=count)
        return flat.reshape(shape, order=order)  # type: ignore[call-overload]

    def seal(self) -> bool:
        """Map the window's whole pages read-only in this process (local; after placement).

        A write from C code then faults instead of changing every worker's
        input. Returns whether the kernel agreed; the bytes of a partial first
        or last page (shared with the MPI library's other segments) stay
        writable at that level, and read-only through NumPy.
        """
        c = libc()
        if c is None or self.nbytes == 0:
            return False
        page = mmap.PAGESIZE
        start = self.bytes().ctypes.data
        lo, hi = -(-start // page) * page, (start + self.nbytes) // page * page
        if hi <= lo or c.mprotect(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _PROT_READ) != 0:
            return False
        self._sealed = (lo, hi)
        return True

    def _unseal(self) -> None:
        """Make the sealed pages writable again before MPI frees the window (local).

        The MPI library may keep the memory mapped after the window is freed
        and hand it out again (MPICH does for small windows): pages left
        read-only would make a later write anywhere in that memory fault.
        """
        c = libc()
        if self._sealed is None or c is None:
            return
        lo, hi = self._sealed
        c.mprotect(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _PROT_READ | _PROT_WRITE)
        self._sealed = None

    def prefault(self, start: int, stop: int) -> None:
        """Have the kernel allocate the pages of bytes ``start:stop`` in one call (local; best effort).

        First-touch faults on shared memory cost about 1 s per GiB on one core;
        the kernel populates the same pages faster, and when each reader does
        its own share, the node's cores split the work. Huge pages are asked
        for too; they take effect only where the administrator allows them for
        shared memory (/sys/kernel/mm/transparent_hugepage/shmem_enabled).
        """
        c = libc()
        if stop <= start or c is None:
            return
        page = mmap.PAGESIZE
        addr = self.bytes().ctypes.data + start
        lo = addr - addr % page
        length = ctypes.c_size_t(addr + (stop - start) - lo)
        c.madvise(ctypes.c_void_p(lo), length, MADV_HUGEPAGE)
        c.madvise(ctypes.c_void_p(lo), length, MADV_POPULATE_WRITE)

    def prefault_share(self, index: int, of: int) -> None:
        """:meth:`prefault` share ``index`` of ``of`` page-aligned shares of the window (local)."""
        from .loaders import split_range

        shares = split_range(self.nbytes, of, mmap.PAGESIZE)
        if index < len(shares):
            self.prefault(*shares[index])

    def views_alive(self) -> int:
        """How many arrays other than our own still use the window's memory (local)."""
        if self._base is None:
            return 0
        # our references: self._base (self._readonly), the getrefcount argument
        alive = max(sys.getrefcount(self._base) - 2, 0)
        if self._readonly is not None:  # arrays from array() hold the read-only buffer
            alive += max(sys.getrefcount(self._readonly) - 2, 0)
        return alive

    def free(self) -> None:
        """Free the window (collective on the node communicator). Idempotent.

        If any rank of the node still holds a view of the data, freeing would
        leave that view pointing at unmapped memory; the window is then kept
        until the process ends, with a warning.
        """
        from mpi4py import MPI

        if self._base is None:
            return
        barrier(self._comm)  # wait idle; the allreduce after it is then quick
        alive = self._comm.allreduce(self.views_alive(), op=MPI.MAX)
        self._base = self._readonly = None
        self._win.Unlock_all()
        if not alive:
            self._unseal()
            self._win.Free()
            return
        if self._comm.Get_rank() == 0:
            warnings.warn(
                f"{alive} array(s) still view shared input {self.name!r} at the end "
                "of the job; its memory stays mapped until the process exits. "
                "Return copies (np.array(view)) or derived results from tasks and main.",
                RuntimeWarning,
                stacklevel=2,
            )
        PROCESS.kept_windows.append(self)  # kept until the process ends
