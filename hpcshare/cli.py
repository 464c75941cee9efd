"""Command line: ``python -m hpcshare job|info``. Parses arguments, calls the runtime."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .bench.names import ALL_CONTENDERS, CLUSTERS, LOCAL_CONTENDERS, TINY_TASKS
from .config import DEMO_SIZE, DEMO_TASKS, positive_int, size_in_bytes
from .errors import ConfigError
from .log import install_handler
from .topology import launcher_rank

_INTERRUPT_STAGGER = 0.1  # seconds between ranks reacting to Ctrl-C

__all__ = ["main"]


@dataclasses.dataclass(frozen=True)
class JobArgs:
    """What ``hpcshare job`` was asked to do."""

    jobfile: str | None
    inputs: tuple[tuple[str, str], ...]
    options: tuple[tuple[str, Any], ...]
    demo_size: int
    demo_tasks: int


def _argument(check: Callable[[str, Any], int]) -> Callable[[str], int]:
    """An argparse type from one of hpcshare.config's checks (the same rules as config keys)."""

    def convert(text: str) -> int:
        try:
            return check("the value", text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("the value ", "")) from None

    return convert


def _nonzero_size(name: str, text: str) -> int:
    try:
        value = size_in_bytes(name, text)
    except ConfigError:
        raise ConfigError(f"{name} is not a size: {text!r} (try 256MiB or 1GiB)") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {text!r}")
    return value


_positive = _argument(positive_int)
_size = _argument(_nonzero_size)


def _input(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=SOURCE; e.g. grid=data.h5:/grid, lut=table.npy, x=mymod:make"
        )
    return name.strip(), source.strip()


class _Parser(argparse.ArgumentParser):
    """Usage errors are printed by the first rank only, not once per rank."""

    def error(self, message: str) -> NoReturn:
        if launcher_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class _Version(argparse.Action):
    """``--version``: the installed version, read only when asked for (every rank parses the command line)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from . import __version__

        print(f"hpcshare {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="hpcshare",
        description="Run Dask on MPI ranks with large read-only inputs held once per node.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    job = sub.add_parser(
        "job",
        help="run a job (under mpirun/srun)",
        description=(
            "Place every input once per node in MPI shared memory, start Dask "
            "(rank 0 scheduler, rank 1 client, other ranks workers) and run the "
            "JOBFILE's main(client, inputs) on the client. Without JOBFILE, run "
            "the built-in demo job. Needs at least 3 ranks."
        ),
    )
    job.set_defaults(subparser=job)
    job.add_argument(
        "jobfile", nargs="?", metavar="JOBFILE", help="Python file defining main(client, inputs)"
    )
    job.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        type=_input,
        metavar="NAME=SOURCE",
        help="an input: path.npy, path.h5:/dataset, module:function, path.py:function, or a "
        "table: path.parquet, path.csv, path.arrow (as a DataFrame; path.arrow:table as an Arrow table) "
        "(repeatable)",
    )
    job.add_argument(
        "--ranks-per-node", type=_positive, metavar="K", help="emulate nodes of K ranks on one machine"
    )
    job.add_argument(
        "--readers",
        type=_positive,
        metavar="N",
        help="ranks per node that read a file in parallel (default: auto)",
    )
    job.add_argument(
        "--read",
        choices=("collective", "per-node"),
        help="how nodes read file inputs: collective (default: each node reads its share of each "
        "file once per job, and the node leaders broadcast their shares over MPI) or per-node (every node "
        "reads every file in full: for node-local copies)",
    )
    job.add_argument("--nthreads", type=_positive, metavar="N", help="threads per Dask worker (default 1)")
    job.add_argument(
        "--memory-limit", metavar="SIZE", help="private memory per worker, 0 for no limit (default: auto)"
    )
    job.add_argument(
        "--quiet", "-q", action="store_true", default=None, help="no progress lines or memory report"
    )
    job.add_argument(
        "--interface",
        metavar="NAME",
        help="network interface for Dask, such as ib0 or hsn0 (default: loopback on one host, "
        "else the host address's interface)",
    )
    job.add_argument(
        "--dashboard",
        action="store_true",
        default=None,
        help="serve the Dask dashboard on a Unix socket only you can reach (the job prints the ssh "
        "command); without it no Dask process serves HTTP",
    )
    job.add_argument(
        "--dashboard-address",
        metavar="HOST:PORT",
        help="with --dashboard: serve it on TCP at HOST:PORT instead, with no login: everyone who "
        "can reach the address (on localhost: every user of the node) sees the job",
    )
    job.add_argument(
        "--no-tls",
        dest="tls",
        action="store_false",
        default=None,
        help="plain TCP between the job's Dask processes instead of TLS with the job's certificates",
    )
    job.add_argument(
        "--demo-size",
        type=_size,
        metavar="SIZE",
        help="demo job only: input size (default 256MiB)",
    )
    job.add_argument(
        "--demo-tasks",
        type=_positive,
        metavar="N",
        help=f"demo job only: tasks (default {DEMO_TASKS})",
    )

    bench = sub.add_parser(
        "bench",
        help="compare hpcshare with Dask, fork and Ray on one workload",
        description=(
            "Run the same workload (T tasks that each read a whole input of S bytes, on W "
            "workers) under hpcshare, dask-mpi with scatter(broadcast=True), dask-mpi with the "
            "seed pattern client.submit(create_data), dask-mpi with np.load(path, mmap_mode='r') in "
            "every task (memmap, memmap-cold), a fork-based process pool and Ray (if installed); and the seed pattern made at run time under hpcshare.submit "
            "(hpcshare-put, also on emulated nodes), Ray (ray-put) and unidist's MPI backend "
            "(unidist-put), for an array and for a DataFrame (groupby). One run after another; "
            "each measured from outside (node memory as the sum of PSS over its processes, "
            "sampled: the peak, and the peak while the tasks ran; time to ready; task phase; "
            "bytes moved). With --overhead, instead: start-up against plain dask-mpi (as with "
            "--startup), then the job's own costs, with TLS and without, "
            "at start-up and per tiny task, with an input handle and without. With --cluster local, "
            "instead: the seed pattern on a Dask LocalCluster that hpcshare did not start. Run it "
            "directly, not under mpiexec: it starts mpiexec itself."
        ),
    )
    bench.set_defaults(subparser=bench)
    bench.add_argument("--sizes", metavar="S[,S...]", help="input sizes (default 256MiB,1GiB)")
    bench.add_argument(
        "--workers", metavar="W[,W...]", help="worker counts (default 1,2,4; with --overhead 2)"
    )
    bench.add_argument("--tasks", type=_positive, metavar="T", help="tasks per run (default 16)")
    bench.add_argument(
        "--contenders",
        metavar="NAME[,NAME...]",
        help=f"which to run (default: all of {','.join(ALL_CONTENDERS)}; with --cluster local, all of "
        f"{','.join(LOCAL_CONTENDERS)})",
    )
    bench.add_argument(
        "--workloads",
        metavar="NAME[,NAME]",
        help="array (every contender) and/or frame (a DataFrame groupby: hpcshare-put, scatter, "
        "ray-put; with --cluster local, every contender); default array,frame",
    )
    bench.add_argument(
        "--nodes",
        metavar="N[,N...]",
        help="emulated nodes for hpcshare-put (default 1,2: the second shows the transfer between nodes)",
    )
    bench.add_argument(
        "--overhead",
        action="store_true",
        help="instead of the contenders: the job's own costs (hpcshare-tiny), with TLS and with --no-tls: "
        "start-up to a ready client, and tiny tasks through client.map that receive an input handle "
        "and resolve it, or receive none (a 1 MiB input; --workers default 2, one thread each)",
    )
    bench.add_argument(
        "--tiny-tasks",
        type=_positive,
        metavar="N",
        help=f"--overhead: tiny tasks of each kind, with TLS and without (default {TINY_TASKS})",
    )
    bench.add_argument(
        "--startup",
        action="store_true",
        help="instead of the contenders: only the start-up comparison --overhead begins with: "
        "mpiexec -n W+2 of plain dask-mpi and of 'hpcshare job' (TLS on, and --no-tls) with an empty "
        "main, interleaved; medians of wall time and of the CPU time of everything mpiexec started, "
        "hpcshare's ratios, and the target (<= 1.1x plain dask-mpi) judged",
    )
    bench.add_argument(
        "--startup-runs",
        type=_positive,
        metavar="N",
        help="--overhead, --startup: start-up runs of each setting (default 5)",
    )
    bench.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="instead of the launcher's contenders: the seed pattern on a Dask cluster hpcshare did not "
        "start. local: Client(n_workers=W, threads_per_worker=1), a LocalCluster of worker processes under "
        "nannies, with hpcshare.submit(client, create_data) (local-hpcshare), client.submit(create_data) "
        "(local-submit), client.scatter(data, broadcast=True) (local-scatter), and Ray's ray.put with W Ray "
        "workers (ray); node memory while tasks run and its peak, time to ready against one copy into "
        "fresh shared memory (shm-copy); takes --sizes, --workers, --tasks, --contenders, --workloads",
    )
    bench.add_argument(
        "--placement",
        action="store_true",
        help="instead of the contenders: placement alone of a .npy file and of a gzip-chunked HDF5 "
        "dataset (--sizes, one size, default 512MiB) on --nodes emulated nodes (default 1,2,3,4) of "
        "two ranks, with collective and with per-node reading: bytes read from the files (counted, "
        "and /proc rchar), bytes broadcast between nodes, time to ready",
    )
    bench.add_argument(
        "--out", default="bench-out", metavar="DIR", help="where bench.json, bench.txt and bench.png go"
    )
    bench.add_argument(
        "--scratch", metavar="DIR", help="where the input files are written (default: the temp dir)"
    )

    sub.add_parser(
        "info",
        help="show topology, MPI library and shared memory",
        description="Show hosts, ranks per node, roles, MPI library and /dev/shm.",
    ).add_argument(
        "--ranks-per-node",
        type=_positive,
        metavar="K",
        help="show the emulated nodes of K ranks a job would have",
    )
    sub.add_parser(
        "clean",
        help="remove shared objects of Dask clusters that are gone",
        description=(
            "Remove this user's hpcshare files of Dask clusters whose processes are all gone "
            "(killed, crashed) from the shared-memory directory (hpcshare.shm-dir, default /dev/shm). "
            "Live clusters' objects and other users' files are never touched."
        ),
    ).add_argument("--shm-dir", metavar="DIR", help="the directory to clean (default: hpcshare.shm-dir)")
    return p


def _clean(shm_dir: str | None) -> int:
    from .anywhere import groups, lifetimes

    where = shm_dir or groups.shm_dir()
    removed = lifetimes.sweep(where)
    for name in removed:
        print(f"removed {os.path.join(where, name)}")
    print(f"hpcshare clean: {len(removed)} file(s) of dead Dask clusters removed from {where}")
    return 0


def parse_job(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> JobArgs:
    options = {
        "ranks_per_node": ns.ranks_per_node,
        "readers": ns.readers,
        "read": ns.read,
        "nthreads": ns.nthreads,
        "memory_limit": ns.memory_limit,
        "quiet": ns.quiet,
        "interface": ns.interface,
        "dashboard": ns.dashboard,
        "dashboard_address": ns.dashboard_address,
        "tls": ns.tls,
    }
    if ns.jobfile is not None and (ns.demo_size is not None or ns.demo_tasks is not None):
        parser.error("--demo-size and --demo-tasks are for the demo job, which runs when no JOBFILE is given")
    names = [name for name, _ in ns.inputs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        parser.error(f"input name(s) given more than once: {', '.join(twice)}")
    return JobArgs(
        jobfile=ns.jobfile,
        inputs=tuple(ns.inputs),
        options=tuple((k, v) for k, v in options.items() if v is not None),
        demo_size=ns.demo_size or DEMO_SIZE,
        demo_tasks=ns.demo_tasks or DEMO_TASKS,
    )


def _interrupted(signum: int, frame: Any) -> None:
    """Ctrl-C (SIGINT) or scancel and time limits (SIGTERM): stop the whole job at once.

    Every rank unlinks the shared-memory files it maps first: the batch
    system may kill all of the job's processes (the /dev/shm watcher too)
    before the abort has reached the other nodes.
    """
    from . import ending, shm, supervise
    from .context import PROCESS, current

    if PROCESS.stopping:  # the same signal again: from the launcher and from the supervisor, or Ctrl-C twice
        return
    PROCESS.stopping = True
    job = current()
    # Open MPI's launcher stops the job with SIGTERM once a rank died: its supervisor named it
    named = job is not None and supervise.death_named(job.scratch)
    shm.unlink_mapped()
    ending.remove_scratch()
    supervise.ending()
    rank = launcher_rank()
    gone = ending.launcher_gone()  # killed with no grace: nobody to abort through
    # The launcher signals every rank, and the first abort ends them all. Ranks
    # after the first give the lower ones a moment, so one line is printed,
    # yet a rank stuck in C code (Python handlers wait for it) cannot hide it.
    if rank and not gone and not named:
        time.sleep(_INTERRUPT_STAGGER * min(rank, 20))
    what = "interrupted" if signum == signal.SIGINT else f"got {signal.Signals(signum).name}"
    try:
        if not named:
            print(f"hpcshare: rank {rank} {what}; stopping the job", file=sys.stderr, flush=True)
    except OSError:  # the launcher, which read our stderr, is gone
        pass
    if gone:  # every rank ends itself
        os._exit(128 + signum)
    ending.abort(code=128 + signum)


def _job(args: JobArgs) -> int:
    from .errors import HpcshareError, describe, exit_code_of
    from .topology import check_launch

    try:
        check_launch()  # before MPI starts: nothing to clean up
    except HpcshareError as exc:
        print(f"hpcshare: error: {exc}", file=sys.stderr, flush=True)
        return 1
    # the steps before the job's heavy imports (Dask, numpy, the runtime): the supervisor's
    # fork copies a small process, and MPI_Init's wait for the last rank is short (_start_mpi)
    _supervised()
    install_handler()
    # what _interrupted uses, loaded before it can run (a signal during their import would find them half made)
    from . import context, ending, shm, supervise  # noqa: F401

    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    _start_mpi()
    _start_certificates(args)

    from . import runtime, sync
    from .demo import demo_job

    inputs: dict[str, Any] = dict(args.inputs)
    main: Any = args.jobfile
    if args.jobfile is None:
        main, inputs = demo_job(inputs, args.demo_size, args.demo_tasks)
    try:
        runtime.run(main, inputs, **dict(args.options))
    except HpcshareError as exc:
        code = exit_code_of(exc)  # sys.exit(n) in main: n
        if sync.origin_of(exc) is None:
            print(f"hpcshare: error: {describe(exc)}", file=sys.stderr, flush=True)
        if not sync.agreed(exc):
            ending.abort(code=code)
        return _failed(code)
    except Exception as exc:
        if sync.origin_of(exc) is None:
            traceback.print_exc()
        if not sync.agreed(exc):
            ending.abort(code=1)
        return _failed()
    return 0


def _start_mpi() -> None:
    """Start MPI now (MPI_Init), before the job loads Dask, numpy and the runtime (local; every rank).

    MPI_Init returns once every rank has called it, and MPICH's ranks wait
    for the last one at full speed. Started after the job's imports (~0.5 s
    of CPU per rank, which vary), the ranks that finished first spun while
    the others, on the same cores, were still importing: ~0.1 s of CPU per
    rank with 6 ranks on 2 cores, and more for the rank that also starts
    the certificates' program. Here the ranks arrive within the few
    milliseconds their first steps differ by, and the job's first wait
    after the imports is an idle one (the runtime's first agreement).
    Before MPI_Init, the launcher's death is made to end this rank (Open
    MPI's MPI_Init makes files in /dev/shm).
    """
    from . import ending

    ending.end_with_launcher()
    from mpi4py import MPI  # noqa: F401 - importing it calls MPI_Init


def _start_certificates(args: JobArgs) -> None:
    """Rank 0 of a TLS job: start making the job's certificates now, while the ranks load their modules (local).

    The program (:mod:`hpcshare.certificates`, ~0.1 s of CPU) then runs
    beside the ranks' imports, which keep every core busy anyway, instead
    of beside the job's first collective steps, where every rank waits for
    the slowest; started before MPI_Init, it made rank 0 the last to arrive
    there. The runtime takes it over (``context.PROCESS.credentials``) and
    stops it at the end.
    """
    from .config import JobConfig
    from .context import PROCESS

    if launcher_rank() != 0:
        return
    try:
        if JobConfig.from_options(**dict(args.options)).tls:
            from .security import CredentialsMaker

            PROCESS.credentials = CredentialsMaker()
    except Exception:
        # bad options, which the job reports itself on every rank; or the runtime starts its own
        PROCESS.credentials = None


def _leaving() -> None:
    """This process exits next: spare its exit a collection of every object it holds (local).

    Python's finalization runs full garbage collections over every object
    still alive: Dask's, numpy's, the job's, ~0.1 s of CPU per rank, which
    every rank of a node spends at the same moment (0.4-0.5 s of wall time
    for 6 ranks on 2 cores). ``gc.freeze`` moves them out of the
    collector's reach. What users rely on at exit stays: the atexit
    handlers run (logging's flush, ``weakref.finalize``, thread joins);
    every open buffered file is flushed here; and every module is kept
    alive (a list on ``sys``, which finalization clears last) until
    finalization empties the modules' namespaces, so what their globals
    hold is freed by reference count: files closed, temporary files
    removed. What is not: the finalizers (``__del__``) of objects that are
    in a reference cycle now, which the collector would have run at exit
    (a temporary file held only by such an object stays). ``hpcshare.fast-exit:
    false`` (``DASK_HPCSHARE__FAST_EXIT=false``) keeps Python's own exit.
    """
    import gc
    import io

    import dask.config

    from .context import PROCESS

    if PROCESS.credentials is not None:  # the job ended before it took them
        PROCESS.credentials.close()
        PROCESS.credentials = None
    if not dask.config.get("hpcshare.fast-exit", True):
        return
    writers = {io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper}
    for obj in gc.get_objects():
        if type(obj) in writers:
            try:
                obj.flush()
            except Exception:  # closed, or a pipe nobody reads: nothing to keep
                pass
    # a module freed by reference count would leave its namespace, a cycle, to the collector
    setattr(sys, "_hpcshare_modules_at_exit", list(sys.modules.values()))  # noqa: B010
    gc.freeze()


def entry() -> NoReturn:
    """The ``hpcshare`` command and ``python -m hpcshare``: :func:`main`, then a quick exit (:func:`_leaving`)."""
    code = main()
    _leaving()
    sys.exit(code)


def _supervised() -> None:
    """Under a launcher, go on as a child of a supervisor that names this rank if it dies (local; before MPI)."""
    import dask.config

    from . import supervise
    from .topology import launcher_size, role_of

    launched = launcher_size()
    if launched and launched[0] > 1 and dask.config.get("hpcshare.supervise", True):
        rank = launcher_rank()
        supervise.start(rank, role_of(rank))


def _failed(code: int = 1) -> int:
    """Exit code ``code``, after unlinking the MPI library's files this rank maps (local).

    The first rank to exit non-zero makes ``srun --kill-on-bad-exit`` kill
    the others, and the watcher with them, before MPI_Finalize removes them.
    """
    from . import shm

    shm.unlink_mapped()
    return code


def _bench_mode_error(ns: argparse.Namespace) -> str | None:
    """What is wrong with the mix of ``hpcshare bench`` modes and options given, if anything (local)."""
    contenders_only = [
        f"--{k}" for k in ("sizes", "tasks", "contenders", "workloads", "nodes") if getattr(ns, k) is not None
    ]
    if ns.overhead and ns.startup:
        return "--overhead already runs the start-up comparison; --startup runs it alone"
    if (ns.overhead or ns.startup) and contenders_only:
        return (
            f"{', '.join(contenders_only)}: for the contenders, not --overhead or --startup (their jobs "
            "run tiny tasks on a 1 MiB input or an empty main; --workers, --tiny-tasks and "
            "--startup-runs set them)"
        )
    if ns.tiny_tasks is not None and not ns.overhead:
        return "--tiny-tasks goes with --overhead"
    if ns.startup_runs is not None and not (ns.overhead or ns.startup):
        return "--startup-runs goes with --overhead or --startup"
    if ns.cluster and (ns.overhead or ns.startup or ns.nodes is not None):
        return (
            f"--{'overhead' if ns.overhead else 'startup' if ns.startup else 'nodes'}: not for --cluster {ns.cluster} (a LocalCluster "
            "runs on this machine; it takes --sizes, --workers, --tasks, --contenders, --workloads)"
        )
    return None


def _bench(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .bench import config_from_args, run_bench
    from .errors import ConfigError
    from .topology import launcher_size

    launched = launcher_size()
    if launched and launched[0] > 1:
        parser.error(
            f"run hpcshare bench directly, not under mpiexec or srun ({launched[1]}={launched[0]}): "
            "it starts mpiexec itself for each contender"
        )

    if ns.placement:
        return _bench_placement(ns, parser)
    wrong = _bench_mode_error(ns)
    if wrong:
        parser.error(wrong)
    try:
        cfg = config_from_args(
            ns.sizes,
            ns.workers,
            ns.tasks,
            ns.contenders,
            ns.out,
            ns.scratch,
            ns.workloads,
            ns.nodes,
            overhead=ns.overhead,
            tiny_tasks=ns.tiny_tasks,
            startup=ns.startup,
            startup_runs=ns.startup_runs,
            cluster=ns.cluster,
        )
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        result = run_bench(cfg)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running contender is down, its files gone
        print(f"bench: interrupted; the runs so far are in {cfg.out}", file=sys.stderr, flush=True)
        return 130
    failed = [r for r in result.rows if r.status == "failed"]
    if failed or not result.checksums_agree:
        print(
            f"bench: {len(failed)} run(s) failed; checksums agree: {result.checksums_agree}",
            file=sys.stderr,
        )
        return 1
    return 0


def _bench_placement(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from dask.utils import parse_bytes

    from .bench.driver import parse_list
    from .bench.placing import NODES, bench_placement

    others = [
        f"--{k.replace('_', '-')}"
        for k in (
            "workers",
            "tasks",
            "contenders",
            "workloads",
            "overhead",
            "tiny_tasks",
            "startup",
            "startup_runs",
            "cluster",
        )
        if getattr(ns, k) not in (None, False)
    ]
    if others:
        parser.error(
            f"{', '.join(others)}: not for --placement (it takes --sizes, --nodes, --out, --scratch)"
        )
    try:
        sizes = parse_list(ns.sizes or "512MiB", lambda t: int(parse_bytes(t)))
        nodes = parse_list(ns.nodes or ",".join(map(str, NODES)), int)
    except ValueError as exc:
        parser.error(f"--placement takes --sizes like 512MiB and --nodes like 1,2,3,4: {exc}")
    if len(sizes) != 1 or sizes[0] < 2**20 or not nodes or min(nodes) < 1:
        parser.error(
            "--placement takes one size of at least 1MiB (--sizes) and node counts of at least 1 (--nodes)"
        )
    return bench_placement(sizes[0], nodes, Path(ns.out), Path(ns.scratch) if ns.scratch else None)


def _glue_inputs(argv: list[str]) -> list[str]:
    """``--input -x=a.npy`` as ``--input=-x=a.npy``: argparse would take ``-x=a.npy`` for an option."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--input", "-i"):
            value = next(it, None)
            if value is not None and value.startswith("-") and "=" in value:
                out.append(f"--input={value}")
                continue
            out.append(arg)
            if value is not None:
                out.append(value)
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hpcshare`` and the ``hpcshare`` command."""
    parser = _parser()
    ns = parser.parse_args(_glue_inputs(sys.argv[1:] if argv is None else list(argv)))
    if ns.command == "job":
        return _job(parse_job(ns, ns.subparser))
    if ns.command == "bench":
        return _bench(ns, ns.subparser)
    if ns.command == "clean":
        return _clean(ns.shm_dir)
    from .info import print_info

    return print_info(ranks_per_node=ns.ranks_per_node)
