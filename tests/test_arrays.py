"""dask_array (arrays.py) without a job. No MPI."""

from __future__ import annotations

import numpy as np
import pytest

import hpcshare


def test_dask_array_refuses_non_handles():
    with pytest.raises(TypeError, match="Handle"):
        hpcshare.dask_array(np.zeros(3))
