"""A small supervisor process per rank that names a rank dying outside hpcshare's control.

A rank killed by a signal (SIGKILL from an OOM killer or a user, a crash
in C code) or ended by ``os._exit`` in a task says nothing: the MPI
launcher's banner names a process ID at best, sometimes the wrong one, and
only the process's parent can learn how it ended. So ``hpcshare job``, when
started by a launcher, forks before MPI starts: the child goes on as the
rank, and the process the launcher started becomes this file's program, a
standard-library-only supervisor that

- forwards the launcher's signals (SIGTERM, SIGINT, SIGHUP, SIGQUIT,
  SIGUSR1, SIGUSR2) to the rank;
- waits, idle, for the rank to end; if it ended without saying first that it
  ends through hpcshare (:func:`ending`; every Python exit path, aborts and
  hpcshare's own signal handling do), and without a signal from the launcher
  to end, prints one line: the rank, its role, its node, its process ID, and
  the signal or exit code;
- then ends the same way (the same exit code, or killed by the same signal),
  so the launcher sees what it would have seen and ends the rest of the job.

Before that line it leaves a mark in the job's scratch folder on its host
(0700, a random name; the rank tells its supervisor the path through their
pipe, :func:`tell_scratch`): Open MPI's launcher then sends the other ranks
SIGTERM, and their handler stays quiet when it finds the mark
(:func:`death_named`), so the death is the job's one line.

When the launcher dies, the supervisor gets its parent-death signal and
exits, and the rank gets its own (``ending.end_with_launcher``).
``hpcshare.supervise: false`` runs ranks without a supervisor.

Program: ``python -I -S supervise.py CHILD_PID FD RANK ROLE HOST``.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import sys

__all__ = [
    "death_mark",
    "death_named",
    "ending",
    "start",
    "tell_liveness",
    "tell_scratch",
    "term_on_parent_death",
]

_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_ENDING_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # after these, the rank's end is expected
# messages on the pipe from the rank, each ended by a NUL (a path holds none)
_ENDING = b"e"
_SCRATCH = b"s"  # followed by the job's scratch folder on this host
_LIVENESS = b"l"  # comes with a descriptor: where the supervisor says "!" when it names the rank's death
_ABORTS = b"!"  # on the rank's liveness descriptor: this death is named, no host is lost (hostwatch.ABORTS)
_DEATH_NAMED = "rank-death-named"  # the mark in the scratch folder: a supervisor named its rank's death

_fd: int | None = None  # the rank's end of the socket pair to its supervisor


def start(rank: int, role: str) -> None:
    """Go on as a child of this process, which becomes the rank's supervisor (local; before MPI starts).

    Returns in the child only; the parent process runs the supervisor
    program in its place and never returns.
    """
    global _fd
    read_sock, write_sock = socket.socketpair()  # a pipe that can carry a descriptor (tell_liveness)
    read_end, write_end = read_sock.detach(), write_sock.detach()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the rank
        os.close(read_end)
        _fd = write_end
        atexit.register(ending)
        return
    os.close(write_end)
    os.set_inheritable(read_end, True)
    program = os.path.abspath(__file__)
    args = [str(pid), str(read_end), str(rank), role, socket.gethostname()]
    os.execv(sys.executable, [sys.executable, "-I", "-S", program, *args])


def ending() -> None:
    """Tell this rank's supervisor that the rank ends through hpcshare (local; idempotent; no-op without one)."""
    global _fd
    if _fd is None:
        return
    fd, _fd = _fd, None
    try:
        os.write(fd, _ENDING + b"\0")
        os.close(fd)
    except OSError:
        pass


def tell_scratch(path: str) -> None:
    """Tell this rank's supervisor the job's scratch folder on this host (local; no-op without one).

    Where the supervisor leaves its mark when it names the rank's death.
    """
    message = _SCRATCH + os.fsencode(path) + b"\0"
    if _fd is None or b"\0" in message[:-1] or len(message) > select.PIPE_BUF:  # one write, whole
        return
    try:
        os.write(_fd, message)
    except OSError:
        pass


def tell_liveness(fd: int) -> None:
    """Give this rank's supervisor a copy of ``fd`` (local; no-op without one).

    The rank's liveness connection to rank 0 (or, on rank 0's host, the host
    watcher's FIFO): a supervisor that names its rank's death says ``!`` there
    first, so the rank's vanishing is not taken for a lost host.
    """
    if _fd is None:
        return
    try:
        with socket.socket(fileno=os.dup(_fd)) as sock:
            socket.send_fds(sock, [_LIVENESS + b"\0"], [fd])
    except OSError:
        pass


def death_mark(scratch: str) -> str:
    """The path of the mark a supervisor leaves in the job's scratch folder when it names its rank's death (local)."""
    return os.path.join(scratch, _DEATH_NAMED)


def death_named(scratch: str | None) -> bool:
    """Whether a supervisor on this host has named its rank's death in this job (local).

    ``scratch`` is the job's scratch folder on this host (0700: only the
    job's user can leave the mark). The ranks the launcher then stops say
    nothing more.
    """
    return scratch is not None and os.path.lexists(death_mark(scratch))


def term_on_parent_death() -> bool:
    """Have the kernel send this process SIGTERM when its parent dies (local; Linux; False if it cannot)."""
    import ctypes

    try:
        # the process's own symbols (libc among them): ctypes.util.find_library would run
        # ldconfig in a subprocess, and forking after MPI started can crash
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(1, signal.SIGTERM, 0, 0, 0) == 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {number} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)} without ending through hpcshare"


def _end_like(status: int) -> None:
    """End this process as the rank ended: same signal, or same exit code."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the rank's crash, not a second core file
        except (ImportError, ValueError, OSError):
            pass
        if number not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(number, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
        os.kill(os.getpid(), number)
        os._exit(128 + number)  # a signal whose default is not to end the process
    os._exit(os.waitstatus_to_exitcode(status))


class _Supervisor:
    """The program's state: the rank's process, its pipe, and what the launcher said."""

    def __init__(self, child: int, fd: int) -> None:
        self.child, self.fd = child, fd
        self.parent = os.getppid()
        self.told = False  # the launcher told the rank to end
        self.ended = False  # the rank said it ends through hpcshare
        self.scratch: str | None = None  # the job's scratch folder on this host, once the rank said
        self.liveness: list[int] = []  # descriptors where a named death is announced (tell_liveness)
        self.pending = b""  # the start of a message not yet read whole

    def heard(self, data: bytes, fds: list[int]) -> None:
        """Take in bytes (and descriptors) from the rank's socket."""
        self.liveness += fds
        *messages, self.pending = (self.pending + data).split(b"\0")
        for message in messages:
            if message == _ENDING:
                self.ended = True
            elif message.startswith(_SCRATCH):
                self.scratch = os.fsdecode(message[len(_SCRATCH) :])

    def mark_death_named(self) -> None:
        """Leave the mark that this rank's death is named, in the job's scratch folder, and say so on
        its liveness descriptors (best effort)."""
        for fd in self.liveness:
            try:
                os.set_blocking(fd, False)
                os.write(fd, _ABORTS)
            except OSError:
                pass
        if self.scratch is None:
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            os.close(os.open(death_mark(self.scratch), flags, 0o600))
        except OSError:  # another rank's death was named first, or the folder is gone
            pass

    def forward(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and os.getppid() != self.parent:
            os._exit(128 + signum)  # the launcher died: the rank gets its own parent-death signal
        if signal.Signals(signum).name in _ENDING_SIGNALS:
            self.told = True
        try:
            os.kill(self.child, signum)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """The rank's wait status, once it has ended; idle until then."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select below
        for name in _FORWARDED:
            signal.signal(getattr(signal, name), self.forward)
        watched = [self.fd, wake_read]
        rank = socket.socket(fileno=self.fd)
        while True:
            pid, status = os.waitpid(self.child, os.WNOHANG)
            if pid:
                return status
            for ready in select.select(watched, [], [])[0]:  # until the rank speaks, ends, or a signal
                if ready != self.fd:
                    os.read(ready, 512)
                    continue
                try:
                    data, fds, _, _ = socket.recv_fds(rank, 512, 4)
                except OSError:
                    data, fds = b"", []
                self.heard(data, fds)
                if not data:
                    watched = [wake_read]  # the rank closed its end (or died): wait for SIGCHLD


def _supervise(child: int, fd: int, rank: str, role: str, host: str) -> None:
    term_on_parent_death()
    supervisor = _Supervisor(child, fd)
    status = supervisor.wait()
    if not supervisor.ended and not supervisor.told:
        supervisor.mark_death_named()  # before the line: the launcher stops the others once this process ends
        try:
            print(
                f"hpcshare: rank {rank} ({role} on {host}, pid {child}) {_describe(status)}; the job ends",
                file=sys.stderr,
                flush=True,
            )
        except OSError:
            pass
    _end_like(status)


if __name__ == "__main__":
    _supervise(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
