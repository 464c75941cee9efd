"""The memory report (report.py): sums per node, the price of one copy per worker. No MPI."""

from __future__ import annotations

from hpcshare.report import RankMemory, format_report, summarize


def test_report_sums_pss_per_node_and_prices_one_copy_per_worker():
    mib = 2**20
    ranks = [
        RankMemory(0, "n0", 0, "scheduler", 100 * mib, 400 * mib),
        RankMemory(1, "n0", 0, "client", 100 * mib, 400 * mib),
        RankMemory(2, "n1", 1, "worker", 150 * mib, 500 * mib),
        RankMemory(3, "n1", 1, "worker", 150 * mib, 500 * mib),
    ]
    nodes = summarize(ranks, 200 * mib)
    assert [(n.node, n.ranks, n.workers, n.pss) for n in nodes] == [
        (0, 2, 0, 200 * mib),
        (1, 2, 2, 300 * mib),
    ]
    assert nodes[1].per_worker_copies == 300 * mib + 200 * mib
    text = format_report(nodes, 1)
    assert "300.00 MiB" in text and "500.00 MiB" in text and text.count("\n") >= 3
