"""Memory limits that understand sharing: private budgets within the job's memory."""

from __future__ import annotations

import json

import pytest
from helpers import hpcshare

MIB = 2**20

# a Slurm allocation of --mem-per-cpu=640 on 2 CPUs: 1280 MiB for the whole job on this node
SLURM_BUDGET = {"SLURM_MEM_PER_CPU": "640", "SLURM_CPUS_ON_NODE": "2"}
# --mem-per-cpu=1024 on 2 CPUs: 2 GiB
SLURM_2GIB = {"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "2"}

SOURCE = """
import numpy as np
from hpcshare import Fill

def make():
    return Fill(({n},), "f8", lambda out: out.fill(1.0))
"""

JOB = """
import json, time
import numpy as np
import psutil

def read_all(x):
    return float(np.asarray(x).sum())

def state(dask_worker):
    time.sleep(0.5)  # a few ticks of Dask's memory monitor (every 100 ms)
    return dict(
        limit=dask_worker.memory_manager.memory_limit,
        measured=dask_worker.monitor.get_process_memory(),
        rss=psutil.Process().memory_info().rss,
        status=dask_worker.status.name,
    )

def main(client, inputs):
    x = inputs["x"]
    workers = list(client.scheduler_info()["workers"])
    for _ in range(3):  # every worker reads every page of the input, three times
        futures = [client.submit(read_all, x, workers=[w], pure=False) for w in workers]
        assert client.gather(futures) == [float(x.shape[0])] * len(workers)
    print("STATE", json.dumps(list(client.run(state).values())), flush=True)
"""


def test_job_memory_is_the_lowest_of_the_machine_the_cgroup_and_slurm():
    from hpcshare.memory import job_memory

    def job_memory_total(env):
        return job_memory(env)[0]

    assert job_memory_total({"SLURM_MEM_PER_NODE": "1024"}) == 2**30  # sbatch --mem=1G
    assert job_memory_total({"SLURM_MEM_PER_NODE": "0"}) == job_memory_total({})  # --mem=0: the whole node
    assert job_memory_total({"SLURM_MEM_PER_NODE": "lots"}) == job_memory_total({})
    # sbatch --mem-per-cpu=640 with 2 CPUs on this node
    assert job_memory({**SLURM_BUDGET}) == (1280 * MIB, "Slurm's --mem-per-cpu (640 MiB) x 2 CPUs")
    assert job_memory({"SLURM_MEM_PER_CPU": "640"})[0] == job_memory_total({})  # CPUs unknown: no cap
    both = {**SLURM_BUDGET, "SLURM_MEM_PER_NODE": "1000"}
    assert job_memory(both) == (1000 * MIB, "Slurm's --mem (1000 MiB)")


def test_private_memory_counts_what_a_process_allocates_not_the_files_it_maps(tmp_path):
    """Pages of a mapped file (as of the shared libraries, held once per node) are not a worker's
    private memory; bytes it allocates are."""
    import mmap

    import numpy as np

    from hpcshare.memory import file_memory, private_memory

    size = 64 * MIB
    (tmp_path / "data").write_bytes(b"\1" * size)
    with open(tmp_path / "data", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        before, files_before = private_memory(), file_memory()
        assert sum(m[i] for i in range(0, size, 4096)) == size // 4096  # every page read
        assert file_memory() - files_before > size // 2
        assert private_memory() - before < 8 * MIB
    before = private_memory()
    held = np.ones(size // 8)
    assert private_memory() - before > size * 0.9
    del held


@pytest.mark.usefixtures("clean_shm")
def test_workers_reading_an_input_over_70_percent_of_the_job_memory_are_not_paused(tmp_path):
    """An input of 72% of a 2 GiB Slurm budget, read in full by both workers: RSS far above the
    limit, private memory well under it; the limits, the input and the scheduler's and client's
    memory fit the budget."""
    budget = 2048 * MIB
    n = int(0.72 * budget) // 8
    (tmp_path / "src.py").write_text(SOURCE.format(n=n))
    (tmp_path / "job.py").write_text(JOB)
    env = {**SLURM_2GIB, "DASK_HPCSHARE__DASK_LOG_LEVEL": "warning"}
    run = hpcshare(4, "job", str(tmp_path / "job.py"), "-i", f"x={tmp_path / 'src.py'}:make", env=env)
    assert run.returncode == 0, run
    workers = json.loads(run.stdout.split("STATE ", 1)[1].splitlines()[0])
    assert len(workers) == 2, run
    shared = n * 8
    # room is left for the scheduler and the client: at least 100 MiB each
    assert sum(w["limit"] for w in workers) + shared + 200 * MIB <= budget, workers
    for w in workers:
        assert w["status"] == "running", workers
        assert w["rss"] > w["limit"] + shared // 2, workers  # Dask's RSS would have paused it
        assert w["measured"] < 0.7 * w["limit"], workers  # below spilling: private memory only
    # Dask says nothing about memory: no ignored limit, no unmanaged memory, no pause
    for noise in ("Ignoring provided memory limit", "Unmanaged memory", "Pausing worker", "memory usage"):
        assert noise not in run.stderr, run


@pytest.mark.usefixtures("clean_shm")
def test_an_input_that_leaves_the_workers_too_little_is_refused_before_dask_starts(tmp_path):
    """1240 MiB of a 1280 MiB budget: it fits, but every worker would pause at once, for ever."""
    (tmp_path / "src.py").write_text(SOURCE.format(n=(1240 * MIB) // 8))
    (tmp_path / "job.py").write_text("def main(client, inputs):\n    pass\n")
    args = ("job", str(tmp_path / "job.py"), "-i", f"x={tmp_path / 'src.py'}:make")
    run = hpcshare(4, *args, env=SLURM_BUDGET, timeout=90)
    assert run.returncode != 0, run
    assert "leave each of the 2 worker(s) on this host" in run.stderr, run
    assert "a worker needs at least" in run.stderr and "--mem-per-cpu (640 MiB) x 2 CPUs" in run.stderr, run
    assert run.stderr.count("error:") == 1, run
    assert run.seconds < 60, run


@pytest.mark.usefixtures("clean_shm")
def test_an_input_larger_than_the_jobs_memory_is_refused_naming_the_limit(tmp_path):
    (tmp_path / "src.py").write_text(SOURCE.format(n=(1400 * MIB) // 8))
    run = hpcshare(3, "job", "-i", f"x={tmp_path / 'src.py'}:make", env=SLURM_BUDGET, timeout=60)
    assert run.returncode != 0, run
    assert "more than the job may use here" in run.stderr, run
    assert "--mem-per-cpu (640 MiB) x 2 CPUs" in run.stderr, run
    assert run.stderr.count("error:") == 1, run


def test_inputs_and_puts_are_refused_by_one_policy_naming_what_and_how_much(tmp_path):
    import shutil

    from hpcshare import CapacityError
    from hpcshare.config import JobConfig
    from hpcshare.memory import check_room, job_memory

    config = JobConfig.from_options(shm_dir=str(tmp_path), shm_headroom=0)
    check_room(config, 2**20, "1 MiB")  # room for that
    limit, _ = job_memory()
    with pytest.raises(
        CapacityError, match=r"2 input\(s\) x 1 node\(s\) on this host need .* of shared memory"
    ):
        check_room(config, shutil.disk_usage(tmp_path).free + 2**30, "2 input(s) x 1 node(s) on this host")
    if shutil.disk_usage(tmp_path).free < limit + 2**31:
        pytest.skip(
            f"{tmp_path} has less room than this machine's memory: the job-memory rule cannot be reached"
        )
    with pytest.raises(
        CapacityError, match=r"hpcshare.put of a float64 array need .* more than the job may use"
    ):
        check_room(config, limit + 2**30, "hpcshare.put of a float64 array")
