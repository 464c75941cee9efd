"""Plain ``dask scheduler`` and ``dask worker`` processes, as a user starts them, for tests.

Each process runs in a session of its own with its log in a file (a worker
logs more than a pipe holds), hpcshare and the tests' modules importable (their functions run on the workers); :meth:`DaskProcesses.close`
stops them all, by SIGTERM and then, after a bounded wait, by killing their
sessions. A ``prefix`` runs a process elsewhere: on an emulated host
(``hosts.enter(host)``), or in a mount namespace of its own.

:meth:`DaskProcesses.client` starts a client program there too: a
:class:`RemoteClient` that runs the test's functions (importable module
functions, pickled by reference) with its ``distributed.Client``, one call
at a time, so that a test can measure between the calls.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from helpers import ROOT, kill_job

from hpcshare.anywhere import files


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
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        )
        with open(self.dir / f"process-{len(self.procs)}.log", "w") as log:  # the child keeps its own
            proc = subprocess.Popen(
                [*prefix, *args], stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def scheduler(
        self, host: str = "127.0.0.1", prefix: list[str] = (), more: list[str] = ()
    ) -> subprocess.Popen:
        """``dask scheduler`` (and ``more`` options) on ``host``; returns once its scheduler file is written (60 s)."""
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
                *more,
            ],
            prefix,
        )
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start:\n{self.logs()}")
            time.sleep(0.1)
        return proc

    def worker(
        self, nworkers: int = 1, prefix: list[str] = (), *more: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """``dask worker --nworkers N`` (under nannies, one thread each, ``env`` added) joining the scheduler."""
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
            env,
        )

    def client(self, prefix: list[str] = ()) -> RemoteClient:
        """A client program (``prefix`` runs it elsewhere) connected to the scheduler; see :class:`RemoteClient`."""
        return RemoteClient(self, prefix)

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
            except (
                subprocess.TimeoutExpired
            ):  # its threads' tracebacks into its log (faulthandler), then kill
                proc.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            kill_job(proc)
            proc.wait()

    def __enter__(self) -> DaskProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# the client program of RemoteClient: one call a line on stdin, one reply a line on stdout
_CLIENT = """
import base64, pickle, sys, traceback
from distributed import Client

client = Client(scheduler_file=sys.argv[1], timeout=60)
print("READY", flush=True)
for line in sys.stdin:
    fn, args = pickle.loads(base64.b64decode(line))
    try:
        reply = ("ok", fn(client, *args))
    except BaseException as exc:
        reply = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    print("REPLY", base64.b64encode(pickle.dumps(reply)).decode(), flush=True)
client.close()
"""


class RemoteError(Exception):
    """A call of :class:`RemoteClient` raised; the message is the remote ``Type: message``."""


class RemoteClient:
    """A client program of the cluster, elsewhere (``prefix``): ``call(fn, *args)`` runs ``fn(client, *args)`` there."""

    def __init__(self, dask: DaskProcesses, prefix: list[str] = ()) -> None:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        )
        self._log = open(dask.dir / f"client-{len(dask.procs)}.log", "w")  # closed in close()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", _CLIENT, str(dask.scheduler_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,  # unbuffered: a line the selector saw is never left in a buffer it cannot see
            env=full_env,
            start_new_session=True,
        )
        dask.procs.append(self.proc)
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._line("READY", 60)

    def _line(self, start: str, timeout: float) -> str:
        """The next line of the program's output that starts with ``start`` (bounded wait)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise TimeoutError(f"the client program gave no {start} line within {timeout} s")
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"the client program ended (exit code {self.proc.wait()})")
            if line.startswith(start):
                return line[len(start) :].strip()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120) -> Any:
        """``fn(client, *args)`` in the client program; its value (RemoteError if it raised)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(base64.b64encode(pickle.dumps((fn, args))) + b"\n")
        self.proc.stdin.flush()
        reply = pickle.loads(base64.b64decode(self._line("REPLY", timeout)))
        if reply[0] == "error":
            raise RemoteError(f"{reply[1]}\n{reply[2]}")
        return reply[1]

    def close(self, timeout: float = 30) -> None:
        """End the client program (it closes its client), killed after ``timeout`` seconds."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_job(self.proc)
                self.proc.wait()
        self._selector.close()
        self._log.close()


# --- what workers see (functions that run on the workers or in a client program) ------------------


def objects_here() -> list[str]:
    """The hpcshare objects in this process's /dev/shm (no markers, no ``.part`` files)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(files.PREFIX) and "." not in n)


def seen(handle: Any, _worker: str = "") -> dict:
    """In a task: what the worker resolved (sum, the file it maps: device and inode, its size) and its /dev/shm."""
    import socket

    data = handle.resolve()
    with open("/proc/self/maps") as f:
        mapped = [
            line.split()[-1]
            for line in f
            if (lo_hi := line.split()[0].split("-"))
            and int(lo_hi[0], 16) <= data.ctypes.data < int(lo_hi[1], 16)
        ]
    path = mapped[0] if mapped else None
    st = os.stat(path) if path else None
    return {
        "sum": float(data.sum()),
        "file": (st.st_dev, st.st_ino) if st else None,
        "size": st.st_size if st else 0,  # the object's bytes: the array's and a small header
        "objects": objects_here(),
        "host": socket.gethostname(),
    }


def on_each(client: Any, handle: Any, workers: list[str]) -> dict[str, dict]:
    """:func:`seen` on each of ``workers``, one task pinned to each."""
    futures = {w: client.submit(seen, handle, w, workers=[w], pure=False) for w in workers}
    return {w: f.result(timeout=120) for w, f in futures.items()}


def _traffic(dask_worker: Any) -> dict[str, int]:
    return dict(dask_worker.plugins[files.PLUGIN].traffic)


def traffic(client: Any) -> dict[str, dict[str, int]]:
    """Each worker's bytes "served" to and "fetched" from other groups so far."""
    return client.run(_traffic)


def total(client: Any, what: str) -> int:
    """Bytes every worker has ``what`` ("fetched", "served") between groups so far."""
    return sum(t[what] for t in traffic(client).values())
