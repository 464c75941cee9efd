"""pytest hooks and fixtures; the shared helpers are in helpers.py.

Two tiers: plain pytest for pure logic and for running the CLI the way a user
types it, and pytest-mpi tests in tests/mpi, which run only under
``mpiexec -n N python -m pytest --with-mpi`` (tests/test_mpi_suite.py does
that for the plain run).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from hpcshare import ObjectHandle, codec, context, shm, store


def pytest_ignore_collect(collection_path, config):
    # tests/mpi need real MPI ranks: only collected under --with-mpi
    if collection_path.name == "mpi" and collection_path.parent == Path(__file__).parent:
        return not config.getoption("--with-mpi", default=False)
    return None


@pytest.fixture(autouse=True)
def _no_stale_open_mpi_session():
    """After each test, remove Open MPI session folders (``$TMPDIR/ompi.PID``) whose launcher is gone.

    A test that kills a launcher (Ctrl-C, kill -9, a lost host) leaves
    prterun's session folder; pids are reused (pid_max is 32768 here), and a
    later prterun with the same pid finds the stale PMIx rendezvous file and
    cannot start ("The PMIx server's listener thread failed to start", seen
    once in CI). Only this user's folders, only of dead processes.
    """
    yield
    for entry in os.scandir(tempfile.gettempdir()):
        pid = entry.name.removeprefix("ompi.")
        if pid == entry.name or not pid.isdigit() or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.stat(follow_symlinks=False).st_uid == os.getuid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


@pytest.fixture
def clean_shm():
    """Fail a test that leaves files in /dev/shm that nothing maps any more.

    Files still mapped by a live process belong to a job that is still
    running (another one on this host), not to the test's, which has ended.
    """
    before = shm.names()
    yield
    deadline = time.monotonic() + 5
    while (left := shm.orphaned_names(before)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind in /dev/shm: {sorted(left)}"


@pytest.fixture
def put(tmp_path):
    """``put(obj)``: hold ``obj`` in a node file of a job this process has joined; its handle."""
    generation = uuid.uuid4().hex[:12]
    names = itertools.count()
    with (
        context.running(context.JobContext(generation=generation)),
        store.Joined(str(tmp_path), 0, owner=True),
    ):

        def put(obj):
            enc = codec.encode(obj)
            name = f"t{next(names)}"
            mm = store.create(store.path_of(name), enc.nbytes, "test")
            with memoryview(mm) as dest:
                enc.write_into(dest)
            store.close_writable(mm)
            return ObjectHandle(name, generation, enc.kind, enc.nbytes, enc.summary)

        yield put


@pytest.fixture(scope="module")
def hosts():
    """``hosts(n, shm_size="256M")``: n emulated hosts (tests/hosts.py), shared by the module's tests.

    Made on first use and removed when the module's tests end, also when
    they fail. Skips without root; fails instead where
    ``HPCSHARE_REQUIRE_HOSTS=1`` (CI).
    """
    import hosts as emulated
    from helpers import mpi_library, skip_unless_available

    made: dict[tuple[int, str], emulated.Hosts] = {}

    def make(n: int, shm_size: str = "256M") -> emulated.Hosts:
        skip_unless_available(emulated.missing(), "HPCSHARE_REQUIRE_HOSTS")
        if mpi_library() not in ("MPICH", "Open MPI"):
            pytest.skip(
                f"the emulated hosts launch with MPICH's hydra or Open MPI's prterun, not {mpi_library()}"
            )
        if (n, shm_size) not in made:
            made[n, shm_size] = emulated.Hosts.create(n, shm_size)
        return made[n, shm_size]

    try:
        yield make
    finally:
        for h in made.values():
            h.close()
