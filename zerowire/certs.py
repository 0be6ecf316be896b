"""A private certificate authority for one cluster, and certificates it signs.

`make_cluster_certs(folder, hosts)` writes ca.pem/ca.key, one certificate and key per host (its subject
alternative name is the host, as a DNS name or an IP address) and coordinator.pem/coordinator.key. Every
leaf is usable as a server and as a client certificate (extended key usage serverAuth + clientAuth), as
mutual TLS on gRPC needs. Keys are ECDSA P-256, unencrypted PKCS#8 PEM, written with mode 0600.
An existing ca.pem/ca.key pair in the folder is reused, so hosts can be added later.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from communication.tls import TlsConfig

CA_DAYS = 3650
LEAF_DAYS = 825
COORDINATOR = "coordinator"
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPair:
    """One certificate and its key, as written."""

    name: str
    cert: Path
    key: Path
    sans: tuple[str, ...]


@dataclass(frozen=True)
class ClusterCerts:
    ca: Path
    ca_key: Path
    ca_reused: bool
    hosts: tuple[CertPair, ...]
    coordinator: CertPair | None


def check_san(name: str) -> str:
    """A host name or IP address usable as a subject alternative name (ValueError otherwise)."""
    name = name.strip()
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(name) > 253 or not re.fullmatch(rf"(\*\.)?{label}(\.{label})*\.?", name):
        raise ValueError(f"{name!r} is neither a host name nor an IP address")
    return name.rstrip(".").lower()


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def file_stem(name: str) -> str:
    """The file name of a host's certificate: the host with anything but [A-Za-z0-9._-] as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with `mode` (never briefly readable by others), then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "zerowire cluster CA", days: int = CA_DAYS) -> tuple[x509.Certificate, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, _key_pem(key)


def issue(
    ca_cert: x509.Certificate, ca_key_pem: bytes, common_name: str, sans: list[str], days: int = LEAF_DAYS
) -> tuple[x509.Certificate, bytes]:
    """A leaf certificate for `sans` (checked names), signed by the CA, for server and client use."""
    if not sans:
        raise ValueError("a certificate needs at least one host name or address")
    names = [check_san(s) for s in sans]
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key made by `zerowire certs`")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, _key_pem(key)


def make_cluster_certs(
    folder: Path,
    hosts: list[str],
    coordinator_hosts: list[str] | None = None,
    *,
    force: bool = False,
    days: int = LEAF_DAYS,
) -> ClusterCerts:
    """Write the CA (or reuse the folder's), a certificate per host and the coordinator's certificate.

    The coordinator's is kept when it exists and `coordinator_hosts` is not given (adding hosts later).
    Nothing is written when a host name is invalid, two hosts share a file name, or a certificate file
    exists already (unless `force`: then leaf files are replaced; the CA never is)."""
    hosts = [check_san(h) for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("--hosts names no host")
    coordinator_sans = [check_san(h) for h in (coordinator_hosts or [*hosts, *LOOPBACK_SANS]) if h.strip()]
    coordinator_sans = list(dict.fromkeys(coordinator_sans))
    stems = [file_stem(h) for h in hosts]
    if len(set(stems)) != len(stems) or any(s in ("ca", COORDINATOR) for s in stems):
        raise ValueError(f"host names must be distinct and not 'ca' or '{COORDINATOR}': {hosts}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    ca_path, ca_key_path = folder / "ca.pem", folder / "ca.key"
    leaves = [(h, [h], folder / f"{s}.pem", folder / f"{s}.key") for h, s in zip(hosts, stems, strict=True)]
    keep_coordinator = coordinator_hosts is None and (folder / "coordinator.pem").exists()
    if not keep_coordinator:
        leaves.append((COORDINATOR, coordinator_sans, folder / "coordinator.pem", folder / "coordinator.key"))
    existing = [p for _, _, cert, key in leaves for p in (cert, key) if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing)
        raise ValueError(f"{shown} exist already (--force replaces them; the CA is kept)")
    if ca_path.exists() != ca_key_path.exists():
        raise ValueError(f"{folder} has only one of ca.pem and ca.key; use a new folder")
    reused = ca_path.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if reused:
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key_pem = ca_key_path.read_bytes()
    else:
        ca_cert, ca_key_pem = make_ca()
    issued = [
        (name, sans, cert, key, *issue(ca_cert, ca_key_pem, name, sans, days))
        for name, sans, cert, key in leaves
    ]
    if not reused:
        _write(ca_key_path, ca_key_pem, 0o600)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    pairs = []
    for name, sans, cert_path, key_path, cert, key_pem in issued:
        _write(key_path, key_pem, 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        pairs.append(CertPair(name, cert_path, key_path, tuple(check_san(s) for s in sans)))
    if keep_coordinator:
        return ClusterCerts(ca_path, ca_key_path, reused, tuple(pairs), None)
    return ClusterCerts(ca_path, ca_key_path, reused, tuple(pairs[:-1]), pairs[-1])


def make_loopback_certs(folder: Path) -> CertPair:
    """A fresh CA in `folder` and one certificate for this machine's loopback names (localhost, 127.0.0.1,
    ::1), shared by a local coordinator and its workers; returns that certificate (the CA is ca.pem)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key_pem = make_ca("zerowire local CA", days=30)
    cert, key_pem = issue(ca_cert, ca_key_pem, "localhost", list(LOOPBACK_SANS), days=30)
    _write(folder / "ca.key", ca_key_pem, 0o600)
    _write(folder / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(folder / "localhost.key", key_pem, 0o600)
    _write(folder / "localhost.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CertPair("localhost", folder / "localhost.pem", folder / "localhost.key", LOOPBACK_SANS)


def loopback_tls(folder: Path) -> TlsConfig:
    """Fresh loopback certificates in `folder`, loaded: mutual TLS between processes of this machine
    (for example `GrpcBackend(token, tls=loopback_tls(folder))` on every side)."""
    from communication.tls import TlsConfig

    pair = make_loopback_certs(folder)
    return TlsConfig.load(pair.cert, pair.key, folder / "ca.pem")
