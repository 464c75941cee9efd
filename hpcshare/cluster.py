"""The Dask side of a job: roles through dask-mpi, the client's ``main``, worker policies.

- :class:`DaskCluster`: a context manager around one run of dask-mpi
  (rank 0 scheduler, rank 1 client running ``main``, other ranks in-process
  workers); leaving it restores the loggers and Dask config it changed.
- :func:`idle_startup_comm`: the one shim over dask-mpi, so its start-up
  handshake waits idle and bounded instead of spinning a core per rank.
- :class:`ViewGuard`: a worker plugin that warns when a task returns a view
  of a shared input, or a pandas or Arrow object over a node-shared one.
- :func:`quiet_dask_logs`: silence the tracebacks Dask logs while its comms close.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from . import context, ending, store, sync
from .errors import HpcshareError, JobFailed, WaitTimeout
from .handles import Handle
from .memory import PrivateMemory
from .registry import registered_views
from .topology import role_of, world_ranks

if TYPE_CHECKING:
    from distributed import Client
    from mpi4py import MPI

    from .config import JobConfig
    from .importing import MainFunction
    from .security import CredentialsMaker
    from .topology import Topology

__all__ = [
    "DaskCluster",
    "ViewGuard",
    "exit_code",
    "idle_startup_comm",
    "quiet_dask_logs",
]

_DASK_LOGGERS = ("distributed", "tornado", "asyncio")


def idle_startup_comm(comm: MPI.Intracomm, timeout: float) -> MPI.Intracomm:
    """``comm`` with idle, bounded ``bcast`` and ``Barrier``, for dask-mpi's start-up handshake.

    dask-mpi's ranks wait in a blocking broadcast while the scheduler starts,
    then in a barrier; with MPICH each waiting rank would spin a core. The
    result is the same MPI handle (not a duplicate) whose two waits are
    :func:`hpcshare.sync.barrier` first, bounded by ``timeout``.
    """
    from mpi4py import MPI

    class _Idle(MPI.Intracomm):
        def bcast(self, obj: Any = None, root: int = 0) -> Any:
            sync.barrier(self, timeout=timeout, what="the Dask scheduler to start")
            return super().bcast(obj, root=root)

        def Barrier(self) -> None:  # noqa: N802 - mpi4py's name
            from .exchange import end_collective_phase

            sync.barrier(self, timeout=timeout, what="the Dask cluster to start")
            # then a blocking barrier, brief since every rank is nearly through: a rank that
            # left the idle one makes no MPI calls in Dask, and with MPICH's network module a
            # peer still waiting for its last barrier message would wait forever (seen once in
            # ~20 two-node Slurm runs); as in bcast and agree, the blocking step keeps all
            # ranks progressing until all are through
            super().Barrier()
            end_collective_phase()  # the handshake is over: puts may come from here on

    return _Idle(comm)


class ViewGuard(WorkerPlugin):
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
        value = self._result(key)
        if not isinstance(value, np.ndarray):
            self._check_table(key, value)
            return
        if value.nbytes == 0:
            return
        if getattr(value, "_hpcshare_ref", None) is not None:
            return  # a dask_array chunk: it travels as a reference
        for name, shared in registered_views():
            if name not in self.warned and np.may_share_memory(value, shared):
                self.warned.add(name)
                warnings.warn(
                    f"task {key!r} returned a view of shared input {name!r}: Dask counts its "
                    f"{value.nbytes} bytes as this worker's memory and may copy them to other "
                    "workers. Return a derived result, or np.array(view) if a copy is meant.",
                    RuntimeWarning,
                    stacklevel=1,
                )

    def _check_table(self, key: Any, value: Any) -> None:
        """Warn once per worker when a task's pandas or Arrow result views a node-shared object.

        Tasks of ``client.submit``, ``map`` and ``delayed``; not the partitions of
        dask collections (``dask_dataframe`` and what is computed from it).
        """
        from .frames import is_partition

        kind = type(value).__module__.split(".")[0]
        if kind not in ("pandas", "pyarrow") or "table" in self.warned:
            return
        if isinstance(key, tuple):  # a partition of a dask collection: its next task reads it here
            return
        if is_partition(value) or not store.views_node_memory(value):
            return  # dask_dataframe's partitions are meant to be views (counted small)
        self.warned.add("table")
        warnings.warn(
            f"task {key!r} returned a {type(value).__name__} that views a node-shared object: "
            "Dask copies it whenever it moves it (to another worker, to the client) and may count "
            "it as this worker's memory. Return a derived result (an aggregate, a filtered copy), "
            "or .copy() if a private copy is meant.",
            RuntimeWarning,
            stacklevel=1,
        )

    def _result(self, key: Any) -> Any:
        data = getattr(self.worker.data, "fast", self.worker.data)
        try:
            return data.get(key)
        except Exception:
            return None


def quiet_dask_logs() -> None:
    """Silence the tracebacks Dask logs while its comms close at the end of a job (local).

    Run on every Dask process (client, workers, scheduler) just before the
    shutdown: a worker whose heartbeat meets the closed scheduler logs a
    CommClosedError traceback that is not a failure. :class:`DaskCluster`
    restores the levels on every rank once Dask has stopped.
    """
    for name in _DASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


_QUIET_OP = "hpcshare-quiet-logs"  # the message that has a worker run quiet_dask_logs


class QuietOnRequest(WorkerPlugin):
    """Worker plugin: run :func:`quiet_dask_logs` when the scheduler sends :data:`_QUIET_OP`.

    The message comes on the worker's stream from the scheduler, which
    delivers it before the shutdown's ``close``; ``client.run`` would open
    a new (TLS) connection from the scheduler to every worker at the end of
    every job, ~0.2 s on a busy node.
    """

    name = "hpcshare-quiet-on-request"

    def setup(self, worker: Any) -> None:
        self.worker = worker
        worker.stream_handlers[_QUIET_OP] = self.quiet

    def quiet(self, **kwargs: Any) -> None:
        quiet_dask_logs()

    def teardown(self, worker: Any) -> None:
        worker.stream_handlers.pop(_QUIET_OP, None)


def _quiet_everywhere(dask_scheduler: Any) -> None:
    """On the scheduler: quiet its logs and ask every worker to quiet theirs, in order before the shutdown."""
    quiet_dask_logs()
    for address in list(dask_scheduler.workers):
        dask_scheduler.worker_send(address, {"op": _QUIET_OP})


def _task_executor(nthreads: int) -> Any:
    """The worker's task threads, where a task that calls ``sys.exit`` ends the job at once.

    distributed lets SystemExit out of a task on purpose, which takes the
    worker out of Dask silently while the job waits for it until its
    timeout. Here the job ends within a second instead, with one line naming
    the task, the rank and its host.
    """
    from distributed.threadpoolexecutor import ThreadPoolExecutor

    class GuardedThreadPoolExecutor(ThreadPoolExecutor):  # the name must say ThreadPoolExecutor
        def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return super().submit(_exit_guard, fn, args, kwargs)

    return GuardedThreadPoolExecutor(nthreads, thread_name_prefix="Dask-Default-Threads")


def _task_key(exc: BaseException) -> Any:
    """The key of the Dask task ``exc`` came out of (from distributed's frames), or "?"."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_run_task" and "key" in tb.tb_frame.f_locals:
            return tb.tb_frame.f_locals["key"]
        tb = tb.tb_next
    return "?"


def _exit_guard(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a task; SystemExit and KeyboardInterrupt, which distributed lets out of it, end the job.

    distributed turns every other BaseException of a task into the task's error.
    """
    try:
        return fn(*args, **kwargs)
    except (SystemExit, KeyboardInterrupt) as exc:
        from mpi4py import MPI

        if isinstance(exc, SystemExit):
            did, code = f"called sys.exit({exc.code!r})", exit_code(exc.code)
        else:
            did, code = "raised KeyboardInterrupt", 1
        print(
            f"hpcshare: error: task {_task_key(exc)!r} {did} on worker rank {MPI.COMM_WORLD.Get_rank()} "
            f"({socket.gethostname()}); a task cannot end its worker, raise an exception instead. "
            "Ending the job.",
            file=sys.stderr,
            flush=True,
        )
        ending.abort(code=code or 1)
        raise  # not reached


def exit_code(code: object) -> int:
    """The process exit code ``sys.exit(code)`` asks for: None is 0, a number itself, a message 1 (local)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def _wait_for_workers(client: Client, n_workers: int, timeout: float) -> None:
    """Until the scheduler has ``n_workers`` running workers (local, on the client; bounded by ``timeout``).

    Dask's ``Client.wait_for_workers`` asks the scheduler every 0.1 s; at a
    job's start the last worker registers a few milliseconds after one of
    those checks about as often as not, and every job waited up to 0.1 s
    more. Here the checks start 5 ms apart and slow down to Dask's 0.1 s;
    each asks for the running workers' thread counts only. Dask's call then
    confirms at its first check and updates the client's view of the
    scheduler.

    Raises
    ------
    WaitTimeout
        When fewer than ``n_workers`` are running after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while (running := len(client.sync(client.scheduler.ncores_running))) < n_workers:
        if time.monotonic() > deadline:
            raise WaitTimeout(
                f"only {running} of the {n_workers} Dask workers were running after {timeout:g} s "
                "(hpcshare.timeout): the others did not start or could not reach the scheduler"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)
    client.wait_for_workers(n_workers, timeout=max(deadline - time.monotonic(), 1.0))


def _dashboard_served(dask_scheduler: Any) -> tuple[str, str, bool]:
    """On the scheduler: its host, where its dashboard serves ("" for nowhere), whether bokeh is there."""
    import importlib.util

    http = dask_scheduler.services.get("dashboard")
    where = ""
    if http is not None and getattr(http, "_sockets", None):  # a closed server has no sockets left
        where = str(http.address) if str(http.address).startswith("/") else f"{http.address}:{http.port}"
    return socket.gethostname(), where, importlib.util.find_spec("bokeh") is not None


def _dashboard_hint(client: Client, config: JobConfig) -> str:
    """How to reach the Dask dashboard from a laptop, or that there is none (local, on the client)."""
    if not config.dashboard:
        return "hpcshare: no Dask dashboard (--dashboard serves one that only you can reach)"
    host, where, bokeh = client.run_on_scheduler(_dashboard_served)
    pages = (
        ""
        if bokeh
        else " (Dask's info pages only: the dashboard needs bokeh, pip install 'hpcshare[dashboard]')"
    )
    if not where:
        return "hpcshare: warning: no Dask dashboard: the scheduler could not serve it (see above)"
    if not where.startswith("/"):
        return (
            f"hpcshare: warning: the Dask dashboard{pages} listens on {where} on {host} (--dashboard-address) "
            "with no login: everyone who can reach that address sees the job's tasks, workers, their logs "
            "and call stacks; on localhost that is every user of the node. Leave out --dashboard-address "
            "to serve it on a Unix socket only you can reach."
        )
    return (
        f"hpcshare: Dask dashboard{pages} on {host}, on a Unix socket only you can reach; from your "
        f"machine: ssh -N -J LOGIN-NODE -L 8787:{where} {host}, then open http://localhost:8787/status"
    )


def _call_main(
    main: MainFunction, client: Client, handles: Mapping[str, Handle]
) -> tuple[Any, BaseException | None]:
    """``main(client, handles)``; what it raised, SystemExit and Ctrl-C included, as a JobFailed.

    ``sys.exit()`` and ``sys.exit(0)`` are a success; ``sys.exit(n)`` a
    JobFailed whose ``exit_code`` is n (the CLI's exit code on every rank).
    """
    try:
        return main(client, dict(handles)), None
    except SystemExit as exc:
        code = exit_code(exc.code)
        if code == 0:
            return None, None
        return None, JobFailed(f"the job's main called sys.exit({exc.code!r})", exit_code=code)
    except BaseException as exc:  # KeyboardInterrupt too: the cluster must still stop
        traceback.print_exc()
        sys.stderr.flush()
        return None, JobFailed(
            f"the job's main raised {type(exc).__name__}: {exc} (traceback above, from the client rank)"
        )


def _stop(client: Client) -> None:
    """Quiet every Dask process's shutdown logs, stop the scheduler and workers, close (local).

    One round trip to the scheduler, which passes the request to the workers
    on their streams (:class:`QuietOnRequest`) ahead of its ``close``.
    """
    with contextlib.suppress(Exception):  # best effort: a dead worker only means more noise
        client.run_on_scheduler(_quiet_everywhere)
    quiet_dask_logs()
    with contextlib.suppress(Exception):
        client.shutdown()
    client.close()


def client_main(
    main: MainFunction, handles: Mapping[str, Handle], n_workers: int, config: JobConfig
) -> tuple[Any, BaseException | None]:
    """Run ``main`` on the client rank, then shut the cluster down (local, on the client rank)."""
    from distributed import Client

    try:
        client = Client(timeout=config.timeout)
    except Exception as exc:  # the scheduler is unreachable: nobody can stop it but an abort
        return None, HpcshareError(f"the client could not connect to the Dask scheduler: {exc}")
    try:
        _wait_for_workers(client, n_workers, config.timeout)
        hint = _dashboard_hint(client, config)
        if not config.quiet or "warning" in hint:
            print(hint, file=sys.stderr, flush=True)
        return _call_main(main, client, handles)
    except Exception as exc:
        return None, exc
    finally:
        _stop(client)


class DaskCluster:
    """One run of Dask on the job's ranks, through dask-mpi (collective on world).

    Entering sets distributed's log level; :meth:`run` starts every rank's
    role and returns when Dask has stopped; leaving restores the loggers and
    the ``scheduler-address`` config on every rank.
    """

    def __init__(
        self,
        topo: Topology,
        config: JobConfig,
        memory_limit: int,
        local_directory: str | None = None,
        put_folder: str = "",
        credentials: CredentialsMaker | None = None,
    ) -> None:
        self.topo, self.config = topo, config
        self.memory_limit = memory_limit  #: each worker's, from memory.worker_memory_limit
        self.local_directory = local_directory  #: the job's private scratch folder on this host
        self.put_folder = put_folder  #: the job's folder of put objects on this host (hpcshare.put)
        self.credentials = credentials  #: rank 0, with TLS: the program making the job's certificates

    def __enter__(self) -> DaskCluster:
        import dask

        self._levels = {name: logging.getLogger(name).level for name in _DASK_LOGGERS}
        self._address = dask.config.get("scheduler-address", None)
        logging.getLogger("distributed").setLevel(self.config.dask_log_level.upper())
        return self

    def __exit__(self, *exc: object) -> None:
        import dask

        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        dask.config.set({"scheduler-address": self._address})
        if self._address is None:
            dask.config.config.pop("scheduler-address", None)

    def _worker_options(self) -> dict[str, Any]:
        """Worker keywords: a name, the guarded task threads, the plugins (collective on node)."""
        on_node = world_ranks(self.topo.node, list(range(self.topo.node.Get_size())), self.topo.world)
        workers_on_node = sum(1 for rank in on_node if role_of(rank) == "worker")  # local: roles go by rank
        options: dict[str, Any] = {"name": f"rank-{self.topo.rank}"}
        if self.topo.role == "worker":
            options["executor"] = _task_executor(self.config.nthreads)
            put_bytes = functools.partial(store.node_bytes, self.put_folder, self.topo.node_index)
            # given as the worker starts: registering them from the client costs a round trip to every worker
            options["plugins"] = {PrivateMemory(put_bytes, workers_on_node), ViewGuard(), QuietOnRequest()}
        return options

    def run(self, main: MainFunction, handles: Mapping[str, Handle]) -> tuple[Any, BaseException | None]:
        """Scheduler, client running ``main``, or worker, until Dask stops (collective on world).

        Returns ``main``'s result and error on the client rank, and an error
        on any rank whose role failed; every rank returns, so that the caller
        can tear down collectively.
        """
        import dask
        from dask_mpi import initialize

        from .dashboard import preload_config
        from .exchange import begin_collective_phase
        from .security import dask_tls_config, lighter_tls_accepts, listen_interface, share_credentials

        try:
            begin_collective_phase()  # until dask-mpi's start-up barrier has passed (idle_startup_comm)
            tls: dict[str, Any] = {}
            if self.config.tls:
                tls = dask_tls_config(
                    share_credentials(self.topo.world, self.config.timeout, self.credentials)
                )
                job = context.current()
                assert job is not None  # Dask runs inside run()
                job.on_end(lighter_tls_accepts())  # undone with the job's other patches to Dask
            scratch = {"temporary-directory": self.local_directory} if self.local_directory else {}
            http = preload_config(self.config.dashboard, self.config.dashboard_address, self.local_directory)
            # Dask drops a silent peer only after hpcshare has named its host and ended the job
            silent = {"distributed.comm.timeouts.tcp": f"{max(11.0, 2 * self.config.host_timeout):g}s"}
            with dask.config.set({**tls, **scratch, **http, **silent}):
                is_client = initialize(
                    comm=idle_startup_comm(self.topo.world, self.config.timeout),
                    exit=False,
                    interface=listen_interface(self.config.interface, self.topo.n_hosts),
                    protocol="tls" if self.config.tls else "tcp",
                    nthreads=self.config.nthreads,
                    local_directory=self.local_directory,
                    memory_limit=self.memory_limit,
                    dashboard=self.config.dashboard,
                    # closed once the scheduler has started, unless it is the user's (hpcshare.dashboard)
                    dashboard_address=self.config.dashboard_address or "127.0.0.1:0",
                    worker_options=self._worker_options(),
                )
                if is_client:
                    return client_main(main, handles, self.topo.size - 2, self.config)
            return None, None
        except BaseException as exc:  # every rank must still reach the teardown
            # the client's error, and one agreed on every rank, is told once at the end: say any other now
            if self.topo.role != "client" and not sync.agreed(exc):
                print(
                    f"hpcshare: rank {self.topo.rank} ({self.topo.role} on {self.topo.hostname}): "
                    f"its Dask {self.topo.role} failed: {type(exc).__name__}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
            return None, exc
