"""The placement sweep's targets and the scaling model (pure logic, on synthetic figures)."""

from __future__ import annotations

import dataclasses

from hpcshare.bench.placing import PlacementRow, sweep_targets
from hpcshare.bench.scaling import GB, Cluster, crossover, fit_emulated, placement

MIB = 2**20


def row(nodes: int, mode: str, rchar: float, ready: float, fmt: str = "npy") -> PlacementRow:
    size = 512 * MIB
    return PlacementRow(fmt, nodes, mode, size, size, size, int(rchar * size), 0, ready, ready, 0.0)


def test_the_sweep_judges_bytes_read_at_every_node_count_and_the_three_node_ready_time():
    rows = [row(1, "collective", 1.0, 1.0), row(3, "collective", 1.02, 1.25), row(3, "per-node", 3.0, 1.1)]
    verdicts = {what: (met, figure) for what, met, figure in sweep_targets(rows)}
    assert verdicts["npy: bytes read per job <= 1.1x the file at every node count"] == (
        True,
        "at most 1.02x (on 3 node(s))",
    )
    assert verdicts["npy: ready on 3 nodes <= 1.3x ready on 1"][0] is True  # 1.25x
    # per-node rows are never judged: reading N times is what they are for
    worse = [row(1, "collective", 1.0, 1.0), row(2, "collective", 1.2, 1.1), row(3, "collective", 1.0, 1.4)]
    verdicts = {what: met for what, met, _ in sweep_targets(worse)}
    assert verdicts == {
        "npy: bytes read per job <= 1.1x the file at every node count": False,  # 1.2x on 2 nodes
        "npy: ready on 3 nodes <= 1.3x ready on 1": False,  # 1.4x
    }


def test_the_model_reads_n_copies_per_node_and_one_collectively():
    c = Cluster()
    for n in (1, 2, 1000):
        assert placement("per-node", n, 20 * GB, c).fs_bytes == n * 20 * GB
        assert placement("collective", n, 20 * GB, c).fs_bytes == 20 * GB
        assert placement("collective", n, 20 * GB, c).net_bytes == (n - 1) / n * 20 * GB
    # a shared file system makes per-node reading slower as nodes are added; collective is flat
    assert (
        placement("per-node", 1000, 20 * GB, c).seconds
        > 30 * placement("collective", 1000, 20 * GB, c).seconds
    )


def test_the_crossover_follows_the_closed_form():
    c = Cluster()  # a node reads at 5 GB/s, receives at 25 / 2 GB/s: collective wins from 2 nodes
    assert crossover(20 * GB, c) == 2
    # a node reading at 20 GB/s: per-node wins until the 100 GB/s file system is shared by more than
    # fs x bcast / link = 8 nodes
    assert crossover(20 * GB, dataclasses.replace(c, node_read=20 * GB)) == 9
    # every node with its own 50 GB/s copy and no shared limit: never
    assert crossover(20 * GB, dataclasses.replace(c, fs=1e18, node_read=50 * GB), most=2000) is None


def test_the_emulated_fit_recovers_known_costs():
    s = 512 * MIB
    true = {"read": 0.6e-9, "broadcast": 0.7e-9, "fixed": 0.1}
    rows = []
    for n in (1, 2, 3, 4):
        for read, broadcast in ((s, (n - 1) * s), (n * s, 0)):
            rows.append(
                (n, s, read, broadcast, true["read"] * read + true["broadcast"] * broadcast + true["fixed"])
            )
    fit = fit_emulated(rows)
    assert abs(fit.read - true["read"]) < 1e-15
    assert abs(fit.broadcast - true["broadcast"]) < 1e-15
    assert abs(fit.fixed - true["fixed"]) < 1e-9
    assert fit.worst < 1e-6
