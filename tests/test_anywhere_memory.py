"""Memory accounting on a Dask cluster with Nannies (hpcshare.anywhere.plugins, hpcshare.memory):
a worker reading a shared object close to its memory limit is neither paused nor restarted;
private memory over the limit still is."""

from __future__ import annotations

import os
import time

import dask
import numpy as np
import pytest
from distributed import Client, KilledWorker, LocalCluster, get_worker

import hpcshare

MiB = 2**20
LIMIT = 700 * MiB


@pytest.fixture
def client():
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        "distributed.worker.memory.monitor-interval": "50ms",
    }
    with (
        dask.config.set(settings),
        LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit=LIMIT, dashboard_address=None, processes=True
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _read_for_a_while(handle) -> dict:
    """Touch every page of the shared object, then stay 2 s (40 of Dask's and the Nanny's checks)."""
    worker = get_worker()
    view = handle.resolve()
    total = float(view.sum())
    statuses = set()
    for _ in range(20):
        statuses.add(worker.status.name)
        time.sleep(0.1)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return {
        "total": total,
        "statuses": statuses,
        "rss": rss,
        "measured": worker.monitor.get_process_memory(),
        "pid": os.getpid(),
    }


def _private(nbytes: int) -> int:
    block = np.ones(nbytes // 8)
    time.sleep(3)  # the Nanny's check comes every 50 ms
    return int(block.sum())


def test_a_worker_reading_a_shared_object_near_its_limit_is_not_paused_or_restarted(client):
    pid = client.run(os.getpid)
    handle = hpcshare.put(np.ones(600 * MiB // 8))  # 86% of the worker's limit
    seen = client.submit(_read_for_a_while, handle).result()
    assert seen["total"] == 600 * MiB // 8
    assert seen["rss"] > 0.95 * LIMIT  # Dask's own measure would have restarted it
    assert seen["measured"] < 0.5 * LIMIT  # what Dask's monitor sees: private memory
    assert seen["statuses"] == {"running"}  # never paused
    assert client.run(os.getpid) == pid  # never restarted
    assert not client.get_events("worker-restart-memory")
    hpcshare.free(handle)


def test_a_worker_whose_private_memory_is_over_its_limit_is_still_restarted(client):
    pid = client.run(os.getpid)
    hpcshare.free(hpcshare.put(np.ones(10)))  # hpcshare's plugins are in place
    with pytest.raises(KilledWorker):  # the Nanny restarted the worker it ran on
        client.submit(_private, 720 * MiB).result(timeout=60)
    client.wait_for_workers(1, timeout=60)
    assert client.run(os.getpid) != pid
