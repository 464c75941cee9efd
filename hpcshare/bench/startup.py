"""``hpcshare bench --overhead`` (and ``--startup``): start-up against plain dask-mpi.

At each worker count W, ``mpiexec -n W+2`` of three programs with nothing
to do, run interleaved (the order turns each round, so that a change in
the machine's load weighs on all alike):

- ``dask-mpi``: :mod:`.plain_dask_mpi`, plain dask-mpi whose client waits
  for the W workers and shuts the cluster down;
- ``hpcshare``: ``python -m hpcshare job EMPTY.py -q``, ``main`` empty (TLS on,
  the job's default);
- ``hpcshare no-tls``: the same with ``--no-tls``.

Each run's wall time, from starting mpiexec to its exit; the time to a
ready client, from starting mpiexec to the moment the client has every
worker (``main`` is called; plain dask-mpi's ``wait_for_workers``
returns), which each program prints as ``READY <epoch seconds>``; and the
CPU time of everything mpiexec started and waited for
(``RUSAGE_CHILDREN``: the ranks, their supervisors, the host watcher; not
hpcshare's /dev/shm watcher, which outlives the job by design and takes
~0.05 s). The comparison gives the medians and hpcshare's ratios to
dask-mpi; the target, start-up within :data:`TARGET` x plain dask-mpi, is
judged on the median wall time with TLS on (the job's default). The wall
time includes the job's end (teardown and the processes' exit), where
hpcshare spends less than dask-mpi (``cli._leaving``); the time to a ready
client shows the start alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import shm
from .sampling import kill_group
from .targets import Target

__all__ = ["SETTINGS", "STARTUP_RUNS", "TARGET", "Startup", "compare_startup", "format_startup"]

STARTUP_RUNS = 5  #: runs of each setting, unless ``--startup-runs`` says otherwise
TARGET = 1.1  #: hpcshare's median start-up wall time at most this many times plain dask-mpi's
SETTINGS = ("dask-mpi", "hpcshare", "hpcshare no-tls")
EMPTY_MAIN = "import time\n\n\ndef main(client, inputs):\n    print('READY', time.time(), flush=True)\n"
READY = "READY"  #: the line each program prints, with the epoch seconds, once its client has every worker
RUN_TIMEOUT = 300.0  #: seconds one start-up run may take
_FIGURES = ("wall", "cpu", "ready")  #: each run's figures, in this order


@dataclasses.dataclass(frozen=True)
class Startup:
    """One worker count's start-up runs: each setting's (wall, CPU) seconds, in the order run."""

    workers: int
    runs: dict[str, list[tuple[float, float, float]]]  #: (wall, CPU, ready) seconds
    load: tuple[float, float]  #: the 1-minute load average before the first run and after the last
    failed: str = ""  #: the first failed run: setting, exit code and its output's tail

    @property
    def ranks(self) -> int:
        return self.workers + 2

    def median(self, setting: str, what: str = "wall") -> float:
        """The median of ``what`` ("wall", "cpu" or "ready") over the setting's runs."""
        return statistics.median(r[_FIGURES.index(what)] for r in self.runs[setting])

    def ratio(self, setting: str, what: str = "wall") -> float:
        return self.median(setting, what) / self.median("dask-mpi", what)

    def target(self) -> Target | None:
        """The start-up target, judged on the median wall time with TLS on (None if a run failed)."""
        if self.failed:
            return None
        ratio = self.ratio("hpcshare")
        return Target(
            f"start-up within {TARGET}x plain dask-mpi, {self.ranks} ranks, empty main, TLS on "
            f"(median wall of {len(self.runs['hpcshare'])} interleaved runs)",
            ratio <= TARGET,
            f"{self.median('hpcshare'):.2f} s vs {self.median('dask-mpi'):.2f} s ({ratio:.2f}x wall); "
            f"to a ready client {self.ratio('hpcshare', 'ready'):.2f}x; CPU {self.ratio('hpcshare', 'cpu'):.2f}x; "
            f"TLS off {self.ratio('hpcshare no-tls'):.2f}x wall; load {self.load[0]:.1f}-{self.load[1]:.1f}",
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workers": self.workers, "ranks": self.ranks, "load": self.load}
        out["runs"] = {
            s: [dict(zip(_FIGURES, r, strict=True)) for r in runs] for s, runs in self.runs.items()
        }
        if self.failed:
            return out | {"failed": self.failed}
        for s in SETTINGS:
            out[s] = {f: self.median(s, f) for f in _FIGURES}
            if s != "dask-mpi":
                out[s] |= {f"{f}_ratio": self.ratio(s, f) for f in _FIGURES}
        return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ready(output: str, started: float) -> float | None:
    """Seconds from ``started`` (epoch) to the program's ``READY`` line, or None without one (local)."""
    # the ranks' output is merged: not always a line of its own
    found = re.search(rf"{READY} (\d+\.\d+)", output)
    return None if found is None else float(found[1]) - started


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float | None, int, str]:
    """One run: its wall, children's CPU and to-ready seconds, exit code and output (local; bounded)."""
    shm_before = shm.names()
    cpu, t, started = _children_cpu(), time.perf_counter(), time.time()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return 0.0, 0.0, None, -1, kill_group(proc) + f"\ntimed out after {RUN_TIMEOUT:g} s"
    except BaseException:
        kill_group(proc)
        raise
    finally:
        shm.sweep_orphans(shm_before)
    wall, used = time.perf_counter() - t, _children_cpu() - cpu
    return wall, used, _ready(output, started), proc.returncode, output


def compare_startup(
    workers: int,
    runs: int,
    scratch: Path,
    mpiexec: str,
    env: dict[str, str],
    progress: Callable[[str], None],
) -> Startup:
    """``runs`` interleaved start-ups of each of :data:`SETTINGS` at ``workers`` (local)."""
    folder = scratch / f"startup-{workers}"
    folder.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).with_name("plain_dask_mpi.py"), folder / "plain_dask_mpi.py")
    (folder / "empty.py").write_text(EMPTY_MAIN)
    launch = [mpiexec, "-n", str(workers + 2), sys.executable]
    job = [*launch, "-m", "hpcshare", "job", "empty.py", "-q"]
    commands = {
        "dask-mpi": [*launch, "plain_dask_mpi.py"],
        "hpcshare": job,
        "hpcshare no-tls": [*job, "--no-tls"],
    }
    measured: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SETTINGS}
    load = os.getloadavg()[0]
    for i in range(runs):
        order = SETTINGS[i % len(SETTINGS) :] + SETTINGS[: i % len(SETTINGS)]
        for setting in order:
            wall, cpu, ready, code, output = _run(commands[setting], env, folder)
            if code != 0 or ready is None:
                tail = "\n".join(output.strip().splitlines()[-15:])
                why = f"exit code {code}" if code != 0 else f"no {READY} line"
                failed = f"{setting}: {why}:\n{tail}"
                progress(f"start-up W={workers} {failed}")
                return Startup(workers, measured, (load, os.getloadavg()[0]), failed)
            measured[setting].append((wall, cpu, ready))
            progress(
                f"start-up W={workers} {setting}: {wall:.2f} s wall, ready at {ready:.2f} s, {cpu:.2f} s CPU"
            )
    return Startup(workers, measured, (load, os.getloadavg()[0]))


def format_startup(comparisons: list[Startup]) -> str:
    """The start-up table: each setting's median wall, to-ready and CPU seconds, hpcshare's ratios to dask-mpi."""
    head = (
        f"{'start-up, empty main':<21} {'ranks':>5} {'runs':>4} {'wall s':>7} {'ready s':>7} {'CPU s':>7} "
        f"{'wall x':>7} {'ready x':>7} {'CPU x':>7}"
    )
    lines = [head, "-" * len(head)]
    for c in comparisons:
        if c.failed:
            lines.append(f"{'':<21} {c.ranks:>5}  failed  {c.failed.splitlines()[0]}")
            continue
        for s in SETTINGS:
            ratios = (
                " ".join(f"{c.ratio(s, f):>6.2f}x" for f in ("wall", "ready", "cpu"))
                if s != "dask-mpi"
                else ""
            )
            figures = " ".join(f"{c.median(s, f):>7.2f}" for f in ("wall", "ready", "cpu"))
            lines.append(f"{s:<21} {c.ranks:>5} {len(c.runs[s]):>4} {figures} {ratios}".rstrip())
        lines.append(
            f"(medians of interleaved runs; load average {c.load[0]:.1f} before, {c.load[1]:.1f} after)"
        )
    return "\n".join(lines)
