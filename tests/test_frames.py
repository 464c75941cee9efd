"""hpcshare.dask_dataframe in one process: row ranges, divisions, the graph's size, zero-copy partitions.

Real workers run it in tests/test_frames_job.py.
"""

from __future__ import annotations

import pickle

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import hpcshare
from hpcshare import store
from hpcshare.frames import _partition, row_ranges

pytestmark = pytest.mark.dataframe


def big(n: int = 2_000_000) -> pd.DataFrame:
    i = np.arange(n)
    return pd.DataFrame(
        {"key": i % 7, "x": np.linspace(0, 1, n), "cat": pd.Categorical(np.array(["a", "b"])[i % 2])},
        index=pd.RangeIndex(10, 10 + n),
    )


@pytest.mark.parametrize(
    ("rows", "kw", "bounds"),
    [
        (10, {"npartitions": 3}, [0, 3, 6, 10]),
        (10, {"partition_rows": 4}, [0, 4, 8, 10]),
        (2, {"npartitions": 5}, [0, 1, 2]),  # never an empty partition
        (0, {"npartitions": 3}, [0, 0]),
        (0, {"partition_rows": 3}, [0, 0]),
    ],
)
def test_row_ranges_cover_every_row_once(rows, kw, bounds):
    assert row_ranges(rows, **kw) == bounds


@pytest.mark.parametrize("kw", [{}, {"npartitions": 2, "partition_rows": 3}, {"npartitions": 0}])
def test_row_ranges_need_one_positive_size(kw):
    with pytest.raises(ValueError, match=r"npartitions|partition_rows"):
        row_ranges(10, **kw)


def test_the_graph_holds_handles_and_rows_only_and_divisions_are_known(put):
    df = big()
    h = put(df)
    ddf = hpcshare.dask_dataframe(h, npartitions=8)
    graph = pickle.dumps(dict(ddf.__dask_graph__()))
    assert df.memory_usage().sum() > 30 * 2**20
    assert len(graph) < 8 * 1024, len(graph)  # a few KiB for any size
    assert ddf.npartitions == 8 and ddf.known_divisions
    assert ddf.divisions[0] == 10 and ddf.divisions[-1] == 10 + len(df) - 1
    with dask.config.set(scheduler="sync"):
        pd.testing.assert_series_equal(
            ddf.groupby("key")["x"].sum().compute(), df.groupby("key")["x"].sum(), check_exact=False
        )
        assert ddf.loc[500_000:500_004].compute().index.tolist() == list(range(500_000, 500_005))
        assert len(ddf) == len(df)


def test_partitions_are_views_of_the_node_copy_counted_small_by_dask(put):
    from dask.sizeof import sizeof

    h = put(big(100_000))
    part = _partition((h, 1000, 51_000))
    assert len(part) == 50_000 and part.index[0] == 1010
    assert store.views_node_memory(part)  # zero-copy: the rows are the node file's
    assert sizeof(part) < 1024
    assert sizeof(part.copy()) > 5 * 10**5  # a private copy counts in full


def test_a_sorted_index_with_repeats_is_never_split_and_an_unsorted_one_gives_unknown_divisions(put):
    df = pd.DataFrame({"v": np.arange(12.0)}, index=[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3])
    ddf = hpcshare.dask_dataframe(put(df), npartitions=3)
    assert ddf.known_divisions
    with dask.config.set(scheduler="sync"):
        parts = [ddf.get_partition(i).compute().index.unique().tolist() for i in range(ddf.npartitions)]
        assert sorted(v for p in parts for v in p) == [1, 2, 3]  # each value in one partition only
        shuffled = hpcshare.dask_dataframe(put(df.iloc[::-1]), partition_rows=5)
        assert not shuffled.known_divisions and shuffled.npartitions == 3
        assert shuffled["v"].sum().compute() == df["v"].sum()


def test_a_series_and_an_arrow_table_become_dask_collections(put):
    s = pd.Series(np.arange(10.0), name="s")
    table = pa.table({"k": np.arange(10) % 3, "word": [f"w{i}" for i in range(10)]})
    with dask.config.set(scheduler="sync"):
        ds = hpcshare.dask_dataframe(put(s), npartitions=3)
        assert ds.sum().compute() == 45.0 and ds.name == "s"
        dt = hpcshare.dask_dataframe(put(table), partition_rows=4)
        assert dt.known_divisions and dt.divisions == (0, 4, 8, 9)
        got = dt.compute()
        assert got["word"].tolist() == [f"w{i}" for i in range(10)]
        assert isinstance(got["word"].dtype, pd.ArrowDtype)  # read in place, Arrow-backed
        assert dt["k"].value_counts().compute().sort_index().tolist() == [4, 3, 3]
    with pytest.raises(TypeError, match="dask_array"):
        hpcshare.dask_dataframe(hpcshare.ArrayHandle("a", (3,), np.dtype("f8"), "C", "g"), npartitions=1)
