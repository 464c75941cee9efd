"""The job's TLS certificates: a fresh authority and one certificate it signed (EC P-256).

A module (:func:`make_pem`) and a program: rank 0 runs this file by path
(``python -s -S certificates.py``, :class:`hpcshare.security.CredentialsMaker`),
so that loading ``cryptography``'s OpenSSL bindings (~0.1 s of CPU) and
making the keys happen in a process of their own (and session: the CPU
it takes is not rank 0's alone), beside the ranks' imports, while rank 0
goes on loading its own. The program reads
the parent's ``sys.path`` as JSON on stdin (to find ``cryptography``
where the job does) and writes the PEM text as JSON on stdout, a pipe
only rank 0 reads. Standard library and ``cryptography`` only.
"""

from __future__ import annotations

import datetime
import json
import sys

__all__ = ["make_pem"]

_JOB_NAME = "hpcshare-job"


def make_pem() -> dict[str, str]:
    """A fresh CA and a certificate it signed, for one job: PEM text of "ca", "cert" and "key" (local; rank 0)."""
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
    return {
        "ca": ca.public_bytes(pem).decode(),
        "cert": cert.public_bytes(pem).decode(),
        "key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


def _program() -> None:
    sys.path[:] = json.loads(sys.stdin.readline())
    json.dump(make_pem(), sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    _program()
