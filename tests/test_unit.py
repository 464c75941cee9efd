"""Pure logic: sources, config, handles, the report. No MPI ranks needed."""

from __future__ import annotations

import pickle
import time

import dask
import numpy as np
import pytest

import hpcshare
from hpcshare import ArrayHandle, ConfigError, InputError, ResolveError
from hpcshare.config import JobConfig
from hpcshare.loaders import FunctionSource, Hdf5Source, NpySource, source_for, split_range
from hpcshare.report import RankMemory, format_report, summarize


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("a=data.npy", NpySource),
        ("grid=dir/data.h5:/group/grid", Hdf5Source),
        ("g=x.hdf5:/g", Hdf5Source),
        ("f=numpy.random:rand", FunctionSource),
        ("f=make.py:build", FunctionSource),
    ],
)
def test_sources_are_recognised(spec, kind):
    name, text = spec.split("=")
    src = source_for(name, text)
    assert isinstance(src, kind)
    assert src.name == name


def test_hdf5_path_and_dataset_are_split_at_the_last_colon():
    src = source_for("g", "/scratch/run:1/data.h5:/a/b")
    assert (src.path, src.dataset) == ("/scratch/run:1/data.h5", "/a/b")


@pytest.mark.parametrize(
    "spec, words",
    [
        (("x", "data.h5"), "no dataset"),
        (("x", "run:1/data.h5:group/x"), "absolute path in the file; write run:1/data.h5:/group/x"),
        (("x", "data.csv"), "cannot tell"),
        (("bad name", "data.npy"), "not valid"),
        (("x", ""), "non-empty string"),
        (("x", 42), "non-empty string"),
    ],
)
def test_bad_sources_say_what_to_write(spec, words):
    with pytest.raises(InputError, match=words):
        source_for(*spec)


def test_split_covers_everything_once_with_aligned_bounds():
    for total in (1, 7, 4096, 10**6 + 3):
        for n in (1, 2, 3, 8):
            parts = split_range(total, n, 64)
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
            assert all(a % 64 == 0 for a, _ in parts)
            assert len(parts) <= n
    assert split_range(0, 4, 64) == []


def test_config_defaults_and_overrides():
    cfg = JobConfig.from_options()
    assert cfg.ranks_per_node is None and cfg.readers is None and cfg.nthreads == 1
    with dask.config.set({"hpcshare.ranks-per-node": 3, "hpcshare.shm-headroom": "1 GiB"}):
        cfg = JobConfig.from_options(readers=2)
    assert (cfg.ranks_per_node, cfg.readers, cfg.shm_headroom) == (3, 2, 2**30)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"ranks_per_node": 0}, "ranks_per_node"),
        ({"readers": "many"}, "readers"),
        ({"memory_limit": "lots"}, "memory_limit"),
        ({"rank_per_node": 2}, "unknown option"),
        ({"read": "pernode"}, "DASK_HPCSHARE__READ"),
    ],
)
def test_bad_config_is_named(options, words):
    with pytest.raises(ConfigError, match=words):
        JobConfig.from_options(**options)


@pytest.mark.parametrize(
    "dtype",
    [
        np.float64,
        np.dtype(">i2"),
        np.bool_,
        np.dtype("S17"),
        np.dtype("U8"),
        np.dtype([("x", "f8"), ("y", "i4"), ("name", "S8"), ("v", "f4", (3,))]),
        np.dtype({"names": ["a", "b"], "formats": ["u1", "f8"], "offsets": [0, 8], "itemsize": 16}),
    ],
)
def test_handles_pickle_small_and_round_trip(dtype):
    h = ArrayHandle("grid", (10**6, 10**6), np.dtype(dtype), "F", "0123456789ab")
    data = pickle.dumps(h)
    assert len(data) <= 512
    back = pickle.loads(data)
    assert back == h and back.dtype == h.dtype and back.nbytes == h.nbytes
    assert dask.base.tokenize(back) == dask.base.tokenize(h)


def test_resolving_outside_a_job_names_the_input_and_why():
    h = ArrayHandle("lut", (4,), np.dtype("f8"), "C", "feedfeedfeed")
    with pytest.raises(ResolveError, match=r"input 'lut'.*no hpcshare job placed it"):
        h.resolve()
    with pytest.raises(ResolveError, match="lut"):
        np.asarray(h)


def test_dask_array_refuses_non_handles():
    with pytest.raises(TypeError, match="Handle"):
        hpcshare.dask_array(np.zeros(3))


def test_report_sums_pss_per_node_and_prices_one_copy_per_worker():
    mib = 2**20
    ranks = [
        RankMemory(0, "n0", 0, "scheduler", 100 * mib, 400 * mib),
        RankMemory(1, "n0", 0, "client", 100 * mib, 400 * mib),
        RankMemory(2, "n1", 1, "worker", 150 * mib, 500 * mib),
        RankMemory(3, "n1", 1, "worker", 150 * mib, 500 * mib),
    ]
    nodes = summarize(ranks, 200 * mib)
    assert [(n.node, n.ranks, n.workers, n.pss) for n in nodes] == [
        (0, 2, 0, 200 * mib),
        (1, 2, 2, 300 * mib),
    ]
    assert nodes[1].per_worker_copies == 300 * mib + 200 * mib
    text = format_report(nodes, 1)
    assert "300.00 MiB" in text and "500.00 MiB" in text and text.count("\n") >= 3


def test_srun_without_an_mpi_plugin_is_refused_before_mpi_starts():
    from hpcshare.errors import TopologyError
    from hpcshare.topology import check_launch

    with pytest.raises(TopologyError, match="srun --mpi=pmi2"):
        check_launch({"SLURM_STEP_NUM_TASKS": "6", "SLURM_NTASKS": "6"})  # srun --mpi=none
    check_launch({"SLURM_STEP_NUM_TASKS": "6", "SLURM_MPI_TYPE": "pmi2", "PMI_RANK": "0"})  # srun --mpi=pmi2
    check_launch({"SLURM_STEP_NUM_TASKS": "1", "PMI_RANK": "3"})  # mpiexec's ranks under a one-task step
    check_launch({"SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"})  # Open MPI's mpirun inside sbatch
    check_launch({})  # no Slurm


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        (lambda: {"a": 1}, "returned dict, not an array"),
        (lambda: None, "returned NoneType, not an array"),
        (lambda: (i for i in range(3)), "returned generator, not an array"),
        (lambda: [1, "a", 2.5], "returned list mixing float, int, str"),
    ],
)
def test_a_source_function_that_returns_no_array_is_told_what_it_returned(returned, words):
    from hpcshare.errors import InputError
    from hpcshare.loaders import source_for

    with pytest.raises(InputError, match=words) as err:
        source_for("x", returned).describe()
    assert "input 'x'" in str(err.value)


def test_a_source_function_returning_a_plain_list_of_numbers_still_works():
    from hpcshare.loaders import source_for

    meta = source_for("x", lambda: [1, 2, 3.5]).describe()
    assert meta.shape == (3,) and meta.dtype == np.float64


def test_an_input_name_starting_with_a_dash_is_not_taken_for_an_option():
    from hpcshare.cli import _glue_inputs, _parser

    ns = _parser().parse_args(_glue_inputs(["job", "--input", "-x=a.npy", "-i", "y=b.npy"]))
    assert ns.inputs == [("-x", "a.npy"), ("y", "b.npy")]


def test_an_idle_wait_reports_about_once_a_second_while_it_lasts():
    from hpcshare import sync

    class Request:  # done after 2.5 s, like a barrier the other ranks reach late
        def __init__(self):
            self.done_at = time.monotonic() + 2.5

        def Test(self):  # noqa: N802 (MPI.Request.Test)
            return time.monotonic() >= self.done_at

    ticks: list[float] = []
    sync.wait(Request(), timeout=10, on_wait=ticks.append)  # type: ignore[arg-type]
    assert len(ticks) == 2 and 1.0 <= ticks[0] < 1.5 and 2.0 <= ticks[1] < 2.5, ticks
