"""The benchmark's verdicts on hpcshare-put, from rows with known figures (pure logic)."""

from __future__ import annotations

from hpcshare.bench import BenchRow
from hpcshare.bench.targets import targets

GiB, MiB = 2**30, 2**20


def row(contender: str, size: int = GiB, workers: int = 4, workload: str = "array", nodes: int = 1, **fig):
    return BenchRow(contender, size, workers, 16, workload, nodes).ended("ok", **fig)


def verdicts(rows: list[BenchRow]) -> dict[str, tuple[bool, str]]:
    return {t.what: (t.met, t.figure) for t in targets(rows)}


def test_put_memory_is_judged_while_tasks_run_and_its_peak_against_unidist():
    put = dict(ready=1.0, moved_bytes=100 * 1024, resolve_us_median=1.0, resolve_us_p99=2.0)
    rows = [
        row("shm-copy", workers=1, ready=1.0),
        row("hpcshare-empty", size=MiB, node_memory=400 * MiB),
        # peak 2.3 GiB (the maker's private copy), 1.4 GiB once the tasks run
        row("hpcshare-put", node_memory=int(2.3 * GiB), steady_memory=int(1.4 * GiB), **put),
        row("submit", node_memory=8 * GiB, steady_memory=int(4.5 * GiB)),
        row("scatter", node_memory=12 * GiB, steady_memory=12 * GiB),
        row("ray-put", node_memory=int(2.6 * GiB), steady_memory=int(1.3 * GiB)),
        row("unidist-put", node_memory=int(2.2 * GiB)),
    ]
    v = verdicts(rows)
    tag = "S=1.00 GiB, W=4, array, 1 node"
    # 1.4 GiB <= 1.15 x (1 GiB + 400 MiB) = 1.57 GiB
    assert v[f"hpcshare-put node memory while tasks run <= 1.15 x (S + empty job), {tag}"][0] is True
    assert v[f"submit uses >= 3.5x hpcshare-put's node memory while tasks run, {tag}"][0] is False  # 3.2x
    assert v[f"scatter uses >= 3.5x hpcshare-put's node memory while tasks run, {tag}"][0] is True
    assert v[f"hpcshare-put node memory while tasks run <= Ray's (ray-put), {tag}"][0] is False
    peak = v[f"hpcshare-put peak node memory (transient copies included) <= unidist-put's, {tag}"]
    assert peak == (False, "2.30 GiB vs 2.20 GiB")
    assert v[f"hpcshare-put time to ready <= 1.3x one copy into fresh shared memory, {tag}"][0] is True


def test_put_on_two_nodes_is_judged_against_a_copy_plus_one_transfer_and_moves_no_payload():
    rows = [
        row("shm-copy", workers=1, ready=1.0),
        row("mpi-transfer", workers=1, ready=2.0),
        row(
            "hpcshare-put", nodes=2, ready=4.0, moved_bytes=3 * MiB, resolve_us_median=1.0, resolve_us_p99=2.0
        ),
    ]
    v = verdicts(rows)
    tag = "S=1.00 GiB, W=4, array, 2 nodes"
    ready = v[
        f"hpcshare-put time to ready <= 1.3x one copy into fresh shared memory + 1 MPI transfer(s), {tag}"
    ]
    assert ready == (False, "4.000 s vs 3.000 s (1.33x)")
    assert v[f"hpcshare-put: workers move < 1 MiB between them, {tag}"] == (False, "3.00 MiB")
    assert not any("node memory" in what for what in v)  # two nodes on one host: memory is not judged


def test_frame_resolve_must_stay_under_100_us_and_flat_in_s():
    frame = dict(workload="frame", ready=1.0, moved_bytes=0, resolve_us_p99=50.0)
    rows = [
        row("hpcshare-put", size=256 * MiB, resolve_us_median=10.0, **frame),
        row("hpcshare-put", resolve_us_median=120.0, **frame),
    ]
    v = verdicts(rows)
    assert (
        v["resolving the shared DataFrame takes a median <= 100 us, S=1.00 GiB, W=4, frame, 1 node"][0]
        is False
    )
    flat = v["DataFrame resolve flat in S (1.00 GiB over 256.00 MiB <= 1.5), W=4"]
    assert flat == (False, "120.0 us vs 10.0 us (12.00x)")
