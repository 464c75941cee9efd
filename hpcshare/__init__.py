"""hpcshare: Dask on MPI ranks with large read-only inputs held once per node.

Inputs are placed once per node in MPI-3 shared memory before Dask starts;
tasks receive small :class:`Handle` objects and resolve them into read-only,
zero-copy NumPy views of their node's copy.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .arrays import dask_array
    from .frames import dask_dataframe
    from .handles import ArrayHandle, Handle, ObjectHandle
    from .loaders import Fill
    from .runtime import run
    from .sharing import free, put, submit

# The rest of the public names, loaded when first used: every rank of ``hpcshare job``
# imports this package before MPI starts, and the command's first steps (the supervisor's
# fork, MPI_Init) need none of Dask, numpy or the runtime (docs/architecture.md, "Start-up").
_LAZY = {
    "dask_array": "arrays",
    "dask_dataframe": "frames",
    "ArrayHandle": "handles",
    "Handle": "handles",
    "ObjectHandle": "handles",
    "Fill": "loaders",
    "run": "runtime",
    "free": "sharing",
    "put": "sharing",
    "submit": "sharing",
}

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
    """A public name loaded when first used, a submodule, or ``__version__`` read from the installed metadata.

    Reading the version parses the package's METADATA with the email
    package, ~10 ms of every rank's start-up otherwise.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("hpcshare")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            value = "0.0.0+unknown"
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # ``import hpcshare; hpcshare.sharing...`` as when this package loaded its modules eagerly
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "__version__"})
