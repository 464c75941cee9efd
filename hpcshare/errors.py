"""Exceptions raised by hpcshare.

Every message says what was found, what was needed, and how to fix it.
"""

from __future__ import annotations

import traceback

__all__ = [
    "CapacityError",
    "ConfigError",
    "HpcshareError",
    "InputError",
    "JobFailed",
    "NotPythonFile",
    "NotShareable",
    "ResolveError",
    "TopologyError",
    "WaitTimeout",
    "describe",
    "exit_code_of",
]


class HpcshareError(Exception):
    """Base class of every error hpcshare raises on purpose."""


class ConfigError(HpcshareError, ValueError):
    """An option or a command-line argument has a value hpcshare cannot use."""


class TopologyError(HpcshareError, RuntimeError):
    """The MPI world cannot host the job (too few ranks, singletons, ...)."""


class InputError(HpcshareError, ValueError):
    """An input source cannot be placed (missing file, bad dataset, bad dtype)."""

    @classmethod
    def from_failure(cls, name: str, what: str, exc: BaseException) -> InputError:
        """``input NAME: WHAT TypeName: message (at file:line)``, for user code that raised ``exc``."""
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        if isinstance(exc, SystemExit):
            failure = (
                f"called sys.exit({exc.code!r}); a source cannot end the job, raise an exception instead"
            )
            what = what.removesuffix(" raised").removesuffix(" failed with")
        else:
            failure = f"{type(exc).__name__}: {exc}"
        return cls(f"input {name!r}: {what} {failure} (at {tb.filename}:{tb.lineno})")


class NotPythonFile(HpcshareError, ImportError):
    """A path given as Python code has no suffix Python can import (``.py``)."""


class NotShareable(InputError, TypeError):
    """An object, or columns of it, that cannot be held in shared memory (Python objects); names each."""


# MemoryError first: Dask unpickles exceptions with tblib, which calls the class's __new__, and
# with HpcshareError first that is MemoryError.__new__ on a class whose base is Exception: refused
class CapacityError(MemoryError, HpcshareError):
    """A node has too little shared memory for the inputs."""


class ResolveError(HpcshareError, LookupError):
    """A handle cannot be resolved in this process."""


class JobFailed(HpcshareError, RuntimeError):
    """The job's ``main`` raised on the client rank (its traceback was printed there), or called ``sys.exit(n)``.

    ``exit_code`` is what the command line exits with on every rank: ``n``
    for ``sys.exit(n)``, else 1.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # pickled with the instance's __dict__: every rank gets it (sync.agree)


def exit_code_of(exc: BaseException) -> int:
    """The exit code a job that failed with ``exc`` ends with: a JobFailed's own, else 1."""
    code = getattr(exc, "exit_code", 1)
    return code if isinstance(code, int) and 0 < code < 256 else 1


def describe(exc: BaseException) -> str:
    """``exc``'s message, or its type's name when it has none (``KeyboardInterrupt()``)."""
    return str(exc) or type(exc).__name__


class WaitTimeout(HpcshareError, TimeoutError):
    """A bounded wait for other ranks ran out of time (``hpcshare.timeout``, ``placement-timeout``)."""
