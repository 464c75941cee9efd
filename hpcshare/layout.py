"""How an array's bytes are laid out, and the piece they are moved in.

One home for what every side needs: an array's memory order, its dtype as
plain, picklable text, and :data:`PIECE`, the most bytes read, copied or
sent in one step (placement's reads and broadcasts, a put's copy and its
messages between nodes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib import format as _npformat

__all__ = ["PIECE", "dtype_from_text", "dtype_text", "memory_order", "pieces"]

#: bytes read, copied or sent in one step: well under MPI's 2**31 count limit, large enough that
#: per-step costs vanish, small enough for progress lines and for overlapping a copy with its sending
PIECE = 64 * 2**20


def pieces(start: int, stop: int) -> list[tuple[int, int]]:
    """``range(start, stop)`` cut into ranges of at most :data:`PIECE` bytes (local; pure)."""
    return [(a, min(a + PIECE, stop)) for a in range(start, stop, PIECE)]


def memory_order(a: np.ndarray) -> str:
    """ "F" for an array laid out in Fortran order (and not also in C order), else "C" (local)."""
    return "F" if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def dtype_text(dtype: np.dtype) -> Any:
    """``dtype`` as a string, or a list of fields for a structured dtype (small, picklable)."""
    return dtype.str if dtype.fields is None else _npformat.dtype_to_descr(dtype)


def dtype_from_text(text: Any) -> np.dtype:
    """The dtype that :func:`dtype_text` gave ``text`` for."""
    return _npformat.descr_to_dtype(text)
