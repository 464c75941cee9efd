"""DataFrames in a real job, run as a user types it: 5 ranks as 2 emulated nodes.

One job file made the way a newcomer makes frames (``pd.Categorical`` of
strings, assignments in tasks, ``hpcshare.dask_dataframe``, table inputs, a
compressed Feather file); each check prints ``CHECK name value`` for the
test to read. CI runs it under pandas 2.x and 3.x (``pytest -m dataframe``).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from helpers import assert_clean_success, hpcshare, report_rows

pytestmark = [pytest.mark.dataframe, pytest.mark.usefixtures("clean_shm")]

JOB = r"""
import pickle
import warnings

import numpy as np
import pandas as pd

import hpcshare
from hpcshare import store


def made_like_a_newcomer(n):
    i = np.arange(n)
    return pd.DataFrame(
        {
            "key": i % 7,
            "x": np.linspace(0.0, 1.0, n),
            "n": i % 5,
            "when": pd.date_range("2024-01-01", periods=n, freq="min"),
            "cat": pd.Categorical(np.array(["lo", "mid", "hi"])[i % 3]),
        }
    )


def seed():
    return np.zeros(1000)


def check(name, value):
    print(f"CHECK {name} {value!r}", flush=True)


def assign_in_a_task(h):
    df = h.resolve()
    df.loc[df["key"] == 1, "x"] = 0.0
    df.iloc[0, 1] = 42.0
    df["x"] += 1
    df["new"] = df["n"] * 2
    return float(df["x"].iloc[0]), float(df.loc[df["key"] == 1, "x"].max()), int(df["new"].sum())


def shared_state(h):
    df = h.resolve()
    return float(df["x"].iloc[0]), float(df["x"].sum()), "new" in df, str(df["cat"].dtype)


def zero_copy(part):
    return pd.Series([store.views_node_memory(part)])


def return_a_view(h):
    return h.resolve().iloc[:1000]  # a pandas view of shared data: warned about


def sent(dask_worker):
    return dask_worker.transfer_outgoing_bytes_total


def main(client, inputs):
    n = 300_000
    df = made_like_a_newcomer(n)
    h = hpcshare.put(df)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = hpcshare.put(df)
    check("warned-put-twice", any("put before" in str(w.message) for w in caught))
    hpcshare.free(again)

    wrote = [client.submit(assign_in_a_task, h, workers=[w], pure=False).result() for w in ("rank-2", "rank-3")]
    check("wrote", wrote)
    after = [client.submit(shared_state, h, workers=[w], pure=False).result() for w in ("rank-2", "rank-3", "rank-4")]
    check("after", after)
    check("expected", (float(df["x"].iloc[0]), float(df["x"].sum()), False, "category"))

    ddf = hpcshare.dask_dataframe(h, npartitions=6)
    check("graph-bytes", len(pickle.dumps(dict(ddf.__dask_graph__()))))
    check("known-divisions", ddf.known_divisions)
    before = sum(client.run(sent).values())
    small = pd.DataFrame({"key": np.arange(7), "weight": np.arange(7) * 10.0})
    agg = ddf.groupby("key").agg({"x": "sum", "n": "max"}).compute()
    check("groupby", np.allclose(agg.sort_index()["x"], df.groupby("key")["x"].sum()))
    merged = ddf.merge(small, on="key", how="left")["weight"].sum().compute()
    check("merge", float(merged) == float(df.merge(small, on="key")["weight"].sum()))
    counts = ddf["cat"].value_counts().compute()
    check("value_counts", {str(k): int(v) for k, v in counts.items()} == {"lo": 100_000, "mid": 100_000, "hi": 100_000})
    check("map_partitions", bool(ddf.map_partitions(zero_copy, meta=(None, bool)).compute().all()))
    check("moved-bytes", sum(client.run(sent).values()) - before)
    ran_on = client.run(lambda dask_worker: dask_worker.state.executed_count)
    check("workers-ran", sorted(ran_on.values()))

    client.submit(return_a_view, h, workers=["rank-4"], pure=False).result()
    try:
        h["x"]
    except TypeError as exc:
        check("getitem", str(exc))
    try:
        np.asarray(h)
    except TypeError as exc:
        check("asarray", str(exc))
    try:
        hpcshare.free(df)
    except TypeError as exc:
        check("free-df", str(exc))
    tables = [client.submit(lambda t: t.resolve().num_rows if hasattr(t.resolve(), "num_rows") else len(t.resolve()), inputs[k], pure=False).result() for k in ("pq", "packed")]
    check("tables", tables)
"""


def checks(output: str) -> dict[str, object]:
    found = {}
    for name, value in re.findall(r"^CHECK (\S+) (.*)$", output, re.M):
        found[name] = eval(value, {})  # the reprs our own job printed
    return found


def test_frames_as_a_newcomer_makes_them_in_a_real_job(tmp_path):
    df = pd.DataFrame({"k": np.arange(2000) % 3, "v": np.arange(2000.0)})
    df.to_parquet(tmp_path / "t.parquet")
    df.to_feather(tmp_path / "packed.arrow")  # Feather's default: lz4
    (tmp_path / "job.py").write_text(JOB)
    run = hpcshare(
        5,
        "job",
        str(tmp_path / "job.py"),
        "--ranks-per-node",
        "3",
        "-i",
        f"pq={tmp_path / 't.parquet'}",
        "-i",
        f"packed={tmp_path / 'packed.arrow'}:table",
        "-i",
        f"seed={tmp_path / 'job.py'}:seed",
        timeout=300,
    )
    assert_clean_success(run)
    got = checks(run.stdout)
    x0, xsum, _, _ = got["expected"]
    # assignments change only the task's copy, under pandas 2 and 3, with nothing set
    assert got["wrote"] == [(43.0, 1.0, got["wrote"][0][2])] * 2, got["wrote"]
    assert [tuple(a) for a in got["after"]] == [(x0, pytest.approx(xsum), False, "category")] * 3, got[
        "after"
    ]
    assert got["warned-put-twice"] is True
    # dask_dataframe: a small graph, known divisions, every operation on the workers, nothing moved
    assert got["graph-bytes"] < 8 * 1024 and got["known-divisions"] is True
    assert got["groupby"] and got["merge"] and got["value_counts"] and got["map_partitions"]
    assert got["moved-bytes"] < 2 * 2**20, got["moved-bytes"]  # the frame is 12 MB: it did not travel
    assert all(ran > 0 for ran in got["workers-ran"]), got["workers-ran"]
    # the newcomer's findings
    assert "call .resolve()" in got["getitem"] and "call .resolve()" in got["asarray"]
    assert "got pandas" in got["free-df"] and "DataFrame" in got["free-df"] and len(got["free-df"]) < 300
    # a task returning a view is warned about, once; dask_dataframe's partitions are not
    assert run.stderr.count("views a node-shared object") == 1, run.stderr
    assert "task 'return_a_view-" in run.stderr, run.stderr
    assert "compressed Arrow/Feather file" in run.stderr and "compression='uncompressed'" in run.stderr
    assert got["tables"] == [2000, 2000]
    assert "placed table input 'pq'" in run.stderr and "placed table input 'packed'" in run.stderr
    assert "(3 input(s)" in run.stdout, run.stdout  # seed, pq and packed: table inputs are inputs
    rows = report_rows(run.stdout)
    assert len(rows) == 2 and rows[0]["inputs"] > 2000 * 16, run.stdout
