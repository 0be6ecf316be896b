"""`zerowire certs DIR --hosts h1,h2,...`: a private CA and the certificates of one cluster.

Writes DIR/ca.pem and DIR/ca.key (the CA; an existing pair in DIR is reused), DIR/<host>.pem and
DIR/<host>.key for every host (subject alternative name: the host, as a DNS name or an IP address), and
DIR/coordinator.pem with DIR/coordinator.key (names: --coordinator-hosts, by default every host plus
localhost, 127.0.0.1 and ::1). Every certificate serves as a server and as a client certificate. Keys
are written with mode 0600. Existing certificates are never replaced without --force.

This module also defines the --tls-* options `zerowire coordinator` and `zerowire worker` share.
"""

from __future__ import annotations

import argparse
import os

from zerowire.commands import CommandError


def add_tls_options(p: argparse.ArgumentParser) -> None:
    """--tls-cert/--tls-key/--tls-ca, defaulting to ZEROWIRE_TLS_CERT/_KEY/_CA."""
    env = os.environ.get
    p.add_argument(
        "--tls-cert",
        default=env("ZEROWIRE_TLS_CERT") or None,
        metavar="PEM",
        help="this process's certificate: the coordinator serves HTTPS, a worker serves gRPC over TLS",
    )
    p.add_argument(
        "--tls-key",
        default=env("ZEROWIRE_TLS_KEY") or None,
        metavar="PEM",
        help="its private key (unencrypted)",
    )
    p.add_argument(
        "--tls-ca",
        default=env("ZEROWIRE_TLS_CA") or None,
        metavar="PEM",
        help="the cluster CA: workers verify the coordinator and their peers with it and gRPC becomes mutual "
        "TLS (peers must present a certificate it signed); the coordinator checks its certificate against it",
    )


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "certs",
        help="make a private CA and TLS certificates for the coordinator and the worker hosts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", metavar="DIR", help="folder for the files (created if missing)")
    p.add_argument(
        "--hosts",
        required=True,
        help="comma-separated worker host names or IP addresses, one certificate each: the names peers dial "
        "(the workers' --advertise host, or the address they advertise by default)",
    )
    p.add_argument(
        "--coordinator-hosts",
        default=None,
        help="comma-separated names of the coordinator, as in the workers' --coordinator URL "
        "(default: every host of --hosts plus localhost, 127.0.0.1, ::1)",
    )
    p.add_argument("--days", type=int, default=825, help="validity of the certificates in days (default 825)")
    p.add_argument("--force", action="store_true", help="replace existing certificates (never the CA)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from zerowire.certs import make_cluster_certs

    folder = Path(args.dir)
    coordinator_hosts = _names(args.coordinator_hosts) if args.coordinator_hosts is not None else None
    try:
        made = make_cluster_certs(
            folder, _names(args.hosts), coordinator_hosts, force=args.force, days=args.days
        )
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    coordinator = made.coordinator
    ca_note = "reused" if made.ca_reused else "new"
    print(f"CA ({ca_note}):   {made.ca}   key {made.ca_key} (0600; keep it off the cluster machines)")
    for pair in made.hosts if coordinator is None else (*made.hosts, coordinator):
        print(f"{pair.name + ':':<14} {pair.cert}   key {pair.key} (0600)   names {', '.join(pair.sans)}")
    if coordinator is None:
        print(f"coordinator:   kept {folder / 'coordinator.pem'} (--coordinator-hosts makes a new one)")
    host = made.hosts[0]
    url_host = coordinator.sans[0] if coordinator is not None else "COORDINATOR"
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    advertise = f"[{host.sans[0]}]" if ":" in host.sans[0] else host.sans[0]
    coordinator_cert = folder / "coordinator.pem"
    coordinator_key = folder / "coordinator.key"
    print(
        f"""
Use them (copy ca.pem everywhere, each host only its own certificate and key):
  coordinator:  zerowire coordinator --host 0.0.0.0 --tls-cert {coordinator_cert} \\
                    --tls-key {coordinator_key} --tls-ca {made.ca}
  worker {host.name}:  zerowire worker --coordinator https://{url_host}:8765 --bind 0.0.0.0:50051 \\
                    --advertise {advertise} --tls-cert {host.cert} --tls-key {host.key} --tls-ca {made.ca}
  (or ZEROWIRE_TLS_CERT / ZEROWIRE_TLS_KEY / ZEROWIRE_TLS_CA). With --tls-ca the workers' gRPC is mutual
  TLS: every worker needs its certificate and the CA."""
    )
    return 0
