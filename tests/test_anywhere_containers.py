"""Workers in containers: each its own /dev/shm on one host, and a client that sees none of them.

``dask scheduler`` and ``dask worker`` (under nannies) as a user starts
them; each "container" is a mount namespace with a tmpfs of its own on
/dev/shm (``unshare --mount``, as root), like Docker's or Slurm's
``job_container/tmpfs``. The test's own process is the client: it sees
only the machine's /dev/shm, where no worker keeps anything, so its put
is sent once to one worker. Each container holds one copy, read by all
its workers; the bytes cross into a container once, and a worker that
joins a container later maps the copy that is there.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from daskprocs import DaskProcesses, objects_here, on_each, total
from distributed import Client
from helpers import skip_unless_available

import hpcshare
from hpcshare.anywhere import files

NBYTES = 8_000_000


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "containers (mount namespaces with their own /dev/shm) need root"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "containers need unshare and nsenter (util-linux)"
    return None


def _container(size: str = "256M") -> list[str]:
    """The prefix that runs a command in a new container: its own mount namespace and /dev/shm."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && exec "$@"',
        "container",
    ]


def _in(pid: int) -> list[str]:
    """The prefix that runs a command in the container of process ``pid``."""
    return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--"]


def test_each_container_holds_one_copy_the_far_client_sends_it_once_and_a_later_worker_maps_it(tmp_path):
    skip_unless_available(_missing(), "HPCSHARE_REQUIRE_HOSTS")
    with DaskProcesses(tmp_path) as dask:
        dask.scheduler()
        a = dask.worker(1, _container())
        dask.worker(2, _container())
        with dask.logs_on_failure(), Client(scheduler_file=str(dask.scheduler_file), timeout=60) as client:
            client.wait_for_workers(3, timeout=120)
            first = sorted(client.scheduler_info()["workers"])
            values = np.arange(NBYTES // 8, dtype="f8")
            handle = hpcshare.put(values)  # this process sees no worker's /dev/shm: sent to one worker

            seen = on_each(client, handle, first)
            assert {s["sum"] for s in seen.values()} == {float(values.sum())}
            files_of = {s["file"] for s in seen.values()}
            assert len(files_of) == 2  # one copy per container, each read by its workers
            assert all(len(s["objects"]) == 1 for s in seen.values())
            size = seen[first[0]]["size"]
            assert NBYTES <= size < NBYTES + 4096
            assert total(client, "fetched") == size  # into the other container, once
            assert total(client, "served") == size
            ours = files.PREFIX + files.cluster_of(handle.generation)
            assert not [
                n for n in os.listdir("/dev/shm") if n.startswith(ours)
            ]  # nothing on the client's host

            dask.worker(1, _in(a.pid))  # joins container a later
            client.wait_for_workers(4, timeout=120)
            (late,) = set(client.scheduler_info()["workers"]) - set(first)
            later = on_each(client, handle, [late])[late]
            assert later["sum"] == float(values.sum())
            assert later["file"] in files_of  # it maps its container's copy
            assert total(client, "fetched") == size  # nothing crossed again

            hpcshare.free(handle)
            everywhere = [*first, late]
            left = client.gather([client.submit(objects_here, workers=[w], pure=False) for w in everywhere])
            assert left == [[]] * 4, left
            client.shutdown()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(ours)]
