"""Whether the job's hosts still reach each other: a lost host ends the job, boundedly.

MPI has no notion of a peer that stopped answering: a rank waiting on a
host whose link is down waits forever, and Dask drops that host's workers
after its TCP timeout and carries on with fewer, silently. So every rank on
a host other than world rank 0's keeps one idle TCP connection to rank 0,
with keepalive probes and ``TCP_USER_TIMEOUT`` set from
``hpcshare.host-timeout``. The kernel answers the probes, so a rank that is
busy (a task holding the GIL), stopped (SIGSTOP) or inside a long MPI call
still counts as alive; only a host whose network or kernel is gone does not.

- Rank 0 watches every connection in a thread. When one goes unanswered
  for ``host-timeout``, or every rank of a host closes its connection at
  once without a goodbye (the host's processes killed, a crashed node), it
  prints one line naming the host and its ranks and ends the job (an
  abort: hydra's mpiexec does not wait for a proxy it cannot reach).
- Each rank on another host waits on its connection in a thread. When rank 0
  goes unanswered for ``host-timeout``, this host is cut off: the rank says
  so, removes the shared-memory files it maps and its scratch folder, and
  exits (code 1) without the world-wide teardown, which could never
  complete. The host's /dev/shm watcher removes the rest once the host's
  last rank is gone, and the launcher's proxy ends with its ranks.

A rank that ends the job through hpcshare (an error, a signal) says goodbye
first (``JobContext.before_abort``), so rank 0 does not report its host as
lost when the launcher then kills the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import psutil

from . import context, ending, supervise, sync
from .hostwatch import ABORTS, GOODBYE, LOST, QUIET, UNANSWERED
from .security import interface_address, interface_addresses, listen_interface
from .topology import role_of

if TYPE_CHECKING:
    from .config import JobConfig
    from .topology import Topology

__all__ = ["Liveness", "keepalive"]

_LAUNCHERS = frozenset({"mpiexec", "mpiexec.hydra", "mpirun", "prterun", "orterun", "srun"})
_TOKEN = 16  # bytes of the job's secret in a hello; then the rank, 4 bytes


def keepalive(sock: socket.socket, timeout: float) -> None:
    """Have the kernel end ``sock`` when its peer goes ``timeout`` seconds without answering (local).

    Probes every tenth of ``timeout`` (at least 1 s) while the connection is
    idle; ``TCP_USER_TIMEOUT`` (Linux) ends it ``timeout`` after the last
    answer, whether data or a probe was outstanding.
    """
    probe = max(1, int(timeout / 10))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", probe), ("TCP_KEEPINTVL", probe), ("TCP_KEEPCNT", 10)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    if sys.platform.startswith("linux"):
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", 18)
        sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(timeout * 1000))


class Liveness:
    """The job's connections to rank 0 and their watching threads (collective on ``topo.world``).

    Entering gathers every rank's host and addresses, decides the interface
    the job listens on (the refusal names the hosts' addresses), and, on a
    job of several hosts, connects every rank off rank 0's host to rank 0.
    Leaving says goodbye and closes them.
    """

    def __init__(self, topo: Topology, config: JobConfig, scratch: str) -> None:
        self.topo, self.config, self.scratch = topo, config, scratch
        self.hosts: list[str] = []  #: each world rank's host name
        self.interface: str | None = None  #: where the job's Dask servers listen
        self._conns: dict[int, socket.socket] = {}  # rank -> connection (rank 0: every remote rank's)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._fifo: str | None = None  # ranks on rank 0's host: the host watcher's FIFO
        self._watcher: subprocess.Popen[bytes] | None = None  # rank 0: the host watcher (hpcshare.hostwatch)
        self._vanished = False  # rank 0: a host's ranks vanished; the host watcher names it

    # --- setting up -------------------------------------------------------------------------

    def __enter__(self) -> Liveness:
        topo, config = self.topo, self.config
        found = topo.world.allgather((topo.hostname, interface_addresses()))
        self.hosts = [host for host, _ in found]
        addresses = dict(found)
        remote = [r for r, host in enumerate(self.hosts) if host != self.hosts[0]]
        listener: socket.socket | None = None
        where = None
        with sync.Collective(topo.world, timeout=config.timeout):
            self.interface = listen_interface(config.interface, topo.n_hosts, addresses)
            if remote and topo.rank == 0:
                listener = socket.create_server((interface_address(self.interface), 0))
                fifo = os.path.join(self.scratch, "hostwatch")
                os.mkfifo(fifo, 0o600)
                where = (*listener.getsockname()[:2], secrets.token_bytes(_TOKEN), fifo)
        if not remote:
            return self
        host, port, token, fifo = sync.bcast(topo.world, where)
        if self.hosts[topo.rank] == self.hosts[0]:
            self._fifo = fifo
            self._tell_supervisor_fifo()
        with sync.Collective(topo.world, timeout=config.timeout):
            if topo.rank == 0:
                assert listener is not None
                with listener:
                    self._accept(listener, token, set(remote))
                self._start_host_watcher()
                self._start(self._watch_ranks, "hpcshare-liveness")
            elif topo.rank in remote:
                self._connect(host, port, token)
                self._start(self._watch_rank_0, "hpcshare-liveness")
        job = context.current()
        if job is not None:
            job.before_abort.append(self._aborting)
        return self

    def _start_host_watcher(self) -> None:
        """Rank 0: start the program that names a host whose processes all vanish (hpcshare.hostwatch)."""
        assert self._fifo is not None
        by_host: dict[str, list[int]] = {}
        for rank in self._conns:
            by_host.setdefault(self.hosts[rank], []).append(rank)
        say = _launcher_stderr()
        conns = [(conn.fileno(), rank, self.hosts[rank]) for rank, conn in self._conns.items()]
        spec = {
            "rank0": os.getpid(),
            "timeout": self.config.host_timeout,
            "say": -1 if say is None else say,
            "fifo": self._fifo,
            "conns": conns,
            "hosts": {
                host: [sorted(ranks), self._ranks_text(sorted(ranks))] for host, ranks in by_host.items()
            },
        }
        try:
            self._watcher = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    os.path.join(os.path.dirname(__file__), "hostwatch.py"),
                    json.dumps(spec),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # a byte to rank 0 when a host is lost
                pass_fds=[fd for fd, _, _ in conns] + ([say] if say is not None else []),
                start_new_session=True,  # not in the process group the launcher kills
            )
        finally:
            if say is not None:
                os.close(say)

    def _accept(self, listener: socket.socket, token: bytes, expected: set[int]) -> None:
        """Take a connection from each of ``expected`` ranks (local, on rank 0; bounded).

        Hellos are read side by side: a connection that says nothing (another
        user's, on a port anyone on the network can reach) cannot hold up the
        job's ranks behind it; it is dropped when the job's ranks are all in.
        """
        deadline = time.monotonic() + self.config.timeout
        pending: dict[socket.socket, bytes] = {}
        listener.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            try:
                while expected - set(self._conns):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = sorted(expected - set(self._conns))
                        raise sync.WaitTimeout(
                            f"ranks {self._ranks_text(missing)} did not connect to rank 0 within "
                            f"{self.config.timeout:g} s (hpcshare.timeout)"
                        )
                    for key, _ in sel.select(timeout=left):
                        if key.fileobj is listener:
                            try:
                                conn, _ = listener.accept()
                            except OSError:
                                continue
                            conn.setblocking(False)
                            pending[conn] = b""
                            sel.register(conn, selectors.EVENT_READ)
                            continue
                        conn = key.fileobj  # type: ignore[assignment]
                        hello = _hello(conn, pending)
                        if hello is None:
                            continue
                        sel.unregister(conn)
                        self._admit(conn, hello, token, expected)
            finally:
                for conn in pending:
                    conn.close()

    def _admit(self, conn: socket.socket, hello: bytes, token: bytes, expected: set[int]) -> None:
        """Keep ``conn`` as its rank's connection if its hello carries the job's secret (rank 0)."""
        rank = int.from_bytes(hello[_TOKEN:], "big")
        is_ours = len(hello) == _TOKEN + 4 and secrets.compare_digest(hello[:_TOKEN], token)
        if not is_ours or rank not in expected or rank in self._conns:
            conn.close()  # not one of the job's ranks
            return
        conn.setblocking(True)
        keepalive(conn, self.config.host_timeout)
        self._conns[rank] = conn

    def _connect(self, host: str, port: int, token: bytes) -> None:
        conn = socket.create_connection((host, port), timeout=self.config.timeout)
        conn.sendall(token + self.topo.rank.to_bytes(4, "big"))
        conn.settimeout(None)
        keepalive(conn, self.config.host_timeout)
        self._conns[0] = conn
        supervise.tell_liveness(conn.fileno())  # a death its supervisor names is not a lost host

    def _tell_supervisor_fifo(self) -> None:
        """On rank 0's host: give this rank's supervisor the host watcher's FIFO (local)."""
        assert self._fifo is not None
        try:  # read and write: opens at once, whether or not the watcher has opened it yet (Linux)
            fd = os.open(self._fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            supervise.tell_liveness(fd)
        finally:
            os.close(fd)

    def _start(self, target: object, name: str) -> None:
        self._wake = os.pipe()
        self._thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        self._thread.start()

    # --- watching ---------------------------------------------------------------------------

    def _watch_rank_0(self) -> None:
        """A rank off rank 0's host: end this rank when rank 0 stops answering (thread)."""
        assert self._wake is not None
        conn = self._conns[0]
        with selectors.DefaultSelector() as sel:
            sel.register(conn, selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            while not self._closing.is_set():
                ready = {key.fileobj for key, _ in sel.select()}
                if conn not in ready:
                    continue
                try:
                    data = conn.recv(64)
                except OSError as exc:
                    if exc.errno in UNANSWERED and not self._closing.is_set():
                        self._cut_off()
                    return
                if not data or GOODBYE in data:  # rank 0 ended: normally, or the launcher ends us too
                    return

    def _cut_off(self) -> None:
        topo = self.topo
        print(
            f"hpcshare: error: rank {topo.rank} ({topo.role} on {topo.hostname}): rank 0 on "
            f"{self.hosts[0]} has not answered for {self.config.host_timeout:g} s "
            "(hpcshare.host-timeout): this host is cut off from the job; ending this rank "
            "and removing its shared memory",
            file=sys.stderr,
            flush=True,
        )
        ending.end_alone(1)

    def _watch_ranks(self) -> None:
        """Rank 0: end the job when the host watcher reports a lost host (thread)."""
        assert self._wake is not None and self._watcher is not None and self._watcher.stdout is not None
        said = self._watcher.stdout.fileno()
        while not self._closing.is_set():
            ready, _, _ = select.select([said, self._wake[0]], [], [])
            if said not in ready:
                continue
            if os.read(said, 1) != LOST:  # the watcher ended without a lost host: nothing more to watch
                return
            if self._closing.is_set() or context.PROCESS.stopping:
                return  # the job is ending anyway
            self._vanished = True  # the watcher has named the host; the abort must not quiet it
            ending.abort(code=1)

    def _ranks_text(self, ranks: list[int]) -> str:
        roles = sorted({role_of(r) for r in ranks})
        return f"{', '.join(map(str, ranks))}: {', '.join(roles)}"

    # --- ending -----------------------------------------------------------------------------

    def _aborting(self) -> None:
        """This rank ends the whole job through hpcshare (an abort): no host is lost (local)."""
        self._goodbye(ABORTS)

    def _goodbye(self, word: bytes = GOODBYE) -> None:
        """Tell the other end, and the host watcher, this rank ends through hpcshare (local; idempotent)."""
        if self._closing.is_set():
            return
        self._closing.set()
        for conn in self._conns.values():
            try:
                conn.setblocking(False)
                conn.send(word)
            except OSError:
                pass
        if self._fifo is not None and not self._vanished:
            try:
                fd = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # no watcher (any more): nothing to tell
                return
            try:
                os.write(fd, QUIET)
            except OSError:
                pass
            finally:
                os.close(fd)

    def __exit__(self, *exc: object) -> None:
        self._goodbye()
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self._watcher is not None:  # it ends on the goodbyes; a bounded wait, then it is on its own
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watcher.wait(timeout=1)
            if self._watcher.stdout is not None:
                self._watcher.stdout.close()
            self._watcher = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        job = context.current()
        if job is not None and self._aborting in job.before_abort:
            job.before_abort.remove(self._aborting)


def _hello(conn: socket.socket, pending: dict[socket.socket, bytes]) -> bytes | None:
    """Read what ``conn`` has sent of its hello: the whole hello (or what came before it closed), else None."""
    try:
        chunk = conn.recv(_TOKEN + 4 - len(pending[conn]))
    except BlockingIOError:
        return None
    except OSError:
        chunk = b""
    hello = pending[conn] + chunk
    if chunk and len(hello) < _TOKEN + 4:
        pending[conn] = hello
        return None
    del pending[conn]
    return hello


def _launcher_stderr() -> int | None:
    """A descriptor of the MPI launcher's own stderr, if the launcher is an ancestor of this process.

    ``mpiexec`` (hydra), ``prterun`` and ``srun`` exit within milliseconds of
    losing a host's proxy and drop what the ranks write after that; a line
    written straight to the launcher's stderr (the user's terminal or the
    batch job's output file, opened for appending) reaches the user anyway.
    None where the launcher runs on another host or cannot be opened.
    """
    try:
        for parent in psutil.Process().parents():
            if parent.name() in _LAUNCHERS:
                return os.open(
                    f"/proc/{parent.pid}/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC
                )
    except (OSError, psutil.Error):
        pass
    return None
