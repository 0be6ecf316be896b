"""`zerowire certs` and the TLS configuration: the CA signs every certificate, the names are the ones
asked for, keys are private; bad input is refused clearly and changes nothing; plaintext on a
non-loopback address is announced."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from communication.tls import TlsConfig, client_ssl_context, is_loopback, plaintext_banner
from zerowire.certs import make_loopback_certs
from zerowire.cli import main

pytestmark = pytest.mark.timeout(60)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_certs_writes_a_ca_and_certificates_it_signed_with_the_names_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--hosts", "10.0.0.7,node2.example.org,fd00::5"]) == 0
    printed = capsys.readouterr().out
    assert "--tls-cert" in printed and str(out / "coordinator.pem") in printed
    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expected = {
        "10.0.0.7": (set(), {"10.0.0.7"}),
        "node2.example.org": ({"node2.example.org"}, set()),
        "fd00__5": (set(), {"fd00::5"}),
        "coordinator": (
            {"node2.example.org", "localhost"},
            {"10.0.0.7", "fd00::5", "127.0.0.1", "::1"},
        ),
    }
    for stem, (dns, ips) in expected.items():
        cert = load(out / f"{stem}.pem")
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert names(cert) == (dns, ips), stem
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        # The key file belongs to the certificate, and TLS loads the pair against the CA.
        TlsConfig.load(out / f"{stem}.pem", out / f"{stem}.key", out / "ca.pem")
    for key in [*out.glob("*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert {p.name for p in out.glob("*.key")} == {
        "ca.key",
        "10.0.0.7.key",
        "node2.example.org.key",
        "fd00__5.key",
        "coordinator.key",
    }
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_certs_refuses_bad_input_and_existing_files_without_changing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", str(out), "--hosts", "a.example", "--coordinator-hosts", "coord.example"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["certs", str(out), "--hosts", "a.example"]) == 2
    assert "exist already" in capsys.readouterr().err
    assert main(["certs", str(out), "--hosts", "b.example,not a host"]) == 2
    assert "'not a host' is neither a host name nor an IP address" in capsys.readouterr().err
    assert main(["certs", str(out), "--hosts", "b.example,ca"]) == 2
    assert "must be distinct" in capsys.readouterr().err
    assert main(["certs", str(out), "--hosts", " , "]) == 2
    assert snapshot(out) == before
    # Adding a host later reuses the CA and keeps the coordinator's certificate.
    assert main(["certs", str(out), "--hosts", "b.example"]) == 0
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    load(out / "b.example.pem").verify_directly_issued_by(load(out / "ca.pem"))
    # --force replaces the certificates, never the CA.
    assert (
        main(["certs", str(out), "--hosts", "a.example", "--coordinator-hosts", "coord.example", "--force"])
        == 0
    )
    forced = snapshot(out)
    assert forced["ca.pem"] == before["ca.pem"] and forced["ca.key"] == before["ca.key"]
    assert forced["a.example.pem"] != before["a.example.pem"]
    assert names(load(out / "coordinator.pem")) == ({"coord.example"}, set())


def test_tls_config_refuses_mismatched_unsigned_or_partial_material(tmp_path: Path) -> None:
    a = make_loopback_certs(tmp_path / "a")
    b = make_loopback_certs(tmp_path / "b")
    ca_a, ca_b = tmp_path / "a" / "ca.pem", tmp_path / "b" / "ca.pem"
    cfg = TlsConfig.load(a.cert, a.key, ca_a)
    assert cfg.mutual and cfg.ca_pem == ca_a.read_bytes() and cfg.key_pem == a.key.read_bytes()
    assert not TlsConfig.load(a.cert, a.key).mutual
    with pytest.raises(ValueError, match="does not match the certificate"):
        TlsConfig.load(a.cert, b.key, ca_a)
    with pytest.raises(ValueError, match="is not signed by the CA"):
        TlsConfig.load(a.cert, a.key, ca_b)
    with pytest.raises(ValueError, match="cannot read the TLS key"):
        TlsConfig.load(a.cert, tmp_path / "missing.key")
    with pytest.raises(ValueError, match="not a PEM file"):
        (tmp_path / "junk.pem").write_text("hello")
        TlsConfig.load(tmp_path / "junk.pem", a.key)
    assert TlsConfig.from_options(None, None, None) is None
    with pytest.raises(ValueError, match=r"both --tls-cert and --tls-key \(given: --tls-ca\)"):
        TlsConfig.from_options(None, None, ca_a)
    with pytest.raises(ValueError, match="given: --tls-cert"):
        TlsConfig.from_options(a.cert, None)
    assert client_ssl_context(None) is True
    assert client_ssl_context(TlsConfig.load(a.cert, a.key)) is True  # no CA: the system's roots
    context = client_ssl_context(ca_a)
    assert not isinstance(context, bool) and context.check_hostname


def test_coordinator_refuses_partial_tls_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_loopback_certs(tmp_path / "a")
    code = main(
        ["coordinator", "--token", "t" * 20, "--db", str(tmp_path / "c.db"), "--tls-cert", str(a.cert)]
    )
    assert code == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()


def test_plaintext_beyond_loopback_is_announced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.7")
    assert "PLAINTEXT on 0.0.0.0:8765" in plaintext_banner("the coordinator", "0.0.0.0:8765")

    from zerowire.commands import coordinator, worker

    served: list[object] = []
    # No socket is bound: `serve` is replaced; only the decision to warn runs.
    monkeypatch.setattr(coordinator, "serve", lambda settings, job, log, tls=None: served.append(tls) or 0)
    db = str(tmp_path / "c.db")
    assert main(["coordinator", "--token", "t" * 20, "--db", db, "--host", "0.0.0.0"]) == 0
    assert "the coordinator serves PLAINTEXT on 0.0.0.0:8765" in capsys.readouterr().err
    assert main(["coordinator", "--token", "t" * 20, "--db", db, "--host", "127.0.0.1"]) == 0
    assert "PLAINTEXT" not in capsys.readouterr().err
    a = make_loopback_certs(tmp_path / "a")
    tls = ["--tls-cert", str(a.cert), "--tls-key", str(a.key)]
    assert main(["coordinator", "--token", "t" * 20, "--db", db, "--host", "0.0.0.0", *tls]) == 0
    assert "PLAINTEXT" not in capsys.readouterr().err
    assert served[:2] == [None, None] and isinstance(served[2], TlsConfig)

    def worker_tls(*extra: str) -> tuple[object, str]:
        ns = argparse.Namespace(
            coordinator="127.0.0.1:8765",
            bind="0.0.0.0:50051",
            tls_cert=None,
            tls_key=None,
            tls_ca=None,
            tls_server_name=None,
        )
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            setattr(ns, flag.lstrip("-").replace("-", "_"), value)
        return worker._tls(ns)

    assert worker_tls() == (None, "127.0.0.1:8765")
    assert "the worker's gRPC server serves PLAINTEXT on 0.0.0.0:50051" in capsys.readouterr().err
    assert worker_tls("--bind", "127.0.0.1:0")[0] is None
    assert "PLAINTEXT" not in capsys.readouterr().err
    loaded, url = worker_tls(*tls)
    assert isinstance(loaded, TlsConfig) and url == "https://127.0.0.1:8765"
    assert "PLAINTEXT" not in capsys.readouterr().err
    from zerowire.commands import CommandError

    with pytest.raises(CommandError, match="use https://"):
        worker_tls(*tls, "--coordinator", "http://10.0.0.1:8765")
