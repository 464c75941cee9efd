"""Exceptions raised by hpcshare.

Every message says what was found, what was needed, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "ConfigError",
    "HpcshareError",
    "InputError",
    "JobFailed",
    "ResolveError",
    "TopologyError",
]


class HpcshareError(Exception):
    """Base class of every error hpcshare raises on purpose."""


class ConfigError(HpcshareError, ValueError):
    """An option or a command-line argument has a value hpcshare cannot use."""


class TopologyError(HpcshareError, RuntimeError):
    """The MPI world cannot host the job (too few ranks, singletons, ...)."""


class InputError(HpcshareError, ValueError):
    """An input source cannot be placed (missing file, bad dataset, bad dtype)."""


class CapacityError(HpcshareError, MemoryError):
    """A node has too little shared memory for the inputs."""


class ResolveError(HpcshareError, LookupError):
    """A handle cannot be resolved in this process."""


class JobFailed(HpcshareError, RuntimeError):
    """The job's ``main`` raised on the client rank; its traceback was printed there."""
