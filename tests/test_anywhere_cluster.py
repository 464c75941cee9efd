"""hpcshare on a Dask LocalCluster it did not start (processes, nannies): the seed's code, one line changed.

One copy per group of workers that share /dev/shm, resolved zero-copy and
read-only in every task; free, capacity and permissions as in an MPI job.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import ROOT

import hpcshare
from hpcshare import store
from hpcshare.anywhere import files
from hpcshare.errors import CapacityError, HpcshareError, ResolveError

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")

SHM = "/dev/shm"


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as c,
    ):
        yield c
        name = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[files.PLUGIN].cluster)
    deadline = time.monotonic() + 20  # the nannies leave the group once their workers have ended
    while _cluster_files(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _cluster_files(name), "the cluster's files outlived it"


def _cluster_files(cluster: str | None = None) -> list[str]:
    prefix = files.PREFIX + (cluster or "")
    return sorted(
        n
        for n in os.listdir(SHM)
        if n.startswith(prefix) and os.stat(os.path.join(SHM, n)).st_uid == os.geteuid()
    )


def _objects(handle) -> list[str]:
    cluster = files.cluster_of(handle.generation)
    return [n for n in _cluster_files(cluster) if n.endswith(handle.name)]


def _where(obj) -> dict:
    """In a task: the object's first buffer, whether it lies in a mapped hpcshare file, and which."""
    if isinstance(obj, np.ndarray):
        address, writeable = obj.ctypes.data, obj.flags.writeable
    elif hasattr(obj, "columns") and not hasattr(obj, "schema"):  # pandas
        values = obj.iloc[:, 0].to_numpy()
        address, writeable = values.ctypes.data, values.flags.writeable
    else:  # Arrow
        address, writeable = obj.column(0).chunk(0).buffers()[1].address, False
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return {
                    "file": fields[-1],
                    "aligned": address % 64 == 0,
                    "writeable": writeable,
                    "pid": os.getpid(),
                }
    return {"file": None, "aligned": address % 64 == 0, "writeable": writeable, "pid": os.getpid()}


def _where_resolved(handle, _task: int = 0) -> dict:
    return _where(handle.resolve())


def create_data():
    return np.arange(4_000_000, dtype="f8")


def process_data(data, i):
    return float(data.resolve().sum()) + i


def test_the_seed_pattern_works_with_one_line_changed_and_holds_one_copy(client):
    data = hpcshare.submit(client, create_data)  # was: client.submit(create_data)
    futures = client.map(process_data, [data] * 8, range(8), pure=False)
    expected = float(np.arange(4_000_000, dtype="f8").sum())
    assert client.gather(futures) == [expected + i for i in range(8)]
    handle = data.result()
    places = client.gather(client.map(_where_resolved, [handle] * 8, range(8), pure=False))
    assert len({p["pid"] for p in places}) == 2  # both workers ran tasks
    ours = _objects(handle)
    assert len(ours) == 1  # one copy for the host's two workers
    assert {p["file"] for p in places} == {os.path.join(SHM, ours[0])}  # every task reads that file
    assert all(p["aligned"] and not p["writeable"] for p in places)
    hpcshare.free(handle)


@pytest.mark.parametrize("kind", ["numpy", "pandas", "arrow"])
def test_a_put_from_the_client_resolves_zero_copy_and_read_only_in_tasks(client, kind):
    values = np.arange(1000, dtype="f8")
    obj = {
        "numpy": values,
        "pandas": pd.DataFrame({"x": values, "y": values.astype("i8")}),
        "arrow": pa.table({"x": values}),
    }[kind]
    handle = hpcshare.put(obj)
    (name,) = _objects(handle)
    place = client.submit(_where_resolved, handle).result()
    assert place["file"] == os.path.join(SHM, name) and not place["writeable"]
    assert place["aligned"] or kind == "arrow"  # Arrow's IPC stream aligns its buffers to 8 bytes
    total = client.submit(
        lambda h: float(np.asarray(h.resolve()["x"] if kind != "numpy" else h.resolve()).sum()), handle
    )
    assert total.result() == float(values.sum())
    hpcshare.free(handle)


def _mappings_after_resolves(handle, resolves: int, _task: int) -> tuple[int, int, int]:
    """In a task: resolve ``resolves`` times, holding every result; (mappings of the object's file in this
    process, distinct addresses of column x among the results, pid)."""
    held = [handle.resolve() for _ in range(resolves)]
    addresses = {df["x"].to_numpy().ctypes.data for df in held}
    path = os.path.join(SHM, f"{files.PREFIX}{files.cluster_of(handle.generation)}-{handle.name}")
    with open("/proc/self/maps") as f:
        mappings = sum(1 for line in f if line.split()[-1] == path)
    return mappings, len(addresses), os.getpid()


@pytest.mark.dataframe
def test_a_worker_maps_and_decodes_a_frame_once_for_all_its_resolves(client):
    """Every resolve in every task of a worker is a shallow copy of one decoded frame over one map
    (no re-map, no re-decode per resolve or per task: the frame's tasks stay as fast as scatter's)."""
    if not store.pandas_copies_on_write():
        pytest.skip("pandas 2 without copy-on-write: each resolve is a private map of its own (tested below)")
    values = np.arange(100_000, dtype="f8")
    handle = hpcshare.put(pd.DataFrame({"x": values, "k": values.astype("i8") % 7}))
    for _ in range(2):  # a second batch of tasks finds the same map
        seen = client.gather(
            client.map(_mappings_after_resolves, [handle] * 6, [50] * 6, range(6), pure=False)
        )
        assert len({pid for *_, pid in seen}) == 2  # both workers ran tasks
        assert {(mappings, addresses) for mappings, addresses, _ in seen} == {(1, 1)}
    hpcshare.free(handle)


@pytest.mark.dataframe
def test_a_pandas_task_that_assigns_changes_only_its_own_copy(client):
    """pandas 3 (copy-on-write) copies the column; pandas 2 without it writes into a private map."""
    handle = hpcshare.put(pd.DataFrame({"x": np.zeros(10)}))

    def assign(h):
        df = h.resolve()
        df.loc[0, "x"] = 5.0
        return float(df["x"].sum()), float(h.resolve()["x"].sum())

    assert client.submit(assign, handle).result() == (5.0, 0.0)
    hpcshare.free(handle)


def test_files_are_0600_with_unguessable_names(client):
    handle = hpcshare.put(np.ones(10))
    for name in _cluster_files(files.cluster_of(handle.generation)):
        st = os.stat(os.path.join(SHM, name))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert re.fullmatch(files.PREFIX + r"[0-9a-f]{32}(-[0-9a-f]{32}|\.group)", name), name
    hpcshare.free(handle)


def test_free_unlinks_the_copy_and_later_resolves_say_it_was_freed(client):
    handle = hpcshare.put(np.ones(1000))
    assert client.submit(lambda h: float(h.resolve().sum()), handle).result() == 1000.0
    hpcshare.free(handle)
    assert _objects(handle) == []
    with pytest.raises(ResolveError, match=r"freed by hpcshare\.free"):
        client.submit(lambda h: h.resolve(), handle, pure=False).result()


def test_too_large_an_object_is_a_capacity_error_before_anything_is_allocated(client):
    before = _cluster_files()
    huge = np.broadcast_to(np.zeros(1), (2**44,))  # 128 TiB that take no memory
    with pytest.raises(CapacityError, match=r"128\.00 TiB.* on host .*hpcshare\.shm-dir"):
        hpcshare.put(huge)
    assert _cluster_files() == before
    with pytest.raises(CapacityError):  # in a task, too
        hpcshare.submit(client, np.broadcast_to, np.zeros(1), (2**44,)).result()
    assert _cluster_files() == before


def test_put_without_a_cluster_or_a_job_says_both_ways():
    run = subprocess.run(
        [sys.executable, "-c", "import numpy, hpcshare; hpcshare.put(numpy.zeros(3))"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 1
    assert "distributed.Client" in run.stderr and "python -m hpcshare job" in run.stderr
    assert HpcshareError.__name__ in run.stderr


def test_a_worker_that_joins_after_the_first_put_gets_the_plugins_and_maps_the_groups_copy(client):
    cluster = client.cluster
    client.wait_for_workers(len(cluster.workers), timeout=60)  # a worker an earlier test ended is back
    handle = hpcshare.put(np.arange(1000, dtype="f8"))
    first = set(client.scheduler_info()["workers"])
    cluster.scale(len(first) + 1)  # as adaptive scaling does
    try:
        client.wait_for_workers(len(first) + 1, timeout=120)
        (late,) = set(client.scheduler_info()["workers"]) - first
        assert files.PLUGIN in client.run(lambda dask_worker: list(dask_worker.plugins), workers=[late])[late]
        places = [
            client.submit(_where_resolved, handle, workers=[w], pure=False).result() for w in [*first, late]
        ]
        (name,) = _objects(handle)  # still one copy, read by every worker, old and new
        assert {p["file"] for p in places} == {os.path.join(SHM, name)}
        assert len({p["pid"] for p in places}) == len(first) + 1
        hpcshare.free(handle)
    finally:
        cluster.scale(len(first))
        client.wait_for_workers(len(first), timeout=60)
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) > len(first) and time.monotonic() < deadline:
            time.sleep(0.1)
