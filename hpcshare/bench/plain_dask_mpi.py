"""Plain dask-mpi with an empty client: the yardstick of ``bench --overhead``'s start-up.

``mpiexec -n W+2 python plain_dask_mpi.py`` (the driver copies this file
next to the run's other files and runs it by path, so nothing of hpcshare
is imported): dask-mpi's ``initialize(exit=False, nthreads=1,
dashboard=False)``, then rank 1 waits for the W workers, prints
``READY <epoch seconds>`` (as the hpcshare job's ``main`` does) and shuts
the cluster down; every rank returns and exits, as an hpcshare job with an
empty ``main`` does.
"""

from __future__ import annotations

import time

from dask_mpi import initialize
from distributed import Client
from mpi4py import MPI

if initialize(exit=False, nthreads=1, dashboard=False) is True:  # the client rank
    with Client() as client:
        client.wait_for_workers(MPI.COMM_WORLD.Get_size() - 2, timeout=300)
        print("READY", time.time(), flush=True)  # the client has every worker: what bench --startup times
        client.shutdown()
