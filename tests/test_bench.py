"""``hpcshare bench`` keeps working: every contender runs and they agree (no timings checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from helpers import run_cmd

from hpcshare.bench import BenchRow, make_inputs, memory_needed, run_one
from hpcshare.bench.overhead import JOB_ORDER, expected_checksum
from hpcshare.bench.sampling import resident_bytes
from hpcshare.bench.startup import SETTINGS
from hpcshare.bench.workloads import frame_work, make_frame


@pytest.mark.usefixtures("clean_shm")
def test_every_contender_runs_the_same_workload_and_agrees(tmp_path):
    out = tmp_path / "out"
    run = run_cmd(
        [
            sys.executable,
            "-m",
            "hpcshare",
            "bench",
            "--sizes",
            "4MiB",
            "--workers",
            "2",
            "--tasks",
            "5",
            "--out",
            str(out),
        ],
        timeout=400,
    )
    assert run.returncode == 0, run
    result = json.loads((out / "bench.json").read_text())
    rows = {BenchRow(**r).label: r for r in result["rows"]}
    for name in (
        "hpcshare",
        "hpcshare-h5",
        "hpcshare-empty",
        "scatter",
        "submit",
        "memmap",
        "memmap-cold",
        "fork",
        "hpcshare-put",
        "hpcshare-put 2n",
        "scatter frame",
        "hpcshare-put frame",
        "hpcshare-put frame 2n",
        "shm-copy",
        "h5-read-direct",
        "mpi-transfer",
    ):
        assert rows[name]["status"] == "ok", rows[name]
    for name, module, extra in (
        ("ray", "ray", "bench"),
        ("ray-put", "ray", "bench"),
        ("ray-put frame", "ray", "bench"),
        ("unidist-put", "unidist", "bench"),
    ):
        if importlib.util.find_spec(module):
            assert rows[name]["status"] == "ok", rows[name]
        else:
            assert (
                rows[name]["status"] == "skipped" and f"pip install 'hpcshare[{extra}]'" in rows[name]["note"]
            )

    # the same answers as computing the workloads here
    x, _ = make_inputs(tmp_path, 4 * 2**20)
    data = np.load(x)
    expected = {
        "array": sum((i + 1) * float(np.dot(data, data)) for i in range(5)),
        "frame": sum(frame_work(make_frame(str(x)), i) for i in range(5)),
    }
    ran = [r for r in result["rows"] if "checksum" in r and r["contender"] != "hpcshare-empty"]
    assert {r.get("workload", "array") for r in ran} == {"array", "frame"} and len(ran) >= 10
    for r in ran:
        assert r["checksum"] == pytest.approx(expected[r["workload"]], rel=1e-12), r
    assert result["checksums_agree"] is True

    # figures a reader relies on are there and sane
    hp = rows["hpcshare"]
    assert hp["node_memory"] > 4 * 2**20 and hp["processes"] >= 4
    assert 0 < hp["resolve_us_median"] <= hp["resolve_us_p99"]
    assert set(hp["placement"]) == {"allocate", "read", "wait", "total"}
    assert rows["scatter"]["moved_bytes"] >= 2 * 4 * 2**20  # one copy sent to each of 2 workers
    assert hp["moved_bytes"] < 2**20  # hpcshare moves no input bytes
    for name in ("hpcshare-put", "hpcshare-put 2n", "hpcshare-put frame 2n"):
        put = rows[name]
        assert put["moved_bytes"] < 2**20, put  # handles only, also between the two nodes
        assert put["ready"] > 0 and 0 < put["resolve_us_median"] <= put["resolve_us_p99"], put
    assert rows["hpcshare-put 2n"]["nodes"] == 2 and rows["mpi-transfer"]["ready"] > 0

    text = (out / "bench.txt").read_text()
    assert all(name in text for name in rows)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.usefixtures("clean_shm")
def test_memmap_maps_the_file_in_every_task_and_agrees(tmp_path):
    out, size = tmp_path / "out", 4 * 2**20
    cmd = [
        sys.executable,
        "-m",
        "hpcshare",
        "bench",
        "--contenders",
        "memmap,memmap-cold",
        "--workloads",
        "array",
    ]
    run = run_cmd([*cmd, "--sizes", "4MiB", "--workers", "2", "--tasks", "5", "--out", str(out)], timeout=300)
    assert run.returncode == 0, run
    result = json.loads((out / "bench.json").read_text())
    rows = {BenchRow(**r).label: r for r in result["rows"]}
    x, _ = make_inputs(tmp_path, size)
    data = np.load(x)
    expected = sum((i + 1) * float(np.dot(data, data)) for i in range(5))
    for name in ("memmap", "memmap-cold"):
        r = rows[name]
        assert r["status"] == "ok" and r["workers"] == 2 and r["size"] == size, r
        assert r["checksum"] == pytest.approx(expected, rel=1e-12), r
        assert r["processes"] >= 4 and r["node_memory"] > size, r  # scheduler, client, 2 workers
        assert 0 < r["ready"] < 1, r  # nothing placed: a worker maps the file
        assert r["moved_bytes"] < 2**20, r  # the path goes to the tasks, never the data
        assert 0 < r["task_compute_median"] <= r["task_compute_max"] <= r["task_phase"], r
        assert "placement" not in r and "resolve_us_median" not in r, r
    assert result["checksums_agree"] is True
    assert "memmap-cold" in (out / "bench.txt").read_text()


@pytest.mark.usefixtures("clean_shm")
def test_the_local_cluster_mode_runs_the_seed_pattern_on_a_local_cluster_and_agrees(tmp_path):
    out, size = tmp_path / "out", 4 * 2**20
    cmd = [sys.executable, "-m", "hpcshare", "bench", "--cluster", "local", "--workloads", "array"]
    cmd += ["--contenders", "local-hpcshare,local-submit,local-scatter"]  # Ray's program: the test above
    run = run_cmd([*cmd, "--sizes", "4MiB", "--workers", "2", "--tasks", "3", "--out", str(out)], timeout=300)
    assert run.returncode == 0, run
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["cluster"] == "local"
    rows = {BenchRow(**r).label: r for r in result["rows"]}
    assert set(rows) == {"shm-copy", "local-empty", "local-hpcshare", "local-submit", "local-scatter"}
    x, _ = make_inputs(tmp_path, size)
    data = np.load(x)
    expected = sum((i + 1) * float(np.dot(data, data)) for i in range(3))
    for name in ("local-hpcshare", "local-submit", "local-scatter"):
        r = rows[name]
        assert r["status"] == "ok" and r["workers"] == 2 and r["size"] == size, r
        assert r["checksum"] == pytest.approx(expected, rel=1e-12), r
        assert r["node_memory"] > size and r["processes"] >= 3, r  # the program and 2 worker processes
    hp = rows["local-hpcshare"]
    assert hp["ready"] > 0 and 0 < hp["resolve_us_median"] <= hp["resolve_us_p99"], hp
    assert hp["moved_bytes"] < 2**20, hp  # the workers pass handles, never the data
    assert rows["local-scatter"]["moved_bytes"] >= size  # the second worker's copy, from the first
    assert "ready" not in rows["local-submit"]  # the seed pattern's copies move while the tasks wait
    assert rows["local-empty"]["size"] == 2**20 and rows["shm-copy"]["ready"] > 0
    assert result["checksums_agree"] is True
    assert "targets: none judged" in run.stdout  # stated for 1 GiB at W = 4
    text = (out / "bench.txt").read_text()
    assert all(name in text for name in rows)


@pytest.mark.usefixtures("clean_shm")
def test_overhead_measures_tls_and_handles_in_real_jobs(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "hpcshare",
        "bench",
        "--overhead",
        "--tiny-tasks",
        "2000",
        "--startup-runs",
        "1",
    ]
    run = run_cmd([*cmd, "--out", str(out)], timeout=400)
    assert run.returncode == 0, run
    result = json.loads((out / "bench.json").read_text())
    assert result["config"] == {
        "overhead": True,
        "workers": [2],
        "tiny_tasks": 2000,
        "jobs": list(JOB_ORDER),
        "startup_runs": 1,
    }
    # start-up against plain dask-mpi, same 4 ranks, one run each: figures and the target's verdict
    (startup,) = result["startup"]
    assert startup["ranks"] == 4 and "failed" not in startup, startup
    assert {s: len(r) for s, r in startup["runs"].items()} == {s: 1 for s in SETTINGS}, startup
    for setting in SETTINGS:
        ((wall, cpu, ready),) = (tuple(r.values()) for r in startup["runs"][setting])
        assert 0 < wall < 120 and 0 < cpu < 120, startup  # sane, not judged: a shared 2-core machine
        assert 0 < ready < wall, startup  # the client was ready before the job ended
        if setting != "dask-mpi":
            assert startup[setting]["wall_ratio"] == pytest.approx(wall / startup["dask-mpi"]["wall"])
    verdicts = [t for t in result["targets"] if t["what"].startswith("start-up within 1.1x plain dask-mpi")]
    assert len(verdicts) == 1 and verdicts[0]["met"] == (startup["hpcshare"]["wall_ratio"] <= 1.1), verdicts
    assert f"target {'met ' if verdicts[0]['met'] else 'MISSED'}  start-up within 1.1x" in run.stdout
    rows = {BenchRow(**r).label: r for r in result["rows"]}
    assert set(rows) == {"hpcshare-tiny", "hpcshare-tiny no-tls"}
    for label, protocol in (("hpcshare-tiny", "tls"), ("hpcshare-tiny no-tls", "tcp")):
        r = rows[label]
        assert r["status"] == "ok" and r["workers"] == 2 and r["tasks"] == 2000, r
        assert r["protocol"] == protocol and {j["protocol"] for j in r["runs"]} == {protocol}, r
        assert r["checksum"] == expected_checksum(2000), r  # every task ran once, with and without handles
        assert len(r["runs"]) == 4 and sum(j["tasks"] for j in r["runs"]) == 2000, r
        assert len(r["handle_pairs"]) == 8 and all(p > 0 for p in r["handle_pairs"]), r  # 2 pairs a job
        # sane, not judged: a shared 2-core machine
        assert 0 < r["dask_startup"] < r["startup"] < 120, r
        assert 0 < r["tiny_none_per_s"] < 1e6 and 0 < r["tiny_handle_per_s"] < 1e6, r
        assert "node_memory" not in r  # not sampled: the sampler would take CPU from the tasks
    costs = {c["what"]: c for c in result["costs"]}
    assert set(costs) == {
        "TLS per task, no handle, W=2",
        "TLS per task, with a handle, W=2",
        "TLS at start-up, launch to ready client, W=2",
        "TLS at start-up, inputs placed to ready client, W=2",
        "a handle per task, TLS on, W=2",
        "a handle per task, TLS off, W=2",
    }
    tls, plain = rows["hpcshare-tiny"], rows["hpcshare-tiny no-tls"]
    per_task = costs["TLS per task, no handle, W=2"]
    assert per_task["with_it"] == pytest.approx(1e6 / tls["tiny_none_per_s"])
    assert per_task["without"] == pytest.approx(1e6 / plain["tiny_none_per_s"])
    assert costs["TLS at start-up, launch to ready client, W=2"]["extra"] == pytest.approx(
        tls["startup"] - plain["startup"]
    )
    assert result["targets"] == verdicts and "the handle target is stated for 100000 tiny tasks" in run.stdout
    assert result["checksums_agree"] is True
    text = (out / "bench.txt").read_text()
    assert "hpcshare-tiny no-tls" in text and "a handle per task, TLS on, W=2: " in text
    assert text.startswith("start-up, empty main") and "\nhpcshare no-tls " in text
    assert text in run.stdout.replace("\r", "")  # what was printed is what was written
    assert not (out / "bench.png").exists()


def test_a_files_pages_in_the_page_cache_are_counted_whether_mapped_or_not(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(np.arange(2**20, dtype=np.float64).tobytes())  # 8 MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as memmap-cold does
        assert resident_bytes(str(path)) < 2**20
        assert resident_bytes(str(path)) < 2**20  # looking reads nothing in
        assert len(os.pread(fd, 8 * 2**20, 0)) == 8 * 2**20
    finally:
        os.close(fd)
    assert resident_bytes(str(path)) == 8 * 2**20


def test_a_contender_that_would_not_fit_is_skipped_with_its_figure(tmp_path):
    row = run_one("scatter", tmp_path / "x.npy", tmp_path / "x.h5", 2**40, 6, 4, tmp_path, 60)
    assert row.status == "skipped"
    assert row.note.startswith(f"needs about {memory_needed('scatter', 2**40, 6) / 2**40:.2f} TiB")


@pytest.mark.parametrize(
    "args",
    [
        ["--sizes", "lots"],
        ["--workers", "0"],
        ["--contenders", "dask,spark"],
        ["--workloads", "table"],
        ["--nodes", "3"],  # the default --workers 1,2,4: a run with 1 worker cannot have 3 nodes
        ["--overhead", "--sizes", "1GiB"],  # --overhead runs its own jobs on a small input
        ["--tiny-tasks", "5000"],  # without --overhead
        ["--overhead", "--tiny-tasks", "10"],  # too few to split over the jobs
        ["--overhead", "--startup"],  # --overhead runs the start-up comparison already
        ["--startup", "--tiny-tasks", "5000"],  # --startup runs no tiny tasks
        ["--startup-runs", "3"],  # without --overhead or --startup
        ["--startup", "--startup-runs", "0"],
        ["--placement", "--tasks", "3"],  # placement alone runs no tasks
        ["--placement", "--sizes", "1MiB,2MiB"],  # one size
        ["--placement", "--nodes", "0"],
        ["--cluster", "k8s"],
        ["--cluster", "local", "--contenders", "fork"],  # a launcher contender
        ["--cluster", "local", "--nodes", "2"],  # a LocalCluster is on this machine
        ["--cluster", "local", "--overhead"],
        ["--cluster", "local", "--placement"],
    ],
)
def test_bad_bench_arguments_are_refused(args):
    run = run_cmd([sys.executable, "-m", "hpcshare", "bench", *args], timeout=30)
    assert run.returncode == 2, run


@pytest.mark.usefixtures("clean_shm")
def test_the_placement_sweep_counts_the_bytes_each_way_of_reading_reads(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hpcshare", "bench", "--placement", "--sizes", "8MiB", "--nodes", "1,2,3"]
    run = run_cmd([*cmd, "--out", str(out)], timeout=300)
    assert run.returncode == 0, run
    rows = {(r["format"], r["nodes"], r["mode"]): r for r in json.loads((out / "placement.json").read_text())}
    runs = ((1, "collective"), (2, "collective"), (2, "per-node"), (3, "collective"), (3, "per-node"))
    assert set(rows) == {(f, n, m) for f in ("npy", "h5-gzip") for n, m in runs}
    for (_, nodes, mode), r in rows.items():
        assert r["status"] == "ok" and r["nbytes"] == 8 * 2**20, r
        copies = nodes if mode == "per-node" else 1
        assert r["counted"] == copies * r["nbytes"], r  # the bytes the reads asked for
        assert copies * 0.95 <= r["rchar"] / r["file_size"] <= copies * 1.1, r  # what the kernel counted
        assert r["broadcast_bytes"] == ((nodes - 1) * r["nbytes"] if mode == "collective" else 0), r
    assert rows[("h5-gzip", 1, "collective")]["file_size"] < 8 * 2**20 / 2  # compressed
    text = (out / "placement.txt").read_text()
    assert "target: npy: bytes read per job <= 1.1x the file at every node count: met" in text, text
    assert "model on this host (npy)" in text, text
