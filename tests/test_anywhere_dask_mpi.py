"""dask-mpi's own ``initialize()``: the batch script a user already has, with the seed's one line changed.

``mpiexec -n 4 python script.py``: dask-mpi makes rank 0 the scheduler,
rank 1 runs the script (the client), ranks 2 and 3 are workers. hpcshare
did not start this cluster and needs no MPI of its own here: the object is
held once for the host's two workers, every task reads that copy, and
nothing is left in /dev/shm when the job ends.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
from helpers import mpiexec, run_cmd

from hpcshare.anywhere import files

SCRIPT = """
    import os

    import numpy as np
    from dask_mpi import initialize

    initialize(dashboard=False)

    from distributed import Client

    import hpcshare


    def create_data():
        return np.arange(2_000_000, dtype="f8")


    def process_data(data, i):
        return float(data.resolve().sum()) + i


    def copies(handle):
        handle.resolve()
        ours = "{prefix}" + handle.generation.removeprefix("dask-")
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(ours) and "." not in n), os.getpid()


    client = Client()
    data = hpcshare.submit(client, create_data)  # was: client.submit(create_data)
    futures = client.map(process_data, [data] * 8, range(8), pure=False)
    expected = float(np.arange(2_000_000, dtype="f8").sum())
    assert client.gather(futures) == [expected + i for i in range(8)]
    workers = client.scheduler_info()["workers"]
    seen = client.gather([client.submit(copies, data.result(), workers=[w], pure=False) for w in workers])
    print("copies", len({{name for names, _ in seen for name in names}}), "workers", len({{pid for _, pid in seen}}))
    print("cluster", data.result().generation.removeprefix("dask-"))
"""


@pytest.mark.each_mpi
def test_dask_mpi_initialize_script_shares_one_copy_and_leaves_nothing(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(prefix=files.PREFIX)))
    run = run_cmd([mpiexec(), "-n", "4", sys.executable, str(script)], timeout=180)
    assert run.returncode == 0, run
    assert "copies 1 workers 2" in run.stdout, run
    cluster = run.stdout.split("cluster ")[1].split()[0]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(files.PREFIX + cluster)], run
