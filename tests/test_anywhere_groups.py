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
import threading
import time

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


def test_a_new_part_is_locked_before_it_appears_so_a_waiting_fetcher_never_removes_it(tmp_path):
    # a waiter that looked between a writer's making of its .part and its lock found it unlocked,
    # took it for a dead writer's and unlinked it; the writer's rename then failed with
    # FileNotFoundError (a hosts test, once in 8 runs). Here the waiter looks exactly then.
    import fcntl

    from hpcshare.anywhere import transfer
    from hpcshare.anywhere.groups import Member

    member = Member(shm_dir=str(tmp_path), cluster="c" * 32, group="g", fd=-1)
    real_flock = fcntl.flock
    looking, looks = False, []

    def a_waiter_looks_before_each_lock(fd, op):
        nonlocal looking
        if not looking:  # before each lock the writer takes, a waiting fetcher looks
            looking = True
            try:
                looks.append((os.listdir(tmp_path), transfer._writer_gone(member, "obj")))
            finally:
                looking = False
        return real_flock(fd, op)

    fcntl.flock = a_waiter_looks_before_each_lock
    try:
        copies.write(member, "obj", 5, lambda d: d.__setitem__(slice(0, 5), b"hello"), "test")
    finally:
        fcntl.flock = real_flock
    assert looks == [([], True)]  # one lock, taken before the .part had a name: nothing to remove
    with open(member.path("obj"), "rb") as f:
        assert f.read() == b"hello"
    assert os.listdir(tmp_path) == [os.path.basename(member.path("obj"))]


def test_the_last_member_leaving_while_a_client_looks_leaves_nothing_behind(tmp_path):
    # a worker (the group's last member) that left while a client held the marker, for a put or
    # a resolve or only to test whether the group was alive, found it locked and could not sweep;
    # the client then dropped its lock without sweeping, and the group's files stayed for good
    import fcntl

    shm, cluster = str(tmp_path), files.new_token()

    # a client's put or resolve holds the group for its block: the last worker leaves meanwhile
    worker = groups.join(shm, cluster)
    copies.write(worker, "obj", 5, lambda d: d.__setitem__(slice(0, 5), b"hello"), "test")
    with groups.joined(shm, cluster) as client:
        assert client is not None
        worker.leave()
        assert lifetimes.sweep(shm, cluster) == []  # the worker's sweep: the client holds it
    assert os.listdir(tmp_path) == []  # the client, the last to leave, swept

    # a client that only tests whether the group is alive holds the marker exclusively for a moment
    worker = groups.join(shm, cluster)
    real_flock = fcntl.flock
    worker_swept: list[list[str]] = []

    def the_worker_leaves_as_the_client_tests(fd, op):
        if op == fcntl.LOCK_EX | fcntl.LOCK_NB and not worker_swept:
            worker.leave()
            result = real_flock(fd, op)
            worker_swept.append(lifetimes.sweep(shm, cluster))  # meets the client's lock
            return result
        return real_flock(fd, op)

    fcntl.flock = the_worker_leaves_as_the_client_tests
    try:
        assert groups.probe(shm, cluster) is None  # dead once the worker left
    finally:
        fcntl.flock = real_flock
    assert worker_swept == [[]]
    assert os.listdir(tmp_path) == []


def _holding(shm_dir: str, cluster: str, then: str) -> subprocess.Popen[str]:
    """A process that joins ``cluster``'s group, prints READY, then runs ``then``."""
    code = f"""
        import os, sys
        from hpcshare.anywhere import groups
        m = groups.join({shm_dir!r}, {cluster!r})
        print("READY", flush=True)
        {then}
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "READY\n"
    return proc


def test_a_closing_nannys_sweep_waits_for_ending_holders_and_not_for_live_ones(tmp_path):
    """What a nanny whose workers Dask killed together does once its own worker has ended: the
    others may still hold the group for a moment. The sweep tries again while only ending
    processes hold it, and leaves a group a live process holds at once."""
    shm, cluster = str(tmp_path), files.new_token()
    marker = files.marker_path(shm, cluster)
    live = _holding(shm, cluster, "sys.stdin.read()")
    try:
        assert lifetimes.holders(marker) == [live.pid]
        start = time.monotonic()
        assert lifetimes.sweep_when_unheld(shm, cluster, timeout=60) == []
        assert time.monotonic() - start < 30  # it did not wait for the live member
        assert os.path.exists(marker)
    finally:
        live.communicate("", timeout=60)
    # a holder that has ended while a process it forked still holds its lock (as /proc/locks shows
    # it: the pid that took the lock, gone); the forked one ends when its stdin closes
    ending = _holding(shm, cluster, "(sys.stdin.read() if os.fork() == 0 else None); os._exit(0)")
    assert ending.wait(60) == 0
    assert lifetimes.sweep(shm, cluster) == []  # still held
    result: list[list[str]] = []
    sweeper = threading.Thread(
        target=lambda: result.append(lifetimes.sweep_when_unheld(shm, cluster, timeout=60))
    )
    sweeper.start()
    sweeper.join(0.5)
    assert sweeper.is_alive(), result  # trying again, not given up
    assert ending.stdin is not None
    ending.stdin.close()
    sweeper.join(60)
    assert result == [[os.path.basename(marker)]]
    assert os.listdir(tmp_path) == []
    for proc in (live, ending):
        if proc.stdout is not None:
            proc.stdout.close()
