"""Collective reading on emulated nodes: each file input read once per job, every node's copy whole.

Run under ``mpiexec -n 5 python -m pytest --with-mpi``: with two ranks per node
the five ranks make three nodes (ranks 0-1, 2-3, 4), so the client (rank 1) and
the workers (ranks 2, 3, 4) see all three nodes' copies.
"""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np
import pytest

import hpcshare

pytestmark = pytest.mark.mpi(min_size=5)

THREE_NODES = {"ranks_per_node": 2, "quiet": True}


def digest(h) -> tuple[str, tuple[int, ...], str]:
    """Runs anywhere: what this process's node holds for input ``h``."""
    v = np.asarray(h)
    return hashlib.sha1(v.tobytes(order="A")).hexdigest(), v.shape, v.dtype.str


def expected_digest(a: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    return hashlib.sha1(a.tobytes(order="A")).hexdigest(), a.shape, a.dtype.str


def files(d) -> dict[str, np.ndarray]:
    """Write the inputs on rank 0; return what each must hold."""
    rng = np.random.default_rng(7)
    arrays = {
        "c_order": rng.random((1001, 37)),  # odd rows: no split by 3 nodes is even
        "f_order": np.asfortranarray(rng.integers(0, 1000, size=(333, 71), dtype=np.int32)),
        "zero": np.zeros((0, 4), dtype=np.float32),
        "grid": rng.random((103, 17)),  # gzip, chunks of 10 rows, in a nested group
        "tiny": np.arange(5, dtype=np.float64),  # smaller than one chunk
    }
    np.save(d / "c_order.npy", arrays["c_order"])
    np.save(d / "f_order.npy", arrays["f_order"])
    np.save(d / "zero.npy", arrays["zero"])
    with h5py.File(d / "data.h5", "w") as f:
        f.create_dataset("/a/b/grid", data=arrays["grid"], chunks=(10, 17), compression="gzip")
        f.create_dataset("tiny", data=arrays["tiny"], chunks=(64,), maxshape=(None,), compression="gzip")
    return arrays


def sources(d) -> dict[str, str]:
    return {
        "c_order": str(d / "c_order.npy"),
        "f_order": str(d / "f_order.npy"),
        "zero": str(d / "zero.npy"),
        "grid": f"{d}/data.h5:/a/b/grid",
        "tiny": f"{d}/data.h5:/tiny",
    }


def every_nodes_copy(client, inputs):
    """main: each input's digest on the client (node 0) and on every worker (nodes 1 and 2)."""
    out = {}
    for name, h in inputs.items():
        workers = client.run(digest, h)
        out[name] = [digest(h), *workers.values()]
    return out


@pytest.mark.parametrize(("mode", "reads", "received"), [("collective", 1, 2), ("per-node", 3, 0)])
def test_every_node_holds_the_files_bytes(comm, shared_dir, on_rank0, mode, reads, received):
    """Collective: every byte of every file read once in the job, each node receiving the other two
    nodes' shares. Per-node: every node reads every byte."""
    arrays: dict[str, np.ndarray] = {}
    on_rank0(lambda: arrays.update(files(shared_dir)))
    arrays = comm.bcast(arrays)
    stats = []
    result = hpcshare.run(
        every_nodes_copy, sources(shared_dir), read=mode, on_placed=stats.append, **THREE_NODES
    )
    (placed,) = stats
    assert placed.n_nodes == 3 and placed.read_mode == mode
    one_copy = sum(a.nbytes for a in arrays.values())
    assert placed.file_bytes == reads * one_copy
    assert placed.broadcast_bytes == received * one_copy
    if comm.rank == 1:
        for name, a in arrays.items():
            assert result[name] == [expected_digest(a)] * 4, name  # client + three workers


def test_the_bytes_the_ranks_read_from_the_file_system_are_about_one_file(comm, shared_dir, on_rank0):
    """Counted from outside our reads too: /proc/PID/io rchar summed over the ranks."""

    def write():
        np.save(shared_dir / "big.npy", np.arange(3 * 2**20, dtype=np.float64))  # 24 MiB
        with h5py.File(shared_dir / "big.h5", "w") as f:
            data = np.repeat(np.arange(2**20, dtype=np.float64) % 1000, 2).reshape(-1, 512)
            f.create_dataset("/g/x", data=data, chunks=(64, 512), compression="gzip")

    on_rank0(write)
    size = sum(os.path.getsize(shared_dir / n) for n in ("big.npy", "big.h5"))
    inputs = {"a": str(shared_dir / "big.npy"), "b": f"{shared_dir}/big.h5:/g/x"}
    for mode, copies in (("collective", 1), ("per-node", 3)):
        stats = []
        hpcshare.run(lambda client, inputs: None, inputs, read=mode, on_placed=stats.append, **THREE_NODES)
        rchar = stats[0].rchar
        assert copies * size * 0.95 <= rchar <= copies * size * 1.1, (mode, rchar, size)
