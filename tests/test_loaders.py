"""Input sources (loaders.py): which source a SOURCE names, and what a bad one is told. No MPI."""

from __future__ import annotations

import numpy as np
import pytest

from hpcshare import InputError
from hpcshare.loaders import FunctionSource, Hdf5Source, NpySource, source_for, split_range


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("a=data.npy", NpySource),
        ("grid=dir/data.h5:/group/grid", Hdf5Source),
        ("g=x.hdf5:/g", Hdf5Source),
        ("f=numpy.random:rand", FunctionSource),
        ("f=make.py:build", FunctionSource),
    ],
)
def test_sources_are_recognised(spec, kind):
    name, text = spec.split("=")
    src = source_for(name, text)
    assert isinstance(src, kind)
    assert src.name == name


def test_hdf5_path_and_dataset_are_split_at_the_last_colon():
    src = source_for("g", "/scratch/run:1/data.h5:/a/b")
    assert (src.path, src.dataset) == ("/scratch/run:1/data.h5", "/a/b")


@pytest.mark.parametrize(
    "spec, words",
    [
        (("x", "data.h5"), "no dataset"),
        (("x", "run:1/data.h5:group/x"), "absolute path in the file; write run:1/data.h5:/group/x"),
        (("x", "data.csv"), "cannot tell"),
        (("bad name", "data.npy"), "not valid"),
        (("x", ""), "non-empty string"),
        (("x", 42), "non-empty string"),
    ],
)
def test_bad_sources_say_what_to_write(spec, words):
    with pytest.raises(InputError, match=words):
        source_for(*spec)


def test_split_covers_everything_once_with_aligned_bounds():
    for total in (1, 7, 4096, 10**6 + 3):
        for n in (1, 2, 3, 8):
            parts = split_range(total, n, 64)
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
            assert all(a % 64 == 0 for a, _ in parts)
            assert len(parts) <= n
    assert split_range(0, 4, 64) == []


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        (lambda: {"a": 1}, "returned dict, not an array"),
        (lambda: None, "returned NoneType, not an array"),
        (lambda: (i for i in range(3)), "returned generator, not an array"),
        (lambda: [1, "a", 2.5], "returned list mixing float, int, str"),
    ],
)
def test_a_source_function_that_returns_no_array_is_told_what_it_returned(returned, words):
    from hpcshare.errors import InputError
    from hpcshare.loaders import source_for

    with pytest.raises(InputError, match=words) as err:
        source_for("x", returned).describe()
    assert "input 'x'" in str(err.value)


def test_a_source_function_returning_a_plain_list_of_numbers_still_works():
    from hpcshare.loaders import source_for

    meta = source_for("x", lambda: [1, 2, 3.5]).describe()
    assert meta.shape == (3,) and meta.dtype == np.float64
