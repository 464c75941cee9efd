"""Groups, their files and crash cleanup (hpcshare.anywhere.groups, .files, .lifetimes), without Dask.

Processes that see one shared-memory directory are one group; a group's
files survive any member and go once nobody holds the group, however its
members ended; another user's files are never opened or touched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT

from hpcshare.anywhere import copies, files, groups, lifetimes
from hpcshare.errors import CapacityError, HpcshareError


def _joined_in_child(shm_dir: str, cluster: str, then: str) -> subprocess.CompletedProcess[str]:
    code = f"""
        import os, signal
        from hpcshare.anywhere import groups, copies
        m = groups.join({shm_dir!r}, {cluster!r})
        copies.write(m, "obj", 5, lambda d: d.__setitem__(slice(0, 5), b"hello"), "test")
        print(m.group, flush=True)
        {then}
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_processes_seeing_one_directory_are_one_group_and_others_are_not(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cluster = files.new_token()
    first, second = groups.join(str(a), cluster), groups.join(str(a), cluster)
    elsewhere = groups.join(str(b), cluster)
    try:
        assert first.group == second.group
        assert elsewhere.group != first.group
        assert len(first.group) == 32 and int(first.group, 16) >= 0  # unguessable
        marker = os.stat(files.marker_path(str(a), cluster))
        assert stat.S_IMODE(marker.st_mode) == 0o600
    finally:
        for m in (first, second, elsewhere):
            m.leave()


def test_an_object_is_written_whole_as_a_0600_file_or_not_at_all(tmp_path):
    member = groups.join(str(tmp_path), files.new_token())
    try:
        copies.write(member, "x", 3, lambda d: d.__setitem__(slice(0, 3), b"abc"), "test")
        assert stat.S_IMODE(os.stat(member.path("x")).st_mode) == 0o600
        with copies.map_copy(member.path("x")) as view:
            assert bytes(view) == b"abc"

        def fails(dest):
            raise RuntimeError("the writer failed")

        with pytest.raises(RuntimeError):
            copies.write(member, "y", 3, fails, "test")
        assert sorted(os.listdir(tmp_path)) == sorted(
            [
                os.path.basename(files.marker_path(str(tmp_path), member.cluster)),
                os.path.basename(member.path("x")),
            ]
        )
    finally:
        member.leave()


def test_a_file_system_without_room_is_a_capacity_error_naming_the_fix(tmp_path):
    member = groups.join(str(tmp_path), files.new_token())
    try:
        with pytest.raises(CapacityError, match=r"hpcshare\.shm-dir"):
            copies.write(member, "big", 2**62, lambda d: None, "hpcshare.put of a huge array")
        assert not os.path.exists(member.path("big"))
    finally:
        member.leave()


def test_a_dead_group_is_swept_and_a_live_one_is_not(tmp_path):
    cluster, live_cluster = files.new_token(), files.new_token()
    # a group whose only member was killed with SIGKILL while holding it
    run = _joined_in_child(str(tmp_path), cluster, "os.kill(os.getpid(), signal.SIGKILL)")
    assert run.returncode == -9, run.stderr
    live = groups.join(str(tmp_path), live_cluster)
    copies.write(live, "keep", 1, lambda d: None, "test")
    try:
        removed = lifetimes.sweep(str(tmp_path))
        assert removed == sorted([f"{files.PREFIX}{cluster}.group", f"{files.PREFIX}{cluster}-obj"]), removed
        assert os.path.exists(live.path("keep"))
    finally:
        live.leave()
    assert lifetimes.sweep(str(tmp_path), live_cluster) == sorted(
        [f"{files.PREFIX}{live_cluster}.group", f"{files.PREFIX}{live_cluster}-keep"]
    )
    assert os.listdir(tmp_path) == []


def test_a_writer_killed_mid_put_leaves_a_part_that_the_sweep_removes_from_a_live_group(tmp_path):
    cluster = files.new_token()
    live = groups.join(str(tmp_path), cluster)
    part = files.part_path(str(tmp_path), cluster, "half")
    code = f"""
        import os, signal
        from hpcshare.anywhere import groups, copies
        m = groups.join({str(tmp_path)!r}, {cluster!r})
        copies.write(m, "half", 10, lambda d: os.kill(os.getpid(), signal.SIGKILL), "test")
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert run.returncode == -9
    try:
        assert os.path.exists(part)
        assert lifetimes.sweep(str(tmp_path)) == [os.path.basename(part)]
        assert os.path.exists(files.marker_path(str(tmp_path), cluster))  # the live group stays
    finally:
        live.leave()
        lifetimes.sweep(str(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_another_users_files_are_refused_and_never_swept(tmp_path):
    os.chmod(tmp_path, 0o1777)
    cluster = files.new_token()
    marker = files.marker_path(str(tmp_path), cluster)
    theirs = files.object_path(str(tmp_path), files.new_token(), "x")
    for path in (marker, theirs):
        with open(path, "w") as f:
            f.write("0" * 32)
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)  # nobody's
    with pytest.raises(HpcshareError, match="owned by uid 65534"):
        groups.join(str(tmp_path), cluster)
    assert lifetimes.sweep(str(tmp_path)) == []
    assert os.path.exists(marker) and os.path.exists(theirs)


def test_a_waiting_fetcher_sees_a_finished_or_dead_writer_and_never_removes_a_live_or_renamed_file(tmp_path):
    # a worker whose fetch found another's .part waits on _writer_gone (CI once saw it unlink a .part
    # its writer had just renamed into place, and fail the task with FileNotFoundError)
    import fcntl

    from hpcshare.anywhere import files, transfer
    from hpcshare.anywhere.groups import Member

    member = Member(shm_dir=str(tmp_path), cluster="c" * 32, group="g", fd=-1)
    part, final = files.part_path(member.shm_dir, member.cluster, "obj"), member.path("obj")

    writer = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(writer, fcntl.LOCK_EX)
    assert transfer._writer_gone(member, "obj") is False  # at work: wait
    os.rename(part, final)  # done: renamed into place, then closed (the order copies.write keeps)
    assert transfer._writer_gone(member, "obj") is True
    os.close(writer)
    assert transfer._writer_gone(member, "obj") is True and os.path.exists(final)
    os.unlink(final)

    stale = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(stale)  # its writer died: no lock
    assert transfer._writer_gone(member, "obj") is True
    assert not os.path.exists(part)  # removed, so the next fetch can write

    # the lock is free but the path is a new writer's file by the time it is looked at: left alone
    old = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    real_flock = fcntl.flock

    def swap_then_lock(fd, op):
        os.unlink(part)
        new = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(new)
        return real_flock(fd, op)

    fcntl.flock = swap_then_lock
    try:
        assert transfer._writer_gone(member, "obj") is True
    finally:
        fcntl.flock = real_flock
        os.close(old)
    assert os.path.exists(part)  # the new writer's file stays
