"""The runtime on real MPI ranks: run under ``mpiexec -n 5 python -m pytest --with-mpi``.

Each test calls ``hpcshare.run`` on every rank, as a batch script does.
"""

from __future__ import annotations

import os
import pickle
import socket
import textwrap
import time

import dask
import dask.array
import h5py
import numpy as np
import pandas as pd
import pytest

import hpcshare
from hpcshare import InputError, JobFailed, ResolveError
from hpcshare.arrays import SharedChunk

pytestmark = pytest.mark.mpi(min_size=5)

QUIET = {"quiet": True}


def expected_arrays():
    rng = np.random.default_rng(1)
    structured = np.zeros(7, dtype=[("x", "f8"), ("n", "i4"), ("tag", "S5"), ("v", "f4", (2,))])
    structured["x"] = np.arange(7) * 1.5
    structured["n"] = np.arange(7) - 3
    structured["tag"] = [b"a", b"bb", b"ccc", b"dddd", b"eeeee", b"f", b"g"]
    structured["v"] = rng.random((7, 2))
    return {
        "c3d": rng.random((13, 5, 4)),
        "fortran": np.asfortranarray(np.arange(6 * 9, dtype=np.int16).reshape(6, 9)),
        "flags": rng.random(1001) > 0.5,
        "empty": np.zeros((0, 5), dtype=np.float32),
        "grid": rng.random((103, 17)),  # chunk rows 10: slabs never split a chunk
        "records": structured,
        "names": np.array([b"alpha", b"be", b"gamma"], dtype="S5"),
        "scalar": np.array(3.25),
        "func": np.arange(12, dtype=np.complex128).reshape(3, 4) * (1 + 2j),
        "filled": np.full((50, 3), 7, dtype=np.uint32),
        "utf8": np.array([(1.5, 2), (2.5, 3)], dtype=[("温度", "f8"), ("n", "i2")]),
    }


def write_inputs(d):
    arrays = expected_arrays()
    np.save(d / "c3d.npy", arrays["c3d"])
    np.save(d / "fortran.npy", arrays["fortran"])
    np.save(d / "flags.npy", arrays["flags"])
    np.save(d / "empty.npy", arrays["empty"])
    with open(d / "utf8.npy", "wb") as f:  # a version 3.0 header (UTF-8 field names)
        np.lib.format.write_array(f, arrays["utf8"], version=(3, 0))
    with h5py.File(d / "data.h5", "w") as f:
        f.create_dataset("/g/grid", data=arrays["grid"], chunks=(10, 17), compression="gzip")
        f.create_dataset("records", data=arrays["records"], chunks=(3,), compression="gzip", shuffle=True)
        f.create_dataset("names", data=arrays["names"])
        f.create_dataset("scalar", data=arrays["scalar"])
    (d / "maker.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import hpcshare

            def complex_grid():
                return np.arange(12, dtype=np.complex128).reshape(3, 4) * (1 + 2j)

            def filled():
                return hpcshare.Fill((50, 3), "u4", lambda out: out.fill(7))
            """
        )
    )


def sources(d):
    return {
        "c3d": d / "c3d.npy",
        "fortran": str(d / "fortran.npy"),
        "flags": str(d / "flags.npy"),
        "empty": str(d / "empty.npy"),
        "utf8": str(d / "utf8.npy"),
        "grid": f"{d}/data.h5:/g/grid",
        "records": f"{d}/data.h5:/records",
        "names": f"{d}/data.h5:/names",
        "scalar": f"{d}/data.h5:/scalar",
        "func": f"{d}/maker.py:complex_grid",
        "filled": f"{d}/maker.py:filled",
    }


def describe_view(h):
    """Runs in a task: what the worker sees of input ``h``."""
    v = h.resolve()
    try:
        v[...] = v
        writable = True
    except ValueError:
        writable = False
    return {
        "bytes": v.tobytes(order="A"),
        "dtype": v.dtype,
        "shape": v.shape,
        "f_order": bool(v.flags.f_contiguous and not v.flags.c_contiguous),
        "owns_data": bool(v.flags.owndata),
        "writable": writable,
        "same_buffer": h.resolve().__array_interface__["data"][0] == v.__array_interface__["data"][0],
    }


def test_every_source_kind_and_dtype_reaches_tasks_as_read_only_views(comm, shared_dir, on_rank0):
    on_rank0(lambda: write_inputs(shared_dir))

    def main(client, inputs):
        names = sorted(inputs)
        seen = client.gather(client.map(describe_view, [inputs[n] for n in names], pure=False))
        return dict(zip(names, seen))

    result = hpcshare.run(main, sources(shared_dir), **QUIET)
    if comm.rank != 1:
        assert result is None
        return
    for name, want in expected_arrays().items():
        got = result[name]
        assert got["dtype"] == want.dtype, name
        assert got["shape"] == want.shape, name
        assert got["bytes"] == want.tobytes(order="A"), name
        assert got["f_order"] == (name == "fortran"), name
        assert not got["writable"] and not got["owns_data"] and got["same_buffer"], name


def mapping_of(h):
    """Runs anywhere: (host, device:inode) of the shared mapping that holds input ``h``."""
    addr = h.resolve().__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return socket.gethostname(), f"{fields[3]}:{fields[4]}", os.getpid()
    raise AssertionError("view not found in /proc/self/maps")


def test_two_emulated_nodes_hold_one_copy_each(comm):
    # 5 ranks, 3 per node: node 0 = ranks 0-2 (scheduler, client, a worker), node 1 = ranks 3-4
    def main(client, inputs):
        h = inputs["x"]
        per_worker = client.run(mapping_of, h)
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        total = client.submit(np.sum, h).result()
        return mapping_of(h), {names[a]: m for a, m in per_worker.items()}, total

    result = hpcshare.run(
        main, {"x": lambda: np.arange(1 << 20, dtype=np.float64)}, ranks_per_node=3, **QUIET
    )
    if comm.rank == 1:
        client_map, workers, total = result
        assert total == np.arange(1 << 20, dtype=np.float64).sum()
        assert sorted(workers) == ["rank-2", "rank-3", "rank-4"]
        assert len({m[2] for m in workers.values()}) == 3  # three processes
        assert workers["rank-2"][1] == client_map[1]  # node 0 shares one mapping
        assert workers["rank-3"][1] == workers["rank-4"][1]  # node 1 shares one mapping
        assert workers["rank-3"][1] != client_map[1]  # two nodes, two copies


def transfer_totals(dask_worker):
    return dask_worker.transfer_outgoing_bytes_total, dask_worker.state.transfer_incoming_count_total


def checksum(h, k):
    return float(np.sum(h.resolve()[k::7]))


def test_no_input_bytes_move_between_dask_processes_and_graphs_stay_small(comm):
    nbytes = 32 * 2**20

    def main(client, inputs):
        h = inputs["big"]
        futures = client.map(checksum, [h] * 28, range(28), pure=False)
        sums = client.gather(futures)
        x = hpcshare.dask_array(h, chunks=2**20)
        graph = pickle.dumps(dict((x.mean() + x.std()).__dask_graph__()))
        stats = (x.mean() + x.std()).compute()
        shifted = float((x[:-1] * x[1:]).sum().compute())  # misaligned chunks move between tasks
        chunks = client.gather(client.compute(list(x.to_delayed().ravel())))  # chunks travel to the client
        moved = client.run(transfer_totals)
        whole_ok = all(isinstance(c, SharedChunk) for c in chunks) and np.array_equal(
            np.concatenate(chunks), h.resolve()
        )
        return sums, len(graph), stats, shifted, whole_ok, moved

    result = hpcshare.run(main, {"big": lambda: np.linspace(0, 1, nbytes // 8)}, **QUIET)
    if comm.rank == 1:
        sums, graph_bytes, stats, shifted, whole_ok, moved = result
        data = np.linspace(0, 1, nbytes // 8)
        assert np.allclose(sums, [data[k::7].sum() for k in range(28)])
        assert np.isclose(stats, data.mean() + data.std())
        assert np.isclose(shifted, (data[:-1] * data[1:]).sum())
        assert whole_ok
        assert sum(n for _, n in moved.values()) > 0  # chunks did travel, as references
        assert graph_bytes < 64 * 1024, graph_bytes
        outgoing = sum(b for b, _ in moved.values())
        # only task results (floats, partial sums) leave a worker: far less than one chunk
        assert outgoing < 2**20 // 4, moved


def test_handles_work_with_submit_map_delayed_and_as_arrays(comm):
    def add(h, k):
        return float(np.asarray(h)[k])

    def main(client, inputs):
        h = inputs["v"]
        a = client.submit(add, h, 3).result()
        b = client.gather(client.map(add, [h] * 3, [0, 1, 2]))
        c = dask.delayed(add)(h, 5).compute()
        d = float(hpcshare.dask_array(h, chunks=4)[6:9].sum().compute())
        x, y = hpcshare.dask_array(h, chunks=2), hpcshare.dask_array(h, chunks=5)
        e = float((x.sum() + y.sum()).compute())  # two chunkings of one input are two arrays
        f = dask.array.concatenate([x, y]).compute().tolist()
        return a, b, c, d, e, f, h.shape, h.dtype

    result = hpcshare.run(main, {"v": lambda: np.arange(10.0) * 2}, **QUIET)
    if comm.rank == 1:
        v = [float(i) * 2 for i in range(10)]
        assert result == (6.0, [0.0, 2.0, 4.0], 10.0, 12.0 + 14.0 + 16.0, 180.0, v + v, (10,), np.dtype("f8"))


def test_a_failing_main_fails_every_rank(comm):
    def main(client, inputs):
        raise ValueError("bad parameter 42")

    t = time.monotonic()
    with pytest.raises(JobFailed, match="ValueError: bad parameter 42"):
        hpcshare.run(main, {"v": lambda: np.arange(10.0)}, **QUIET)
    assert time.monotonic() - t < 60


def test_sys_exit_in_main_is_a_success_with_0_and_a_job_failed_with_its_code_otherwise(comm):
    import sys

    def leave(code):
        def main(client, inputs):
            sys.exit(code)

        return main

    assert hpcshare.run(leave(0), {"v": lambda: np.arange(10.0)}, **QUIET) is None  # returns normally
    with pytest.raises(JobFailed, match=r"called sys.exit\(4\)") as info:
        hpcshare.run(leave(4), {"v": lambda: np.arange(10.0)}, **QUIET)
    assert info.value.exit_code == 4  # on every rank


def test_a_bad_input_fails_every_rank_with_its_name(comm, shared_dir):
    with pytest.raises(InputError, match=r"input 'lut'.*does not exist"):
        hpcshare.run(
            lambda c, i: None, {"ok": lambda: np.ones(3), "lut": shared_dir / "missing.npy"}, **QUIET
        )
    # the job after a failed one starts normally
    assert hpcshare.run(lambda c, i: 7, {"ok": lambda: np.ones(3)}, **QUIET) == (
        7 if comm.rank == 1 else None
    )


def test_handles_from_an_ended_job_fail_loudly(comm):
    result = hpcshare.run(lambda client, inputs: inputs["v"], {"v": lambda: np.arange(5.0)}, **QUIET)
    if comm.rank == 1:
        with pytest.raises(ResolveError, match=r"input 'v'.*has ended"):
            result.resolve()


def _job_state():
    """What the job running in this process holds (runs on every Dask process through client.run)."""
    from hpcshare import context

    job = context.current()
    return job.generation, sorted(job.arrays), sorted(job.objects), job.exchange is not None


def test_a_second_run_in_the_same_process_starts_from_a_clean_state(comm):
    from dask.sizeof import sizeof

    from hpcshare import context

    dasks_own = sizeof.dispatch(np.ndarray)

    def first(client, inputs):
        arr, frame = hpcshare.put(np.arange(10.0)), hpcshare.put(pd.DataFrame({"x": [1.0, 2.0]}))
        sums = client.gather(
            [
                client.submit(
                    lambda a, f, w: float(a.resolve().sum() + f.resolve()["x"].sum()), arr, frame, w
                )
                for w in range(6)
            ]
        )
        return arr, frame, sums

    got = comm.bcast(hpcshare.run(first, {"v": lambda: np.arange(5.0)}, **QUIET), root=1)
    old_put, old_frame, sums = got
    assert sums == [48.0] * 6
    # on every rank, once the first job has ended: no job, Dask's own sizeof back
    assert context.current() is None
    assert sizeof.dispatch(np.ndarray) is dasks_own

    def second(client, inputs):
        def resolve_old(h):
            try:
                h.resolve()
            except hpcshare.ResolveError as exc:
                return str(exc)
            return "resolved"

        old = client.gather([client.submit(resolve_old, h, pure=False) for h in (old_put, old_frame)])
        return old, _job_state(), client.run(_job_state), client.run_on_scheduler(_job_state)

    old, mine, workers, scheduler = hpcshare.run(second, {"w": lambda: np.ones(3)}, **QUIET) or (
        None,
        None,
        None,
        None,
    )
    if comm.rank == 1:
        assert all("has ended" in message for message in old), old
        generation = mine[0]
        assert generation != old_put.generation
        for state in [mine, scheduler, *workers.values()]:
            # only this job's input, none of the first job's arrays or objects; the put service is running
            assert state == (generation, ["w"], [], True), state


def test_waiting_ranks_do_not_spin_during_placement(comm):
    from hpcshare import context
    from hpcshare.config import JobConfig
    from hpcshare.loaders import Fill, source_for
    from hpcshare.placement import place_inputs
    from hpcshare.topology import Topology

    def slow():
        def fill(out):
            time.sleep(2.0)
            out[:] = 1

        return Fill((1000,), "f8", fill)

    with context.running(context.JobContext(generation="gen")), Topology.create(comm) as topo:
        cpu, wall = time.process_time(), time.monotonic()
        placement = place_inputs(topo, [source_for("slow", slow)], JobConfig.from_options(quiet=True), "gen")
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert float(placement.handles["slow"].resolve().sum()) == 1000.0
        placement.free()
    assert wall >= 2.0
    if comm.rank != 0:
        assert cpu < 0.1 * wall, f"rank {comm.rank} used {cpu:.2f} s of CPU waiting {wall:.2f} s"


def failing_fill():
    def fill(out):
        out[: out.size // 2] = 1  # touch the window, then fail
        raise OSError("disk quota exceeded")

    return hpcshare.Fill((1 << 20,), "f8", fill)


def test_a_failed_placement_frees_its_windows_and_names_the_input(comm):
    from hpcshare.windows import kept_mapped

    before = kept_mapped()
    with pytest.raises(InputError, match=r"input 'big'.*failed with OSError: disk quota exceeded"):
        hpcshare.run(lambda c, i: None, {"big": failing_fill}, **QUIET)
    assert kept_mapped() == before  # the failed input's window was freed, not kept mapped


@pytest.mark.parametrize(
    "source, words",
    [
        (lambda: hpcshare.Fill((-5,), "f8", lambda out: None), "dimensions must be 0 or more"),
        (lambda: hpcshare.Fill((2**40, 2**40), "f8", lambda out: None), "more than any machine can map"),
        (lambda: np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]), "masked array"),
        (lambda: np.array([{}, []], dtype=object), "dtype object"),
    ],
)
def test_function_sources_that_cannot_be_placed_are_refused(comm, source, words):
    with pytest.raises(InputError, match=words):
        hpcshare.run(lambda c, i: None, {"bad": source}, **QUIET)


def test_a_zero_d_input_works_as_a_dask_array(comm):
    def main(client, inputs):
        return float(hpcshare.dask_array(inputs["z"]).compute()), float(
            (hpcshare.dask_array(inputs["z"]) * 2).compute()
        )

    result = hpcshare.run(main, {"z": lambda: np.array(2.5)}, **QUIET)
    if comm.rank == 1:
        assert result == (2.5, 5.0)


def test_run_without_main_runs_the_demo(comm):
    from hpcshare.demo import demo_input

    result = hpcshare.run(None, {"data": lambda: demo_input(2**20)}, **QUIET)
    if comm.rank == 1:
        assert sorted(result) == [1, 2, 3, 4]


def test_run_without_main_takes_the_demo_options_the_cli_has(comm):
    result = hpcshare.run(None, demo_size="1MiB", demo_tasks=3, **QUIET)
    if comm.rank == 1:
        assert sorted(result) == [1, 2, 3]
    with pytest.raises(hpcshare.ConfigError, match="demo_size are for the demo job"):
        hpcshare.run(lambda client, inputs: None, demo_size="1MiB", **QUIET)
