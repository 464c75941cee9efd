"""Run the pytest-mpi tests in tests/mpi on real ranks, bounded by a timeout."""

from __future__ import annotations

import re
import sys

import pytest
from helpers import ROOT, mpiexec, run_cmd

pytestmark = pytest.mark.each_mpi

RANKS = 5


def collected_mpi_tests() -> int:
    """How many tests tests/mpi holds: what every rank must pass."""
    run = run_cmd(
        [
            # under mpiexec: collecting initialises MPI, and an Open MPI 5 singleton
            # (no mpiexec) leaves its segment file in /dev/shm behind
            mpiexec(),
            "-n",
            "1",
            sys.executable,
            "-m",
            "pytest",
            "--with-mpi",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--color=no",
            "tests/mpi",
        ],
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run
    found = re.search(r"^(\d+) tests? collected", run.stdout, re.M)
    assert found, run
    return int(found[1])


@pytest.mark.usefixtures("clean_shm")
def test_mpi_tests_pass_on_every_rank():
    expected = collected_mpi_tests()
    assert expected >= 15  # the suite as written; fewer means tests went missing
    run = run_cmd(
        [
            mpiexec(),
            "-n",
            str(RANKS),
            sys.executable,
            "-m",
            "pytest",
            "--with-mpi",
            "-q",
            "-p",
            "no:cacheprovider",
            "--color=no",
            "tests/mpi",
        ],
        cwd=ROOT,
        timeout=600,
    )
    # every rank prints its own summary line (lines of ranks may run together)
    passed = [int(n) for n in re.findall(r"(\d+) passed\b", run.stdout)]
    assert run.returncode == 0, run
    assert len(passed) == RANKS, run
    assert not re.search(r"\b\d+ (failed|errors?)\b", run.stdout), run
    assert passed == [expected] * RANKS, run  # every test, on every rank: none skipped or lost
