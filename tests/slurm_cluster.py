"""A real Slurm cluster of two nodes on this one machine, for the jobscripts tests.

Debian's ``slurmctld`` and two ``slurmd`` daemons (``-N node1``, ``-N
node2``, each on its own port, both with this machine's hostname) run in the
foreground as children of the test process, without systemd or munge
(``auth/none``, ``cred/none``). ``SlurmdParameters=config_overrides`` lets
each node declare more CPUs and memory than the machine has, so the templates
run with their headers as shipped. srun's ``pmi2`` plugin hands MPICH the
Slurm layout, so MPI sees two nodes and each gets its own shared window.

Installing Slurm: ``apt-get install slurmctld slurmd slurm-client``
(``.ci/run`` does it). Without it the tests skip with that reason, unless
``HPCSHARE_REQUIRE_SLURM=1`` (set by CI) turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PARTITION = "compute"  # the partition the templates name
NODES = ("node1", "node2")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


def missing() -> str | None:
    """Why Slurm cannot run here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} not found): apt-get install slurmctld slurmd slurm-client"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (daemons killed by their PIDs)."""

    def __init__(self, root: Path, cpus: int = 16, memory_mb: int = 32000) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.cpus, self.memory_mb = cpus, memory_mb
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        host = socket.gethostname()
        ctld, slurmd, *node_ports = _free_ports(2 + len(NODES))
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=hpcsharetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            f"SlurmdPort={slurmd}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log",
            f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "SlurmdParameters=config_overrides",
        ]
        for name, port in zip(NODES, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, *args: str) -> None:
        log = open(self.root / f"{args[0].rsplit('/', 1)[-1]}-{len(self.procs)}.stderr", "wb")
        self.procs.append(
            subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        self._spawn(_exe("slurmctld"), "-D", "-i", "-f", str(self.conf))
        for name in NODES:
            self._spawn(_exe("slurmd"), "-D", "-N", name, "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited with {p.returncode}: {p.args}\n{self.logs()}")
            r = subprocess.run(
                [_exe("sinfo"), "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
            )
            states = r.stdout.strip()
            if (
                r.returncode == 0
                and states
                and all(line.split()[-1] == "idle" for line in states.splitlines())
            ):
                if len(states.splitlines()) == len(NODES):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm's nodes were not idle within {timeout} s: {states!r}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stderr")):
            text = f.read_text(errors="replace").splitlines()[-20:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, ...)."""
        r = subprocess.run(
            [_exe("scontrol"), "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True
        )
        fields: dict[str, str] = {}
        for item in r.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields
