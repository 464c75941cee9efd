"""The runtime: one job's lifetimes, composed, and the job-wide abort.

:func:`run` sets up, in order: topology, the /dev/shm watcher, placement
(one copy per node), Dask (rank 0 scheduler, rank 1 client running ``main``,
other ranks in-process workers). Each is a context manager, entered on an
``ExitStack``, so teardown runs in reverse by construction and an error at
any step unwinds exactly what was set up before it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes

from . import context, ending, shm, store, supervise, sync
from .cluster import DaskCluster
from .config import JobConfig
from .errors import ConfigError, describe
from .exchange import Exchange, collective_phase
from .handles import Handle
from .importing import MainFunction, load_main
from .liveness import Liveness
from .loaders import Source, TableSource, source_for, table_source_for
from .log import install_handler, logger
from .memory import worker_memory_limit
from .placement import Placement, PlacementStats, place_inputs
from .report import print_report
from .topology import CLIENT_RANK, Topology, check_world

if TYPE_CHECKING:
    from mpi4py import MPI

    from .security import CredentialsMaker

__all__ = ["run"]


def _host_folder(topo: Topology, stack: contextlib.ExitStack, prefix: str, parent: str | None = None) -> str:
    """A folder of the job on this host: mode 0700, a random name (collective on host).

    Host rank 0 makes it (in ``parent``, default the temporary directory:
    Slurm's $TMPDIR where set) and removes it at the end; the watcher removes
    it if the job is killed. Nobody else can list it, add to it or guess its name.
    """
    path = tempfile.mkdtemp(prefix=prefix, dir=parent) if topo.host.Get_rank() == 0 else None
    path = sync.bcast(topo.host, path)
    if topo.host.Get_rank() == 0:
        stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def _preflight(
    world: MPI.Intracomm,
    main: MainFunction | str | os.PathLike[str] | None,
    inputs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    stack: contextlib.ExitStack,
) -> tuple[JobConfig, MainFunction, list[Source], list[TableSource], CredentialsMaker | None]:
    """Config, world size, the job's main, the sources; agreed before any MPI object exists (collective).

    With TLS, rank 0 also starts making the job's certificates (in a process
    of its own, ended by ``stack``), unless ``hpcshare job`` started it already.
    """
    options = dict(options)
    demo = {k: options.pop(k) for k in ("demo_size", "demo_tasks") if k in options}
    if main is None:  # the demo job, on its default input unless one named "data" is given
        from .config import positive_int, size_in_bytes
        from .demo import DEFAULT_SIZE, DEFAULT_TASKS, demo_job

        size = size_in_bytes("demo_size", demo.get("demo_size", DEFAULT_SIZE))
        main, inputs = demo_job(
            inputs, size, positive_int("demo_tasks", demo.get("demo_tasks", DEFAULT_TASKS))
        )
    elif demo:
        raise ConfigError(f"{' and '.join(sorted(demo))} are for the demo job (main=None)")
    credentials = None
    with sync.Collective(world):
        config = JobConfig.from_options(**options)
        early, context.PROCESS.credentials = context.PROCESS.credentials, None  # hpcshare job's, on rank 0
        if early is not None:
            stack.enter_context(early)
        if config.tls and world.Get_rank() == 0:
            from .security import CredentialsMaker

            credentials = early or stack.enter_context(CredentialsMaker())
        check_world(world)
        job = load_main(main)
        tables = [t for name, src in (inputs or {}).items() if (t := table_source_for(name, src))]
        if world.Get_rank() == CLIENT_RANK:  # the rank that reads them; the others do not touch the files
            for t in tables:
                t.check()
        named = {t.name for t in tables}
        sources = [source_for(name, src) for name, src in (inputs or {}).items() if name not in named]
    return config, job, sources, tables, credentials


def _place_tables(
    topo: Topology, exchange: Exchange, tables: list[TableSource], config: JobConfig
) -> dict[str, Handle]:
    """DataFrame and Arrow inputs: read on the client rank, put once per node (collective on world)."""
    if not tables:
        return {}
    placed: dict[str, Handle] | None = None
    with sync.Collective(topo.world, timeout=config.placement_timeout):  # reading the tables
        if topo.rank == CLIENT_RANK:
            placed = {t.name: _place_table(exchange, t, topo.n_nodes, config.quiet) for t in tables}
    result: dict[str, Handle] = sync.bcast(topo.world, placed, root=CLIENT_RANK)
    return result


def _place_table(exchange: Exchange, table: TableSource, n_nodes: int, quiet: bool) -> Handle:
    """Read one table input and put it once per node, with a progress line (local, on the client rank)."""
    t = time.perf_counter()
    handle = exchange.put_source(table)
    if not quiet:
        summary = getattr(handle, "summary", "")
        logger.info(
            f"placed table input {table.name!r} ({table.text}: {summary}, "
            f"{format_bytes(getattr(handle, 'nbytes', 0))} per node) on {n_nodes} node(s) "
            f"in {time.perf_counter() - t:.1f} s"
        )
    return handle


def _end_of_job_report(
    topo: Topology,
    placement: Placement,
    tables: Mapping[str, Handle],
    config: JobConfig,
    put_folder: str,
    error: BaseException | None,
) -> None:
    """The memory report; a rank that does not arrive in time ends the job (collective on world).

    Table inputs (``x.parquet``, ``x.arrow:table``) are inputs in the report, though
    they are held as put objects are.
    """
    table_files = {store.file_name(h.name, topo.node_index) for h in tables.values()}
    objects = 0
    if topo.is_leader:  # the objects put while the job ran, still on this node
        objects = sum(
            size
            for path, size in store.node_files(put_folder, topo.node_index)
            if os.path.basename(path) not in table_files
        )
    nbytes = placement.nbytes + sum(getattr(h, "nbytes", 0) for h in tables.values())
    try:
        print_report(topo, nbytes, len(placement.inputs) + len(tables), config, objects)
    except sync.WaitTimeout as exc:
        if error is not None:
            print(f"hpcshare: error: {describe(error)}", file=sys.stderr, flush=True)
        print(f"hpcshare: {exc}; aborting the job", file=sys.stderr, flush=True)
        ending.abort(topo.world, 1)


def run(
    main: MainFunction | str | os.PathLike[str] | None = None,
    inputs: Mapping[str, Any] | None = None,
    *,
    comm: MPI.Intracomm | None = None,
    on_placed: Callable[[PlacementStats], Any] | None = None,
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
    on_placed : callable(PlacementStats), optional
        Called on every rank once the inputs are placed, before Dask starts,
        with placement's figures including every rank's own (gathered only
        when this is given). For measuring; ``hpcshare bench`` uses it.
    **options
        Any of :class:`~hpcshare.config.JobConfig`'s fields, e.g.
        ``ranks_per_node=3``; unset ones come from Dask config (``hpcshare.*``).
        With ``main=None`` also ``demo_size`` (bytes or "256MiB") and
        ``demo_tasks``, as the CLI's ``--demo-size`` and ``--demo-tasks``.

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
    with context.running(context.JobContext()) as job:
        return _run(job, main, inputs, comm, on_placed, options)


def _run(
    job: context.JobContext,
    main: MainFunction | str | os.PathLike[str] | None,
    inputs: Mapping[str, Any] | None,
    comm: MPI.Intracomm | None,
    on_placed: Callable[[PlacementStats], Any] | None,
    options: Mapping[str, Any],
) -> Any:
    """:func:`run`, inside the job's context (collective on ``comm``)."""
    # before MPI starts (Open MPI's MPI_Init makes its files in /dev/shm); hpcshare job started it already
    ending.end_with_launcher(job)
    from mpi4py import MPI

    world = MPI.COMM_WORLD if comm is None else comm
    install_handler(only_if_unconfigured=True)
    with contextlib.ExitStack() as stack:
        config, main_fn, sources, tables, credentials = _preflight(world, main, inputs, options, stack)
        topo = stack.enter_context(Topology.create(world, config.ranks_per_node))
        generation = job.generation = sync.bcast(world, uuid.uuid4().hex[:12] if topo.rank == 0 else None)
        # Dask's spill and worker files (it would leave dask-scratch-space in /tmp after an abort)
        scratch = job.scratch = _host_folder(topo, stack, f"hpcshare-{generation}-")
        supervise.tell_scratch(scratch)  # where it marks a death it names, for the others to stay quiet
        stack.enter_context(Liveness(topo, config, scratch))  # from here on a lost host ends the job
        puts = _host_folder(topo, stack, f"hpcshare-{generation}-", config.shm_dir)  # hpcshare.put's files
        stack.enter_context(shm.Watcher(topo, config.shm_dir, folders=(scratch, puts)))
        placement = stack.enter_context(
            place_inputs(topo, sources, config, generation, gather_stats=on_placed is not None)
        )
        if on_placed is not None:
            with sync.Collective(world, timeout=config.timeout):
                on_placed(placement.stats)
        exchange = stack.enter_context(Exchange(topo, config, generation, puts))  # hpcshare.put from here on
        tables_placed = _place_tables(topo, exchange, tables, config)
        handles = {**placement.handles, **tables_placed}
        with sync.Collective(world, timeout=config.timeout):  # a budget too small for a worker fails here
            memory_limit = worker_memory_limit(topo, config, placement.nbytes)
        with DaskCluster(
            topo, config, memory_limit, local_directory=scratch, put_folder=puts, credentials=credentials
        ) as cluster:
            result, error = cluster.run(main_fn, handles)
        with collective_phase():  # the report measures collectively
            _end_of_job_report(topo, placement, tables_placed, config, puts, error)
    sync.agree(world, error, config.timeout)
    return result if topo.rank == CLIENT_RANK else None
