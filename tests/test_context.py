"""The running job's state (context.py) and the registry handles resolve in (registry.py). No MPI."""

from __future__ import annotations

import numpy as np
import pytest

from hpcshare import ArrayHandle, HpcshareError, ResolveError, context, registry


def test_a_job_context_is_current_only_inside_its_block_and_undoes_its_patches_in_reverse():
    undone = []
    assert context.current() is None
    with context.running(context.JobContext(generation="aaaaaaaaaaaa")) as job:
        assert context.current() is job
        job.on_end(lambda: undone.append("first"))
        job.on_end(lambda: undone.append("second"))
        registry.register("x", job.generation, np.arange(3.0))
        assert registry.lookup("x")[0] == "aaaaaaaaaaaa"
    assert context.current() is None
    assert undone == ["second", "first"]
    assert job.arrays == {}  # what it held is dropped with it


def test_a_second_job_starts_empty_and_the_first_ones_handles_say_it_ended():
    old = ArrayHandle("x", (3,), np.dtype("f8"), "C", "bbbbbbbbbbbb")
    with context.running(context.JobContext(generation="bbbbbbbbbbbb")):
        registry.register("x", "bbbbbbbbbbbb", np.arange(3.0))
        assert float(old.resolve().sum()) == 3.0
    with context.running(context.JobContext(generation="cccccccccccc")):
        assert registry.registered_views() == []
        with pytest.raises(ResolveError, match="the job that placed it has ended"):
            old.resolve()


def test_a_registered_array_is_read_only_and_freeing_it_says_why():
    with context.running(context.JobContext(generation="dddddddddddd")):
        a = np.arange(4.0)
        registry.register("lut", "dddddddddddd", a)
        assert not a.flags.writeable
        registry.unregister("lut", "dddddddddddd", why="it was freed by hpcshare.free().")
        h = ArrayHandle("lut", (4,), np.dtype("f8"), "C", "dddddddddddd")
        with pytest.raises(ResolveError, match=r"input 'lut'.*freed by hpcshare.free"):
            h.resolve()


def test_runs_cannot_be_nested_in_one_process():
    with context.running(context.JobContext(generation="eeeeeeeeeeee")):
        with pytest.raises(HpcshareError, match="cannot be nested"):
            with context.running(context.JobContext()):
                pass
        assert context.current().generation == "eeeeeeeeeeee"  # the outer job is untouched


def test_registering_outside_a_job_says_no_job_is_running():
    with pytest.raises(ResolveError, match="no hpcshare job"):
        registry.register("x", "ffffffffffff", np.zeros(1))


def test_a_rank_knows_its_launcher_died_also_before_a_job_runs(monkeypatch):
    # hpcshare job records the launcher before MPI starts, long before run() makes the job's context:
    # a rank whose launcher died in between must not try MPI_Abort, which would hang without it
    import os

    from hpcshare import ending

    assert context.current() is None
    monkeypatch.setattr(context.PROCESS, "launcher", os.getppid())
    assert not ending.launcher_gone()
    monkeypatch.setattr(context.PROCESS, "launcher", os.getppid() + 1)  # another process started us: it died
    assert ending.launcher_gone()
    with context.running(context.JobContext(generation="g1")) as job:
        job.launcher = os.getppid()  # the job's own record wins
        assert not ending.launcher_gone()
