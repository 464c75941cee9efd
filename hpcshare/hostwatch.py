"""Name a lost host, even when the launcher ends the job first.

A small program, standard library only (``python -I -S hostwatch.py SPEC``),
started by world rank 0 in a session of its own on a job of several hosts
(:mod:`hpcshare.liveness`). It is the only reader of rank 0's liveness
connections (one per rank on another host, with keepalive and
``TCP_USER_TIMEOUT`` set). A host is lost when one of its connections goes
unanswered for ``hpcshare.host-timeout`` (its link or its kernel is gone),
or when every rank of it closes its connection without a goodbye (its
processes killed). Then it writes one line naming the host and its ranks
straight to the launcher's stderr (its own stderr, rank 0's, where the
launcher runs elsewhere), tells rank 0 (one byte on its stdout), which ends
the job, and exits.

Why a process of its own: hydra's ``mpiexec`` (and ``prterun``, ``srun``)
exits within milliseconds of losing a host's proxy, its proxies kill every
rank's process group with SIGKILL, and whatever the ranks print after that is
dropped. Rank 0's watching thread (busy scheduler, the GIL) rarely gets to
see the connections close before it is killed itself; this process is not in
any rank's process group and does nothing else.

It stays quiet when the job ends through hpcshare: a rank on rank 0's host
that ends (normally or by an abort) writes ``q`` into the FIFO in the job's
0700 scratch folder; a rank on another host that aborts the job sends ``!``
on its connection, one that ends normally ``.``; a rank's supervisor that
names its rank's death (hpcshare.supervise) says ``!`` on the rank's
connection or into the FIFO first. It exits when every
connection has ended, on ``q``, on ``!``, or one second after rank 0 is gone.

SPEC is JSON: ``{"rank0": PID, "timeout": SECONDS, "say": FD or -1, "fifo": PATH, "conns":
[[FD, RANK, HOST], ...], "hosts": {HOST: [[RANK, ...], "3, 4: worker"]}}``.
"""

from __future__ import annotations

import errno
import json
import os
import select
import sys
import time

SETTLE = 0.2  # s after a host's last connection closed: an abort's "q" or "!" may still be on its way
GRACE = 1.0  # s to keep watching after rank 0 is gone (the launcher may kill it first)


UNANSWERED = (
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EHOSTDOWN,
)  # the peer stopped answering
# the protocol, here once (hpcshare.liveness imports it; hpcshare.supervise, a program of its own, repeats ABORTS)
GOODBYE = b"."  # on a connection: the rank ends normally
ABORTS = b"!"  # on a connection or into the FIFO: the job ends through hpcshare (an abort, a named death)
QUIET = b"q"  # into the FIFO: a rank on rank 0's host ends through hpcshare
LOST = b"L"  # to rank 0 (this program's stdout): a host is lost and named; end the job


def _line(host: str, ranks: str, unanswered: float | None) -> bytes:
    why = (
        "all its ranks vanished at once without ending through hpcshare: the host crashed or its "
        "processes were killed"
        if unanswered is None
        else f"it has not answered for {unanswered:g} s (hpcshare.host-timeout): its network link or "
        "the host is down"
    )
    return f"hpcshare: error: lost host {host} (ranks {ranks}): {why}; ending the job\n".encode()


def _rank0_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Watch:
    def __init__(self, spec: dict) -> None:
        self.rank0 = int(spec["rank0"])
        self.timeout = float(spec["timeout"])
        self.unanswered = False  # the host found lost went unanswered (rather than vanished)
        self.say = int(spec["say"])
        self.hosts: dict[str, tuple[list[int], str]] = spec["hosts"]  # host -> its ranks, and their text
        self.conns = {fd: (rank, host) for fd, rank, host in spec["conns"]}  # the connections still open
        self.vanished: dict[str, set[int]] = {h: set() for h in self.hosts}
        self.answered: set[str] = set()  # hosts with a rank that said goodbye
        self.fifo = os.open(spec["fifo"], os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(spec["fifo"], os.O_WRONLY | os.O_NONBLOCK)  # no EOF while no rank writes
        self.quiet = False
        self.rank0_gone_at: float | None = None
        try:  # readable when rank 0 has ended (Linux 5.3+); else polled
            self.pidfd: int | None = os.pidfd_open(self.rank0)
        except (AttributeError, OSError):
            self.pidfd = None

    def _on_conn(self, fd: int) -> str | None:
        """Read a connection; the host that just vanished, if any."""
        rank, host = self.conns[fd]
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in UNANSWERED:
                self.unanswered = True
                return host
            data = b""  # reset: the rank's process is gone
        if ABORTS in data:
            self.quiet = True
            return None
        if data and GOODBYE not in data:
            return None
        del self.conns[fd]
        os.close(fd)
        if data:
            self.answered.add(host)
            return None
        self.vanished[host].add(rank)
        gone = self.vanished[host] >= set(self.hosts[host][0])
        return host if gone and host not in self.answered else None

    def _wait(self, timeout: float | None) -> list[int]:
        fds = [*self.conns, self.fifo] + ([self.pidfd] if self.pidfd is not None else [])
        ready, _, _ = select.select(fds, [], [], timeout)
        if self.pidfd is not None and self.pidfd in ready:
            ready.remove(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
            self.rank0_gone_at = time.monotonic()
        return ready

    def _drain(self, ready: list[int]) -> str | None:
        lost = None
        for fd in ready:
            if fd == self.fifo:
                try:
                    said = os.read(fd, 64)
                    if QUIET in said or ABORTS in said:  # a rank, or its supervisor, ends the job
                        self.quiet = True
                except BlockingIOError:
                    pass
            elif fd in self.conns:
                lost = self._on_conn(fd) or lost
        return lost

    def run(self) -> None:
        while self.conns and not self.quiet:
            if self.pidfd is None and self.rank0_gone_at is None and _rank0_gone(self.rank0):
                self.rank0_gone_at = time.monotonic()
            if self.rank0_gone_at is not None and time.monotonic() - self.rank0_gone_at > GRACE:
                return
            timeout = None if self.pidfd is not None else 0.5 if self.rank0_gone_at is None else 0.1
            lost = self._drain(self._wait(timeout))
            if lost is None:
                continue
            settle = time.monotonic() + SETTLE
            while not self.quiet and (left := settle - time.monotonic()) > 0:
                self._drain(self._wait(left))
            if not self.quiet:
                self._say(_line(lost, self.hosts[lost][1], self.timeout if self.unanswered else None))
                try:
                    os.write(1, LOST)  # rank 0 ends the job
                except OSError:
                    pass
            return

    def _say(self, line: bytes) -> None:
        for fd in (self.say, 2):
            if fd < 0:
                continue
            try:
                os.write(fd, line)
                return
            except OSError:
                continue


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    for fd, _, _ in spec["conns"]:
        os.set_blocking(fd, False)
    Watch(spec).run()


if __name__ == "__main__":
    main(sys.argv)
