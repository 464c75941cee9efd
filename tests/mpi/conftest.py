"""Fixtures for tests that run on every rank under mpiexec (pytest-mpi)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_dir(comm):
    """A folder every rank sees (rank 0 makes it, all get its path)."""
    path = comm.bcast(tempfile.mkdtemp(prefix="hpcshare-test-") if comm.rank == 0 else None)
    yield Path(path)
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def on_rank0(comm):
    """``on_rank0(fn)``: run ``fn`` on rank 0 (e.g. to write input files), then sync."""
    return lambda fn: _on_rank0(comm, fn)


def _on_rank0(comm, fn):
    err = None
    if comm.rank == 0:
        try:
            fn()
        except Exception as exc:  # pragma: no cover - test setup failure
            err = repr(exc)
    err = comm.bcast(err)
    if err:
        pytest.fail(f"setup on rank 0 failed: {err}")
