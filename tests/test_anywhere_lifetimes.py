"""Lifetimes on a Dask cluster hpcshare did not start: objects go with free, with the client that
put them, with the cluster; after kill -9 of everything, with the next hpcshare process or
``python -m hpcshare clean``, never touching a live cluster's objects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import ROOT, run_cmd

import hpcshare
from hpcshare.anywhere import files
from hpcshare.errors import ResolveError

SHM = "/dev/shm"


def _files_of(cluster: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(files.PREFIX + cluster))


def _gone(cluster: str, name: str = "", within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(n.endswith(name) for n in _files_of(cluster)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(n.endswith(name) for n in _files_of(cluster))


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def test_objects_go_when_the_client_that_put_them_closes(cluster):
    with Client(cluster) as keeper:  # another client stays: the cluster goes on
        with Client(cluster, set_as_default=False) as putter:
            handle = putter.submit(hpcshare.put, np.ones(1000), pure=False).result()
            name, gen = handle.name, files.cluster_of(handle.generation)
            assert keeper.submit(lambda h: float(h.resolve().sum()), handle).result() == 1000.0
        assert _gone(gen, name), _files_of(gen)
        with pytest.raises(ResolveError, match="closed or disconnected"):
            keeper.submit(lambda h: h.resolve(), handle, pure=False).result()


def test_objects_go_when_the_cluster_closes():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c, Client(c):
        handle = hpcshare.put(np.ones(1000))
        gen = files.cluster_of(handle.generation)
        assert len(_files_of(gen)) == 2  # the group's marker and the object
    assert _gone(gen)


_KILLED = """
    import os, sys, time
    import numpy as np
    from distributed import Client, LocalCluster
    import hpcshare
    from hpcshare.anywhere import files
    if __name__ == "__main__":
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
        h = hpcshare.submit(client, np.ones, 1000).result()
        print(files.cluster_of(h.generation), flush=True)
        time.sleep(600)
"""


def _killed_cluster(tmp_path) -> str:
    """A LocalCluster that put an object, then kill -9 of every one of its processes; its name."""
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # client, scheduler, nannies, workers: one session
        proc.wait(timeout=30)
    assert line, "the cluster did not start"
    time.sleep(0.5)  # the kernel drops the dead processes' locks
    return line


def test_after_kill_9_of_everything_clean_removes_the_dead_files_and_not_a_live_clusters(cluster, tmp_path):
    dead = _killed_cluster(tmp_path)
    assert len(_files_of(dead)) == 2, "kill -9 should have left the marker and the object"
    with Client(cluster) as client:
        live = hpcshare.put(np.ones(10))
        run = run_cmd([sys.executable, "-m", "hpcshare", "clean"], timeout=60)
        assert run.returncode == 0, run
        assert _files_of(dead) == []
        assert "2 file(s) of dead Dask clusters removed" in run.stdout or "file(s)" in run.stdout
        assert client.submit(lambda h: float(h.resolve().sum()), live).result() == 10.0  # untouched
        hpcshare.free(live)


def test_after_kill_9_the_next_hpcshare_cluster_on_the_host_sweeps(tmp_path):
    dead = _killed_cluster(tmp_path)
    assert _files_of(dead)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c, Client(c):
        hpcshare.free(hpcshare.put(np.ones(10)))  # first use: its workers and nannies sweep as they join
        assert _files_of(dead) == []
