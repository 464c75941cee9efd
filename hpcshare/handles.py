"""Handles: small picklable names for node-shared inputs, resolved in place.

This module is the task path. It imports nothing from MPI: a handle resolves
by looking its name up in this process's registry, filled by the runtime when
the inputs were placed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
from typing import Any

import numpy as np
from numpy.lib import format as _npformat

from .errors import ResolveError

__all__ = ["Handle"]

_lock = threading.Lock()
# name -> (generation, read-only typed array over the node's window)
_registry: dict[str, tuple[str, np.ndarray]] = {}
# name -> generation of inputs that were placed here and have been freed
_freed: dict[str, str] = {}


def _register(name: str, generation: str, array: np.ndarray) -> None:
    array.flags.writeable = False
    with _lock:
        _registry[name] = (generation, array)
        _freed.pop(name, None)


def _unregister(name: str) -> None:
    with _lock:
        entry = _registry.pop(name, None)
        if entry is not None:
            _freed[name] = entry[0]


def _where() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


@dataclasses.dataclass(frozen=True)
class Handle:
    """A small, picklable name for one input that lives once per node.

    Pass it to tasks (``client.submit(f, handle)``, ``client.map``,
    ``dask.delayed``) instead of the data; inside the task call
    :meth:`resolve` or ``numpy.asarray(handle)`` to get a read-only, zero-copy
    view of the copy on the task's node. A handle never carries data.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    order: str  # "C" or "F"
    generation: str

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
        """The read-only, zero-copy view of this input on this node (local, no MPI).

        Raises
        ------
        ResolveError
            If this process does not hold the input: it ran outside an hpcshare
            job (a Nanny's child, a LocalCluster, a plain Python session), or the
            job that placed it has ended.
        """
        entry = _registry.get(self.name)
        if entry is None or entry[0] != self.generation:
            raise ResolveError(self._why_missing(entry))
        return entry[1]

    def _why_missing(self, entry: tuple[str, np.ndarray] | None) -> str:
        head = f"input {self.name!r} (generation {self.generation}) cannot be resolved in {_where()}: "
        if entry is not None:
            return head + (
                f"this process holds generation {entry[0]} of that name; the handle comes "
                "from an earlier job. Use the handles your current job received."
            )
        if self.name in _freed:
            return head + "the job that placed it has ended and its shared memory was freed."
        return head + (
            "no hpcshare job placed it in this process. Handles resolve only in the "
            "ranks of the job that placed them: run tasks on the job's in-process "
            "workers (no Nanny, no LocalCluster), started by `python -m hpcshare job` "
            "or hpcshare.run()."
        )

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
        dt = self.dtype.str if self.dtype.fields is None else _npformat.dtype_to_descr(self.dtype)
        return (_rebuild, (self.name, self.shape, dt, self.order, self.generation))

    def __dask_tokenize__(self) -> tuple[str, ...]:
        return ("hpcshare.Handle", self.name, self.generation)

    def __repr__(self) -> str:
        return f"Handle({self.name!r}, shape={self.shape}, dtype={self.dtype}, order={self.order!r})"


def _rebuild(name: str, shape: tuple[int, ...], dt: Any, order: str, generation: str) -> Handle:
    return Handle(name, tuple(shape), _npformat.descr_to_dtype(dt), order, generation)


def _sizeof_handle(h: Handle) -> int:
    return 256


try:  # let Dask's memory accounting know a handle is small
    from dask.sizeof import sizeof as _sizeof

    _sizeof.register(Handle)(_sizeof_handle)
except ImportError:  # pragma: no cover - dask is a dependency
    pass
