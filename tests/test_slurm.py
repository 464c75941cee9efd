"""The sbatch templates in jobscripts/, submitted as shipped to a real Slurm of two nodes.

Each job runs with ``sbatch --wait``; the tests read the job's log file and
the exit code Slurm records. The cluster (tests/slurm_cluster.py) is started
once for this module and its daemons are stopped by their PIDs at the end.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import ROOT, report_rows, run_cmd, skip_unless_available
from slurm_cluster import SlurmCluster, missing

JOBSCRIPTS = ROOT / "jobscripts"

JOB_ARGS = ("job.py", "--input", "lut=lut.npy", "--input", "grid=grid.h5:/grid")

pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    skip_unless_available(missing(), "HPCSHARE_REQUIRE_SLURM")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as exc:
        cluster.stop()
        pytest.fail(str(exc))
    yield cluster
    cluster.stop()


class Job:
    def __init__(self, run, job_id: str, log: str, state: dict[str, str]) -> None:
        self.run, self.job_id, self.log, self.state = run, job_id, log, state

    def __repr__(self) -> str:
        return f"<Job {self.job_id} {self.state.get('JobState')} rc={self.run.returncode}>\n{self.log}\n{self.run!r}"


def sbatch(slurm: SlurmCluster, cwd: Path, script: str, *args: str, env: dict[str, str] | None = None) -> Job:
    """``sbatch --wait`` a template as shipped (its own #SBATCH header), from ``cwd``."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    run = run_cmd(
        ["sbatch", "--wait", "--parsable", "-t", "5", str(JOBSCRIPTS / script), *args],
        cwd=cwd,
        env={"SLURM_CONF": str(slurm.conf), "PATH": path, **(env or {})},
        timeout=300,
    )
    match = re.search(r"^(\d+)", run.stdout, re.M)
    assert match, f"sbatch did not submit: {run!r}\n{slurm.logs()}"
    job_id = match[1]
    logs = list(cwd.glob(f"*-{job_id}.out"))
    assert len(logs) == 1, f"no log file %x-%j.out for job {job_id} in {cwd}: {run!r}"
    return Job(run, job_id, logs[0].read_text(), slurm.job_state(job_id))


def assert_job_ok(job: Job) -> None:
    assert job.run.returncode == 0, job
    assert job.state.get("JobState") == "COMPLETED", job
    assert "Traceback" not in job.log and "CommClosedError" not in job.log, job


@pytest.fixture
def inputs(tmp_path):
    np.save(tmp_path / "lut.npy", np.arange(1 << 20, dtype=np.float64))  # 8 MiB
    with h5py.File(tmp_path / "grid.h5", "w") as f:
        f.create_dataset(
            "grid", data=np.ones((512, 1024), dtype=np.float32), chunks=(64, 1024), compression="gzip"
        )
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def total(h):
                return float(np.asarray(h).sum())

            def main(client, inputs):
                for name in sorted(inputs):
                    futures = client.map(total, [inputs[name]] * 8, pure=False)
                    print(f"job: {name} sums {sorted(set(client.gather(futures)))}")
            """
        )
    )
    return tmp_path


def test_single_node_srun_template_runs_the_demo(slurm, tmp_path):
    job = sbatch(slurm, tmp_path, "single-node-srun.sbatch", "--demo-size", "64MiB")
    assert_job_ok(job)
    assert "16 tasks OK, all match plain NumPy" in job.log
    assert "srun --mpi=pmi2" in job.log
    rows = report_rows(job.log)
    assert [(r["node"], r["ranks"], r["workers"]) for r in rows] == [(0, 6, 4)], job
    assert rows[0]["inputs"] == 64 * 2**20
    assert re.search(r"Dask dashboard|no Dask dashboard", job.log), job
    if "Dask dashboard on" in job.log:
        assert re.search(r"ssh -N -J LOGIN-NODE -L \d+:localhost:\d+ \S+,", job.log), job


def test_single_node_mpirun_template_runs_a_job_file(slurm, inputs):
    job = sbatch(slurm, inputs, "single-node-mpirun.sbatch", *JOB_ARGS)
    assert_job_ok(job)
    assert f"job: lut sums [{float(np.arange(1 << 20).sum())}]" in job.log
    assert "job: grid sums [524288.0]" in job.log
    rows = report_rows(job.log)
    assert [(r["node"], r["ranks"], r["workers"]) for r in rows] == [(0, 6, 4)], job


def test_multi_node_template_holds_one_copy_on_each_of_two_nodes(slurm, inputs):
    job = sbatch(slurm, inputs, "multi-node.sbatch", *JOB_ARGS)
    assert_job_ok(job)
    assert "on 2 nodes (node[1-2])" in job.log
    assert "job: grid sums [524288.0]" in job.log
    rows = report_rows(job.log)
    # srun's pmi2 layout splits the ranks into Slurm's nodes: 4 each, the scheduler and client on node 0
    assert [(r["node"], r["ranks"], r["workers"]) for r in rows] == [(0, 4, 2), (1, 4, 4)], job
    nbytes = 8 * 2**20 + 512 * 1024 * 4
    for row in rows:
        assert row["inputs"] == nbytes  # the inputs, once on each node
        assert row["measured"] < nbytes + 4 * 250 * 2**20, job  # not a copy per worker


def test_workers_private_limits_and_the_inputs_fit_the_slurm_allocation(slurm, inputs):
    """sbatch --mem=9000 (given as SBATCH_MEM_PER_NODE, over the template's --mem): the
    four workers' limits plus the node's inputs stay within the 9000 MiB allocation, with room
    left for the scheduler and the client."""
    (inputs / "limits.py").write_text(
        "def limit(dask_worker):\n    return dask_worker.memory_manager.memory_limit\n"
        "def main(client, inputs):\n    print('limits', sorted(client.run(limit).values()))\n"
    )
    job = sbatch(
        slurm,
        inputs,
        "single-node-srun.sbatch",
        "limits.py",
        *JOB_ARGS[1:],
        env={"SBATCH_MEM_PER_NODE": "9000"},
    )
    assert_job_ok(job)
    match = re.search(r"^limits \[([\d, ]+)\]", job.log, re.M)
    assert match, job
    limits = [int(v) for v in match[1].split(",")]
    shared = 8 * 2**20 + 512 * 1024 * 4
    assert len(limits) == 4 and len(set(limits)) == 1, job
    assert sum(limits) + shared <= 9000 * 2**20, job
    # the allocation less the scheduler's and client's room (a few hundred MiB), not the machine's memory
    assert sum(limits) + shared > 8000 * 2**20, job


def test_python_api_template(slurm, tmp_path):
    job = sbatch(slurm, tmp_path, "python-api.sbatch", str(JOBSCRIPTS / "api_job.py"), "--size", "32MiB")
    assert_job_ok(job)
    assert "4096 x 1024 table (32.00 MiB), 32 tasks, column sums match: True" in job.log
    assert re.search(r"api_job: result \S+e\+\d+", job.log), job
    assert len(report_rows(job.log)) == 1


def test_a_failing_job_is_reported_failed_to_slurm(slurm, tmp_path):
    (tmp_path / "bad.py").write_text("def main(client, inputs):\n    raise ValueError('no convergence')\n")
    job = sbatch(slurm, tmp_path, "single-node-srun.sbatch", "bad.py")
    assert job.run.returncode != 0, job
    assert job.state.get("JobState") == "FAILED", job
    assert job.state.get("ExitCode", "0:0") != "0:0", job
    assert job.log.count("Traceback (most recent call last)") == 1, job
    assert "raise ValueError('no convergence')" in job.log, job


def test_srun_without_an_mpi_plugin_fails_with_the_fix(slurm, tmp_path):
    """``srun --mpi=none`` with MPICH starts singletons: each must refuse, naming the fix."""
    job = sbatch(slurm, tmp_path, "single-node-srun.sbatch", env={"SRUN_MPI": "none"})
    assert job.run.returncode != 0, job
    assert job.state.get("JobState") == "FAILED", job
    assert "srun started 6 tasks without an MPI plugin" in job.log, job
    assert "srun --mpi=pmi2" in job.log, job
    assert "Traceback" not in job.log, job


def test_scancel_stops_every_rank_and_leaves_nothing_in_shm(slurm, tmp_path):
    """scancel sends SIGTERM to every task (then SIGKILL): the ranks unlink their shared memory first."""
    import time

    (tmp_path / "slow.py").write_text(
        "import time\n\ndef main(client, inputs):\n    print('job: working', flush=True)\n    time.sleep(300)\n"
    )
    np.save(tmp_path / "x.npy", np.arange(1 << 20))
    run = run_cmd(
        ["sbatch", "--parsable", "-t", "5", str(JOBSCRIPTS / "single-node-srun.sbatch"), "slow.py",
         "--input", "x=x.npy"],
        cwd=tmp_path,
        env={"SLURM_CONF": str(slurm.conf),
             "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])},
    )  # fmt: skip
    job_id = run.stdout.strip().split(";")[0]
    assert job_id.isdigit(), run
    log = tmp_path / f"hpcshare-{job_id}.out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "job: working" in log.read_text()):
        time.sleep(0.5)
    assert log.exists() and "job: working" in log.read_text(), f"the job never started\n{slurm.logs()}"
    run_cmd(["scancel", job_id], env={"SLURM_CONF": str(slurm.conf)})
    while time.monotonic() < deadline and slurm.job_state(job_id).get("JobState") in (
        "RUNNING",
        "COMPLETING",
    ):
        time.sleep(0.5)
    state = slurm.job_state(job_id)
    assert state.get("JobState") == "CANCELLED", state
    text = log.read_text()
    assert "got SIGTERM; stopping the job" in text, text
