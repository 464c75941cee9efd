"""hpcshare.codec: objects to one file's bytes and back over a read-only map, without copying buffers."""

from __future__ import annotations

import mmap

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hpcshare import InputError, codec, store

pytestmark = pytest.mark.dataframe  # CI runs these under pandas 2.x too


def as_shared(df):
    """``df`` as it comes back: categories of Python strings (pandas 2) become Arrow-backed."""
    out = df.copy()
    for name, col in out.items():
        if isinstance(col.dtype, pd.CategoricalDtype) and col.cat.categories.dtype == object:
            out[name] = col.cat.rename_categories(col.cat.categories.astype("string[pyarrow]"))
    return out


def round_trip(obj):
    enc = codec.encode(obj)
    mm = mmap.mmap(-1, enc.nbytes)
    enc.write_into(memoryview(mm))
    view = memoryview(mm).toreadonly()
    return codec.decode(view), enc, np.frombuffer(mm, np.uint8).ctypes.data


def frame(n):
    return pd.DataFrame(
        {
            "i": np.arange(n),
            "f": np.linspace(0, 1, n),
            "when": pd.date_range("2020", periods=n, freq="s"),
            "where": pd.date_range("2020", periods=n, freq="s", tz="Europe/Paris"),
            "lag": pd.to_timedelta(np.arange(n), unit="s"),
            "cat": pd.Categorical(np.array(["a", "b"])[np.arange(n) % 2]),
            "I": pd.array(np.arange(n), dtype="Int64"),
            "s": pd.Series(np.array(["x", "yy"])[np.arange(n) % 2]).astype("string[pyarrow]"),
        }
    )


@pytest.mark.parametrize(
    "a",
    [
        np.arange(12.0).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        np.arange(20)[::3],  # not contiguous: made contiguous once
        np.zeros((0, 3)),
        np.array(3.5),
        np.zeros(3, dtype=[("a", "i4"), ("b", "f8", (2,))]),
        np.array(["ab", "c"]),
    ],
)
def test_arrays_come_back_equal_and_read_only(a):
    back, _, _ = round_trip(a)
    assert back.dtype == a.dtype and back.shape == a.shape and np.array_equal(back, a)
    assert not back.flags.writeable


def test_a_frame_keeps_every_buffer_out_of_the_pickle_datetimes_included():
    df = frame(200_000)
    back, enc, base = round_trip(df)
    pd.testing.assert_frame_equal(back, as_shared(df))
    assert len(enc.header) < 16 * 1024 < enc.nbytes // 100  # the pickle is metadata only
    for col in ("f", "when", "lag"):
        address = back[col].to_numpy().__array_interface__["data"][0]
        assert base <= address < base + enc.nbytes, col  # viewed in the map, not copied


@pytest.mark.skipif(
    not store.pandas_copies_on_write(),
    reason="pandas 2 without copy-on-write: resolve maps a private copy instead (tests/test_pandas.py)",
)
def test_writing_into_a_shallow_copy_leaves_the_shared_frame_alone():
    back, _, _ = round_trip(frame(10))
    with pytest.raises(ValueError, match="read-only"):
        back.loc[0, "f"] = 5.0
    mine = back.copy(deep=False)
    mine.loc[0, "f"] = 5.0
    assert mine.loc[0, "f"] == 5.0 and back.loc[0, "f"] == 0.0


def test_arrow_objects_come_back_as_the_same_type():
    t = pa.table({"a": np.arange(10), "l": pa.array([[1, 2]] * 10), "st": pa.array([{"x": 1}] * 10)})
    for obj in (t, t.to_batches()[0], t.column("l"), t.column("st").chunk(0), t.slice(3, 4)):
        back, _, _ = round_trip(obj)
        assert type(back) is type(obj) and back.equals(obj)


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        (pd.DataFrame({"ok": [1], "o": [object()]}), r"column 'o' \(position 1\) has dtype object"),
        (pd.DataFrame({"s": pd.Series(["a"], dtype="string[python]")}), r"column 's'.*Python str objects"),
        (pd.DataFrame({"x": [1]}, index=pd.Index([object()], dtype=object)), "the index has dtype object"),
        (np.array([1, "a"], dtype=object), "dtype object"),
        ({"a": 1}, r"cannot share builtins\.dict"),
        ([1, 2], r"cannot share builtins\.list"),
    ],
)
def test_python_objects_are_refused_by_name(obj, words):
    with pytest.raises(InputError, match=words):
        codec.encode(obj)
