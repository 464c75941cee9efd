"""Plain ``dask scheduler`` and ``dask worker`` processes, as a user starts them, for tests.

Each process runs in a session of its own with its log in a file (a worker
logs more than a pipe holds), hpcshare and the tests' modules importable (their functions run on the workers); :meth:`DaskProcesses.close`
stops them all, by SIGTERM and then, after a bounded wait, by killing their
sessions. A ``prefix`` runs a process elsewhere: on an emulated host
(``hosts.enter(host)``), or in a mount namespace of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT, kill_job


class DaskProcesses:
    """The scheduler and workers of one test; use as a context manager."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.scheduler_file = directory / "scheduler.json"
        self.procs: list[subprocess.Popen] = []

    def start(
        self, args: list[str], prefix: list[str] = (), env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start ``prefix + args`` in a session of its own, its output in a log file of :attr:`dir`."""
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        )
        with open(self.dir / f"process-{len(self.procs)}.log", "w") as log:  # the child keeps its own
            proc = subprocess.Popen(
                [*prefix, *args], stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def scheduler(self, host: str = "127.0.0.1", prefix: list[str] = ()) -> subprocess.Popen:
        """``dask scheduler`` listening on ``host``; returns once its scheduler file is written (60 s)."""
        proc = self.start(
            [
                sys.executable,
                "-m",
                "dask",
                "scheduler",
                "--host",
                host,
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(self.scheduler_file),
            ],
            prefix,
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start:\n{self.logs()}")
            time.sleep(0.1)
        return proc

    def worker(self, nworkers: int = 1, prefix: list[str] = (), *more: str) -> subprocess.Popen:
        """``dask worker --nworkers N`` (under nannies, one thread each) joining the scheduler."""
        return self.start(
            [
                sys.executable,
                "-m",
                "dask",
                "worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nworkers",
                str(nworkers),
                "--nthreads",
                "1",
                "--no-dashboard",
                *more,
            ],
            prefix,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.dir.glob("process-*.log")))

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print the processes' logs when the block fails (pytest shows them with the failure)."""
        try:
            yield
        except BaseException:
            print(self.logs())
            raise

    def close(self, timeout: float = 30) -> None:
        """Stop every process: SIGTERM, then kill what is left after ``timeout`` seconds (local)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_job(proc)
            proc.wait()

    def __enter__(self) -> DaskProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
