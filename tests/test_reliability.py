"""Every exit path ends the whole job quickly, says why, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from helpers import hpcshare, kill_job, mpiexec, running

pytestmark = pytest.mark.each_mpi


@pytest.mark.usefixtures("clean_shm")
def test_sys_exit_in_a_source_function_is_an_input_error_not_a_hang(tmp_path):
    (tmp_path / "src.py").write_text("import sys\ndef make():\n    sys.exit(3)\n")
    run = hpcshare(3, "job", "-i", f"x={tmp_path / 'src.py'}:make", timeout=60)
    assert run.returncode != 0, run
    assert run.seconds < 30, run
    assert "input 'x'" in run.stderr and "called sys.exit(3)" in run.stderr, run
    assert run.stderr.count("error:") == 1, run


@pytest.mark.usefixtures("clean_shm")
def test_sys_exit_in_a_task_ends_the_job_at_once_naming_the_task_and_worker(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(
        "import sys\nimport dask\n"
        "def bye(i):\n    sys.exit(5)\n"
        "def main(client, inputs):\n"
        "    print('scratch folder:', dask.config.get('temporary-directory'), flush=True)\n"
        "    client.submit(bye, 1, key='the-bye-task').result()\n"
    )
    before = _dask_scratch()
    run = hpcshare(3, "job", str(job), "-q", timeout=60)
    assert run.returncode == 5, run
    assert run.seconds < 30, run  # not the 120 s timeout
    assert "task 'the-bye-task' called sys.exit(5) on worker rank 2" in run.stderr, run
    # the job's own scratch folder (other jobs on this machine may have theirs in the same place)
    scratch = re.search(r"^scratch folder: (\S+)$", run.stdout, re.M)
    assert scratch and os.path.basename(scratch[1]).startswith("hpcshare-"), run
    deadline = time.monotonic() + 5  # the watcher removes it
    while (left := _left_behind(scratch[1], before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left behind: {left}"


def _dask_scratch() -> set[str]:
    """Dask's own scratch folders in the temporary directory: a job of hpcshare's makes none there."""
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("dask-scratch")}


def _left_behind(scratch: str, dask_scratch_before: set[str]) -> set[str]:
    return ({scratch} if os.path.exists(scratch) else set()) | (_dask_scratch() - dask_scratch_before)


@pytest.mark.usefixtures("clean_shm")
def test_ranks_end_within_seconds_when_their_launcher_is_killed(tmp_path):
    job = tmp_path / "job.py"
    in_main = tmp_path / "in-main"
    job.write_text(
        f"import pathlib, time\ndef main(client, inputs):\n    pathlib.Path({str(in_main)!r}).touch()\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [mpiexec(), "-n", "3", sys.executable, "-m", "hpcshare", "job", str(job), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not in_main.exists():  # the job is up and in main
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not reach main"
            time.sleep(0.2)
        tree = psutil.Process(proc.pid).children(recursive=True)
        # MPICH: mpiexec -> hydra proxy -> ranks; Open MPI: prterun -> ranks
        ranks = [p for p in tree if p.exe() == psutil.Process().exe() and "-m" in p.cmdline()]
        assert len(ranks) == 3, ranks
        launcher = {proc.pid, *(r.ppid() for r in ranks)}
        for pid in launcher:  # what a batch system does after the grace time: SIGKILL, no cleanup
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except BaseException:
        kill_job(proc)
        raise
    deadline = time.monotonic() + 15
    while (alive := [p for p in ranks if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running 15 s after their launcher died: {alive}"
