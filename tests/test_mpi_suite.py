"""Run the pytest-mpi tests in tests/mpi on real ranks, bounded by a timeout."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import ROOT, mpiexec, run_cmd

RANKS = 5


@pytest.mark.usefixtures("clean_shm")
def test_mpi_tests_pass_on_every_rank():
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
    assert min(passed) >= 8, run
