"""hpcshare's Python API in a batch script: every rank runs this file.

    srun --mpi=pmi2 python api_job.py [--size 512MiB]      (see python-api.sbatch)

``hpcshare.run`` is collective: it places the inputs once per node, makes
rank 0 the Dask scheduler and the other ranks workers, calls ``main`` on
rank 1 with a connected client, and returns ``main``'s result there
(``None`` on every other rank). An error ends the job on every rank.
"""

from __future__ import annotations

import argparse

import numpy as np
from dask.utils import format_bytes, parse_bytes

import hpcshare


def make_table(nbytes: int) -> hpcshare.Fill:
    """An input made by a function: rows of a table, written straight into shared memory."""
    rows = max(nbytes // (8 * 1024), 1)

    def fill(out: np.ndarray) -> None:
        out[:] = np.arange(out.shape[0], dtype=np.float64)[:, None] + np.arange(1024) / 1024

    return hpcshare.Fill((rows, 1024), np.float64, fill)


def column_sums(table: hpcshare.Handle, start: int, stop: int) -> np.ndarray:
    """A task: resolve the handle (a read-only view of this node's copy), reduce some rows."""
    view = table.resolve()
    return view[start:stop].sum(axis=0)


def main(client, inputs):
    table = inputs["table"]
    rows = table.shape[0]
    bounds = np.linspace(0, rows, 33, dtype=int)
    futures = client.map(column_sums, [table] * 32, bounds[:-1], bounds[1:])
    total = np.sum(client.gather(futures), axis=0)
    expected = rows * (rows - 1) / 2 + rows * np.arange(1024) / 1024
    ok = np.allclose(total, expected)
    print(f"api_job: {rows} x 1024 table ({format_bytes(table.nbytes)}), 32 tasks, column sums match: {ok}")
    if not ok:
        raise RuntimeError("column sums do not match the closed form")
    return float(total.sum())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="table size (default 256MiB)")
    args = parser.parse_args()
    nbytes = parse_bytes(args.size)
    result = hpcshare.run(main, inputs={"table": lambda: make_table(nbytes)})
    if result is not None:  # the client rank
        print(f"api_job: result {result:.6e}")
