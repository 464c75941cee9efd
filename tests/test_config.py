"""Configuration (config.py): defaults, Dask config and options, bad values named. No MPI."""

from __future__ import annotations

import dask
import pytest

from hpcshare import ConfigError
from hpcshare.config import JobConfig


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
    "text, seconds", [(120, 120.0), ("90", 90.0), ("2 minutes", 120.0), ("1 hour", 3600.0)]
)
def test_durations_are_read_as_seconds(text, seconds):
    from hpcshare.config import seconds as parse

    assert parse("timeout", text) == seconds


@pytest.mark.parametrize("text", [0, -5, "soon", None])
def test_a_bad_duration_names_the_key_and_an_example(text):
    from hpcshare.config import seconds

    with pytest.raises(ConfigError, match=r"placement_timeout must be a positive duration such as 120"):
        seconds("placement_timeout", text)


def test_the_timeout_before_a_job_config_exists_comes_from_dask_config():
    from hpcshare.config import default_timeout

    with dask.config.set({"hpcshare.timeout": "3 minutes"}):
        assert default_timeout() == 180.0
    with dask.config.set({"hpcshare.timeout": "never"}):  # the job's own check names it later
        assert default_timeout() == 120.0
