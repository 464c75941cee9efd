"""Bytes between groups travel over the cluster's own comms, with its TLS: a cluster that requires it.

``dask scheduler`` and two ``dask worker`` processes started with TLS
certificates (``--protocol tls``, ``--tls-*``: the scheduler refuses any
connection without them), each worker with a shared-memory directory of
its own (``DASK_HPCSHARE__SHM_DIR``), so they are two groups on one host.
The test's process is the client: it sees neither directory, so its put goes
to one worker, and the other worker's group fetches it from that one,
worker to worker over ``tls://``.
"""

from __future__ import annotations

import os

import numpy as np
from daskprocs import DaskProcesses, total
from distributed import Client
from distributed.security import Security

import hpcshare
from hpcshare.anywhere import files

NBYTES = 8_000_000


def _pem_files(directory) -> dict[str, str]:
    """A temporary CA-signed certificate and key of distributed's, in 0600 files: the paths."""
    config = Security.temporary().get_tls_config_for_role("client")
    paths = {}
    for name, pem in (("ca", config["ca_file"]), ("cert", config["cert"]), ("key", config["key"])):
        path = os.path.join(directory, f"{name}.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        paths[name] = path
    return paths


def _objects_in(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(files.PREFIX) and "." not in n)


def _sum(handle) -> float:
    return float(handle.resolve().sum())


def test_a_group_fetches_from_another_over_the_clusters_tls(tmp_path):
    pem = _pem_files(tmp_path)
    tls = ["--tls-ca-file", pem["ca"], "--tls-cert", pem["cert"], "--tls-key", pem["key"]]
    shm = [tmp_path / "shm-a", tmp_path / "shm-b"]
    with DaskProcesses(tmp_path) as dask:
        dask.scheduler(more=["--protocol", "tls", *tls])
        for d in shm:
            d.mkdir(mode=0o700)
            dask.worker(1, (), *tls, env={"DASK_HPCSHARE__SHM_DIR": str(d)})
        security = Security(
            tls_ca_file=pem["ca"],
            tls_client_cert=pem["cert"],
            tls_client_key=pem["key"],
            require_encryption=True,
        )
        with (
            dask.logs_on_failure(),
            Client(scheduler_file=str(dask.scheduler_file), security=security, timeout=60) as client,
        ):
            client.wait_for_workers(2, timeout=120)
            workers = sorted(client.scheduler_info()["workers"])
            assert all(w.startswith("tls://") for w in workers), workers
            values = np.arange(NBYTES // 8, dtype="f8")
            handle = hpcshare.put(values)  # this process sees neither group: sent to one worker
            sums = [client.submit(_sum, handle, workers=[w], pure=False).result(timeout=60) for w in workers]
            assert sums == [float(values.sum())] * 2
            held = [_objects_in(str(d)) for d in shm]
            assert [len(h) for h in held] == [1, 1], held  # one copy per group
            size = os.path.getsize(os.path.join(shm[0], held[0][0]))
            assert total(client, "fetched") == size == total(client, "served")  # once, worker to worker
            hpcshare.free(handle)
            assert [_objects_in(str(d)) for d in shm] == [[], []]
            client.shutdown()
    assert [os.listdir(d) for d in shm] == [[], []]  # the groups' markers went with the cluster
