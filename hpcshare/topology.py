"""Topology: which ranks share a node, who leads it, and each rank's role."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import ConfigError, TopologyError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "CLIENT_RANK",
    "MIN_RANKS",
    "SCHEDULER_RANK",
    "Topology",
    "check_launch",
    "check_world",
    "launcher_rank",
    "launcher_size",
    "role_of",
    "world_ranks",
]

SCHEDULER_RANK = 0
CLIENT_RANK = 1
MIN_RANKS = 3

# What launchers set before MPI starts: each rank's number, and how many they started.
_RANK_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")  # MPICH/Intel MPI, PMIx, Open MPI
_SIZE_VARS = (
    "PMI_SIZE",  # MPICH / Intel MPI (hydra, PMI-1/2)
    "PMIX_SIZE",
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS",  # srun, sbatch
    "SLURM_NPROCS",
)
# set when srun (or a launcher) wired up a process-management interface for MPI
_PMI_VARS = ("SLURM_MPI_TYPE", "PMI_FD", *_RANK_VARS)


def launcher_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher set it, before MPI starts; 0 if none did (local)."""
    env = os.environ if environ is None else environ
    for var in (*_RANK_VARS, "SLURM_PROCID"):
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def launcher_size(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """The number of ranks the environment says were started, and the variable (local)."""
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    return None


def role_of(rank: int) -> str:
    """The role of a world rank: ``scheduler``, ``client`` or ``worker`` (local)."""
    if rank == SCHEDULER_RANK:
        return "scheduler"
    if rank == CLIENT_RANK:
        return "client"
    return "worker"


def world_ranks(comm: MPI.Comm, ranks: list[int], world: MPI.Comm) -> list[int]:
    """The ranks in ``world`` of ``comm``'s ``ranks`` (local: the groups are known here)."""
    group, world_group = comm.Get_group(), world.Get_group()
    try:
        return list(group.Translate_ranks(ranks, world_group))
    finally:
        group.Free()
        world_group.Free()


@dataclasses.dataclass
class Topology:
    """Communicators of one job. Build with :meth:`create`, end with :meth:`free`
    (or use it as a context manager: leaving the block frees it).

    Attributes
    ----------
    world : the job's communicator (not owned, never freed here)
    node : ranks sharing one node's memory (emulated nodes when asked)
    host : ranks on the same physical machine (several emulated nodes)
    leaders : node rank 0 of every node; ``MPI.COMM_NULL`` on other ranks
    node_index : this node's number, 0 .. n_nodes-1
    n_hosts : how many physical machines the job spans
    """

    world: MPI.Intracomm
    node: MPI.Comm
    host: MPI.Comm
    leaders: MPI.Comm
    node_index: int
    n_nodes: int
    hostname: str
    n_hosts: int = 1  #: physical machines the job spans

    @classmethod
    def create(cls, world: MPI.Intracomm, ranks_per_node: int | None = None) -> Topology:
        """Split ``world`` into node and leaders' communicators (collective on ``world``).

        ``ranks_per_node=K`` cuts each shared-memory node into emulated nodes of
        K consecutive ranks, so multi-node logic runs on one machine.
        """
        from mpi4py import MPI

        if ranks_per_node is not None and ranks_per_node < 1:
            raise ConfigError(f"ranks_per_node must be at least 1, got {ranks_per_node}")
        host = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        if ranks_per_node is None:
            node = host.Dup()
        else:
            node = host.Split(host.Get_rank() // ranks_per_node, key=host.Get_rank())
        is_leader = node.Get_rank() == 0
        leaders = world.Split(0 if is_leader else MPI.UNDEFINED, key=world.Get_rank())
        # one round: which world ranks lead a node and which a host. The leaders' communicator
        # orders them by world rank, so a node's index is how many leaders come before its own.
        flags = world.allgather((is_leader, host.Get_rank() == 0))
        leader = world_ranks(node, [0], world)[0]
        node_index = sum(1 for lead, _ in flags[:leader] if lead)
        n_nodes = sum(1 for lead, _ in flags if lead)
        n_hosts = sum(1 for _, first in flags if first)
        return cls(
            world=world,
            node=node,
            host=host,
            leaders=leaders,
            node_index=node_index,
            n_nodes=n_nodes,
            hostname=socket.gethostname(),
            n_hosts=n_hosts,
        )

    @property
    def rank(self) -> int:
        return int(self.world.Get_rank())

    @property
    def size(self) -> int:
        return int(self.world.Get_size())

    @property
    def role(self) -> str:
        return role_of(self.rank)

    @property
    def is_leader(self) -> bool:
        return bool(self.node.Get_rank() == 0)

    def free(self) -> None:
        """Free the communicators this object made (collective on ``world``). Idempotent."""
        from mpi4py import MPI

        for name in ("leaders", "node", "host"):
            comm = getattr(self, name)
            if comm != MPI.COMM_NULL:
                comm.Free()
                setattr(self, name, MPI.COMM_NULL)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


def check_launch(environ: Mapping[str, str] | None = None) -> None:
    """Refuse an ``srun`` step that started several tasks without an MPI plugin (local).

    Called before MPI starts, so that no rank creates shared memory that
    ``srun --kill-on-bad-exit`` would leave behind when it kills the others.

    Raises
    ------
    TopologyError
        When Slurm says the step has more than one task and nothing set up a
        process-management interface for MPI (``srun --mpi=none``).
    """
    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if tasks.isdigit() and int(tasks) > 1 and not any(env.get(v) for v in _PMI_VARS):
        raise TopologyError(
            f"srun started {tasks} tasks without an MPI plugin (SLURM_STEP_NUM_TASKS={tasks}, "
            "no SLURM_MPI_TYPE), so every rank would come up as an MPI world of its own. "
            "Use `srun --mpi=pmi2` for MPICH and Intel MPI, `srun --mpi=pmix` for Open MPI "
            "(not --mpi=none); `srun --mpi=list` shows what your Slurm offers."
        )


def check_world(world: MPI.Intracomm, environ: Mapping[str, str] | None = None) -> None:
    """Refuse worlds that cannot host a job (local; every rank decides the same).

    Raises
    ------
    TopologyError
        For a singleton world started by a launcher of another MPI, or a
        world of fewer than three ranks.
    """
    size = int(world.Get_size())
    launched = launcher_size(environ)
    if size == 1 and launched is not None and launched[0] > 1:
        n, var = launched
        raise TopologyError(
            f"this rank sees an MPI world of 1 rank, but {var}={n} says the launcher "
            f"started {n}: the launcher does not speak this MPI's process-management "
            "interface, so every rank came up alone. Use the mpiexec that belongs to the "
            "MPI mpi4py was built with (`python -m hpcshare info` names that library and the mpiexec on your PATH), or under "
            "Slurm pick the right plugin: `srun --mpi=pmi2` for MPICH and Intel MPI, "
            "`srun --mpi=pmix` for Open MPI (not --mpi=none)."
        )
    if size < MIN_RANKS:
        raise TopologyError(
            f"found {size} MPI rank(s), needs at least {MIN_RANKS}: one each for the "
            "scheduler, the client and a worker. Start the job with e.g. "
            "`mpirun -n 4 python -m hpcshare job ...`."
        )
