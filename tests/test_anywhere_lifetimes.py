"""Lifetimes on a Dask cluster hpcshare did not start: objects go with free, with the client that
put them, with the cluster; after kill -9 of everything, with the next hpcshare process or
``python -m hpcshare clean``, never touching a live cluster's objects.

The module's clusters keep their objects in a shared-memory directory of
its own (``hpcshare.shm-dir``, 1777 like /dev/shm): on a machine shared
with other users of hpcshare, their workers' sweeps of /dev/shm would
otherwise remove a dead cluster's files before the test looks."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import ROOT, run_cmd

import hpcshare
from hpcshare.anywhere import files
from hpcshare.errors import ResolveError

SHM = ""  # the module's hpcshare.shm-dir (see above), made by private_shm
DEV_SHM = "/dev/shm"  # where Python's semaphores are


@pytest.fixture(scope="module", autouse=True)
def private_shm():
    global SHM
    SHM = tempfile.mkdtemp(prefix="hpcshare-lifetimes-")
    os.chmod(SHM, 0o1777)
    before = os.environ.get("DASK_HPCSHARE__SHM_DIR")
    os.environ["DASK_HPCSHARE__SHM_DIR"] = SHM  # for the module's subprocesses
    try:
        with dask.config.set({"hpcshare.shm-dir": SHM}):  # for this process and its clusters
            yield SHM
    finally:
        if before is None:
            del os.environ["DASK_HPCSHARE__SHM_DIR"]
        else:
            os.environ["DASK_HPCSHARE__SHM_DIR"] = before
        deadline = time.monotonic() + 20  # nannies sweep once their workers have ended
        while (left := os.listdir(SHM)) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(SHM, ignore_errors=True)
        assert not left, f"left behind in {SHM}: {left}"


def _files_of(cluster: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(files.PREFIX + cluster))


def _gone(cluster: str, name: str = "", within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(n.endswith(name) for n in _files_of(cluster)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(n.endswith(name) for n in _files_of(cluster))


@pytest.fixture(scope="module")
def cluster(private_shm):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def test_objects_go_when_the_client_that_put_them_closes(cluster):
    with Client(cluster) as keeper:  # another client stays: the cluster goes on
        with Client(cluster, set_as_default=False) as putter:
            handle = putter.submit(hpcshare.put, np.ones(1000), pure=False).result()
            name, gen = handle.name, files.cluster_of(handle.generation)
            assert keeper.submit(lambda h: float(h.resolve().sum()), handle).result() == 1000.0
        assert _gone(gen, name), _files_of(gen)
        with pytest.raises(ResolveError, match="closed or disconnected"):
            keeper.submit(lambda h: h.resolve(), handle, pure=False).result()


def test_objects_go_when_the_cluster_closes():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c, Client(c):
        handle = hpcshare.put(np.ones(1000))
        gen = files.cluster_of(handle.generation)
        assert len(_files_of(gen)) == 2  # the group's marker and the object
    assert _gone(gen)


def test_a_nanny_given_the_plugin_twice_holds_the_group_once_and_leaves_nothing(tmp_path):
    # Dask's Nanny replaces a nanny plugin of the same name without tearing the old one down;
    # a nanny that registered while hpcshare's plugins were being registered got them twice, and
    # the first one's lock lived as long as the nanny's process: its host's group marker stayed
    # once the cluster ended (a hosts test, 1 in 10 runs). Here the nannies are this process's.
    from hpcshare.anywhere import lifetimes, plugins

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c, Client(c) as client:
        (nanny,) = c.workers.values()
        dasks_check = nanny.periodic_callbacks.get("memory_monitor")  # before hpcshare's plugins
        handle = hpcshare.put(np.ones(1000))
        gen = files.cluster_of(handle.generation)
        marker = files.marker_path(SHM, gen)
        again = plugins.NannySide(gen)
        again.idempotent = False  # the scheduler sends it on: the nanny gets it a second time
        client.register_plugin(again)
        assert lifetimes.holders(marker).count(os.getpid()) == 1  # this process's nanny: one lock
    assert nanny.periodic_callbacks.get("memory_monitor") is dasks_check  # Dask's own check back
    assert _gone(gen), _files_of(gen)


_KILLED = """
    import os, sys, time
    from multiprocessing import resource_tracker
    import numpy as np
    from distributed import Client, LocalCluster
    import hpcshare
    from hpcshare.anywhere import files

    _register = resource_tracker.register

    def register(name, rtype):  # Python's semaphores in /dev/shm, which kill -9 leaves: the test removes them
        if rtype == "semaphore":
            print("SEM", name, flush=True)
        _register(name, rtype)

    resource_tracker.register = register
    if __name__ == "__main__":
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
        client = Client(cluster)
        h = hpcshare.submit(client, np.ones, 1000).result()
        print("CLUSTER", files.cluster_of(h.generation), flush=True)
        time.sleep(600)
"""


def _killed_cluster(tmp_path) -> str:
    """A LocalCluster that put an object, then kill -9 of every one of its processes; its name.

    Afterwards it removes the multiprocessing semaphores (``sem.mp-*``) that
    the dead processes left in /dev/shm: Python's, not hpcshare's, but this
    test's to clean.
    """
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = []
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and not line.startswith("CLUSTER "):
            lines.append(line)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # client, scheduler, nannies, workers: one session
        rest, _ = proc.communicate(timeout=30)
    for entry in [*lines, *rest.splitlines()]:
        if entry.startswith("SEM /"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(DEV_SHM, "sem." + entry.split()[1][1:]))
    assert line.startswith("CLUSTER "), "the cluster did not start"
    time.sleep(0.5)  # the kernel drops the dead processes' locks
    return line.split()[1]


def test_after_kill_9_of_everything_clean_removes_the_dead_files_and_not_a_live_clusters(cluster, tmp_path):
    with Client(cluster) as client:
        live = hpcshare.put(np.ones(10))  # the cluster's workers have swept as they joined: before the kill
        dead = _killed_cluster(tmp_path)
        assert len(_files_of(dead)) == 2, "kill -9 should have left the marker and the object"
        run = run_cmd([sys.executable, "-m", "hpcshare", "clean"], timeout=60)
        assert run.returncode == 0, run
        assert _files_of(dead) == []
        assert "2 file(s) of dead Dask clusters removed" in run.stdout, run
        assert client.submit(lambda h: float(h.resolve().sum()), live).result() == 10.0  # untouched
        hpcshare.free(live)


def test_after_kill_9_the_next_hpcshare_cluster_on_the_host_sweeps(tmp_path):
    dead = _killed_cluster(tmp_path)
    assert _files_of(dead)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c, Client(c):
        hpcshare.free(hpcshare.put(np.ones(10)))  # first use: its workers and nannies sweep as they join
        assert _files_of(dead) == []


# --- another user on the same host ----------------------------------------------------------------

_THEIRS = """
    import sys
    import numpy as np
    from distributed import Client, LocalCluster
    import hpcshare
    from hpcshare.anywhere import files
    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c, Client(c) as client:
            h = hpcshare.put(np.ones(1000))
            print(files.cluster_of(h.generation), flush=True)
            sys.stdin.readline()  # until the test has done its worst
            print(client.submit(lambda h: float(h.resolve().sum()), h).result(), flush=True)
"""


# run as the other user: how many of ``paths`` refused ``what`` (a statement on ``p``)
_DENIED = """
import os
denied = 0
for p in {paths!r}:
    try:
        {what}
    except PermissionError:
        denied += 1
print(denied)
"""


def _missing_users() -> str | None:
    if os.geteuid() != 0:
        return "making another user needs root"
    absent = [c for c in ("useradd", "userdel", "runuser") if shutil.which(c) is None]
    return f"making another user needs {', '.join(absent)} (Debian: passwd, util-linux)" if absent else None


@contextlib.contextmanager
def _another_user():
    """A user of its own for the block (useradd) and its home (a new folder); both removed afterwards."""
    name = "hsh" + secrets.token_hex(4)
    home = tempfile.mkdtemp(prefix="hpcshare-user-")  # not under pytest's tmp_path: that is 0700 root's
    subprocess.run(["useradd", "--no-create-home", "--home-dir", home, name], check=True, timeout=60)
    try:
        shutil.chown(home, name)
        yield name, home
    finally:
        _end_processes_of(name)  # userdel refuses a user whose processes (a cluster's workers) still run
        subprocess.run(["userdel", name], check=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def _end_processes_of(user: str, timeout: float = 30) -> None:
    """SIGKILL every process of ``user`` (made by the test), by pid, until none is left."""
    import psutil

    deadline = time.monotonic() + timeout
    while procs := [p for p in psutil.process_iter(["username"]) if p.info["username"] == user]:
        assert time.monotonic() < deadline, f"processes of {user} would not end: {procs}"
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=5)


def _as(user: str, home, args: list[str], **kw) -> subprocess.Popen:
    """Run ``args`` as ``user``, with a Python that user can run and this environment's packages."""
    import site
    import sysconfig

    python = _python_for_others()
    path = [str(ROOT)] + (
        [] if python == sys.executable else [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join(path),
        "OMP_NUM_THREADS": "1",
        "DASK_HPCSHARE__SHM_DIR": SHM,
    }
    return subprocess.Popen(
        ["runuser", "-u", user, "--", python, *args], env=env, cwd=str(home), start_new_session=True, **kw
    )


def _python_for_others() -> str:
    """This Python if every user may run it (a venv under /root may not be), else the system's of the same version."""
    real = os.path.realpath(sys.executable)
    if all(os.stat(d).st_mode & 0o001 for d in _parents(real)) and os.stat(real).st_mode & 0o005 == 0o005:
        return sys.executable
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(system):
        pytest.skip(f"{real} is not executable by other users and there is no {system}")
    return system


def _parents(path: str) -> list[str]:
    parts = []
    while (path := os.path.dirname(path)) not in parts:
        parts.append(path)
    return parts


def test_another_users_live_objects_are_never_touched_and_ours_are_closed_to_them(cluster, tmp_path):
    missing = _missing_users()
    if missing:
        pytest.skip(missing)
    with _another_user() as (user, home):
        script = os.path.join(home, "theirs.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(_THEIRS))
        os.chmod(script, 0o644)
        theirs = _as(user, home, [script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert theirs.stdout is not None and theirs.stdin is not None
            their_cluster = theirs.stdout.readline().strip()
            assert their_cluster, "the other user's cluster did not start"
            their_files = _files_of(their_cluster)
            assert len(their_files) == 2  # the group's marker and the object

            with Client(cluster) as client:
                live = hpcshare.put(np.ones(10))  # its workers swept as they joined: before the kill
                dead = _killed_cluster(tmp_path)  # ours: every process killed with kill -9
                assert len(_files_of(dead)) == 2
                ours = [os.path.join(SHM, n) for n in _files_of(files.cluster_of(live.generation))]
                for what in ("open(p).read()", "os.unlink(p)"):  # they can neither read nor remove ours
                    probe = _as(
                        user,
                        home,
                        ["-c", _DENIED.format(paths=ours, what=what)],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    out, _ = probe.communicate(timeout=60)
                    assert out.split() == [str(len(ours))], (what, out)

                run = run_cmd([sys.executable, "-m", "hpcshare", "clean"], timeout=60)  # as root, too
                assert run.returncode == 0 and _files_of(dead) == [], run
                assert "2 file(s) of dead Dask clusters removed" in run.stdout, run
                # a new cluster of ours: its workers and nannies sweep as they start
                with (
                    LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c2,
                    Client(c2, set_as_default=False) as other,
                ):
                    other.submit(hpcshare.put, np.ones(10), pure=False).result()
                assert _files_of(their_cluster) == their_files  # theirs untouched by either
                assert client.submit(lambda h: float(h.resolve().sum()), live).result() == 10.0
                hpcshare.free(live)
            theirs.stdin.write("\n")
            theirs.stdin.flush()
            assert theirs.stdout.readline().strip() == "1000.0"  # their object still resolves
            assert theirs.wait(timeout=60) == 0
        finally:
            if theirs.poll() is None:
                os.killpg(theirs.pid, signal.SIGKILL)
                theirs.wait()
    assert _files_of(their_cluster) == []  # their cluster removed its own as it closed
