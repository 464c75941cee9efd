"""Handles: small picklable names for node-shared inputs, resolved in place.

This module is the task path. It imports nothing from MPI: a handle resolves
by looking its name up in this process's registry, filled by the runtime when
the inputs were placed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from . import registry, store
from .anywhere import files as cluster_files
from .anywhere.resolve import resolve as resolve_on_cluster
from .errors import ResolveError
from .layout import dtype_from_text, dtype_text

__all__ = ["ArrayHandle", "Handle", "ObjectHandle"]


_USE_RESOLVE = (
    "a handle is a name for the data, not the data: call .resolve() in the task to get "
    "the object (data = h.resolve()), then use it"
)


class NotTheData(AttributeError, TypeError):
    """A handle used as if it were the data (an AttributeError too, so ``hasattr`` stays False)."""


class Handle:
    """A small, picklable name for one object held once per node.

    Pass it to tasks (``client.submit(f, handle)``, ``client.map``,
    ``dask.delayed``) instead of the data; inside the task call
    :meth:`resolve` to get the object, built zero-copy over the copy on the
    task's node. A handle never carries data. Handles of arrays are
    :class:`ArrayHandle` (``numpy.asarray(handle)`` works too); handles of
    DataFrames and Arrow objects from :func:`hpcshare.put` are
    :class:`ObjectHandle`.
    """

    __slots__ = ()
    name: str
    generation: str

    def resolve(self) -> Any:
        raise NotImplementedError

    def __dask_tokenize__(self) -> tuple[str, ...]:
        return ("hpcshare.Handle", self.name, self.generation)

    def __getattr__(self, attr: str) -> Any:
        # only for names a handle does not have: h.sum(), h.columns, h.loc
        if attr.startswith("_"):
            raise AttributeError(attr)
        raise NotTheData(f"{self!r} has no .{attr}: {_USE_RESOLVE}")


@dataclasses.dataclass(frozen=True)
class ArrayHandle(Handle):
    """The handle of an array: an input placed at launch, or one put while the job runs."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    order: str  # "C" or "F"
    generation: str
    stored: bool = False  #: put while the job runs (held in a node file, see hpcshare.store)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def resolve(self) -> np.ndarray:
        """The read-only, zero-copy view of this array on this node (local, no MPI).

        Raises
        ------
        ResolveError
            If this process does not hold the array: it ran outside an hpcshare
            job (a Nanny's child, a LocalCluster, a plain Python session), the
            job that placed it has ended, or it was freed (:func:`hpcshare.free`).
        """
        if cluster_files.is_cluster_generation(self.generation):
            view: np.ndarray = resolve_on_cluster(self, "ndarray")
            return view
        entry = registry.lookup(self.name)
        if entry is not None and entry[0] == self.generation:
            return entry[1]
        why = registry.freed_because(self.name, self.generation)
        if self.stored and entry is None and why is None and store.in_a_job():
            return store.attach_array(self)
        raise ResolveError(self._why_missing(entry, why))

    def _why_missing(self, entry: tuple[str, np.ndarray] | None, why: str | None) -> str:
        what = "array" if self.stored else "input"
        head = (
            f"{what} {self.name!r} (generation {self.generation}) cannot be resolved in {registry.where()}: "
        )
        if entry is not None:
            return head + (
                f"this process holds generation {entry[0]} of that name; the handle comes "
                "from an earlier job. Use the handles your current job received."
            )
        if why is not None:
            return head + why
        return head + registry.NOT_IN_A_JOB

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        view = self.resolve()
        if copy:
            return np.array(view, dtype=dtype, copy=True)
        if dtype is not None and np.dtype(dtype) != view.dtype:
            if copy is False:
                raise ValueError(
                    f"input {self.name!r} is {view.dtype}; a {np.dtype(dtype)} view would need a copy"
                )
            return view.astype(dtype)
        return view

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.resolve()[index]

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d input")
        return self.shape[0]

    def __reduce__(self) -> tuple[Any, ...]:
        # Compact pickle: a dtype goes as its string (or field list), not as an object.
        return (
            _rebuild,
            (self.name, self.shape, dtype_text(self.dtype), self.order, self.generation, self.stored),
        )

    def __dask_tokenize__(self) -> tuple[str, ...]:
        return ("hpcshare.Handle", self.name, self.generation)

    def __repr__(self) -> str:
        return f"Handle({self.name!r}, shape={self.shape}, dtype={self.dtype}, order={self.order!r})"


def _rebuild(
    name: str, shape: tuple[int, ...], dt: Any, order: str, generation: str, stored: bool = False
) -> ArrayHandle:
    return ArrayHandle(name, tuple(shape), dtype_from_text(dt), order, generation, stored)


@dataclasses.dataclass(frozen=True)
class ObjectHandle(Handle):
    """The handle of a pandas DataFrame or Series, or an Arrow Table, RecordBatch or Array.

    Made by :func:`hpcshare.put`; :meth:`resolve` builds the object over the
    node's copy. A pandas object comes back as a shallow copy whose column
    buffers are read-only and shared: assigning into it changes only that
    copy (pandas copy-on-write), never the node's.
    """

    name: str
    generation: str
    kind: str  #: "pandas" or "arrow"
    nbytes: int  #: bytes of the node copy
    summary: str  #: what was put, e.g. "DataFrame 2000000 x 11"

    def resolve(self) -> Any:
        """The object, built zero-copy over this node's copy (local, no MPI).

        Raises
        ------
        ResolveError
            Outside the job's ranks, after the job ended, or after
            :func:`hpcshare.free`.
        """
        if cluster_files.is_cluster_generation(self.generation):
            return resolve_on_cluster(self, self.kind)
        return store.attach_object(self)

    def __getitem__(self, key: Any) -> Any:
        raise TypeError(f"{self!r}[{key!r}]: {_USE_RESOLVE} (h.resolve()[{key!r}])")

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        raise TypeError(
            f"numpy.asarray({self!r}): {_USE_RESOLVE}; for a DataFrame column, h.resolve()[col].to_numpy()"
        )

    def __repr__(self) -> str:
        return f"ObjectHandle({self.name!r}, {self.summary}, nbytes={self.nbytes})"


@sizeof.register(Handle)
def _sizeof_handle(h: Handle) -> int:
    """Dask's memory accounting: a handle is small, whatever the object's size."""
    return 256
