"""Dask DataFrames over node-shared frames and Arrow tables.

A partition of :func:`dask_dataframe` is a slice of rows of the node's
copy, made on the worker that runs it (``iloc[start:stop]``: a view, no
copy). The graph holds the handle and each partition's row range, never
data, so it is a few KiB whatever the frame's size.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

from . import context, registry, store
from .handles import ArrayHandle, ObjectHandle

if TYPE_CHECKING:
    import dask.dataframe as dd

__all__ = ["dask_dataframe", "is_partition", "row_ranges"]


def row_ranges(rows: int, npartitions: int | None = None, partition_rows: int | None = None) -> list[int]:
    """The first row of each partition, then ``rows`` (local; plain numbers).

    ``npartitions`` cuts ``rows`` into that many near-equal ranges;
    ``partition_rows`` into ranges of that many rows (the last may be
    shorter). An empty frame has one empty partition.
    """
    if (npartitions is None) == (partition_rows is None):
        raise ValueError("give one of npartitions= or partition_rows=")
    if npartitions is not None:
        if npartitions < 1:
            raise ValueError(f"npartitions must be at least 1, got {npartitions}")
        n = max(min(npartitions, rows), 1)
        return [rows * i // n for i in range(n)] + [rows]
    assert partition_rows is not None
    if partition_rows < 1:
        raise ValueError(f"partition_rows must be at least 1, got {partition_rows}")
    return [*range(0, rows, partition_rows), rows] if rows else [0, 0]


def _aligned(index: Any, bounds: list[int]) -> list[int]:
    """``bounds`` moved so that no index value is split between two partitions (a sorted index)."""
    inner = [int(index.searchsorted(index[b], side="left")) for b in bounds[1:-1]]
    return sorted({bounds[0], *inner, bounds[-1]})


def _divisions(index: Any, bounds: list[int]) -> tuple[Any, ...] | None:
    """Dask's divisions for partitions starting at ``bounds`` of a sorted ``index``, else None (unknown)."""
    if len(index) == 0 or not index.is_monotonic_increasing or index.hasnans:
        return None
    return (*(index[b] for b in bounds[:-1]), index[len(index) - 1])


def _as_pandas(obj: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a node-shared pandas or Arrow object, as pandas, without copying data."""
    import pandas as pd

    if isinstance(obj, pd.DataFrame | pd.Series):
        return obj.iloc[start:stop]
    import pyarrow as pa

    table = pa.Table.from_batches([obj]) if isinstance(obj, pa.RecordBatch) else obj
    part = table.slice(start, stop - start).to_pandas(types_mapper=pd.ArrowDtype, ignore_metadata=True)
    part.index = pd.RangeIndex(start, stop)
    return part


def _partition(part: tuple[ObjectHandle, int, int], columns: list[Any] | None = None) -> Any:
    """Partition ``part`` = (handle, first row, end row) on this node (local; a from_map function)."""
    handle, start, stop = part
    out = _as_pandas(handle.resolve(), start, stop)
    if columns is not None and hasattr(out, "columns"):
        out = out[list(columns)]
    key, partitions = id(out), registry.job().partitions
    partitions[key] = weakref.ref(out, lambda _: partitions.pop(key, None))
    store.count_as_shared(out)
    return out


def is_partition(obj: Any) -> bool:
    """Whether ``obj`` is a partition of :func:`dask_dataframe` made in this process (local)."""
    job = context.current()
    ref = None if job is None else job.partitions.get(id(obj))
    return ref is not None and ref() is obj


def dask_dataframe(
    handle: ObjectHandle, npartitions: int | None = None, partition_rows: int | None = None
) -> dd.DataFrame | dd.Series:
    """A dask DataFrame (or Series) whose partitions are slices of the node's copy (local).

    The graph holds only the handle and each partition's rows, never data;
    each partition task resolves the handle on the worker that runs it and
    slices it without copying. Divisions are known when the index is sorted
    (a RangeIndex, dates in order, ...): no partition splits an index value.
    An Arrow table gives Arrow-backed columns (``pd.ArrowDtype``, read in
    place) and a RangeIndex.

    Call it in ``main`` or in a task (the handle resolves there once, for
    the metadata and the index).

    Parameters
    ----------
    handle : ObjectHandle
        From :func:`hpcshare.put` or a table input placed at launch: a
        pandas DataFrame or Series, or an Arrow Table or RecordBatch.
    npartitions : int, optional
        How many partitions (near-equal rows).
    partition_rows : int, optional
        Rows per partition, instead of ``npartitions``.
    """
    import dask.dataframe as dd
    import pandas as pd

    if isinstance(handle, ArrayHandle):
        raise TypeError(
            "dask_dataframe() takes the handle of a DataFrame or table; for arrays use dask_array()"
        )
    if not isinstance(handle, ObjectHandle):
        raise TypeError(
            f"dask_dataframe() takes the ObjectHandle hpcshare.put returned, got {type(handle).__name__}"
        )
    obj = handle.resolve()
    if not isinstance(obj, pd.DataFrame | pd.Series) and type(obj).__name__ not in ("Table", "RecordBatch"):
        raise TypeError(
            f"dask_dataframe() takes the handle of a DataFrame, Series, Arrow Table or RecordBatch, "
            f"not of {handle.summary}"
        )
    rows = len(obj)
    bounds = row_ranges(rows, npartitions, partition_rows)
    meta = _as_pandas(obj, 0, 0)
    divisions = None
    if isinstance(obj, pd.DataFrame | pd.Series):
        if rows and obj.index.is_monotonic_increasing:
            bounds = _aligned(obj.index, bounds)
        divisions = _divisions(obj.index, bounds)
    elif rows:
        divisions = (*bounds[:-1], rows - 1)
    parts = [(handle, a, b) for a, b in itertools.pairwise(bounds)]
    del obj  # the client keeps no view of the node's copy
    return dd.from_map(
        _partition,
        parts,
        meta=meta,
        divisions=divisions,
        label=f"hpcshare-{handle.name}",
        enforce_metadata=False,
    )
