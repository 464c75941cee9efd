"""Jobs across emulated hosts (tests/hosts.py): each host its own /dev/shm, name and address.

One set of three hosts serves the module. Jobs run on the first two (3 ranks
on host 0: scheduler, client, a worker; 2 workers on host 1); the third is
the outsider of the TLS test. After every test each host's /dev/shm is empty.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from helpers import assert_clean_success, kill_job, report_rows

pytestmark = pytest.mark.hosts

RANKS = [3, 2]  # host 0: scheduler, client, a worker; host 1: two workers
MiB = 2**20

# a job's view of every host's /dev/shm while it runs: bytes in use (MPI's windows are unlinked
# files, counted here all the same) and the files there, from the client and from every worker
SHM_PROBE = """
import json, os, socket

def shm_now():
    st = os.statvfs("/dev/shm")
    files = {}
    for top, _, names in os.walk("/dev/shm"):  # put objects live in the job's private folder there
        for n in names:
            path = os.path.join(top, n)
            files[os.path.relpath(path, "/dev/shm")] = os.stat(path).st_size
    return socket.gethostname(), {"used": (st.f_blocks - st.f_bfree) * st.f_frsize, "files": files}

def print_shm(client, label):
    print(label, json.dumps(dict([shm_now(), *client.run(shm_now).values()])), flush=True)
"""


def shm_seen(stdout: str, label: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith(label + " "))
    return json.loads(line[len(label) + 1 :])


@pytest.fixture(scope="module")
def three(hosts):
    return hosts(3)


@pytest.fixture(autouse=True)
def hosts_shm_clean(three):
    """Fail a test that leaves anything in any host's /dev/shm."""
    yield
    deadline = time.monotonic() + 10
    while (left := {h: three.shm_files(h) for h in three.names if three.shm_files(h)}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not left, f"left behind in the hosts' /dev/shm: {left}"


def test_demo_runs_across_two_hosts_with_one_copy_per_host(three):
    run = three.hpcshare(RANKS, "job", "--demo-size", "32MiB", timeout=180)
    assert_clean_success(run)
    assert "16 tasks OK, all match plain NumPy" in run.stdout, run
    assert "on 2 node(s)" in run.stderr, run
    rows = report_rows(run.stdout)
    assert [(r["ranks"], r["workers"]) for r in rows] == [(3, 1), (2, 2)], run.stdout
    assert all(r["inputs"] == 32 * MiB for r in rows), run.stdout
    for name in three.names[:2]:  # the report names each host by its own name
        assert f"  {name}  " in run.stdout, run.stdout


def test_npy_and_hdf5_inputs_are_read_once_per_job_and_held_once_per_host(three, tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3 * MiB, dtype=np.float64))  # 24 MiB
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("grid", data=np.ones((2 * MiB,), dtype=np.float64))  # 16 MiB
    (tmp_path / "job.py").write_text(
        SHM_PROBE
        + textwrap.dedent(
            """
            import numpy as np

            def total(h):
                return float(np.asarray(h).sum())

            def main(client, inputs):
                print_shm(client, "SHM")
                for name in sorted(inputs):
                    sums = set(client.run(lambda h=inputs[name]: total(h)).values())
                    print(name, "sums", sorted(sums), flush=True)
            """
        )
    )
    run = three.hpcshare(
        RANKS, "job", str(tmp_path / "job.py"), "-i", f"a={tmp_path}/a.npy", "-i", f"g={tmp_path}/d.h5:/grid"
    )
    assert_clean_success(run)
    assert f"a sums [{float(np.arange(3 * MiB).sum())}]" in run.stdout, run
    assert f"g sums [{float(2 * MiB)}]" in run.stdout, run
    assert "collective reading: 40.00 MiB read from files, 1.00x the file inputs" in run.stderr, run
    shm = shm_seen(run.stdout, "SHM")
    assert sorted(shm) == three.names[:2], shm
    for host, seen in shm.items():  # one copy (40 MiB) and MPI's own few MiB, not two copies
        assert 40 * MiB <= seen["used"] < 40 * MiB + 16 * MiB, (host, seen)


PUTS = """
import numpy as np
import hpcshare

def make():
    return np.full(2 * 2**20, 2.0)  # 16 MiB

def main(client, inputs):
    put = hpcshare.put(np.arange(2 * 2**20, dtype=np.float64))  # 16 MiB, put by the client
    made = hpcshare.submit(client, make).result()  # 16 MiB, put by the worker that made it
    print_shm(client, "SHM")
    for h in (put, made):
        sums = set(client.run(lambda h=h: float(np.asarray(h.resolve()).sum())).values())
        print("sums", sorted(sums), flush=True)
"""


def test_put_and_submit_hold_one_copy_per_host(three, tmp_path):
    (tmp_path / "job.py").write_text(SHM_PROBE + PUTS)
    run = three.hpcshare(RANKS, "job", str(tmp_path / "job.py"))
    assert_clean_success(run)
    assert f"sums [{float(np.arange(2 * MiB).sum())}]" in run.stdout, run
    assert f"sums [{float(4 * MiB)}]" in run.stdout, run
    shm = shm_seen(run.stdout, "SHM")
    assert sorted(shm) == three.names[:2], shm
    for host, seen in shm.items():  # each object once on each host, as a file of its own
        objects = sorted(size for name, size in seen["files"].items() if name.startswith("hpcshare-"))
        assert len(objects) == 2 and all(16 * MiB <= s < 17 * MiB for s in objects), (host, seen)


TLS_JOB = """
import os, time

def main(client, inputs):
    print("SCHEDULER", client.scheduler.address, flush=True)
    deadline = time.monotonic() + 90
    while not os.path.exists(os.environ["PROBED"]):
        assert time.monotonic() < deadline, "the probe did not finish"
        time.sleep(0.2)
"""

# an outsider on a third host: TCP reaches the scheduler, TLS without the job's certificate does not
PROBE = """
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
print("connected", flush=True)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    t = ctx.wrap_socket(s)
    t.settimeout(10)
    t.sendall(b"hello")
    got = t.recv(100)
    print("refused: closed" if not got else f"ANSWERED {got!r}")
except (ssl.SSLError, OSError) as exc:
    print("refused:", exc)
"""


def test_tls_over_the_hosts_addresses_refuses_an_outsider_on_another_host(three, tmp_path):
    (tmp_path / "job.py").write_text(TLS_JOB)
    probed = tmp_path / "probed"
    proc = three.popen(
        RANKS, sys.executable, "-m", "hpcshare", "job", str(tmp_path / "job.py"), env={"PROBED": str(probed)}
    )
    try:
        address = None
        for line in proc.stdout:  # bounded: the job ends after 90 s without the probe
            if line.startswith("SCHEDULER "):
                address = line.split()[1]
                break
        assert address is not None, proc.stderr.read()
        host0 = three.addresses[three.names[0]]
        assert address.startswith(f"tls://{host0}:"), address  # TLS, on host 0's own address
        port = address.rsplit(":", 1)[1]
        probe = three.run(three.names[2], [sys.executable, "-c", PROBE, host0, port], timeout=60)
        assert "connected" in probe.stdout, probe
        assert "refused:" in probe.stdout, probe
    finally:
        probed.touch()
        try:
            out, err = proc.communicate(timeout=90)
        except BaseException:
            kill_job(proc)
            raise
    assert proc.returncode == 0, out + err


def test_a_file_on_one_host_only_ends_the_job_naming_the_host_without_it(three):
    local = three.local_path / "x.npy"  # the same path on every host; the file only on host 0
    np.save(three.local_dir(three.names[0]) / "x.npy", np.arange(1000))
    try:
        run = three.hpcshare(RANKS, "job", "--demo-size", "1MiB", "-i", f"x={local}", timeout=120)
    finally:
        (three.local_dir(three.names[0]) / "x.npy").unlink()
    assert run.returncode != 0, run
    assert f"cannot read '{local}' on node 1 ({three.names[1]})" in run.stderr, run
    assert run.stderr.count("error:") == 1, run
    assert "Traceback" not in run.stderr, run


def test_info_names_each_host_and_its_own_dev_shm(three):
    run = three.hpcshare([2, 2, 1], "info", timeout=60)
    assert run.returncode == 0, run
    assert "3 host(s):" in run.stdout, run
    for name in three.names:  # each host's own 256 MiB tmpfs, not the machine's /dev/shm
        assert re.search(rf"^  {name}: .*/dev/shm: [\d.]+ MiB free of 256.00 MiB$", run.stdout, re.M), run


@pytest.fixture
def no_host_names(three):
    """Each host's /etc/hosts names only localhost while the test runs."""
    names = three.dir / "hosts"
    kept = names.read_text()
    names.write_text("127.0.0.1 localhost\n")
    try:
        yield
    finally:
        names.write_text(kept)


@pytest.mark.usefixtures("no_host_names")
def test_without_host_names_the_interface_flag_starts_the_job(three):
    run = three.hpcshare(RANKS, "job", "--demo-size", "1MiB", "--interface", "eth0")
    assert_clean_success(run)
    assert "16 tasks OK" in run.stdout, run


@pytest.mark.usefixtures("no_host_names")
def test_without_host_names_the_refusal_gives_the_fix_and_the_hosts_addresses(three):
    run = three.hpcshare(RANKS, "job", "--demo-size", "1MiB")
    assert run.returncode != 0, run
    error = next(line for line in run.stderr.splitlines() if line.startswith("hpcshare: error:"))
    assert "cannot tell which network interface" in error and "--interface" in error, run
    assert "eth0" in error, run
    for name in three.names[:2]:  # where the job's hosts are, so that the interface to name is plain
        assert three.addresses[name] in error, run
