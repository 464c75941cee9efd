"""Helpers shared by the tests: running commands the way a user types them, reading reports.

Every subprocess runs in a session of its own, bounded by a timeout that
kills every process of that session.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec() -> str:
    exe = shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    if exe is None:
        pytest.fail(
            "mpiexec not found: install the MPI extra (pip install -e '.[mpich]') or load your site MPI"
        )
    return exe


@functools.cache
def mpi_library() -> str:
    """The MPI library mpi4py loads here: "MPICH", "Open MPI", "Intel MPI", or its version line.

    Asked of mpi4py without starting MPI (an Open MPI singleton would leave a
    file in /dev/shm).
    """
    out = subprocess.run(
        [sys.executable, "-m", "mpi4py", "--mpi-lib-version"], capture_output=True, text=True, timeout=60
    ).stdout
    for name, starts in (("MPICH", "MPICH"), ("Open MPI", "Open MPI"), ("Intel MPI", "Intel(R) MPI")):
        if out.startswith(starts):
            return name
    return out.strip().split("\n")[0]


def running(p: psutil.Process) -> bool:
    """Whether ``p`` runs: a zombie has ended, whether or not anybody reaps it."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The running processes of the job that ``proc``, a launcher started with ``start_new_session``, runs.

    Its descendants, and whatever else is left in its session: MPICH's
    proxy starts a session of its own, Open MPI's launcher puts each rank in
    a process group of its own, and ranks whose launcher died belong to
    nobody. Not the /dev/shm watcher (``hpcshare/shm.py``), which outlives
    the ranks on purpose.
    """
    found: dict[int, psutil.Process] = {}
    try:
        launcher = psutil.Process(proc.pid)
        found = {p.pid: p for p in [launcher, *launcher.children(recursive=True)]}
    except psutil.Error:  # the launcher has ended
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                found.setdefault(p.pid, p)
        except OSError:  # gone already
            pass
    return [p for p in found.values() if running(p) and not _is_watcher(p)]


def _is_watcher(p: psutil.Process) -> bool:
    try:
        return any(arg.endswith(os.path.join("hpcshare", "shm.py")) for arg in p.cmdline())
    except psutil.Error:
        return False


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the :func:`job_processes` of ``proc`` at once, as a batch system kills a job.

    Those outside the launcher's process group first (killing that group
    alone would leave the ranks to their launcher's clean-up or their
    parent-death signal), then the launcher's group in one call.
    """
    for p in job_processes(proc):
        try:
            if os.getpgid(p.pid) != proc.pid:
                p.kill()
        except (OSError, psutil.Error):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Run:
    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str, seconds: float) -> None:
        self.args, self.returncode, self.stdout, self.stderr, self.seconds = (
            args,
            returncode,
            stdout,
            stderr,
            seconds,
        )

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return f"<Run rc={self.returncode} {' '.join(self.args)}>\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def start_cmd(
    args: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> subprocess.Popen:
    """Start a command in a session of its own, its output to pipes (text), hpcshare importable."""
    full_env = dict(os.environ)
    full_env.setdefault("DASK_HPCSHARE__DASHBOARD_ADDRESS", "localhost:0")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH", "")]))
    if env:
        full_env.update(env)
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )


def run_cmd(
    args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> Run:
    """Run a command in a session of its own; on timeout kill the session's processes and fail."""
    t = time.monotonic()
    proc = start_cmd(args, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return Run(args, proc.returncode, out, err, time.monotonic() - t)


def hpcshare(n: int, *args: str, timeout: float = 120, **kw) -> Run:
    """``mpiexec -n N python -m hpcshare ARGS``, as a user types it."""
    return run_cmd([mpiexec(), "-n", str(n), sys.executable, "-m", "hpcshare", *args], timeout=timeout, **kw)


REPORT_ROW = re.compile(
    r"^\s*(\d+)\s+\S+\s+(\d+)\s+(\d+)\s+([\d.]+ \w?i?B)\s+([\d.]+ \w?i?B)\s+([\d.]+ \w?i?B)\s+([\d.]+ \w?i?B)",
    re.M,
)


def to_bytes(text: str) -> float:
    from dask.utils import parse_bytes

    return parse_bytes(text.replace(" ", ""))


def report_rows(output: str):
    return [
        {
            "node": int(m[1]),
            "ranks": int(m[2]),
            "workers": int(m[3]),
            "inputs": to_bytes(m[4]),
            "measured": to_bytes(m[5]),
        }
        for m in REPORT_ROW.finditer(output)
    ]


def assert_clean_success(run: Run) -> None:
    assert run.returncode == 0, run
    assert "Traceback" not in run.output, run
    assert "CommClosedError" not in run.output, run


def skip_unless_available(missing: str | None, require_var: str) -> None:
    """Skip a test whose tools are ``missing`` (the reason), or fail it where ``require_var=1`` (CI)."""
    if missing:
        if os.environ.get(require_var) == "1":
            pytest.fail(f"{missing} ({require_var}=1: these tests must run here)")
        pytest.skip(missing)
