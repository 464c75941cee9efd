"""``hpcshare bench``'s driver: inputs, one contender run at a time, the result.

Each contender runs as its own program (``python -m
hpcshare.bench.contenders``, under mpiexec for the MPI ones), one after
another, so a run's memory is its own. The driver samples the node memory
of the run's process tree from outside (:mod:`.sampling`), reads the
figures the contender wrote, and hands the rows to :mod:`.targets` and
:mod:`.output`. With ``--overhead`` it runs :mod:`.overhead`'s jobs instead,
with TLS and without, and samples no memory; before them (and alone with
``--startup``) :mod:`.startup`'s comparison with plain dask-mpi.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
from dask.utils import format_bytes, parse_bytes

from .. import shm
from ..errors import ConfigError
from .names import ALL_CONTENDERS, CLUSTERS, LOCAL_CONTENDERS, TINY_TASKS
from .output import BASELINES, BenchResult, line, report_text, write_plot, write_results
from .overhead import JOB_ORDER, combine, shares
from .rows import BenchRow
from .sampling import PeakMemory, available_memory, kill_group
from .startup import STARTUP_RUNS, Startup, compare_startup
from .targets import JUDGED_TINY_TASKS, checksums_agree, targets
from .workloads import WORKLOADS

__all__ = ["BenchConfig", "config_from_args", "make_inputs", "memory_needed", "run_bench", "run_one"]

MPI_CONTENDERS = (
    "hpcshare",
    "hpcshare-h5",
    "hpcshare-empty",
    "hpcshare-put",
    "scatter",
    "submit",
    "memmap",
    "memmap-cold",
    "unidist-put",
    "hpcshare-tiny",
)
#: the ones whose workers map the .npy file: its pages in the page cache count once (:mod:`.sampling`)
MAPPING = ("memmap", "memmap-cold")
FRAME_CONTENDERS = ("hpcshare-put", "scatter", "ray-put")  #: the ones that run the frame workload
NODES_CONTENDERS = ("hpcshare-put",)  #: the ones that run on emulated nodes
#: unidist's MPI backend, started by mpiexec, with its per-host shared object store on
UNIDIST_ENV = {
    "UNIDIST_BACKEND": "mpi",
    "UNIDIST_MPI_SPAWN": "False",
    "UNIDIST_MPI_SHARED_OBJECT_STORE": "True",
}
PROCESS_BYTES = 160 * 2**20  # what one Dask or MPI process costs before any data
EMPTY_BYTES = 2**20  # the input of the hpcshare-empty run, and of --overhead's jobs
DEFAULT_SIZES, DEFAULT_WORKERS, DEFAULT_TASKS = "256MiB,1GiB", "1,2,4", 16
DEFAULT_WORKLOADS, DEFAULT_NODES = "array,frame", "1,2"
OVERHEAD_WORKERS = "2"  #: --overhead: 2 workers of 1 thread, with the scheduler and client: 4 ranks
MIN_TINY_TASKS = 100  #: --tiny-tasks: the fewest that every job of each setting gets a share of
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What ``hpcshare bench`` was asked to run."""

    sizes: tuple[int, ...]
    workers: tuple[int, ...]
    tasks: int
    contenders: tuple[str, ...]
    out: Path
    scratch: Path | None = None
    workloads: tuple[str, ...] = ("array", "frame")
    nodes: tuple[int, ...] = (1, 2)  #: emulated nodes for the contenders that run on several
    timeout: float = 1800.0  #: seconds one contender run may take
    overhead: bool = False  #: run the job's own costs (hpcshare-tiny) instead of the contenders
    tiny_tasks: int = TINY_TASKS  #: --overhead: tiny tasks of each kind, with TLS and without
    startup: bool = False  #: run only the start-up comparison with plain dask-mpi (``--startup``)
    startup_runs: int = STARTUP_RUNS  #: --overhead, --startup: start-up runs of each setting
    cluster: str | None = None  #: "local": the seed pattern on a LocalCluster (:mod:`.local`)


def parse_list(text: str, convert: Callable[[str], T]) -> tuple[T, ...]:
    return tuple(convert(t.strip()) for t in text.split(",") if t.strip())


def _check_runs(tiny_tasks: int | None, startup_runs: int | None) -> None:
    """Raise ConfigError for too few tiny tasks or start-up runs (local)."""
    if tiny_tasks is not None and tiny_tasks < MIN_TINY_TASKS:
        raise ConfigError(
            f"--tiny-tasks must be at least {MIN_TINY_TASKS} (each setting's tasks are split over "
            f"{JOB_ORDER.count(True)} jobs), got {tiny_tasks}"
        )
    if startup_runs is not None and startup_runs < 1:
        raise ConfigError(f"--startup-runs must be at least 1, got {startup_runs}")


def config_from_args(
    sizes: str | None = None,
    workers: str | None = None,
    tasks: int | None = None,
    contenders: str | None = None,
    out: str = "bench-out",
    scratch: str | None = None,
    workloads: str | None = None,
    nodes: str | None = None,
    overhead: bool = False,
    tiny_tasks: int | None = None,
    startup: bool = False,
    startup_runs: int | None = None,
    cluster: str | None = None,
) -> BenchConfig:
    """Validate ``hpcshare bench`` arguments (local); one given as None takes its default.

    With ``overhead`` (or ``startup``) the workers default to
    :data:`OVERHEAD_WORKERS` and only ``workers``, ``tiny_tasks`` and
    ``startup_runs`` are used. With ``cluster`` ("local") the contenders are
    :data:`.names.LOCAL_CONTENDERS` and ``nodes`` is not used.
    """
    if cluster is not None and cluster not in CLUSTERS:
        raise ConfigError(f"--cluster takes {' or '.join(CLUSTERS)}, got {cluster!r}")
    sizes, tasks = sizes or DEFAULT_SIZES, tasks or DEFAULT_TASKS
    workers = workers or (OVERHEAD_WORKERS if overhead or startup else DEFAULT_WORKERS)
    known = LOCAL_CONTENDERS if cluster else ALL_CONTENDERS
    contenders = contenders or ",".join(known)
    workloads, nodes = (
        workloads or DEFAULT_WORKLOADS,
        nodes or ("1" if overhead or startup or cluster else DEFAULT_NODES),
    )
    try:
        size_list = parse_list(sizes, lambda t: int(parse_bytes(t)))
    except ValueError as exc:
        raise ConfigError(f"--sizes takes sizes like 256MiB,1GiB: {exc}") from None
    try:
        worker_list = parse_list(workers, int)
    except ValueError:
        raise ConfigError(f"--workers takes whole numbers like 1,2,4, got {workers!r}") from None
    names = parse_list(contenders, str)
    unknown = sorted(set(names) - set(known))
    if unknown:
        mode = f" with --cluster {cluster}" if cluster else ""
        raise ConfigError(f"unknown contender(s){mode} {', '.join(unknown)}; choose from {', '.join(known)}")
    if not size_list or min(size_list) < 8 or not worker_list or min(worker_list) < 1 or tasks < 1:
        raise ConfigError("--sizes, --workers and --tasks must be positive")
    kinds = parse_list(workloads, str)
    if not kinds or set(kinds) - set(WORKLOADS):
        raise ConfigError(f"--workloads takes {' and/or '.join(WORKLOADS)}, got {workloads!r}")
    try:
        node_list = parse_list(nodes, int)
    except ValueError:
        node_list = ()
    if not node_list or min(node_list) < 1 or max(node_list) > min(worker_list):
        raise ConfigError(
            f"--nodes takes emulated node counts like 1,2, each at least 1 and at most the "
            f"smallest --workers ({min(worker_list)}: every node needs a worker), got {nodes!r}"
        )
    _check_runs(tiny_tasks, startup_runs)
    return BenchConfig(
        size_list,
        worker_list,
        tasks,
        names,
        Path(out),
        Path(scratch) if scratch else None,
        kinds,
        node_list,
        overhead=overhead,
        tiny_tasks=tiny_tasks or TINY_TASKS,
        startup=startup,
        startup_runs=startup_runs or STARTUP_RUNS,
        cluster=cluster,
    )


def make_inputs(folder: Path, nbytes: int) -> tuple[Path, Path]:
    """Write the benchmark input as .npy and as an HDF5 dataset ``/x`` (local).

    Both are flushed to disk before this returns, so that no contender reads
    a file still being written back.
    """
    import h5py

    n = max(nbytes // 8, 1)
    npy, h5 = folder / f"input-{nbytes}.npy", folder / f"input-{nbytes}.h5"
    rng = np.random.default_rng(42)
    block = 1 << 24
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float64, shape=(n,))
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset("x", shape=(n,), dtype=np.float64, chunks=(min(n, 1 << 20),))
        for a in range(0, n, block):
            piece = rng.random(min(block, n - a))
            out[a : a + piece.size] = piece
            ds[a : a + piece.size] = piece
    out.flush()
    del out
    sync_to_disk(npy, h5)
    return npy, h5


def sync_to_disk(*paths: Path) -> None:
    """Flush files to disk before any contender reads them, as a real input is (local)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the MPI extra's), else on PATH (local)."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        raise FileNotFoundError("mpiexec not found: install the mpich extra or load your site MPI")
    return mpiexec


def memory_needed(contender: str, nbytes: int, workers: int, nodes: int = 1) -> int:
    """A conservative estimate of the node memory a contender needs (local)."""
    procs = (workers + 2) * PROCESS_BYTES
    return {
        "hpcshare": nbytes + procs,
        "hpcshare-h5": nbytes + procs,
        "hpcshare-empty": procs,
        "hpcshare-tiny": procs,
        # the maker's private object and its group's file; the seed pattern and scatter as under mpiexec
        "local-hpcshare": 2 * nbytes + procs,
        "local-empty": procs,
        "local-submit": nbytes * (workers + 3) + procs,
        "local-scatter": nbytes * (workers + 3) + procs,
        # the maker's private object, then one node file per emulated node
        "hpcshare-put": nbytes * (1 + nodes) + procs,
        # measured here at W = 1: 3 S (the client's copy and two serialization buffers,
        # the seed pattern's creating worker likewise), then S per further worker
        "scatter": nbytes * (workers + 3) + procs,
        "submit": nbytes * (workers + 3) + procs,
        "fork": nbytes + workers * PROCESS_BYTES,
        # the file's pages in the page cache, mapped by every worker
        "memmap": nbytes + procs,
        "memmap-cold": nbytes + procs,
        "ray": 2 * nbytes + procs + 512 * 2**20,
        "ray-put": 2 * nbytes + procs + 512 * 2**20,
        # measured here at 1 GiB, W = 4: 2.26 GiB at the peak
        "unidist-put": 3 * nbytes + procs,
        "mpi-transfer": 2 * nbytes + 3 * PROCESS_BYTES,
        "shm-copy": 2 * nbytes,
        "h5-read-direct": nbytes,
    }[contender]


def _command(contender: str, workers: int) -> list[str]:
    job = [sys.executable, "-m", "hpcshare.bench.contenders", contender]
    if contender in MPI_CONTENDERS or contender == "mpi-transfer":
        return [find_mpiexec(), "-n", str(workers + 2), *job]
    return job


_NEEDS = {  # contender or workload: (module it imports, what to install)
    "ray": ("ray", "Ray is not installed (pip install 'hpcshare[bench]')"),
    "ray-put": ("ray", "Ray is not installed (pip install 'hpcshare[bench]')"),
    "unidist-put": ("msgpack", "unidist is not installed (pip install 'hpcshare[bench]')"),
    "frame": ("pandas", "pandas is not installed (pip install 'hpcshare[dataframe]')"),
}


def _why_not(
    contender: str, nbytes: int, workers: int, workload: str = "array", nodes: int = 1
) -> str | None:
    """Why this run would not be started, or None."""
    need, have = memory_needed(contender, nbytes, workers, nodes), available_memory()
    if need > 0.8 * have:  # never near the OOM killer
        return f"needs about {format_bytes(need)}, {format_bytes(have)} available"
    for what in (contender, workload):
        if what in _NEEDS:
            module, message = _NEEDS[what]
            if importlib.util.find_spec(module) is None or (
                what == "unidist-put" and importlib.util.find_spec("unidist") is None
            ):
                return message
    return None


def _env(scratch: Path) -> dict[str, str]:
    """A run's environment: one BLAS thread, Dask's scratch files with the run's, not in /tmp."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env | {"DASK_TEMPORARY_DIRECTORY": str(scratch)}


def run_one(
    contender: str,
    npy: Path,
    h5: Path,
    nbytes: int,
    workers: int,
    tasks: int,
    scratch: Path,
    timeout: float,
    workload: str = "array",
    nodes: int = 1,
    tls: bool | None = None,
) -> BenchRow:
    """Run one contender, measured from outside (local).

    ``tls`` is hpcshare-tiny's setting (False: ``--no-tls``). Its runs are
    not sampled for memory: the sampler's CPU time would be taken from the
    tasks it times.
    """
    row = BenchRow(contender, nbytes, workers, tasks, workload, nodes, tls)
    reason = _why_not(contender, nbytes, workers, workload, nodes)
    if reason:
        return row.ended("skipped", reason)
    out = (
        scratch / f"{contender}-{workload}-{nbytes}-{workers}-{nodes}{'-no-tls' if tls is False else ''}.json"
    )
    cmd = [*_command(contender, workers), "--npy", str(npy), "--h5", str(h5)]
    cmd += ["--tasks", str(tasks), "--workers", str(workers), "--out", str(out)]
    cmd += ["--workload", workload, "--nodes", str(nodes)]
    if contender == "hpcshare-tiny":
        cmd += [*(["--no-tls"] if tls is False else []), "--launched", repr(time.time())]
    env = _env(scratch)
    if contender == "unidist-put":
        env.update(UNIDIST_ENV)
    shm_before = shm.names()
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        sampler = PeakMemory(proc.pid, mapped=os.path.realpath(npy) if contender in MAPPING else None)
        with sampler if contender != "hpcshare-tiny" else contextlib.nullcontext() as memory:
            output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return row.ended("failed", f"timed out after {timeout:g} s")
    except BaseException:  # interrupted: take the contender down with us
        kill_group(proc)
        raise
    finally:
        # a contender killed for time (or by the OOM killer) cannot remove its MPI files
        shm.sweep_orphans(shm_before)
    sampled = {"node_memory": memory.peak, "processes": memory.processes} if memory is not None else {}
    row = row.ended("ok", wall=time.perf_counter() - t).with_figures(sampled)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(output.strip().splitlines()[-15:])
        return row.ended("failed", f"exit code {proc.returncode}:\n{tail}")
    row = row.with_figures(json.loads(out.read_text()))
    if memory is not None and row.task_window:  # the steady state: the object made and shared, tasks running
        row = row.with_figures({"steady_memory": memory.peak_between(*row.task_window)})
    return row


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclasses.dataclass(frozen=True)
class _Run:
    contender: str
    npy: Path
    h5: Path
    size: int
    workers: int
    workload: str = "array"
    nodes: int = 1


def _plan(cfg: BenchConfig, nbytes: int, npy: Path, h5: Path, empty: tuple[Path, Path]) -> list[_Run]:
    """The runs at one input size, in order: the baselines, then each worker count's contenders."""
    if cfg.cluster:
        return _local_plan(cfg, nbytes, npy, h5, empty)
    runs = [_Run(base, npy, h5, nbytes, 1) for base in BASELINES if base != "mpi-transfer"]
    if max(cfg.nodes) > 1 and any(c in NODES_CONTENDERS for c in cfg.contenders):
        runs.append(_Run("mpi-transfer", npy, h5, nbytes, 1))
    for workers in cfg.workers:
        if nbytes == cfg.sizes[0]:  # the cost of the processes alone, once per W (and per workload)
            runs.append(_Run("hpcshare-empty", *empty, EMPTY_BYTES, workers))
            if "frame" in cfg.workloads and "hpcshare-put" in cfg.contenders:
                runs.append(_Run("hpcshare-empty", *empty, EMPTY_BYTES, workers, "frame"))
        for workload in cfg.workloads:
            for contender in cfg.contenders:
                if workload == "frame" and contender not in FRAME_CONTENDERS:
                    continue
                for nodes in cfg.nodes if contender in NODES_CONTENDERS else (1,):
                    runs.append(_Run(contender, npy, h5, nbytes, workers, workload, nodes))
    return runs


def _local_plan(cfg: BenchConfig, nbytes: int, npy: Path, h5: Path, empty: tuple[Path, Path]) -> list[_Run]:
    """``--cluster local``'s runs at one size: at each W and workload the empty cluster (at the first
    size), the copy baseline and the contenders.

    The baseline runs just before the contenders it is the yardstick of: on
    a machine shared with other work, a copy measured minutes earlier may
    have had another load.
    """
    runs = []
    for workers in cfg.workers:
        for workload in cfg.workloads:
            if nbytes == cfg.sizes[0] and "local-hpcshare" in cfg.contenders:
                runs.append(_Run("local-empty", *empty, EMPTY_BYTES, workers, workload))
            runs.append(_Run("shm-copy", npy, h5, nbytes, workers, workload))
            runs += [_Run(c, npy, h5, nbytes, workers, workload) for c in cfg.contenders]
    return runs


def _run(cfg: BenchConfig, scratch: Path, run: _Run) -> BenchRow:
    return run_one(
        run.contender,
        run.npy,
        run.h5,
        run.size,
        run.workers,
        cfg.tasks,
        scratch,
        cfg.timeout,
        run.workload,
        run.nodes,
    )


def _runs_at_size(
    cfg: BenchConfig, scratch: Path, nbytes: int, empty: tuple[Path, Path]
) -> Iterator[BenchRow]:
    """Every run at one input size: the baselines, then each worker count's contenders."""
    disk = shutil.disk_usage(scratch).free
    if 2 * nbytes + 2**30 > disk:
        note = f"needs {format_bytes(2 * nbytes)} of disk for the input files, {format_bytes(disk)} free"
        _progress(f"S={format_bytes(nbytes)}: skipped, {note}")
        for run in _plan(cfg, nbytes, Path(), Path(), empty):
            yield BenchRow(run.contender, nbytes, run.workers, cfg.tasks, run.workload, run.nodes).ended(
                "skipped", note
            )
        return
    _progress(f"writing a {format_bytes(nbytes)} input (.npy and HDF5)")
    npy, h5 = make_inputs(scratch, nbytes)
    try:
        for run in _plan(cfg, nbytes, npy, h5, empty):
            row = _run(cfg, scratch, run)
            _progress(line(row))
            yield row
    finally:
        npy.unlink()
        h5.unlink()


def _overhead_rows(cfg: BenchConfig, scratch: Path, empty: tuple[Path, Path]) -> Iterator[BenchRow]:
    """``--overhead``: at each W the hpcshare-tiny jobs of JOB_ORDER, then one row per TLS setting."""
    per_job = shares(cfg.tiny_tasks, JOB_ORDER.count(True))
    for workers in cfg.workers:
        jobs: dict[bool, list[BenchRow]] = {True: [], False: []}
        for tls in JOB_ORDER:
            tasks = per_job[len(jobs[tls])]
            job = run_one(
                "hpcshare-tiny", *empty, EMPTY_BYTES, workers, tasks, scratch, cfg.timeout, "tiny", tls=tls
            )
            _progress(line(job))
            jobs[tls].append(job)
        yield combine(jobs[True])
        yield combine(jobs[False])


def _all_rows(cfg: BenchConfig, scratch: Path, empty: tuple[Path, Path]) -> Iterator[BenchRow]:
    if cfg.overhead:
        yield from _overhead_rows(cfg, scratch, empty)
        return
    for nbytes in cfg.sizes:
        yield from _runs_at_size(cfg, scratch, nbytes, empty)


def _result(
    cfg: BenchConfig,
    rows: list[BenchRow],
    started: float,
    startup: list[Startup],
    interrupted: bool = False,
) -> BenchResult:
    config: dict[str, Any] = {
        "sizes": cfg.sizes,
        "workers": cfg.workers,
        "tasks": cfg.tasks,
        "contenders": cfg.contenders,
        "workloads": cfg.workloads,
        "nodes": cfg.nodes,
    }
    if cfg.cluster:
        config = {**config, "cluster": cfg.cluster}
    if cfg.overhead:
        config = {"overhead": True, "workers": cfg.workers, "tiny_tasks": cfg.tiny_tasks, "jobs": JOB_ORDER}
    if cfg.startup:
        config = {"startup": True, "workers": cfg.workers}
    if cfg.overhead or cfg.startup:
        config["startup_runs"] = cfg.startup_runs
    verdicts = [t for c in startup if (t := c.target()) is not None] + targets(rows)
    return BenchResult(
        config, time.perf_counter() - started, rows, checksums_agree(rows), verdicts, interrupted, startup
    )


_NONE_JUDGED = (
    "targets: none judged; they are stated for inputs of at least 1 GiB (memory ones at W = 4): "
    "add 1GiB to --sizes"
)
_NONE_JUDGED_OVERHEAD = (
    f"targets: none judged; the handle target is stated for {JUDGED_TINY_TASKS} tiny tasks or more: "
    "raise --tiny-tasks"
)


def _compile_package() -> None:
    """Compile hpcshare's modules that have no current bytecode, and say so (local).

    The contenders' packages, installed from wheels, were compiled at
    install, and so is hpcshare by ``pip install .``; an editable install
    under ``PYTHONDONTWRITEBYTECODE=1`` (some sites set it) has no bytecode,
    and every rank of every run would compile hpcshare's modules again
    (0.3-0.6 s of CPU per rank measured), which is not the job's cost.
    """
    import compileall

    root = Path(__file__).resolve().parent.parent
    stale = [
        py
        for py in root.rglob("*.py")
        if not os.path.exists(pyc := importlib.util.cache_from_source(str(py)))
        or os.path.getmtime(pyc) < os.path.getmtime(py)
    ]
    if not stale:
        return
    done = compileall.compile_dir(str(root), quiet=2)
    what = f"{len(stale)} of hpcshare's modules had no current bytecode (an editable install"
    what += ", PYTHONDONTWRITEBYTECODE set)" if sys.dont_write_bytecode else ")"
    if done:
        print(f"bench: {what}: compiled them first, as pip install does, so no rank compiles them per run")
    else:
        print(
            f"bench: {what} and compiling them failed: every rank compiles them per run, start-up is slower"
        )


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run every contender at every size and worker count, or with ``overhead`` the hpcshare-tiny
    jobs at every worker count; write JSON, table and plot (local).

    hpcshare's modules are compiled to bytecode first where they have none.
    """
    signal.signal(signal.SIGTERM, _terminate)  # clean up (the running contender, the inputs) on kill
    _compile_package()
    cfg.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="hpcshare-bench-", dir=cfg.scratch))
    rows: list[BenchRow] = []
    startup: list[Startup] = []
    started = time.perf_counter()
    try:
        if cfg.overhead or cfg.startup:  # first: the quickest answer
            for workers in cfg.workers:
                startup.append(
                    compare_startup(
                        workers, cfg.startup_runs, scratch, find_mpiexec(), _env(scratch), _progress
                    )
                )
        if not cfg.startup:
            empty = make_inputs(scratch, EMPTY_BYTES)
            for row in _all_rows(cfg, scratch, empty):
                rows.append(row)  # one at a time: an interrupted run keeps the rows so far
    except KeyboardInterrupt:
        write_results(_result(cfg, rows, started, startup, interrupted=True), cfg.out)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = _result(cfg, rows, started, startup)
    write_results(result, cfg.out)
    print(report_text(rows, startup))
    for t in result.targets:
        print(f"target {'met ' if t.met else 'MISSED'}  {t.what}: {t.figure}")
    if cfg.overhead and not any(t.what.startswith("tiny tasks") for t in result.targets):
        print(_NONE_JUDGED_OVERHEAD)
    elif not result.targets and not cfg.startup:
        print(_NONE_JUDGED)
    if cfg.overhead or cfg.startup:
        print(f"written: {cfg.out / 'bench.json'}, {cfg.out / 'bench.txt'}")
        return result
    plot = write_plot(rows, cfg.out / "bench.png")
    print(
        f"written: {cfg.out / 'bench.json'}, {cfg.out / 'bench.txt'}"
        + (f", {plot}" if plot else " (no plot: pip install matplotlib)")
    )
    return result
