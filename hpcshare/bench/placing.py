"""``hpcshare bench --placement``: placement alone over 1 to 4 emulated nodes, collective vs per-node.

For a .npy file and a gzip-chunked HDF5 dataset of the size asked for, each
run places one input on N emulated nodes of ``RANKS_PER_NODE`` ranks
(``mpiexec -n N*R python -m hpcshare.bench.placing ...``: topology and
placement only, no Dask) and reports, for the whole job:

- the bytes its ranks' reads asked for, and ``/proc/PID/io`` ``rchar``
  summed over the ranks (what the kernel counted; HDF5's compressed bytes);
- the bytes the node leaders received over MPI, in the broadcast of shares;
- the time to ready: world rank 0's clock from the start of placement until
  every node holds the input.

Targets (issue 10): with collective reading the bytes read per job are at
most 1.1x the file's size at every node count; ready on 3 nodes is at most
1.3x ready on 1 node.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from dask.utils import format_bytes

__all__ = [
    "PlacementRow",
    "bench_placement",
    "format_rows",
    "main",
    "make_files",
    "run_sweep",
    "sweep_targets",
]

RANKS_PER_NODE = 2  #: ranks (and readers) per emulated node
NODES = (1, 2, 3, 4)
MODES = ("collective", "per-node")
FORMATS = ("npy", "h5-gzip")
READ_TARGET = 1.1  #: bytes read per job, at most this many times the file
READY_TARGET = 1.3  #: ready on 3 nodes, at most this many times ready on 1


@dataclasses.dataclass(frozen=True)
class PlacementRow:
    format: str
    nodes: int
    mode: str
    nbytes: int  #: the input's size in memory, one node's copy
    file_size: int  #: the file's size on disk
    counted: int  #: bytes the ranks' reads asked for (HDF5: decompressed bytes)
    rchar: int  #: bytes the kernel counted as read by the ranks (/proc/PID/io)
    broadcast_bytes: int  #: bytes the node leaders received from each other's broadcasts
    ready: float  #: seconds from the start of placement to every node holding the input
    read: float  #: seconds of the read step
    broadcast: float  #: seconds of the broadcast step
    status: str = "ok"


def make_files(folder: Path, nbytes: int) -> dict[str, tuple[str, int]]:
    """A .npy file and a gzip-chunked HDF5 dataset of ``nbytes``: source text and file size (local)."""
    import h5py

    from .driver import sync_to_disk

    rows = max(nbytes // (8 * 1024), 1)
    npy, h5 = folder / f"place-{nbytes}.npy", folder / f"place-{nbytes}.h5"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float64, shape=(rows, 1024))
    rng = np.random.default_rng(3)
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset(
            "/data/x", shape=(rows, 1024), dtype=np.float64, chunks=(min(rows, 64), 1024), compression="gzip"
        )
        for a in range(0, rows, 2048):
            b = min(a + 2048, rows)
            block = np.round(rng.random((b - a, 1024)) * 100)  # compresses about 4x, like measured data
            out[a:b] = block
            ds[a:b] = block
    out.flush()
    del out
    sync_to_disk(npy, h5)
    return {"npy": (str(npy), npy.stat().st_size), "h5-gzip": (f"{h5}:/data/x", h5.stat().st_size)}


def run_one(
    source: str, file_size: int, fmt: str, nodes: int, mode: str, out: Path, timeout: float
) -> PlacementRow:
    """One placement under mpiexec; its row (local)."""
    from .driver import find_mpiexec

    result = out / f"placing-{fmt}-{nodes}-{mode}.json"
    cmd = [find_mpiexec(), "-n", str(nodes * RANKS_PER_NODE), sys.executable, "-m", "hpcshare.bench.placing"]
    cmd += [source, "--read", mode, "--out", str(result)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, start_new_session=True)
        ok = run.returncode == 0 and result.exists()
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        return PlacementRow(fmt, nodes, mode, 0, file_size, 0, 0, 0, float("nan"), 0.0, 0.0, "failed")
    figures = json.loads(result.read_text())
    return PlacementRow(format=fmt, file_size=file_size, **figures)


def run_sweep(
    folder: Path, nbytes: int, out: Path, nodes: Sequence[int] = NODES, timeout: float = 600.0
) -> list[PlacementRow]:
    """Every format x node count x reading mode, one run at a time (local); progress on stderr."""
    files = make_files(folder, nbytes)
    rows = []
    for fmt, (source, size) in files.items():
        for n in nodes:
            for mode in MODES if n > 1 else ("collective",):
                t = time.monotonic()
                row = run_one(source, size, fmt, n, mode, out, timeout)
                rows.append(row)
                print(
                    f"bench: placement {fmt} on {n} node(s), {mode}: {row.status}, ready {row.ready:.2f} s "
                    f"({time.monotonic() - t:.0f} s with start-up)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def format_rows(rows: Sequence[PlacementRow]) -> str:
    head = (
        f"{'format':8s} {'nodes':>5s} {'reading':10s} {'file':>11s} {'counted':>11s} {'rchar':>11s} "
        f"{'x file':>6s} {'broadcast':>11s} {'ready s':>8s} {'read s':>7s} {'bcast s':>7s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.format:8s} {r.nodes:5d} {r.mode:10s} {format_bytes(r.file_size):>11s} "
            f"{format_bytes(r.counted):>11s} {format_bytes(r.rchar):>11s} {r.rchar / max(r.file_size, 1):6.2f} "
            f"{format_bytes(r.broadcast_bytes):>11s} {r.ready:8.2f} {r.read:7.2f} {r.broadcast:7.2f}"
            + ("" if r.status == "ok" else f"  {r.status}")
        )
    return "\n".join(lines)


def sweep_targets(rows: Sequence[PlacementRow]) -> list[tuple[str, bool, str]]:
    """(target, met, figures) for each format: bytes read per job and the 3-node ready time."""
    out = []
    for fmt in sorted({r.format for r in rows}):
        mine = [r for r in rows if r.format == fmt and r.mode == "collective" and r.status == "ok"]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r.rchar / max(r.file_size, 1))
        ratio = worst.rchar / max(worst.file_size, 1)
        out.append(
            (
                f"{fmt}: bytes read per job <= {READ_TARGET}x the file at every node count",
                ratio <= READ_TARGET,
                f"at most {ratio:.2f}x (on {worst.nodes} node(s))",
            )
        )
        one = [r for r in mine if r.nodes == 1]
        three = [r for r in mine if r.nodes == 3]
        if one and three:
            ready = three[0].ready / one[0].ready
            out.append(
                (
                    f"{fmt}: ready on 3 nodes <= {READY_TARGET}x ready on 1",
                    ready <= READY_TARGET,
                    f"{three[0].ready:.2f} s vs {one[0].ready:.2f} s ({ready:.2f}x)",
                )
            )
    return out


def bench_placement(nbytes: int, nodes: Sequence[int], out: Path, scratch: Path | None = None) -> int:
    """``hpcshare bench --placement``: the sweep, its table, its targets, the model's fit (local).

    Writes placement.json and placement.txt into ``out``; returns 1 if a run failed.
    """
    import shutil
    import tempfile

    from .scaling import fit_emulated

    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="hpcshare-bench-", dir=scratch))
    try:
        rows = run_sweep(folder, nbytes, folder, nodes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [format_rows(rows), ""]
    for what, met, figure in sweep_targets(rows):
        lines.append(f"target: {what}: {'met' if met else 'MISSED'} ({figure})")
    for fmt in FORMATS:
        ok = [r for r in rows if r.format == fmt and r.status == "ok"]
        if len(ok) >= 5:  # three costs fitted: fewer rows would fit exactly and prove nothing
            fit = fit_emulated([(r.nodes, r.nbytes, r.counted, r.broadcast_bytes, r.ready) for r in ok])
            lines.append(
                f"model on this host ({fmt}): {fit.read * 2**30:.3f} s per GiB read, "
                f"{fit.broadcast * 2**30:.3f} s per GiB broadcast, {fit.fixed:.2f} s fixed; "
                f"worst error {100 * fit.worst:.0f}% (docs/scaling.md)"
            )
    text = "\n".join(lines)
    print(text)
    (out / "placement.txt").write_text(text + "\n")
    (out / "placement.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 1 if any(r.status != "ok" for r in rows) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The program each run starts under mpiexec: place one input, write the job's figures."""
    parser = argparse.ArgumentParser(prog="python -m hpcshare.bench.placing")
    parser.add_argument("source")
    parser.add_argument("--read", choices=MODES, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import uuid

    from mpi4py import MPI

    from .. import context, sync
    from ..config import JobConfig
    from ..loaders import source_for
    from ..placement import place_inputs
    from ..topology import Topology

    world = MPI.COMM_WORLD
    config = JobConfig.from_options(ranks_per_node=RANKS_PER_NODE, read=args.read, quiet=True)
    source = source_for("x", args.source)
    with context.running(context.JobContext()) as job, Topology.create(world, config.ranks_per_node) as topo:
        generation = job.generation = sync.bcast(world, uuid.uuid4().hex[:12] if world.rank == 0 else None)
        world.Barrier()
        with place_inputs(topo, [source], config, generation) as placement:
            stats = placement.stats
            world.Barrier()  # every rank has its copy
    if world.rank == 0:
        figures = {
            "nodes": stats.n_nodes,
            "mode": stats.read_mode if stats.n_nodes > 1 else args.read,
            "nbytes": stats.nbytes,
            "counted": stats.file_bytes,
            "rchar": stats.rchar,
            "broadcast_bytes": stats.broadcast_bytes,
            "ready": stats.total,
            "read": stats.read,
            "broadcast": stats.broadcast,
        }
        Path(args.out).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
