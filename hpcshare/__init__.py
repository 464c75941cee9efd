"""hpcshare: Dask on MPI ranks with large read-only inputs held once per node.

Inputs are placed once per node in MPI-3 shared memory before Dask starts;
tasks receive small :class:`Handle` objects and resolve them into read-only,
zero-copy NumPy views of their node's copy.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hpcshare")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

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
