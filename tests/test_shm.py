"""Named shared-memory files (shm.py): what a process maps, capacity, and the watcher program. No MPI."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from hpcshare import CapacityError, shm


def test_a_process_lists_the_shared_files_it_maps_and_not_those_unlinked(tmp_path):
    path = tmp_path / "seg"
    path.write_bytes(b"\0" * 4096)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 4096)
    try:
        assert str(path) in shm.mapped_shm_files(str(tmp_path))
        os.unlink(path)
        assert shm.mapped_shm_files(str(tmp_path)) == []  # "(deleted)" maps have no name to remove
    finally:
        mm.close()


def test_too_little_room_is_refused_with_the_sizes_and_the_fix(tmp_path):
    free, _ = shm.free_space(str(tmp_path))
    with pytest.raises(CapacityError, match=r"2 inputs") as err:
        shm.check_capacity(str(tmp_path), free + 2**30, 0, "2 inputs")
    assert "shm-size" in str(err.value) or "remount" in str(err.value)
    shm.check_capacity(str(tmp_path), 1, 0, "1 byte")  # room for that


def test_the_watcher_removes_the_job_files_once_its_ranks_are_gone(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    mapped = tmp_path / "mpich_shm_x"
    puts = tmp_path / "hpcshare-0123456789ab-x1y2z3"  # the job's folder of put objects
    puts.mkdir()
    (puts / "p1x00ff-n0").write_bytes(b"x")
    other = tmp_path / "hpcshare-ba9876543210-p1x0-n0"  # not the job's: not the watcher's to remove
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "spill").write_text("x")
    for p in (mapped, other):
        p.write_bytes(b"x")
    watcher = subprocess.run(
        [sys.executable, "-I", shm.__file__, str(rank.pid), str(mapped), f"{puts}/", f"{scratch}/"],
        timeout=30,
    )
    rank.wait()
    assert watcher.returncode == 0
    assert not mapped.exists() and not puts.exists() and not scratch.exists()
    assert other.exists()


def test_orphans_are_files_that_appeared_and_that_nobody_maps(tmp_path):
    before = shm.names(str(tmp_path))
    (tmp_path / "left").write_bytes(b"x")
    assert shm.orphaned_names(before, str(tmp_path)) == {"left"}
    assert shm.sweep_orphans(before, str(tmp_path)) == ["left"]
    assert shm.names(str(tmp_path)) == set()


def test_a_file_a_live_process_holds_open_is_no_orphan(tmp_path):
    """A Dask cluster's group marker is held open with a lock, never mapped, while the cluster lives."""
    before = shm.names(str(tmp_path))
    (tmp_path / "marker").write_bytes(b"x")
    fd = os.open(tmp_path / "marker", os.O_RDONLY)
    try:
        assert shm.orphaned_names(before, str(tmp_path)) == set()
        assert shm.sweep_orphans(before, str(tmp_path)) == []
    finally:
        os.close(fd)
    assert shm.sweep_orphans(before, str(tmp_path)) == ["marker"]
