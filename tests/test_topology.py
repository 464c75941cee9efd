"""Launch checks (topology.py) made before MPI starts. No MPI."""

from __future__ import annotations

import pytest


def test_srun_without_an_mpi_plugin_is_refused_before_mpi_starts():
    from hpcshare.errors import TopologyError
    from hpcshare.topology import check_launch

    with pytest.raises(TopologyError, match="srun --mpi=pmi2"):
        check_launch({"SLURM_STEP_NUM_TASKS": "6", "SLURM_NTASKS": "6"})  # srun --mpi=none
    check_launch({"SLURM_STEP_NUM_TASKS": "6", "SLURM_MPI_TYPE": "pmi2", "PMI_RANK": "0"})  # srun --mpi=pmi2
    check_launch({"SLURM_STEP_NUM_TASKS": "1", "PMI_RANK": "3"})  # mpiexec's ranks under a one-task step
    check_launch({"SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"})  # Open MPI's mpirun inside sbatch
    check_launch({})  # no Slurm
