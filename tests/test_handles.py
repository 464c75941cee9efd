"""Handles (handles.py): small pickles, and what resolving outside a job says. No MPI."""

from __future__ import annotations

import pickle

import dask
import numpy as np
import pytest

from hpcshare import ArrayHandle, ResolveError


@pytest.mark.parametrize(
    "dtype",
    [
        np.float64,
        np.dtype(">i2"),
        np.bool_,
        np.dtype("S17"),
        np.dtype("U8"),
        np.dtype([("x", "f8"), ("y", "i4"), ("name", "S8"), ("v", "f4", (3,))]),
        np.dtype({"names": ["a", "b"], "formats": ["u1", "f8"], "offsets": [0, 8], "itemsize": 16}),
    ],
)
def test_handles_pickle_small_and_round_trip(dtype):
    h = ArrayHandle("grid", (10**6, 10**6), np.dtype(dtype), "F", "0123456789ab")
    data = pickle.dumps(h)
    assert len(data) <= 512
    back = pickle.loads(data)
    assert back == h and back.dtype == h.dtype and back.nbytes == h.nbytes
    assert dask.base.tokenize(back) == dask.base.tokenize(h)


def test_resolving_outside_a_job_names_the_input_and_why():
    h = ArrayHandle("lut", (4,), np.dtype("f8"), "C", "feedfeedfeed")
    with pytest.raises(ResolveError, match=r"input 'lut'.*no hpcshare job placed it"):
        h.resolve()
    with pytest.raises(ResolveError, match="lut"):
        np.asarray(h)
