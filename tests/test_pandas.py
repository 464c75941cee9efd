"""DataFrames as pandas 2 and 3 users make them: put, resolve, and the operations users run.

The resolve path (hpcshare.store) needs no MPI: each test holds its objects
in node files of a job this process joins, as a worker does. CI runs this
file under pandas 2.x and 3.x (``pytest -m dataframe``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hpcshare import InputError, codec, store

pytestmark = pytest.mark.dataframe

PANDAS_MAJOR = int(pd.__version__.split(".")[0])


def frame(n: int = 400) -> pd.DataFrame:
    """The columns users make under either major, the way they make them."""
    rng = np.random.default_rng(3)
    i = np.arange(n)
    return pd.DataFrame(
        {
            "key": i % 5,
            "x": rng.random(n),
            "n": (i % 7).astype(np.int32),
            "flag": i % 3 == 0,
            "when": pd.date_range("2024-01-01", periods=n, freq="37min"),
            "where": pd.date_range("2024-01-01", periods=n, freq="h", tz="Europe/Berlin"),
            "cat": pd.Categorical(np.array(["lo", "mid", "hi"])[i % 3]),  # object categories in pandas 2
            "count": pd.array(np.where(i % 4 == 0, None, i), dtype="Int64"),
            "name": pd.Series(np.array(["ann", "bo", "cy"])[i % 3]).astype("string[pyarrow]"),
        },
        index=pd.RangeIndex(100, 100 + n),
    )


def test_string_categoricals_are_shared_with_the_same_categories_and_codes(put):
    df = frame()
    h = put(df)
    back = h.resolve()
    for col in ("cat",):
        assert back[col].dtype == "category"
        assert list(back[col].cat.categories) == list(df[col].cat.categories)
        assert np.array_equal(back[col].cat.codes, df[col].cat.codes)
        assert back[col].cat.ordered == df[col].cat.ordered
        assert (back[col] == df[col]).all()
        assert back[col].cat.categories.dtype != object  # Arrow-backed: no Python objects
        assert store.views_node_memory(back[col].array.codes)  # codes read in place
    ordered = pd.Series(pd.Categorical(["b", "a", None, "b"], categories=["b", "a"], ordered=True))
    again = put(ordered).resolve()
    assert again.cat.ordered and list(again.cat.categories) == ["b", "a"]
    assert again.isna().tolist() == [False, False, True, False]
    assert put(pd.Series(pd.Categorical([3, 1, 3]))).resolve().cat.categories.tolist() == [1, 3]


def test_every_refused_column_is_named_in_one_error_with_its_fix():
    import datetime

    bad = pd.DataFrame(
        {
            "ok": [1.0, 2.0],
            "text": np.array(["a", "b"], dtype=object),
            "blob": np.array([{"a": 1}, {"a": 2}], dtype=object),
            "day": np.array([datetime.date(2024, 1, 1), None], dtype=object),
            "py": pd.array(["a", "b"], dtype="string[python]"),
            "odd": pd.Categorical([(1, 2), (3, 4)]),
        },
        index=pd.Index(["r1", "r2"], dtype=object),
    )
    bad["text"] = bad["text"].astype(object)  # pandas 3 would infer its str dtype
    with pytest.raises(InputError) as info:
        codec.encode(bad)
    message = str(info.value)
    assert "6 part(s)" in message, message
    for fix in (
        "df['text'] = df['text'].astype('string[pyarrow]')",
        "df['blob'] = pd.arrays.ArrowExtensionArray(pa.array(df['blob'].tolist()))",
        "df['day'] = df['day'].astype(pd.ArrowDtype(pa.date32()))",
        "df['py'] = df['py'].astype('string[pyarrow]')",
        "column 'odd' (position 5) is a categorical whose categories are Python objects",
        "df.index = df.index.astype('string[pyarrow]')",
    ):
        assert fix in message, message
    assert "'ok'" not in message  # a column that can be shared is not named
    # each fix works: applied, the frame is shared
    bad["text"] = bad["text"].astype("string[pyarrow]")
    bad["blob"] = pd.arrays.ArrowExtensionArray(pa.array(bad["blob"].tolist()))
    bad["day"] = bad["day"].astype(pd.ArrowDtype(pa.date32()))
    bad["py"] = bad["py"].astype("string[pyarrow]")
    bad["odd"] = bad["odd"].cat.rename_categories(bad["odd"].cat.categories.astype(str))
    bad.index = bad.index.astype("string[pyarrow]")
    codec.encode(bad)


def test_assignments_in_a_task_change_only_its_copy_without_any_setting(put):
    assert PANDAS_MAJOR >= 3 or pd.get_option("mode.copy_on_write") in (False, "warn")  # the default
    h = put(frame())
    before = h.resolve().copy(deep=True)

    df = h.resolve()
    df.loc[df["key"] == 1, "x"] = 0
    df.iloc[0, 1] = 42
    df["x"] += 1
    df["new"] = df["n"] * 2
    df.loc[df.index[3], "cat"] = "hi"
    df["count"] = df["count"].fillna(0)
    assert df["x"].iloc[0] == 43 and (df.loc[df["key"] == 1, "x"] == 1).all()
    assert "new" in df and df["cat"].iloc[3] == "hi"

    other = h.resolve()  # another task on this worker, or the same one again
    pd.testing.assert_frame_equal(other, before)
    s = put(before["x"]).resolve()
    s.iloc[0] = -5
    s += 1
    assert s.iloc[0] == -4
    assert put(before["x"]).resolve().iloc[0] == before["x"].iloc[0]


def small() -> pd.DataFrame:
    return pd.DataFrame({"key": [0, 1, 2, 9], "label": ["zero", "one", "two", "nine"]}).astype(
        {"label": "string[pyarrow]"}
    )


def _inplace(method, *args, **kwargs):
    def op(df):
        getattr(df, method)(*args, inplace=True, **kwargs)
        return df

    return op


# the pandas operations users run on a resolved frame: each is compared with the same
# operation on a private copy, and the shared copy is checked unchanged afterwards
OPERATIONS = {
    "groupby-agg": lambda df: df.groupby("key").agg(x=("x", "sum"), n=("n", "max"), c=("count", "mean")),
    "groupby-categorical": lambda df: df.groupby("cat", observed=True)["x"].mean(),
    "merge": lambda df: df.merge(small(), on="key", how="left"),
    "sort_values": lambda df: df.sort_values(["key", "x"], ascending=[True, False]),
    "sort_values-inplace": _inplace("sort_values", "x"),
    "rolling": lambda df: df["x"].rolling(5, min_periods=1).mean(),
    "filter": lambda df: df[(df["x"] > 0.5) & df["flag"]],
    "query": lambda df: df.query("x > 0.5 and key == 2"),
    "assign": lambda df: df.assign(y=df["x"] * 2, z=lambda d: d["y"] + d["n"]),
    "concat": lambda df: pd.concat([df, df.iloc[:10]]),
    "pivot_table": lambda df: df.pivot_table(
        index="key", columns="cat", values="x", aggfunc="sum", observed=True
    ),
    "value_counts": lambda df: df["cat"].value_counts(),
    "value_counts-frame": lambda df: df[["key", "flag"]].value_counts(),
    "describe": lambda df: df.describe(),
    "apply": lambda df: df[["x", "n"]].apply(lambda r: r["x"] * r["n"], axis=1),
    "str": lambda df: df["name"].str.upper() + df["name"].str.len().astype(str),
    "dt": lambda df: df["when"].dt.hour + df["where"].dt.tz_convert("UTC").dt.day,
    "astype": lambda df: df.astype({"key": "int32", "x": "float32", "cat": str}),
    "fillna": lambda df: df.fillna({"count": -1}),
    "fillna-inplace": _inplace("fillna", {"count": -1}),
    "set_index-inplace": _inplace("set_index", "key"),
    "drop-inplace": _inplace("drop", columns=["x"]),
    "numpy": lambda df: np.sqrt(df["x"].to_numpy()) + df["n"].to_numpy(),
    "cat-ops": lambda df: df["cat"].cat.add_categories(["new"]).cat.remove_unused_categories(),
}


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # pandas 3.1 deprecates it; users still write it
@pytest.mark.parametrize("op", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_pandas_operations_give_what_they_give_on_a_private_frame_and_leave_the_shared_copy(put, op):
    h = put(frame())
    before = h.resolve().copy(deep=True)  # a private frame of the same dtypes
    expected = op(before.copy(deep=True))
    got = op(h.resolve())
    assert type(got) is type(expected)
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    else:
        pd.testing.assert_series_equal(got, expected)
    pd.testing.assert_frame_equal(h.resolve(), before)


def test_a_handle_used_as_the_data_says_call_resolve(put):
    h = put(frame(10))
    for use in (lambda: h["x"], lambda: h.sum(), lambda: h.loc, lambda: np.asarray(h)):
        with pytest.raises(TypeError, match=r"call \.resolve\(\)"):
            use()
    assert not hasattr(h, "columns")  # hasattr stays False: the error is an AttributeError too
    assert h.resolve()["x"].sum() == frame(10)["x"].sum()  # the handle itself still works
