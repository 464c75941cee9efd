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
    summaries = re.findall(r"^(?:=+ )?(\d+ passed[^\n]*)$", run.stdout, re.M)
    assert run.returncode == 0, run
    assert len(summaries) == RANKS, run
    assert all("failed" not in s and "error" not in s for s in summaries), run
    assert int(summaries[0].split()[0]) >= 8, run
