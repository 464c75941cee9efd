"""hpcshare.put / submit / free on real ranks: 5 ranks as 2 emulated nodes.

Node 0 = ranks 0-2 (scheduler, client, worker rank-2), node 1 = ranks 3-4
(workers rank-3 and rank-4). Every test runs on every rank.
"""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import hpcshare
from hpcshare import CapacityError, InputError, ResolveError

JOB = {"quiet": True, "ranks_per_node": 3}
TINY = {"seed": lambda: np.zeros(1)}  # run() places at least one input


def frame(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "key": np.arange(n) % 5,
            "x": rng.random(n),
            "flag": np.arange(n) % 3 == 0,
            "when": pd.date_range("2024-01-01", periods=n, freq="min"),
            "where": pd.date_range("2024-01-01", periods=n, freq="h", tz="Europe/Berlin"),
            "lag": pd.to_timedelta(np.arange(n), unit="s"),
            "cat": pd.Categorical(np.array(["lo", "mid", "hi"])[np.arange(n) % 3]),
            "count": pd.array(np.where(np.arange(n) % 4 == 0, None, np.arange(n)), dtype="Int64"),
            "name": pd.Series(np.array(["ann", "bo", "cy"])[np.arange(n) % 3]).astype("string[pyarrow]"),
            "text": pd.Series(np.array(["x", "yy"])[np.arange(n) % 2]),  # pandas 3's default str
        },
        index=pd.RangeIndex(100, 100 + n),
    )


def create_data(n: int) -> pd.DataFrame:
    return frame(n)


def group_sum(h, k: int) -> float:
    df = h.resolve()
    return float(df.groupby("key")["x"].sum().iloc[k % 5]) * (k + 1)


def node_file_of(h) -> str:
    """Runs in a task: the file this process maps for ``h``, and its pid."""
    from hpcshare import shm, store

    h.resolve()
    path = store.path_of(h.name)
    assert path in shm.mapped_files(), "the resolved object must be a map of the node's file"
    return path


def put_files() -> list[str]:
    """The files in the job's private folder of put objects on this host."""
    from hpcshare import context

    return os.listdir(context.current().shm_dir)


def transfer_totals(dask_worker):
    return dask_worker.transfer_outgoing_bytes_total


def test_put_from_main_and_from_a_task_on_node_1_reach_both_nodes(comm):
    def made_on_node_1():
        return np.arange(12.0).reshape(3, 4) * 2

    def main(client, inputs):
        a = np.asfortranarray(np.arange(24, dtype=np.int32).reshape(4, 6))
        ha = hpcshare.put(a)
        hb = client.submit(hpcshare.put, made_on_node_1(), workers=["rank-3"], pure=False).result()
        seen = {
            w: client.submit(
                lambda h, g: (np.asarray(h).copy(), np.asarray(g).copy()), ha, hb, workers=[w], pure=False
            ).result()
            for w in ("rank-2", "rank-3", "rank-4")
        }
        files = {
            w: client.submit(node_file_of, hb, workers=[w], pure=False).result() for w in ("rank-2", "rank-4")
        }
        return a, ha, hb, seen, files

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        a, ha, hb, seen, files = result
        assert isinstance(ha, hpcshare.Handle) and ha.shape == (4, 6) and ha.order == "F"
        assert isinstance(hb, hpcshare.ArrayHandle) and hb.name.startswith("p3x")  # put on rank 3
        assert len(pickle.dumps(ha)) < 512
        for got_a, got_b in seen.values():
            assert np.array_equal(got_a, a) and np.array_equal(got_b, np.arange(12.0).reshape(3, 4) * 2)
        assert files["rank-2"].endswith("-n0") and files["rank-4"].endswith("-n1")  # one file per node


def test_the_seed_pattern_through_submit_moves_no_data_between_workers(comm):
    n = 200_000  # about 10 MB: any copy between workers would show

    def main(client, inputs):
        data = hpcshare.submit(client, create_data, n)
        futures = client.map(group_sum, [data] * 24, range(24), pure=False)
        sums = client.gather(futures)
        moved = client.run(transfer_totals)
        return data.result(), sums, moved

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        handle, sums, moved = result
        df = frame(n)
        assert isinstance(handle, hpcshare.ObjectHandle) and handle.nbytes > 5 * 2**20
        assert len(pickle.dumps(handle)) < 4096
        assert sums == pytest.approx(
            [float(df.groupby("key")["x"].sum().iloc[k % 5]) * (k + 1) for k in range(24)]
        )
        assert sum(moved.values()) < 2**20, moved  # task results and handles only


def test_frames_and_arrow_objects_round_trip_and_writes_stay_private(comm):
    table = pa.table(
        {
            "id": pa.array(np.arange(50)),
            "tags": pa.array([["a", "b"][: i % 3] for i in range(50)]),
            "point": pa.array([{"x": float(i), "y": -i} for i in range(50)]),
            "word": pa.array([f"w{i}" for i in range(50)]).dictionary_encode(),
        }
    )

    def writes(h):
        df = h.resolve()
        df.loc[df.index[0], "x"] = -1.0  # pandas copy-on-write: only this task's copy
        df["new"] = 1
        return float(df["x"].iloc[0])

    def first_x(h):
        return float(h.resolve()["x"].iloc[0])

    def read_only(h):
        df = h.resolve()
        return all(not np.asarray(df[c]).flags.writeable for c in ("x", "key"))

    def main(client, inputs):
        df, s = frame(), frame()["name"]
        handles = [
            hpcshare.put(o)
            for o in (
                df,
                s,
                table,
                table.to_batches()[0],
                table.column("tags"),
                table.column("point").chunk(0),
            )
        ]
        back = client.gather(
            [client.submit(lambda h: h.resolve(), h, workers=["rank-3"], pure=False) for h in handles]
        )
        wrote = client.submit(writes, handles[0], workers=["rank-2"], pure=False).result()
        after = [
            client.submit(first_x, handles[0], workers=[w], pure=False).result() for w in ("rank-2", "rank-3")
        ]
        ro = client.submit(read_only, handles[0], workers=["rank-4"], pure=False).result()
        return df, s, back, wrote, after, ro

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        df, s, back, wrote, after, ro = result
        pd.testing.assert_frame_equal(back[0], df)
        pd.testing.assert_series_equal(back[1], s)
        assert back[2].equals(table) and isinstance(back[2], pa.Table)
        assert back[3].equals(table.to_batches()[0]) and isinstance(back[3], pa.RecordBatch)
        assert back[4].equals(table.column("tags")) and isinstance(back[4], pa.ChunkedArray)
        assert back[5].equals(table.column("point").chunk(0)) and isinstance(back[5], pa.Array)
        assert wrote == -1.0
        assert after == [df["x"].iloc[0]] * 2  # the shared frame is unchanged on both nodes
        assert ro


def test_free_fails_later_resolves_on_both_nodes_but_a_held_view_keeps_its_values(comm):
    def hold(h):
        from distributed import get_worker

        get_worker()._hpcshare_test_view = h.resolve()  # a view a task keeps across free
        return True

    def held_sum():
        from distributed import get_worker

        return float(get_worker()._hpcshare_test_view.sum())

    def resolve_sum(h):
        return float(np.asarray(h).sum())

    def main(client, inputs):
        h = hpcshare.put(np.arange(1000.0))
        assert client.submit(hold, h, workers=["rank-3"], pure=False).result()
        hpcshare.free(h)
        errors = []
        for w in ("rank-2", "rank-3"):
            try:
                client.submit(resolve_sum, h, workers=[w], pure=False).result()
                errors.append(None)
            except ResolveError as exc:
                errors.append(str(exc))
        try:
            h.resolve()
            errors.append(None)
        except ResolveError as exc:
            errors.append(str(exc))
        kept = client.submit(held_sum, workers=["rank-3"], pure=False).result()
        left = [n for n in put_files() if n.startswith(f"{h.name}-")]
        return errors, kept, left

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        errors, kept, left = result
        assert all(e is not None and "freed" in e for e in errors), errors
        assert kept == np.arange(1000.0).sum()
        assert left == []  # every node's file is unlinked


def test_a_put_too_large_for_shared_memory_is_refused_before_anything_is_allocated(comm):
    free = shutil.disk_usage("/dev/shm").free
    headroom = max(free - 32 * 2**20, 0)  # leaves room for the tiny input, not for 64 MiB more

    def main(client, inputs):
        with pytest.raises(CapacityError) as info:
            hpcshare.put(np.zeros(8 * 2**20))  # 64 MiB
        left = put_files()
        return str(info.value), left

    result = hpcshare.run(main, TINY, shm_headroom=headroom, **JOB)
    if comm.rank == 1:
        message, left = result
        assert "numpy float64 array" in message.lower() or "float64 array" in message, message
        assert "64.00 MiB" in message and "free" in message, message
        assert left == []


def test_a_name_taken_on_another_node_fails_the_put_cleanly_and_touches_nothing_it_did_not_make(comm):
    def main(client, inputs):
        from hpcshare import context, store

        first = hpcshare.put(np.arange(10.0))
        assert len(first.name) > 16 and first.name != hpcshare.put(np.arange(10.0)).name  # random part
        folder = context.current().shm_dir
        taken = os.path.join(folder, "taken-n1")  # node 1's file of the next put's name, already there
        with open(taken, "wb") as f:
            f.write(b"not the job's object")
        new_name = store.new_name
        store.new_name = lambda rank: "taken"
        try:
            with pytest.raises(hpcshare.HpcshareError) as info:
                hpcshare.put(np.ones(100))
        finally:
            store.new_name = new_name
        left = sorted(put_files())
        with open(taken, "rb") as f:
            kept = f.read()
        os.unlink(taken)
        again = client.submit(lambda h: float(h.resolve().sum()), hpcshare.put(np.ones(100)), pure=False)
        return type(info.value), str(info.value), left, kept, again.result()

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        kind, message, left, kept, again = result
        assert kind is hpcshare.HpcshareError, (kind, message)  # neither a raw OSError nor a CapacityError
        assert "node 1" in message and "taken-n1 already exists" in message, message
        assert f"owned by uid {os.getuid()}" in message, message
        assert "taken-n0" not in left and "taken-n1" in left, left  # this put's own file is gone
        assert kept == b"not the job's object"  # the file it did not make is untouched
        assert again == 100.0  # later puts work


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_a_strided_array_is_put_without_a_private_copy(comm):
    def main(client, inputs):
        import threading

        base = np.arange(2 * 2**25, dtype=np.float64)  # 512 MiB, private to the client
        view = base[::2]  # 256 MiB of a non-contiguous view
        start, peak, done = _rss_anon(), [0], threading.Event()

        def sample():  # the putter's private memory, every few ms while the put runs
            while not done.is_set():
                peak[0] = max(peak[0], _rss_anon())
                done.wait(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            h = hpcshare.put(view)
        finally:
            done.set()
            sampler.join()
        checks = client.gather(
            [
                client.submit(lambda h, k: float(h.resolve()[k::4096].sum()), h, k, workers=[w], pure=False)
                for w, k in (("rank-2", 1), ("rank-3", 2), ("rank-4", 3))
            ]
        )
        want = [float(view[k::4096].sum()) for k in (1, 2, 3)]
        flags = client.submit(lambda h: h.resolve().flags.c_contiguous, h, workers=["rank-3"]).result()
        return (peak[0] - start) / 2**20, checks == want, flags

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        grew_mib, same, contiguous = result
        assert same and contiguous
        assert grew_mib < 64, f"the putter's private memory grew by {grew_mib:.0f} MiB for a 256 MiB view"


def test_a_broadcast_array_too_large_for_the_node_is_a_capacity_error_not_a_numpy_one(comm):
    def main(client, inputs):
        with pytest.raises(CapacityError) as info:  # numpy's own MemoryError is not a CapacityError
            hpcshare.put(np.broadcast_to(0.0, (2**40 // 8,)))  # 1 TiB, from 8 bytes
        return str(info.value)

    message = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        assert "1.00 TiB" in message, message


def test_python_objects_are_refused_naming_the_column(comm):
    def main(client, inputs):
        bad = pd.DataFrame({"ok": [1, 2], "payload": [{"a": 1}, None]})
        with pytest.raises(InputError, match=r"column 'payload'.*object"):
            hpcshare.put(bad)
        with pytest.raises(InputError, match=r"cannot share builtins\.dict"):
            hpcshare.put({"a": 1})
        return True

    assert hpcshare.run(main, TINY, **JOB) == (True if comm.rank == 1 else None)


def test_parquet_arrow_and_csv_inputs_are_placed_once_per_node(comm, shared_dir):
    df = pd.DataFrame(
        {"k": np.arange(300) % 7, "v": np.arange(300.0), "s": np.array(["a", "bb", "c"])[np.arange(300) % 3]}
    )
    if comm.rank == 0:
        import pyarrow.feather

        df.to_parquet(shared_dir / "t.parquet")
        df.to_csv(shared_dir / "t.csv", index=False)
        pyarrow.feather.write_feather(
            pa.Table.from_pandas(df, preserve_index=False), shared_dir / "t.arrow", compression="uncompressed"
        )
    comm.Barrier()
    inputs = {
        "pq": shared_dir / "t.parquet",
        "csv": str(shared_dir / "t.csv"),
        "frame": str(shared_dir / "t.arrow"),
        "table": f"{shared_dir}/t.arrow:table",
    }

    def main(client, handles):
        got = {
            name: client.submit(lambda h: h.resolve(), h, workers=["rank-4"], pure=False).result()
            for name, h in handles.items()
        }
        files = client.submit(node_file_of, handles["table"], workers=["rank-3"], pure=False).result()
        return got, files

    result = hpcshare.run(main, inputs, **JOB)
    if comm.rank == 1:
        got, files = result
        for name in ("pq", "csv", "frame"):
            pd.testing.assert_frame_equal(got[name], df, check_dtype=False)
            assert list(got[name].dtypes.astype(str))[:2] == ["int64", "float64"]
        assert isinstance(got["table"], pa.Table) and got["table"].equals(
            pa.Table.from_pandas(df, preserve_index=False)
        )
        assert files.endswith("-n1")


def test_a_missing_table_file_fails_every_rank_with_its_name(comm, shared_dir):
    with pytest.raises(InputError, match=r"input 'events'.*does not exist"):
        hpcshare.run(lambda c, i: None, {"events": shared_dir / "nope.parquet"}, **JOB)


def test_dask_counts_node_shared_objects_as_small(comm):
    def sizes(h):
        from dask.sizeof import sizeof

        obj = h.resolve()
        private = obj.copy() if hasattr(obj, "copy") else obj
        return (
            sizeof(h),
            sizeof(obj),
            sizeof(np.array(private) if isinstance(private, np.ndarray) else private),
        )

    def main(client, inputs):
        objects = (frame(100_000), np.arange(1_000_000.0), pa.table({"x": np.arange(1_000_000)}))
        return [
            client.submit(sizes, hpcshare.put(o), workers=["rank-3"], pure=False).result() for o in objects
        ]

    result = hpcshare.run(main, TINY, **JOB)
    if comm.rank == 1:
        for handle_size, shared_size, private_size in result[:2]:
            assert handle_size < 1024 and shared_size < 1024, result  # not this worker's memory
            assert private_size > 10**6, result  # a private copy still counts in full
        assert result[2][0] < 1024 and result[2][1] < 1024, result
