"""hpcshare: Dask on MPI ranks with large read-only inputs held once per node.

Inputs are placed once per node in MPI-3 shared memory before Dask starts;
tasks receive small :class:`Handle` objects and resolve them into read-only,
zero-copy NumPy views of their node's copy.
"""

from __future__ import annotations

from typing import Any

from .arrays import dask_array
from .errors import (
    CapacityError,
    ConfigError,
    HpcshareError,
    InputError,
    JobFailed,
    NotShareable,
    ResolveError,
    TopologyError,
    WaitTimeout,
)
from .frames import dask_dataframe
from .handles import ArrayHandle, Handle, ObjectHandle
from .loaders import Fill
from .runtime import run
from .sharing import free, put, submit

__all__ = [
    "ArrayHandle",
    "CapacityError",
    "ConfigError",
    "Fill",
    "Handle",
    "HpcshareError",
    "InputError",
    "JobFailed",
    "NotShareable",
    "ObjectHandle",
    "ResolveError",
    "TopologyError",
    "WaitTimeout",
    "__version__",
    "dask_array",
    "dask_dataframe",
    "free",
    "put",
    "run",
    "submit",
]


def __getattr__(name: str) -> Any:
    """``hpcshare.__version__``, read from the installed metadata when first asked for.

    Reading it parses the package's METADATA with the email package, ~10 ms
    of every rank's start-up otherwise.
    """
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("hpcshare")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found


def __dir__() -> list[str]:
    return sorted({*globals(), "__version__"})
