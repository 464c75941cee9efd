"""Who may reach the job's Dask cluster: TLS with the job's own certificates, and where it listens.

A Dask scheduler runs whatever its clients send. On shared HPC nodes any
other user who can open a TCP connection to it could run code as the job's
user and read its data, so by default:

- rank 0 makes a fresh certificate authority and one certificate for the
  job (:func:`make_credentials`, EC P-256, valid for the job's day) and every
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
import datetime
import ipaddress
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from . import sync
from .errors import ConfigError

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = [
    "Credentials",
    "dask_tls_config",
    "listen_interface",
    "make_credentials",
    "share_credentials",
    "warm_up",
]

_JOB_NAME = "hpcshare-job"


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The job's certificate authority and the one certificate every rank presents (PEM text)."""

    ca: str
    cert: str
    key: str

    def __repr__(self) -> str:  # never print the key
        return "Credentials(<the job's CA and certificate>)"


def make_credentials() -> Credentials:
    """A fresh CA and a certificate it signed, for one job (local; rank 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{_JOB_NAME} authority")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _JOB_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_JOB_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Credentials(
        ca=ca.public_bytes(pem).decode(),
        cert=cert.public_bytes(pem).decode(),
        key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
    )


def warm_up() -> threading.Thread:
    """Load the certificate library in a background thread, so :func:`make_credentials` is quick later (local).

    The first credentials of a process cost ~0.17 s, nearly all of it loading
    ``cryptography``'s OpenSSL bindings; a later call costs ~1 ms. Rank 0
    starts this when the job starts, and loads them while the ranks place
    the inputs, instead of while every rank waits for the certificates.
    """
    thread = threading.Thread(target=make_credentials, name="hpcshare-tls-warm-up", daemon=True)
    thread.start()
    return thread


def share_credentials(world: MPI.Intracomm, timeout: float) -> Credentials:
    """Rank 0's fresh credentials, on every rank (collective on ``world``, idle and bounded)."""
    mine = make_credentials() if world.Get_rank() == 0 else None
    sync.barrier(world, timeout=timeout, what="rank 0 to make the job's TLS certificates")
    creds: Credentials = world.bcast(mine, root=0)
    return creds


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
