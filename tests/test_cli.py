"""The command line, run as a user types it: ``mpiexec -n N python -m hpcshare ...``.

Every run is bounded by a timeout that kills its process group, and checks
that nothing of the job is left in /dev/shm.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
from helpers import (
    assert_clean_success,
    hpcshare,
    job_processes,
    kill_job,
    mpi_library,
    mpiexec,
    report_rows,
    run_cmd,
    running,
)

pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.mark.each_mpi
def test_demo_job_with_defaults_checks_its_answer_and_reports_memory():
    run = hpcshare(4, "job", timeout=180)
    assert_clean_success(run)
    assert "16 tasks OK, all match plain NumPy" in run.stdout
    assert "'data' (256 MiB" in run.stdout
    rows = report_rows(run.stdout)
    assert len(rows) == 1 and rows[0]["ranks"] == 4 and rows[0]["workers"] == 2
    assert rows[0]["inputs"] == 256 * 2**20
    # one copy of the input plus four small processes, not a copy per worker
    assert 256 * 2**20 <= rows[0]["measured"] < 256 * 2**20 + 4 * 200 * 2**20, run.stdout
    assert "Ignoring provided memory limit" not in run.output, run  # Dask's warning on every worker
    # no HTTP server unless asked for (tests/test_neighbours.py), and the line says how to ask
    assert "no Dask dashboard (--dashboard serves one that only you can reach)" in run.stderr, run


@pytest.fixture
def inputs(tmp_path):
    a = np.arange(3000, dtype=np.float32).reshape(300, 10)
    np.save(tmp_path / "a.npy", a)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset(
            "grid/values", data=np.arange(5000.0).reshape(500, 10), chunks=(64, 10), compression="gzip"
        )
        f.create_dataset("text", data=["a", "bb"], dtype=h5py.string_dtype())
    (tmp_path / "make.py").write_text(
        "import numpy as np\ndef ramp():\n    return np.arange(100, dtype=np.int64)\n"
    )
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def total(h):
                return float(np.asarray(h).sum())

            def main(client, inputs):
                for name in sorted(inputs):
                    h = inputs[name]
                    print(f"{name} {h.shape} sum={client.submit(total, h).result():.1f}")
            """
        )
    )
    return tmp_path


@pytest.mark.each_mpi
def test_job_file_with_npy_hdf5_and_function_inputs_on_two_emulated_nodes(inputs):
    run = hpcshare(
        6,
        "job",
        str(inputs / "job.py"),
        "--input",
        f"a={inputs}/a.npy",
        "--input",
        f"grid={inputs}/d.h5:/grid/values",
        "-i",
        f"ramp={inputs}/make.py:ramp",
        "--ranks-per-node",
        "3",
    )
    assert_clean_success(run)
    assert "a (300, 10) sum=4498500.0" in run.stdout
    assert "grid (500, 10) sum=12497500.0" in run.stdout
    assert "ramp (100,) sum=4950.0" in run.stdout
    rows = report_rows(run.stdout)
    assert [(r["node"], r["ranks"], r["workers"]) for r in rows] == [(0, 3, 1), (1, 3, 3)]
    assert all(r["inputs"] == pytest.approx(12000 + 40000 + 800, rel=0.01) for r in rows)
    assert "on 2 node(s)" in run.stderr


def test_console_script_is_installed():
    run = run_cmd([sys.executable, "-c", "import shutil; print(shutil.which('hpcshare') or '')"])
    exe = run.stdout.strip()
    if not exe:
        pytest.skip("hpcshare is not installed in this environment (pip install -e .)")
    assert run_cmd([exe, "--help"]).stdout.count("job") >= 1
    from importlib.metadata import version

    shown = run_cmd([exe, "--version"])
    assert shown.returncode == 0 and shown.stdout.strip() == f"hpcshare {version('hpcshare')}", shown


@pytest.mark.each_mpi
def test_a_failing_main_prints_one_traceback_and_fails_fast(tmp_path):
    (tmp_path / "bad.py").write_text(
        "def main(client, inputs):\n    raise RuntimeError('the model diverged')\n"
    )
    run = hpcshare(4, "job", str(tmp_path / "bad.py"), timeout=60)
    assert run.returncode != 0
    assert run.output.count("Traceback (most recent call last)") == 1, run
    assert run.output.count("RuntimeError: the model diverged") == 2, run  # traceback + summary line
    assert run.seconds < 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "x={d}/missing.npy"], "input 'x': file '{d}/missing.npy' does not exist"),
        (
            ["--input", "x={d}/d.h5:/grid/nope"],
            "dataset '/grid/nope' does not exist in '{d}/d.h5'; datasets there: /grid/values",
        ),
        (["--input", "x={d}/d.h5:/text"], "input 'x' ({d}/d.h5:/text) has dtype object"),
        (["--input", "x={d}/sheet.xlsx"], "cannot tell what kind of source"),
        (["--input", "x=no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
        (["--demo-size", "100TiB"], "need 100.00 TiB of shared memory on this host, but /dev/shm has"),
    ],
)
def test_bad_inputs_fail_before_allocating_with_a_clear_message(inputs, args, message):
    args = [a.format(d=inputs) for a in args]
    run = hpcshare(
        4, "job", *([str(inputs / "job.py")] if "--demo-size" not in args else []), *args, timeout=60
    )
    assert run.returncode != 0
    assert message.format(d=inputs) in run.stderr, run
    assert run.stderr.count("hpcshare: error:") == 1, run  # said once, not once per rank
    assert "Traceback" not in run.output


@pytest.mark.each_mpi
def test_too_few_ranks_is_refused():
    run = hpcshare(2, "job", timeout=60)
    assert run.returncode != 0
    assert "found 2 MPI rank(s), needs at least 3" in run.stderr, run
    assert run.stderr.count("hpcshare: error:") == 1


def test_a_launcher_from_another_mpi_is_named_with_the_fix():
    # a rank started alone while Slurm says 4 tasks: what `srun --mpi=none` does with MPICH
    run = run_cmd([sys.executable, "-m", "hpcshare", "job"], env={"SLURM_NTASKS": "4"}, timeout=60)
    assert run.returncode != 0
    assert "world of 1 rank, but SLURM_NTASKS=4" in run.stderr and "srun --mpi=pmi2" in run.stderr, run


@pytest.mark.each_mpi
def test_info_shows_topology_mpi_and_shared_memory():
    run = hpcshare(3, "info", timeout=60)
    assert run.returncode == 0, run
    assert "3 rank(s)" in run.stdout
    assert "MPI library:" in run.stdout and "thread level" in run.stdout
    assert "0 scheduler, 1 client, 2 worker" in run.stdout
    assert re.search(r"/dev/shm: [\d.]+ \w+ free of", run.stdout), run.stdout
    assert "mpiexec on PATH: " in run.stdout and "started by a launcher that set" in run.stdout, run


@pytest.mark.each_mpi
def test_info_shows_the_emulated_nodes_of_ranks_per_node():
    run = hpcshare(4, "info", "--ranks-per-node", "2", timeout=60)
    assert run.returncode == 0, run
    assert "emulated nodes of 2 rank(s): [0, 1]; [2, 3]" in run.stdout, run


def test_info_warns_about_singletons():
    run = run_cmd([sys.executable, "-m", "hpcshare", "info"], env={"SLURM_NTASKS": "8"}, timeout=60)
    assert run.returncode == 0
    assert "WARNING: this rank sees an MPI world of 1 rank, but SLURM_NTASKS=8" in run.stderr, run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "nonamehere"], "is not NAME=SOURCE"),
        (["job.py", "--demo-size", "1GiB"], "are for the demo job"),
        (["--demo-size", "lots"], "not a size"),
        (["--ranks-per-node", "0"], "at least 1"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(args, message):
    run = run_cmd([sys.executable, "-m", "hpcshare", "job", *args], timeout=30)
    assert run.returncode == 2 and message in run.stderr, run


@pytest.mark.each_mpi
def test_a_rank_that_dies_ends_the_job_and_leaves_nothing_in_shm(tmp_path):
    (tmp_path / "crash.py").write_text(
        "import os\n\ndef main(client, inputs):\n    client.submit(os._exit, 3).result()\n"
    )
    run = hpcshare(4, "job", str(tmp_path / "crash.py"), "-i", "x=numpy:eye", timeout=60)
    assert run.returncode != 0, run
    # clean_shm checks /dev/shm once the job's watcher has run


@pytest.mark.each_mpi
def test_shared_pages_do_not_count_against_a_workers_memory_limit():
    # Each worker touches all 256 MiB of the input, so its RSS (about 100 MiB of
    # Python and Dask plus the input) passes 80% of a 300 MiB private limit; Dask
    # would pause it (and the job would hang) if the shared bytes were not added.
    run = hpcshare(
        4, "job", "--demo-size", "256MiB", "--demo-tasks", "4", "--memory-limit", "300MiB", timeout=60
    )
    assert_clean_success(run)
    assert "4 tasks OK" in run.stdout
    assert "paused" not in run.output.lower(), run


@pytest.mark.each_mpi
def test_sys_exit_in_main_ends_the_job_quickly_with_its_code(tmp_path):
    (tmp_path / "leave.py").write_text("import sys\n\ndef main(client, inputs):\n    sys.exit(3)\n")
    run = hpcshare(4, "job", str(tmp_path / "leave.py"), timeout=60)
    assert run.returncode == 3, run  # the launcher's exit code: every rank exits with 3
    assert "the job's main called sys.exit(3)" in run.stderr, run
    assert run.stderr.count("error:") == 1, run
    assert run.seconds < 30, run


@pytest.mark.parametrize("call", ["sys.exit(0)", "sys.exit()"])
def test_sys_exit_0_in_main_is_a_success(tmp_path, call):
    (tmp_path / "done.py").write_text(f"import sys\n\ndef main(client, inputs):\n    {call}\n")
    run = hpcshare(3, "job", str(tmp_path / "done.py"), "-q", timeout=60)
    assert run.returncode == 0, run
    assert "error" not in run.stderr, run


def test_the_jobs_atexit_handlers_run_and_its_open_files_are_written_at_exit(tmp_path):
    # the ranks' exit skips the interpreter's garbage collections (cli._leaving): what users rely on stays
    (tmp_path / "leaves.py").write_text(
        textwrap.dedent(
            f"""
            import atexit
            import tempfile
            from pathlib import Path

            OUT = Path({str(tmp_path)!r})
            LOG = open(OUT / "log.txt", "w")  # never closed by the job, as scripts do
            SCRATCH = tempfile.NamedTemporaryFile(dir=OUT, prefix="scratch-")  # every rank's: removed at exit

            def _bye():
                (OUT / "atexit.txt").write_text("ran")

            def main(client, inputs):
                LOG.write("written by main")
                atexit.register(_bye)
            """
        )
    )
    run = hpcshare(3, "job", str(tmp_path / "leaves.py"), "-q", timeout=60)
    assert run.returncode == 0, run
    assert (tmp_path / "log.txt").read_text() == "written by main", run
    assert (tmp_path / "atexit.txt").read_text() == "ran", run
    assert not list(tmp_path.glob("scratch-*")), run
    assert "Exception ignored" not in run.stderr, run


@pytest.mark.parametrize("fast", [True, False])
def test_the_command_exits_without_pythons_final_collections_unless_told_not_to(tmp_path, fast):
    # what the exit keeps is checked above; here, that the quick exit happens, and that the key turns it off
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen' if gc.get_freeze_count() else 'not frozen'))\n"
        f"sys.argv = ['hpcshare', 'clean', '--shm-dir', {str(tmp_path)!r}]\n"
        "from hpcshare.cli import entry\n"
        "entry()\n"
    )
    run = run_cmd([sys.executable, "-c", probe], env={"DASK_HPCSHARE__FAST_EXIT": str(fast).lower()})
    assert run.returncode == 0, run
    assert run.stdout.strip().splitlines()[-1] == ("frozen" if fast else "not frozen"), run


@pytest.mark.each_mpi
def test_usage_errors_are_printed_once_not_once_per_rank():
    run = hpcshare(3, "job", "--readers", "0", timeout=60)
    assert run.returncode != 0
    assert run.stderr.count("error:") == 1, run


# What the ranks say when their launcher is signalled: MPICH's and Intel MPI's mpiexec pass the
# signal on, and the rank that stops the job names it. Open MPI's mpirun turns either signal into
# SIGTERM for the ranks and forwards nothing they print after it (docs/install.md).
STOP_LINES = {
    signal.SIGINT: "rank 0 interrupted; stopping the job",
    signal.SIGTERM: "rank 0 got SIGTERM; stopping the job",
}


@pytest.mark.each_mpi
@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGINT,  # what Ctrl-C in the terminal sends mpiexec
        signal.SIGTERM,  # what kill, timeout(1) or a batch system's time limit sends it
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_or_sigterm_stops_the_job_at_once_and_cleans_up(signum, clean_shm):
    proc = subprocess.Popen(
        [mpiexec(), "-n", "4", sys.executable, "-m", "hpcshare", "job", "--demo-size", "2GiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    err: list[str] = []

    def read(stream, into):
        for line in stream:
            into(line)
        lines.put(None)

    threading.Thread(target=read, args=(proc.stdout, lines.put), daemon=True).start()
    stderr_reader = threading.Thread(target=read, args=(proc.stderr, err.append), daemon=True)
    stderr_reader.start()
    try:
        # the tasks are running (placement done, Dask up): the job is in its long part
        deadline = time.monotonic() + 120  # for all lines together, not each
        while (line := lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None and (
            "demo: 16 tasks on" not in line
        ):
            pass
        assert line is not None, f"the job ended before its tasks ran: {''.join(err)}"
        job = job_processes(proc)
        proc.send_signal(signum)
        proc.wait(timeout=30)
        stderr_reader.join(timeout=10)
    except (subprocess.TimeoutExpired, queue.Empty):
        kill_job(proc)
        proc.wait()
        pytest.fail(
            f"the job did not start its tasks within 120 s, or did not stop within 30 s of "
            f"{signal.Signals(signum).name}: {''.join(err)}"
        )
    err_text = "".join(err)
    assert proc.returncode != 0
    assert len(job) >= 5, job  # the launcher and the 4 ranks
    deadline = time.monotonic() + 10
    while (left := [p for p in job if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after the launcher ended: {left}"
    stops = [line for line in err_text.splitlines() if line.startswith("hpcshare: rank")]
    # one line, from the lowest rank; none under Open MPI, whose mpirun forwards nothing after the signal
    assert stops == ([] if mpi_library() == "Open MPI" else [f"hpcshare: {STOP_LINES[signum]}"]), err_text
    assert "Traceback" not in err_text, err_text


@pytest.mark.each_mpi
def test_each_file_is_read_once_per_job_on_three_nodes_unless_per_node_is_asked(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(6 * 2**20, dtype=np.float64))  # 48 MiB: progress-sized
    (tmp_path / "job.py").write_text(
        "import numpy as np\n"
        "def main(client, inputs):\n"
        "    print('sums', sorted(set(client.run(lambda h=inputs['x']: float(np.asarray(h).sum())).values())))\n"
    )
    want = f"sums [{float(np.arange(6 * 2**20).sum())}]"
    args = ("job", str(tmp_path / "job.py"), "-i", f"x={tmp_path / 'x.npy'}", "--ranks-per-node", "2")
    run = hpcshare(6, *args)
    assert_clean_success(run)
    assert want in run.stdout
    assert "on 3 node(s)" in run.stderr
    assert "collective reading: 48.00 MiB read from files, 1.00x the file inputs" in run.stderr, run
    assert "96.00 MiB between nodes" in run.stderr, run  # two other nodes' shares, to each of three nodes
    run = hpcshare(6, *args, "--read", "per-node")
    assert_clean_success(run)
    assert want in run.stdout
    assert "per-node reading: 144.00 MiB read from files, 3.00x the file inputs" in run.stderr, run
    assert "between nodes" not in run.stderr, run  # nothing broadcast


@pytest.mark.each_mpi
def test_a_file_missing_on_one_node_ends_the_job_naming_the_node_and_the_file(tmp_path):
    """Node 2's ranks run in a folder without the file: a node-local path missing on one node."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    np.save(here / "x.npy", np.arange(1000))
    cmd = [sys.executable, "-m", "hpcshare", "job", "-i", "x=x.npy", "--ranks-per-node", "3"]
    run = run_cmd(
        [mpiexec(), "-n", "6", "-wdir", str(here), *cmd, ":", "-n", "3", "-wdir", str(there), *cmd],
        timeout=120,
    )
    assert run.returncode != 0, run
    assert f"input 'x': cannot read '{there / 'x.npy'}' on node 2 (" in run.stderr, run
    assert run.stderr.count("error:") == 1, run
    assert "Traceback" not in run.stderr, run


def test_an_input_name_starting_with_a_dash_is_not_taken_for_an_option():
    from hpcshare.cli import _glue_inputs, _parser

    ns = _parser().parse_args(_glue_inputs(["job", "--input", "-x=a.npy", "-i", "y=b.npy"]))
    assert ns.inputs == [("-x", "a.npy"), ("y", "b.npy")]
