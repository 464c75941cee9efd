"""Another user on the same node, probing a running job: what they can see, make and reach.

The probes run as a second, unprivileged account that each test creates and
removes (as root; skipped otherwise). The job itself runs as this test's user.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, kill_job, mpiexec


@pytest.fixture
def other_user() -> Iterator[str]:
    """A fresh unprivileged account, removed afterwards (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user (useradd) and to run as it (runuser)")
    name = f"hpcprobe{secrets.token_hex(3)}"
    made = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _python_for(user: str) -> str:
    """A Python interpreter ``user`` may run (this one may live in root's home)."""
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if (
            subprocess.run(
                ["runuser", "-u", user, "--", python, "-c", "pass"], capture_output=True
            ).returncode
            == 0
        ):
            return python
    pytest.skip(f"no Python interpreter that {user} may run")


@contextlib.contextmanager
def as_user(user: str, script: str, *args: str) -> Iterator[dict]:
    """Run ``script`` (Python, standard library only) as ``user`` for the block.

    It prints one JSON object (the block gets it), then holds what it made
    until its stdin closes at the block's end: files it maps are safe from
    the sweepers of other test runs on this machine, which take unmapped ones.
    """
    proc = subprocess.Popen(
        ["runuser", "-u", user, "--", _python_for(user), "-I", "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)
        yield json.loads(line)
    finally:
        proc.communicate(timeout=60)  # closes its stdin: it lets go
        assert proc.returncode == 0, proc.returncode


class Job:
    """``mpiexec -n N python -m hpcshare job JOBFILE`` whose main publishes a probe file, then waits."""

    def __init__(self, tmp_path: Path, jobfile: str, n: int = 5, *args: str) -> None:
        self.dir = tmp_path
        (tmp_path / "job.py").write_text(jobfile)
        env = {**os.environ, "PROBE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [
                mpiexec(),
                "-n",
                str(n),
                sys.executable,
                "-m",
                "hpcshare",
                "job",
                str(tmp_path / "job.py"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

    def probe(self, timeout: float = 120) -> dict:
        """What main published, once it has."""
        deadline = time.monotonic() + timeout
        path = self.dir / "probe.json"
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the job did not publish its probe: {self.proc.communicate()}")
            time.sleep(0.1)
        time.sleep(0.2)
        result: dict = json.loads(path.read_text())
        return result

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Let main go on; its exit code and output."""
        (self.dir / "go").touch()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s: {self.proc.communicate()}")
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_job(self.proc)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


WAIT_FOR_GO = """
def wait_for_go():
    out = Path(os.environ["PROBE_DIR"])
    deadline = time.monotonic() + 90
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
"""

# --- 1, 2: the job's shared-memory files --------------------------------------------------

PUTS = (
    """
import json, os, time
from pathlib import Path
import numpy as np
import hpcshare
from hpcshare import context
"""
    + WAIT_FOR_GO
    + """
def measured(dask_worker):
    return dask_worker.monitor.get_process_memory(), dask_worker.status.name

def main(client, inputs):
    job = context.current()
    first = hpcshare.put(np.arange(1000.0))
    Path(os.environ["PROBE_DIR"], "probe.json").write_text(json.dumps(
        {"generation": job.generation, "folder": job.shm_dir, "name": first.name}
    ))
    wait_for_go()
    time.sleep(1.5)  # the workers' monitors look at the node's objects again
    later = [hpcshare.put(np.full(1000, float(k))) for k in range(5)]
    sums = client.gather(client.map(lambda h: float(h.resolve().sum()), later, pure=False))
    memory = client.run(measured)
    print("RESULT " + json.dumps({"sums": sums, "memory": memory}), flush=True)
"""
)

HOSTILE_SHM = """
import json, mmap, os, sys
generation, folder, name = sys.argv[1:4]
made, refused = [], []
def attempt(what, fn):
    try:
        fn()
        made.append(what)
    except OSError as exc:
        refused.append(f"{what}: {type(exc).__name__}")
held = []
def plant(path):
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    os.ftruncate(fd, 2**40 if "-zz-" in path else 4096)  # "1 TiB", sparse
    held.append(mmap.mmap(fd, 4096))
    os.close(fd)
for node in (0, 1):  # the names the job used to count and to create
    for fake in ("zz", *(f"p{rank}x{k}" for rank in range(5) for k in range(40))):
        path = f"/dev/shm/hpcshare-{generation}-{fake}-n{node}"
        attempt(path, lambda: plant(path))
attempt("list the job's folder", lambda: os.listdir(folder))
attempt("create in the job's folder", lambda: os.close(os.open(os.path.join(folder, "x-n0"), os.O_CREAT | os.O_WRONLY)))
attempt("read an object", lambda: open(os.path.join(folder, f"{name}-n0"), "rb").read())
print(json.dumps({"made": made, "refused": refused}), flush=True)
sys.stdin.read()
"""


@pytest.mark.usefixtures("clean_shm")
def test_another_users_files_are_never_counted_or_touched_and_cannot_block_puts(tmp_path, other_user):
    planted: list[str] = []
    try:
        job = Job(tmp_path, PUTS, 5, "-q", "--ranks-per-node", "3")
        probe = job.probe()
        folder = probe["folder"]
        assert folder.startswith("/dev/shm/hpcshare-") and os.stat(folder).st_mode & 0o777 == 0o700
        with as_user(other_user, HOSTILE_SHM, probe["generation"], folder, probe["name"]) as hostile:
            planted = hostile["made"]
            assert len(planted) == 2 * 201, hostile  # they could plant every name the old scheme used...
            assert sorted(r.split(":")[0] for r in hostile["refused"]) == [
                "create in the job's folder",
                "list the job's folder",
                "read an object",
            ], hostile  # ...but reach nothing of the job's
            code, out, err = job.finish()
            time.sleep(2)  # the watcher has seen the ranks go
            survived = [p for p in planted if os.path.exists(p)]
    finally:
        job.kill()  # a no-op once it has ended
        for path in planted:
            with contextlib.suppress(OSError):
                os.unlink(path)
    assert code == 0, (out, err)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["sums"] == [1000.0 * k for k in range(5)], result  # every later put worked
    for worker, (memory, status) in result["memory"].items():
        assert status == "running" and memory < 2**30, (worker, memory, status)  # nobody paused
    assert "Pausing worker" not in err, err
    assert not os.path.exists(folder)
    assert survived == planted  # the job (and its watcher, as root here) left the other user's files alone


# --- 3: the HTTP servers ---------------------------------------------------------------------

HTTP_JOB = (
    """
import json, os, time
from pathlib import Path
"""
    + WAIT_FOR_GO
    + """
def ports(dask_worker=None, dask_scheduler=None):
    server = dask_worker or dask_scheduler
    return {"http": server.http_server.port, "comms": [int(x.listen_address.rsplit(":", 1)[1]) for x in server.listeners]}

def main(client, inputs):
    found = [*client.run(ports).values(), client.run_on_scheduler(ports)]
    Path(os.environ["PROBE_DIR"], "probe.json").write_text(json.dumps({
        "pids": [os.getpid(), *client.run(os.getpid).values(), client.run_on_scheduler(os.getpid)],
        "http": [f["http"] for f in found],
        "comms": sum((f["comms"] for f in found), []),
    }))
    wait_for_go()
"""
)

# connects to every address given and asks for Dask's worker page; prints what each answered
PROBE_HTTP = """
import json, socket, sys
answers = {}
for target in sys.argv[1:]:
    try:
        if target.startswith("/"):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(target)
        else:
            host, port = target.rsplit(":", 1)
            s = socket.create_connection((host, int(port)), timeout=1)
        s.sendall(b"GET /info/main/workers.html HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n")
        try:
            answers[target] = s.recv(200).decode("latin-1")
        except OSError as exc:
            answers[target] = f"no answer: {type(exc).__name__}"
        s.close()
    except OSError as exc:
        answers[target] = f"refused: {type(exc).__name__}"
print(json.dumps(answers), flush=True)
"""


def _tcp_listeners(pids: list[int]) -> set[str]:
    """The TCP listeners of the job's ranks, less the launcher's own (held by mpiexec too)."""
    launcher = {
        p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("mpiexec", "mpirun", "prterun")
    }
    seen: dict[str, set[int]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid is not None:
            seen.setdefault(f"{c.laddr.ip}:{c.laddr.port}", set()).add(c.pid)
    return {a for a, holders in seen.items() if holders & set(pids) and not holders & launcher}


def _probe(user: str | None, targets: list[str]) -> dict:
    if user is None:
        run = subprocess.run(
            [sys.executable, "-I", "-c", PROBE_HTTP, *targets], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run
        answers: dict = json.loads(run.stdout)
        return answers
    with as_user(user, PROBE_HTTP + "\nsys.stdin.read()\n", *targets) as answers:
        return answers


@pytest.mark.usefixtures("clean_shm")
def test_no_dask_process_answers_http_to_anyone_unless_the_dashboard_is_asked_for(tmp_path, other_user):
    with Job(tmp_path, HTTP_JOB, 4, "-q") as job:
        probe = job.probe()
        listeners = _tcp_listeners(probe["pids"])
        former = [f"127.0.0.1:{port}" for port in probe["http"]]  # where Dask's HTTP servers were
        assert not set(former) & listeners, (former, listeners)
        assert {int(a.rsplit(":", 1)[1]) for a in listeners} >= set(probe["comms"])
        for user in (None, other_user):  # root, then another user
            answers = _probe(user, sorted(listeners) + former)
            http = {t: a for t, a in answers.items() if a.startswith("HTTP/")}
            assert not http, (user, http)
            assert all(answers[t].startswith("refused") for t in former), answers
        code, out, err = job.finish()
    assert code == 0, (out, err)


@pytest.mark.usefixtures("clean_shm")
def test_the_dashboard_is_on_a_unix_socket_only_the_jobs_user_reaches(tmp_path, other_user):
    with Job(tmp_path, HTTP_JOB, 4, "--dashboard") as job:
        probe = job.probe()
        listeners = _tcp_listeners(probe["pids"])
        sockets = [
            c.laddr
            for pid in probe["pids"]
            for c in psutil.Process(pid).net_connections(kind="unix")
            if c.laddr.endswith("/dashboard.sock")
        ]
        assert len(sockets) == 1, sockets
        path = sockets[0]
        assert (
            os.stat(path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        )
        mine = _probe(None, [path, *sorted(listeners)])
        assert mine[path].startswith("HTTP/1.1 200"), mine  # the job's user gets the page
        assert not [t for t, a in mine.items() if t != path and a.startswith("HTTP/")], mine
        theirs = _probe(other_user, [path, *sorted(listeners)])
        assert theirs[path] == "refused: PermissionError", theirs
        assert not [t for t, a in theirs.items() if a.startswith("HTTP/")], theirs
        code, out, err = job.finish()
    assert code == 0, (out, err)
    assert f"ssh -N -J LOGIN-NODE -L 8787:{path} " in err, err
