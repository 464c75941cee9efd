"""The read plan (hpcshare/placement/plan.py): pure, no MPI.

What a user would notice if it were wrong: a byte of an input read twice or
never (a node's copy with a hole or garbage in it), an HDF5 chunk split
between nodes (read and decompressed twice), a node's readers idle while
another does all the work, or a rank reading nothing on a node that needed it.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcshare.layout import PIECE
from hpcshare.loaders import ArrayMeta, Hdf5Source, NpySource
from hpcshare.placement.plan import (
    ReadPlan,
    piece_count,
    plan_input,
    plan_reads,
    readers_per_node,
    shares_from_node0,
)

MiB = 2**20
NPY = NpySource("x", "x.npy", "x.npy")
H5 = Hdf5Source("x", "x.h5", "/x", "x.h5:/x")
NPY_ALIGN = 1 << 16  # .npy pieces start at multiples of 64 KiB


def npy(nbytes: int) -> ArrayMeta:
    return ArrayMeta((nbytes,), np.dtype("u1"))


def h5(rows: int, cols: int, chunk_rows: int) -> ArrayMeta:
    return ArrayMeta((rows, cols), np.dtype("f8"), align_rows=chunk_rows)


def reads(plan: ReadPlan, readers: list[int]) -> list[list[list[tuple[int, int]]]]:
    """Every rank's pieces: ``reads[node][rank]``; node ``k`` has ``readers[k]`` readers of 4 ranks."""
    return [[plan.pieces(k, r, readers[k]) for r in range(4)] for k in range(len(plan.runs))]


def assert_covers_once(ranges: list[tuple[int, int]], nbytes: int) -> None:
    """The ranges, in order, are back to back from 0 to ``nbytes``: every byte once."""
    ranges = [r for r in ranges if r[1] > r[0]]
    ends = [0] + [b for _, b in ranges]
    assert [a for a, _ in ranges] == ends[:-1], ranges  # no gap, no overlap
    assert ends[-1] == nbytes, ranges


CASES = [  # (source, metadata, nodes, readers of each node)
    (NPY, npy(1000 * MiB + 12345), 3, [2, 2, 2]),
    (NPY, npy(1000 * MiB + 12345), 3, [4, 1, 3]),  # uneven nodes: the most readers cut the input
    (NPY, npy(7 * NPY_ALIGN + 1), 4, [4, 4, 4, 1]),  # fewer pieces than readers on some nodes
    (NPY, npy(5), 3, [4, 4, 1]),  # more readers than bytes
    (H5, h5(1001, 37, 10), 3, [2, 2, 1]),  # odd rows: no even split
    (H5, h5(103, 17, 10), 3, [4, 4, 4]),  # 11 chunks for 12 readers
    (H5, h5(5, 8, 64), 3, [2, 2, 2]),  # smaller than one chunk
    (H5, h5(40_000, 1024, 64), 4, [3, 2, 2, 1]),  # 312.5 MiB
]


@pytest.mark.parametrize(("src", "meta", "nodes", "readers"), CASES)
def test_collective_reading_reads_every_byte_once_in_the_job(src, meta, nodes, readers):
    plan = plan_input(src, meta, nodes, max(readers))
    assert len(plan.runs) == nodes
    assert_covers_once(plan.shares, meta.nbytes)
    everyone = reads(plan, readers)
    assert_covers_once([p for node in everyone for rank in node for p in rank], meta.nbytes)
    for k, node in enumerate(everyone):  # each node's readers read exactly its share
        share = [p for rank in node for p in rank]
        assert ((share[0][0], share[-1][1]) if share else (0, 0)) == plan.shares[k]
        assert all(not rank for rank in node[readers[k] :]), "a rank that is not a reader read"


@pytest.mark.parametrize(("src", "meta", "nodes", "readers"), CASES)
def test_per_node_reading_has_every_node_read_every_byte(src, meta, nodes, readers):
    for here in readers:  # one plan (nodes=1); each node's own readers split it
        plan = plan_input(src, meta, 1, max(readers))
        assert plan.shares == ([(0, meta.nbytes)] if meta.nbytes else [(0, 0)])
        assert_covers_once([p for r in range(here) for p in plan.pieces(0, r, here)], meta.nbytes)


@pytest.mark.parametrize(("src", "meta", "nodes", "readers"), CASES)
def test_shares_and_pieces_keep_the_sources_alignment(src, meta, nodes, readers):
    """.npy: inner bounds on 64 KiB; HDF5: on whole chunks of rows, so no chunk is read by two ranks."""
    align = NPY_ALIGN if src is NPY else meta.align_rows * meta.nbytes // meta.shape[0]
    plan = plan_input(src, meta, nodes, max(readers))
    bounds = {b for run in plan.runs for piece in run for b in piece} - {meta.nbytes}
    assert all(b % align == 0 for b in bounds), (align, sorted(bounds))


@pytest.mark.parametrize(("src", "meta", "nodes", "readers"), CASES)
def test_nodes_take_shares_that_differ_by_at_most_one_piece(src, meta, nodes, readers):
    plan = plan_input(src, meta, nodes, max(readers))
    sizes = [len(run) for run in plan.runs]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_a_large_input_is_cut_into_pieces_of_at_most_64_mib():
    meta = npy(1000 * MiB + 12345)
    plan = plan_input(NPY, meta, 3, 2)
    pieces = [p for run in plan.runs for p in run]
    assert max(b - a for a, b in pieces) <= PIECE
    assert len(pieces) == -(-meta.nbytes // PIECE)  # 16: more than 3 nodes x 2 readers
    assert piece_count(meta.nbytes, 2, 3) == 16
    assert piece_count(MiB, 2, 3) == 6  # small: one piece per reader of every node


def test_a_tiny_input_is_read_by_one_rank_and_the_other_nodes_send_nothing():
    plan = plan_input(NPY, npy(5), 3, 4)
    assert plan.shares == [(0, 0), (0, 0), (0, 5)]
    everyone = reads(plan, [4, 4, 4])
    assert [(k, r) for k, node in enumerate(everyone) for r, mine in enumerate(node) if mine] == [(2, 0)]


def test_a_zero_size_input_is_read_by_nobody():
    for src, meta in ((NPY, npy(0)), (H5, h5(0, 4, 10))):
        plan = plan_input(src, meta, 3, 2)
        assert plan.shares == [(0, 0)] * 3
        assert all(not rank for node in reads(plan, [2, 2, 2]) for rank in node)


def test_readers_split_their_nodes_run_in_contiguous_runs_of_equal_length():
    pieces = [(10 * i, 10 * (i + 1)) for i in range(5)]
    plan = plan_reads(pieces, 1)
    # ceil(5 / 4) = 2 pieces each: the last reader is left without one
    assert [plan.pieces(0, r, 4) for r in range(5)] == [pieces[0:2], pieces[2:4], pieces[4:5], [], []]
    assert plan.pieces(0, 0, 1) == pieces  # a node with one reader reads all of its run


def test_nodes_take_contiguous_runs_in_node_order():
    pieces = [(i, i + 1) for i in range(7)]
    assert plan_reads(pieces, 3).shares == [(0, 2), (2, 4), (4, 7)]
    assert plan_reads(pieces, 1).shares == [(0, 7)]


def test_a_function_sources_bytes_all_come_from_node_0():
    assert shares_from_node0(1000, 3) == [(0, 1000), (0, 0), (0, 0)]
    assert shares_from_node0(1000, 1) == [(0, 1000)]


@pytest.mark.parametrize(
    ("node_size", "asked", "cpus", "readers"),
    [
        (4, None, 2, 2),  # auto: at most the CPUs
        (2, None, 8, 2),  # auto: at most the node's ranks
        (4, None, 0, 1),  # auto: at least one
        (4, 3, 2, 3),  # asked: may exceed the CPUs
        (2, 8, 8, 2),  # asked: at most the node's ranks
    ],
)
def test_readers_per_node(node_size, asked, cpus, readers):
    assert readers_per_node(node_size, asked, cpus) == readers
