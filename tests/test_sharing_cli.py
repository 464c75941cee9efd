"""hpcshare.put seen from outside: a killed job leaves nothing in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import kill_job, mpiexec

pytestmark = pytest.mark.each_mpi

PUTTING = """
import numpy as np
import hpcshare

def main(client, inputs):
    data = np.ones(32 * 2**20)  # 256 MiB, put again and again: a put is always under way
    while True:
        print("putting", flush=True)
        hpcshare.put(data)
"""


def job_files() -> list[str]:
    """hpcshare's entries in /dev/shm, and the put objects in the jobs' private folders."""
    found = []
    for n in os.listdir("/dev/shm"):
        if n.startswith("hpcshare-"):
            found.append(n)
            if os.path.isdir(os.path.join("/dev/shm", n)):
                found += [f"{n}/{f}" for f in os.listdir(os.path.join("/dev/shm", n))]
    return sorted(found)


def test_kill_9_during_a_put_leaves_nothing_in_dev_shm(tmp_path, clean_shm):
    before = set(job_files())
    (tmp_path / "putting.py").write_text(PUTTING)
    cmd = [mpiexec(), "-n", "5", sys.executable, "-m", "hpcshare", "job", str(tmp_path / "putting.py")]
    proc = subprocess.Popen(
        [*cmd, "--ranks-per-node", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any("/" in n for n in set(job_files()) - before):  # a put's file exists: a put is under way
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no put started within 120 s"
            time.sleep(0.05)
        time.sleep(1.0)  # several puts in, on both nodes
        assert len(set(job_files()) - before) >= 1
    finally:
        kill_job(proc)  # every rank and mpiexec at once, no clean-up code runs
        proc.communicate()
    deadline = time.monotonic() + 20  # the host's watcher sees the ranks gone and sweeps
    while (left := set(job_files()) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind in /dev/shm after kill -9: {sorted(left)}"
