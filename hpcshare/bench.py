"""``hpcshare bench``: hpcshare against Dask, fork and Ray on the same workload.

Each contender runs as its own program (under mpiexec for the MPI ones),
one after another; this driver samples the node memory of the run's whole
process tree from outside (the sum of PSS over its processes, which splits
shared pages instead of counting them once per process), reads the
figures the contender wrote, and prints a table, JSON and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dask.utils import format_bytes, parse_bytes

from ._reaper import orphaned_shm_names, shm_names
from .report import _smaps_rollup

__all__ = ["BenchConfig", "run_bench"]

MPI_CONTENDERS = ("hpcshare", "hpcshare-h5", "hpcshare-empty", "scatter", "submit")
ALL_CONTENDERS = ("hpcshare", "hpcshare-h5", "scatter", "submit", "fork", "ray")
BASELINES = ("shm-copy", "h5-read-direct")
PROCESS_BYTES = 160 * 2**20  # what one Dask or MPI process costs before any data
EMPTY_BYTES = 2**20  # the input of the hpcshare-empty run


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What ``hpcshare bench`` was asked to run."""

    sizes: tuple[int, ...]
    workers: tuple[int, ...]
    tasks: int
    contenders: tuple[str, ...]
    out: Path
    scratch: Path | None = None
    timeout: float = 1800.0


def parse_list(text: str, convert: Any) -> tuple[Any, ...]:
    return tuple(convert(t.strip()) for t in text.split(",") if t.strip())


# --- memory sampling -------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class _Sampler(threading.Thread):
    """Samples the summed PSS of a process tree every ``interval`` seconds; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = 0
        self.processes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = _descendants(self.root)
            total = sum(_smaps_rollup(pid).get("Pss", 0) for pid in pids)
            if total > self.peak:
                self.peak, self.processes = total, len(pids)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _kill_group(proc: subprocess.Popen[str]) -> str:
    """Kill a contender's process group and wait (at most 10 s) until none of it is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # ranks that outlive mpiexec still map their files
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return output


def _sweep_shm(before: set[str]) -> None:
    """Remove /dev/shm files that appeared during a run and that no process maps any more.

    A contender killed for running out of time (or by the OOM killer) cannot
    remove its MPI library's files; nobody else would.
    """
    for name in orphaned_shm_names(before):
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


# --- inputs --------------------------------------------------------------------


def make_inputs(folder: Path, nbytes: int) -> tuple[Path, Path]:
    """Write the benchmark input as .npy and as an HDF5 dataset ``/x`` (local)."""
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
    return npy, h5


# --- running contenders ------------------------------------------------------


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_needed(contender: str, nbytes: int, workers: int) -> int:
    """A conservative estimate of the node memory a contender needs (local)."""
    procs = (workers + 2) * PROCESS_BYTES
    return {
        "hpcshare": nbytes + procs,
        "hpcshare-h5": nbytes + procs,
        "hpcshare-empty": procs,
        # measured here at W = 1: 3 S (the client's copy and two serialization buffers,
        # the seed pattern's creating worker likewise), then S per further worker
        "scatter": nbytes * (workers + 3) + procs,
        "submit": nbytes * (workers + 3) + procs,
        "fork": nbytes + workers * PROCESS_BYTES,
        "ray": 2 * nbytes + procs + 512 * 2**20,
        "shm-copy": 2 * nbytes,
        "h5-read-direct": nbytes,
    }[contender]


def _command(contender: str, workers: int) -> list[str]:
    job = [sys.executable, "-m", "hpcshare._bench_job", contender]
    if contender in MPI_CONTENDERS:
        mpiexec = shutil.which(
            "mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
        )
        if mpiexec is None:
            raise FileNotFoundError("mpiexec not found: install the mpich extra or load your site MPI")
        return [mpiexec, "-n", str(workers + 2), *job]
    return job


def run_one(
    contender: str, npy: Path, h5: Path, nbytes: int, workers: int, tasks: int, scratch: Path, timeout: float
) -> dict[str, Any]:
    """Run one contender, measured from outside; never lets it near the OOM killer (local)."""
    row: dict[str, Any] = {"contender": contender, "size": nbytes, "workers": workers, "tasks": tasks}
    need, have = memory_needed(contender, nbytes, workers), _mem_available()
    if need > 0.8 * have:
        row.update(status="skipped", note=f"needs about {format_bytes(need)}, {format_bytes(have)} available")
        return row
    if contender == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            row.update(status="skipped", note="Ray is not installed (pip install 'hpcshare[bench]')")
            return row
    out = scratch / f"{contender}-{nbytes}-{workers}.json"
    cmd = [*_command(contender, workers), "--npy", str(npy), "--h5", str(h5)]
    cmd += ["--tasks", str(tasks), "--workers", str(workers), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.perf_counter()
    shm_before = shm_names()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    sampler = _Sampler(proc.pid)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = _kill_group(proc)
        row.update(status="failed", note=f"timed out after {timeout:g} s")
        return row
    except BaseException:  # interrupted: take the contender down with us
        _kill_group(proc)
        raise
    finally:
        sampler.stop()
        _sweep_shm(shm_before)
    row["wall"] = time.perf_counter() - t
    row["node_memory"] = sampler.peak
    row["processes"] = sampler.processes
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(output.strip().splitlines()[-15:])
        row.update(status="failed", note=f"exit code {proc.returncode}:\n{tail}")
        return row
    row.update(json.loads(out.read_text()), status="ok")
    return row


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every contender at every size and worker count; write JSON, table and plot (local)."""
    signal.signal(signal.SIGTERM, _terminate)  # clean up (the running contender, the inputs) on kill
    cfg.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="hpcshare-bench-", dir=cfg.scratch))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        empty_npy, empty_h5 = make_inputs(scratch, EMPTY_BYTES)
        for nbytes in cfg.sizes:
            disk = shutil.disk_usage(scratch).free
            if 2 * nbytes + 2**30 > disk:
                note = (
                    f"needs {format_bytes(2 * nbytes)} of disk for the input files, {format_bytes(disk)} free"
                )
                for name in (*BASELINES, *cfg.contenders):
                    for workers in cfg.workers:
                        rows.append(
                            {
                                "contender": name,
                                "size": nbytes,
                                "workers": workers,
                                "tasks": cfg.tasks,
                                "status": "skipped",
                                "note": note,
                            }
                        )
                _progress(f"S={format_bytes(nbytes)}: skipped, {note}")
                continue
            _progress(f"writing a {format_bytes(nbytes)} input (.npy and HDF5)")
            npy, h5 = make_inputs(scratch, nbytes)
            for base in BASELINES:
                rows.append(run_one(base, npy, h5, nbytes, 1, cfg.tasks, scratch, cfg.timeout))
                _progress(_line(rows[-1]))
            for workers in cfg.workers:
                for contender in ("hpcshare-empty", *cfg.contenders):
                    if contender == "hpcshare-empty":
                        if nbytes != cfg.sizes[0]:
                            continue
                        row = run_one(
                            contender,
                            empty_npy,
                            empty_h5,
                            EMPTY_BYTES,
                            workers,
                            cfg.tasks,
                            scratch,
                            cfg.timeout,
                        )
                    else:
                        row = run_one(contender, npy, h5, nbytes, workers, cfg.tasks, scratch, cfg.timeout)
                    rows.append(row)
                    _progress(_line(row))
            npy.unlink()
            h5.unlink()
    except KeyboardInterrupt:
        _write_results(cfg, rows, started, interrupted=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = _write_results(cfg, rows, started)
    table = format_table(rows)
    print(table)
    for t in result["targets"]:
        print(f"target {'met ' if t['met'] else 'MISSED'}  {t['what']}: {t['figure']}")
    plot = write_plot(rows, cfg.out / "bench.png")
    print(
        f"written: {cfg.out / 'bench.json'}, {cfg.out / 'bench.txt'}"
        + (f", {plot}" if plot else " (no plot: pip install matplotlib)")
    )
    return result


def _write_results(
    cfg: BenchConfig, rows: list[dict[str, Any]], started: float, interrupted: bool = False
) -> dict[str, Any]:
    """bench.json and bench.txt in ``cfg.out`` (local)."""
    goals = targets(rows)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "memory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        },
        "config": {
            "sizes": cfg.sizes,
            "workers": cfg.workers,
            "tasks": cfg.tasks,
            "contenders": cfg.contenders,
        },
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "checksums_agree": checksums_agree(rows),
        "targets": goals,
        "interrupted": interrupted,
    }
    (cfg.out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    (cfg.out / "bench.txt").write_text(format_table(rows) + "\n")
    return result


def _line(row: dict[str, Any]) -> str:
    what = f"{row['contender']} S={format_bytes(row['size'])} W={row['workers']}"
    if row["status"] != "ok":
        return f"{what}: {row['status']} ({row.get('note', '')})"
    return f"{what}: node memory {format_bytes(row.get('node_memory', 0))}, ready {row['ready']:.3f} s"


def checksums_agree(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether every contender that ran produced the same checksum for the same size and task count."""
    by_size: dict[int, list[float]] = {}
    for r in rows:
        if r["status"] == "ok" and "checksum" in r and r["contender"] != "hpcshare-empty":
            by_size.setdefault(r["size"], []).append(r["checksum"])
    return all(np.allclose(v, v[0], rtol=1e-12, atol=0) for v in by_size.values())


def _find(
    rows: Sequence[dict[str, Any]], contender: str, size: int | None = None, workers: int | None = None
) -> dict[str, Any] | None:
    for r in rows:
        if (
            r["contender"] == contender
            and r["status"] == "ok"
            and (size is None or r["size"] == size)
            and (workers is None or r["workers"] == workers)
        ):
            return r
    return None


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's benchmark targets that these rows can judge."""
    out: list[dict[str, Any]] = []

    def add(what: str, met: bool, figure: str) -> None:
        out.append({"what": what, "met": bool(met), "figure": figure})

    def add_ready_ratio(
        what: str, ours: dict[str, Any] | None, base: dict[str, Any] | None, limit: float
    ) -> None:
        if ours and base:
            ratio = ours["ready"] / base["ready"]
            add(what, ratio <= limit, f"{ours['ready']:.3f} s vs {base['ready']:.3f} s ({ratio:.2f}x)")

    for r in rows:
        # the targets are stated for inputs of 1 GiB and more (memory ones at W = 4)
        if r["contender"] != "hpcshare" or r["status"] != "ok" or r["size"] < 2**30:
            continue
        size, w = r["size"], r["workers"]
        tag = f"S={format_bytes(size)}, W={w}"
        empty = _find(rows, "hpcshare-empty", workers=w)
        if empty and w == 4:
            limit = 1.15 * (size + empty["node_memory"])
            add(
                f"hpcshare node memory <= 1.15 x (S + empty job), {tag}",
                r["node_memory"] <= limit,
                f"{format_bytes(r['node_memory'])} vs {format_bytes(int(limit))}",
            )
        for other in ("scatter", "submit"):
            o = _find(rows, other, size, w)
            if o and w == 4:
                ratio = o["node_memory"] / r["node_memory"]
                add(f"{other} uses >= 3.5x hpcshare's node memory, {tag}", ratio >= 3.5, f"{ratio:.2f}x")
        ray = _find(rows, "ray", size, w)
        if ray:
            add(
                f"hpcshare node memory <= Ray's, {tag}",
                r["node_memory"] <= ray["node_memory"],
                f"{format_bytes(r['node_memory'])} vs {format_bytes(ray['node_memory'])}",
            )
        add_ready_ratio(
            f"time to ready <= 1.3x one-process copy into fresh shared memory, {tag}",
            r,
            _find(rows, "shm-copy", size),
            1.3,
        )
        add_ready_ratio(
            f"time to ready from HDF5 <= 1.2x read_direct into private memory, {tag}",
            _find(rows, "hpcshare-h5", size, w),
            _find(rows, "h5-read-direct", size),
            1.2,
        )
        scatter = _find(rows, "scatter", size, w)
        if scatter and w == 4:
            ratio = scatter["ready"] / r["ready"]
            add(
                f"time to ready >= 2x faster than scatter(broadcast=True), {tag}", ratio >= 2, f"{ratio:.1f}x"
            )
        add(
            f"handle resolve median <= 20 us, {tag}",
            r["resolve_us_median"] <= 20,
            f"{r['resolve_us_median']:.2f} us (p99 {r['resolve_us_p99']:.2f} us)",
        )
        add(
            f"waiting ranks use < 5% of a core during placement, {tag}",
            r["waiting_cpu_fraction"] < 0.05,
            f"{100 * r['waiting_cpu_fraction']:.1f}%",
        )
    for w in sorted({r["workers"] for r in rows}):
        probes = sorted(
            (r["size"], r["probe_task_median"], r["probe_task_first_read_median"])
            for r in rows
            if r["contender"] == "hpcshare" and r["status"] == "ok" and r["workers"] == w
        )
        if len(probes) > 1:
            (s0, small, small_cold), (s1, large, large_cold) = probes[0], probes[-1]
            add(
                f"task time flat in S (resolve + read 1 MiB, {format_bytes(s1)} over "
                f"{format_bytes(s0)} <= 1.1), W={w}",
                large / small <= 1.1,
                f"{large * 1e3:.3f} ms vs {small * 1e3:.3f} ms ({large / small:.2f}x); first read from "
                f"memory, not cache: {large_cold * 1e3:.3f} ms vs {small_cold * 1e3:.3f} ms",
            )
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'contender':<15} {'S':>10} {'W':>3} {'node memory':>12} {'ready s':>8} {'tasks s':>8} {'ovh/task ms':>11} {'moved':>10}  checksum / note"
    lines = [head, "-" * len(head)]
    for r in rows:
        size = format_bytes(r["size"])
        if r["status"] != "ok":
            lines.append(
                f"{r['contender']:<15} {size:>10} {r['workers']:>3} {r['status']:>12}  {r.get('note', '').splitlines()[0] if r.get('note') else ''}"
            )
            continue
        mem = format_bytes(r["node_memory"])
        ready = f"{r['ready']:.3f}"
        phase = f"{r['task_phase']:.2f}" if "task_phase" in r else "-"
        ovh = f"{1e3 * r['per_task_overhead']:.2f}" if "per_task_overhead" in r else "-"
        moved = format_bytes(r["moved_bytes"]) if r.get("moved_bytes") is not None else "-"
        checksum = f"{r['checksum']:.10e}" if "checksum" in r else ""
        lines.append(
            f"{r['contender']:<15} {size:>10} {r['workers']:>3} {mem:>12} {ready:>8} {phase:>8} {ovh:>11} {moved:>10}  {checksum}"
        )
    return "\n".join(lines)


def write_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Node memory against W (largest S all ran at) and against S (largest W), a line per contender."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [
        r
        for r in rows
        if r["status"] == "ok" and r["contender"] not in BASELINES and r["contender"] != "hpcshare-empty"
    ]
    if not ok:
        return None
    contenders = sorted({r["contender"] for r in ok})
    # against W: the largest S at which every contender ran at every W (else the largest S)
    complete = [
        size
        for size in {r["size"] for r in ok}
        if len({(r["contender"], r["workers"]) for r in ok if r["size"] == size})
        == len(contenders) * len({r["workers"] for r in ok})
    ]
    big_s = max(complete or [r["size"] for r in ok])
    big_w = max(r["workers"] for r in ok)
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in contenders:
        by_w = sorted(
            (r["workers"], r["node_memory"] / 2**30) for r in ok if r["contender"] == c and r["size"] == big_s
        )
        by_s = sorted(
            (r["size"] / 2**30, r["node_memory"] / 2**30)
            for r in ok
            if r["contender"] == c and r["workers"] == big_w
        )
        if by_w:
            ax_w.plot(*zip(*by_w, strict=True), marker="o", label=c)
        if by_s:
            ax_s.plot(*zip(*by_s, strict=True), marker="o", label=c)
    ax_w.set(
        title=f"node memory vs workers (S = {format_bytes(big_s)})",
        xlabel="workers W",
        ylabel="node memory, sum of PSS (GiB)",
    )
    ax_s.set(
        title=f"node memory vs input size (W = {big_w})",
        xlabel="input size S (GiB)",
        ylabel="node memory, sum of PSS (GiB)",
    )
    for ax in (ax_w, ax_s):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def config_from_args(
    sizes: str, workers: str, tasks: int, contenders: str, out: str, scratch: str | None
) -> BenchConfig:
    """Validate ``hpcshare bench`` arguments (local)."""
    from .errors import ConfigError

    try:
        size_list = parse_list(sizes, lambda t: int(parse_bytes(t)))
    except ValueError as exc:
        raise ConfigError(f"--sizes takes sizes like 256MiB,1GiB: {exc}") from None
    try:
        worker_list = parse_list(workers, int)
    except ValueError:
        raise ConfigError(f"--workers takes whole numbers like 1,2,4, got {workers!r}") from None
    names = parse_list(contenders, str)
    unknown = sorted(set(names) - set(ALL_CONTENDERS))
    if unknown:
        raise ConfigError(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(ALL_CONTENDERS)}"
        )
    if not size_list or min(size_list) < 8 or not worker_list or min(worker_list) < 1 or tasks < 1:
        raise ConfigError("--sizes, --workers and --tasks must be positive")
    return BenchConfig(size_list, worker_list, tasks, names, Path(out), Path(scratch) if scratch else None)
