"""TLS for the wire (gRPC between workers) and the REST API (coordinator).

`TlsConfig.load(cert, key, ca)` reads and checks the PEM files once; from it come the gRPC server
credentials (`server_credentials`), the channel credentials (`channel_credentials`, through
`secure_channel`), uvicorn's ssl arguments (`uvicorn_ssl_args`) and the httpx `verify` context
(`client_ssl_context`). With a CA, gRPC is mutual: the server requires a client certificate signed by
the CA, and every channel presents this process's certificate and verifies the peer's with the CA.
Peers are verified against the address dialled (an IP address or a DNS name in the certificate's
subject alternative names), or against `server_name` when one is set.

Plaintext stays the default; `plaintext_banner` announces it when bound to a non-loopback address.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported where used: REST clients load this module without it
    import grpc


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the TLS {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsConfig:
    """This process's certificate and key, and the CA that signs its peers (None: no client certificates
    are required, and peers are verified with the system's roots). The PEM bytes are loaded once."""

    cert: Path
    key: Path
    ca: Path | None
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes | None = field(repr=False)
    server_name: str | None = None

    @property
    def mutual(self) -> bool:
        return self.ca_pem is not None

    @classmethod
    def load(
        cls,
        cert: str | Path,
        key: str | Path,
        ca: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read and check the files: the key matches the certificate, unencrypted; the CA (when given)
        signed the certificate. ValueError with the reason otherwise."""
        cert, key = Path(cert), Path(key)
        ca = Path(ca) if ca else None
        cert_pem = _read(cert, "certificate")
        key_pem = _read(key, "key")
        if b"ENCRYPTED" in key_pem:
            raise ValueError(f"the TLS key {key} is encrypted; zerowire needs an unencrypted key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS key {key} does not match the certificate {cert} ({exc})") from None
        ca_pem = None
        if ca is not None:
            ca_pem = _read(ca, "CA")
            _check_signed_by(cert, cert_pem, ca, ca_pem)
        if server_name is not None and not server_name.strip():
            raise ValueError("the TLS server name must not be empty")
        return cls(cert, key, ca, cert_pem, key_pem, ca_pem, server_name)

    @classmethod
    def from_options(
        cls,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> TlsConfig | None:
        """None when no TLS option is given; the loaded config when cert and key are; ValueError when only
        some are (a CA or a server name alone is no TLS configuration)."""
        if not (cert or key or ca or server_name):
            return None
        if not (cert and key):
            given = [
                flag
                for flag, value in (
                    ("--tls-cert", cert),
                    ("--tls-key", key),
                    ("--tls-ca", ca),
                    ("--tls-server-name", server_name),
                )
                if value
            ]
            raise ValueError(f"TLS needs both --tls-cert and --tls-key (given: {', '.join(given)})")
        return cls.load(cert, key, ca, server_name=server_name)


def describe_tls(cfg: TlsConfig | None) -> str:
    """'plaintext', 'TLS' or 'mutual TLS' (for logs)."""
    if cfg is None:
        return "plaintext"
    return "mutual TLS" if cfg.mutual else "TLS"


def _check_signed_by(cert: Path, cert_pem: bytes, ca: Path, ca_pem: bytes) -> None:
    """Some certificate of the chain in `cert_pem` is a CA certificate or directly issued by one."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ValueError(f"cannot parse {cert} or {ca}: {exc}") from None
    for member in chain:
        for root in roots:
            if member == root:
                return
            try:
                member.verify_directly_issued_by(root)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return
    raise ValueError(f"the TLS certificate {cert} is not signed by the CA {ca}")


def server_credentials(cfg: TlsConfig) -> grpc.ServerCredentials:
    """TLS for the wire server; with a CA, clients must present a certificate it signed."""
    import grpc

    return grpc.ssl_server_credentials(
        [(cfg.key_pem, cfg.cert_pem)], root_certificates=cfg.ca_pem, require_client_auth=cfg.mutual
    )


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    """TLS for channels to peers: verify them with the CA (system roots without one) and present this
    process's certificate."""
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=cfg.ca_pem, private_key=cfg.key_pem, certificate_chain=cfg.cert_pem
    )


def channel_options(cfg: TlsConfig | None) -> list[tuple[str, Any]]:
    """Extra channel options: the name peers' certificates are checked against, when set."""
    if cfg is None or cfg.server_name is None:
        return []
    return [("grpc.ssl_target_name_override", cfg.server_name)]


def secure_channel(address: str, options: list[tuple[str, Any]], cfg: TlsConfig | None) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS with `cfg`, plaintext without."""
    import grpc

    if cfg is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(
        address, channel_credentials(cfg), options=[*options, *channel_options(cfg)]
    )


def connect_hint(details: str | None) -> str:
    """For a call that failed while connecting in a way TLS settings explain, a hint to append to its error
    ('' for anything else: a refused connection, a failure after set-up)."""
    text = details or ""
    if "failed to connect" not in text:
        return ""
    if "WRONG_VERSION_NUMBER" in text:
        return (
            " (TLS: this side dials with TLS and the peer serves plaintext: give every worker the same "
            "--tls-* options)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "Hostname Verification" in text:
        return (
            " (TLS: the peer's certificate is not trusted: is it signed by --tls-ca, and does it name the "
            "address dialled?)"
        )
    if "Socket closed" in text or "Connection reset" in text:
        return (
            " (closed during set-up: a TLS peer dialled in plaintext, or a mutual-TLS peer refusing this "
            "side's certificate? give every worker the same --tls-* options)"
        )
    return ""


def https_hint(url: str, error: BaseException | None) -> str:
    """For a failed REST call, a hint when the URL's scheme or the CA may be the cause ('' otherwise)."""
    text = str(error or "")
    if url.startswith("http://") and ("disconnected" in text or "reset" in text.lower()):
        return " (does the coordinator serve HTTPS? then use an https:// URL)"
    if url.startswith("https://") and "WRONG_VERSION_NUMBER" in text.upper():
        return " (the coordinator seems to serve plain HTTP: use an http:// URL)"
    if "CERTIFICATE_VERIFY_FAILED" in text.upper():
        return " (its certificate is not trusted: pass the CA that signed it, --tls-ca)"
    return ""


def uvicorn_ssl_args(cfg: TlsConfig | None) -> dict[str, Any]:
    """uvicorn.Config keyword arguments serving HTTPS with `cfg` (none: plain HTTP)."""
    if cfg is None:
        return {}
    return {"ssl_certfile": str(cfg.cert), "ssl_keyfile": str(cfg.key)}


def client_ssl_context(ca: TlsConfig | str | Path | None) -> ssl.SSLContext | bool:
    """httpx's `verify`: a context that trusts the CA (with hostname checks), or True (system roots)."""
    if isinstance(ca, TlsConfig):
        if ca.ca_pem is None:
            return True
        return ssl.create_default_context(cadata=ca.ca_pem.decode("ascii"))
    if ca is None:
        return True
    return ssl.create_default_context(cadata=_read(Path(ca), "CA").decode("ascii"))


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name; empty and wildcards are not) only reaches this machine."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_banner(what: str, address: str) -> str:
    """The stderr banner of a plaintext server bound to a non-loopback address."""
    lines = [
        f"WARNING: {what} serves PLAINTEXT on {address}: no TLS.",
        "Anyone on the network path can read and alter its traffic, tokens included.",
        "Give --tls-cert/--tls-key/--tls-ca (make them with `zerowire certs`), or bind to 127.0.0.1.",
    ]
    width = max(len(line) for line in lines) + 6
    bar = "!" * width
    return "\n".join([bar, *(f"!! {line:<{width - 6}} !!" for line in lines), bar])
