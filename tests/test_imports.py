"""The task path never imports MPI: a worker outside MPI (or a plain session) can unpickle and resolve handles."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def python(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_importing_hpcshare_and_resolving_a_handle_never_import_mpi4py():
    out = python(
        """
        import pickle, sys
        import numpy as np
        import hpcshare
        from hpcshare import handles
        print("import", "mpi4py" in sys.modules)
        h = pickle.loads(pickle.dumps(hpcshare.ArrayHandle("lut", (4,), np.dtype("f8"), "C", "g1")))
        print("unpickle", "mpi4py" in sys.modules)
        handles.register("lut", "g1", np.arange(4.0))
        print("resolve", h.resolve().sum() == 6.0 and np.asarray(h)[3] == 3.0, "mpi4py" in sys.modules)
        print("dask_array", float(hpcshare.dask_array(h).sum().compute(scheduler="sync")), "mpi4py" in sys.modules)
        """
    )
    assert out.splitlines() == [
        "import False",
        "unpickle False",
        "resolve True False",
        "dask_array 6.0 False",
    ]


def test_the_check_would_see_mpi4py_if_it_were_imported():
    # the same detection as above, on a process that does import MPI: the test above can fail
    out = python("import sys, hpcshare\nfrom mpi4py import MPI\nprint('mpi4py' in sys.modules)")
    assert out.strip() == "True"


@pytest.mark.parametrize(
    "module", ["hpcshare.handles", "hpcshare.store", "hpcshare.codec", "hpcshare.arrays"]
)
def test_task_path_modules_do_not_import_mpi4py(module):
    out = python(f"import sys, {module}\nprint('mpi4py' in sys.modules)")
    assert out.strip() == "False"
