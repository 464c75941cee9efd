"""How an array's bytes are laid out, in the compact form handles and node files record.

One home for the two facts every side needs: an array's memory order and
its dtype as plain, picklable text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib import format as _npformat

__all__ = ["dtype_from_text", "dtype_text", "memory_order"]


def memory_order(a: np.ndarray) -> str:
    """ "F" for an array laid out in Fortran order (and not also in C order), else "C" (local)."""
    return "F" if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def dtype_text(dtype: np.dtype) -> Any:
    """``dtype`` as a string, or a list of fields for a structured dtype (small, picklable)."""
    return dtype.str if dtype.fields is None else _npformat.dtype_to_descr(dtype)


def dtype_from_text(text: Any) -> np.dtype:
    """The dtype that :func:`dtype_text` gave ``text`` for."""
    return _npformat.descr_to_dtype(text)
