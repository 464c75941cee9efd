"""``hpcshare bench``: hpcshare against Dask, fork and Ray on the same workload.

- :mod:`.driver`: the inputs, one contender run at a time, the result;
- :mod:`.contenders`: each contender as its own program
  (``python -m hpcshare.bench.contenders``);
- :mod:`.overhead`: ``--overhead``, the job's own costs: start-up and tiny
  tasks, with TLS and without, with an input handle and without;
- :mod:`.placing`: ``--placement``, placement alone on 1 to 4 emulated nodes,
  collective against per-node reading (and its program under mpiexec);
- :mod:`.local`: ``--cluster local``, the seed pattern on a LocalCluster
  hpcshare did not start (its contender programs);
- :mod:`.scaling`: the placement cost model of docs/scaling.md, and its fit
  to the emulated sweep;
- :mod:`.sampling`: node memory of a run's process tree, measured from outside;
- :mod:`.rows`: :class:`BenchRow`, one run's figures;
- :mod:`.targets`: the project's targets, judged from the rows;
- :mod:`.output`: bench.json, the table and the plot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import BenchConfig, config_from_args, make_inputs, memory_needed, run_bench, run_one
    from .output import BenchResult
    from .rows import BenchRow
    from .targets import Target

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BenchRow",
    "Target",
    "config_from_args",
    "make_inputs",
    "memory_needed",
    "run_bench",
    "run_one",
]

_HOMES = {"BenchResult": "output", "BenchRow": "rows", "Target": "targets"}


def __getattr__(name: str) -> Any:
    """The benchmark loads when first used: the command line names it on every rank of every job."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES.get(name, 'driver')}", __name__), name)
