"""The runtime: roles and lifetimes of one job, from placement to teardown.

Order of setup: topology, placement (one copy per node), Dask through
dask-mpi (rank 0 scheduler, rank 1 client running ``main``, other ranks
in-process workers). Teardown runs in reverse: Dask stops, the memory report
is measured, windows are freed, communicators are freed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import traceback
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from . import _sync
from .config import JobConfig
from .errors import ConfigError, HpcshareError, JobFailed
from .handles import Handle, _registry
from .loaders import source_for
from .placement import Placement, place_inputs
from .report import format_report, job_memory_total, measure_rank, summarize
from .topology import CLIENT_RANK, Topology, check_world

if TYPE_CHECKING:
    from distributed import Client
    from mpi4py import MPI

__all__ = ["abort", "load_main", "run"]

MainFunction = Callable[["Client", Mapping[str, Handle]], Any]


def _mpi_shm_files() -> list[str]:
    """Files in /dev/shm that this process maps and that still have a name."""
    found = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    found.add(path)
    except OSError:
        pass
    return sorted(found)


def abort(comm: MPI.Comm | None = None, code: int = 1) -> None:
    """End the whole MPI job now with ``code`` (local; does not return).

    Named shared-memory files this process maps are unlinked first, since
    ranks killed by an abort cannot remove them (MPICH leaves its
    ``mpich_shm_*`` segment behind otherwise). Other ranks keep their
    mappings until they exit.
    """
    unlink_shm_files()
    sys.stdout.flush()
    sys.stderr.flush()
    from mpi4py import MPI

    (comm or MPI.COMM_WORLD).Abort(code)


def unlink_shm_files() -> None:
    """Unlink the named shared-memory files this process maps (local, idempotent).

    The mappings stay valid; the memory is returned once every process that
    maps it has exited, whoever ends them.
    """
    for path in _mpi_shm_files():
        try:
            os.unlink(path)
        except OSError:
            pass


_current: Placement | None = None  # the running job's inputs in this process


def current_placement() -> Placement | None:
    """The inputs of the job running in this process, with placement timings (local)."""
    return _current


_reaper: subprocess.Popen[bytes] | None = None  # kept so it is not reaped (and warned about) early


def _start_reaper(topo: Topology) -> None:
    """Start the /dev/shm watcher for this host's ranks, once per process (collective on world)."""
    global _reaper
    pids = topo.host.gather(os.getpid(), root=0)
    if _reaper is not None or topo.host.Get_rank() != 0:
        return
    paths = _mpi_shm_files()
    if not paths or pids is None:
        return
    script = os.path.join(os.path.dirname(__file__), "_reaper.py")
    _reaper = subprocess.Popen(
        [sys.executable, "-I", script, ",".join(map(str, pids)), *paths],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _idle_comm(comm: MPI.Intracomm, timeout: float) -> MPI.Intracomm:
    """``comm`` with idle ``bcast`` and ``Barrier``, for dask-mpi's start-up handshake.

    dask-mpi's ranks wait in a blocking broadcast while the scheduler starts;
    with MPICH that spins a core per rank. Same handle, not a duplicate.
    """
    from mpi4py import MPI

    class IdleComm(MPI.Intracomm):
        def bcast(self, obj: Any = None, root: int = 0) -> Any:
            _sync.barrier(self, timeout=timeout, what="the Dask scheduler to start")
            return super().bcast(obj, root=root)

        def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
            _sync.barrier(self, timeout=timeout, what="the Dask cluster to start")

    return IdleComm(comm)


class _ViewGuard(WorkerPlugin):
    """Worker plugin: warn when a task's result is a view of a shared input.

    Dask's ``sizeof`` of such a view is its full size: the worker would count
    node-shared bytes as its own, and might spill or send them to another
    worker. Tasks should return derived results.
    """

    name = "hpcshare-view-guard"

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.warned: set[str] = set()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "memory":
            return
        data = getattr(self.worker.data, "fast", self.worker.data)
        try:
            value = data.get(key)
        except Exception:
            return
        if not isinstance(value, np.ndarray) or value.nbytes == 0:
            return
        if getattr(value, "_hpcshare_ref", None) is not None:
            return  # a dask_array chunk: it travels as a reference
        for name, (_, shared) in list(_registry.items()):
            if name not in self.warned and np.may_share_memory(value, shared):
                self.warned.add(name)
                warnings.warn(
                    f"task {key!r} returned a view of shared input {name!r}: Dask counts its "
                    f"{value.nbytes} bytes as this worker's memory and may copy them to other "
                    "workers. Return a derived result, or np.array(view) if a copy is meant.",
                    RuntimeWarning,
                    stacklevel=1,
                )


def _memory_limit(topo: Topology, config: JobConfig, shared: int) -> int:
    """Dask's memory limit for each worker (collective on the host communicator).

    Pages of the node's inputs that a worker touches count in its RSS, which
    Dask compares with fractions of the limit (spill at 0.7, pause at 0.8 by
    default). The limit is therefore the private budget plus the shared bytes
    divided by the lowest of those fractions: a worker is spilled or paused for
    its private memory only.
    """
    import dask.config

    workers_here = topo.host.allreduce(1 if topo.role == "worker" else 0)
    if config.memory_limit == 0:
        return 0  # Dask's convention: no limit
    if config.memory_limit is not None:
        private = config.memory_limit
    else:
        nodes_here = topo.host.allreduce(1 if topo.is_leader else 0)
        private = max(job_memory_total() - shared * nodes_here, 0) // max(workers_here, 1)
    fractions = [
        float(f)
        for f in (
            dask.config.get("distributed.worker.memory.spill"),
            dask.config.get("distributed.worker.memory.pause"),
        )
        if f not in (None, False) and 0 < float(f) <= 1
    ]
    return private + int(shared / min(fractions, default=1.0))


def _dashboard_hint(client: Any) -> str:
    """One line on how to reach the Dask dashboard from a laptop (local, on the client)."""
    port = client.scheduler_info().get("services", {}).get("dashboard")
    if not port:
        return "hpcshare: no Dask dashboard (it needs bokeh: pip install 'bokeh>=3.1')"
    host = client.run_on_scheduler(socket.gethostname)
    return (
        f"hpcshare: Dask dashboard on {host}:{port}; from your machine: "
        f"ssh -N -L {port}:{host}:{port} LOGIN-NODE, then open http://localhost:{port}/status"
    )


def _client_main(
    main: MainFunction, handles: Mapping[str, Handle], n_workers: int, config: JobConfig
) -> tuple[Any, BaseException | None]:
    """Run ``main`` on the client rank, then shut the cluster down (local)."""
    from distributed import Client

    result: Any = None
    error: BaseException | None = None
    try:
        client = Client(timeout=config.timeout)
    except Exception as exc:  # the scheduler is unreachable: nobody can stop it but an abort
        return None, HpcshareError(f"the client could not connect to the Dask scheduler: {exc}")
    try:
        client.wait_for_workers(n_workers, timeout=config.timeout)
        client.register_plugin(_ViewGuard(), name=_ViewGuard.name)
        if not config.quiet:
            print(_dashboard_hint(client), flush=True)
        try:
            result = main(client, dict(handles))
        except SystemExit as exc:
            error = JobFailed(f"the job's main called sys.exit({exc.code!r})")
        except BaseException as exc:  # KeyboardInterrupt too: the cluster must still stop
            traceback.print_exc()
            sys.stderr.flush()
            error = JobFailed(
                f"the job's main raised {type(exc).__name__}: {exc} (traceback above, from the client rank)"
            )
    except Exception as exc:
        error = exc
    finally:
        with contextlib.suppress(Exception):  # best effort: a dead worker only means more noise
            client.run(_quiet_dask_logs, on_error="ignore")
            client.run_on_scheduler(_quiet_dask_logs)
        _quiet_dask_logs()
        with contextlib.suppress(Exception):
            client.shutdown()
        client.close()
    return result, error


_DASK_LOGGERS = ("distributed", "tornado", "asyncio")


def _quiet_dask_logs() -> None:
    """Silence the tracebacks Dask logs while its comms close at the end of a job.

    Run on every Dask process (client, workers, scheduler) just before the
    shutdown: a worker whose heartbeat meets the closed scheduler logs a
    CommClosedError traceback that is not a failure. ``_run_dask`` restores
    the levels on every rank once Dask has stopped.
    """
    for name in _DASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run_dask(
    topo: Topology, config: JobConfig, main: MainFunction, placement: Placement
) -> tuple[Any, BaseException | None]:
    """Start Dask with dask-mpi, run ``main`` on the client, stop (collective on world)."""
    import dask
    from dask_mpi import initialize

    levels = {name: logging.getLogger(name).level for name in _DASK_LOGGERS}
    logging.getLogger("distributed").setLevel(config.dask_log_level.upper())
    limit = _memory_limit(topo, config, placement.nbytes)
    before = dask.config.get("scheduler-address", None)
    try:
        is_client = initialize(
            comm=_idle_comm(topo.world, config.timeout),
            exit=False,
            nthreads=config.nthreads,
            memory_limit=limit,
            dashboard_address=config.dashboard_address,
            worker_options={"name": f"rank-{topo.rank}"},
        )
        if is_client:
            return _client_main(main, placement.handles, topo.size - 2, config)
        return None, None
    except BaseException as exc:  # every rank must still reach the teardown
        return None, exc
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        dask.config.set({"scheduler-address": before})
        if before is None:
            dask.config.config.pop("scheduler-address", None)


def _report(topo: Topology, placement: Placement, config: JobConfig) -> None:
    """Measure every rank and print the memory report on world rank 0 (collective)."""
    mine = measure_rank(topo.rank, topo.hostname, topo.node_index, topo.role)
    _sync.barrier(topo.world, timeout=config.timeout, what="all ranks at the end of the job")
    ranks = topo.world.gather(mine, root=0)
    if topo.rank == 0 and not config.quiet and ranks:
        print(format_report(summarize(ranks, placement.nbytes), len(placement.inputs)), flush=True)


def load_main(main: MainFunction | str | os.PathLike[str] | None) -> MainFunction:
    """The job's ``main``: a callable, a JOBFILE path, or ``None`` for the demo (local).

    A JOBFILE is imported as module ``hpcshare_job`` on every rank, so the
    functions it defines can be sent to workers by reference; keep the work in
    ``main``, not at the file's top level.
    """
    if main is None:
        from .demo import demo_main

        return demo_main
    if callable(main):
        return main
    path = os.fspath(main)
    if not os.path.isfile(path):
        raise ConfigError(f"job file {path!r} does not exist (cwd {os.getcwd()})")
    spec = importlib.util.spec_from_file_location("hpcshare_job", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"job file {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hpcshare_job"] = module
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec.loader.exec_module(module)
    func = getattr(module, "main", None)
    if not callable(func):
        raise ConfigError(
            f"job file {path!r} defines no function main(client, inputs); add one: it runs "
            "on the client rank with a distributed.Client and a dict of input handles"
        )
    return func  # type: ignore[no-any-return]


def run(
    main: MainFunction | str | os.PathLike[str] | None = None,
    inputs: Mapping[str, Any] | None = None,
    *,
    comm: MPI.Intracomm | None = None,
    **options: Any,
) -> Any:
    """Place ``inputs`` once per node, start Dask, run ``main(client, handles)``.

    Collective: every rank of ``comm`` (default ``MPI.COMM_WORLD``) calls it
    with the same arguments. Rank 0 becomes the Dask scheduler, rank 1 the
    client that runs ``main``, every other rank an in-process worker.

    Parameters
    ----------
    main : callable(client, inputs), path, or None
        Runs on the client rank with a connected ``distributed.Client`` and a
        dict mapping each input name to its :class:`Handle`. A path names a
        JOBFILE defining ``main``; ``None`` runs the built-in demo job.
    inputs : mapping of str to SOURCE
        ``"path.npy"``, ``"path.h5:/dataset"``, ``"module:function"``,
        ``"path.py:function"``, or a callable returning an array or a
        :class:`~hpcshare.Fill`.
    comm : mpi4py.MPI.Intracomm, optional
        The job's ranks; at least 3.
    **options
        Any of :class:`~hpcshare.config.JobConfig`'s fields, e.g.
        ``ranks_per_node=3``; unset ones come from Dask config (``hpcshare.*``).

    Returns
    -------
    What ``main`` returned, on the client rank; ``None`` on the other ranks.

    Raises
    ------
    HpcshareError
        On every rank, with the same message, when the job cannot start or
        ``main`` raised (:class:`~hpcshare.JobFailed`). The shared memory is
        freed either way, unless arrays that view it are still referenced
        (then it stays mapped until the process exits, with a warning).
    """
    from mpi4py import MPI

    world = MPI.COMM_WORLD if comm is None else comm
    if main is None:  # the demo job, on its default input unless one named "data" is given
        from .demo import INPUT_NAME, demo_input

        inputs = {INPUT_NAME: demo_input, **(inputs or {})}
    with _sync.Collective(world):
        config = JobConfig.from_options(**options)
        check_world(world)
        job = load_main(main)
        sources = [source_for(name, src) for name, src in (inputs or {}).items()]
        if len({s.name for s in sources}) != len(sources):  # pragma: no cover - mapping keys are unique
            raise HpcshareError("input names must be unique")
    topo = Topology.create(world, config.ranks_per_node)
    try:
        _start_reaper(topo)
        generation = _sync.bcast(world, uuid.uuid4().hex[:12] if topo.rank == 0 else None)
        placement = place_inputs(topo, sources, config, generation)
        global _current
        _current = placement
        try:
            result, error = _run_dask(topo, config, job, placement)
            try:
                _report(topo, placement, config)
            except _sync.WaitTimeout as exc:
                if error is not None:
                    print(f"hpcshare: error: {error}", file=sys.stderr, flush=True)
                print(f"hpcshare: {exc}; aborting the job", file=sys.stderr, flush=True)
                abort(world, 1)
        finally:
            _current = None
            placement.free()
    finally:
        topo.free()
    _sync.agree(world, error)
    return result if topo.rank == CLIENT_RANK else None
