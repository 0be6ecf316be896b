"""The wire over TLS, on real grpc.aio servers on 127.0.0.1: mutual TLS between backends with the cluster
CA works (the peer verified by its IP address), and every mismatch fails fast with a clear error: a
plaintext peer against a TLS server, a TLS peer against a plaintext server, a client without a
certificate against a mutual-TLS server, a certificate from another CA, a name the certificate lacks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from communication.errors import CollectiveTimeout, PeerLost
from communication.group import PeerGroup
from communication.grpc_backend import GrpcBackend
from communication.tls import TlsConfig, secure_channel
from zerowire.certs import make_cluster_certs, make_loopback_certs

TOKEN = "tls-test-token"
TIMEOUT = 20.0  # the collectives' timeout: a failure must come well before it
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    folder = tmp_path_factory.mktemp("certs")
    made = make_cluster_certs(folder, ["127.0.0.1", "peer.example", "localhost"])
    other = make_loopback_certs(folder / "other")
    ca = folder / "ca.pem"
    return {
        "ip": TlsConfig.load(made.hosts[0].cert, made.hosts[0].key, ca),
        "named": TlsConfig.load(made.hosts[1].cert, made.hosts[1].key, ca),
        "localhost": TlsConfig.load(made.hosts[2].cert, made.hosts[2].key, ca),
        "other_ca": TlsConfig.load(other.cert, other.key, folder / "other" / "ca.pem"),
    }


@pytest.fixture
def pair() -> Iterator[list[GrpcBackend]]:
    backends: list[GrpcBackend] = []
    yield backends
    for b in backends:
        b.close()


def start(backends: list[GrpcBackend], tls: TlsConfig | None) -> str:
    backend = GrpcBackend(TOKEN, tls=tls)
    backends.append(backend)
    return f"127.0.0.1:{backend.start('127.0.0.1:0')}"


def gather(a: GrpcBackend, b: GrpcBackend, addresses: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    groups = [PeerGroup("job", 1, r, addresses) for r in range(2)]
    a.set_group(groups[0])
    b.set_group(groups[1])
    fa = a.all_gather(groups[0], 0, 0, torch.ones(4), torch.empty(8), timeout=TIMEOUT)
    fb = b.all_gather(groups[1], 0, 0, 2 * torch.ones(4), torch.empty(8), timeout=TIMEOUT)
    return fa.result(TIMEOUT + 5), fb.result(TIMEOUT + 5)


@pytest.mark.parametrize("name", ["ip", "localhost"])
def test_mutual_tls_backends_gather_and_verify_each_other_by_name(
    certs: dict[str, TlsConfig], pair: list[GrpcBackend], name: str
) -> None:
    """Peers dial the name in each other's certificate: 127.0.0.1 (an IP entry) or localhost (DNS)."""
    host = "127.0.0.1" if name == "ip" else "localhost"
    ports = [start(pair, certs[name]).rsplit(":", 1)[1] for _ in range(2)]
    addresses = tuple(f"{host}:{port}" for port in ports)
    ra, rb = gather(pair[0], pair[1], addresses)
    assert ra.tolist() == rb.tolist() == [1.0] * 4 + [2.0] * 4
    assert pair[0].stats().bytes_received == pair[1].stats().bytes_received == 16


def test_a_shared_name_verifies_peers_whose_addresses_it_does_not_list(
    certs: dict[str, TlsConfig], pair: list[GrpcBackend]
) -> None:
    named = certs["named"]  # certificate for peer.example only, dialled as 127.0.0.1
    shared = TlsConfig.load(named.cert, named.key, named.ca, server_name="peer.example")
    addresses = (start(pair, shared), start(pair, shared))
    ra, _ = gather(pair[0], pair[1], addresses)
    assert ra.tolist() == [1.0] * 4 + [2.0] * 4


def failed_gather(a: GrpcBackend, address_b: str, address_a: str) -> tuple[Exception, float]:
    """Rank 0 (`a`) gathers from a peer at `address_b` that never joins: only its server answers."""
    group = PeerGroup("job", 1, 0, (address_a, address_b))
    a.set_group(group)
    started = time.monotonic()
    with pytest.raises(PeerLost) as caught:
        a.all_gather(group, 0, 0, torch.ones(4), torch.empty(8), timeout=TIMEOUT).result(TIMEOUT + 5)
    return caught.value, time.monotonic() - started


@pytest.mark.parametrize(
    ("client", "server", "expected"),
    [
        (None, "ip", "a TLS peer dialled in plaintext"),
        ("ip", None, "this side dials with TLS and the peer serves plaintext"),
        ("other_ca", "ip", "the peer's certificate is not trusted"),
        ("named", "named", "the peer's certificate is not trusted"),  # it names peer.example, not 127.0.0.1
    ],
)
def test_a_tls_mismatch_fails_fast_with_a_clear_error(
    certs: dict[str, TlsConfig],
    pair: list[GrpcBackend],
    client: str | None,
    server: str | None,
    expected: str,
) -> None:
    address_b = start(pair, certs[server] if server else None)
    address_a = start(pair, certs[client] if client else None)
    error, took = failed_gather(pair[1], address_b, address_a)
    assert not isinstance(error, CollectiveTimeout)
    assert "UNAVAILABLE" in str(error) and expected in str(error), error
    assert took < TIMEOUT / 4, f"took {took:.1f}s"


def health(dial: Callable[[], grpc.aio.Channel]) -> tuple[str, float]:
    """A health check over the channel `dial()` makes: the status name or the error, and its duration."""

    async def check() -> tuple[str, float]:
        channel = dial()
        started = time.monotonic()
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), time.monotonic() - started
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}", time.monotonic() - started
        finally:
            await channel.close()

    return asyncio.run(check())


def test_a_client_without_a_certificate_is_refused_by_a_mutual_tls_server(
    certs: dict[str, TlsConfig], pair: list[GrpcBackend]
) -> None:
    cfg = certs["ip"]
    address = start(pair, cfg)
    assert cfg.ca_pem is not None
    # The server is trusted (the CA), but this client presents no certificate.
    anonymous = grpc.ssl_channel_credentials(root_certificates=cfg.ca_pem)
    answer, took = health(lambda: grpc.aio.secure_channel(address, anonymous))
    assert answer.startswith("UNAVAILABLE"), answer
    assert took < 5
    # Control: the same call with the cluster certificate is served.
    assert health(lambda: secure_channel(address, [], cfg))[0] == "SERVING"
    # A server without a CA (TLS, not mutual) serves a client without a certificate.
    plain_tls = TlsConfig.load(cfg.cert, cfg.key)
    address_2 = start(pair, plain_tls)
    assert health(lambda: grpc.aio.secure_channel(address_2, anonymous))[0] == "SERVING"


def test_plaintext_health_check_against_a_tls_port_fails(
    certs: dict[str, TlsConfig], pair: list[GrpcBackend]
) -> None:
    address = start(pair, certs["ip"])
    answer, took = health(lambda: grpc.aio.insecure_channel(address))
    assert answer.startswith("UNAVAILABLE") and "Socket closed" in answer, answer
    assert took < 5
