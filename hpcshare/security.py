"""Who may reach the job's Dask cluster: TLS with the job's own certificates, and where it listens.

A Dask scheduler runs whatever its clients send. On shared HPC nodes any
other user who can open a TCP connection to it could run code as the job's
user and read its data, so by default:

- rank 0 makes a fresh certificate authority and one certificate for the
  job (:mod:`hpcshare.certificates`, EC P-256, valid for a week, in a
  process of its own beside rank 0: :class:`CredentialsMaker`) and every
  rank receives them over MPI, the one channel that reaches exactly the
  job's processes (:func:`share_credentials`). They are held in memory and
  handed to Dask as PEM text; distributed writes a certificate to disk only
  for the moment it loads it, in a fresh 0700 temporary directory;
- every Dask connection is ``tls://`` with mutual authentication: a peer
  without a certificate signed by the job's authority is refused;
- the scheduler and workers listen on one interface (:func:`listen_interface`):
  loopback when the whole job is on one host, else the interface the
  host's own address is on, or the one ``hpcshare.interface`` names;
- no Dask process serves HTTP unless the job asks for the dashboard, and
  then on a Unix socket in the job's 0700 scratch folder
  (:mod:`hpcshare.dashboard`).

``hpcshare.tls: false`` (``--no-tls``) turns TLS off; the interface rules stay.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from . import sync
from .certificates import make_pem
from .errors import ConfigError, HpcshareError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "Credentials",
    "CredentialsMaker",
    "dask_tls_config",
    "lighter_tls_accepts",
    "listen_interface",
    "make_credentials",
    "share_credentials",
]


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The job's certificate authority and the one certificate every rank presents (PEM text)."""

    ca: str
    cert: str
    key: str

    def __repr__(self) -> str:  # never print the key
        return "Credentials(<the job's CA and certificate>)"


def make_credentials() -> Credentials:
    """A fresh CA and a certificate it signed, for one job, made in this process (local)."""
    return Credentials(**make_pem())


class CredentialsMaker:
    """Rank 0: the job's credentials, made by :mod:`hpcshare.certificates` in a process of its own (local).

    Started as the job starts; :meth:`take` waits for them (bounded). A
    thread would hold rank 0's interpreter lock while ``cryptography``
    loads, and every rank waits for rank 0 in the steps that follow;
    the program runs beside rank 0 instead. If the program cannot run
    (an interpreter that needs its environment, a launch refused), rank 0
    makes them itself. Leaving kills it if it still runs (the job failed
    before it needed the credentials).
    """

    def __init__(self) -> None:
        program = os.path.join(os.path.dirname(__file__), "certificates.py")
        self.process: subprocess.Popen[str] | None = None
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-s", "-S", program],  # no site: it is given the job's sys.path
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # a session of its own: launchers (MPICH's hydra, Slurm) start each rank in its own
                # session, and Linux's autogroup scheduling shares the CPU between sessions, so in
                # rank 0's session the program's ~0.1 s of CPU came out of rank 0's share alone:
                # rank 0 finished its imports ~0.15 s after the others, and every rank waited for it
                start_new_session=True,
            )
            assert self.process.stdin is not None
            stdin, self.process.stdin = self.process.stdin, None  # communicate() must not flush it
            with stdin:
                stdin.write(json.dumps(sys.path) + "\n")  # where cryptography is found
        except OSError:  # no process, or it died at once: take() makes them here, or says why not
            pass

    def take(self, timeout: float) -> Credentials:
        """The credentials (local; bounded by ``timeout`` seconds for the program).

        Raises
        ------
        HpcshareError
            When the program took longer than ``timeout``, or neither it nor
            this process could make them.
        """
        why = "the program did not start"
        if self.process is not None:
            try:
                out, err = self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.close()
                raise HpcshareError(
                    f"making the job's TLS certificates took over {timeout:g} s (hpcshare.timeout); "
                    "or run without TLS (--no-tls, hpcshare.tls: false)"
                ) from None
            if self.process.returncode == 0:
                return Credentials(**json.loads(out))
            why = " ".join(err.strip().splitlines()[-1:]) or f"exit code {self.process.returncode}"
        try:
            return make_credentials()
        except Exception as exc:
            raise HpcshareError(
                f"could not make the job's TLS certificates ({why}; here: {type(exc).__name__}: {exc}); "
                "is the 'cryptography' package installed? Or run without TLS (--no-tls, hpcshare.tls: false)"
            ) from exc

    def close(self) -> None:
        """Stop the program if it still runs, and reap it (local; idempotent)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()

    def __enter__(self) -> CredentialsMaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def share_credentials(
    world: MPI.Intracomm, timeout: float, maker: CredentialsMaker | None = None
) -> Credentials:
    """Rank 0's fresh credentials, on every rank (collective on ``world``, idle and bounded).

    Rank 0 takes them from ``maker`` (started earlier), or makes them here.

    Raises
    ------
    HpcshareError
        On every rank, when rank 0 could not make them.
    """
    mine = None
    with sync.Collective(world, timeout=timeout):
        if world.Get_rank() == 0:  # within the others' wait for rank 0, so that its own error is the one told
            mine = maker.take(0.8 * timeout) if maker is not None else make_credentials()
    creds: Credentials = world.bcast(mine, root=0)
    return creds


def lighter_tls_accepts() -> Callable[[], None]:
    """Spare this process's TLS servers loading the system's CA store for nothing (local); returns the undo.

    tornado's ``TCPServer`` wraps an accepted socket in the listener's SSL
    context, then makes an ``SSLIOStream`` without ``ssl_options``, whose
    constructor loads tornado's default *client* context (every CA
    certificate of the system, ~50 ms of CPU) only to keep it unused: the
    socket is wrapped already. Dask's scheduler pays it on its first
    connection, while every worker waits to register. Here such a stream is
    given the context its socket was wrapped with instead; nothing else
    changes (tornado's streams that connect out, and its HTTP client, keep
    their defaults).
    """
    import tornado.tcpserver

    original = tornado.tcpserver.SSLIOStream

    class AcceptedSSLIOStream(original):  # type: ignore[misc, valid-type]
        def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
            context = getattr(sock, "context", None)
            if context is not None:
                kwargs.setdefault("ssl_options", context)
            super().__init__(sock, *args, **kwargs)

    tornado.tcpserver.SSLIOStream = AcceptedSSLIOStream  # type: ignore[misc]

    def undo() -> None:
        tornado.tcpserver.SSLIOStream = original  # type: ignore[misc]

    return undo


def dask_tls_config(creds: Credentials) -> dict[str, Any]:
    """Dask config that makes every connection of this process TLS with the job's certificate."""
    config: dict[str, Any] = {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": creds.ca,
    }
    for role in ("scheduler", "worker", "client"):
        config[f"distributed.comm.tls.{role}.cert"] = creds.cert
        config[f"distributed.comm.tls.{role}.key"] = creds.key
    return config


def _interface_of(address: str) -> str | None:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def _loopback() -> str:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and ipaddress.ip_address(a.address).is_loopback for a in addrs):
            return name
    raise ConfigError("this host has no loopback interface; set hpcshare.interface (--interface)")


def _host_address() -> str:
    """The address other hosts reach this one at: the default route's, else the host name's."""
    from distributed.utils import get_ip

    try:
        address = get_ip()
    except OSError:
        address = "127.0.0.1"
    if ipaddress.ip_address(address).is_loopback:
        try:
            address = socket.gethostbyname(socket.gethostname())
        except OSError:
            pass
    return address


def interface_addresses() -> list[str]:
    """This host's IPv4 addresses beyond loopback, as ``"INTERFACE ADDRESS"`` (local)."""
    return sorted(
        f"{name} {a.address}"
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    )


def interface_address(name: str) -> str:
    """The IPv4 address of interface ``name`` on this host (local)."""
    for a in psutil.net_if_addrs().get(name, []):
        if a.family == socket.AF_INET:
            return str(a.address)
    raise ConfigError(f"interface {name!r} of {socket.gethostname()} has no IPv4 address")


def listen_interface(
    requested: str | None, hosts: int, addresses: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The network interface this rank's Dask servers listen on (local).

    ``requested`` (``hpcshare.interface``) must exist on this host. Without
    it: loopback when the job has one host, else the interface of this
    host's own address. ``addresses`` (host name -> its
    :func:`interface_addresses`) goes into the refusal, so the interface to
    name is plain.
    """
    names = psutil.net_if_addrs()
    if requested:
        if requested not in names:
            raise ConfigError(
                f"hpcshare.interface {requested!r} is not an interface of {socket.gethostname()} "
                f"(it has {', '.join(sorted(names))}); name the job's network, such as ib0 or hsn0"
            )
        return requested
    if hosts == 1:
        return _loopback()
    address = _host_address()
    name = _interface_of(address)
    if name is None or ipaddress.ip_address(address).is_loopback:
        raise ConfigError(
            f"cannot tell which network interface of {socket.gethostname()} the job's other "
            f"hosts reach it on (its address is {address}); set hpcshare.interface (--interface), "
            f"one of {', '.join(sorted(names))}{_where_hosts_are(addresses)}"
        )
    return name


def _where_hosts_are(addresses: Mapping[str, Sequence[str]] | None) -> str:
    if not addresses:
        return ""
    hosts = "; ".join(f"{host}: {', '.join(found) or 'none'}" for host, found in addresses.items())
    return f". The job's hosts have these addresses (interface address): {hosts}"
