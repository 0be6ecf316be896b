"""`zerowire worker --coordinator URL`: a worker daemon (gRPC server, heartbeat, barrier, training)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any

from zerowire.commands import CommandError
from zerowire.commands.certs import add_tls_options


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ZEROWIRE_{name}", default)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="run a worker daemon that joins a coordinator and trains its job",
        description="Start a worker: gRPC server, register with the coordinator, wait for the cluster, "
        "train, save the model, leave. Every option also reads ZEROWIRE_<OPTION> from the environment. "
        "The collective, start-up and barrier timeouts are the coordinator's (see zerowire coordinator).",
    )
    p.add_argument(
        "--coordinator", default=_env("COORDINATOR"), help="coordinator URL, e.g. http://10.0.0.1:8765"
    )
    p.add_argument("--token", default=_env("TOKEN"), help="cluster token (default: $ZEROWIRE_TOKEN)")
    p.add_argument("--worker-id", default=_env("WORKER_ID"), help="stable worker id (default: assigned)")
    p.add_argument("--bind", default=_env("BIND", "0.0.0.0:0"), help="gRPC bind address (default 0.0.0.0:0)")
    p.add_argument(
        "--advertise",
        default=_env("ADVERTISE"),
        help="HOST[:PORT] peers dial (default: the bind host, or the local address that routes to "
        "the coordinator)",
    )
    p.add_argument("--host-id", default=_env("HOST_ID"), help="machine identity (default: /etc/machine-id)")
    p.add_argument("--device", default=_env("DEVICE", "auto"), help="auto | cpu | cuda[:i] (default auto)")
    p.add_argument("--data-dir", default=_env("DATA_DIR"), help="dataset cache folder")
    p.add_argument(
        "--checkpoint-dir", default=_env("CHECKPOINT_DIR"), help="checkpoint folder (shared by workers)"
    )
    p.add_argument(
        "--save-model",
        default=_env("SAVE_MODEL"),
        help="where rank 0 writes the final model (default: CHECKPOINT_DIR/model.safetensors or "
        "./zerowire-model.safetensors)",
    )
    p.add_argument("--telemetry-dir", default=_env("TELEMETRY_DIR"), help="append per-step JSON lines here")
    p.add_argument(
        "--min-workers", type=int, default=_env("MIN_WORKERS"), help="override the job's min_workers"
    )
    p.add_argument("--threads", type=int, default=_env("THREADS"), help="torch CPU threads")
    p.add_argument(
        "--data-workers",
        type=int,
        default=_env("DATA_WORKERS"),
        help="loader processes decoding a streamed dataset (default: half the CPUs, 1 to 8)",
    )
    p.add_argument(
        "--expect-job-hash", default=_env("EXPECT_JOB_HASH"), help="refuse any other job (hash prefix)"
    )
    p.add_argument(
        "--coordinator-grace",
        type=float,
        default=float(_env("COORDINATOR_GRACE", "30") or 30),
        help="seconds without the coordinator before warning that the worker is still fenced; it keeps "
        "retrying until the barrier timeout (default 30)",
    )
    add_tls_options(p)
    p.add_argument(
        "--tls-server-name",
        default=_env("TLS_SERVER_NAME"),
        help="check peers' certificates against this name instead of the address dialled (one certificate "
        "shared by workers whose addresses are not known in advance, e.g. scaled containers)",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.daemon import run_worker
    from worker.identity import WorkerConfig, default_host_id

    if not args.coordinator:
        raise CommandError("--coordinator URL (or ZEROWIRE_COORDINATOR) is required")
    if not args.token:
        raise CommandError("no cluster token: pass --token or set ZEROWIRE_TOKEN")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise CommandError(f"--device must be auto, cpu, cuda or cuda:i, not {args.device!r}")
    if args.data_workers is not None and not 0 <= int(args.data_workers) <= 64:
        raise CommandError("--data-workers must be between 0 and 64 (0: decode on the training thread)")
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if args.save_model:
        save_model = Path(args.save_model)
    elif checkpoint_dir is not None:
        save_model = checkpoint_dir / "model.safetensors"
    else:
        save_model = Path("zerowire-model.safetensors")
    tls, coordinator = _tls(args)
    for folder in (checkpoint_dir, args.telemetry_dir, args.data_dir):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    cfg = WorkerConfig(
        coordinator=coordinator,
        token=args.token,
        worker_id=args.worker_id,
        bind=args.bind,
        advertise=args.advertise,
        host_id=args.host_id or default_host_id(),
        device=args.device,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        checkpoint_dir=checkpoint_dir,
        save_model=save_model,
        telemetry_dir=Path(args.telemetry_dir) if args.telemetry_dir else None,
        min_workers=int(args.min_workers) if args.min_workers else None,
        threads=int(args.threads) if args.threads else None,
        data_workers=None if args.data_workers is None else int(args.data_workers),
        expect_job_hash=args.expect_job_hash,
        coordinator_grace_s=args.coordinator_grace,
        tls=tls,
    )
    from zerowire.process_exit import exit_without_teardown

    # the worker has left the cluster and closed its lanes
    exit_without_teardown(run_worker(cfg))


def _tls(args: argparse.Namespace) -> tuple[Any, str]:
    """The loaded TLS configuration (None: plaintext, announced when bound beyond loopback) and the
    coordinator URL (https:// by default with TLS)."""

    from communication.tls import TlsConfig, is_loopback, plaintext_banner
    from worker.identity import split_host_port

    try:
        tls = TlsConfig.from_options(
            args.tls_cert, args.tls_key, args.tls_ca, server_name=args.tls_server_name
        )
        bind_host, _ = split_host_port(args.bind)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    url = str(args.coordinator).strip()
    if tls is None:
        if not is_loopback(bind_host):
            banner = plaintext_banner("the worker's gRPC server", args.bind)
            logging.getLogger("zerowire.worker").warning("gRPC is plaintext on %s (no TLS)", args.bind)
            print(banner, file=sys.stderr, flush=True)
        return None, url
    if "://" not in url:
        url = f"https://{url}"
    elif url.startswith("http://"):
        raise CommandError(
            f"TLS is configured but --coordinator {url} is plain http://: use https:// "
            "(the coordinator serves HTTPS with --tls-cert/--tls-key)"
        )
    return tls, url
