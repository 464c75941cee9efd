"""dask_array (arrays.py) without a job. No MPI."""

from __future__ import annotations

import numpy as np
import pytest

import hpcshare


def test_dask_array_refuses_non_handles():
    with pytest.raises(TypeError, match="Handle"):
        hpcshare.dask_array(np.zeros(3))


def test_a_shared_chunk_without_a_reference_travels_through_dask_as_its_bytes():
    from distributed.protocol import deserialize, serialize

    from hpcshare.arrays import SharedChunk

    chunk = np.arange(12.0).reshape(3, 4).view(SharedChunk)  # no handle behind it: sent as an array
    header, frames = serialize(chunk, serializers=("dask",))
    back = deserialize(header, frames)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, np.arange(12.0).reshape(3, 4))
