"""Placement's lines on world rank 0 (hpcshare/placement/progress.py): pure, no MPI."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hpcshare.loaders import ArrayMeta, FunctionSource, NpySource
from hpcshare.log import logger
from hpcshare.placement import PlacementStats
from hpcshare.placement import progress as progress_module
from hpcshare.placement.progress import Progress, log_summary, waiting_lines

MiB = 2**20
FILE = NpySource("x", "x.npy", "x.npy")
FUNCTION = FunctionSource("f", "numpy.random", "rand", "numpy.random:rand")
META = ArrayMeta((768 * MiB // 8,), np.dtype("f8"))


@pytest.fixture
def lines(caplog):
    """The hpcshare logger's messages, caught on that logger (the CLI's handler stops propagation)."""
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield lambda: [r.getMessage() for r in caplog.records]
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def stats(**figures) -> PlacementStats:
    base = dict(n_inputs=1, nbytes=768 * MiB, n_nodes=3, describe=0.01, capacity=0.0, allocate=0.08)
    return PlacementStats(**{**base, "read": 1.5, "broadcast": 0.74, "total": 2.61, **figures})


def test_the_summary_of_collective_reading_names_the_bytes_broadcast_between_nodes(lines):
    log_summary(
        stats(broadcast_bytes=1536 * MiB, file_bytes=768 * MiB, read_mode="collective"), [FILE], [META]
    )
    (line,) = lines()
    assert line.startswith(
        "placed 1 input(s), 768.00 MiB per node on 3 node(s), in 2.61 s (allocate 80.00 ms; "
    )
    assert "; read 1.50 s at 512.00 MiB/s; broadcast 740.00 ms, 1.50 GiB between nodes; " in line
    assert line.endswith("; collective reading: 768.00 MiB read from files, 1.00x the file inputs)")


def test_the_summary_of_per_node_reading_has_no_broadcast(lines):
    log_summary(stats(file_bytes=3 * 768 * MiB, read_mode="per-node"), [FILE], [META])
    (line,) = lines()
    assert "broadcast" not in line and "between nodes" not in line, line
    assert "per-node reading: 2.25 GiB read from files, 3.00x the file inputs" in line


def test_the_summary_of_a_function_source_says_written_and_reads_no_files(lines):
    log_summary(stats(broadcast_bytes=1536 * MiB), [FUNCTION], [META])
    (line,) = lines()
    assert "; read/written 1.50 s at " in line and "; broadcast 740.00 ms, 1.50 GiB between nodes)" in line
    assert "read from files" not in line


def test_progress_lines_come_at_most_once_a_second(lines, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    progress = Progress("broadcasting 'x' between nodes", 512 * MiB, True, "of the node's")
    for _ in range(8):  # 64 MiB every quarter second
        now[0] += 0.25
        progress.add(64 * MiB)
    assert lines() == [
        "broadcasting 'x' between nodes: 256.00 MiB of the node's 512.00 MiB (50%, 256.00 MiB/s)",
        "broadcasting 'x' between nodes: 512.00 MiB of the node's 512.00 MiB (100%, 256.00 MiB/s)",
    ]


def test_quiet_ranks_print_no_progress_and_no_waiting_lines(lines):
    Progress("reading 'x'", 1, False).add(1)
    assert waiting_lines(False, lambda: "waiting") is None
    waiting = waiting_lines(True, lambda: "this rank has read its part; waiting for the others")
    assert waiting is not None
    waiting(3.2)
    assert lines() == ["placing: this rank has read its part; waiting for the others (3 s)"]
