"""Emulated hosts: N hosts on one machine, each with its own network, /dev/shm, name and /etc/hosts.

Needs root (CI is root). Each host is

- a network namespace with one interface, ``eth0``, a veth into a bridge
  of the harness's own, and an address in a private /24 that is used only
  on that bridge (chosen per run so that it overlaps no route of this
  machine); the hosts have no default route, so nothing they send can leave
  the bridge;
- a persistent mount namespace (``unshare --mount=FILE``) with its own tmpfs
  on /dev/shm (its size a parameter), an /etc/hosts that names every host,
  and a private directory (:meth:`Hosts.local_dir`, the same path on every
  host, different contents);
- a UTS namespace with its own host name.

:meth:`Hosts.run` runs a command on one host (``nsenter``).
:meth:`Hosts.mpiexec` launches a job across hosts by MPICH's own launcher:
hydra's ssh launcher with a stand-in for ssh (``-launcher-exec``) that
``nsenter``-s into the host it is given; :meth:`Hosts.prterun` does the same
for Open MPI's ``prterun`` (``--prtemca plm_ssh_agent``, its daemons and
ranks kept to the bridge's subnet); :meth:`Hosts.launch` picks the one of
the MPI library in use. The launcher
itself runs outside the hosts and reaches them over the bridge, the way a
batch script's launcher on a login or head node reaches its compute nodes.

Faults: :meth:`Hosts.link_down` cuts a host's link (``ip link set DEV
down``); :meth:`Hosts.kill_all` SIGKILLs every process of a host (those in
its network namespace), its MPI launcher's proxy included.

Every name starts with ``hsh`` and the run's id; the state of a run is kept
under ``/run/hpcshare-hosts/ID`` with the pid of the process that owns it,
so that :func:`sweep` removes what a crashed earlier run left and never a
live run's hosts. :meth:`Hosts.close` removes everything (processes,
mounts, namespaces, links, the bridge, the files).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import Run, mpi_library, mpiexec, run_cmd, start_cmd

STATE = Path("/run/hpcshare-hosts")
PREFIX = "hsh"  # every bridge, link and namespace of the harness, then the run's id

NEEDS = ("ip", "unshare", "nsenter", "mount", "umount", "hostname")

# MPI between hosts over their network only. The hosts share one kernel and one pid namespace, so
# UCX (MPICH's ch4:ucx from PyPI) would otherwise reach a rank on another host by cross-memory
# attach or shared memory, and a cut link would not cut MPI (measured: messages kept flowing)
NETWORK_ONLY = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}

# the stand-in for ssh the launchers start their proxies with: ``[-opts] HOST CMD...``, as for ssh
_LAUNCHER = """#!/bin/sh
# hpcshare's emulated hosts: run CMD on HOST, as ssh would (tests/hosts.py)
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
case "$host" in
{cases}
*) echo "no such emulated host: $host" >&2; exit 255 ;;
esac
"""
_CASE = '{names}) exec nsenter --net={net} --mount={mnt} --uts={uts} --wd="$PWD" -- /bin/sh -c "$*" ;;'


def missing() -> str | None:
    """Why emulated hosts cannot be made here, or None."""
    if sys.platform != "linux":
        return "emulated hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "emulated hosts need root (network and mount namespaces, a bridge)"
    absent = [c for c in NEEDS if shutil.which(c) is None]
    if absent:
        return f"emulated hosts need {', '.join(absent)} (Debian: iproute2, util-linux, mount)"
    return None


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that overlaps no address or route of this machine."""
    used = []
    for line in _sh("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("local", "broadcast"):
            first = line.split()[1]
        try:
            used.append(ipaddress.ip_network(first, strict=False))
        except ValueError:  # "default", "unreachable ..."
            pass
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the emulated hosts' bridge")


class Hosts:
    """N emulated hosts on one bridge; :meth:`create` makes them, :meth:`close` removes them."""

    def __init__(self, run_id: str, n: int, subnet: ipaddress.IPv4Network) -> None:
        self.id = run_id
        self.dir = STATE / run_id
        self.subnet = subnet
        self.bridge = f"{PREFIX}{run_id}br"
        hosts = list(subnet.hosts())
        self.bridge_address = str(hosts[0])
        self.names = [f"{PREFIX}{run_id}h{i}" for i in range(n)]
        self.addresses = {name: str(hosts[10 + i]) for i, name in enumerate(self.names)}
        self.launcher = self.dir / "ssh"
        self._net_inode: dict[str, int] = {}

    # --- making and removing ------------------------------------------------------------------

    @classmethod
    def create(cls, n: int, shm_size: str = "256M") -> Hosts:
        """Make ``n`` hosts, each with a tmpfs /dev/shm of ``shm_size`` (a ``mount -o size=`` value)."""
        sweep()
        hosts = cls(secrets.token_hex(3), n, _free_subnet())
        try:
            hosts._make(shm_size)
        except BaseException:
            hosts.close()
            raise
        return hosts

    def _make(self, shm_size: str) -> None:
        self.dir.mkdir(parents=True)
        owner = psutil.Process()
        (self.dir / "owner.json").write_text(
            json.dumps({"pid": owner.pid, "started": owner.create_time(), "hosts": self.names})
        )
        # a mount of its own with private propagation: mount-namespace files may be bound only there
        _sh("mount", "--bind", str(self.dir), str(self.dir))
        _sh("mount", "--make-private", str(self.dir))
        (self.dir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {name}\n" for name, a in self.addresses.items())
        )
        (self.dir / "local").mkdir()  # each host's private directory is mounted here
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("sysctl", "-q", "-w", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1")
        _sh("ip", "addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            self._make_host(i, name, shm_size)
        cases = "\n".join(
            _CASE.format(
                names=f"{name}|{self.addresses[name]}",
                net=f"/run/netns/{name}",
                mnt=self._ns_file(name, "mnt"),
                uts=self._ns_file(name, "uts"),
            )
            for name in self.names
        )
        self.launcher.write_text(_LAUNCHER.format(cases=cases))
        self.launcher.chmod(0o755)

    def _make_host(self, i: int, name: str, shm_size: str) -> None:
        hdir = self.dir / name
        (hdir / "shm").mkdir(parents=True)
        (hdir / "local").mkdir()
        for ns in ("mnt", "uts"):
            (hdir / ns).touch()
        _sh("mount", "-t", "tmpfs", "-o", f"size={shm_size},mode=1777", f"{name}-shm", str(hdir / "shm"))
        _sh("ip", "netns", "add", name)
        self._net_inode[name] = os.stat(f"/run/netns/{name}").st_ino
        veth = f"{PREFIX}{self.id}v{i}"
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p", "netns", name)
        _sh("sysctl", "-q", "-w", f"net.ipv6.conf.{veth}.disable_ipv6=1")
        _sh("ip", "link", "set", veth, "master", self.bridge, "up")
        inside = ("ip", "netns", "exec", name)
        _sh(*inside, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        _sh(*inside, "ip", "link", "set", f"{veth}p", "name", "eth0")
        _sh(*inside, "ip", "addr", "add", f"{self.addresses[name]}/{self.subnet.prefixlen}", "dev", "eth0")
        _sh(*inside, "ip", "link", "set", "eth0", "up")
        _sh(*inside, "ip", "link", "set", "lo", "up")
        setup = (
            f"hostname {name}"
            f" && mount --bind {hdir / 'shm'} /dev/shm"
            f" && mount --bind {self.dir / 'hosts'} /etc/hosts"
            f" && mount --bind {hdir / 'local'} {self.dir / 'local'}"
        )
        _sh(
            "unshare",
            f"--mount={hdir / 'mnt'}",
            f"--uts={hdir / 'uts'}",
            "--propagation",
            "private",
            "sh",
            "-c",
            setup,
        )

    def _ns_file(self, name: str, ns: str) -> Path:
        return self.dir / name / ns

    def close(self) -> None:
        """Remove the hosts and everything of theirs, also what a failed :meth:`create` made (local)."""
        _remove(self.id, self.names)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- using them ---------------------------------------------------------------------------

    def enter(self, host: str) -> list[str]:
        """The command prefix that runs what follows on ``host``."""
        return [
            "nsenter",
            f"--net=/run/netns/{host}",
            f"--mount={self._ns_file(host, 'mnt')}",
            f"--uts={self._ns_file(host, 'uts')}",
            f"--wd={os.getcwd()}",
            "--",
        ]

    def run(self, host: str, args: list[str], **kw) -> Run:
        """Run ``args`` on ``host`` under a timeout, as :func:`helpers.run_cmd` does."""
        return run_cmd([*self.enter(host), *args], **kw)

    def shm(self, host: str) -> Path:
        """Where ``host``'s /dev/shm is seen from outside the hosts."""
        return self.dir / host / "shm"

    def shm_files(self, host: str) -> dict[str, int]:
        """What ``host``'s /dev/shm holds: each file (paths relative to it, inside folders too) and
        each folder (a job's private folder left behind counts even when empty), with sizes."""
        top = self.shm(host)
        return {
            str(p.relative_to(top)) + ("/" if p.is_dir() else ""): p.stat().st_size for p in top.rglob("*")
        }

    def empty_shm(self, host: str) -> None:
        """Remove everything in ``host``'s /dev/shm (after a test has asserted what it found)."""
        for p in self.shm(host).iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    @property
    def local_path(self) -> Path:
        """The path of each host's private directory, the same on every host."""
        return self.dir / "local"

    def local_dir(self, host: str) -> Path:
        """Where ``host``'s private directory is seen from outside the hosts."""
        return self.dir / host / "local"

    def hosts_arg(self, ranks: list[int]) -> str:
        """``NAME:RANKS,...``: ``ranks[i]`` ranks on host i (MPICH's ``-hosts``)."""
        return ",".join(f"{name}:{r}" for name, r in zip(self.names, ranks))

    def mpiexec(self, ranks: list[int], *args: str) -> list[str]:
        """The command that runs ``args`` with ``ranks[i]`` ranks on host i, by MPICH's hydra."""
        return [
            mpiexec(),
            "-launcher",
            "ssh",
            "-launcher-exec",
            str(self.launcher),
            "-localhost",
            self.bridge_address,
            "-hosts",
            self.hosts_arg(ranks),
            "-n",
            str(sum(ranks)),
            *args,
        ]

    def prterun(self, ranks: list[int], *args: str) -> list[str]:
        """The command that runs ``args`` with ``ranks[i]`` ranks on host i, by Open MPI's prterun."""
        return [
            mpiexec(),
            "--prtemca",
            "plm_ssh_agent",
            str(self.launcher),
            "--prtemca",
            "oob_tcp_if_include",
            str(self.subnet),
            "--mca",
            "btl_tcp_if_include",
            str(self.subnet),
            "--host",
            self.hosts_arg(ranks),
            "--map-by",
            "slot",  # host i gets ranks[i] ranks (CI's default mapping policy would oversubscribe host 0)
            "-n",
            str(sum(ranks)),
            *args,
        ]

    def launch(self, ranks: list[int], *args: str) -> list[str]:
        """:meth:`prterun` under Open MPI, else :meth:`mpiexec` (MPICH's hydra)."""
        return (self.prterun if mpi_library() == "Open MPI" else self.mpiexec)(ranks, *args)

    def hpcshare(self, ranks: list[int], *args: str, timeout: float = 120, **kw) -> Run:
        """``mpiexec ... python -m hpcshare ARGS`` across the hosts, as a user types it."""
        env = {**NETWORK_ONLY, **kw.pop("env", {})}
        return run_cmd(
            self.launch(ranks, sys.executable, "-m", "hpcshare", *args), timeout=timeout, env=env, **kw
        )

    def popen(self, ranks: list[int], *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start :meth:`launch` ``(ranks, *args)`` in a session of its own, output to pipes."""
        return start_cmd(self.launch(ranks, *args), env={**NETWORK_ONLY, **(env or {})})

    # --- faults -------------------------------------------------------------------------------

    def link_down(self, host: str) -> None:
        """Cut ``host``'s link to the others: its end of the veth into the bridge goes down."""
        _sh("ip", "link", "set", f"{PREFIX}{self.id}v{self.names.index(host)}", "down")

    def link_up(self, host: str, timeout: float = 10) -> None:
        """Restore ``host``'s link; return once frames pass again (a job started at once would
        otherwise fail in MPI_Init: "No route to host")."""
        veth = f"{PREFIX}{self.id}v{self.names.index(host)}"
        _sh("ip", "link", "set", veth, "up")
        deadline = time.monotonic() + timeout
        while not self._link_passes(veth, host):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{host}'s link does not pass frames {timeout} s after ip link set {veth} up"
                )
            time.sleep(0.05)
        for name in self.names:  # neighbours that went unanswered while the link was down
            _sh("ip", "-n", name, "neigh", "flush", "all")

    @staticmethod
    def _link_passes(veth: str, host: str) -> bool:
        """Both ends of ``host``'s veth are up and the bridge forwards on it (state 3)."""
        sys_dir = Path("/sys/class/net", veth)
        outside = (sys_dir / "operstate").read_text().strip() == "up"
        forwarding = (sys_dir / "brport" / "state").read_text().strip() == "3"
        inside = "state UP" in _sh("ip", "-n", host, "-o", "link", "show", "eth0").stdout
        return outside and forwarding and inside

    def processes(self, host: str) -> list[psutil.Process]:
        """Every live process of ``host`` (those in its network namespace)."""
        return _in_netns(self._net_inode[host])

    def kill_all(self, host: str) -> int:
        """SIGKILL every process of ``host``, as a node crash does; return how many there were."""
        return _kill_netns(self._net_inode[host])


# --- removing, also after a crash ---------------------------------------------------------------


def _in_netns(inode: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino == inode and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


def _kill_netns(inode: int) -> int:
    """SIGKILL the processes in a network namespace until none is left (they may fork meanwhile)."""
    killed: set[int] = set()
    deadline = time.monotonic() + 30
    while (procs := _in_netns(inode)) and time.monotonic() < deadline:
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
                killed.add(p.pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return len(killed)


def _remove(run_id: str, names: list[str]) -> None:
    """Remove one run's hosts, whatever of them exists (local); never raises for what is absent."""
    d = STATE / run_id
    for name in names:
        try:
            _kill_netns(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    for name in names:
        for ns in ("mnt", "uts", "shm"):
            _sh("umount", str(d / name / ns), check=False)
        _sh("ip", "netns", "del", name, check=False)
    bridge = f"{PREFIX}{run_id}br"
    for i in range(len(names)):
        _sh("ip", "link", "del", f"{PREFIX}{run_id}v{i}", check=False)
    _sh("ip", "link", "del", bridge, check=False)
    if d.exists():
        _sh("umount", str(d), check=False)
        shutil.rmtree(d, ignore_errors=True)


def _owner_alive(owner: dict) -> bool:
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) < 1
    except psutil.Error:
        return False


def sweep() -> list[str]:
    """Remove the hosts of earlier runs whose owner has died (a crashed pytest); return their ids."""
    swept = []
    for d in STATE.glob("*") if STATE.exists() else []:
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {"pid": -1, "started": 0, "hosts": [p.name for p in d.glob(f"{PREFIX}*")]}
        if not _owner_alive(owner):
            _remove(d.name, owner["hosts"])
            swept.append(d.name)
    return swept
