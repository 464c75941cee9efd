"""Only the job reaches its Dask cluster: TLS with the job's certificates, loopback on one host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT, hpcshare, kill_job, mpiexec

from hpcshare.security import Credentials, listen_interface, make_credentials

# main() publishes what an outsider would look for, then waits (bounded) to be let go
JOB = """
import json, os, time
from pathlib import Path

def _ports(dask_worker=None, dask_scheduler=None):
    server = dask_worker or dask_scheduler
    return [int(x.listen_address.rsplit(":", 1)[1]) for x in server.listeners]  # no HTTP server listens

def main(client, inputs):
    info = client.scheduler_info()
    out = Path(os.environ["PROBE_DIR"])
    (out / "cluster.json").write_text(json.dumps({
        "scheduler": client.scheduler.address,
        "workers": sorted(info["workers"]),
        "pids": [os.getpid(), *client.run(os.getpid).values(), client.run_on_scheduler(os.getpid)],
        "dask_ports": [*sum(client.run(_ports).values(), []), *client.run_on_scheduler(_ports)],
    }))
    deadline = time.monotonic() + 90
    while not (out / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # the job itself still works over TLS
    assert client.submit(sum, [1, 2, 3]).result() == 6
"""

OUTSIDER = """
import sys
from distributed import Client
from distributed.security import Security

address, how = sys.argv[1], sys.argv[2]
kwargs = {"timeout": 5}
if how == "tcp":
    address = address.replace("tls://", "tcp://")
elif how == "own-certificate":  # TLS, but a certificate the job's authority did not sign
    kwargs["security"] = Security.temporary()
try:
    with Client(address, **kwargs) as c:
        print("CONNECTED", c.run_on_scheduler(lambda: "ran code in the job"))
except Exception as exc:
    print("REFUSED", type(exc).__name__)
"""


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict]:
    job = tmp_path / "job.py"
    job.write_text(JOB)
    env = {
        **__import__("os").environ,
        "PROBE_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [mpiexec(), "-n", "4", sys.executable, "-m", "hpcshare", "job", str(job), "-q", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while not (tmp_path / "cluster.json").exists():
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            kill_job(proc)
            pytest.fail(f"the job did not start within 90 s: {proc.communicate()}")
        time.sleep(0.1)
    time.sleep(0.2)  # the file is written in one call; let it land
    return proc, json.loads((tmp_path / "cluster.json").read_text())


def _outsider(address: str, how: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", OUTSIDER, address, how], capture_output=True, text=True, timeout=60
    )
    return run.stdout.strip() or run.stderr


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    return {
        (conn.laddr.ip, conn.laddr.port)
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    }


def _finish(proc: subprocess.Popen[str], tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "go").touch()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        pytest.fail(f"the job did not end within 120 s of being let go: {proc.communicate()}")
    assert proc.returncode == 0, (out, err)
    return out, err


@pytest.mark.each_mpi
@pytest.mark.usefixtures("clean_shm")
def test_an_outside_client_is_refused_and_nothing_listens_beyond_loopback(tmp_path):
    proc, cluster = _start(tmp_path)
    try:
        assert cluster["scheduler"].startswith("tls://127.0.0.1:"), cluster
        assert all(w.startswith("tls://127.0.0.1:") for w in cluster["workers"]), cluster
        for how in ("no-certificate", "tcp", "own-certificate"):
            answer = _outsider(cluster["scheduler"], how)
            assert answer.startswith("REFUSED"), (how, answer)
            for worker in cluster["workers"]:
                answer = _outsider(worker, how)
                assert answer.startswith("REFUSED"), (how, worker, answer)
        # every Dask server (scheduler, workers) on loopback (their HTTP servers are closed: test_neighbours);
        # the MPI library's own sockets (its launcher's, its network module's) are not Dask's
        listening = _listening(cluster["pids"])
        dask = {(ip, port) for ip, port in listening if port in cluster["dask_ports"]}
        assert len(dask) == len(cluster["dask_ports"]), (listening, cluster)
        assert {ip for ip, _ in dask} == {"127.0.0.1"}, dask
    finally:
        if proc.poll() is None:
            _finish(proc, tmp_path)


@pytest.mark.each_mpi
@pytest.mark.usefixtures("clean_shm")
def test_no_tls_is_plain_tcp_still_on_loopback_and_a_dashboard_on_tcp_is_warned_about(tmp_path):
    proc, cluster = _start(tmp_path, "--no-tls", "--dashboard", "--dashboard-address", ":0")
    try:
        assert cluster["scheduler"].startswith("tcp://127.0.0.1:"), cluster
        assert _outsider(cluster["scheduler"], "tcp").startswith("CONNECTED")  # what --no-tls gives up
    finally:
        _, err = _finish(proc, tmp_path)
    assert re.search(
        r"warning: the Dask dashboard.* listens on 0\.0\.0\.0:\d+ on \S+ \(--dashboard-address\)", err
    ), err
    assert "on localhost that is every user of the node" in err, err


def test_the_jobs_certificates_are_fresh_signed_by_its_own_authority_and_never_printed():
    from cryptography import x509

    a, b = make_credentials(), make_credentials()
    assert a.ca != b.ca and a.key != b.key  # every job its own
    ca, cert = x509.load_pem_x509_certificate(a.ca.encode()), x509.load_pem_x509_certificate(a.cert.encode())
    cert.verify_directly_issued_by(ca)
    assert "PRIVATE KEY" not in repr(a) and "PRIVATE KEY" not in str(a)
    assert isinstance(a, Credentials)


def test_the_certificate_program_gives_rank_0_fresh_credentials():
    from hpcshare.security import CredentialsMaker

    with CredentialsMaker() as maker:
        creds = maker.take(timeout=60)
    assert maker.process.returncode == 0
    assert "BEGIN CERTIFICATE" in creds.ca and "BEGIN CERTIFICATE" in creds.cert
    assert "PRIVATE KEY" in creds.key and "PRIVATE KEY" not in repr(creds)


def test_a_job_whose_certificates_cannot_be_made_ends_at_once_with_one_line(tmp_path):
    broken = tmp_path / "site" / "cryptography"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this cryptography is broken on purpose')\n")
    (tmp_path / "empty.py").write_text("def main(client, inputs):\n    pass\n")
    env = {
        "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"
    }  # before site-packages, as a user's stray copy
    run = hpcshare(4, "job", str(tmp_path / "empty.py"), "-q", env=env, timeout=100)
    assert run.returncode == 1, run
    lines = [line for line in run.stderr.splitlines() if "TLS certificates" in line]
    assert len(lines) == 1, run
    assert "this cryptography is broken on purpose" in lines[0] and "--no-tls" in lines[0], run
    assert run.seconds < 60, run  # not a wait for hpcshare.timeout (120 s)


def test_a_tls_server_accepts_without_loading_the_systems_ca_store():
    # run in a fresh interpreter: tornado caches its default client context once per process
    code = """
import asyncio, ssl, tempfile, os
import tornado.netutil, tornado.tcpserver
from tornado.iostream import IOStream
from hpcshare.security import lighter_tls_accepts, make_credentials

creds = make_credentials()
folder = tempfile.mkdtemp()
for name in ("cert", "key"):
    with open(os.path.join(folder, name), "w") as f:
        f.write(getattr(creds, name))
server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=creds.ca)
server_ctx.load_cert_chain(os.path.join(folder, "cert"), os.path.join(folder, "key"))
client_ctx = ssl.create_default_context(cadata=creds.ca)
client_ctx.check_hostname = False
accepted = []

class Server(tornado.tcpserver.TCPServer):
    async def handle_stream(self, stream, address):
        await stream.wait_for_handshake()
        accepted.append(stream)
        await stream.write(b"ok")

async def go():
    undo = lighter_tls_accepts()
    try:
        server = Server(ssl_options=server_ctx)
        [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server.add_sockets([sock])
        stream = await IOStream(__import__("socket").socket()).connect(("127.0.0.1", sock.getsockname()[1]))
        stream = await stream.start_tls(False, ssl_options=client_ctx)
        assert await stream.read_bytes(2) == b"ok"
        server.stop()
    finally:
        undo()
    assert accepted and accepted[0]._ssl_options is server_ctx
    assert tornado.netutil._client_ssl_defaults.cache_info().currsize == 0  # the CA store never loaded
    assert tornado.tcpserver.SSLIOStream.__name__ == "SSLIOStream"  # undone

asyncio.run(go())
print("fine")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "fine", run.stderr


def test_interfaces():
    assert listen_interface(None, hosts=1) in psutil.net_if_addrs()
    with pytest.raises(Exception, match="not an interface of"):
        listen_interface("ib-no-such-card", hosts=1)


ATTACK = """
import ctypes, json, os, signal
import numpy as np

def attack(h):
    v = h.resolve()
    out = {}
    try:  # the finding: a view made writable again wrote through to every worker
        w = v.view()
        w.flags.writeable = True
        w[0] = 99.0
        out["view"] = "wrote"
    except ValueError:
        out["view"] = "refused"
    try:  # ... and so did the base, a writable uint8 array over the whole window
        b = np.asarray(v.base)
        b.flags.writeable = True
        out["base"] = "wrote"
    except (ValueError, TypeError):
        out["base"] = "refused"
    out["base_obj"] = repr(getattr(v.base, "obj", None))
    pid = os.fork()  # C code writing to the pages: in a child, so that its fault ends only the child
    if pid == 0:
        ctypes.memset(v.ctypes.data + 65536, 0x41, 8)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    out["c_write"] = "faulted" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV else status
    return out

def read(h):
    v = h.resolve().reshape(-1)
    return [float(v[0]), float(v[65536 // 8])]

def main(client, inputs):
    h = inputs["x"]
    print("ATTACK", json.dumps(client.submit(attack, h, pure=False).result()))
    print("AFTER", json.dumps(client.gather(client.map(read, [h] * 4, pure=False))))
"""


@pytest.mark.each_mpi
@pytest.mark.usefixtures("clean_shm")
def test_shared_inputs_cannot_be_written_through_numpy_or_from_c(tmp_path):
    import numpy as np
    from helpers import hpcshare

    np.save(tmp_path / "x.npy", np.arange(1 << 20, dtype=np.float64))
    (tmp_path / "job.py").write_text(ATTACK)
    run = hpcshare(4, "job", str(tmp_path / "job.py"), "-i", f"x={tmp_path / 'x.npy'}", "-q", timeout=120)
    assert run.returncode == 0, run
    attack = json.loads(run.stdout.split("ATTACK ", 1)[1].splitlines()[0])
    assert attack == {"view": "refused", "base": "refused", "base_obj": "None", "c_write": "faulted"}, attack
    after = json.loads(run.stdout.split("AFTER ", 1)[1].splitlines()[0])
    assert after == [[0.0, 8192.0]] * 4, after  # every worker still reads the input as it was
