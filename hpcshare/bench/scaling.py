"""A cost model of placement on N nodes: per-node reading against collective reading.

``python -m hpcshare.bench.scaling`` prints the tables of docs/scaling.md;
``fit_emulated`` checks the model's cost structure against the emulated-node
sweep of ``hpcshare bench --placement``.

The model, for an input of S bytes on N nodes (every node ends with S):

- every node makes its window's pages: ``S / populate``;
- per-node reading: every node reads S from the file system, whose
  aggregate bandwidth the N nodes share: ``S / min(node_read, fs / N)``;
  N x S bytes read per job;
- collective reading: every node reads S / N, then the leaders broadcast
  each node's share to the others over the network, pipelined in pieces:
  ``(S / N) / min(node_read, fs / N) + bcast x (N - 1) / N x S / link +
  pieces x log2(N) x latency``; S bytes read per job;
- a compressed input is decompressed where it is read: ``S / inflate`` per
  node per-node, ``(S / N) / inflate`` collective.

Steps run one after another (no overlap of reading and broadcasting).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["Cluster", "EmulatedFit", "crossover", "fit_emulated", "placement", "table"]

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Bandwidths in bytes/s, latency in seconds."""

    fs: float = 100 * GB  #: the parallel file system's aggregate read bandwidth
    node_read: float = 5 * GB  #: what one node can read from it (its client, its link's share)
    link: float = 25 * GB  #: one node's network injection bandwidth (200 Gb/s)
    populate: float = 10 * GB  #: making a window's pages, all of a node's cores at it
    inflate: float = 16 * GB  #: gzip decompression on one node (64 cores x 0.25 GB/s)
    latency: float = 5e-6  #: one message step between two nodes
    #: bytes on a node's link per byte it receives: MPI's long-message broadcast
    #: (scatter, then allgather) moves each byte about twice
    bcast: float = 2.0
    piece: float = 64 * 2**20  #: bytes per broadcast piece


@dataclasses.dataclass(frozen=True)
class Placement:
    seconds: float
    fs_bytes: float  #: read from the file system, the whole job
    net_bytes: float  #: received over the network, each node


def placement(mode: str, n: int, size: float, c: Cluster, compressed: bool = False) -> Placement:
    """The model's time and bytes for one placement."""
    share = size / n if mode == "collective" else size
    read = share / min(c.node_read, c.fs / n)
    inflate = share / c.inflate if compressed else 0.0
    seconds = size / c.populate + read + inflate
    net = 0.0
    if mode == "collective" and n > 1:
        net = (n - 1) / n * size
        seconds += c.bcast * net / c.link + math.ceil(size / c.piece) * math.log2(n) * c.latency
    return Placement(seconds, share * n, net)


def crossover(size: float, c: Cluster, compressed: bool = False, most: int = 100_000) -> int | None:
    """The smallest node count at which collective reading is faster, or None."""
    for n in range(2, most + 1):
        if (
            placement("collective", n, size, c, compressed).seconds
            < placement("per-node", n, size, c, compressed).seconds
        ):
            return n
    return None


def table(size: float, nodes: Sequence[int], c: Cluster, compressed: bool = False) -> str:
    """A markdown table of both modes at each node count."""
    lines = [
        "| nodes | per-node: time | per-node: read from FS | collective: time | collective: read from FS | collective: received per node |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in nodes:
        p, q = placement("per-node", n, size, c, compressed), placement("collective", n, size, c, compressed)
        lines.append(
            f"| {n:,} | {p.seconds:,.1f} s | {_size(p.fs_bytes)} | {q.seconds:,.1f} s | "
            f"{_size(q.fs_bytes)} | {_size(q.net_bytes)} |"
        )
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


@dataclasses.dataclass(frozen=True)
class EmulatedFit:
    """Seconds per byte of each way a byte reaches a node's window on one host (the emulated nodes
    share it). Every byte a node holds was either read or received, so the cost of making its
    page is part of both."""

    read: float  #: per byte read from the file (the page cache here) into a window
    broadcast: float  #: per byte a leader received from another node's broadcast into its window
    fixed: float  #: seconds, whatever the size
    worst: float  #: the largest relative error of the fit over the rows


def fit_emulated(rows: Sequence[tuple[int, int, int, int, float]]) -> EmulatedFit:
    """Fit the model's cost structure on one host to rows of (nodes, input bytes, bytes read,
    bytes broadcast, seconds): the emulated nodes share the host's cores and memory, so the time
    is linear in the bytes read and the bytes broadcast over all nodes."""
    gib = 2.0**30
    a = np.array([[r / gib, x / gib, 1.0] for _, _, r, x, _ in rows], dtype=float)
    t = np.array([row[4] for row in rows], dtype=float)
    keep = [0, 1, 2]
    while True:  # least squares with no negative cost: drop a term whose cost comes out negative
        coef, *_ = np.linalg.lstsq(a[:, keep], t, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(3)
    full[keep] = np.maximum(coef, 0.0)
    worst = float(np.max(np.abs(a @ full - t) / t)) if len(t) else 0.0
    return EmulatedFit(float(full[0] / gib), float(full[1] / gib), float(full[2]), worst=worst)


def main() -> int:
    c = Cluster()
    size = 20 * GB
    nodes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    print(f"## .npy, {_size(size)}\n\n{table(size, nodes, c)}\n")
    print(f"crossover: collective is faster from {crossover(size, c)} nodes\n")
    print(f"## gzip HDF5, {_size(size)} decompressed\n\n{table(size, nodes, c, compressed=True)}\n")
    print(f"crossover: collective is faster from {crossover(size, c, compressed=True)} nodes\n")
    for name, other in (
        (
            "node-local NVMe copies, 10 GB/s per node, no shared limit",
            dataclasses.replace(c, fs=1e18, node_read=10 * GB),
        ),
        (
            "copies already in each node's page cache, 50 GB/s per node",
            dataclasses.replace(c, fs=1e18, node_read=50 * GB),
        ),
        ("a 1 TB/s file system", dataclasses.replace(c, fs=1000 * GB)),
        ("a 100 Gb/s link", dataclasses.replace(c, link=12.5 * GB)),
    ):
        print(f"## {name}\n\n{table(size, nodes, other)}\n")
        print(f"crossover: {crossover(size, other) or 'never'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
