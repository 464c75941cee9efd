"""The job's client waiting for its workers (cluster._wait_for_workers), on a real in-process Dask cluster."""

from __future__ import annotations

import time

import pytest


def test_the_client_waits_for_its_workers_and_names_the_missing_ones_at_its_time_limit():
    from distributed import Client, LocalCluster

    from hpcshare import WaitTimeout
    from hpcshare.cluster import _wait_for_workers

    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        start = time.monotonic()
        with pytest.raises(WaitTimeout, match=r"only 0 of the 1 Dask workers were running after 0\.5 s"):
            _wait_for_workers(client, 1, 0.5)
        assert 0.5 <= time.monotonic() - start < 5
        cluster.scale(1)
        start = time.monotonic()
        _wait_for_workers(client, 1, 30)
        assert time.monotonic() - start < 25
        # Dask's confirming call has updated the client's view of the scheduler
        assert len(client.scheduler_info()["workers"]) == 1
