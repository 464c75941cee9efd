"""Importing the user's code: a JOBFILE's ``main``, a source's ``path.py:function``."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, NotPythonFile

if TYPE_CHECKING:
    from distributed import Client

    from .handles import Handle

__all__ = ["JOB_MODULE", "MainFunction", "import_file", "load_main"]

MainFunction = Callable[["Client", Mapping[str, "Handle"]], Any]

#: the module name a JOBFILE is imported as, on every rank
JOB_MODULE = "hpcshare_job"


def import_file(path: str, module_name: str) -> ModuleType:
    """Import the Python file ``path`` as module ``module_name`` (local).

    The module is registered in ``sys.modules`` first, so functions it defines
    pickle by reference (``module_name.function``) and Dask can send them to
    workers that imported the same file under the same name. Exceptions from
    the file's top level propagate.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise NotPythonFile(f"{path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_main(main: MainFunction | str | os.PathLike[str]) -> MainFunction:
    """The job's ``main``: a callable, or a JOBFILE path defining it (local).

    A JOBFILE is imported as module ``hpcshare_job`` on every rank, so the
    functions it defines can be sent to workers by reference; keep the work in
    ``main``, not at the file's top level. Its folder goes on ``sys.path``, so
    it can import modules that lie beside it.
    """
    if callable(main):
        return main
    path = os.fspath(main)
    if not os.path.isfile(path):
        raise ConfigError(f"job file {path!r} does not exist (cwd {os.getcwd()})")
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = import_file(path, JOB_MODULE)
    except NotPythonFile:
        raise ConfigError(f"job file {path!r} is not a Python file") from None
    func = getattr(module, "main", None)
    if not callable(func):
        raise ConfigError(
            f"job file {path!r} defines no function main(client, inputs); add one: it runs "
            "on the client rank with a distributed.Client and a dict of input handles"
        )
    return func
