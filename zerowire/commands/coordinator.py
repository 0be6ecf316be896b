"""`zerowire coordinator`: serve the control plane (membership, ranks, epochs, the job) over REST.

Every option can also come from the environment: ZEROWIRE_<OPTION> with dashes as underscores (for example
ZEROWIRE_TOKEN, ZEROWIRE_HEARTBEAT_TIMEOUT, ZEROWIRE_JOB for the job file, ZEROWIRE_MODEL for --model).
Command-line values win over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from zerowire.commands import CommandError
from zerowire.commands.certs import add_tls_options

# (flag, settings field, type, help)
SERVER_OPTIONS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "bind address (default 127.0.0.1)"),
    ("--port", "port", int, "bind port (default 8765)"),
    ("--db", "db", str, "SQLite state file (default ./zerowire-coordinator.db)"),
    ("--token", "token", str, "cluster token: admits workers (or ZEROWIRE_TOKEN; prefer the environment)"),
    ("--read-token", "read_token", str, "read-only token: status, events, metrics (ZEROWIRE_READ_TOKEN)"),
    ("--admin-token", "admin_token", str, "admin token: read-only plus eviction (ZEROWIRE_ADMIN_TOKEN)"),
    ("--heartbeat-interval", "heartbeat_interval", float, "seconds between worker heartbeats (default 0.5)"),
    ("--heartbeat-timeout", "heartbeat_timeout", float, "silence after which a worker is dead (default 2)"),
    ("--collective-timeout", "collective_timeout", float, "workers' collective timeout (default 30)"),
    ("--startup-timeout", "startup_timeout", float, "workers' start-up collective timeout (default 120)"),
    ("--barrier-timeout", "barrier_timeout", float, "workers' ready-barrier timeout (default 600)"),
    ("--progress-timeout", "progress_timeout", float, "training stalled this long is evicted (default 10)"),
    ("--restart-grace", "restart_grace", float, "extra seconds for live workers after a restart"),
    ("--max-workers", "max_workers", int, "most live workers accepted (default 1024)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (default 65536)"),
    ("--ready-wait-cap", "ready_wait_cap", float, "longest /training/ready long poll (default 30)"),
    ("--record-retention-s", "record_retention_s", float, "keep dead/left worker records (default 3600 s)"),
    ("--register-rate", "register_rate", float, "registrations/s per client address (default 5; 0: off)"),
    ("--register-burst", "register_burst", int, "registrations at once per client address (default 64)"),
    ("--register-rate-global", "register_rate_global", float, "registrations/s in all (default 50; 0: off)"),
    ("--register-burst-global", "register_burst_global", int, "registrations at once in all (default 512)"),
)
# job flags: (flag, JobSpec field, help); values are validated by JobSpec
JOB_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--job-id", "job_id", "job name"),
    ("--model", "model", "model name (resnet8, resnet18, ...)"),
    ("--dataset", "dataset", "dataset spec (digits, ...)"),
    ("--steps", "steps", "optimizer steps"),
    ("--global-batch", "global_batch", "samples per step over all workers"),
    ("--optimizer", "optimizer", "sgd | adamw"),
    ("--lr", "lr", "learning rate"),
    ("--momentum", "momentum", "SGD momentum"),
    ("--nesterov", "nesterov", "true | false"),
    ("--weight-decay", "weight_decay", "weight decay"),
    ("--betas", "betas", "AdamW betas as B1,B2"),
    ("--schedule", "schedule", "constant | cosine | step"),
    ("--warmup-steps", "warmup_steps", "linear warm-up steps"),
    ("--step-size", "step_size", "schedule=step: decay every N steps"),
    ("--gamma", "gamma", "schedule=step: decay factor"),
    ("--grad-clip", "grad_clip", "clip by global norm (0 disables)"),
    ("--seed", "seed", "data and init seed"),
    ("--compression", "compression", "none | int8"),
    ("--int8-block", "int8_block", "int8 block size"),
    ("--param-dtype", "param_dtype", "float32 | bfloat16 | float16 (compute precision; master stays fp32)"),
    ("--nccl-reduce", "nccl_reduce", "ordered (default, deterministic) | native: reduce-scatter over NCCL"),
    ("--eval-every", "eval_every", "evaluate every N steps (0: at the end)"),
    ("--checkpoint-every", "checkpoint_every", "checkpoint every N steps (0: never)"),
    ("--replicas", "replicas", "buddy replicas of every shard: 1 (default) or 0"),
    ("--min-workers", "min_workers", "workers needed before training starts"),
    ("--image-size", "image_size", "imagefolder: images are S x S (default 224)"),
    ("--channels", "channels", "imagefolder: 1 | 3 (default: from the first image)"),
    ("--augment", "augment", "imagefolder: none | flip | crop-flip | rrc-flip (default)"),
    ("--val-fraction", "val_fraction", "imagefolder without val/: the held-out share of train/"),
    ("--bad-images", "bad_images", "imagefolder: fail (default) | skip a file that cannot be decoded"),
)

INSECURE_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: --insecure-no-auth: the coordinator accepts requests WITHOUT a   !!
!!  token. Anyone who can reach {addr:<44} can     !!
!!  join, evict and stop this cluster. Use it only on a trusted loopback.    !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "coordinator",
        help="run the coordinator (REST control plane, SQLite state)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, field, typ, text in SERVER_OPTIONS:
        p.add_argument(flag, dest=field, type=typ, default=None, metavar=field.upper(), help=text)
    p.add_argument(
        "--insecure-no-auth", action="store_true", default=None, help="serve without a token (loudly warned)"
    )
    add_tls_options(p)
    jobs = p.add_argument_group("job", "the job to serve: a TOML file and/or flags (flags win)")
    jobs.add_argument("--job", dest="job_file", default=None, metavar="FILE.toml", help="job TOML file")
    for flag, field, text in JOB_OPTIONS:
        jobs.add_argument(flag, dest=f"job_{field}", default=None, metavar=field.upper(), help=text)
    p.set_defaults(handler=run)


def _env(name: str) -> str | None:
    value = os.environ.get(f"ZEROWIRE_{name.upper()}")
    return value if value not in (None, "") else None


def job_values(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job fields given by file, environment or flags; None when none was given."""
    from jobspec import load_job_file

    values: dict[str, Any] = {}
    job_file = args.job_file or _env("job")
    if job_file:
        values.update(load_job_file(job_file))
    for _flag, field, _text in JOB_OPTIONS:
        raw = getattr(args, f"job_{field}")
        if raw is None:
            raw = _env(field)
        if raw is None:
            continue
        if field == "betas":
            parts = [x.strip() for x in str(raw).split(",")]
            if len(parts) != 2:
                raise ValueError(f"--betas takes two numbers B1,B2, got {raw!r}")
            values[field] = (float(parts[0]), float(parts[1]))
        else:
            values[field] = raw
    return values or None


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from communication.tls import TlsConfig, is_loopback, plaintext_banner
    from coordinator.settings import CoordinatorSettings
    from jobspec import InvalidJob, JobSpec, make_job

    log = logging.getLogger("zerowire.coordinator")
    given = {
        field: getattr(args, field)
        for _f, field, _t, _h in SERVER_OPTIONS
        if getattr(args, field) is not None
    }
    if args.insecure_no_auth:
        given["insecure_no_auth"] = True
    try:
        settings = CoordinatorSettings(**given)
        values = job_values(args)
        job = make_job(values) if values is not None else None
        tls = TlsConfig.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    except InvalidJob as exc:
        raise CommandError(str(exc)) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "settings"
            problems.append(f"invalid {where}: {err['msg']}")
        raise CommandError("; ".join(problems)) from None
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    if job is not None:
        from coordinator.store import read_stored_job

        stored = read_stored_job(settings.db)
        if stored is not None and JobSpec.model_validate_json(stored).hash != job.hash:
            old = JobSpec.model_validate_json(stored)
            raise CommandError(
                f"{settings.db} holds job {old.job_id!r} (hash {old.hash[:12]}), "
                f"not the configured {job.job_id!r} (hash {job.hash[:12]}); start without job options "
                "to keep it, or use a new --db"
            )
    if settings.insecure_no_auth:
        print(INSECURE_BANNER.format(addr=f"{settings.host}:{settings.port}"), file=sys.stderr, flush=True)
    if tls is None and not is_loopback(settings.host):
        log.warning("REST is plaintext on %s:%d (no TLS)", settings.host, settings.port)
        print(
            plaintext_banner("the coordinator", f"{settings.host}:{settings.port}"),
            file=sys.stderr,
            flush=True,
        )
    return serve(settings, job, log, tls)


def serve(settings: Any, job: Any, log: logging.Logger, tls: Any = None) -> int:
    import uvicorn

    from communication.tls import uvicorn_ssl_args
    from coordinator.app import create_app

    app = create_app(settings, job)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=level if level in ("debug", "info", "warning", "error", "critical") else "info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        **uvicorn_ssl_args(tls),
    )
    server = uvicorn.Server(config)
    scheme = "https" if tls is not None else "http"
    log.info("coordinator on %s://%s:%d (db %s)", scheme, settings.host, settings.port, settings.db)
    server.run()
    return 0 if server.started else 1
