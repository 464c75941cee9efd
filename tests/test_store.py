"""Objects put while the job runs, on this node (store.py): files, maps, resolving, freeing, Dask's sizeof.

No MPI: a job context and a folder of its own stand in for the job and its /dev/shm.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from dask.sizeof import sizeof

from hpcshare import ArrayHandle, CapacityError, HpcshareError, ResolveError, codec, context, store

GEN = "0123456789ab"


@pytest.fixture
def job(tmp_path):
    with (
        context.running(context.JobContext(generation=GEN)) as ctx,
        store.Joined(str(tmp_path), 0, owner=True),
    ):
        yield ctx


def put_here(name: str, obj) -> None:
    """What a put does on its own node: encode, create the file, write it, keep it mapped."""
    enc = codec.encode(obj)
    path = store.path_of(name)
    mm = store.create(path, enc.nbytes, f"put of {name}")
    with memoryview(mm) as dest:
        enc.write_into(dest)
    store.close_writable(mm)
    store.remember(name, GEN, codec.decode(store.map_readonly(path)))


def test_a_node_file_is_private_to_the_user_and_never_reused(job, tmp_path):
    path = store.path_of("p1x0")
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path) == "p1x0-n0"
    store.close_writable(store.create(path, 1000, "put"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(
        HpcshareError, match=r"p1x0-n0 already exists \(owned by uid \d+ \(this job's user\)\)"
    ):
        store.create(path, 1000, "put")


def test_a_file_system_without_room_is_a_capacity_error_and_leaves_no_file(job, tmp_path):
    path = store.path_of("big")
    with pytest.raises(CapacityError, match="no room"):
        store.create(path, 2**62, "put of 4 EiB")
    assert not os.path.exists(path)


def test_a_put_array_resolves_read_only_and_freeing_it_is_said_on_resolve(job):
    put_here("p1x0", np.arange(10.0))
    h = ArrayHandle("p1x0", (10,), np.dtype("f8"), "C", GEN, stored=True)
    view = h.resolve()
    assert float(view.sum()) == 45.0 and not view.flags.writeable
    store.release("p1x0", GEN)
    assert not os.path.exists(store.path_of("p1x0"))
    assert float(view.sum()) == 45.0  # a view taken before stays valid
    with pytest.raises(ResolveError, match=r"freed by hpcshare\.free"):
        h.resolve()


def test_dask_counts_a_shared_array_as_small_during_the_job_and_as_its_size_after(tmp_path):
    own = np.zeros(10**6)
    with context.running(context.JobContext(generation=GEN)), store.Joined(str(tmp_path), 0, owner=True):
        put_here("p1x0", np.ones(10**6))
        shared = ArrayHandle("p1x0", (10**6,), np.dtype("f8"), "C", GEN, stored=True).resolve()
        assert sizeof(shared) < 1000 and sizeof(own) >= 8 * 10**6
        assert sizeof(np.zeros(10**6)) >= 8 * 10**6  # the job's other arrays keep Dask's figure
    assert sizeof(shared) >= 8 * 10**6  # Dask's own sizeof is back once the job has ended
    assert os.listdir(tmp_path) == []  # the node's owner unlinked what was left
