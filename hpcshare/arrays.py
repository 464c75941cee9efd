"""Dask arrays over node-shared inputs.

A chunk of :func:`dask_array` is a :class:`SharedChunk`: a read-only view of
the node's copy that remembers which input and slice it is. When Dask moves
such a chunk to another worker or to the client, only that reference travels
and the receiver resolves it on its own node: no input bytes move between
Dask processes, and Dask does not count the node's shared bytes as a
worker's own memory.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.array_utils import byte_bounds as _byte_bounds

from .handles import ArrayHandle
from .layout import dtype_from_text, dtype_text

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["SharedChunk", "dask_array"]

# (handle, byte offset into the node's copy, shape, strides, dtype)
_Ref = tuple[ArrayHandle, int, tuple[int, ...], tuple[int, ...], Any]


def _plain(obj: Any) -> Any:
    """``obj`` with every SharedChunk in it (lists, tuples, dicts) turned into a plain ndarray view."""
    if isinstance(obj, SharedChunk):
        return obj.view(np.ndarray)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _window_bytes(handle: ArrayHandle) -> np.ndarray:
    """The node's copy of ``handle`` as flat bytes, in memory order (local)."""
    return handle.resolve().reshape(-1, order="A").view(np.uint8)


def _ref_for(arr: np.ndarray, handle: ArrayHandle) -> _Ref | None:
    """Where ``arr`` lies in the node's copy of ``handle``, or None if it does not."""
    base = _window_bytes(handle)
    lo = base.__array_interface__["data"][0]
    addr = arr.__array_interface__["data"][0]
    lo_b, hi_b = _byte_bounds(arr)
    if arr.size == 0 or lo_b < lo or hi_b > lo + base.nbytes:
        return None
    descr = dtype_text(arr.dtype)
    return (handle, addr - lo, arr.shape, arr.strides, descr)


def _from_ref(
    handle: ArrayHandle, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], descr: Any
) -> SharedChunk:
    """Rebuild a referenced view on this node's copy (local)."""
    dtype = dtype_from_text(descr)
    view = np.ndarray(shape, dtype, buffer=_window_bytes(handle), offset=offset, strides=strides)
    chunk = view.view(SharedChunk)
    chunk._hpcshare_ref = (handle, offset, shape, strides, descr)
    return chunk


class SharedChunk(np.ndarray):
    """A read-only view of a shared input that Dask moves as a reference.

    Chunks of :func:`dask_array` are SharedChunks, and so are their slices,
    transposes and field views: pickled or sent between Dask processes they
    become (handle, offset, shape, strides, dtype), and the receiver rebuilds
    the view on its own node's copy. Computations on them return plain NumPy
    arrays.
    """

    _hpcshare_ref: _Ref | None = None

    def __array_finalize__(self, obj: Any) -> None:
        parent = getattr(obj, "_hpcshare_ref", None)
        self._hpcshare_ref = None if parent is None else _ref_for(self, parent[0])

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return getattr(ufunc, method)(*_plain(inputs), **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _plain(func(*_plain(args), **_plain(kwargs)))

    def __reduce__(self) -> Any:
        if self._hpcshare_ref is not None:
            return (_from_ref, self._hpcshare_ref)
        return (np.array, (self.view(np.ndarray),))


def _chunk(
    handle: ArrayHandle, index: tuple[Any, ...], asarray: bool = True, lock: Any = None
) -> SharedChunk:
    """The chunk ``index`` of ``handle`` on this node (local; a dask array getter)."""
    view = handle.resolve()[index]
    if not isinstance(view, np.ndarray):  # a 0-d input: index () gives a scalar, not a view
        view = handle.resolve()[...]
    chunk = view.view(SharedChunk)
    chunk._hpcshare_ref = _ref_for(view, handle)
    return chunk


def dask_array(handle: ArrayHandle, chunks: Any = "auto") -> da.Array:
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

    if not isinstance(handle, ArrayHandle):
        raise TypeError(f"dask_array() takes an hpcshare Handle of an array, got {type(handle).__name__}")
    from dask.base import tokenize

    chunks = da.core.normalize_chunks(chunks, handle.shape, dtype=handle.dtype)
    return da.from_array(
        handle,
        chunks=chunks,
        name=f"hpcshare-{handle.name}-{tokenize(handle, chunks)}",
        lock=False,
        asarray=False,
        fancy=False,
        getitem=_chunk,
        inline_array=True,
        meta=np.empty((0,) * handle.ndim, dtype=handle.dtype),
    )


def _register_with_dask() -> None:
    from dask.sizeof import sizeof
    from distributed.protocol import dask_deserialize, dask_serialize

    @sizeof.register(SharedChunk)
    def _sizeof_chunk(x: SharedChunk) -> int:
        return 64 if x._hpcshare_ref is not None else int(x.nbytes)

    @dask_serialize.register(SharedChunk)
    def _serialize_chunk(x: SharedChunk) -> tuple[dict[str, Any], list[Any]]:
        if x._hpcshare_ref is not None:
            return {"hpcshare-ref": pickle.dumps(x._hpcshare_ref)}, []
        # imported when first needed: it loads numpy.ma, ~50 ms of every rank's start-up
        from distributed.protocol.numpy import serialize_numpy_ndarray

        return serialize_numpy_ndarray(x.view(np.ndarray))

    @dask_deserialize.register(SharedChunk)
    def _deserialize_chunk(header: dict[str, Any], frames: list[Any]) -> np.ndarray:
        if "hpcshare-ref" in header:
            return _from_ref(*pickle.loads(header["hpcshare-ref"]))
        from distributed.protocol.numpy import deserialize_numpy_ndarray

        return deserialize_numpy_ndarray(header, frames)


_register_with_dask()
