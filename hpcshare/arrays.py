"""Dask arrays over node-shared inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

    from .handles import Handle

__all__ = ["dask_array"]


def dask_array(handle: Handle, chunks: Any = "auto") -> da.Array:
    """A dask array whose chunks are slices of the node's shared view (local).

    The graph holds only the handle and the slices, never array data; each
    chunk task resolves the handle on the worker that runs it.

    Parameters
    ----------
    handle : Handle
        An input handle, as given to ``main``.
    chunks : int, tuple, str or dict
        Chunk sizes, as for :func:`dask.array.from_array`.
    """
    import dask.array as da

    from .handles import Handle

    if not isinstance(handle, Handle):
        raise TypeError(f"dask_array() takes an hpcshare Handle, got {type(handle).__name__}")
    return da.from_array(
        handle,
        chunks=chunks,
        name=f"hpcshare-{handle.name}-{handle.generation}",
        lock=False,
        asarray=False,
        fancy=False,
        inline_array=True,
        meta=np.empty((0,) * handle.ndim, dtype=handle.dtype),
    )
